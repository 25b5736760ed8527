"""The original Transformer (Vaswani et al. 2017): an encoder, a decoder, cross-attention.

    src (B, S) -> src_emb * sqrt(C) + PE -> dropout -> n_enc_layers x EncoderBlock -> ln_enc
               = memory (B, S, C)
    tgt (B, T) -> tgt_emb * sqrt(C) + PE -> dropout
               -> n_dec_layers x DecoderBlock(x, memory) -> ln_dec -> lm_head -> logits (B, T, V)

The encoder's self-attention sees every source token except padding (``pad_id``); the
decoder's self-attention is causal and its cross-attention reads the memory, hiding the
source's padding. Blocks are pre-LayerNorm by default (``norm_first``); the paper's
post-LayerNorm puts the norm after each residual sum instead, and then the final norms
``ln_enc`` and ``ln_dec`` are not there. Sizes, names and the feed-forward (GELU, 4C) follow
GPT-2's ``TransformerBlock``, so the pieces are the same ops.
"""

from __future__ import annotations

import math

from . import backend
from .config import EncDecConfig
from .model import FeedForward, check_token_ids
from .nn import (CrossAttention, Dropout, Embedding, KVCache, LayerNorm, Module, MultiHeadAttention, OutputHead,
                 Parameter, SinusoidalPositionalEncoding, eval_mode, no_grad)
from .nn.lora import LORA_SUFFIXES
from .nn.module import skip_init

__all__ = ["EncDecConfig", "EncoderBlock", "DecoderBlock", "EncoderDecoder"]


class _Sublayers(Module):
    """The residual wrapping both blocks use around each sublayer f (attention, feed-forward):
        pre-LN  (norm_first):  y = x + drop(f(ln(x)))
        post-LN (the paper's): y = ln(x + drop(f(x)))
    Backward: a residual passes dout through and adds f's input gradient; post-LN first
    goes back through ln."""

    def _init_norms(self, cfg: EncDecConfig, n: int):
        self.norm_first = cfg.norm_first
        return [LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps, dtype=cfg.dtype) for _ in range(n)]

    def _residual(self, x, ln, f, drop):
        if self.norm_first:
            return x + drop(f(ln(x)))
        return ln(x + drop(f(x)))

    def _residual_backward(self, dout, ln, f_backward, drop):
        if self.norm_first:
            # y = x + drop(f(ln(x)))
            return dout + ln.backward(f_backward(drop.backward(dout)))
        # y = ln(s),  s = x + drop(f(x))
        ds = ln.backward(dout)
        return ds + f_backward(drop.backward(ds))


class EncoderBlock(_Sublayers):
    """Self-attention over the whole source (no causal mask, padding hidden), then the
    feed-forward, each in a residual (``_Sublayers``)."""

    def __init__(self, cfg: EncDecConfig):
        C, p = cfg.emb_dim, cfg.drop_rate
        self.ln_1, self.ln_2 = self._init_norms(cfg, 2)
        self.attn = MultiHeadAttention(C, C, cfg.n_heads, p, qkv_bias=True, dtype=cfg.dtype, causal=False)
        self.drop_attn = Dropout(p)
        self.mlp = FeedForward(C, dtype=cfg.dtype)
        self.drop_mlp = Dropout(p)

    def forward(self, x, src_pad=None):
        x = self._residual(x, self.ln_1, lambda h: self.attn(h, key_padding_mask=src_pad), self.drop_attn)
        x = self._residual(x, self.ln_2, self.mlp, self.drop_mlp)
        return x

    def backward(self, dout):
        dx = self._residual_backward(dout, self.ln_2, self.mlp.backward, self.drop_mlp)
        dx = self._residual_backward(dx, self.ln_1, self.attn.backward, self.drop_attn)
        return dx


