"""The code each of issue 22's speed changes replaced, kept to measure against
(``bench_ops.py``), and the inputs both run on: GPT-2 small's shapes (C = 768, 12 heads,
V = 50257, float32) with ``rows`` = B * T tokens.

Each ``case_NAME(rows)`` returns ``(shapes, before, after)``, before and after being
``(prepare, timed)`` pairs (bench_ops.measure). The "before" code is a copy of the library's
code before the change, as it was, and is not used anywhere else.
"""

from __future__ import annotations

import numpy as np

C, NH, V = 768, 12, 50257


def _rng():
    return np.random.default_rng(0)


# -- OutputHead.backward's dx GEMM --------------------------------------------------------------

def case_head(rows: int):
    from numpygpt.nn import OutputHead, Parameter

    rng = _rng()
    W = Parameter(rng.standard_normal((V, C), dtype=np.float32) * 0.02)
    x = rng.standard_normal((1, rows, C), dtype=np.float32)
    G = rng.standard_normal((1, rows, V), dtype=np.float32) * 1e-4
    now, old = OutputHead(W), OutputHead(W)
    old.TRANSPOSED_DX_ROWS = 0  # before: dx = dlogits @ W at every row count

    def pair(head):
        return (lambda: head(x)), (lambda: head.backward(G))

    return f"OutputHead backward, ({rows}, {V}) x ({V}, {C})", pair(old), pair(now)


# -- GELU: forward and backward in place --------------------------------------------------------

def _gelu_class_before():
    import math

    from numpygpt.nn import GELU

    k = math.sqrt(2.0 / math.pi)

    class GELUBefore(GELU):
        @staticmethod
        def _forward_chunk(xp, x, t, y):
            xp.tanh(k * (x + 0.044715 * x * x * x), out=t)
            xp.multiply(0.5 * x, 1.0 + t, out=y)

        @staticmethod
        def _backward_chunk(xp, x, t, dout, dx):
            du_dx = k * (1.0 + 3.0 * 0.044715 * x * x)
            dydx = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du_dx
            xp.multiply(dout, dydx, out=dx)

    return GELUBefore


def _fwd_bwd(layer, x, dy):
    def run():
        layer(x)
        layer.backward(dy)

    return None, run


def case_gelu(rows: int):
    from numpygpt.nn import GELU

    rng = _rng()
    x = rng.standard_normal((rows, 4 * C), dtype=np.float32)
    dy = rng.standard_normal((rows, 4 * C), dtype=np.float32)
    return f"GELU forward + backward, ({rows}, {4 * C})", _fwd_bwd(_gelu_class_before()(), x, dy), _fwd_bwd(GELU(), x, dy)


# -- LayerNorm: forward and backward into their outputs ------------------------------------------

def _layernorm_before(eps: float = 1e-5):
    """LayerNorm's forward and backward as they were: a temporary array per product."""
    from numpygpt import parallel

    state = {}

    def forward(x, w, b):
        xhat, rstd, y = np.empty_like(x), np.empty((x.shape[0], 1), x.dtype), np.empty_like(x)

        def rows(start, stop):
            xc = x[start:stop]
            xc = xc - xc.mean(axis=-1, keepdims=True)
            var = (xc * xc).mean(axis=-1, keepdims=True)
            np.divide(1.0, np.sqrt(var + eps), out=rstd[start:stop])
            np.multiply(xc, rstd[start:stop], out=xhat[start:stop])
            np.multiply(xhat[start:stop], w, out=y[start:stop])
            y[start:stop] += b

        parallel.for_rows(rows, x)
        state.update(xhat=xhat, rstd=rstd)
        return y

    def backward(dout, w):
        xhat, rstd, dx = state["xhat"], state["rstd"], np.empty_like(dout)

        def rows(start, stop):
            dy, xh = dout[start:stop], xhat[start:stop]
            g = dy * w
            dxc = dx[start:stop]
            np.subtract(g, g.mean(axis=-1, keepdims=True), out=dxc)
            dxc -= xh * (g * xh).mean(axis=-1, keepdims=True)
            dxc *= rstd[start:stop]
            return (dy * xh).sum(axis=0), dy.sum(axis=0)

        partials = parallel.for_rows(rows, dout)
        return dx, partials

    return forward, backward


def case_layernorm(rows: int):
    from numpygpt.nn import LayerNorm

    rng = _rng()
    x = rng.standard_normal((rows, C), dtype=np.float32)
    dy = rng.standard_normal((rows, C), dtype=np.float32)
    w, b = np.ones(C, np.float32), np.zeros(C, np.float32)
    fwd, bwd = _layernorm_before()

    def before():
        fwd(x, w, b)
        bwd(dy, w)

    layer = LayerNorm(C)
    return f"LayerNorm forward + backward, ({rows}, {C})", (None, before), _fwd_bwd(layer, x, dy)


# -- AdamW: numexpr, measured and not taken -------------------------------------------------------

def _numexpr_adamw_step(opt) -> None:
    """One AdamW step as three numexpr expressions a parameter (numexpr's own threads, whole
    arrays): m, v, then p, each one pass over memory."""
    import numexpr

    from numpygpt.optim import adamw_hyper

    opt.step_count += 1
    for group in opt.param_groups:
        for key, p in zip(group["names"], group["params"]):
            st = opt.state.setdefault(key, {"step": 0})
            st["step"] += 1
            if "exp_avg" not in st:
                st["exp_avg"], st["exp_avg_sq"] = np.zeros_like(p.data), np.zeros_like(p.data)
            lr, eps, wd, b1, b2, bc1, bc2_sqrt = adamw_hyper(group, st["step"])
            f = p.data.dtype.type  # constants in the parameter's dtype: no float64 pass
            env = dict(m=st["exp_avg"], v=st["exp_avg_sq"], g=p.grad, d=p.data, b1=f(b1), c1=f(1 - b1), b2=f(b2),
                       c2=f(1 - b2), decay=f(1 - lr * wd), a=f(lr * bc2_sqrt / bc1), e=f(eps * bc2_sqrt))
            numexpr.evaluate("b1 * m + c1 * g", local_dict=env, out=env["m"])
            numexpr.evaluate("b2 * v + c2 * g * g", local_dict=env, out=env["v"])
            numexpr.evaluate("decay * d - a * m / (sqrt(v) + e)", local_dict=env, out=env["d"])


def case_adamw_numexpr(rows: int):
    """numpygpt's AdamW ("before": cache-sized chunks on numpygpt's threads, 13 in-place ufunc
    passes a chunk) against numexpr ("after"), on a GPT-2 small embedding and 4 MLP matrices
    (rows is not used)."""
    from numpygpt.nn import Parameter
    from numpygpt.optim import AdamW

    def make():
        rng = _rng()
        params = [Parameter(rng.standard_normal(s, dtype=np.float32)) for s in [(V, C)] + [(C, 4 * C)] * 4]
        for q in params:
            q.grad = rng.standard_normal(q.shape, dtype=np.float32)
        return AdamW(params, lr=1e-3, weight_decay=0.1)

    ours, theirs = make(), make()
    return "AdamW step, 48M parameters", (None, ours.step), (None, lambda: _numexpr_adamw_step(theirs))
