"""Layers with hand-written forward and backward passes."""

from .module import Module, Parameter, eval_mode, no_grad, is_grad_enabled
from .linear import Linear, OutputHead
from .embedding import Embedding
from .normalization import LayerNorm, RMSNorm
from .activation import GELU, SiLU, Softmax
from .dropout import Dropout
from .attention import AttentionCore, CrossAttention, MultiHeadAttention, KVCache, attention_mask, causal_mask
from .positional import SinusoidalPositionalEncoding
from .blockwise_attention import BlockwiseAttention, make_attention
from .loss import CrossEntropyLoss
from .dpo import DPOLoss, DPOOutput, sequence_logprobs
from .fused_loss import FusedLinearCrossEntropy
from .readout import SequenceReadout
from .lora import LoRALinear, LoRAOutputHead, LowRankAdapter
from .rope import RoPE, rope_frequencies
from .swiglu import SwiGLU
from .gqa import GroupedQueryAttention

__all__ = [
    "Module", "Parameter", "eval_mode", "no_grad", "is_grad_enabled", "Linear", "OutputHead", "Embedding", "LayerNorm",
    "GELU", "Softmax", "Dropout", "AttentionCore", "CrossAttention", "MultiHeadAttention", "BlockwiseAttention",
    "make_attention", "KVCache", "attention_mask", "causal_mask", "SinusoidalPositionalEncoding", "CrossEntropyLoss", "FusedLinearCrossEntropy",
    "DPOLoss", "DPOOutput", "sequence_logprobs", "SequenceReadout", "LoRALinear", "LoRAOutputHead", "LowRankAdapter",
    "RMSNorm", "SiLU", "RoPE", "rope_frequencies", "SwiGLU", "GroupedQueryAttention",
]
