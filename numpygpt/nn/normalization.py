"""Layer normalisation over the last (channel) axis."""

from __future__ import annotations

from .module import Module, Parameter
from .. import backend


class LayerNorm(Module):
    """y = xhat * w + b,  xhat = (x - mean) * rstd,  rstd = 1 / sqrt(var + eps).

    The variance is the biased one (divide by C), as in GPT-2. Backward, per row,
    with g = dy * w (the gradient reaching xhat):
        dw = sum_rows dy * xhat
        db = sum_rows dy
        dx = (g - mean(g) - xhat * mean(g * xhat)) * rstd
    The two means come from xhat's dependence on the row's mean and variance.
    """

    def __init__(self, dim: int, eps: float = 1e-5, dtype="float32"):
        xp = backend.xp
        self.eps = float(eps)
        self.weight = Parameter(xp.ones((dim,), dtype=dtype))
        self.bias = Parameter(xp.zeros((dim,), dtype=dtype))

    def forward(self, x):
        xp = backend.array_module(x)
        mean = x.mean(axis=-1, keepdims=True)  # (..., 1)
        xc = x - mean
        var = (xc * xc).mean(axis=-1, keepdims=True)  # biased variance
        rstd = 1.0 / xp.sqrt(var + self.eps)  # (..., 1)
        xhat = xc
        xhat *= rstd  # reuse xc's memory
        self._save(xhat=xhat, rstd=rstd)
        return xhat * self.weight.data + self.bias.data

    def backward(self, dout):
        cache = self._take()
        xhat, rstd = cache["xhat"], cache["rstd"]
        C = xhat.shape[-1]
        if self.weight.requires_grad:
            self.weight.add_grad((dout * xhat).reshape(-1, C).sum(axis=0))
        if self.bias.requires_grad:
            self.bias.add_grad(dout.reshape(-1, C).sum(axis=0))
        g = dout * self.weight.data  # dL/dxhat
        dx = g - g.mean(axis=-1, keepdims=True)
        dx -= xhat * (g * xhat).mean(axis=-1, keepdims=True)
        dx *= rstd
        return dx
