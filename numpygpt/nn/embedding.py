"""Embedding lookup: a table of rows indexed by token (or position) id."""

from __future__ import annotations

from .module import Module, Parameter, normal_init
from .. import backend


class Embedding(Module):
    r"""$\text{out}[b, t] = W[\text{ids}[b, t]]$.

    The lookup is linear in W with a one-hot selector, so the gradient of row v is
    the sum of dout over every position that looked v up:

    $$dW[v] = \sum_{(b, t)\,:\ \text{ids}[b, t] = v} \text{dout}[b, t]$$

    Repeated ids must all count, which is a scatter-add (backend.scatter_add_rows),
    not ``dW[ids] += dout`` (that keeps one repeat only). There is no gradient with
    respect to the integer ids, so backward returns None.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype="float32",
                 std: float = 0.02, seed: int | None = None):
        self.weight = Parameter(normal_init((num_embeddings, embedding_dim), std, dtype, seed))

    def forward(self, ids):
        self._save(ids=ids)
        return self.weight.data[ids]  # (*ids.shape, C)

    def backward(self, dout):
        ids = self._take()["ids"]
        if self.weight.requires_grad:
            C = dout.shape[-1]
            # dW is all zeros but for the rows looked up: scatter straight into .grad
            backend.scatter_add_rows(self.weight.grad_buffer(), ids.reshape(-1), dout.reshape(-1, C))
        return None
