r"""LoRA: a frozen linear layer plus a trainable low-rank update (the book's appendix E).

$$y = x W + b + \frac{\alpha}{r}\, (x A) B, \qquad
A \ (\text{in}, r), \quad B \ (r, \text{out}), \quad r = \text{rank}$$

A is drawn U(-1/sqrt(rank), 1/sqrt(rank)) (what the book's ``kaiming_uniform_(A, a=sqrt(5))``
gives for an (in, rank) tensor, whose fan-in is rank) and B is zeros, so a fresh adapter
adds exactly 0: the wrapped model computes what it computed before. The scale is
alpha / rank (the book's later printings; the first used alpha alone).

``splits=S`` gives S independent adapters over S equal column blocks of W. GPT-2's fused
``c_attn`` (C, 3C) packs Q | K | V side by side, so ``splits=3`` is the book's separate
adapters on ``W_query``, ``W_key`` and ``W_value``. The parameters carry the split as a
leading axis, always (S = 1 included):

    lora_A  (S, in, rank)        lora_B  (S, rank, out / S)

and the base layer's own parameters keep their names (``c_attn.weight``, ``c_attn.bias``),
so a LoRA model's state dict is the plain model's plus ``*.lora_A`` / ``*.lora_B``.
"""

from __future__ import annotations

import math
import numbers

from .linear import Linear, OutputHead
from .module import Parameter
from .. import backend


