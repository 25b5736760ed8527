"""Normalisation over the last (channel) axis: LayerNorm (GPT-2) and RMSNorm (Llama, Qwen3)."""

from __future__ import annotations

from .module import Module, Parameter
from .. import backend, parallel


class _RowNorm(Module):
    """Normalise each row of the last axis: xhat = (x - centre) * rstd, y = xhat * w (+ b).

    LayerNorm centres on the row's mean, RMSNorm does not (``centred``). Rows are split
    into chunks over every core (``numpygpt.parallel``); the weight gradients are summed per
    chunk and the chunks' sums added in chunk order, so the result does not depend on the
    number of threads. Any leading shape works: (B, T, C), or (B, T, NH, hs) per head.
    """

    centred = True

    def forward(self, x):
        xp = backend.array_module(x)
        C = x.shape[-1]
        x_rows = xp.ascontiguousarray(x).reshape(-1, C)  # (N, C)
        xhat = xp.empty_like(x_rows)
        rstd = xp.empty((x_rows.shape[0], 1), dtype=x.dtype)  # (N, 1)
        y = xp.empty_like(x_rows)
        w, b = self.weight.data, self.bias.data if self.bias is not None else None

        def rows(start, stop):
            xc, xh, yc, r = x_rows[start:stop], xhat[start:stop], y[start:stop], rstd[start:stop]
            # every pass in place into xhat and y (y is scratch until its last two lines)
            if self.centred:
                xp.subtract(xc, xc.mean(axis=-1, keepdims=True), out=xh)  # x - mean
            else:
                xh[...] = xc
            xp.multiply(xh, xh, out=yc)
            var = yc.mean(axis=-1, keepdims=True)  # biased variance (LayerNorm), mean square (RMSNorm)
            xp.divide(1.0, xp.sqrt(var + self.eps), out=r)
            xh *= r  # xhat
            xp.multiply(xh, w, out=yc)
            if b is not None:
                yc += b

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
        want_w = self.weight.requires_grad
        want_b = self.bias is not None and self.bias.requires_grad

        def rows(start, stop):
            dy, xh, r = dout_rows[start:stop], xhat[start:stop], rstd[start:stop]
            dxc = dx[start:stop]
            tmp = xp.empty_like(dy)  # the chunk's one scratch array
            xp.multiply(dy, w, out=dxc)  # g = dL/dxhat, in dx's memory
            xp.multiply(dxc, xh, out=tmp)
            m2 = tmp.mean(axis=-1, keepdims=True)  # mean(g * xhat)
            if self.centred:
                dxc -= dxc.mean(axis=-1, keepdims=True)  # g - mean(g)
            xp.multiply(xh, m2, out=tmp)
            dxc -= tmp
            dxc *= r  # dx = r (g [- mean(g)] - xhat mean(g xhat))
            dw = db = None
            if want_w:  # frozen: no partial sums for a gradient nobody keeps
                xp.multiply(dy, xh, out=tmp)
                dw = tmp.sum(axis=0)
            if want_b:
                db = dy.sum(axis=0)
            return dw, db  # this chunk's dw, db

        partials = parallel.for_rows(rows, dout_rows)
        if want_w:
            self.weight.add_grad(_sum_in_order(p[0] for p in partials))
        if want_b:
            self.bias.add_grad(_sum_in_order(p[1] for p in partials))
        return dx.reshape(cache["xhat"].shape)


class LayerNorm(_RowNorm):
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


class RMSNorm(_RowNorm):
    r"""$y = \hat{x} \odot w$, with $\hat{x} = x\, r$ and $r = 1 / \sqrt{\operatorname{mean}(x^2) + \epsilon}$ (Llama, Qwen3).

    LayerNorm without the centring and the shift: only the row's scale is normalised.
    Qwen3's QK-norm is this layer on (B, T, NH, hs) queries and keys, with a weight of
    size hs shared by every head.

    Backward, per row of C values, with $g = dy \odot w$ (the gradient reaching $\hat{x}$):
    since $\partial r / \partial x_j = -r^3 x_j / C$,

    $$\frac{\partial \hat{x}_i}{\partial x_j} = r\, \delta_{ij} - x_i\, \frac{r^3 x_j}{C}
    = r \left( \delta_{ij} - \frac{\hat{x}_i \hat{x}_j}{C} \right),$$

    $$dw = \sum_{\text{rows}} dy \odot \hat{x}, \qquad
    dx = r \left( g - \hat{x} \odot \operatorname{mean}(g \odot \hat{x}) \right).$$

    LayerNorm's $dx$ without its $-\operatorname{mean}(g)$ term: no mean was subtracted.
    """

    centred = False
    bias = None

    def __init__(self, dim: int, eps: float = 1e-6, dtype="float32"):
        self.eps = float(eps)
        self.weight = Parameter(backend.xp.ones((dim,), dtype=dtype))


def _sum_in_order(arrays):
    """a0 + a1 + ... as a fresh array, in the order given (deterministic)."""
    it = iter(arrays)
    total = next(it).copy()
    for a in it:
        total += a
    return total