class DecoderBlock(_Sublayers):
    """Causal self-attention, cross-attention over the memory, feed-forward, each in a
    residual. Backward returns (dx, dmemory): the memory's gradient from this block's
    cross-attention."""

    def __init__(self, cfg: EncDecConfig):
        C, p = cfg.emb_dim, cfg.drop_rate
        self.ln_1, self.ln_2, self.ln_3 = self._init_norms(cfg, 3)
        self.attn = MultiHeadAttention(C, C, cfg.n_heads, p, qkv_bias=True, dtype=cfg.dtype, causal=True)
        self.drop_attn = Dropout(p)
        self.cross_attn = CrossAttention(C, C, C, cfg.n_heads, p, qkv_bias=True, dtype=cfg.dtype)
        self.drop_cross = Dropout(p)
        self.mlp = FeedForward(C, dtype=cfg.dtype)
        self.drop_mlp = Dropout(p)

    def forward(self, x, memory, src_pad=None, caches: tuple | None = None):
        """``caches``: (self-attention KVCache, cross-attention KVCache) for generation."""
        self_cache, cross_cache = caches if caches is not None else (None, None)
        x = self._residual(x, self.ln_1, lambda h: self.attn(h, self_cache), self.drop_attn)
        x = self._residual(x, self.ln_2, lambda h: self.cross_attn(h, memory, src_pad, cross_cache),
                           self.drop_cross)
        x = self._residual(x, self.ln_3, self.mlp, self.drop_mlp)
        return x

    def backward(self, dout):
        """-> (dx, dmemory)."""
        dx = self._residual_backward(dout, self.ln_3, self.mlp.backward, self.drop_mlp)
        dx, dmemory = self._cross_residual_backward(dx)
        dx = self._residual_backward(dx, self.ln_1, self.attn.backward, self.drop_attn)
        return dx, dmemory

    def _cross_residual_backward(self, dout):
        """``_residual_backward`` for the cross-attention, whose backward also returns the
        memory's gradient -> (dx, dmemory)."""
        if self.norm_first:
            # y = x + drop(cross_attn(ln_2(x), memory))
            dq, dmemory = self.cross_attn.backward(self.drop_cross.backward(dout))
            return dout + self.ln_2.backward(dq), dmemory
        # y = ln_2(s),  s = x + drop(cross_attn(x, memory))
        ds = self.ln_2.backward(dout)
        dq, dmemory = self.cross_attn.backward(self.drop_cross.backward(ds))
        return ds + dq, dmemory


