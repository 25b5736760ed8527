"""Causal attention computed tile by tile (the FlashAttention-2 scheme, in NumPy).

The plain ``MultiHeadAttention`` builds every head's (T, T) score matrix, computes the
half above the diagonal only to mask it, and keeps the (T, T) probabilities for its
backward: at T = 1024 that is 4 MiB a head, 48 MiB a layer at batch 1. Here the queries
are cut into tiles of ``block_q`` rows and the keys into tiles of ``block_k``; a tile
pair entirely above the diagonal is never computed, and nothing of size (T, T) is kept.
"""

from __future__ import annotations

import math

from .attention import KVCache, MultiHeadAttention
from .. import backend, parallel

ATTN_IMPLS = ("auto", "dense", "blockwise")

# "auto" switches from the dense attention to the blockwise one at this many queries:
# the break-even of benchmarks/bench_blockwise.py (one GPT-2 small attention layer,
# forward + backward), see benchmarks/RESULTS.md, "GPT-2's full context".
AUTO_MIN_T = 128


def _tile_mask(q_start: int, q_stop: int, k_start: int, k_stop: int, xp, dtype):
    """Additive causal mask of one transposed tile (keys down, queries across): 0 where
    query position i may see key j (j <= i), -inf where j is in i's future. Positions
    are absolute (queries already offset)."""
    k_pos = xp.arange(k_start, k_stop)[:, None]
    q_pos = xp.arange(q_start, q_stop)[None, :]
    return xp.where(k_pos > q_pos, -xp.inf, 0.0).astype(dtype)  # (bk, bq)


def _key_tiles(q_start: int, q_stop: int, block_k: int):
    """The key tiles [k_start, k_stop) that queries at positions [q_start, q_stop) can see:
    keys 0 .. q_stop - 1, so every tile entirely in the queries' future is skipped. Yields
    (k_start, k_stop, needs_mask): a tile that reaches past q_start has future keys for
    some of its queries."""
    for k_start in range(0, q_stop, block_k):
        k_stop = min(k_start + block_k, q_stop)
        yield k_start, k_stop, k_stop - 1 > q_start


# Tiles are held transposed, S^T (G, bk, bq) with keys down and queries across: the
# softmax's max and sum over keys then reduce across rows, which NumPy does ~3x faster
# than along 128-element rows (measured 47 against 152 us for a (12, 128, 128) max).

