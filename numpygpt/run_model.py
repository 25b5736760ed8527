"""The model ``numpygpt train`` builds from scratch: its family (``--arch``), shape and one-line
description.

    cfg = train_config(opts, n_vocab=4096)   # a GPTConfig or a LlamaConfig
    model = families.build_model(cfg, seed=opts.seed)

``--arch gpt2`` (the default) starts from SMALL_MODEL or a GPT-2 ``--preset``; ``--arch llama``
and ``--arch qwen3`` start from SMALL_LLAMA or a Llama/Qwen3 ``--preset`` (which names its own
family), and the shape flags (``--emb-dim``, ``--n-kv-heads``...) override either. A flag that the
family has no field for (``--qkv-bias`` for Llama, ``--hidden-dim`` for GPT-2) is refused
rather than ignored. Problems raise ValueError, which ``numpygpt.run`` turns into a RunError.
"""

from __future__ import annotations

from .config import LLAMA_PRESETS, GPTConfig, LlamaConfig, preset_config

__all__ = ["SMALL_MODEL", "SMALL_LLAMA", "ARCHS", "GPT2_KEYS", "LLAMA_KEYS", "MODEL_KEYS", "model_arch",
           "train_config", "describe_config"]

ARCHS = ("gpt2", "llama", "qwen3")

# The model that `numpygpt train` builds when no --preset is given: small enough to learn
# visibly in a few minutes on two CPU cores. Most of its time goes to the 50257-way
# output layer, so the head shares the token embedding (half the embedding parameters
# and optimiser work) and the blocks stay narrow.
SMALL_MODEL = dict(emb_dim=128, n_layers=4, n_heads=4, context_length=128, drop_rate=0.0,
                   tie_weights=True, qkv_bias=False)
# The same budget for --arch llama / qwen3: the widths and depth of SMALL_MODEL, two key/value
# heads for the four query heads, and a SwiGLU of width 3C (3 matrices of C x 3C: about the
# 8C^2 of GPT-2's 4C MLP).
SMALL_LLAMA = dict(emb_dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=384, context_length=128,
                   tie_weights=True)
# What the published models use: Llama 3's rotary base and RMSNorm eps, Qwen3's.
FAMILY_DEFAULTS = {"llama": dict(rope_theta=500000.0, rms_norm_eps=1e-5),
                   "qwen3": dict(rope_theta=1000000.0, rms_norm_eps=1e-6)}

GPT2_KEYS = ("emb_dim", "n_layers", "n_heads", "context_length", "drop_rate", "tie_weights", "qkv_bias")
LLAMA_KEYS = ("emb_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "context_length",
              "tie_weights")
# every option that shapes the model (refused with --resume and --init-from)
MODEL_KEYS = ("arch", "preset", *dict.fromkeys(GPT2_KEYS + LLAMA_KEYS))


def model_arch(opts) -> str:
    """The family the options ask for: --preset's own, else --arch, else GPT-2. A --preset
    and an --arch that disagree are refused."""
    if opts.preset:
        family = LLAMA_PRESETS[opts.preset]["model_type"] if opts.preset in LLAMA_PRESETS else "gpt2"
        if opts.arch and opts.arch != family:
            raise ValueError(f"--preset {opts.preset} is a {family} model, not --arch {opts.arch}")
        return family
    return opts.arch or "gpt2"


def train_config(opts, n_vocab: int):
    """The config of a fresh model: the family's preset or small default, then the shape flags
    given, with a row for each of the tokenizer's ``n_vocab`` tokens and ``opts.dtype``."""
    arch = model_arch(opts)
    if arch == "gpt2":
        _refuse(opts, [k for k in LLAMA_KEYS if k not in GPT2_KEYS], "GPT-2 has no such field (--arch llama has)")
        base = preset_config(opts.preset).to_dict() if opts.preset else {**GPTConfig().to_dict(), **SMALL_MODEL}
        return GPTConfig(**_override(base, opts, GPT2_KEYS, n_vocab))
    _refuse(opts, ["qkv_bias"], f"a {arch} model has no biases", allowed=(False,))
    _refuse(opts, ["drop_rate"], f"a {arch} model has no dropout", allowed=(0.0,))
    if opts.init != "gpt2":
        raise ValueError(f"--init {opts.init}: a {arch} model starts from Hugging Face's initialisation "
                         "(N(0, 0.02), norm scales 1); leave --init at gpt2")
    if opts.preset:
        base = LlamaConfig.preset(opts.preset).to_dict()
    else:
        base = {**LlamaConfig().to_dict(), **FAMILY_DEFAULTS[arch], **SMALL_LLAMA, "model_type": arch,
                "head_dim": None, "rope_scaling": None}
        # the shape follows the width and heads given: SwiGLU 3C, half as many key/value heads
        base["hidden_dim"] = 3 * (opts.emb_dim or base["emb_dim"])
        n_heads = opts.n_heads or base["n_heads"]
        base["n_kv_heads"] = n_heads // 2 if n_heads % 2 == 0 else n_heads
    if opts.emb_dim is not None or opts.n_heads is not None:
        base["head_dim"] = None  # follows the new width unless given
    return LlamaConfig(**_override(base, opts, LLAMA_KEYS, n_vocab))


def _override(base: dict, opts, keys, n_vocab: int) -> dict:
    for key in keys:
        if getattr(opts, key) is not None:
            base[key] = getattr(opts, key)
    return {**base, "vocab_size": n_vocab, "dtype": opts.dtype}


def _refuse(opts, keys, why: str, allowed=()) -> None:
    for key in keys:
        value = getattr(opts, key)
        if value is not None and value not in allowed:
            raise ValueError(f"--{key.replace('_', '-')}: {why}")


def describe_config(cfg) -> str:
    """One line: the family, its shape, the vocabulary and dtype."""
    head = f"{'tied' if cfg.tie_weights else 'untied'} head, {cfg.dtype}"
    if isinstance(cfg, LlamaConfig):
        return (f"{cfg.model_type}: emb_dim {cfg.emb_dim}, {cfg.n_layers} layers, {cfg.n_heads} heads "
                f"({cfg.n_kv_heads} key/value) of {cfg.head_dim}, SwiGLU {cfg.hidden_dim}, context "
                f"{cfg.context_length}, vocab {cfg.vocab_size}, rope_theta {cfg.rope_theta:g}, {head}")
    return (f"emb_dim {cfg.emb_dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, context {cfg.context_length}, "
            f"vocab {cfg.vocab_size}, drop_rate {cfg.drop_rate}, qkv_bias {cfg.qkv_bias}, {head}")
