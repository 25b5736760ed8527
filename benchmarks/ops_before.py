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