def blockwise_attention_forward(q, k, v, offset: int, block_q: int, block_k: int, out, lse) -> None:
    r"""Causal attention of a group of heads, tile by tile, with an online softmax.

    q: (G, Tq, hs) queries already multiplied by 1/sqrt(hs), at positions offset + i;
    k, v: (G, Tk, hs) with Tk = offset + Tq. Writes out (G, Tq, hs), the attention output,
    and lse (G, Tq), each query's log-sum-exp of its scores, which the backward needs.

    For one tile of queries, running over its key tiles j = 0, 1, ... with

    $$
    \begin{aligned}
    S_j &= q k_j^\top \ (+ \text{causal mask}), & m' &= \max(m, \operatorname{rowmax} S_j), \\
    P_j &= \exp(S_j - m'), & l' &= e^{m - m'}\, l + \operatorname{rowsum} P_j, \\
    \text{acc}' &= e^{m - m'}\, \text{acc} + P_j v_j
    \end{aligned}
    $$

    keeps $\text{acc} = \sum_j \exp(S_j - m)\, v_j$ and $l = \sum_j \operatorname{rowsum} \exp(S_j - m)$
    for the running max m: rescaling by $e^{m - m'}$ moves both to a new max without changing
    their ratio. After the last tile, $\text{out} = \text{acc} / l = \operatorname{softmax}(S)\, v$
    and $\text{lse} = m + \log l$.
    (In the code $S_j$ is held transposed, so "rowmax" is a max over axis 1.)
    """
    xp = backend.array_module(q)
    G, Tq, hs = q.shape
    for q_start in range(0, Tq, block_q):
        q_stop = min(q_start + block_q, Tq)
        qi_t = q[:, q_start:q_stop].transpose(0, 2, 1)  # (G, hs, bq)
        m = xp.full((G, 1, q_stop - q_start), -xp.inf, dtype=q.dtype)  # running max per query
        l = xp.zeros((G, 1, q_stop - q_start), dtype=q.dtype)  # running sum per query
        acc = xp.zeros((G, q_stop - q_start, hs), dtype=q.dtype)
        for k_start, k_stop, needs_mask in _key_tiles(offset + q_start, offset + q_stop, block_k):
            st = k[:, k_start:k_stop] @ qi_t  # (G, bk, bq) = S_j^T
            if needs_mask:
                st += _tile_mask(offset + q_start, offset + q_stop, k_start, k_stop, xp, st.dtype)
            # the first tile holds key 0, which every query sees: m is finite from then on
            m_new = xp.maximum(m, st.max(axis=1, keepdims=True))  # (G, 1, bq)
            st -= m_new
            pt = xp.exp(st, out=st)  # (G, bk, bq) = P_j^T
            rescale = xp.exp(m - m_new)  # (G, 1, bq): 0 on the first tile
            l *= rescale
            l += pt.sum(axis=1, keepdims=True)
            acc *= rescale.transpose(0, 2, 1)
            acc += pt.transpose(0, 2, 1) @ v[:, k_start:k_stop]  # (G, bq, hs)
            m = m_new
        xp.divide(acc, l.transpose(0, 2, 1), out=out[:, q_start:q_stop])
        lse[:, q_start:q_stop] = (m + xp.log(l))[:, 0]


def blockwise_attention_backward(q, k, v, out, lse, dout, offset: int, block_q: int, block_k: int,
                                 dq, dk, dv) -> None:
    r"""Gradients of blockwise_attention_forward: fills dq (G, Tq, hs) (with respect to the
    scaled queries) and dk, dv (G, Tk, hs); recomputes each tile's probabilities
    $P = \exp(S - \text{lse})$ from the saved log-sum-exp instead of keeping them.

    With $\text{out} = P v$ and $P = \operatorname{softmax}(S)$ row by row:

    $$dv = P^\top d\text{out}, \qquad dP = d\text{out}\; v^\top$$

    $$dS = P \odot (dP - D), \qquad
    D = \operatorname{rowsum}(P \odot dP) = \operatorname{rowsum}(d\text{out} \odot \text{out})$$

    (the softmax's Jacobian $\operatorname{diag}(P) - P P^\top$, with
    $\sum_j P_{ij}\, dP_{ij} = d\text{out}_i \cdot \sum_j P_{ij} v_j = d\text{out}_i \cdot \text{out}_i$,
    so D needs no (T, T) matrix), and $S = q k^\top$ gives

    $$dq = dS\, k, \qquad dk = dS^\top q.$$

    Each is a sum over tiles: dq over a query tile's key tiles, dk and dv over the query
    tiles that see a key tile. Masked entries have P = 0 and so get no gradient.
    (As in the forward, the code holds the tiles transposed: pt = $P^\top$, dst = $dS^\top$.)
    """
    xp = backend.array_module(q)
    G, Tq, hs = q.shape
    dk[...] = 0
    dv[...] = 0
    D = (dout * out).sum(axis=-1)[:, None, :]  # (G, 1, Tq)
    for q_start in range(0, Tq, block_q):
        q_stop = min(q_start + block_q, Tq)
        qi, douti = q[:, q_start:q_stop], dout[:, q_start:q_stop]  # (G, bq, hs)
        lse_i, D_i = lse[:, None, q_start:q_stop], D[:, :, q_start:q_stop]  # (G, 1, bq)
        dqi = dq[:, q_start:q_stop]
        dqi[...] = 0
        for k_start, k_stop, needs_mask in _key_tiles(offset + q_start, offset + q_stop, block_k):
            kj, vj = k[:, k_start:k_stop], v[:, k_start:k_stop]  # (G, bk, hs)
            # S = q k^T (+ mask); P = exp(S - lse), the forward's probabilities
            st = kj @ qi.transpose(0, 2, 1)  # (G, bk, bq) = S^T
            if needs_mask:
                st += _tile_mask(offset + q_start, offset + q_stop, k_start, k_stop, xp, st.dtype)
            st -= lse_i
            pt = xp.exp(st, out=st)  # P^T
            # out = P v
            dv[:, k_start:k_stop] += pt @ douti  # (G, bk, hs)
            dpt = vj @ douti.transpose(0, 2, 1)  # (G, bk, bq) = dP^T
            # P = softmax(S)
            dpt -= D_i
            dst = xp.multiply(pt, dpt, out=dpt)  # dS^T
            # S = q k^T
            dqi += dst.transpose(0, 2, 1) @ kj
            dk[:, k_start:k_stop] += dst @ qi


