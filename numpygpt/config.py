"""Model hyperparameters: GPTConfig (GPT-2), LlamaConfig (Llama 3, Qwen3) and EncDecConfig
(the original Transformer's encoder-decoder), with presets.

Every config has a ``model_type`` naming its family ("gpt2", "llama", "qwen3", "encoder-decoder");
``config_from_dict`` and ``preset_config`` pick the class from it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import ClassVar

from .options import from_fields


@dataclass
class GPTConfig:
    model_type: ClassVar[str] = "gpt2"  # the family (not a field: GPT-2 checkpoints' configs lack it)
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
        _check_classifier(self.num_classes, self.readout, self.pad_id)
        _check_lora(self.lora_rank, self.lora_alpha)

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


def _check_classifier(num_classes, readout, pad_id) -> None:
    """A classifier's head: None (a language model) or K >= 2 classes, a readout, a padding id."""
    if num_classes is not None and (not _is_int(num_classes) or num_classes < 2):
        raise ValueError(f"num_classes must be an integer of at least 2 (or None), got {num_classes!r}")
    if readout not in READOUTS:
        raise ValueError(f"readout must be one of {', '.join(READOUTS)}, got {readout!r}")
    if not _is_int(pad_id) or pad_id < 0:
        raise ValueError(f"pad_id must be a token id (an integer >= 0), got {pad_id!r}")


def _check_lora(rank, alpha) -> None:
    """LoRA's rank and alpha: both None (no adapters), or a positive integer and a positive number."""
    if (rank is None) != (alpha is None):
        raise ValueError("lora_rank and lora_alpha are given together or not at all")
    if rank is not None and (not _is_int(rank) or rank < 1):
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real)
                              or not math.isfinite(alpha) or not alpha > 0):
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")


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


