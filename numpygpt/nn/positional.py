"""Sinusoidal positional encoding (Vaswani et al. 2017): fixed, no parameters."""

from __future__ import annotations

from .module import Module
from .. import backend


def sinusoidal_table(length: int, dim: int, dtype="float64"):
    r"""(length, dim) table on the current device, computed in float64 and cast to ``dtype``:
    $PE_{p, 2i} = \sin(p / 10000^{2i/\text{dim}})$ and $PE_{p, 2i+1} = \cos(p / 10000^{2i/\text{dim}})$."""
    xp = backend.xp
    pos = xp.arange(length, dtype="float64")[:, None]  # (L, 1)
    pair = xp.arange(dim) // 2  # i for columns 2i and 2i+1
    angle = pos / xp.power(10000.0, 2.0 * pair / dim)[None, :]  # (L, C)
    return xp.where(xp.arange(dim) % 2 == 0, xp.sin(angle), xp.cos(angle)).astype(dtype)


class SinusoidalPositionalEncoding(Module):
    r"""$y_{b,t} = x_{b,t} + PE_{\text{start} + t}$, with the paper's fixed table (``sinusoidal_table``).

    PE does not depend on x and has no parameters, so $\partial y / \partial x$ is the
    identity and $dx = dout$: the gradient passes through untouched. ``start`` offsets the
    positions, for generation that feeds one new token at a time after ``start`` cached ones.
    """

    def __init__(self, dim: int, max_length: int, dtype="float32"):
        self.dim, self.max_length = int(dim), int(max_length)
        self.table = sinusoidal_table(self.max_length, self.dim, dtype)  # (L, C)

    def forward(self, x, start: int = 0):
        B, T, C = x.shape
        if start + T > self.max_length:
            raise ValueError(f"positions up to {start + T} asked for; the table holds {self.max_length}")
        self._save(shape=x.shape)
        return x + self.table[start:start + T].astype(x.dtype, copy=False)  # (B, T, C)

    def backward(self, dout):
        self._take()  # the contract: one backward per cached forward
        # y = x + PE
        return dout
