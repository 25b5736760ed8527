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
_GELU_A = 0.044715


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

    In-place form (issue 22: one array op per line, no temporaries, each pass over a chunk
    that stays in cache): with $k = \sqrt{2/\pi}$ and $a = 0.044715$, $u = x\,(k + a k\, x^2)$
    and $y = x\,(\tfrac{1}{2} t + \tfrac{1}{2})$, $t = \tanh u$; in the backward
    $1 - t^2 = (1 - t)(1 + t)$ gives

    $$\frac{\partial y}{\partial x} = (1 + t) \left(\tfrac{1}{2} + (1 - t)\, s\right), \qquad
    s = x \left(\tfrac{1}{2} k + \tfrac{3}{2} a k\, x^2\right),$$

    the same numbers up to float rounding (tests/test_layers.py holds both to the formula above).
    """

    @staticmethod
    def _forward_chunk(xp, x, t, y):
        xp.multiply(x, x, out=y)  # x^2
        y *= _GELU_A * _SQRT_2_OVER_PI
        y += _SQRT_2_OVER_PI
        y *= x  # u = x (k + a k x^2)
        xp.tanh(y, out=t)  # t = tanh u
        xp.multiply(t, 0.5, out=y)
        y += 0.5
        y *= x  # y = x (t/2 + 1/2)

    @staticmethod
    def _backward_chunk(xp, x, t, dout, dx):
        xp.multiply(x, x, out=dx)  # x^2
        dx *= 1.5 * _GELU_A * _SQRT_2_OVER_PI
        dx += 0.5 * _SQRT_2_OVER_PI
        dx *= x  # s = x (k/2 + 3 a k x^2 / 2)
        tmp = xp.subtract(1.0, t)  # 1 - t
        dx *= tmp
        dx += 0.5  # 1/2 + (1 - t) s
        xp.add(t, 1.0, out=tmp)
        dx *= tmp  # dy/dx = (1 + t) (1/2 + (1 - t) s)
        dx *= dout  # dx = dy * dy/dx


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
        xp.subtract(1.0, s, out=dx)  # 1 - sigma, in place: no temporaries
        dx *= x
        dx += 1.0
        dx *= s  # dy/dx = sigma (1 + x (1 - sigma))
        dx *= dout


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