def lora_tensor_shapes(cfg) -> dict:
    """name -> shape of every adapter tensor apply_lora gives a model with this config
    (rank ``cfg.lora_rank``), in model order; computed from the config alone."""
    r = cfg.lora_rank
    shapes = {}
    for name, n_in, n_out, splits in _adapted_layers(cfg):
        shapes[name + ".lora_A"] = (splits, n_in, r)
        shapes[name + ".lora_B"] = (splits, r, n_out // splits)
    return shapes


def _adapted_layers(cfg) -> list:
    """(name, in, out, splits) of every layer apply_lora wraps, in model order (the order
    of the model's ``lora_targets``)."""
    C = cfg.emb_dim
    layers = []
    if cfg.model_type == ENCDEC:
        layers = _encdec_adapted_layers(cfg)
    elif cfg.model_type == "gpt2":
        for i in range(cfg.n_layers):
            layers += [(f"h.{i}.attn.c_attn", C, 3 * C, 3), (f"h.{i}.attn.c_proj", C, C, 1),
                       (f"h.{i}.mlp.c_fc", C, 4 * C, 1), (f"h.{i}.mlp.c_proj", 4 * C, C, 1)]
    else:  # Llama 3, Qwen3
        q, kv, H = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.hidden_dim
        for i in range(cfg.n_layers):
            attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
            layers += [(attn + "q_proj", C, q, 1), (attn + "k_proj", C, kv, 1), (attn + "v_proj", C, kv, 1),
                       (attn + "o_proj", q, C, 1), (mlp + "gate_proj", C, H, 1), (mlp + "up_proj", C, H, 1),
                       (mlp + "down_proj", H, C, 1)]
    if cfg.num_classes is not None:
        layers.append(("score", C, cfg.num_classes, 1))
    elif not cfg.tie_weights:
        layers.append(("lm_head", C, cfg.vocab_size, 1))
    return layers


def count_parameters(cfg, tied: bool | None = None, trainable: str | None = None) -> int:
    """Parameters of a GPTModel with this config, computed from the shapes alone.

    ``trainable``: None counts every parameter (adapters included when ``cfg.lora_rank``
    is set); "all", "head", "last-block", "last-two-blocks" count what
    ``model.set_trainable(trainable)`` leaves trainable; "lora" counts what
    ``apply_lora`` leaves trainable (the adapters). A classifier (``cfg.num_classes``)
    has a (C, K) head with bias instead of the language-model head.
    """
    if isinstance(cfg, LlamaConfig):
        return _count_llama(cfg, cfg.tie_weights if tied is None else tied, trainable)
    if isinstance(cfg, EncDecConfig):
        return _count_encdec(cfg, cfg.tie_weights if tied is None else tied, trainable)
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


# -- Llama 3 and Qwen3 ----------------------------------------------------------------------

MODEL_TYPES = ("gpt2", "llama", "qwen3", "encoder-decoder")
ENCDEC = "encoder-decoder"
ROPE_TYPES = ("default", "llama3")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class LlamaConfig:
    """A Llama 3 or Qwen3 decoder: pre-RMSNorm blocks of grouped-query attention with
    rotary positions (Qwen3: plus RMSNorm on each query and key head) and a SwiGLU MLP,
    no biases. Field names follow GPTConfig; Hugging Face's config.json names in comments."""
    model_type: str = "llama"      # "llama" or "qwen3" (adds QK-norm)
    vocab_size: int = 128256
    context_length: int = 131072   # max_position_embeddings
    emb_dim: int = 2048            # C, hidden_size
    n_heads: int = 32              # NH query heads, num_attention_heads
    n_kv_heads: int = 8            # NKV key/value heads (NH a multiple), num_key_value_heads
    head_dim: int | None = None    # hs; None: emb_dim // n_heads (Qwen3 sets it apart)
    hidden_dim: int = 8192         # SwiGLU width, intermediate_size
    n_layers: int = 16             # num_hidden_layers
    rope_theta: float = 500000.0   # Llama 3: 500,000; Qwen3: 1,000,000
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor", "low_freq_factor",
    #                                    "high_freq_factor", "original_max_position_embeddings"}
    rms_norm_eps: float = 1e-5     # Llama 3: 1e-5; Qwen3: 1e-6
    tie_weights: bool = True       # tie_word_embeddings
    dtype: str = "float32"
    attn_impl: str = "auto"        # "dense", "blockwise" or "auto", as GPTConfig's
    # classification (LlamaModel.to_classifier), as GPTConfig's: None is the language model
    num_classes: int | None = None
    readout: str = "last"
    pad_id: int = 0
    # LoRA (numpygpt.apply_lora) on q/k/v/o_proj, gate/up/down_proj and an untied head
    lora_rank: int | None = None
    lora_alpha: float | None = None

    def __post_init__(self):
        if self.model_type not in ("llama", "qwen3"):
            raise ValueError(f"LlamaConfig model_type must be 'llama' or 'qwen3', got {self.model_type!r}")
        if self.head_dim is None and _is_int(self.emb_dim) and _is_int(self.n_heads) and self.n_heads > 0:
            if self.emb_dim % self.n_heads:
                raise ValueError(f"emb_dim ({self.emb_dim}) is not divisible by n_heads ({self.n_heads}): give head_dim")
            self.head_dim = self.emb_dim // self.n_heads
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_kv_heads", "head_dim",
                     "hidden_dim", "n_layers"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            setattr(self, name, int(value))
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            if not _is_real(value) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
            setattr(self, name, float(value))
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}): "
                             "each key/value head serves the same number of query heads")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (rotary embeddings rotate pairs), got {self.head_dim}")
        if not isinstance(self.tie_weights, bool):
            raise ValueError(f"tie_weights must be true or false, got {self.tie_weights!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if self.attn_impl not in ("auto", "dense", "blockwise"):
            raise ValueError(f"attn_impl must be 'auto', 'dense' or 'blockwise', got {self.attn_impl!r}")
        self.rope_scaling = _check_rope_scaling(self.rope_scaling)
        _check_classifier(self.num_classes, self.readout, self.pad_id)
        _check_lora(self.lora_rank, self.lora_alpha)

    @property
    def qk_norm(self) -> bool:
        """Whether queries and keys are RMS-normalised per head before RoPE (Qwen3)."""
        return self.model_type == "qwen3"

    @classmethod
    def preset(cls, name: str, **overrides) -> "LlamaConfig":
        """Real Llama 3.2 / Qwen3 shapes ('llama-3.2-1b', 'qwen3-0.6b', ...) or a small one."""
        if name not in LLAMA_PRESETS:
            raise ValueError(f"unknown preset {name!r}: choose from {', '.join(sorted(LLAMA_PRESETS))}")
        return cls(**{**LLAMA_PRESETS[name], **overrides})

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a LlamaConfig is read from a dict, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown LlamaConfig fields: {sorted(unknown)}")
        return cls(**d)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_rope_scaling(scaling):
    """None, or a copy of a {"rope_type": ...} dict whose entries fit its type."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be a dict or None, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unknown rope_type {rope_type!r}: numpygpt computes {', '.join(ROPE_TYPES)}")
    if rope_type == "default":
        return None
    missing = [k for k in LLAMA3_ROPE_KEYS if k not in scaling]
    if missing:
        raise ValueError(f"rope_type 'llama3' needs {', '.join(missing)} in rope_scaling")
    values = {k: scaling[k] for k in LLAMA3_ROPE_KEYS}
    if not all(_is_real(v) and v > 0 for v in values.values()):
        raise ValueError(f"the llama3 rope_scaling entries must be positive numbers, got {values}")
    if not values["high_freq_factor"] > values["low_freq_factor"]:
        raise ValueError("rope_scaling's high_freq_factor must exceed its low_freq_factor")
    return {"rope_type": "llama3", **values}


_LLAMA3_ROPE = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
_LLAMA32 = dict(model_type="llama", vocab_size=128256, context_length=131072, n_kv_heads=8, head_dim=None,
                rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE, rms_norm_eps=1e-5, tie_weights=True)
_QWEN3 = dict(model_type="qwen3", vocab_size=151936, context_length=40960, n_kv_heads=8, head_dim=128,
              rope_theta=1000000.0, rms_norm_eps=1e-6, tie_weights=True)
LLAMA_PRESETS = {
    "llama-3.2-1b": dict(_LLAMA32, emb_dim=2048, n_heads=32, hidden_dim=8192, n_layers=16),
    "llama-3.2-3b": dict(_LLAMA32, emb_dim=3072, n_heads=24, hidden_dim=8192, n_layers=28),
    "qwen3-0.6b": dict(_QWEN3, emb_dim=1024, n_heads=16, hidden_dim=3072, n_layers=28),
    "qwen3-1.7b": dict(_QWEN3, emb_dim=2048, n_heads=16, hidden_dim=6144, n_layers=28),
    # ~19M parameters with GPT-2's tokenizer: trains on the CPU
    "llama-small": dict(model_type="llama", vocab_size=50257, context_length=512, emb_dim=256, n_heads=8,
                        n_kv_heads=4, hidden_dim=768, n_layers=8, rope_theta=500000.0),
    # gradient checks and unit tests; the llama3 scaling acts from position 16
    "llama-tiny": dict(model_type="llama", vocab_size=128, context_length=64, emb_dim=32, n_heads=4,
                       n_kv_heads=2, hidden_dim=64, n_layers=2, rope_theta=500000.0,
                       rope_scaling=dict(_LLAMA3_ROPE, factor=4.0, original_max_position_embeddings=16)),
    "qwen3-tiny": dict(model_type="qwen3", vocab_size=128, context_length=64, emb_dim=32, n_heads=4,
                       n_kv_heads=2, head_dim=16, hidden_dim=64, n_layers=2, rope_theta=1000000.0,
                       rms_norm_eps=1e-6),
}


def _count_llama(cfg: LlamaConfig, tied: bool, trainable: str | None) -> int:
    """Parameters of a LlamaModel with this config, from the shapes alone: every one
    (trainable None; "all" without adapters) or the LoRA adapters ("lora")."""
    if trainable not in (None, "all", "lora"):
        raise ValueError(f"count_parameters of a {cfg.model_type} model takes trainable None, 'all' or 'lora', "
                         f"got {trainable!r}")
    adapters = 0
    if cfg.lora_rank is not None:
        adapters = sum(math.prod(s) for s in lora_tensor_shapes(cfg.replace(tie_weights=tied)).values())
    elif trainable == "lora":
        raise ValueError('count_parameters(trainable="lora") needs a config with lora_rank')
    if trainable == "lora":
        return adapters
    V, C, H, hs = cfg.vocab_size, cfg.emb_dim, cfg.hidden_dim, cfg.head_dim
    attn = C * cfg.n_heads * hs * 2 + C * cfg.n_kv_heads * hs * 2  # q, o; k, v
    qk_norm = 2 * hs if cfg.qk_norm else 0
    block = 2 * C + attn + qk_norm + 3 * C * H  # two RMSNorms, attention, SwiGLU
    if cfg.num_classes is not None:
        head = C * cfg.num_classes + cfg.num_classes  # score, with bias
    else:
        head = 0 if tied else V * C
    return V * C + cfg.n_layers * block + C + head + (adapters if trainable is None else 0)


def config_from_dict(d: dict):
    """A GPTConfig, LlamaConfig or EncDecConfig from ``to_dict``'s output, by its "model_type"
    (none: GPT-2)."""
    if not isinstance(d, dict):
        raise ValueError(f"a model config is read from a dict, got {type(d).__name__}")
    model_type = d.get("model_type", "gpt2")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}: numpygpt builds {', '.join(MODEL_TYPES)}")
    if model_type == "gpt2":
        return GPTConfig.from_dict({k: v for k, v in d.items() if k != "model_type"})
    if model_type == ENCDEC:
        return EncDecConfig.from_dict(d)
    return LlamaConfig.from_dict(d)


def preset_config(name: str, **overrides):
    """The GPTConfig or LlamaConfig preset called ``name``."""
    if name in LLAMA_PRESETS:
        return LlamaConfig.preset(name, **overrides)
    if name in PRESETS or name in PRESET_ALIASES:
        return GPTConfig.preset(name, **overrides)
    raise ValueError(f"unknown preset {name!r}: choose from {', '.join(sorted([*PRESETS, *LLAMA_PRESETS]))}")


# -- the encoder-decoder (numpygpt.encdec) ------------------------------------------------------

@dataclass
class EncDecConfig:
    """The original Transformer: an encoder and a decoder of pre- (or post-) LayerNorm blocks
    with GPT-2's sizes and names, sinusoidal positions and cross-attention."""
    vocab_size: int = 64          # V, one vocabulary for source and target
    context_length: int = 64      # longest source or target (positional table rows)
    emb_dim: int = 64             # C
    n_heads: int = 4              # NH; head size hs = C / NH
    n_enc_layers: int = 2
    n_dec_layers: int = 2
    drop_rate: float = 0.1        # dropout on embeddings, attention weights, residual branches
    norm_first: bool = True       # pre-LayerNorm; False is the paper's post-LayerNorm
    share_embeddings: bool = True  # source and target share one embedding table
    tie_weights: bool = True      # the output head is the target embedding
    pad_id: int = 0               # source padding, hidden from attention
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"
    model_type: str = ENCDEC
    # LoRA (numpygpt.apply_lora) on every Linear of both stacks and an untied head
    lora_rank: int | None = None
    lora_alpha: float | None = None
    num_classes: ClassVar[None] = None  # a translation model only (no classifier head)

    def __post_init__(self):
        if self.model_type != ENCDEC:
            raise ValueError(f"EncDecConfig model_type must be {ENCDEC!r}, got {self.model_type!r}")
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_enc_layers", "n_dec_layers"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            setattr(self, name, int(value))
        if self.emb_dim % self.n_heads:
            raise ValueError(f"emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})")
        if not _is_real(self.drop_rate) or not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {self.drop_rate!r}")
        if not _is_real(self.layer_norm_eps) or not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        for name in ("norm_first", "share_embeddings", "tie_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not _is_int(self.pad_id) or not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"pad_id must be a token id in [0, {self.vocab_size}), got {self.pad_id!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        _check_lora(self.lora_rank, self.lora_alpha)

    def replace(self, **changes) -> "EncDecConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EncDecConfig":
        if not isinstance(d, dict):
            raise ValueError(f"an EncDecConfig is read from a dict, got {type(d).__name__}")
        return from_fields(cls, d, ValueError, "EncDecConfig fields")


def encdec_tensor_shapes(cfg: EncDecConfig) -> dict:
    """name -> shape of every parameter of ``EncoderDecoder(cfg)`` without adapters, in model
    order (linear weights (in, out)); from the config alone."""
    C, V = cfg.emb_dim, cfg.vocab_size

    def linear(name, n_in, n_out):
        return {name + ".weight": (n_in, n_out), name + ".bias": (n_out,)}

    def norms(prefix, names):
        return {f"{prefix}{n}.{w}": (C,) for n in names for w in ("weight", "bias")}

    def feed_forward(prefix):
        return {**linear(prefix + "mlp.c_fc", C, 4 * C), **linear(prefix + "mlp.c_proj", 4 * C, C)}

    shapes = {"src_emb.weight": (V, C)}
    if not cfg.share_embeddings:
        shapes["tgt_emb.weight"] = (V, C)
    for i in range(cfg.n_enc_layers):
        b = f"encoder.{i}."
        shapes.update({**norms(b, ("ln_1", "ln_2")), **linear(b + "attn.c_attn", C, 3 * C),
                       **linear(b + "attn.c_proj", C, C), **feed_forward(b)})
    for i in range(cfg.n_dec_layers):
        b = f"decoder.{i}."
        shapes.update({**norms(b, ("ln_1", "ln_2", "ln_3")), **linear(b + "attn.c_attn", C, 3 * C),
                       **linear(b + "attn.c_proj", C, C), **linear(b + "cross_attn.c_q", C, C),
                       **linear(b + "cross_attn.c_kv", C, 2 * C), **linear(b + "cross_attn.c_proj", C, C),
                       **feed_forward(b)})
    if cfg.norm_first:
        shapes.update(norms("", ("ln_enc", "ln_dec")))
    if not cfg.tie_weights:
        shapes["lm_head.weight"] = (V, C)
    return shapes


def _encdec_adapted_layers(cfg: EncDecConfig) -> list:
    """(name, in, out, splits) of the Linears apply_lora wraps in both stacks (the head is
    added by ``_adapted_layers``): self-attention's c_attn (Q | K | V) and c_proj, in the
    decoder cross-attention's c_q, c_kv (K | V) and c_proj, and the feed-forward's c_fc, c_proj."""
    C = cfg.emb_dim
    layers = []
    for i in range(cfg.n_enc_layers):
        b = f"encoder.{i}."
        layers += [(b + "attn.c_attn", C, 3 * C, 3), (b + "attn.c_proj", C, C, 1),
                   (b + "mlp.c_fc", C, 4 * C, 1), (b + "mlp.c_proj", 4 * C, C, 1)]
    for i in range(cfg.n_dec_layers):
        b = f"decoder.{i}."
        layers += [(b + "attn.c_attn", C, 3 * C, 3), (b + "attn.c_proj", C, C, 1),
                   (b + "cross_attn.c_q", C, C, 1), (b + "cross_attn.c_kv", C, 2 * C, 2),
                   (b + "cross_attn.c_proj", C, C, 1), (b + "mlp.c_fc", C, 4 * C, 1), (b + "mlp.c_proj", 4 * C, C, 1)]
    return layers


def _count_encdec(cfg: EncDecConfig, tied: bool, trainable: str | None) -> int:
    """Parameters of an EncoderDecoder with this config, from the shapes alone: every one
    (trainable None; "all" without adapters) or the LoRA adapters ("lora")."""
    if trainable not in (None, "all", "lora"):
        raise ValueError(f"count_parameters of an encoder-decoder takes trainable None, 'all' or 'lora', "
                         f"got {trainable!r}")
    cfg = cfg.replace(tie_weights=tied)
    if cfg.lora_rank is None and trainable == "lora":
        raise ValueError('count_parameters(trainable="lora") needs a config with lora_rank')
    adapters = 0 if cfg.lora_rank is None else sum(math.prod(s) for s in lora_tensor_shapes(cfg).values())
    if trainable == "lora":
        return adapters
    weights = sum(math.prod(s) for s in encdec_tensor_shapes(cfg).values())
    return weights + (adapters if trainable is None else 0)
