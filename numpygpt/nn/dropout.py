"""Inverted dropout."""

from __future__ import annotations

from .module import Module
from .. import backend


class Dropout(Module):
    r"""Training: $y = x \odot m / (1 - p)$ with $m \sim \operatorname{Bernoulli}(1 - p)$; eval: $y = x$.

    Backward uses the same mask: $dx = dy \odot m / (1 - p)$. Masks come from the
    backend's dropout generator, so ``backend.manual_seed(s)`` before a forward pass
    replays the same masks (that is how the gradient checks hold them fixed).
    """

    def __init__(self, p: float = 0.0):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = float(p)

    def active(self) -> bool:
        return self.training and self.p > 0.0

    def forward(self, x):
        if not self.active():
            self._save(mask=None)
            return x
        rng = backend.get_rng(backend.device_of(x))
        keep = rng.random(x.shape, dtype=x.dtype) >= self.p  # (x.shape) bool
        mask = keep.astype(x.dtype)
        mask *= 1.0 / (1.0 - self.p)
        self._save(mask=mask)
        return x * mask

    def backward(self, dout):
        mask = self._take()["mask"]
        if mask is None:
            return dout
        return dout * mask
