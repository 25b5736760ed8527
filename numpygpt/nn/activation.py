"""Element-wise activations (GELU) and the softmax.

On the CPU each runs over chunks of rows on every core (``numpygpt.parallel``): a row's
result never depends on the other rows, so the chunked result is the whole-array one,
bit for bit.
"""

from __future__ import annotations

import math

from .module import Module
from .. import backend, parallel

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)  # a Python float: keeps the array's dtype


class GELU(Module):
    r"""GPT-2's tanh approximation: $y = \tfrac{1}{2} x (1 + \tanh u)$, $u = \sqrt{2/\pi}\,(x + 0.044715\, x^3)$.

    Backward (product rule, $\tanh' = 1 - \tanh^2$), element by element:

    $$\frac{\partial y}{\partial x} = \tfrac{1}{2} \left(1 + \tanh u\right)
    + \tfrac{1}{2}\, x \left(1 - \tanh^2 u\right) \sqrt{2/\pi}\, \left(1 + 3 \cdot 0.044715\, x^2\right)$$

    and the input gradient is the upstream one times it: $dx = dy \odot \partial y / \partial x$.
    """

    def forward(self, x):
        xp = backend.array_module(x)
        x = xp.ascontiguousarray(x)
        t, y = xp.empty_like(x), xp.empty_like(x)
        x_flat, t_flat, y_flat = x.reshape(-1), t.reshape(-1), y.reshape(-1)

        def rows(start, stop):
            xc, tc = x_flat[start:stop], t_flat[start:stop]
            xp.tanh(_SQRT_2_OVER_PI * (xc + 0.044715 * xc * xc * xc), out=tc)
            xp.multiply(0.5 * xc, 1.0 + tc, out=y_flat[start:stop])

        parallel.for_rows(rows, x_flat)
        self._save(x=x, t=t)
        return y

    def backward(self, dout):
        cache = self._take()
        x, t = cache["x"], cache["t"]
        xp = backend.array_module(dout)
        dout = xp.ascontiguousarray(dout)
        dx = xp.empty_like(dout)
        x_flat, t_flat, dout_flat, dx_flat = (a.reshape(-1) for a in (x, t, dout, dx))

        def rows(start, stop):
            xc, tc = x_flat[start:stop], t_flat[start:stop]
            du_dx = _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * xc * xc)
            dydx = 0.5 * (1.0 + tc) + 0.5 * xc * (1.0 - tc * tc) * du_dx
            xp.multiply(dout_flat[start:stop], dydx, out=dx_flat[start:stop])

        parallel.for_rows(rows, dout_flat)
        return dx


class Softmax(Module):
    r"""$y = \exp(x - \max x) \,/\, \sum \exp(x - \max x)$ along ``axis``.

    Backward: the Jacobian is $\partial y_i / \partial x_j = y_i (\delta_{ij} - y_j)$, that is
    $\operatorname{diag}(y) - y y^\top$, so

    $$dx_i = \sum_j dy_j\, y_j (\delta_{ij} - y_i) = y_i \Big( dy_i - \sum_j dy_j\, y_j \Big),
    \qquad dx = y \odot \big( dy - \operatorname{sum}(dy \odot y) \big).$$

    Entries with $y = 0$ (masked, $-\infty$ scores) get exactly zero gradient.
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
