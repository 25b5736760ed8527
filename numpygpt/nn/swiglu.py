"""SwiGLU feed-forward: Llama's and Qwen3's MLP."""

from __future__ import annotations

from .module import Module
from .linear import Linear
from .activation import SiLU


class SwiGLU(Module):
    r"""The feed-forward of Llama and Qwen3: three linear maps without bias, C -> H -> C.

    Forward, with $a = \operatorname{silu}(g)$:

    $$
    \begin{aligned}
    g &= x W_{\text{gate}}, \quad u = x W_{\text{up}} && (B, T, H) \\
    h &= a \odot u && (B, T, H) \\
    \text{out} &= h\, W_{\text{down}} && (B, T, C)
    \end{aligned}
    $$

    Backward: the product rule on $h$ splits $dh$ between the two branches, and x feeds
    both, so their input gradients add:

    $$
    \begin{aligned}
    dh &= d\text{out}\, W_{\text{down}}^\top, \qquad da = dh \odot u, \qquad du = dh \odot a,
    \qquad dg = \operatorname{silu}'(g) \odot da \\
    dx &= dg\, W_{\text{gate}}^\top + du\, W_{\text{up}}^\top
    \end{aligned}
    $$

    Parameter names are Hugging Face's (``gate_proj``, ``up_proj``, ``down_proj``).
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
