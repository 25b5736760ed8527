"""What a recipe trains for: the loss of a batch, and its backward through the model.

``train_model`` knows nothing about language modelling, classes or preferences: it asks an
*objective* for the mean loss of a batch and for its backward, so every recipe (pretraining,
the classifier, instruction tuning, DPO, translation) runs in the same loop with the same
checkpoints, Ctrl-C, resume, accumulation and MPI. An objective has

    loss(model, batch)        -> 0-d array on the model's device: the batch's mean loss. It
                                 runs the forward and keeps what backward needs (under
                                 ``no_grad`` it only evaluates).
    backward(model, scale)    -> None: backpropagates ``scale * dloss`` through the model,
                                 adding into every trainable parameter's ``.grad``.
    count(batch)              -> int: what a step "sees" (tokens, or examples), for the history.
    split(batch, comm)        -> (this rank's rows of the batch, its weight): the weights of the
                                 ranks add up to 1, so the ranks' weighted losses add up to the
                                 whole batch's mean.

A batch is whatever the recipe's loader yields: ``(inputs, targets)`` for the language model
and the classifier; a tuple or dict of arrays whose first axis is the batch's rows otherwise.
"""

from __future__ import annotations

from .nn import CrossEntropyLoss, FusedLinearCrossEntropy, OutputHead

__all__ = ["NextTokenObjective", "FusedNextTokenObjective", "ClassifierObjective", "split_rows"]


def split_rows(batch, comm):
    """This rank's equal share of every array of ``batch`` (a tuple, list or dict of arrays with
    the batch's rows first), and the weight 1/N. One process: the batch itself, weight 1."""
    if comm is None or comm.world_size == 1:
        return batch, 1.0
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    B = first.shape[0]
    comm.check_batch_size(B)
    rows = slice(comm.rank * (B // comm.world_size), (comm.rank + 1) * (B // comm.world_size))
    if isinstance(batch, dict):
        return {k: v[rows] for k, v in batch.items()}, 1.0 / comm.world_size
    return type(batch)(v[rows] for v in batch), 1.0 / comm.world_size


class NextTokenObjective:
    """Cross-entropy of ``model(inputs)`` against ``targets``: the language model's loss
    (logits (B, T, V), targets (B, T), ``ignore_index`` targets left out of the mean), and
    just as well a classifier's (logits (B, K), labels (B,)).

    Under MPI each rank takes its rows of the batch, weighted by its share of the batch's
    counted targets, so the summed loss is the mean over every counted target of the batch.
    """

    perplexity = True  # the loop logs exp(val loss) beside the losses

    def __init__(self, loss_fn=None):
        self.loss_fn = loss_fn if loss_fn is not None else CrossEntropyLoss()

    def loss(self, model, batch):
        inputs, targets = batch
        logits = model(inputs)  # (B, T, V) for a language model, (B, K) for a classifier
        return self.loss_fn(logits, targets)

    def backward(self, model, scale: float = 1.0) -> None:
        model.backward(self.loss_fn.backward(scale))  # dlogits -> every parameter's .grad

    def count(self, batch) -> int:
        return int(batch[0].size)  # tokens

    def split(self, batch, comm):
        if comm is None or comm.world_size == 1:
            return batch, 1.0
        inputs, targets, weight = comm.shard(batch[0], batch[1], getattr(self.loss_fn, "ignore_index", None))
        return (inputs, targets), weight


class FusedNextTokenObjective(NextTokenObjective):
    """The language model's next-token loss, as NextTokenObjective computes it, with the head
    and the cross-entropy fused (``numpygpt.nn.FusedLinearCrossEntropy``): the model runs up
    to its final hidden states (``model.forward_hidden``), the fused op makes the loss, dh
    and the head's dW chunk by chunk of rows, and ``model.backward_hidden(dh)`` takes the
    gradient down from there. The (B, T, V) logits and their gradient never exist whole.

    Any model with ``forward_hidden(idx)``, ``backward_hidden(dh)`` and a plain
    ``OutputHead`` as ``model.head`` works. A head with a LoRA adapter, or a classifier,
    is refused: use NextTokenObjective there. ``chunk_rows``: rows per chunk (default:
    as many as make ``numpygpt.nn.fused_loss.CHUNK_BYTES`` of logits).
    """

    def __init__(self, ignore_index: int = -100, chunk_rows: int | None = None):
        super().__init__(CrossEntropyLoss(ignore_index))  # its ignore_index serves ``split``
        self.chunk_rows = chunk_rows
        self.fused = None  # the op of the last loss, holding what backward needs

    def loss(self, model, batch):
        inputs, targets = batch
        head = getattr(model, "head", None)
        if type(head) is not OutputHead:  # a LoRAOutputHead adds its adapter to the logits
            raise ValueError(f"the fused loss needs a plain OutputHead as the model's head, not "
                             f"{type(head).__name__}: use NextTokenObjective")
        h = model.forward_hidden(inputs)  # (B, T, C)
        self.fused = FusedLinearCrossEntropy(head.weight, self.loss_fn.ignore_index, self.chunk_rows)
        return self.fused(h, targets)

    def backward(self, model, scale: float = 1.0) -> None:
        if self.fused is None:
            raise RuntimeError("FusedNextTokenObjective.backward called before loss")
        model.backward_hidden(self.fused.backward(scale))  # dh -> every parameter below the head


class ClassifierObjective(NextTokenObjective):
    """The classifier's loss is the same cross-entropy, over (B, K) logits and (B,) labels;
    what a step sees is counted in examples, as the book's ``examples_seen``; a perplexity of
    class predictions means nothing, so none is logged."""

    perplexity = False

    def count(self, batch) -> int:
        return int(batch[0].shape[0])  # examples
