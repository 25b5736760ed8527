r"""Direct Preference Optimization's loss, from the logits of chosen and rejected responses.

For pair b (prompt x, chosen response $y_c$, rejected response $y_r$), a response's sequence
log-probability is taken over its response tokens only: the mask m is 1 on the targets that
are response tokens and 0 on the prompt and the padding. With $s_{bt} = \log
\operatorname{softmax}(z_{bt})[y_{bt}]$ the targets' log-probabilities and $N_b = \sum_t m_{bt}$,

$$\ell_b = \frac{1}{N_b} \sum_t m_{bt}\, s_{bt} \quad \text{("mean", the book's)} \qquad
\ell_b = \sum_t m_{bt}\, s_{bt} \quad \text{("sum", the paper's)}$$

and with $r_c, r_r$ the frozen reference model's $\ell$ for the same texts,

$$h_b = \beta \left( (\ell_{c,b} - \ell_{r,b}) - (r_{c,b} - r_{r,b}) \right), \qquad
L = \frac{1}{B} \sum_b -\log \sigma(h_b) = \frac{1}{B} \sum_b \operatorname{logaddexp}(0, -h_b).$$

The implicit rewards are $\beta(\ell - r)$ for each response; the margin is their difference
($= h_b$); the reward accuracy is the share of pairs with a positive margin.

Backward. From $-\log \sigma(h) = \log(1 + e^{-h})$, $\partial L / \partial h_b = -\sigma(-h_b)/B$;
$\partial h_b / \partial \ell_{c,b} = \beta$ and $\partial h_b / \partial \ell_{r,b} = -\beta$; the
log-softmax gives $\partial s_{bt} / \partial z_{bt} = \operatorname{onehot}(y_{bt}) - p_{bt}$ with
$p_{bt} = \operatorname{softmax}(z_{bt})$, so $\partial \ell_b / \partial z_{bt} = \frac{m_{bt}}{N_b}
(\operatorname{onehot}(y_{bt}) - p_{bt})$ ($N_b = 1$ for "sum"). With
$c_b = \beta\, \sigma(-h_b) / B \cdot dL$, row by row:

$$dz_{c,bt} = c_b \frac{m_{c,bt}}{N_{c,b}} \left( p_{c,bt} - \operatorname{onehot}(y_{c,bt}) \right),
\qquad dz_{r,bt} = -c_b \frac{m_{r,bt}}{N_{r,b}} \left( p_{r,bt} - \operatorname{onehot}(y_{r,bt}) \right)$$

This is cross-entropy's fused gradient with a per-row weight (``loss.softmax_nll_backward``):
zero on the prompt and the padding, pushing the chosen response up and the rejected one down,
each by how far the pair still is from being ranked right ($\sigma(-h) \to 0$ once $h \gg 0$).
$\log \sigma(h)$ is computed as ``-logaddexp(0, -h)`` and $\sigma(-h)$ as ``exp(-logaddexp(0, h))``:
finite for any h.

    loss_fn = DPOLoss(beta=0.1)
    out = loss_fn(logits_c, logits_r, targets_c, targets_r, mask_c, mask_r, ref_c, ref_r)
    out.loss, out.chosen_rewards, out.rejected_rewards, out.margins   # 0-d, (B,), (B,), (B,)
    dlogits_c, dlogits_r = loss_fn.backward()                          # (B, T, V) each
"""

from __future__ import annotations

import math
from typing import NamedTuple

from .loss import softmax_nll, softmax_nll_backward
from .module import Module, is_grad_enabled
from .. import backend

__all__ = ["DPOLoss", "DPOOutput", "sequence_logprobs", "REDUCTIONS"]

REDUCTIONS = ("mean", "sum")


class DPOOutput(NamedTuple):
    """What ``DPOLoss`` returns, on the logits' device and in their dtype."""
    loss: object  # 0-d: mean over pairs of -log sigmoid(margin)
    chosen_rewards: object  # (B,) beta * (logp_c - ref_c)
    rejected_rewards: object  # (B,) beta * (logp_r - ref_r)
    margins: object  # (B,) chosen_rewards - rejected_rewards