class LowRankAdapter:
    r"""The adapter's math, shared by LoRALinear and LoRAOutputHead.

    Forward over rows x (N, in), split k covering output columns $[k o, (k+1) o)$, $o = \text{out} / S$,
    with $s = \alpha / r$:

    $$
    \begin{aligned}
    u_k &= s\, x A_k && (N, r) \\
    \delta_{:,\, \text{cols}_k} &= u_k B_k && (N, o)
    \end{aligned}
    $$

    Backward with dy (N, out), $dy_k$ its column block k:

    $$
    \begin{aligned}
    dB_k &= u_k^\top dy_k = s\, (x A_k)^\top dy_k && (r, o) \\
    g_k &= s\, dy_k B_k^\top = \partial L / \partial (x A_k) && (N, r) \\
    dA_k &= x^\top g_k && (\text{in}, r) \\
    dx &\mathrel{+}= \textstyle\sum_k g_k A_k^\top && (N, \text{in})
    \end{aligned}
    $$

    Every split goes through one 2-D matmul each way: the $A_k$ side by side are
    A_flat (in, S rank), u is (N, S rank), and the $B_k$ sit on the diagonal of a zero
    B_diag (S rank, out), so u @ B_diag sends split k's update to its own columns only
    and dy @ B_diag^T gives every $g_k$ at once. (Batched matmuls over strided (S, N, .)
    views would skip BLAS in NumPy: ~10x slower here. The zero blocks cost S times the
    adapter's few FLOPs, which stay tiny next to the base layer's.)
    """

    def _init_adapter(self, in_features: int, out_features: int, rank: int, alpha: float, splits: int,
                      seed, like) -> None:
        rank, splits = _positive_int("rank", rank), _positive_int("splits", splits)
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")
        if out_features % splits != 0:
            raise ValueError(f"{out_features} output features do not split into {splits} equal blocks")
        self.rank, self.alpha, self.splits = rank, float(alpha), splits
        self.scaling = self.alpha / rank
        self.merged = False
        bound = 1.0 / math.sqrt(rank)
        host_A = backend.host_rng(seed).uniform(-bound, bound, (splits, in_features, rank)).astype("float32")
        where = dict(dtype=like.dtype, device_name=backend.device_of(like))
        self.lora_A = Parameter(backend.to_device(host_A, **where))  # (S, in, rank)
        xp = backend.array_module(like)
        self.lora_B = Parameter(xp.zeros((splits, rank, out_features // splits), dtype=like.dtype))  # (S, rank, o)

    def _A_flat(self):
        S, n_in, r = self.lora_A.shape
        if S == 1:
            return self.lora_A.data[0]  # (in, rank)
        return self.lora_A.data.transpose(1, 0, 2).reshape(n_in, S * r)  # (in, S rank)

    def _B_diag(self):
        S, r, o = self.lora_B.shape
        if S == 1:
            return self.lora_B.data[0]  # (rank, out)
        xp = backend.array_module(self.lora_B.data)
        B_diag = xp.zeros((S * r, S * o), dtype=self.lora_B.dtype)
        k = xp.arange(S)
        B_diag.reshape(S, r, S, o)[k, :, k, :] = self.lora_B.data  # block k at rows k r.., columns k o..
        return B_diag  # (S rank, out)

    def _adapter_forward(self, x2):
        """x2 (N, in) -> (delta (N, out), u (N, S rank) for backward)."""
        u = x2 @ self._A_flat()  # (N, S r)
        u *= self.scaling
        return u @ self._B_diag(), u  # (N, out)

    def _adapter_backward(self, x2, u, dy):
        """dy (N, out) -> the adapter's share of dx (N, in); adds into dA and dB."""
        S, r, o = self.lora_B.shape
        # delta = u @ B_diag
        if self.lora_B.requires_grad:
            dB_diag = u.T @ dy  # (S r, out); only the diagonal blocks are B's
            k = backend.array_module(dy).arange(S)
            self.lora_B.add_grad(dB_diag.reshape(S, r, S, o)[k, :, k, :])  # (S, r, o)
        g = dy @ self._B_diag().T  # (N, S r)
        g *= self.scaling
        # u = s * x @ A_flat
        if self.lora_A.requires_grad:
            n_in = x2.shape[1]
            dA_flat = x2.T @ g  # (in, S r)
            self.lora_A.add_grad(dA_flat.reshape(n_in, S, r).transpose(1, 0, 2).copy())  # (S, in, r)
        return g @ self._A_flat().T  # (N, in)

    def delta_weight(self):
        r"""$s\, [A_1 B_1 \mid \dots \mid A_S B_S]$: (in, out), what the adapter adds to an (in, out) weight."""
        S, n_in, _ = self.lora_A.shape
        blocks = self.lora_A.data @ self.lora_B.data  # (S, in, o)
        delta = blocks.transpose(1, 0, 2).reshape(n_in, -1)  # (in, out)
        delta *= self.scaling
        return delta

    def _add_adapter_dx(self, dx, cache: dict, dout):
        """dx (..., in) of the base layer plus the adapter's share, for the forward that made ``cache``."""
        if "u" not in cache:  # that forward ran merged: the adapter was inside W
            if self.lora_A.requires_grad or self.lora_B.requires_grad:
                raise RuntimeError("this LoRA layer was merged into its weight, so its adapters cannot train: "
                                   "call unmerge_lora(model) (or layer.unmerge()) before training")
            return dx
        x2 = cache["x2"]  # (N, in)
        dx += self._adapter_backward(x2, cache["u"], dout.reshape(x2.shape[0], -1)).reshape(dx.shape)
        return dx


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise ValueError(f"LoRA {name} must be a positive integer, got {value!r}")
    return int(value)


class LoRALinear(Linear, LowRankAdapter):
    r"""A Linear whose weight and bias are frozen, plus a trainable low-rank adapter:
    $y = x W + b + (\alpha / r)\, (x A) B$ (see LowRankAdapter for the backward).

    ``base``'s Parameters are shared, not copied, and frozen (requires_grad False): the
    base backward skips its dW matmul and computes only $dx = dy\, W^\top$. Unfreeze
    ``layer.weight`` to train it as well.
    """

    def __init__(self, base: Linear, rank: int, alpha: float, splits: int = 1, seed: int | None = None):
        if isinstance(base, LowRankAdapter):
            raise ValueError("this layer already has a LoRA adapter: LoRA cannot be applied twice")
        if not isinstance(base, Linear):
            raise TypeError(f"LoRALinear wraps a Linear, got {type(base).__name__}")
        self.weight, self.bias = base.weight, base.bias
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad, p.grad = False, None
        n_in, n_out = self.weight.shape  # (in, out)
        self._init_adapter(n_in, n_out, rank, alpha, splits, seed, like=self.weight.data)
        self.training = base.training

    def forward(self, x):
        y = Linear.forward(self, x)  # x @ W + b; keeps x2 for backward
        if self.merged:
            return y
        x2 = x.reshape(-1, self.weight.shape[0])  # (N, in)
        delta, u = self._adapter_forward(x2)  # (N, out)
        if self._cache is not None:
            self._cache["u"] = u
        y += delta.reshape(y.shape)
        return y

    def backward(self, dout):
        cache = getattr(self, "_cache", None) or {}  # Linear.backward takes (and checks) it
        dx = Linear.backward(self, dout)  # dy @ W^T (and dW, db if unfrozen)
        return self._add_adapter_dx(dx, cache, dout)

    def merge(self) -> None:
        r"""$W \mathrel{+}= s A B$: the adapter folded into the weight; forward then skips it (inference)."""
        if not self.merged:
            self.weight.data += self.delta_weight()
            self.merged = True

    def unmerge(self) -> None:
        r"""$W \mathrel{-}= s A B$: undo merge (equal to the weight before it up to float rounding)."""
        if self.merged:
            self.weight.data -= self.delta_weight()
            self.merged = False


class LoRAOutputHead(OutputHead, LowRankAdapter):
    r"""The language-model head with a frozen W (V, C) and a trainable adapter:
    $\text{logits} = x W^\top + (\alpha / r)\, (x A) B$, A (1, C, rank), B (1, rank, V).

    Merging adds the adapter's (C, V) update transposed: $W \mathrel{+}= (s A B)^\top$. Do not wrap a head
    tied to the token embedding if you mean to merge: the embedding would change too.
    """

    def __init__(self, base: OutputHead, rank: int, alpha: float, seed: int | None = None):
        if isinstance(base, LowRankAdapter):
            raise ValueError("this layer already has a LoRA adapter: LoRA cannot be applied twice")
        if not isinstance(base, OutputHead):
            raise TypeError(f"LoRAOutputHead wraps an OutputHead, got {type(base).__name__}")
        self.weight = base.weight
        self.weight.requires_grad, self.weight.grad = False, None
        V, C = self.weight.shape
        self._init_adapter(C, V, rank, alpha, 1, seed, like=self.weight.data)
        self.training = base.training

    def forward(self, x):
        logits = OutputHead.forward(self, x)  # x @ W^T; keeps x2 (B T, C)
        if self.merged:
            return logits
        x2 = x.reshape(-1, self.weight.shape[1])  # (B T, C)
        delta, u = self._adapter_forward(x2)  # (B T, V)
        if self._cache is not None:
            self._cache["u"] = u
        logits += delta.reshape(logits.shape)
        return logits

    def backward(self, dout):
        cache = getattr(self, "_cache", None) or {}
        dx = OutputHead.backward(self, dout)  # dlogits @ W
        return self._add_adapter_dx(dx, cache, dout)

    def merge(self) -> None:
        if not self.merged:
            self.weight.data += self.delta_weight().T
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self.weight.data -= self.delta_weight().T
            self.merged = False
