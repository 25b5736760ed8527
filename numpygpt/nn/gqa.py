"""Grouped-query attention (Llama 3, Qwen3): NH query heads share NKV key/value heads."""

from __future__ import annotations

import math

from .module import Module
from .linear import Linear
from .activation import Softmax
from .attention import KVCache, causal_mask
from .normalization import RMSNorm
from .rope import RoPE
from .blockwise_attention import ATTN_IMPLS, blockwise_heads_backward, blockwise_heads_forward, takes_blockwise
from .. import backend


class GroupedQueryAttention(Module):
    r"""Causal attention with NH query heads and NKV <= NH key/value heads, NG = NH / NKV
    query heads per KV head; the head size hs need not be C / NH (Qwen3: 128 with C / NH = 64).

    Forward (no biases; names are Hugging Face's; qnorm, knorm are Qwen3's per-head RMSNorm):

    $$
    \begin{aligned}
    q &= \operatorname{rope}(\operatorname{qnorm}(x W_q)) && (B, NH, T, hs) \\
    k &= \operatorname{rope}(\operatorname{knorm}(x W_k)), \quad v = x W_v && (B, NKV, T, hs) \\
    y_h &= \operatorname{softmax}\big(q_h k_{\lfloor h / NG \rfloor}^\top / \sqrt{hs} + M\big)\, v_{\lfloor h / NG \rfloor}
    && (T, hs) \\
    \text{out} &= \operatorname{concat}_{\text{heads}}(y)\, W_o && (B, T, C)
    \end{aligned}
    $$

    The NG query heads of one KV head are stacked along the rows, q as (B, NKV, NG T, hs),
    so one batched matmul against the unrepeated k (B, NKV, T_k, hs) gives every score,
    (B, NKV, NG T, T_k), and K/V are never copied NG times.

    Backward, the attention part as in MultiHeadAttention on those stacked rows:

    $$dA = dy\, v^\top, \quad dv = A^\top dy, \quad dS = \text{softmax.backward}(dA) / \sqrt{hs},
    \quad dq = dS\, k, \quad dk = dS^\top q$$

    where $A^\top dy$ and $dS^\top q$ contract over the NG T stacked rows: a KV head's
    gradient is the sum of what its NG query heads send back, $dk_j = \sum_{h \in j} dS_h^\top q_h$,
    which is the derivative of sharing it (a value used NG times gets the sum of NG
    gradients). Then RoPE's backward (rotation by $-a$), the QK-norm's, and the three
    projections, whose input gradients add since x feeds all three.

    ``impl`` "blockwise" (or "auto" from 128 queries on NumPy) runs the tiled attention of
    ``blockwise_attention.py``; that kernel takes one KV head per query head, so there K/V
    are repeated (B, NH, T_k, hs) and dk, dv summed back over each group.
    A ``KVCache`` holds k and v after RoPE: NKV heads only.
    """

    def __init__(self, emb_dim: int, n_heads: int, n_kv_heads: int, head_dim: int, rope: RoPE,
                 qk_norm_eps: float | None = None, impl: str = "dense", dtype="float32",
                 block_q: int = 128, block_k: int = 128):
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        if impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {', '.join(ATTN_IMPLS)}, got {impl!r}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.impl, self.block_q, self.block_k = impl, block_q, block_k
        self.q_proj = Linear(emb_dim, n_heads * head_dim, bias=False, dtype=dtype)
        self.k_proj = Linear(emb_dim, n_kv_heads * head_dim, bias=False, dtype=dtype)
        self.v_proj = Linear(emb_dim, n_kv_heads * head_dim, bias=False, dtype=dtype)
        self.o_proj = Linear(n_heads * head_dim, emb_dim, bias=False, dtype=dtype)
        qk_norm = qk_norm_eps is not None
        self.q_norm = RMSNorm(head_dim, qk_norm_eps, dtype=dtype) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps, dtype=dtype) if qk_norm else None
        self.rope = rope  # shared by the model's layers: its cos/sin tables are computed once
        self.softmax = Softmax(axis=-1)

    def forward(self, x, kv_cache: KVCache | None = None):
        B, T, _ = x.shape
        NH, NKV, hs = self.n_heads, self.n_kv_heads, self.head_dim
        start = kv_cache.length if kv_cache is not None else 0
        q = self.rope.rotate(self._heads(self.q_proj, self.q_norm, x, NH), start)  # (B, NH, T, hs)
        k = self.rope.rotate(self._heads(self.k_proj, self.k_norm, x, NKV), start)  # (B, NKV, T, hs)
        v = self._heads(self.v_proj, None, x, NKV)  # (B, NKV, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # (B, NKV, T_k, hs), T_k = cached + T
        blockwise = takes_blockwise(self.impl, x)
        y, kept = (self._attend_blockwise if blockwise else self._attend_dense)(q, k, v)  # (B, NH, T, hs)
        self._save(start=start, blockwise=blockwise, **kept)
        y = y.transpose(0, 2, 1, 3).reshape(B, T, NH * hs)  # (B, T, NH hs)
        return self.o_proj(y)  # (B, T, C)

    def backward(self, dout):
        cache = self._take()
        start = cache["start"]
        xp = backend.array_module(dout)
        B, T, _ = dout.shape
        NH, hs = self.n_heads, self.head_dim
        # out = y W_o, y the heads side by side
        dy = self.o_proj.backward(dout)  # (B, T, NH hs)
        dy = xp.ascontiguousarray(dy.reshape(B, T, NH, hs).transpose(0, 2, 1, 3))  # (B, NH, T, hs)
        # y = attention(q, k, v)
        attend_backward = self._attend_blockwise_backward if cache["blockwise"] else self._attend_dense_backward
        dq, dk, dv = attend_backward(dy, cache)
        # k, v = cache.append(k, v): only the last T positions came from this forward
        dk, dv = dk[:, :, -T:], dv[:, :, -T:]
        # q = rope(q'), k = rope(k')
        dq = self.rope.rotate(dq, start, inverse=True)
        dk = self.rope.rotate(dk, start, inverse=True)
        # q', k', v = heads of x W_q, x W_k, x W_v (normed per head for Qwen3)
        dx = self._heads_backward(self.q_proj, self.q_norm, dq)
        dx += self._heads_backward(self.k_proj, self.k_norm, dk)
        dx += self._heads_backward(self.v_proj, None, dv)
        return dx

    # -- projections to heads and back ---------------------------------------------------

    def _heads(self, proj: Linear, norm: RMSNorm | None, x, n: int):
        """(B, T, C) -> proj -> (B, T, n, hs) -> norm per head -> (B, n, T, hs)."""
        B, T, _ = x.shape
        h = proj(x).reshape(B, T, n, self.head_dim)  # (B, T, n, hs)
        if norm is not None:
            h = norm(h)
        return h.transpose(0, 2, 1, 3)  # (B, n, T, hs)

    def _heads_backward(self, proj: Linear, norm: RMSNorm | None, dh):
        """_heads read backwards: (B, n, T, hs) -> dx (B, T, C)."""
        B, n, T, hs = dh.shape
        dh = dh.transpose(0, 2, 1, 3)  # (B, T, n, hs)
        if norm is not None:
            dh = norm.backward(dh)
        return proj.backward(dh.reshape(B, T, n * hs))

    # -- the attention itself: dense ------------------------------------------------------

    def _attend_dense(self, q, k, v):
        """q (B, NH, T, hs) contiguous, k, v (B, NKV, T_k, hs) -> y (B, NH, T, hs) and what backward keeps."""
        B, NH, T, hs = q.shape
        NKV, T_k = k.shape[1], k.shape[2]
        NG = NH // NKV
        xp = backend.array_module(q)
        q_rows = q.reshape(B, NKV, NG * T, hs)  # a KV head's NG query heads, stacked
        scores = q_rows @ k.transpose(0, 1, 3, 2)  # (B, NKV, NG T, T_k)
        scores *= 1.0 / math.sqrt(hs)
        scores_heads = scores.reshape(B, NKV, NG, T, T_k)  # a view: the mask is per head
        scores_heads += causal_mask(T, T_k, xp, scores.dtype)
        att = self.softmax(scores)  # (B, NKV, NG T, T_k)
        y = att @ v  # (B, NKV, NG T, hs)
        return y.reshape(B, NH, T, hs), dict(q=q_rows, k=k, v=v, att=att)

    def _attend_dense_backward(self, dy, cache):
        q_rows, k, v, att = cache["q"], cache["k"], cache["v"], cache["att"]
        B, NKV, GT, hs = q_rows.shape
        dy = dy.reshape(B, NKV, GT, hs)  # (B, NKV, NG T, hs)
        # y = att @ v
        datt = dy @ v.transpose(0, 1, 3, 2)  # (B, NKV, NG T, T_k)
        dv = att.transpose(0, 1, 3, 2) @ dy  # (B, NKV, T_k, hs): summed over the group
        # att = softmax(scores); scores = q k^T / sqrt(hs) + mask
        dscores = self.softmax.backward(datt)
        dscores *= 1.0 / math.sqrt(hs)
        dq = dscores @ k  # (B, NKV, NG T, hs)
        dk = dscores.transpose(0, 1, 3, 2) @ q_rows  # (B, NKV, T_k, hs): summed over the group
        return dq.reshape(B, self.n_heads, -1, hs), dk, dv

    # -- the attention itself: blockwise ---------------------------------------------------

    def _attend_blockwise(self, q, k, v):
        B, NH, T, hs = q.shape
        NKV, T_k = k.shape[1], k.shape[2]
        G = B * NH
        xp = backend.array_module(q)
        q_heads = (q * (1.0 / math.sqrt(hs))).reshape(G, T, hs)  # scaled once, not per tile
        # the tile kernel pairs query head g with key head g: repeat each KV head NG times
        k_heads = xp.repeat(k, NH // NKV, axis=1).reshape(G, T_k, hs)
        v_heads = xp.repeat(v, NH // NKV, axis=1).reshape(G, T_k, hs)
        out, lse = blockwise_heads_forward(q_heads, k_heads, v_heads, self.block_q, self.block_k)
        return out.reshape(B, NH, T, hs), dict(q=q_heads, k=k_heads, v=v_heads, out=out, lse=lse)

    def _attend_blockwise_backward(self, dy, cache):
        q, k, v = cache["q"], cache["k"], cache["v"]
        G, T, hs = q.shape
        T_k = k.shape[1]
        B, NH, NKV = G // self.n_heads, self.n_heads, self.n_kv_heads
        dq, dk, dv = blockwise_heads_backward(q, k, v, cache["out"], cache["lse"], dy.reshape(G, T, hs),
                                              self.block_q, self.block_k)
        dq *= 1.0 / math.sqrt(hs)  # q_heads = q * scale
        # k_heads = repeat(k): each KV head gets the sum over its NG copies
        dk = dk.reshape(B, NKV, NH // NKV, T_k, hs).sum(axis=2)  # (B, NKV, T_k, hs)
        dv = dv.reshape(B, NKV, NH // NKV, T_k, hs).sum(axis=2)
        return dq.reshape(B, NH, T, hs), dk, dv
