"""Which model a config builds: one place that knows every family (GPT-2, Llama 3, Qwen3, the
encoder-decoder).

Code above the models (checkpoints, loading) asks here instead of naming a class, so a
recipe never needs to know which family it holds.
"""

from __future__ import annotations

from .config import EncDecConfig, GPTConfig, LlamaConfig, config_from_dict, encdec_tensor_shapes
from .encdec import EncoderDecoder
from .hf_layout import is_transposed, llama_tensor_shapes
from .llama import LlamaModel
from .model import GPTModel
from .pretrained import hf_tensor_shapes

__all__ = ["build_model", "parameter_shapes", "config_from_dict"]


def build_model(cfg, seed: int | None = 0, init: bool = True):
    """A GPTModel for a GPTConfig, a LlamaModel for a LlamaConfig (Llama 3 or Qwen3), an
    EncoderDecoder for an EncDecConfig."""
    if isinstance(cfg, EncDecConfig):
        return EncoderDecoder(cfg, seed=seed, init=init)
    if isinstance(cfg, LlamaConfig):
        return LlamaModel(cfg, seed=seed, init=init)
    if isinstance(cfg, GPTConfig):
        return GPTModel(cfg, seed=seed, init=init)
    raise ValueError(f"no model family is built from a {type(cfg).__name__}")


def parameter_shapes(cfg) -> dict:
    """name -> shape of every parameter of ``build_model(cfg)``, in numpygpt's layout
    (linear weights (in, out)), from the config alone. LoRA adapters are not included."""
    if isinstance(cfg, EncDecConfig):
        return encdec_tensor_shapes(cfg)
    if isinstance(cfg, LlamaConfig):
        return {n: s[::-1] if is_transposed(n) else s for n, s in llama_tensor_shapes(cfg).items()}
    return hf_tensor_shapes(cfg)  # GPT-2's checkpoint layout is numpygpt's own
