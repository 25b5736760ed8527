"""Multi-head attention, all heads in one batched matmul: causal or masked self-attention
(``MultiHeadAttention``) and cross-attention (``CrossAttention``), sharing one core."""

from __future__ import annotations

import math

from .module import Module
from .linear import Linear
from .activation import Softmax
from .dropout import Dropout
from .. import backend


class KVCache:
    """Keys and values of the tokens seen so far, for one attention layer.

    k, v: (B, NH, capacity, hs), allocated by the first ``append`` (which knows B, NH,
    hs, the dtype and the device) and filled up to ``length``. Generation with a cache
    feeds only the new tokens; their queries attend to every cached key. The capacity
    starts at what the first append needs (at least ``INITIAL_CAPACITY``) and doubles when
    full, up to ``max_length``: a model with a 131,072-token context does not reserve
    131,072 positions per layer for a short chat. A grouped-query layer appends its
    NKV key/value heads only, so that is all the cache holds.
    """

    INITIAL_CAPACITY = 256

    def __init__(self, max_length: int):
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"KVCache max_length must be a positive integer, got {max_length!r}")
        self.max_length = max_length
        self.k = None
        self.v = None
        self.length = 0

    def append(self, k, v):
        B, NH, T, hs = k.shape
        end = self.length + T
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; {end} were asked for")
        if self.k is None or end > self.k.shape[2]:
            self._grow(k, end)
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def _grow(self, k, end: int) -> None:
        """Room for at least ``end`` positions: double the capacity (or start it), keeping what is cached."""
        B, NH, _, hs = k.shape
        have = 0 if self.k is None else self.k.shape[2]
        capacity = min(self.max_length, max(end, 2 * have, self.INITIAL_CAPACITY))
        xp = backend.array_module(k)
        new_k = xp.empty((B, NH, capacity, hs), dtype=k.dtype)
        new_v = xp.empty((B, NH, capacity, hs), dtype=k.dtype)
        if self.k is not None:
            new_k[:, :, :self.length] = self.k[:, :, :self.length]
            new_v[:, :, :self.length] = self.v[:, :, :self.length]
        self.k, self.v = new_k, new_v


def causal_mask(T_q: int, T_k: int, xp, dtype):
    r"""(T_q, T_k) additive mask M: $M_{ij} = 0$ where query i may see key j, $-\infty$ where j is in its future.

    Queries are the last T_q of T_k positions, so query i sits at position T_k - T_q + i.
    """
    offset = T_k - T_q
    future = xp.arange(T_k)[None, :] > (xp.arange(T_q)[:, None] + offset)
    return xp.where(future, -xp.inf, 0.0).astype(dtype)


def attention_mask(T_q: int, T_k: int, causal: bool, key_padding_mask, xp, dtype):
    """The additive mask the scores get, broadcastable to (B, NH, T_q, T_k), or None.

    ``causal`` hides each query's future keys (``causal_mask``); ``key_padding_mask``
    (B, T_k), True at padding, hides those keys from every query. Every query must keep at
    least one key (a padded row of the source still has its real tokens to look at).
    """
    mask = causal_mask(T_q, T_k, xp, dtype) if causal else None  # (T_q, T_k)
    if key_padding_mask is None:
        return mask
    if key_padding_mask.ndim != 2 or key_padding_mask.shape[1] != T_k:
        raise ValueError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}; the keys are {T_k} long")
    pad = xp.where(key_padding_mask[:, None, None, :], -xp.inf, 0.0).astype(dtype)  # (B, 1, 1, T_k)
    return pad if mask is None else pad + mask


