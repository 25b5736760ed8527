"""The GPT-2 model: FeedForward, TransformerBlock and GPTModel.

    idx (B, T) -> wte[idx] + wpe[0..T) -> dropout
               -> n_layers x [x + drop(attn(ln_1(x))); x + drop(mlp(ln_2(x)))]
               -> ln_f -> lm_head -> logits (B, T, V)

Attribute names mirror GPT-2's checkpoint (``wte``, ``h.0.attn.c_attn``, ``ln_f``...),
so loading real weights is a table of names.
"""

from __future__ import annotations

import math

from . import backend, pretrained
from .config import GPTConfig
from .nn import Dropout, Embedding, GELU, KVCache, LayerNorm, Linear, Module, MultiHeadAttention, Parameter
from .nn.module import skip_init


INIT_SCHEMES = ("gpt2", "pytorch")


def _put_host(p: Parameter, w) -> None:
    """Give ``p`` the host array ``w`` (drawn in float32), in p's dtype on p's device."""
    p.data = backend.to_device(w, dtype=p.dtype, device_name=backend.device_of(p.data))
    p.grad = None


class FeedForward(Module):
    """mlp(x) = c_proj(gelu(c_fc(x))), widening C -> 4C -> C."""

    def __init__(self, emb_dim: int, dtype="float32"):
        self.c_fc = Linear(emb_dim, 4 * emb_dim, dtype=dtype)
        self.gelu = GELU()
        self.c_proj = Linear(4 * emb_dim, emb_dim, dtype=dtype)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))

    def backward(self, dout):
        return self.c_fc.backward(self.gelu.backward(self.c_proj.backward(dout)))


class TransformerBlock(Module):
    """Pre-LayerNorm block with two residual branches:
        x = x + drop(attn(ln_1(x)))
        x = x + drop(mlp(ln_2(x)))
    A residual x + f(x) passes dout straight through and adds f's input gradient.
    """

    def __init__(self, cfg: GPTConfig):
        C = cfg.emb_dim
        self.ln_1 = LayerNorm(C, eps=cfg.layer_norm_eps, dtype=cfg.dtype)
        self.attn = MultiHeadAttention(C, C, cfg.n_heads, cfg.drop_rate, cfg.qkv_bias, dtype=cfg.dtype)
        self.drop_attn = Dropout(cfg.drop_rate)
        self.ln_2 = LayerNorm(C, eps=cfg.layer_norm_eps, dtype=cfg.dtype)
        self.mlp = FeedForward(C, dtype=cfg.dtype)
        self.drop_mlp = Dropout(cfg.drop_rate)

    def forward(self, x, kv_cache: KVCache | None = None):
        x = x + self.drop_attn(self.attn(self.ln_1(x), kv_cache))
        x = x + self.drop_mlp(self.mlp(self.ln_2(x)))
        return x

    def backward(self, dout):
        # x2 = x1 + drop_mlp(mlp(ln_2(x1)))
        dx = dout + self.ln_2.backward(self.mlp.backward(self.drop_mlp.backward(dout)))
        # x1 = x + drop_attn(attn(ln_1(x)))
        dx = dx + self.ln_1.backward(self.attn.backward(self.drop_attn.backward(dx)))
        return dx


class OutputHead(Module):
    """logits = x @ W.T with W (V, C): the token embedding itself when weights are tied.

    Backward: dx = dlogits @ W,  dW = dlogits^T @ x.
    """

    def __init__(self, weight: Parameter):
        self.weight = weight

    def forward(self, x):
        B, T, C = x.shape
        x2 = x.reshape(B * T, C)
        self._save(x2=x2, BT=(B, T))
        return (x2 @ self.weight.data.T).reshape(B, T, -1)  # (B, T, V)

    def backward(self, dout):
        cache = self._take()
        x2, (B, T), V = cache["x2"], cache["BT"], self.weight.shape[0]
        if tuple(dout.shape) != (B, T, V):
            raise ValueError(f"dlogits has shape {tuple(dout.shape)}; the forward pass made logits {(B, T, V)}")
        d2 = dout.reshape(B * T, V)
        if self.weight.requires_grad:
            self.weight.add_grad(d2.T @ x2)  # (V, C)
        return (d2 @ self.weight.data).reshape(B, T, -1)  # (B, T, C)