class BlockwiseAttention(MultiHeadAttention):
    r"""``MultiHeadAttention`` (same parameters, same results) with the attention itself
    computed by ``blockwise_attention_forward`` / ``_backward``.

    Per batch and head, with q scaled by $1/\sqrt{hs}$:

    $$\text{out} = \operatorname{softmax}(q k^\top + M)\, v$$

    tile by tile, keeping out and lse (T,) only, and the backward recomputes the
    probabilities from lse. The B * NH heads are split
    into groups that run on every core (``numpygpt.parallel``; BLAS single-threaded
    inside each group), as the tiles of one head depend on each other only through the
    running max and sums.

    ``mode="blockwise"`` always takes this path; ``mode="auto"`` takes it when the
    forward has at least ``AUTO_MIN_T`` queries on NumPy and the plain batched path
    otherwise (short sequences, one-token generation steps, and CuPy, where one batched
    kernel beats many small ones). Attention dropout is not applied tile by tile: while
    it is active (training with ``dropout > 0``) the plain path runs, so dropout behaves
    exactly as in ``MultiHeadAttention``.
    """

    def __init__(self, d_in: int, d_out: int, num_heads: int, dropout: float = 0.0,
                 qkv_bias: bool = False, dtype="float32", seed: int | None = None,
                 mode: str = "auto", block_q: int = 128, block_k: int = 128):
        super().__init__(d_in, d_out, num_heads, dropout, qkv_bias, dtype, seed)
        if mode not in ("auto", "blockwise"):
            raise ValueError(f"BlockwiseAttention mode must be 'auto' or 'blockwise', got {mode!r}")
        if block_q < 1 or block_k < 1:
            raise ValueError(f"tile sizes must be positive, got block_q={block_q}, block_k={block_k}")
        self.mode = mode
        self.block_q, self.block_k = int(block_q), int(block_k)
        self._dense_step = False  # which path the last forward took

    def uses_blockwise(self, x) -> bool:
        """Whether a forward on x (B, T, C) takes the blockwise path."""
        if self.attn_dropout.active():
            return False
        if self.mode == "blockwise":
            return True
        return x.shape[1] >= AUTO_MIN_T and not backend.is_cupy_array(x)

    def forward(self, x, kv_cache: KVCache | None = None):
        self._dense_step = not self.uses_blockwise(x)
        if self._dense_step:
            return super().forward(x, kv_cache)
        B, T, C = x.shape
        NH, hs = self.num_heads, self.head_dim
        G = B * NH
        xp = backend.array_module(x)
        qkv = self.c_attn(x)  # (B, T, 3C)
        qkv = qkv.reshape(B, T, 3, NH, hs).transpose(2, 0, 3, 1, 4)  # (3, B, NH, T, hs)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, NH, T, hs) each
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # (B, NH, T_k, hs)
        T_k = k.shape[2]
        # contiguous (G, T, hs) heads; q scaled once here instead of every score tile
        q_heads = xp.multiply(q, 1.0 / math.sqrt(hs), out=xp.empty((B, NH, T, hs), dtype=q.dtype))
        q_heads = q_heads.reshape(G, T, hs)
        k_heads = xp.ascontiguousarray(k).reshape(G, T_k, hs)
        v_heads = xp.ascontiguousarray(v).reshape(G, T_k, hs)
        out = xp.empty((G, T, hs), dtype=q.dtype)
        lse = xp.empty((G, T), dtype=q.dtype)

        def heads(start, stop):
            blockwise_attention_forward(q_heads[start:stop], k_heads[start:stop], v_heads[start:stop],
                                        T_k - T, self.block_q, self.block_k,
                                        out[start:stop], lse[start:stop])

        parallel.for_chunks(heads, G, self._heads_per_chunk(G, x), blas=True)
        self._save(q=q_heads, k=k_heads, v=v_heads, out=out, lse=lse)
        y = out.reshape(B, NH, T, hs).transpose(0, 2, 1, 3).reshape(B, T, C)  # (B, T, C)
        return self.c_proj(y)

    def backward(self, dout):
        if self._dense_step:
            return super().backward(dout)
        cache = self._take()
        q, k, v, out, lse = cache["q"], cache["k"], cache["v"], cache["out"], cache["lse"]
        G, T, hs = q.shape
        T_k = k.shape[1]
        B, NH = G // self.num_heads, self.num_heads
        xp = backend.array_module(dout)
        # out_proj = y @ W_proj + b
        dy = self.c_proj.backward(dout)  # (B, T, C)
        dy = xp.ascontiguousarray(dy.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)).reshape(G, T, hs)
        # y = attention(q * scale, k, v), head by head
        dq, dk, dv = xp.empty_like(q), xp.empty_like(k), xp.empty_like(v)

        def heads(start, stop):
            blockwise_attention_backward(q[start:stop], k[start:stop], v[start:stop], out[start:stop],
                                         lse[start:stop], dy[start:stop], T_k - T, self.block_q,
                                         self.block_k, dq[start:stop], dk[start:stop], dv[start:stop])

        parallel.for_chunks(heads, G, self._heads_per_chunk(G, dout), blas=True)
        dq *= 1.0 / math.sqrt(hs)  # q_heads = q * scale
        # q, k, v were slices of c_attn's output, reshaped to heads
        dqkv = xp.stack((dq, dk, dv)).reshape(3, B, NH, T, hs)  # (3, B, NH, T, hs)
        dqkv = dqkv.transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * NH * hs)  # (B, T, 3C)
        return self.c_attn.backward(dqkv)

    @staticmethod
    def _heads_per_chunk(G: int, x) -> int:
        """Heads per parallel chunk: two chunks per thread, so a thread slowed down by
        other work leaves chunks to the others, with as few Python-level tile loops as
        that allows (each chunk runs the whole tile loop once)."""
        if backend.is_cupy_array(x):
            return G
        return max(1, -(-G // (2 * parallel.get_num_threads())))


def make_attention(impl: str, d_in: int, d_out: int, num_heads: int, dropout: float = 0.0,
                   qkv_bias: bool = False, dtype="float32", seed: int | None = None):
    """The attention layer for ``GPTConfig.attn_impl``: "dense" (MultiHeadAttention),
    "blockwise" or "auto" (BlockwiseAttention in that mode)."""
    if impl == "dense":
        return MultiHeadAttention(d_in, d_out, num_heads, dropout, qkv_bias, dtype, seed)
    if impl in ("auto", "blockwise"):
        return BlockwiseAttention(d_in, d_out, num_heads, dropout, qkv_bias, dtype, seed, mode=impl)
    raise ValueError(f"attn_impl must be one of {', '.join(ATTN_IMPLS)}, got {impl!r}")
