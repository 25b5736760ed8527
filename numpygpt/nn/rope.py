"""Rotary position embeddings (RoPE), with Llama 3's frequency scaling.

Position enters attention not as a vector added to the input (GPT-2's wpe) but as a
rotation of each query and key: the pair (x1_i, x2_i) of a head at position p turns by
the angle p * f_i. A query at p and a key at p' then meet in q . k through the angle
(p - p') * f_i only: the score depends on their distance, not on where they are.
"""

from __future__ import annotations

import math

from .module import Module
from .. import backend

# the same names LlamaConfig checks (config.py imports no layer, and no layer the config)
ROPE_TYPES = ("default", "llama3")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None):
    r"""The head_dim / 2 angular frequencies $f_i = \theta^{-2i / \text{head\_dim}}$, a float64 host array.

    ``scaling`` with rope_type "llama3" stretches the slow frequencies for a longer context
    than the model was first trained on (``original_max_position_embeddings``, L). With the
    wavelength $\lambda_i = 2\pi / f_i$ and the low and high frequency factors $l$, $h$:

    $$
    f_i \mapsto
    \begin{cases}
    f_i & \lambda_i < L / h \quad \text{(fast, local)} \\
    f_i / \text{factor} & \lambda_i > L / l \quad \text{(slow, global)} \\
    f_i \big( (1 - s) / \text{factor} + s \big), \ \ s = \dfrac{L / \lambda_i - l}{h - l} & \text{in between}
    \end{cases}
    $$

    so the middle band blends the two smoothly (s runs from 0 to 1 across it).
    """
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unknown rope_type {rope_type!r}: numpygpt knows {', '.join(ROPE_TYPES)}")
    freqs = [1.0 / theta ** (i / head_dim) for i in range(0, head_dim, 2)]  # hs/2 numbers: plain floats
    if rope_type == "llama3":
        freqs = [_llama3_scaled(f, **{k: scaling[k] for k in LLAMA3_ROPE_KEYS}) for f in freqs]
    return backend.to_device(freqs, dtype="float64", device_name="cpu")


def _llama3_scaled(f: float, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings) -> float:
    """One frequency under Llama 3's scaling (see rope_frequencies)."""
    L, wavelength = original_max_position_embeddings, 2 * math.pi / f
    if wavelength < L / high_freq_factor:
        return f
    if wavelength > L / low_freq_factor:
        return f / factor
    s = (L / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    return (1 - s) * f / factor + s * f


class RotaryTables:
    """cos(p f_i) and sin(p f_i) for positions p = 0, 1, ..., (P, hs/2) each: computed once
    per dtype and device (in float64, then cast), grown (doubling) when a longer sequence
    comes, and shared by every layer of a model."""

    def __init__(self, frequencies, max_positions: int):
        self.frequencies = frequencies  # (hs/2,) float64, on the host
        self.max_positions = int(max_positions)
        self._tables = {}  # (dtype, array library) -> (cos, sin)

    def get(self, stop: int, xp, dtype):
        """(cos, sin) covering positions [0, stop), in ``dtype`` on xp's device."""
        if stop > self.max_positions:
            raise ValueError(f"position {stop - 1} is beyond the rotary tables' {self.max_positions} positions")
        key = (xp.dtype(dtype).name, xp.__name__)
        tables = self._tables.get(key)
        if tables is None or tables[0].shape[0] < stop:
            have = 0 if tables is None else tables[0].shape[0]
            P = min(self.max_positions, max(stop, 2 * have, 64))
            freqs = xp.asarray(self.frequencies, dtype="float64")
            angles = xp.arange(P, dtype="float64")[:, None] * freqs[None, :]  # (P, hs/2)
            tables = (xp.cos(angles).astype(dtype), xp.sin(angles).astype(dtype))
            self._tables[key] = tables
        return tables


class RoPE(Module):
    r"""Rotate each pair $(x_{1,i}, x_{2,i})$ of a head by the angle $a_i = p f_i$, p its position.

    Hugging Face's half-split pairing: $x_1$ = x[..., :hs/2] and $x_2$ = x[..., hs/2:], so

    $$y_1 = x_1 \cos a - x_2 \sin a, \qquad y_2 = x_2 \cos a + x_1 \sin a$$

    (HF writes this $y = x \cos a + \operatorname{rotate\_half}(x) \sin a$ with
    $\operatorname{rotate\_half}(x) = (-x_2, x_1)$).

    Backward: per pair $y = R(a)\, x$ with $R(a) = \begin{pmatrix} \cos a & -\sin a \\ \sin a & \cos a \end{pmatrix}$,
    linear in x, so $dx = R(a)^\top dy$; a rotation is orthogonal, $R(a)^\top = R(-a)$:

    $$dx_1 = dy_1 \cos a + dy_2 \sin a, \qquad dx_2 = dy_2 \cos a - dy_1 \sin a,$$

    the same rotation by the opposite angle. No parameters; nothing to keep but the
    positions. ``start`` offsets the positions of tokens that follow a KV cache.

    x: (..., T, hs) with the positions on axis -2, e.g. (B, NH, T, hs). The tables are
    shared: one RoPE serves every layer, so the attention layers call ``rotate``
    themselves and keep their own ``start`` (``forward``/``backward`` are for using it
    alone, as the gradient check does).
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: dict | None = None,
                 max_positions: int = 2048):
        if head_dim % 2:
            raise ValueError(f"rotary embeddings pair up a head's dimensions: head_dim must be even, got {head_dim}")
        self.head_dim = head_dim
        self.tables = RotaryTables(rope_frequencies(head_dim, theta, scaling), max_positions)

    def rotate(self, x, start: int = 0, inverse: bool = False):
        """x rotated by +p f_i (inverse: by -p f_i) for positions p = start, start + 1, ...; a new array."""
        xp = backend.array_module(x)
        T, hs = x.shape[-2], x.shape[-1]
        h = hs // 2
        cos, sin = self.tables.get(start + T, xp, x.dtype)
        cos, sin = cos[start:start + T], sin[start:start + T]  # (T, hs/2)
        if inverse:
            sin = -sin  # R(-a) = R(a)^T
        x1, x2 = x[..., :h], x[..., h:]
        y = xp.empty(x.shape, dtype=x.dtype)
        y1, y2 = y[..., :h], y[..., h:]
        xp.multiply(x1, cos, out=y1)
        y1 -= x2 * sin  # y1 = x1 cos - x2 sin
        xp.multiply(x2, cos, out=y2)
        y2 += x1 * sin  # y2 = x2 cos + x1 sin
        return y

    def forward(self, x, start: int = 0):
        self._save(start=start)
        return self.rotate(x, start)

    def backward(self, dout):
        start = self._take()["start"]
        # y = R(p f) x  =>  dx = R(p f)^T dy = R(-p f) dy
        return self.rotate(dout, start, inverse=True)