class AttentionCore(Module):
    r"""What every multi-head attention shares: the scaled dot product, the softmax, the
    attention dropout and the output projection ``c_proj``, on queries, keys and values
    already split into NH heads of size hs. Self-attention (``MultiHeadAttention``) and
    cross-attention (``CrossAttention``) differ only in where q, k and v come from.

    Forward (per batch and head; M the additive mask, 0 or $-\infty$):

    $$
    \begin{aligned}
    A &= \operatorname{softmax}\big(q k^\top / \sqrt{hs} + M\big) && (T_q, T_k) \\
    y &= \operatorname{dropout}(A)\, v && (T_q, hs) \\
    \text{out} &= \operatorname{concat}_{\text{heads}}(y)\, W_{\text{proj}} + b_{\text{proj}} && (T_q, C)
    \end{aligned}
    $$

    Backward, reading it in reverse ($A' = \operatorname{dropout}(A)$, S the scaled scores):

    $$
    \begin{aligned}
    dA' &= dy\, v^\top, \qquad dv = A'^\top dy, \qquad dA = \text{dropout.backward}(dA') \\
    dS &= \text{softmax.backward}(dA) / \sqrt{hs} \qquad \text{(masked entries get 0)} \\
    dq &= dS\, k, \qquad dk = dS^\top q
    \end{aligned}
    $$

    M is a constant, so it has no gradient, and a masked key gets none.
    """

    def _init_core(self, d_out: int, num_heads: int, dropout: float, dtype, seed) -> None:
        if d_out % num_heads != 0:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.softmax = Softmax(axis=-1)
        self.attn_dropout = Dropout(dropout)
        self.c_proj = Linear(d_out, d_out, bias=True, dtype=dtype, seed=seed)

    def _split_heads(self, x, n: int):
        """(B, T, n C) -> (n, B, NH, T, hs): n projections' outputs as heads."""
        B, T, _ = x.shape
        return x.reshape(B, T, n, self.num_heads, self.head_dim).transpose(2, 0, 3, 1, 4)

    @staticmethod
    def _merge_heads(d_heads):
        """(n, B, NH, T, hs) -> (B, T, n C): undoes _split_heads (for the gradients)."""
        n, B, NH, T, hs = d_heads.shape
        return d_heads.transpose(1, 3, 0, 2, 4).reshape(B, T, n * NH * hs)

    def _attend(self, q, k, v, mask):
        """q (B, NH, T_q, hs), k and v (B, NH, T_k, hs), mask additive or None -> (B, T_q, C)."""
        B, NH, T, hs = q.shape
        scores = q @ k.transpose(0, 1, 3, 2)  # (B, NH, T_q, T_k)
        scores *= 1.0 / math.sqrt(hs)
        if mask is not None:
            scores += mask
        att = self.softmax(scores)  # (B, NH, T_q, T_k)
        att_d = self.attn_dropout(att)
        y = att_d @ v  # (B, NH, T_q, hs)
        y = y.transpose(0, 2, 1, 3).reshape(B, T, NH * hs)  # (B, T_q, C)
        self._save(q=q, k=k, v=v, att_d=att_d)
        return self.c_proj(y)

    def _attend_backward(self, dout):
        """dout (B, T_q, C) -> dq, dk, dv shaped as q, k, v."""
        cache = self._take()
        q, k, v, att_d = cache["q"], cache["k"], cache["v"], cache["att_d"]
        B, NH, T, hs = q.shape
        # out = y @ W_proj + b
        dy = self.c_proj.backward(dout)  # (B, T_q, C)
        dy = dy.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)  # (B, NH, T_q, hs)
        # y = att_d @ v
        datt_d = dy @ v.transpose(0, 1, 3, 2)  # (B, NH, T_q, T_k)
        dv = att_d.transpose(0, 1, 3, 2) @ dy  # (B, NH, T_k, hs)
        # att_d = dropout(att); att = softmax(scores); scores = q k^T * scale + mask
        datt = self.attn_dropout.backward(datt_d)
        dscores = self.softmax.backward(datt)
        dscores *= 1.0 / math.sqrt(hs)
        dq = dscores @ k  # (B, NH, T_q, hs)
        dk = dscores.transpose(0, 1, 3, 2) @ q  # (B, NH, T_k, hs)
        return dq, dk, dv


