"""Layers with hand-written forward and backward passes."""

from .module import Module, Parameter, eval_mode, no_grad, is_grad_enabled
from .linear import Linear, OutputHead
from .embedding import Embedding
from .normalization import LayerNorm
from .activation import GELU, Softmax
from .dropout import Dropout
from .attention import AttentionCore, CrossAttention, MultiHeadAttention, KVCache, attention_mask, causal_mask
from .positional import SinusoidalPositionalEncoding
from .blockwise_attention import BlockwiseAttention, make_attention
from .loss import CrossEntropyLoss
from .readout import SequenceReadout
from .lora import LoRALinear, LoRAOutputHead, LowRankAdapter

__all__ = [
    "Module", "Parameter", "eval_mode", "no_grad", "is_grad_enabled", "Linear", "OutputHead", "Embedding", "LayerNorm",
    "GELU", "Softmax", "Dropout", "AttentionCore", "CrossAttention", "MultiHeadAttention", "BlockwiseAttention",
    "make_attention", "KVCache", "attention_mask", "causal_mask", "SinusoidalPositionalEncoding", "CrossEntropyLoss",
    "SequenceReadout", "LoRALinear", "LoRAOutputHead", "LowRankAdapter",
]