def _check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    return reduction


def _on_device(logits, targets, mask, name: str = ""):
    """(targets with 0 where masked, mask as 0/1 in the logits' dtype), (B, T) each, on the
    logits' device. Host targets and masks are checked here, once: shapes, target ids in [0, V)
    where counted, and at least one counted target per sequence. ``name``: "chosen" or
    "rejected", for the messages."""
    xp = backend.array_module(logits)
    B, T, V = logits.shape
    name = name + " " if name else ""
    if not all(hasattr(a, "shape") for a in (targets, mask)):
        targets, mask = backend.to_host(targets), backend.to_host(mask)
    for what, a in (("targets", targets), ("mask", mask)):
        if tuple(a.shape) != (B, T):
            raise ValueError(f"{name}{what} have shape {tuple(a.shape)}; the logits need {(B, T)}")
    if targets.dtype.kind not in "iu":
        raise ValueError(f"{name}targets must be integer token ids, got dtype {targets.dtype}")
    if not backend.is_cupy_array(mask):  # device arrays are trusted: checking would sync
        keep = backend.to_host(mask).astype(bool)
        empty = (~keep.any(axis=1)).nonzero()[0]
        if empty.size:
            raise ValueError(f"{name}sequence {int(empty[0])} has no response token in its mask: its "
                             "log-probability is undefined")
        t_host = backend.to_host(targets)
        bad = keep & ((t_host < 0) | (t_host >= V))
        if bad.any():
            raise ValueError(f"{name}target ids must be in [0, {V}) where the mask counts them; "
                             f"got {int(t_host[bad][0])}")
    dev = backend.device_of(logits)
    m = backend.to_device(mask, device_name=dev).astype(logits.dtype)  # (B, T) 0/1
    t = xp.where(m > 0, backend.to_device(targets, device_name=dev), 0)  # (B, T): 0 where masked
    return t, m


def _logprobs(logits, t, m, reduction: str, normalise: bool, p=None):
    """(logp (B,), p (B*T, V), 1/N or 1 per row (B,)) for checked targets ``t`` and mask ``m``."""
    B, T, V = logits.shape
    nll, p = softmax_nll(logits.reshape(B * T, V), t.reshape(-1), normalise=normalise, p=p)  # (B*T,)
    total = -(nll.reshape(B, T) * m).sum(axis=1)  # (B,) sum of the response tokens' log-probs
    xp = backend.array_module(logits)
    inv_n = 1.0 / m.sum(axis=1) if reduction == "mean" else xp.ones(B, dtype=logits.dtype)  # (B,)
    return total * inv_n, p, inv_n


def sequence_logprobs(logits, targets, mask, reduction: str = "mean"):
    """The log-probability (B,) of each sequence's counted targets: mean (the book's default)
    or sum over the positions where ``mask`` (B, T) is true of log softmax(logits)[target].
    No gradient: this is what the reference model gives (the book's ``compute_logprobs``)."""
    t, m = _on_device(logits, targets, mask)
    return _logprobs(logits, t, m, _check_reduction(reduction), normalise=False)[0]


