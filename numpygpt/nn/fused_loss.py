"""The output head and the cross-entropy fused, chunk by chunk of rows: the (N, V) logits
and their gradient never exist whole."""

from __future__ import annotations

from .loss import prepare_targets
from .module import Module, Parameter, is_grad_enabled
from .. import backend, parallel

# logits of one chunk of rows, at most: 128 MiB, 667 rows of GPT-2's V=50257 in float32 (the rows
# are then shared out evenly: 4096 rows go in 7 chunks of 586). Every chunk reads all of W (V, C)
# three times and dW once, so a chunk needs rows enough to reuse them. GPT-2 small's head + loss
# alone (2 threads, a loaded machine; benchmarks/RESULTS.md) took, against the plain path's time,
# 1.34 / 0.81 / 0.66 times in chunks of 83 / 167 / 333 rows at B x T = 2 x 256, and at 4 x 1024
# 1.34 / 1.0 / 1.1 times in chunks of 333 / 683 / 1366 rows.
CHUNK_BYTES = 128 << 20
SLICE_ROWS = 4096  # rows of dW a chunk adds at a time: a (4096, C) temporary that stays in cache


class FusedLinearCrossEntropy(Module):
    r"""$\text{loss} = -\frac{1}{n} \sum_i \text{keep}_i \log \operatorname{softmax}(W h_i)[t_i]$, W (V, C), h (N, C).

    The same number as ``CrossEntropyLoss()(OutputHead(W)(h), targets)``, with the same
    ``ignore_index`` rule, but the rows go through in chunks of ``chunk_rows`` (by default
    equal chunks of at most ``CHUNK_BYTES`` of logits), so memory holds one chunk's (M, V)
    logits instead of all N rows' (at GPT-2 small's B x T = 4 x 1024, 823 MB of logits and
    as much of softmax) and never the (N, V) gradient.

    Derivation. Write $z_i = W h_i$ (the logits of row i, a V-vector), $p_i = \operatorname{softmax}(z_i)$,
    $\text{keep}_i$ = 1 if $t_i$ counts ($t_i \ne$ ``ignore_index``) else 0, and $n = \sum_i \text{keep}_i$. Then

    $$L = \frac{1}{n} \sum_i \text{keep}_i \, \ell_i, \qquad \ell_i = \log \sum_v e^{z_{iv}} - z_{i t_i}$$

    and, since the gradient of log-sum-exp is the softmax,

    $$g_i = \frac{\partial L}{\partial z_i} = \frac{\text{keep}_i}{n} \left(p_i - \operatorname{onehot}(t_i)\right) \qquad (V,)$$

    The chain rule through $z_{iv} = \sum_c W_{vc} h_{ic}$ (so $\partial z_{iv} / \partial h_{ic} = W_{vc}$
    and $\partial z_{iv} / \partial W_{vc} = h_{ic}$) gives, with G the (N, V) matrix of rows $g_i$:

    $$dh_i = W^T g_i, \text{ i.e. } dh = G W \quad (N, C); \qquad
      dW = \sum_i g_i h_i^T = G^T h = \sum_{\text{chunks } c} G_c^T h_c \quad (V, C)$$

    Row i of G needs only row i of the logits, its target and n, and n is known from the
    targets before any row is computed. So a chunk of rows c can compute its logits
    $z_c = h_c W^T$, the stable log-softmax (max subtracted before exp), its loss terms, its
    $G_c$, its rows $dh_c = G_c W$ and its share $G_c^T h_c$ of dW, and then drop $z_c$ and $G_c$.
    dW is a sum over chunks; dh is a stack of the chunks' rows.

    Gradients computed in the forward pass (as Liger-Kernel's fused linear cross-entropy
    does). The backward is asked for $d(sL)$ for an upstream scalar s (``backward(s)``:
    1/grad_accum, a rank's weight). Both gradients are linear in s ($d(sL)/dh = s \, dL/dh$), so
    the forward computes them for s = 1 while each chunk's logits are at hand, and backward
    multiplies by s: exact up to that one rounding of the product (W must not change in
    between, as for every layer's cache). What it costs:
    - the forward does the two gradient GEMMs as well, whenever gradients are enabled (a
      forward under ``no_grad``, evaluation, computes only the logits and the loss);
    - dh (N, C) and dW (V, C) are held from the forward to the backward, where the plain
      path holds the (N, V) softmax (V/C times dh's size) and makes its dW in the backward;
    - s != 1 costs one pass of multiplication over dh and dW.
    The other way, keeping only h and each row's logsumexp, would recompute the logits in
    the backward: a fourth (N, V, C) GEMM, a third more of the head's work.

    The work per chunk is three GEMMs, as in the plain head: logits, dh_c and dW's share.
    dW's share is added in slices of ``SLICE_ROWS`` rows through one reused temporary, so
    adding a chunk's (V, C) share never writes a (V, C) temporary (NumPy's matmul cannot
    accumulate into its output). The softmax of a chunk runs on every core
    (``parallel.for_rows``).

        fused = FusedLinearCrossEntropy(head.weight)   # tied: the token embedding's weight
        loss = fused(h, targets)       # h (B, T, C) or (N, C); targets (B, T) or (N,)
        dh = fused.backward()          # (B, T, C); adds dW into head.weight.grad
    """

    def __init__(self, weight: Parameter, ignore_index: int = -100, chunk_rows: int | None = None):
        self.weight = weight
        self.ignore_index = ignore_index
        if chunk_rows is not None and int(chunk_rows) < 1:
            raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows}")
        self.chunk_rows = None if chunk_rows is None else int(chunk_rows)

    def rows_per_chunk(self, N: int | None = None) -> int:
        """``chunk_rows``, or: at most as many rows as make CHUNK_BYTES of logits (at least 1),
        shared out evenly over the chunks that N rows need."""
        if self.chunk_rows is not None:
            return self.chunk_rows
        V = self.weight.shape[0]
        most = max(1, CHUNK_BYTES // (V * self.weight.dtype.itemsize))
        if N is None or N <= most:
            return most
        n_chunks = -(-N // most)
        return -(-N // n_chunks)

    def forward(self, h, targets):
        xp = backend.array_module(h)
        W = self.weight.data  # (V, C)
        V, C = W.shape
        if h.shape[-1] != C:
            raise ValueError(f"hidden states have {h.shape[-1]} channels; the head's weight {tuple(W.shape)} needs {C}")
        t, keep, n = prepare_targets(targets, h.shape[:-1], V, self.ignore_index, W)
        h_rows = xp.ascontiguousarray(h).reshape(-1, C)  # (N, C)
        N, dtype = h_rows.shape[0], h_rows.dtype
        grad = is_grad_enabled()
        nll = xp.empty(N, dtype=dtype)  # (N,): -log p_i[t_i]
        scale = (keep / n).astype(dtype)  # (N,): keep_i / n, the rows' weights in the mean
        dh = xp.empty_like(h_rows) if grad else None  # (N, C)
        dW = xp.empty((V, C), dtype=dtype) if grad and self.weight.requires_grad else None  # (V, C)
        step = self.rows_per_chunk(N)
        for start in range(0, N, step):
            rows = slice(start, min(start + step, N))
            logits = h_rows[rows] @ W.T  # (M, V), z_c = h_c W^T
            _log_softmax_rows(logits, t[rows], nll[rows], scale[rows] if grad else None)  # logits -> G_c
            if grad:
                # dh_c = G_c @ W (M, C), computed as (W^T @ G_c^T)^T: OpenBLAS on two threads
                # ran G_c @ W (few rows, K = V) up to 14x slower than this transposed form
                dh[rows] = (W.T @ logits.T).T
            if dW is not None:
                _add_chunk_dW(dW, logits, h_rows[rows], first=start == 0)  # dW += G_c^T @ h_c
            del logits
        loss = (nll * keep).sum() / n  # a 0-d array on the device: no host sync
        if grad:
            self._save(dh=dh, dW=dW, shape=h.shape)
        return loss

    def backward(self, dloss=1.0):
        cache = self._take()
        dh, dW = cache["dh"], cache["dW"]
        # d(s L) = s dL: the forward computed the gradients for s = 1
        if not (isinstance(dloss, float) and dloss == 1.0):
            dh *= dloss
            if dW is not None:
                dW *= dloss
        if dW is not None:
            self.weight.add_grad(dW)  # (V, C); adopted as .grad when it is the first
        return dh.reshape(cache["shape"])


def _log_softmax_rows(logits, t, nll, scale) -> None:
    """For a chunk's logits (M, V) with targets t (M,): nll[i] = logsumexp(z_i) - z_i[t_i]
    (max subtracted first); with ``scale`` (M,) also turns ``logits`` into G = scale_i *
    (softmax(z_i) - onehot(t_i)) in place, as CrossEntropyLoss's forward and backward do,
    in the same order of operations."""
    xp = backend.array_module(logits)

    def rows(start, stop):  # rows are independent: sub-chunks of them run on every core
        z, tc = logits[start:stop], t[start:stop]
        z -= z.max(axis=-1, keepdims=True)
        target_shifted = z[xp.arange(stop - start), tc]
        xp.exp(z, out=z)
        sumexp = z.sum(axis=-1)
        xp.subtract(xp.log(sumexp), target_shifted, out=nll[start:stop])
        if scale is not None:
            z /= sumexp[:, None]  # p
            z[xp.arange(stop - start), tc] -= 1.0  # p - onehot
            z *= scale[start:stop, None]  # (keep_i / n) (p - onehot)

    parallel.for_rows(rows, logits)


def _add_chunk_dW(dW, G, h_c, first: bool) -> None:
    """dW += G^T @ h_c ((V, M) @ (M, C)), or dW = G^T @ h_c for the first chunk, SLICE_ROWS
    rows of dW at a time through one (SLICE_ROWS, C) temporary."""
    xp = backend.array_module(dW)
    V, C = dW.shape
    if first:
        xp.matmul(G.T, h_c, out=dW)
        return
    tmp = xp.empty((min(SLICE_ROWS, V), C), dtype=dW.dtype)
    for v0 in range(0, V, SLICE_ROWS):
        v1 = min(v0 + SLICE_ROWS, V)
        part = tmp[: v1 - v0]
        xp.matmul(G[:, v0:v1].T, h_c, out=part)  # (Vs, C)
        dW[v0:v1] += part