class EncoderDecoder(Module):
    """``logits = model(src, tgt)``; ``model.backward(dlogits)`` fills every ``.grad``.

    ``encode`` and ``decode`` are the two halves (generation encodes once and decodes
    token by token with ``new_kv_caches``). The backward is the forward read in reverse:
    the decoder first, summing the memory's gradient over every decoder layer (each one's
    cross-attention read it), then the encoder from that sum.
    """

    def __init__(self, cfg: EncDecConfig, seed: int | None = 0, init: bool = True):
        """``init=False`` skips drawing random weights (zeros, LayerNorm scales one), for when a
        checkpoint's weights are loaded next. A config with ``lora_rank`` adds LoRA adapters."""
        self.cfg = cfg.replace(lora_rank=None, lora_alpha=None)  # apply_lora below records them
        C, V, dt = cfg.emb_dim, cfg.vocab_size, cfg.dtype
        self.emb_scale = math.sqrt(C)  # the paper multiplies the embeddings by sqrt(C)
        with skip_init():  # one seeded draw for the whole model, in init_weights
            self.src_emb = Embedding(V, C, dtype=dt)
            self.tgt_emb = Embedding(V, C, dtype=dt)
            if cfg.share_embeddings:
                self.tgt_emb.weight = self.src_emb.weight  # two lookups, one table
            self.src_pos = SinusoidalPositionalEncoding(C, cfg.context_length, dtype=dt)
            self.tgt_pos = SinusoidalPositionalEncoding(C, cfg.context_length, dtype=dt)
            self.src_drop, self.tgt_drop = Dropout(cfg.drop_rate), Dropout(cfg.drop_rate)
            self.encoder = [EncoderBlock(cfg) for _ in range(cfg.n_enc_layers)]
            self.decoder = [DecoderBlock(cfg) for _ in range(cfg.n_dec_layers)]
            final_norms = cfg.norm_first  # post-LN blocks end in a norm already
            self.ln_enc = LayerNorm(C, eps=cfg.layer_norm_eps, dtype=dt) if final_norms else None
            self.ln_dec = LayerNorm(C, eps=cfg.layer_norm_eps, dtype=dt) if final_norms else None
            if cfg.tie_weights:
                self.lm_head = OutputHead(self.tgt_emb.weight)
            else:
                self.lm_head = OutputHead(Parameter(backend.xp.zeros((V, C), dtype=dt)))
        if init:
            self.init_weights(seed)
        if cfg.lora_rank is not None:
            from .lora import apply_lora

            apply_lora(self, cfg.lora_rank, cfg.lora_alpha, seed=seed)

    def init_weights(self, seed: int | None = 0) -> None:
        """Embedding tables (and an untied head) ~ N(0, 1/C), so that sqrt(C) times an
        embedding has unit scale; every other matrix Glorot-normal, N(0, 2 / (fan_in + fan_out));
        biases 0 and LayerNorm scales 1 as built. Drawn on the host from one seeded generator."""
        rng = backend.host_rng(seed)
        C = self.cfg.emb_dim
        for name, p in self.named_parameters():
            if p.data.ndim != 2 or ".ln_" in name or name.startswith("ln_") or name.endswith(LORA_SUFFIXES):
                continue  # adapters keep their own initialisation (numpygpt.nn.lora)
            std = C ** -0.5 if name.endswith(("_emb.weight", "lm_head.weight")) else math.sqrt(2.0 / sum(p.shape))
            w = rng.standard_normal(p.shape, dtype="float32")
            w *= std
            p.data, p.grad = backend.to_device(w, dtype=p.dtype, device_name=backend.device_of(p.data)), None

    def _ids(self, idx, start: int = 0, check_rows=None):
        return check_token_ids(idx, self.cfg.vocab_size, self.cfg.context_length, start, self.device,
                               check_rows=check_rows)

    def _check_source_rows(self, src) -> None:
        """Refuse a source row of nothing but padding (its attention would have no key to
        look at); run on the host ids by ``check_token_ids``."""
        if bool((src == self.cfg.pad_id).all(axis=1).any()):
            raise ValueError(f"a source row is all padding (pad_id={self.cfg.pad_id}): give every row a token")

    def source_padding(self, src):
        """(B, S) bool, True where src holds ``pad_id``."""
        return src == self.cfg.pad_id

    # -- forward and backward --------------------------------------------------------

    def forward(self, src, tgt):
        """src (B, S), tgt (B, T) token ids -> logits (B, T, V) for the next target token."""
        memory, src_pad = self.encode(src)
        return self.decode(tgt, memory, src_pad)

    def encode(self, src):
        """src (B, S) -> (memory (B, S, C), source padding mask (B, S))."""
        src = self._ids(src, check_rows=self._check_source_rows)
        src_pad = self.source_padding(src)
        x = self.src_emb(src) * self.emb_scale  # (B, S, C)
        x = self.src_drop(self.src_pos(x))
        for block in self.encoder:
            x = block(x, src_pad)
        if self.ln_enc is not None:
            x = self.ln_enc(x)
        return x, src_pad

    def decode(self, tgt, memory, src_pad, kv_caches: list | None = None):
        """tgt (B, T) -> logits (B, T, V). With ``kv_caches`` (``new_kv_caches``) tgt holds only
        the new tokens; their positions follow the cached ones."""
        start = kv_caches[0][0].length if kv_caches else 0
        tgt = self._ids(tgt, start)
        x = self.tgt_emb(tgt) * self.emb_scale  # (B, T, C)
        x = self.tgt_drop(self.tgt_pos(x, start))
        for i, block in enumerate(self.decoder):
            x = block(x, memory, src_pad, kv_caches[i] if kv_caches else None)
        if self.ln_dec is not None:
            x = self.ln_dec(x)
        return self.lm_head(x)  # (B, T, V)

    def backward(self, dlogits) -> None:
        """The forward read in reverse: the decoder, then the encoder from the memory's gradient."""
        dmemory = self.decode_backward(dlogits)
        self.encode_backward(dmemory)

    def decode_backward(self, dlogits):
        """-> dmemory (B, S, C): the sum of every decoder layer's cross-attention gradient."""
        dx = self.lm_head.backward(dlogits)  # (B, T, C)
        if self.ln_dec is not None:
            dx = self.ln_dec.backward(dx)
        dmemory = 0.0
        for block in reversed(self.decoder):
            dx, dmemory_block = block.backward(dx)
            dmemory = dmemory + dmemory_block  # each layer's cross-attention read the same memory
        dx = self.tgt_pos.backward(self.tgt_drop.backward(dx))
        self.tgt_emb.backward(dx * self.emb_scale)  # x = tgt_emb[tgt] * sqrt(C)
        return dmemory

    def encode_backward(self, dmemory) -> None:
        dx = self.ln_enc.backward(dmemory) if self.ln_enc is not None else dmemory
        for block in reversed(self.encoder):
            dx = block.backward(dx)
        dx = self.src_pos.backward(self.src_drop.backward(dx))
        self.src_emb.backward(dx * self.emb_scale)  # x = src_emb[src] * sqrt(C)

    # -- fine-tuning -----------------------------------------------------------------

    def lora_targets(self) -> list:
        """(owner module, attribute, splits) of each layer ``apply_lora`` wraps, in model order
        (``config._adapted_layers``'): in both stacks self-attention's c_attn (Q | K | V: 3
        splits) and c_proj, in the decoder cross-attention's c_q, c_kv (K | V: 2 splits) and
        c_proj, and the feed-forward's c_fc and c_proj; then an untied head."""
        targets = []
        for block in self.encoder:
            targets += [(block.attn, "c_attn", 3), (block.attn, "c_proj", 1), (block.mlp, "c_fc", 1),
                        (block.mlp, "c_proj", 1)]
        for block in self.decoder:
            cross = block.cross_attn
            targets += [(block.attn, "c_attn", 3), (block.attn, "c_proj", 1), (cross, "c_q", 1), (cross, "c_kv", 2),
                        (cross, "c_proj", 1), (block.mlp, "c_fc", 1), (block.mlp, "c_proj", 1)]
        if not self.cfg.tie_weights:
            targets.append((self, "lm_head", 1))
        return targets

    @property
    def is_classifier(self) -> bool:
        return False

    @property
    def head(self) -> Module:
        return self.lm_head

    # -- generation ------------------------------------------------------------------

    def new_kv_caches(self, source_length: int) -> list:
        """One (self-attention, cross-attention) KVCache pair per decoder layer."""
        return [(KVCache(self.cfg.context_length), KVCache(source_length)) for _ in self.decoder]

    def greedy_decode(self, src, bos_id: int, eos_id: int, max_new_tokens: int, use_cache: bool = True):
        """The most likely target for each source row, one token at a time -> (B, <= max_new_tokens)
        host int ids; a row that has produced ``eos_id`` continues with ``pad_id``. The source
        is encoded once; with ``use_cache`` each step feeds only the new token, its decoder
        self-attention reads the cached keys and the cross-attention the memory's K/V computed
        at the first step."""
        xp = backend.array_module(self.src_emb.weight.data)
        with no_grad(), eval_mode(self):
            memory, src_pad = self.encode(src)
            B, S, _ = memory.shape
            out = xp.full((B, 1), bos_id, dtype=xp.int64)
            caches = self.new_kv_caches(S) if use_cache else None
            done = xp.zeros(B, dtype=bool)
            for _ in range(min(max_new_tokens, self.cfg.context_length)):
                step = out[:, -1:] if use_cache else out
                logits = self.decode(step, memory, src_pad, caches)[:, -1]  # (B, V)
                nxt = xp.where(done, self.cfg.pad_id, logits.argmax(axis=-1))  # (B,)
                out = xp.concatenate([out, nxt[:, None]], axis=1)
                done |= nxt == eos_id
                if bool(done.all()):
                    break
        return backend.to_host(out[:, 1:])
