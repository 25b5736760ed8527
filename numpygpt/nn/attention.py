"""Causal multi-head self-attention, all heads in one batched matmul."""

from __future__ import annotations

import math

from .module import Module
from .linear import Linear
from .activation import Softmax
from .dropout import Dropout
from .. import backend


class KVCache:
    """Keys and values of the tokens seen so far, for one attention layer.

    k, v: (B, NH, max_length, hs), allocated by the first ``append`` (which knows B, NH,
    hs, the dtype and the device) and filled up to ``length``. Generation with a cache
    feeds only the new tokens; their queries attend to every cached key.
    """

    def __init__(self, max_length: int):
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"KVCache max_length must be a positive integer, got {max_length!r}")
        self.max_length = max_length
        self.k = None
        self.v = None
        self.length = 0

    def append(self, k, v):
        B, NH, T, hs = k.shape
        if self.k is None:
            xp = backend.array_module(k)
            self.k = xp.empty((B, NH, self.max_length, hs), dtype=k.dtype)
            self.v = xp.empty((B, NH, self.max_length, hs), dtype=k.dtype)
        end = self.length + T
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; {end} were asked for")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


def causal_mask(T_q: int, T_k: int, xp, dtype):
    r"""(T_q, T_k) additive mask M: $M_{ij} = 0$ where query i may see key j, $-\infty$ where j is in its future.

    Queries are the last T_q of T_k positions, so query i sits at position T_k - T_q + i.
    """
    offset = T_k - T_q
    future = xp.arange(T_k)[None, :] > (xp.arange(T_q)[:, None] + offset)
    return xp.where(future, -xp.inf, 0.0).astype(dtype)


class MultiHeadAttention(Module):
    r"""Causal self-attention with NH heads of size hs = C / NH.

    Forward (per batch and head; M is the causal mask):

    $$
    \begin{aligned}
    q, k, v &= \operatorname{split}(x W_{\text{attn}} + b_{\text{attn}}) && (T, hs) \text{ each} \\
    A &= \operatorname{softmax}\big(q k^\top / \sqrt{hs} + M\big) && (T, T) \\
    y &= \operatorname{dropout}(A)\, v && (T, hs) \\
    \text{out} &= \operatorname{concat}_{\text{heads}}(y)\, W_{\text{proj}} + b_{\text{proj}} && (T, C)
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

    Q, K and V come from one (C, 3C) projection, ``c_attn``, as in GPT-2.
    """

    def __init__(self, d_in: int, d_out: int, num_heads: int, dropout: float = 0.0,
                 qkv_bias: bool = False, dtype="float32", seed: int | None = None):
        if d_out % num_heads != 0:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        rng = backend.host_rng(seed)  # one seed, two independent draws
        self.c_attn = Linear(d_in, 3 * d_out, bias=qkv_bias, dtype=dtype, seed=rng.integers(2**31))
        self.softmax = Softmax(axis=-1)
        self.attn_dropout = Dropout(dropout)
        self.c_proj = Linear(d_out, d_out, bias=True, dtype=dtype, seed=rng.integers(2**31))

    def forward(self, x, kv_cache: KVCache | None = None):
        B, T, _ = x.shape
        NH, hs = self.num_heads, self.head_dim
        xp = backend.array_module(x)
        qkv = self.c_attn(x)  # (B, T, 3C)
        qkv = qkv.reshape(B, T, 3, NH, hs).transpose(2, 0, 3, 1, 4)  # (3, B, NH, T, hs)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, NH, T, hs) each
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # (B, NH, T_k, hs), T_k = cached + T
        T_k = k.shape[2]
        scale = 1.0 / math.sqrt(hs)
        scores = q @ k.transpose(0, 1, 3, 2)  # (B, NH, T, T_k)
        scores *= scale
        scores += causal_mask(T, T_k, xp, scores.dtype)
        att = self.softmax(scores)  # (B, NH, T, T_k)
        att_d = self.attn_dropout(att)
        y = att_d @ v  # (B, NH, T, hs)
        y = y.transpose(0, 2, 1, 3).reshape(B, T, NH * hs)  # (B, T, C)
        self._save(q=q, k=k, v=v, att_d=att_d)
        return self.c_proj(y)

    def backward(self, dout):
        cache = self._take()
        q, k, v, att_d = cache["q"], cache["k"], cache["v"], cache["att_d"]
        B, NH, T, hs = q.shape
        xp = backend.array_module(dout)
        # out = y @ W_proj + b
        dy = self.c_proj.backward(dout)  # (B, T, C)
        dy = dy.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)  # (B, NH, T, hs)
        # y = att_d @ v
        datt_d = dy @ v.transpose(0, 1, 3, 2)  # (B, NH, T, T)
        dv = att_d.transpose(0, 1, 3, 2) @ dy  # (B, NH, T, hs)
        # att_d = dropout(att); att = softmax(scores); scores = q k^T * scale + mask
        datt = self.attn_dropout.backward(datt_d)
        dscores = self.softmax.backward(datt)
        dscores *= 1.0 / math.sqrt(hs)
        dq = dscores @ k  # (B, NH, T, hs)
        dk = dscores.transpose(0, 1, 3, 2) @ q  # (B, NH, T, hs)
        # q, k, v were slices of c_attn's output, reshaped to heads
        dqkv = xp.stack((dq, dk, dv))  # (3, B, NH, T, hs)
        dqkv = dqkv.transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * NH * hs)  # (B, T, 3C)
        return self.c_attn.backward(dqkv)
