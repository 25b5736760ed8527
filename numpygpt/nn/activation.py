"""Element-wise activations (GELU) and the softmax."""

from __future__ import annotations

import math

from .module import Module
from .. import backend

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)  # a Python float: keeps the array's dtype


class GELU(Module):
    """GPT-2's tanh approximation:  y = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3).

    Backward (product rule, tanh' = 1 - tanh^2):
        dy/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    """

    def forward(self, x):
        xp = backend.array_module(x)
        t = xp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
        self._save(x=x, t=t)
        return 0.5 * x * (1.0 + t)

    def backward(self, dout):
        cache = self._take()
        x, t = cache["x"], cache["t"]
        du_dx = _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
        dydx = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du_dx
        return dout * dydx


class Softmax(Module):
    """y = exp(x - max x) / sum exp(x - max x) along ``axis``.

    Backward: the Jacobian is diag(y) - y y^T, so
        dx = y * (dy - sum(dy * y))
    Entries with y = 0 (masked, -inf scores) get exactly zero gradient.
    """

    def __init__(self, axis: int = -1):
        self.axis = axis

    def forward(self, x):
        xp = backend.array_module(x)
        y = x - x.max(axis=self.axis, keepdims=True)
        xp.exp(y, out=y)
        y /= y.sum(axis=self.axis, keepdims=True)
        self._save(y=y)
        return y

    def backward(self, dout):
        y = self._take()["y"]
        dx = dout * y
        dx -= y * dx.sum(axis=self.axis, keepdims=True)  # y*dy - y*sum(y*dy)
        return dx
