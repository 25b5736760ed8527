"""numpygpt: a GPT-2 style language model in NumPy/CuPy with hand-written backward passes."""

from . import backend
from .config import GPTConfig, LlamaConfig, PRESETS, count_parameters
from .model import FeedForward, GPTModel, OutputHead, TransformerBlock
from .nn import (CrossEntropyLoss, Dropout, FusedLinearCrossEntropy, Embedding, GELU, KVCache, LayerNorm, Linear, LoRALinear, LoRAOutputHead,
                 Module, MultiHeadAttention, Parameter, SequenceReadout, Softmax, eval_mode, no_grad)
from .lora import apply_lora, load_lora, merge_lora, save_lora, unmerge_lora
from .llama import LlamaModel
from .hf import from_pretrained, save_pretrained
from .encdec import DecoderBlock, EncDecConfig, EncoderBlock, EncoderDecoder

__version__ = "0.1.0"

__all__ = [
    "backend", "GPTConfig", "PRESETS", "count_parameters", "GPTModel", "TransformerBlock", "FeedForward",
    "OutputHead", "CrossEntropyLoss", "FusedLinearCrossEntropy", "Dropout", "Embedding", "GELU", "KVCache", "LayerNorm", "Linear",
    "Module", "MultiHeadAttention", "Parameter", "Softmax", "eval_mode", "no_grad",
    "SequenceReadout", "LoRALinear", "LoRAOutputHead", "apply_lora", "merge_lora", "unmerge_lora", "save_lora",
    "load_lora", "LlamaConfig", "LlamaModel", "from_pretrained", "save_pretrained",
    "EncDecConfig", "EncoderDecoder", "EncoderBlock", "DecoderBlock",
]
