"""Element-wise activations (GELU, SiLU) and the softmax.

On the CPU each runs over chunks of rows on every core (``numpygpt.parallel``): a row's
result never depends on the other rows, so the chunked result is the whole-array one,
bit for bit.
"""

from __future__ import annotations

import math

from .module import Module
from .. import backend, parallel

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)  # a Python float: keeps the array's dtype


class _Elementwise(Module):
    """y = f(x) element by element, in chunks over the cores. A subclass gives
    ``_forward_chunk(xp, x, kept, y)``, which fills y and an array ``kept`` of x's shape
    that the backward needs, and ``_backward_chunk(xp, x, kept, dout, dx)``."""

    def forward(self, x):
        xp = backend.array_module(x)
        x = xp.ascontiguousarray(x)
        kept, y = xp.empty_like(x), xp.empty_like(x)
        x_flat, kept_flat, y_flat = x.reshape(-1), kept.reshape(-1), y.reshape(-1)

        def rows(start, stop):
            self._forward_chunk(xp, x_flat[start:stop], kept_flat[start:stop], y_flat[start:stop])

        parallel.for_rows(rows, x_flat)
        self._save(x=x, kept=kept)
        return y

    def backward(self, dout):
        cache = self._take()
        xp = backend.array_module(dout)
        dout = xp.ascontiguousarray(dout)
        dx = xp.empty_like(dout)
        x_flat, kept_flat, dout_flat, dx_flat = (a.reshape(-1) for a in (cache["x"], cache["kept"], dout, dx))

        def rows(start, stop):
            chunk = slice(start, stop)
            self._backward_chunk(xp, x_flat[chunk], kept_flat[chunk], dout_flat[chunk], dx_flat[chunk])

        parallel.for_rows(rows, dout_flat)
        return dx


class GELU(_Elementwise):
    r"""GPT-2's tanh approximation: $y = \tfrac{1}{2} x (1 + \tanh u)$, $u = \sqrt{2/\pi}\,(x + 0.044715\, x^3)$.

    Backward (product rule, $\tanh' = 1 - \tanh^2$), element by element:

    $$\frac{\partial y}{\partial x} = \tfrac{1}{2} \left(1 + \tanh u\right)
    + \tfrac{1}{2}\, x \left(1 - \tanh^2 u\right) \sqrt{2/\pi}\, \left(1 + 3 \cdot 0.044715\, x^2\right)$$

    and the input gradient is the upstream one times it: $dx = dy \odot \partial y / \partial x$.
    """

    @staticmethod
    def _forward_chunk(xp, x, t, y):
        xp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x), out=t)
        xp.multiply(0.5 * x, 1.0 + t, out=y)

    @staticmethod
    def _backward_chunk(xp, x, t, dout, dx):
        du_dx = _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
        dydx = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du_dx
        xp.multiply(dout, dydx, out=dx)


class SiLU(_Elementwise):
    r"""$y = x\, \sigma(x)$ (also called swish; the gate of Llama's SwiGLU), $\sigma$ the logistic sigmoid.

    Backward (product rule, $\sigma' = \sigma (1 - \sigma)$), element by element:

    $$\frac{\partial y}{\partial x} = \sigma(x) + x\, \sigma(x) \big(1 - \sigma(x)\big)
    = \sigma(x) \big(1 + x (1 - \sigma(x))\big), \qquad dx = dy \odot \frac{\partial y}{\partial x}.$$

    The forward keeps $\sigma(x)$, computed from $e^{-|x|}$: that never overflows, and keeps
    full relative precision for large negative x (where y is a tiny negative number, not 0).
    """

    @staticmethod
    def _forward_chunk(xp, x, s, y):
        e = xp.exp(-xp.abs(x))  # in (0, 1]
        # sigmoid(x) = 1 / (1 + e) for x >= 0 and e / (1 + e) for x < 0, both without cancellation
        xp.multiply(xp.where(x < 0, e, 1.0), 1.0 / (1.0 + e), out=s)
        xp.multiply(x, s, out=y)

    @staticmethod
    def _backward_chunk(xp, x, s, dout, dx):
        xp.multiply(dout, s * (1.0 + x * (1.0 - s)), out=dx)


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
        x_rows = self._rows(x)
        y = xp.empty_like(x_rows)

        def rows(start, stop):
            yc = y[start:stop]
            xp.subtract(x_rows[start:stop], x_rows[start:stop].max(axis=-1, keepdims=True), out=yc)
            xp.exp(yc, out=yc)
            yc /= yc.sum(axis=-1, keepdims=True)

        parallel.for_rows(rows, x_rows)
        y = self._unrows(y, x.shape)
        self._save(y=y)
        return y

    def backward(self, dout):
        y = self._take()["y"]
        xp = backend.array_module(dout)
        y_rows, dout_rows = self._rows(y), self._rows(dout)
        dx = xp.empty_like(y_rows)

        def rows(start, stop):
            yc, dxc = y_rows[start:stop], dx[start:stop]
            xp.multiply(dout_rows[start:stop], yc, out=dxc)
            dxc -= yc * dxc.sum(axis=-1, keepdims=True)  # y*dy - y*sum(y*dy)

        parallel.for_rows(rows, y_rows)
        return self._unrows(dx, y.shape)

    def _rows(self, a):
        """a as contiguous (rows, L) with the softmax axis last."""
        xp = backend.array_module(a)
        a = xp.moveaxis(a, self.axis, -1)
        return xp.ascontiguousarray(a).reshape(-1, a.shape[-1])

    def _unrows(self, a_rows, shape):
        """Undo _rows: back to ``shape`` with the softmax axis where it was."""
        xp = backend.array_module(a_rows)
        moved = list(shape)
        moved.append(moved.pop(self.axis))
        return xp.moveaxis(a_rows.reshape(moved), -1, self.axis)