class MultiHeadAttention(AttentionCore):
    r"""Self-attention with NH heads of size hs = C / NH: q, k and v all come from x, through
    one (C, 3C) projection ``c_attn`` as in GPT-2,

    $$q, k, v = \operatorname{split}(x W_{\text{attn}} + b_{\text{attn}}) \qquad (T, hs) \text{ each, per head}$$

    then ``AttentionCore``'s attention. ``causal=True`` (GPT's decoder) hides each token's
    future, $M_{ij} = -\infty$ for $j > i$; an encoder passes ``causal=False``.
    ``key_padding_mask`` (B, T), True at padding, hides padded keys from every query.
    Backward: dq, dk, dv from the core, stacked back into c_attn's (B, T, 3C) output and
    through c_attn.
    """

    def __init__(self, d_in: int, d_out: int, num_heads: int, dropout: float = 0.0,
                 qkv_bias: bool = False, dtype="float32", seed: int | None = None, causal: bool = True):
        rng = backend.host_rng(seed)  # one seed, two independent draws
        self.c_attn = Linear(d_in, 3 * d_out, bias=qkv_bias, dtype=dtype, seed=rng.integers(2**31))
        self._init_core(d_out, num_heads, dropout, dtype, rng.integers(2**31))
        self.causal = causal

    def forward(self, x, kv_cache: KVCache | None = None, key_padding_mask=None):
        T = x.shape[1]
        xp = backend.array_module(x)
        q, k, v = self._split_heads(self.c_attn(x), 3)  # (B, NH, T, hs) each
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # (B, NH, T_k, hs), T_k = cached + T
        mask = attention_mask(T, k.shape[2], self.causal, key_padding_mask, xp, q.dtype)
        return self._attend(q, k, v, mask)  # (B, T, C)

    def backward(self, dout):
        xp = backend.array_module(dout)
        dq, dk, dv = self._attend_backward(dout)  # (B, NH, T, hs) each
        # q, k, v were slices of c_attn's output, reshaped to heads
        dqkv = self._merge_heads(xp.stack((dq, dk, dv)))  # (B, T, 3C)
        return self.c_attn.backward(dqkv)


class CrossAttention(AttentionCore):
    r"""Attention of one sequence (queries, from x) over another (keys and values, from
    ``memory``, the encoder's output), with no causal mask:

    $$q = x W_q + b_q \quad (T, C), \qquad k, v = \operatorname{split}(\text{memory}\, W_{kv} + b_{kv}) \quad (S, C)$$

    (``c_q``, and ``c_kv`` of shape (C, 2C)), then ``AttentionCore``'s attention;
    ``key_padding_mask`` (B, S), True at padding, hides the source's padding. Backward
    returns two gradients:

    $$dx = dq\, W_q^\top, \qquad d\,\text{memory} = [dk, dv]\, W_{kv}^\top$$

    In an encoder-decoder every decoder layer attends to the same memory, so the encoder's
    output receives the sum of every layer's $d\,\text{memory}$.

    For generation, ``kv_cache`` (a ``KVCache`` of the source's length) keeps k and v: the
    first call computes them from memory, later calls reuse them (memory unused).
    """

    def __init__(self, d_in: int, d_memory: int, d_out: int, num_heads: int, dropout: float = 0.0,
                 qkv_bias: bool = False, dtype="float32", seed: int | None = None):
        rng = backend.host_rng(seed)
        self.c_q = Linear(d_in, d_out, bias=qkv_bias, dtype=dtype, seed=rng.integers(2**31))
        self.c_kv = Linear(d_memory, 2 * d_out, bias=qkv_bias, dtype=dtype, seed=rng.integers(2**31))
        self._init_core(d_out, num_heads, dropout, dtype, rng.integers(2**31))

    def forward(self, x, memory, key_padding_mask=None, kv_cache: KVCache | None = None):
        T = x.shape[1]
        xp = backend.array_module(x)
        q = self._split_heads(self.c_q(x), 1)[0]  # (B, NH, T, hs)
        if kv_cache is not None and kv_cache.length:
            S = kv_cache.length  # computed by an earlier call: the memory has not changed
            k, v = kv_cache.k[:, :, :S], kv_cache.v[:, :, :S]  # (B, NH, S, hs)
        else:
            k, v = self._split_heads(self.c_kv(memory), 2)  # (B, NH, S, hs) each
            if kv_cache is not None:
                kv_cache.append(k, v)
        mask = attention_mask(T, k.shape[2], False, key_padding_mask, xp, q.dtype)
        return self._attend(q, k, v, mask)  # (B, T, C)

    def backward(self, dout):
        """-> (dx, dmemory)."""
        xp = backend.array_module(dout)
        dq, dk, dv = self._attend_backward(dout)
        # q = heads(c_q(x))
        dx = self.c_q.backward(self._merge_heads(dq[None]))  # (B, T, C)
        # k, v = heads(c_kv(memory))
        dmemory = self.c_kv.backward(self._merge_heads(xp.stack((dk, dv))))  # (B, S, C)
        return dx, dmemory