class DPOLoss(Module):
    r"""$L = \frac{1}{B} \sum_b -\log \sigma\left(\beta ((\ell_c - \ell_r) - (r_c - r_r))\right)$ over the
    pairs (the module docstring has the formulas and the derivation of the gradient).

    beta: the reward scale (> 0; 0.1 in the book and the paper). reduction: "mean" (the book's:
    logp is the mean of the response tokens' log-probabilities) or "sum" (the paper's).
    Forward returns a ``DPOOutput``; ``backward(dloss)`` returns (dlogits_c, dlogits_r), and
    ``backward_stacked`` the same as one (2B, T, V) array, the gradient of the logits of
    ``concatenate([chosen, rejected])`` run through a model as one batch.
    """

    def __init__(self, beta: float = 0.1, reduction: str = "mean"):
        beta = float(beta)
        if not (math.isfinite(beta) and beta > 0):
            raise ValueError(f"beta must be a finite number > 0, got {beta:g}")
        self.beta, self.reduction = beta, _check_reduction(reduction)

    def forward(self, logits_c, logits_r, targets_c, targets_r, mask_c, mask_r, ref_c, ref_r) -> DPOOutput:
        xp = backend.array_module(logits_c)
        if tuple(logits_c.shape) != tuple(logits_r.shape):
            raise ValueError(f"chosen logits {tuple(logits_c.shape)} and rejected logits "
                             f"{tuple(logits_r.shape)} must have the same shape (pad both to one length)")
        B, T, V = logits_c.shape
        dtype, dev = logits_c.dtype, backend.device_of(logits_c)
        tc, mc = _on_device(logits_c, targets_c, mask_c, "chosen")
        tr, mr = _on_device(logits_r, targets_r, mask_r, "rejected")
        ref_c = backend.to_device(ref_c, dtype=dtype, device_name=dev).reshape(B)  # (B,)
        ref_r = backend.to_device(ref_r, dtype=dtype, device_name=dev).reshape(B)  # (B,)
        grad = is_grad_enabled()
        p = xp.empty((2, B * T, V), dtype=dtype)  # both softmaxes in one array: see backward_stacked
        logp_c, _, inv_nc = _logprobs(logits_c, tc, mc, self.reduction, grad, p[0])  # (B,)
        logp_r, _, inv_nr = _logprobs(logits_r, tr, mr, self.reduction, grad, p[1])  # (B,)
        chosen_rewards = self.beta * (logp_c - ref_c)  # (B,)
        rejected_rewards = self.beta * (logp_r - ref_r)  # (B,)
        margins = chosen_rewards - rejected_rewards  # (B,) h = beta((logp_c - logp_r) - (ref_c - ref_r))
        loss = xp.logaddexp(0.0, -margins).mean()  # -log sigmoid(h), stable for any h
        if grad:
            self._save(p=p, t=xp.stack([tc, tr]).reshape(2, B * T), m=xp.stack([mc, mr]),
                       inv_n=xp.stack([inv_nc, inv_nr]), margins=margins, shape=(B, T, V))
        return DPOOutput(loss, chosen_rewards, rejected_rewards, margins)

    def backward_stacked(self, dloss=1.0):
        """dlogits (2B, T, V): the chosen rows' gradient, then the rejected rows'."""
        cache = self._take()
        p, t, m, inv_n, margins = cache["p"], cache["t"], cache["m"], cache["inv_n"], cache["margins"]
        xp = backend.array_module(p)
        B, T, V = cache["shape"]
        # loss = mean_b logaddexp(0, -h): dloss/dh = -sigma(-h) / B, sigma(-h) = exp(-logaddexp(0, h))
        c = (self.beta / B) * xp.exp(-xp.logaddexp(0.0, margins)) * dloss  # (B,)
        # logp = sum_t m s / N, h = beta(logp_c - logp_r) - ...: chosen rows +c, rejected rows -c
        sign = xp.asarray([1.0, -1.0], dtype=p.dtype)[:, None]  # (2, 1)
        scale = ((sign * c[None, :] * inv_n)[:, :, None] * m).astype(p.dtype)  # (2, B, T)
        dlogits = softmax_nll_backward(p.reshape(2 * B * T, V), t.reshape(-1), scale.reshape(-1, 1))
        return dlogits.reshape(2 * B, T, V)  # (2B, T, V), in p's memory

    def backward(self, dloss=1.0):
        """(dlogits_c (B, T, V), dlogits_r (B, T, V)): views of ``backward_stacked``'s array."""
        dlogits = self.backward_stacked(dloss)
        B = dlogits.shape[0] // 2
        return dlogits[:B], dlogits[B:]
