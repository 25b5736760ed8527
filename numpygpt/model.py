"""The GPT-2 model: FeedForward, TransformerBlock and GPTModel.

    idx (B, T) -> wte[idx] + wpe[0..T) -> dropout
               -> n_layers x [x + drop(attn(ln_1(x))); x + drop(mlp(ln_2(x)))]
               -> ln_f -> lm_head -> logits (B, T, V)

A classifier (``to_classifier``) reads one position per row before ln_f and has a
``score`` head instead: -> readout (B, C) -> ln_f -> score -> logits (B, K).

Attribute names mirror GPT-2's checkpoint (``wte``, ``h.0.attn.c_attn``, ``ln_f``...),
so loading real weights is a table of names.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

from . import backend, pretrained
from .config import TRAINABLE, GPTConfig
from .nn import (Dropout, Embedding, GELU, KVCache, LayerNorm, Linear, Module, OutputHead,
                 Parameter, SequenceReadout, is_grad_enabled, no_grad)
from .nn.blockwise_attention import make_attention
from .nn.linear import init_like_torch, uniform_fan_in
from .nn.module import skip_init


INIT_SCHEMES = ("gpt2", "pytorch")


def _put_host(p: Parameter, w) -> None:
    """Give ``p`` the host array ``w`` (drawn in float32), in p's dtype on p's device."""
    p.data = backend.to_device(w, dtype=p.dtype, device_name=backend.device_of(p.data))
    p.grad = None


def check_token_ids(idx, vocab_size: int, context_length: int, start_pos: int, device_name: str,
                    check_rows=None):
    """Token ids (B, T) of an integer dtype that fit the context after ``start_pos``,
    as an array on ``device_name`` (a list or a host array is moved there).

    The values are checked against [0, V) on the host, while the ids are still NumPy
    (the data loader's batches, a prompt): on the device that check would cost a
    device-to-host sync every micro-batch. Ids already on the GPU are trusted (CuPy
    would wrap an out-of-range id instead of raising): make them from checked ids.
    ``check_rows(idx)``, if given, checks the host ids further (a classifier's readout).
    """
    if not (hasattr(idx, "dtype") and hasattr(idx, "ndim")):
        idx = backend.to_host(idx)
    V, T_max = vocab_size, context_length
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
        if check_rows is not None:
            check_rows(idx)
    return backend.to_device(idx, device_name=device_name)


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
        self.attn = make_attention(cfg.attn_impl, C, C, cfg.n_heads, cfg.drop_rate, cfg.qkv_bias, dtype=cfg.dtype)
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


class OutputLayer:
    """What every decoder family (GPT-2, Llama 3, Qwen3) has about its output layer: a
    language-model head ``lm_head`` or, after ``to_classifier``, a class head ``score``."""

    @property
    def is_classifier(self) -> bool:
        return self.cfg.num_classes is not None

    @property
    def head(self) -> Module:
        """The output layer: ``score`` (classifier) or ``lm_head``."""
        return self.score if self.is_classifier else self.lm_head

    def head_lora_targets(self) -> list:
        """The head's ``lora_targets`` entry: a classifier's score, or an untied LM head (a
        tied one is the token embedding, which stays frozen)."""
        if self.is_classifier:
            return [(self, "score", 1)]
        return [] if self.cfg.tie_weights else [(self, "lm_head", 1)]


class GPTModel(OutputLayer, Module):
    """GPT-2. ``logits = model(idx)``; ``model.backward(dlogits)`` fills every ``.grad``.

    Fine-tuning: ``to_classifier`` swaps the head for a K-class one, ``set_trainable``
    chooses what trains, and ``numpygpt.apply_lora`` adds low-rank adapters. Layers below
    the lowest trainable one run without a cache and the backward stops above them.
    """

    def __init__(self, cfg: GPTConfig, seed: int | None = 0, init: bool | str = True):
        """Build the model with ``init_weights(seed)``; ``init`` may name the scheme
        ("gpt2", the default, or "pytorch"); ``init=False`` skips drawing random weights
        (all zeros, LayerNorm scale ones), for when a checkpoint's weights are loaded next.
        A config with ``num_classes`` builds a classifier, one with ``lora_rank`` adds LoRA
        adapters."""
        self.cfg = cfg.replace(lora_rank=None, lora_alpha=None)  # apply_lora below records them
        dt = cfg.dtype
        with skip_init():  # one seeded draw for the whole model, in init_weights
            self.wte = Embedding(cfg.vocab_size, cfg.emb_dim, dtype=dt)
            self.wpe = Embedding(cfg.context_length, cfg.emb_dim, dtype=dt)
            self.drop = Dropout(cfg.drop_rate)
            self.h = [TransformerBlock(cfg) for _ in range(cfg.n_layers)]
            self.ln_f = LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps, dtype=dt)
        if cfg.num_classes is not None:
            self.lm_head = None
            self.readout = SequenceReadout(cfg.readout, cfg.pad_id)
            with skip_init():
                self.score = Linear(cfg.emb_dim, cfg.num_classes, bias=True, dtype=dt)
        elif cfg.tie_weights:
            self.lm_head = OutputHead(self.wte.weight)
        else:
            self.lm_head = OutputHead(Parameter(backend.xp.zeros((cfg.vocab_size, cfg.emb_dim), dtype=dt)))
        if init:
            self.init_weights(seed, scheme="gpt2" if init is True else init)
        if cfg.lora_rank is not None:
            from .lora import apply_lora

            apply_lora(self, cfg.lora_rank, cfg.lora_alpha, seed=seed)

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
            if name.endswith((".lora_A", ".lora_B")):
                continue  # adapters keep their own initialisation (numpygpt.nn.lora)
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

        seen = set()  # a tied head is the token embedding: initialise it once, as an embedding
        for m in self.modules():
            if isinstance(m, Embedding) and id(m.weight) not in seen:
                seen.add(id(m.weight))
                _put_host(m.weight, rng.standard_normal(m.weight.shape, dtype="float32"))
            elif isinstance(m, Linear):
                init_like_torch(m, rng)
            elif isinstance(m, OutputHead) and id(m.weight) not in seen:
                seen.add(id(m.weight))
                uniform_fan_in(m.weight, m.weight.shape[1], rng)  # (V, C): logits = x @ W.T, fan_in C

    # -- forward and backward --------------------------------------------------------

    def check_input(self, idx, start_pos: int = 0):
        """Token ids (B, T) checked against this model's vocabulary and context, on its
        device (see ``check_token_ids``); a classifier's rows are checked for its readout
        there too, on the host."""
        return check_token_ids(idx, self.cfg.vocab_size, self.cfg.context_length, start_pos,
                               backend.device_of(self.wte.weight.data),
                               check_rows=self.readout.check_rows if self.is_classifier else None)

    def forward(self, idx, kv_caches: list | None = None):
        """idx (B, T) integer token ids -> logits (B, T, V), or (B, K) for a classifier.

        With ``kv_caches`` (one KVCache per block, see ``new_kv_caches``), idx holds only
        the new tokens; their positions continue after the cached ones.
        """
        if not self.is_classifier:
            return self.lm_head(self.forward_hidden(idx, kv_caches))  # (B, T, V)
        if kv_caches:
            raise ValueError("a classifier reads whole sequences: it takes no KV cache")
        idx = self.check_input(idx)  # (B, T) on the model's device
        x = self._forward_body(idx, None)  # (B, T, C)
        x = self.readout(x, idx)  # (B, C): ln_f acts per position, so read first
        x = self.ln_f(x)
        return self.score(x)  # (B, K)

    def forward_hidden(self, idx, kv_caches: list | None = None):
        """idx (B, T) -> the final hidden states h (B, T, C) that the head reads
        (logits = h @ W^T, W = ``head.weight``), for a loss that applies the head itself
        (``numpygpt.nn.FusedLinearCrossEntropy``). ``backward_hidden(dh)`` continues from them."""
        if self.is_classifier:
            raise ValueError("a classifier's head reads one position per row: it has no per-position hidden states")
        start = kv_caches[0].length if kv_caches else 0
        idx = self.check_input(idx, start)  # (B, T) on the model's device
        return self.ln_f(self._forward_body(idx, kv_caches))  # (B, T, C)

    def _forward_body(self, idx, kv_caches):
        """Embeddings and blocks: checked ids (B, T) -> the residual stream (B, T, C) before ln_f."""
        start = kv_caches[0].length if kv_caches else 0
        B, T = idx.shape
        xp = backend.array_module(self.wte.weight.data)
        # stage -1 is the embeddings, stage i block i; stages below grad_from train nothing
        grad_from = self._lowest_trainable_stage() if is_grad_enabled() else 0
        self._save(grad_from=grad_from)
        pos = xp.arange(start, start + T)[None, :]  # (1, T)
        with self._stage(-1, grad_from):
            x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.h):
            with self._stage(i, grad_from):
                x = block(x, kv_caches[i] if kv_caches else None)
        return x

    def backward(self, dlogits) -> None:
        """The forward pass read in reverse; adds into every parameter's .grad. It stops
        above the stages the forward ran without a cache (nothing below them trains)."""
        if not self.is_classifier:
            self.backward_hidden(self.lm_head.backward(dlogits))  # dh (B, T, C)
            return
        dx = self.score.backward(dlogits)  # (B, C)
        dx = self.ln_f.backward(dx)
        dx = self.readout.backward(dx)  # (B, T, C)
        self._backward_body(dx)

    def backward_hidden(self, dh) -> None:
        """Backward from dL/dh (B, T, C), h being ``forward_hidden``'s output: every
        parameter below the head gets its gradient (the head's own is the caller's)."""
        self._backward_body(self.ln_f.backward(dh))

    def _backward_body(self, dx) -> None:
        """The blocks and embeddings read in reverse, from the gradient of the stream before ln_f."""
        grad_from = self._take()["grad_from"]
        for block in reversed(self.h[max(grad_from, 0):]):
            dx = block.backward(dx)
        if grad_from >= 0:
            return  # frozen embeddings: no gradient to scatter
        dx = self.drop.backward(dx)
        # x = wte[idx] + wpe[pos]: both embeddings receive dx (wpe summed over the batch)
        self.wte.backward(dx)
        self.wpe.backward(dx.sum(axis=0, keepdims=True))

    def _lowest_trainable_stage(self) -> int:
        """-1 if an embedding trains (a tied head's weight is wte), else the lowest block
        with a trainable parameter, else n_layers (only ln_f and the head train)."""
        if any(p.requires_grad for p in self.wte.parameters() + self.wpe.parameters()):
            return -1
        for i, block in enumerate(self.h):
            if any(p.requires_grad for p in block.parameters()):
                return i
        return len(self.h)

    @staticmethod
    def _stage(i: int, grad_from: int):
        """no_grad() for a stage below the lowest trainable one: no cache, no backward."""
        return no_grad() if i < grad_from else nullcontext()

    def new_kv_caches(self) -> list:
        return [KVCache(self.cfg.context_length) for _ in self.h]

    def lora_targets(self) -> list:
        """(owner module, attribute, splits) of each layer ``apply_lora`` wraps, in model
        order: every block's c_attn (Q | K | V: 3 splits), attn.c_proj, mlp.c_fc, mlp.c_proj,
        and the head unless it is the (tied) token embedding."""
        targets = []
        for block in self.h:
            targets += [(block.attn, "c_attn", 3), (block.attn, "c_proj", 1), (block.mlp, "c_fc", 1),
                        (block.mlp, "c_proj", 1)]
        return targets + self.head_lora_targets()

    # -- fine-tuning -----------------------------------------------------------------

    def to_classifier(self, num_classes: int, readout: str = "last", pad_id: int = 50256,
                      seed: int | None = None) -> "GPTModel":
        """Replace the output head by ``score = Linear(emb_dim, num_classes)`` with bias, so
        ``model(idx)`` returns (B, num_classes) logits read at one position per row:
        ``readout="last"`` the last one, ``"last_non_pad"`` the last whose id is not
        ``pad_id`` (right padding). The head starts as the book's ``torch.nn.Linear(emb_dim,
        num_classes)`` does after ``torch.manual_seed(seed)``: weight and bias
        U(-1/sqrt(emb_dim), 1/sqrt(emb_dim)), drawn from ``seed`` on the host (the same
        distribution as PyTorch's, not PyTorch's random stream). The body's weights are
        untouched and a tied head just goes (wte stays). Returns the model. Apply LoRA
        after this, so the new head gets an adapter."""
        return attach_classifier_head(self, num_classes, readout, pad_id, seed)

    def set_trainable(self, which: str) -> "GPTModel":
        """Train only part of the model; everything else is frozen (no gradient).

        "all": every parameter; "head": the output head; "last-block": the last
        transformer block, the final LayerNorm and the head (the book's chapter 6);
        "last-two-blocks": the last two blocks, ln_f and the head. Components are whole
        modules (block 1 is never block 11). A LoRA layer in a chosen component trains
        its base weights too. Returns the model.
        """
        return train_only(self, which, self.ln_f, self.h)

    # -- Hugging Face GPT-2 format (numpygpt.pretrained does the work) -----------------

    @classmethod
    def from_pretrained(cls, path_or_name: str, dtype: str = "float32", **kwargs) -> "GPTModel":
        """Load GPT-2 weights in the Hugging Face layout (config.json + model.safetensors)
        from a local directory, or by name ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')."""
        return pretrained.load_pretrained(path_or_name, lambda cfg: cls(cfg, init=False), dtype=dtype, **kwargs)

    def save_pretrained(self, directory: str) -> None:
        """Write config.json + model.safetensors in the Hugging Face GPT-2 layout."""
        pretrained.save_pretrained(self, directory)

    def write_pretrained(self, directory: str, tensors) -> None:
        """The same layout holding ``tensors``, (name, array or LazyTensor) for every weight
        but the LoRA adapters (``numpygpt.lora.save_merged`` passes merged ones)."""
        pretrained.write_pretrained(self, directory, tensors)


# -- fine-tuning, for every family (LlamaModel calls these too) -------------------------------------

def attach_classifier_head(model, num_classes: int, readout: str, pad_id: int, seed: int | None):
    """``to_classifier``'s work on any model with ``cfg.emb_dim`` and an ``lm_head``: the
    config records the classes, ``score`` = Linear(emb_dim, K) with bias drawn as
    torch.nn.Linear draws it (U(+-1/sqrt(emb_dim)) from ``seed``), the language-model head
    goes and ``readout`` reads one position per row. Returns the model."""
    from .nn import LowRankAdapter

    if any(isinstance(m, LowRankAdapter) for m in model.modules()):
        raise ValueError("this model has LoRA adapters: call to_classifier before apply_lora")
    cfg = model.cfg.replace(num_classes=num_classes, readout=readout, pad_id=pad_id)  # validates them
    with backend.device(model.device), skip_init():
        score = Linear(cfg.emb_dim, cfg.num_classes, bias=True, dtype=cfg.dtype)
    init_like_torch(score, backend.host_rng(seed))
    score.training = model.training
    model.cfg, model.lm_head, model.score = cfg, None, score
    model.readout = SequenceReadout(cfg.readout, cfg.pad_id)
    return model


def train_only(model, which: str, final_norm: Module, blocks: list):
    """``set_trainable``'s work: "all", "head" (``model.head``), "last-block" /
    "last-two-blocks" (those of ``blocks``, ``final_norm`` and the head) trainable,
    everything else frozen. Returns the model."""
    if which not in TRAINABLE:
        raise ValueError(f"set_trainable: unknown choice {which!r}; choose from {', '.join(TRAINABLE)}")
    n_blocks = {"all": 0, "head": 0, "last-block": 1, "last-two-blocks": 2}[which]
    parts = [model] if which == "all" else [model.head]
    if n_blocks:
        parts += [final_norm] + blocks[-n_blocks:]
    for p in model.parameters():
        p.requires_grad, p.grad = False, None
    for part in parts:
        for p in part.parameters():
            p.requires_grad = True
    return model
