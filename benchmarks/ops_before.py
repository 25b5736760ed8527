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
