"""SwiGLU feed-forward: Llama's and Qwen3's MLP."""

from __future__ import annotations

from .module import Module
from .linear import Linear
from .activation import SiLU


class SwiGLU(Module):
    """mlp(x) = down(silu(gate(x)) * up(x)),  C -> H -> C, three Linear maps without bias.

    Forward, with a = silu(g) and the element-wise product h = a * u:
        g = x W_gate,  u = x W_up             (B, T, H)
        h = silu(g) * u                       (B, T, H)
        out = h W_down                        (B, T, C)
    Backward: the product rule on h splits dh between the two branches,
        dh = dout W_down^T,   da = dh * u,   du = dh * a,   dg = silu'(g) * da
        dx = dg W_gate^T + du W_up^T          (x feeds both branches: the gradients add)
    Parameter names are Hugging Face's (gate_proj, up_proj, down_proj).
    """

    def __init__(self, emb_dim: int, hidden_dim: int, dtype="float32"):
        self.gate_proj = Linear(emb_dim, hidden_dim, bias=False, dtype=dtype)
        self.up_proj = Linear(emb_dim, hidden_dim, bias=False, dtype=dtype)
        self.down_proj = Linear(hidden_dim, emb_dim, bias=False, dtype=dtype)
        self.silu = SiLU()

    def forward(self, x):
        a = self.silu(self.gate_proj(x))  # (B, T, H)
        u = self.up_proj(x)  # (B, T, H)
        self._save(a=a, u=u)
        return self.down_proj(a * u)  # (B, T, C)

    def backward(self, dout):
        cache = self._take()
        a, u = cache["a"], cache["u"]
        # out = h W_down
        dh = self.down_proj.backward(dout)  # (B, T, H)
        # h = a * u
        da, du = dh * u, dh * a
        # a = silu(g), g = x W_gate; u = x W_up
        dg = self.silu.backward(da)
        dx = self.gate_proj.backward(dg)
        dx += self.up_proj.backward(du)
        return dx
