"""Layers with hand-written forward and backward passes."""

from .module import Module, Parameter, eval_mode, no_grad, is_grad_enabled
from .linear import Linear, OutputHead
from .embedding import Embedding
from .normalization import LayerNorm
from .activation import GELU, Softmax
from .dropout import Dropout
from .attention import MultiHeadAttention, KVCache, causal_mask
from .blockwise_attention import BlockwiseAttention, make_attention
from .loss import CrossEntropyLoss
from .fused_loss import FusedLinearCrossEntropy
from .readout import SequenceReadout
from .lora import LoRALinear, LoRAOutputHead, LowRankAdapter

__all__ = [
    "Module", "Parameter", "eval_mode", "no_grad", "is_grad_enabled", "Linear", "OutputHead", "Embedding", "LayerNorm",
    "GELU", "Softmax", "Dropout", "MultiHeadAttention", "BlockwiseAttention", "make_attention", "KVCache",
    "causal_mask", "CrossEntropyLoss", "FusedLinearCrossEntropy", "SequenceReadout", "LoRALinear", "LoRAOutputHead", "LowRankAdapter",
]
