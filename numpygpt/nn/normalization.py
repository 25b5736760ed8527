"""Layer normalisation over the last (channel) axis."""

from __future__ import annotations

from .module import Module, Parameter
from .. import backend, parallel


class LayerNorm(Module):
    r"""$y = \hat{x} \odot w + b$, with $\hat{x} = (x - \mu)\, r$ and $r = 1 / \sqrt{\sigma^2 + \epsilon}$.

    Per row of C channels, $\mu$ is the row's mean and $\sigma^2$ its variance, the biased
    one (divide by C), as in GPT-2; $\hat{x}$ is ``xhat`` in the code and $r$ is ``rstd``.

    Backward, per row, with $g = dy \odot w$ (the gradient reaching $\hat{x}$):

    $$dw = \sum_{\text{rows}} dy \odot \hat{x}, \qquad db = \sum_{\text{rows}} dy$$

    $$dx = r \left( g - \operatorname{mean}(g) - \hat{x} \odot \operatorname{mean}(g \odot \hat{x}) \right)$$

    The two means come from $\hat{x}$'s dependence on the row's mean and variance:
    $\partial \mu / \partial x_j = 1/C$ and $\partial r / \partial x_j = -r^2 \hat{x}_j / C$, so

    $$\frac{\partial \hat{x}_i}{\partial x_j} = r \left( \delta_{ij} - \frac{1}{C} \right)
    - \frac{r}{C}\, \hat{x}_i \hat{x}_j, \qquad dx_j = \sum_i g_i \frac{\partial \hat{x}_i}{\partial x_j}.$$

    On the CPU the rows are split into chunks over every core (``numpygpt.parallel``);
    dw and db are summed per chunk and the chunks' sums added in chunk order, so the
    result does not depend on the number of threads.
    """

    def __init__(self, dim: int, eps: float = 1e-5, dtype="float32"):
        xp = backend.xp
        self.eps = float(eps)
        self.weight = Parameter(xp.ones((dim,), dtype=dtype))
        self.bias = Parameter(xp.zeros((dim,), dtype=dtype))

    def forward(self, x):
        xp = backend.array_module(x)
        C = x.shape[-1]
        x_rows = xp.ascontiguousarray(x).reshape(-1, C)  # (N, C)
        xhat = xp.empty_like(x_rows)
        rstd = xp.empty((x_rows.shape[0], 1), dtype=x.dtype)  # (N, 1)
        y = xp.empty_like(x_rows)
        w, b = self.weight.data, self.bias.data

        def rows(start, stop):
            xc = x_rows[start:stop] - x_rows[start:stop].mean(axis=-1, keepdims=True)
            var = (xc * xc).mean(axis=-1, keepdims=True)  # biased variance
            xp.divide(1.0, xp.sqrt(var + self.eps), out=rstd[start:stop])
            xp.multiply(xc, rstd[start:stop], out=xhat[start:stop])
            xp.multiply(xhat[start:stop], w, out=y[start:stop])
            y[start:stop] += b

        parallel.for_rows(rows, x_rows)
        self._save(xhat=xhat.reshape(x.shape), rstd=rstd.reshape(*x.shape[:-1], 1))
        return y.reshape(x.shape)

    def backward(self, dout):
        cache = self._take()
        C = cache["xhat"].shape[-1]
        xhat, rstd = cache["xhat"].reshape(-1, C), cache["rstd"].reshape(-1, 1)  # (N, C), (N, 1)
        xp = backend.array_module(dout)
        dout_rows = xp.ascontiguousarray(dout).reshape(-1, C)  # (N, C)
        dx = xp.empty_like(dout_rows)
        w = self.weight.data

        def rows(start, stop):
            dy, xh = dout_rows[start:stop], xhat[start:stop]
            g = dy * w  # dL/dxhat
            dxc = dx[start:stop]
            xp.subtract(g, g.mean(axis=-1, keepdims=True), out=dxc)
            dxc -= xh * (g * xh).mean(axis=-1, keepdims=True)
            dxc *= rstd[start:stop]
            return (dy * xh).sum(axis=0), dy.sum(axis=0)  # this chunk's dw, db

        partials = parallel.for_rows(rows, dout_rows)
        if self.weight.requires_grad:
            self.weight.add_grad(_sum_in_order(p[0] for p in partials))
        if self.bias.requires_grad:
            self.bias.add_grad(_sum_in_order(p[1] for p in partials))
        return dx.reshape(cache["xhat"].shape)


def _sum_in_order(arrays):
    """a0 + a1 + ... as a fresh array, in the order given (deterministic)."""
    it = iter(arrays)
    total = next(it).copy()
    for a in it:
        total += a
    return total