class GPTModel(Module):
    """GPT-2. ``logits = model(idx)``; ``model.backward(dlogits)`` fills every ``.grad``."""

    def __init__(self, cfg: GPTConfig, seed: int | None = 0, init: bool | str = True):
        """Build the model with ``init_weights(seed)``; ``init`` may name the scheme
        ("gpt2", the default, or "pytorch"); ``init=False`` skips drawing random weights
        (all zeros, LayerNorm scale ones), for when a checkpoint's weights are loaded next."""
        self.cfg = cfg
        dt = cfg.dtype
        with skip_init():  # one seeded draw for the whole model, in init_weights
            self.wte = Embedding(cfg.vocab_size, cfg.emb_dim, dtype=dt)
            self.wpe = Embedding(cfg.context_length, cfg.emb_dim, dtype=dt)
            self.drop = Dropout(cfg.drop_rate)
            self.h = [TransformerBlock(cfg) for _ in range(cfg.n_layers)]
            self.ln_f = LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps, dtype=dt)
        if cfg.tie_weights:
            self.lm_head = OutputHead(self.wte.weight)
        else:
            self.lm_head = OutputHead(Parameter(backend.xp.zeros((cfg.vocab_size, cfg.emb_dim), dtype=dt)))
        if init:
            self.init_weights(seed, scheme="gpt2" if init is True else init)

    # -- initialisation --------------------------------------------------------------

    def init_weights(self, seed: int | None = 0, scheme: str = "gpt2") -> None:
        """Draw fresh weights. Every scheme sets biases to 0 and LayerNorm to scale 1, shift 0.

        ``"gpt2"``: GPT-2's initialisation: weights ~ N(0, 0.02), residual projections
        (attn.c_proj, mlp.c_proj) scaled by 1/sqrt(2 n_layers).

        ``"pytorch"``: how the book's PyTorch GPTModel starts out: PyTorch's default
        ``nn.Embedding`` (N(0, 1)) and ``nn.Linear`` (weight and bias U(+-1/sqrt(fan_in)))
        initialisations. GPT-2's N(0, 0.02) makes the token and position embeddings 50
        times smaller, so the residual stream starts out dominated by the blocks; with the
        book's short constant-lr chapter-5 run that model stalls near loss 6 (PyTorch
        itself does the same from the same weights), while from these weights it
        memorises the story as the book shows.

        Drawn on the host from one seeded generator in float32 and then moved, so one
        seed gives the same weights on NumPy and CuPy, and in float32 and float64.
        """
        if scheme not in INIT_SCHEMES:
            raise ValueError(f"unknown initialisation scheme {scheme!r}: choose from {', '.join(INIT_SCHEMES)}")
        rng = backend.host_rng(seed)
        xp = backend.array_module(self.wte.weight.data)
        resid_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
                p.data, p.grad = xp.ones(p.shape, dtype=p.dtype), None
            elif name.endswith(".bias"):
                p.data, p.grad = xp.zeros(p.shape, dtype=p.dtype), None
            elif scheme == "gpt2":
                w = rng.standard_normal(p.shape, dtype="float32")
                w *= resid_std if name.endswith("c_proj.weight") else 0.02
                _put_host(p, w)
        if scheme == "gpt2":
            return

        def uniform(p, fan_in):
            bound = 1.0 / math.sqrt(fan_in)
            _put_host(p, rng.uniform(-bound, bound, p.shape).astype("float32"))

        seen = set()  # a tied head is the token embedding: initialise it once, as an embedding
        for m in self.modules():
            if isinstance(m, Embedding) and id(m.weight) not in seen:
                seen.add(id(m.weight))
                _put_host(m.weight, rng.standard_normal(m.weight.shape, dtype="float32"))
            elif isinstance(m, Linear):
                fan_in = m.weight.shape[0]  # weights are stored (in, out)
                uniform(m.weight, fan_in)
                if m.bias is not None:
                    uniform(m.bias, fan_in)
            elif isinstance(m, OutputHead) and id(m.weight) not in seen:
                seen.add(id(m.weight))
                uniform(m.weight, m.weight.shape[1])  # (V, C): logits = x @ W.T, fan_in C

    # -- forward and backward --------------------------------------------------------

    def check_input(self, idx, start_pos: int = 0):
        """Token ids (B, T) of an integer dtype that fit the context after ``start_pos``,
        as an array on the model's device (a list or a host array is moved there).

        The values are checked against [0, V) on the host, while the ids are still NumPy
        (the data loader's batches, a prompt): on the device that check would cost a
        device-to-host sync every micro-batch. Ids already on the GPU are trusted (CuPy
        would wrap an out-of-range id instead of raising): make them from checked ids.
        """
        if not (hasattr(idx, "dtype") and hasattr(idx, "ndim")):
            idx = backend.to_host(idx)
        V, T_max = self.cfg.vocab_size, self.cfg.context_length
        if idx.dtype.kind not in "iu":  # bool and float ids are refused, not truncated
            raise ValueError(f"token ids must be integers, got dtype {idx.dtype}")
        if idx.ndim != 2:
            raise ValueError(f"token ids must have shape (B, T), got {tuple(idx.shape)}")
        B, T = idx.shape
        if B == 0 or T == 0:
            raise ValueError(f"token ids are empty (shape {tuple(idx.shape)}): B and T must be at least 1")
        if start_pos + T > T_max:
            raise ValueError(f"sequence length {start_pos + T} exceeds context_length {T_max}")
        if not backend.is_cupy_array(idx):
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= V:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} is out of range: ids must be in [0, {V}) (vocab_size={V})")
        return backend.to_device(idx, device_name=backend.device_of(self.wte.weight.data))

    def forward(self, idx, kv_caches: list | None = None):
        """idx (B, T) integer token ids (NumPy, CuPy or a list) -> logits (B, T, V).

        With ``kv_caches`` (one KVCache per block, see ``new_kv_caches``), idx holds only
        the new tokens; their positions continue after the cached ones.
        """
        start = kv_caches[0].length if kv_caches else 0
        idx = self.check_input(idx, start)  # (B, T) on the model's device
        B, T = idx.shape
        xp = backend.array_module(self.wte.weight.data)
        pos = xp.arange(start, start + T)[None, :]  # (1, T)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.h):
            x = block(x, kv_caches[i] if kv_caches else None)
        x = self.ln_f(x)
        return self.lm_head(x)  # (B, T, V)

    def backward(self, dlogits) -> None:
        """The forward pass read in reverse; adds into every parameter's .grad."""
        dx = self.lm_head.backward(dlogits)  # (B, T, C)
        dx = self.ln_f.backward(dx)
        for block in reversed(self.h):
            dx = block.backward(dx)
        dx = self.drop.backward(dx)
        # x = wte[idx] + wpe[pos]: both embeddings receive dx (wpe summed over the batch)
        self.wte.backward(dx)
        self.wpe.backward(dx.sum(axis=0, keepdims=True))

    def new_kv_caches(self) -> list:
        return [KVCache(self.cfg.context_length) for _ in self.h]

    # -- conveniences ----------------------------------------------------------------

    def freeze(self, *prefixes: str) -> None:
        """Stop gradients for parameters whose name starts with any prefix (all if none given)."""
        for name, p in self.named_parameters():
            if not prefixes or name.startswith(prefixes):
                p.requires_grad = False
                p.grad = None

    def unfreeze(self, *prefixes: str) -> None:
        for name, p in self.named_parameters():
            if not prefixes or name.startswith(prefixes):
                p.requires_grad = True

    # -- Hugging Face GPT-2 format (numpygpt.pretrained does the work) -----------------

    @classmethod
    def from_pretrained(cls, path_or_name: str, dtype: str = "float32", **kwargs) -> "GPTModel":
        """Load GPT-2 weights in the Hugging Face layout (config.json + model.safetensors)
        from a local directory, or by name ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')."""
        return pretrained.load_pretrained(path_or_name, lambda cfg: cls(cfg, init=False), dtype=dtype, **kwargs)

    def save_pretrained(self, directory: str) -> None:
        """Write config.json + model.safetensors in the Hugging Face GPT-2 layout."""
        pretrained.save_pretrained(self, directory)
