"""Cross-entropy over the vocabulary, fused with the softmax."""

from __future__ import annotations

from .module import Module, is_grad_enabled
from .. import backend, parallel


class CrossEntropyLoss(Module):
    r"""$\text{loss} = -\frac{1}{N} \sum_n \log \operatorname{softmax}(z_n)[t_n]$ over the N counted targets.

    z are the logits and t the targets; targets equal to ``ignore_index`` (default -100,
    as in the book and PyTorch) are not counted. With $p = \operatorname{softmax}(z)$, the
    loss of one row is $-\log p_t = -z_t + \log \sum_j e^{z_j}$, whose gradient is
    $p_j - [j = t]$, so the fused gradient is

    $$dz_n = \frac{p_n - \operatorname{onehot}(t_n)}{N} \qquad \text{(zero on ignored rows)}$$

    which never forms the softmax's Jacobian.

        loss = loss_fn(logits, targets)    # logits (B, T, V), targets (B, T); or (B, K) and (B,)
        dlogits = loss_fn.backward()       # (B, T, V); scale by an upstream dloss if given
    """

    def __init__(self, ignore_index: int = -100):
        self.ignore_index = ignore_index

    def forward(self, logits, targets):
        V = logits.shape[-1]
        t_safe, keep, n = prepare_targets(targets, logits.shape[:-1], V, self.ignore_index, logits)
        z = logits.reshape(-1, V)  # (N_all, V)
        grad = is_grad_enabled()  # the normalised softmax is only needed by backward
        nll, p = softmax_nll(z, t_safe, normalise=grad)  # (N_all,), (N_all, V): p is kept for backward
        loss = (nll * keep).sum() / n  # a 0-d array on the device: no host sync
        if grad:
            self._save(p=p, t=t_safe, keep=keep, n=n, shape=logits.shape)
        return loss

    def backward(self, dloss=1.0):
        cache = self._take()
        p, t, keep, n = cache["p"], cache["t"], cache["keep"], cache["n"]
        # dlogits reuses p's memory: it is not needed again
        scale = (keep / n).astype(p.dtype)[:, None]  # (N_all, 1): 1/N, or 0 where ignored
        if not (isinstance(dloss, float) and dloss == 1.0):
            scale = (scale * dloss).astype(p.dtype)
        return softmax_nll_backward(p, t, scale).reshape(cache["shape"])


def softmax_nll(z, targets, normalise: bool = True, p=None):
    """Per row of ``z`` (N, V): ``nll = logsumexp(z) - z[target]`` (N,) and ``p`` (N, V), the
    softmax when ``normalise`` (else the shifted exponentials, scratch). ``targets`` (N,) must
    all lie in [0, V) (put 0 where a row is not counted). ``p``: the array to write the softmax
    into (default a new one). The max is subtracted before ``exp``, so no row overflows; rows
    are independent, so chunks of them run on every core (``parallel.for_rows``).
    """
    xp = backend.array_module(z)
    p = xp.empty_like(z) if p is None else p  # (N, V)
    nll = xp.empty(z.shape[0], dtype=z.dtype)  # (N,)

    def rows(start, stop):
        pc, tc = p[start:stop], targets[start:stop]
        xp.subtract(z[start:stop], z[start:stop].max(axis=-1, keepdims=True), out=pc)
        target_shifted = pc[xp.arange(stop - start), tc]
        xp.exp(pc, out=pc)
        sumexp = pc.sum(axis=-1)
        xp.subtract(xp.log(sumexp), target_shifted, out=nll[start:stop])
        if normalise:
            pc /= sumexp[:, None]

    parallel.for_rows(rows, z)
    return nll, p


def softmax_nll_backward(p, targets, scale):
    """``scale * (p - onehot(targets))`` per row, written into ``p`` (N, V) and returned: the
    gradient of ``sum_rows scale * nll`` with respect to the logits, for ``scale`` (N, 1)."""
    xp = backend.array_module(p)

    def rows(start, stop):
        dl = p[start:stop]
        dl[xp.arange(stop - start), targets[start:stop]] -= 1.0
        dl *= scale[start:stop]

    parallel.for_rows(rows, p)
    return p


def prepare_targets(targets, lead_shape, V: int, ignore_index: int, like):
    """Targets (any integer array of shape ``lead_shape``) as (t_safe, keep, n) on ``like``'s
    device: t_safe (N_all,) the ids with ignored ones replaced by 0 (safe to index with),
    keep (N_all,) whether each counts, n the number that count.

    Host targets (the data loader's) are checked here, once, then moved; n is then an int.
    Targets already on the device are trusted: checking would cost host syncs every
    micro-batch; n stays a device scalar (all ignored gives NaN).
    """
    xp = backend.array_module(like)
    if not (hasattr(targets, "dtype") and hasattr(targets, "shape")):
        targets = backend.to_host(targets)
    if tuple(targets.shape) != tuple(lead_shape):
        raise ValueError(f"targets have shape {tuple(targets.shape)}; logits need {tuple(lead_shape)}")
    if targets.dtype.kind not in "iu":  # bool and float targets are refused, not cast
        raise ValueError(f"targets must be integer class ids, got dtype {targets.dtype}")
    if backend.is_cupy_array(targets):
        t = targets.reshape(-1)
        keep = t != ignore_index  # (N_all,)
        n = keep.sum(dtype=like.dtype)  # in the logits' dtype: an int64 n would promote the loss
    else:
        t_host = targets.reshape(-1)
        keep_host = t_host != ignore_index
        n = int(keep_host.sum())
        if n == 0:
            raise ValueError("every target equals ignore_index: the mean loss is undefined")
        bad = keep_host & ((t_host < 0) | (t_host >= V))
        if bad.any():
            raise ValueError(f"target ids must be in [0, {V}) or equal ignore_index={ignore_index}; "
                             f"got {int(t_host[bad][0])}")
        t = backend.to_device(t_host, device_name=backend.device_of(like))
        keep = backend.to_device(keep_host, device_name=backend.device_of(like))
    return xp.where(keep, t, 0), keep, n
