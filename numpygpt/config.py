"""GPTConfig: the model's hyperparameters, with GPT-2's presets."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field

from .options import from_fields


@dataclass
class GPTConfig:
    vocab_size: int = 50257      # GPT-2 BPE vocabulary
    context_length: int = 1024   # longest sequence (positional embedding rows)
    emb_dim: int = 768           # C
    n_heads: int = 12            # NH; head size hs = C / NH
    n_layers: int = 12           # transformer blocks
    drop_rate: float = 0.1       # dropout on embeddings, attention weights, residual branches
    qkv_bias: bool = False       # bias on the Q/K/V projection (GPT-2 checkpoints: True)
    tie_weights: bool = False    # output head shares the token embedding (GPT-2: True)
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"       # float32 for training, float64 for gradient checks
    attn_impl: str = "auto"      # "dense", "blockwise" (tiled, nn/blockwise_attention.py) or "auto"
    # classification (GPTModel.to_classifier): None is the language model
    num_classes: int | None = None  # K: the head is Linear(emb_dim, K) and logits are (B, K)
    readout: str = "last"        # where logits are read: "last" position or "last_non_pad"
    pad_id: int = 50256          # padding token id for readout="last_non_pad" (right padding)
    # LoRA (numpygpt.apply_lora): None is no adapters
    lora_rank: int | None = None
    lora_alpha: float | None = None

    def __post_init__(self):
        # types first: a string "32" or a float 2.7 is refused, never converted or truncated
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            setattr(self, name, int(value))
        for name in ("drop_rate", "layer_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            setattr(self, name, float(value))
        for name in ("qkv_bias", "tie_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.emb_dim % self.n_heads != 0:
            raise ValueError(f"emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {self.drop_rate}")
        if not self.layer_norm_eps > 0.0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if self.attn_impl not in ("auto", "dense", "blockwise"):
            raise ValueError(f"attn_impl must be 'auto', 'dense' or 'blockwise', got {self.attn_impl!r}")
        # fine-tuning: a classifier head, LoRA adapters
        if self.num_classes is not None and (not _is_int(self.num_classes) or self.num_classes < 2):
            raise ValueError(f"num_classes must be an integer of at least 2 (or None), got {self.num_classes!r}")
        if self.readout not in READOUTS:
            raise ValueError(f"readout must be one of {', '.join(READOUTS)}, got {self.readout!r}")
        if not _is_int(self.pad_id) or self.pad_id < 0:
            raise ValueError(f"pad_id must be a token id (an integer >= 0), got {self.pad_id!r}")
        if (self.lora_rank is None) != (self.lora_alpha is None):
            raise ValueError("lora_rank and lora_alpha are given together or not at all")
        if self.lora_rank is not None and (not _is_int(self.lora_rank) or self.lora_rank < 1):
            raise ValueError(f"LoRA rank must be a positive integer, got {self.lora_rank!r}")
        if self.lora_alpha is not None and (isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, numbers.Real)
                                            or not math.isfinite(self.lora_alpha) or not self.lora_alpha > 0):
            raise ValueError(f"LoRA alpha must be a positive number, got {self.lora_alpha!r}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        """GPT-2 sizes ('gpt2-small' alias 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl') or 'tiny'."""
        key = PRESET_ALIASES.get(name, name)
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: choose from {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[key], **overrides})

    def replace(self, **changes) -> "GPTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a GPTConfig is read from a dict, got {type(d).__name__}")
        return from_fields(cls, d, ValueError, "GPTConfig fields")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


READOUTS = ("last", "last_non_pad")
TRAINABLE = ("all", "last-block", "last-two-blocks", "head")  # what GPTModel.set_trainable accepts

_GPT2 = dict(vocab_size=50257, context_length=1024)
PRESETS = {
    "gpt2-small": dict(_GPT2, emb_dim=768, n_layers=12, n_heads=12),     # 124M
    "gpt2-medium": dict(_GPT2, emb_dim=1024, n_layers=24, n_heads=16),   # 355M
    "gpt2-large": dict(_GPT2, emb_dim=1280, n_layers=36, n_heads=20),    # 774M
    "gpt2-xl": dict(_GPT2, emb_dim=1600, n_layers=48, n_heads=25),       # 1558M
    # small enough for gradient checks and unit tests
    "tiny": dict(vocab_size=128, context_length=32, emb_dim=32, n_layers=2, n_heads=4, drop_rate=0.0),
}
PRESET_ALIASES = {"gpt2": "gpt2-small", "gpt2-124m": "gpt2-small", "gpt2-355m": "gpt2-medium",
                  "gpt2-774m": "gpt2-large", "gpt2-1558m": "gpt2-xl"}


def count_parameters(cfg: GPTConfig, tied: bool | None = None, trainable: str | None = None) -> int:
    """Parameters of a GPTModel with this config, computed from the shapes alone.

    ``trainable``: None counts every parameter (adapters included when ``cfg.lora_rank``
    is set); "all", "head", "last-block", "last-two-blocks" count what
    ``model.set_trainable(trainable)`` leaves trainable; "lora" counts what
    ``apply_lora`` leaves trainable (the adapters). A classifier (``cfg.num_classes``)
    has a (C, K) head with bias instead of the language-model head.
    """
    tied = cfg.tie_weights if tied is None else tied
    V, T, C, L = cfg.vocab_size, cfg.context_length, cfg.emb_dim, cfg.n_layers
    attn = C * 3 * C + (3 * C if cfg.qkv_bias else 0) + C * C + C
    mlp = C * 4 * C + 4 * C + 4 * C * C + C
    block = 2 * C + attn + 2 * C + mlp  # ln_1, attn, ln_2, mlp
    if cfg.num_classes is not None:
        head = C * cfg.num_classes + cfg.num_classes  # score, with bias
    else:
        head = 0 if tied else V * C  # a tied head is wte
    adapters = 0
    if cfg.lora_rank is not None:
        from .lora import lora_tensor_shapes  # imports the layers, which import this module

        adapters = sum(math.prod(s) for s in lora_tensor_shapes(cfg.replace(tie_weights=tied)).values())
    ends = 2 * C + head  # ln_f + head
    if trainable is None:
        return V * C + T * C + L * block + ends + adapters
    if trainable == "lora":
        if cfg.lora_rank is None:
            raise ValueError('count_parameters(trainable="lora") needs a config with lora_rank')
        return adapters
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be None, 'lora' or one of {', '.join(TRAINABLE)}; got {trainable!r}")
    if cfg.lora_rank is not None:
        raise ValueError(f"count_parameters(trainable={trainable!r}) counts a model without LoRA adapters")
    if trainable == "all":
        return V * C + T * C + L * block + ends
    n_blocks = {"head": 0, "last-block": 1, "last-two-blocks": 2}[trainable]
    count = head + (min(L, n_blocks) * block + 2 * C if n_blocks else 0)
    if tied and cfg.num_classes is None:
        count += V * C  # a tied head is the token embedding: it trains too
    return count
