"""Linear layers: y = x @ W + b with W stored (in, out) as in GPT-2's checkpoints, and the
language-model head logits = x @ W.T with W (V, C), the token embedding's layout."""

from __future__ import annotations

import math

from .module import Module, Parameter, normal_init
from .. import backend


class Linear(Module):
    r"""$y = x W + b$.

    Backward, with x and dy flattened to (N, in) and (N, out): from
    $y_{nj} = \sum_i x_{ni} W_{ij} + b_j$,

    $$dx = dy\, W^\top \ \ (N, \text{in}), \qquad dW = x^\top dy \ \ (\text{in}, \text{out}),
    \qquad db = \sum_n dy_n \ \ (\text{out})$$
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype="float32",
                 std: float = 0.02, seed: int | None = None):
        self.weight = Parameter(normal_init((in_features, out_features), std, dtype, seed))  # GPT-2's N(0, 0.02)
        self.bias = Parameter(backend.xp.zeros((out_features,), dtype=dtype)) if bias else None

    def forward(self, x):
        *lead, C_in = x.shape
        x2 = x.reshape(-1, C_in)  # (N, in)
        y = x2 @ self.weight.data  # (N, out)
        if self.bias is not None:
            y += self.bias.data
        self._save(x2=x2, lead=tuple(lead))
        return y.reshape(*lead, -1)

    def backward(self, dout):
        cache = self._take()
        x2 = cache["x2"]
        dy = dout.reshape(x2.shape[0], -1)  # (N, out)
        if self.weight.requires_grad:
            self.weight.add_grad(x2.T @ dy)  # (in, out)
        if self.bias is not None and self.bias.requires_grad:
            self.bias.add_grad(dy.sum(axis=0))  # (out,)
        dx = dy @ self.weight.data.T  # (N, in)
        return dx.reshape(*cache["lead"], -1)


def uniform_fan_in(p: Parameter, fan_in: int, rng) -> None:
    """p ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's default for ``nn.Linear``'s weight
    (``kaiming_uniform_(a=sqrt(5))`` gives that bound) and bias; drawn on the host in
    float32 from ``rng`` and moved to p's device and dtype."""
    bound = 1.0 / math.sqrt(fan_in)
    w = rng.uniform(-bound, bound, p.shape).astype("float32")
    p.data, p.grad = backend.to_device(w, dtype=p.dtype, device_name=backend.device_of(p.data)), None


def init_like_torch(layer: Linear, rng) -> None:
    """A Linear as ``torch.nn.Linear`` starts out: weight, then bias, U(+-1/sqrt(in_features))."""
    fan_in = layer.weight.shape[0]  # weights are stored (in, out)
    uniform_fan_in(layer.weight, fan_in, rng)
    if layer.bias is not None:
        uniform_fan_in(layer.bias, fan_in, rng)


class OutputHead(Module):
    r"""$\text{logits} = x W^\top$ with W (V, C): the token embedding itself when weights are tied.

    Backward: $dx = d\text{logits}\; W$, $\ dW = d\text{logits}^\top x$.

    With few rows (N < ``TRANSPOSED_DX_ROWS``) dx is computed as $(W^\top d\text{logits}^\top)^\top$,
    the same product: OpenBLAS on two threads ran $G W$ with G (N, V), a short (N, 50257) by
    long (50257, 768) product, at 32-97 GFLOP/s for N = 256 and 512 and its transposed form at
    117-192 (3-4x faster), while from N = 1024 up $G W$ was the faster form (1.2-1.6x;
    benchmarks/RESULTS.md, the OutputHead section of issue 22).
    """

    TRANSPOSED_DX_ROWS = 1024

    def __init__(self, weight: Parameter):
        self.weight = weight

    def forward(self, x):
        B, T, C = x.shape
        x2 = x.reshape(B * T, C)
        self._save(x2=x2, BT=(B, T))
        return (x2 @ self.weight.data.T).reshape(B, T, -1)  # (B, T, V)

    def backward(self, dout):
        cache = self._take()
        x2, (B, T), V = cache["x2"], cache["BT"], self.weight.shape[0]
        if tuple(dout.shape) != (B, T, V):
            raise ValueError(f"dlogits has shape {tuple(dout.shape)}; the forward pass made logits {(B, T, V)}")
        d2 = dout.reshape(B * T, V)
        if self.weight.requires_grad:
            self.weight.add_grad(d2.T @ x2)  # (V, C)
        W = self.weight.data  # (V, C)
        if B * T < self.TRANSPOSED_DX_ROWS:
            return (W.T @ d2.T).T.reshape(B, T, -1)  # dx = (W^T dlogits^T)^T (B, T, C)
        return (d2 @ W).reshape(B, T, -1)  # dx = dlogits W (B, T, C)
