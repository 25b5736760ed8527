"""Direct Preference Optimization, the book's chapter 7 follow-up: the objective that
``train_model`` minimises, and the metrics a run reports.

    objective = DPOObjective(reference, beta=0.1)          # reference: the policy's frozen copy
    history = train_model(policy, train_loader, val_loader, optimizer, 1, 5, 5,
                          objective=objective, on_evaluate=dpo_metrics_hook(objective, train_loader,
                                                                            val_loader, 5))
    evaluate_dpo(policy, objective, test_loader)  # {"loss", "chosen_reward", "rejected_reward", ...}

A batch is ``collate_preferences``'s dict. The policy runs chosen and rejected as one (2B, T)
batch (one forward, one backward: a model keeps one cache); the reference model gives its
log-probabilities for the same batch once, in eval mode under ``no_grad`` (no KV cache, no
stored activations); ``DPOLoss`` turns both into the loss and the implicit rewards.
"""

from __future__ import annotations

import hashlib

import numpy as np

from .. import backend
from ..nn import eval_mode, is_grad_enabled, no_grad
from ..nn.dpo import DPOLoss, sequence_logprobs
from ..objective import split_rows
from .dpo_data import BATCH_KEYS

__all__ = ["DPOObjective", "evaluate_dpo", "dpo_metrics_hook", "plot_margins", "METRICS"]

METRICS = ("loss", "chosen_reward", "rejected_reward", "margin", "reward_accuracy")


def _stacked(batch):
    """(ids, targets, mask), each (2B, T): the chosen rows, then the rejected rows."""
    return tuple(np.concatenate([batch["chosen" + suffix], batch["rejected" + suffix]])
                 for suffix in ("", "_targets", "_mask"))


class DPOObjective:
    """DPO's loss for ``train_model``: ``loss(model, batch)``, ``backward(model, scale)``,
    ``count(batch)`` (tokens of both halves), ``split(batch, comm)`` (each rank its pairs).

    reference: the frozen reference model (the policy before tuning); it is only ever run
    in eval mode under ``no_grad``, once per batch (its log-probabilities are kept: it must
    not change during the run). beta, reduction: ``DPOLoss``'s. What the last
    no-gradient evaluations measured is remembered per batch (``measured``) until the next
    training step, so the metrics hook reads the rewards of the batches the loop has just
    evaluated instead of running both models over them again.
    """

    perplexity = False  # exp(DPO loss) means nothing: the loop logs no perplexity

    def __init__(self, reference, beta: float = 0.1, reduction: str = "mean"):
        self.reference = reference
        self.loss_fn = DPOLoss(beta, reduction)
        self._measured = {}
        self._reference_logprobs = {}  # batch key -> (2B,): the reference is frozen, so they never change

    @property
    def beta(self) -> float:
        return self.loss_fn.beta

    def reference_logprobs(self, batch):
        """The reference model's sequence log-probabilities (2B,) of a batch: computed once (in
        eval mode, under no_grad, without a cache) and kept, as the frozen reference gives the
        same numbers every time the batch comes back (each evaluation, a health check)."""
        return self._reference_for(batch, _key(batch), *_stacked(batch))

    def _reference_for(self, batch, key: bytes, ids, targets, mask):
        if key not in self._reference_logprobs:
            with eval_mode(self.reference), no_grad():
                logits = self.reference(ids)  # (2B, T, V)
                self._reference_logprobs[key] = sequence_logprobs(logits, targets, mask, self.loss_fn.reduction)
        return self._reference_logprobs[key]

    def loss(self, model, batch):
        ids, targets, mask = _stacked(batch)  # (2B, T) each
        B, key = batch["chosen"].shape[0], _key(batch)
        ref = self._reference_for(batch, key, ids, targets, mask)  # (2B,)
        logits = model(ids)  # (2B, T, V)
        if logits.shape[-1] != self.reference.cfg.vocab_size:
            raise ValueError(f"the reference model's vocabulary ({self.reference.cfg.vocab_size} tokens) is not "
                             f"the policy's ({logits.shape[-1]}): DPO compares the two on the same tokens")
        out = self.loss_fn(logits[:B], logits[B:], targets[:B], targets[B:], mask[:B], mask[B:], ref[:B], ref[B:])
        if is_grad_enabled():
            self._measured.clear()  # a training step: the weights are about to change
        else:
            self._measured[key] = out
        return out.loss

    def backward(self, model, scale: float = 1.0) -> None:
        model.backward(self.loss_fn.backward_stacked(scale))  # (2B, T, V): chosen rows, then rejected

    def count(self, batch) -> int:
        return int(batch["chosen"].size + batch["rejected"].size)  # tokens

    def split(self, batch, comm):
        return split_rows(batch, comm)  # every pair weighs the same: each rank 1/N of the batch's mean

    def measured(self, model, batch):
        """The ``DPOOutput`` of ``batch`` at the current weights: remembered from the last
        evaluation when there was one, else computed now (eval mode, no gradients)."""
        out = self._measured.get(_key(batch))
        if out is None:
            with eval_mode(model), no_grad():
                self.loss(model, batch)
            out = self._measured[_key(batch)]
        return out

    def forget(self, reference: bool = False) -> None:
        """Drop what the last evaluations measured; ``reference``: the reference's kept
        log-probabilities too (a benchmark that times the reference's forward every step)."""
        self._measured.clear()
        if reference:
            self._reference_logprobs.clear()


def _key(batch) -> bytes:
    """A digest of a batch's arrays: the same batch collated twice has the same key."""
    h = hashlib.blake2b(digest_size=16)
    for name in BATCH_KEYS:
        a = np.ascontiguousarray(backend.to_host(batch[name]))
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    return h.digest()


def evaluate_dpo(model, objective: DPOObjective, loader, num_batches: int | None = None,
                 reuse: bool = False) -> dict:
    """The DPO metrics over the first ``num_batches`` batches (all if None) of ``loader``'s
    epoch-0 order: ``loss`` (the mean of the batch losses, as ``calc_loss_loader``), and over
    the pairs the mean ``chosen_reward`` and ``rejected_reward`` (beta * (logp - ref)), the
    mean ``margin`` and the ``reward_accuracy`` (share of pairs whose margin is positive).
    ``reuse``: take what the objective measured in the evaluation just before (the loop's).
    NaN everywhere for an empty loader. One host sync at the end."""
    from ..train import loader_batches

    n = len(loader) if num_batches is None else min(int(num_batches), len(loader))
    if n == 0:
        return {name: float("nan") for name in METRICS}
    sums, pairs = None, 0
    with eval_mode(model), no_grad():
        for i, batch in enumerate(loader_batches(loader)):
            if i == n:
                break
            if not reuse:
                objective.forget()
            out = objective.measured(model, batch)
            xp = backend.array_module(out.loss)
            row = xp.stack([out.loss, out.chosen_rewards.sum(), out.rejected_rewards.sum(),
                            out.margins.sum(), (out.margins > 0).sum().astype(out.margins.dtype)])
            sums = row if sums is None else sums + row
            pairs += len(out.margins)
    values = backend.to_host(sums).tolist()
    return {"loss": values[0] / n, **{name: value / pairs for name, value in zip(METRICS[1:], values[1:])}}


def dpo_metrics_hook(objective: DPOObjective, train_loader, val_loader, eval_iter: int):
    """``on_evaluate`` for ``train_model``: the rewards, margin and reward accuracy over the
    ``eval_iter`` training and validation batches the loop has just evaluated, printed and kept
    in the history (``train_chosen_rewards``, ..., ``val_reward_accs``)."""
    def hook(model, state, say) -> dict:
        metrics = {}
        for split, loader in (("train", train_loader), ("val", val_loader)):
            m = evaluate_dpo(model, objective, loader, eval_iter, reuse=True)
            say(f"    {split:<5}  reward accuracy {m['reward_accuracy']:6.1%}, chosen reward "
                f"{m['chosen_reward']:+.4f}, rejected reward {m['rejected_reward']:+.4f}, margin {m['margin']:+.4f}")
            metrics.update({f"{split}_chosen_rewards": m["chosen_reward"],
                            f"{split}_rejected_rewards": m["rejected_reward"],
                            f"{split}_margins": m["margin"], f"{split}_reward_accs": m["reward_accuracy"]})
        objective.forget()
        return metrics
    return hook


def plot_margins(history: dict, path) -> None:
    """The training and validation reward margins at each evaluation, against steps (PNG)."""
    from ..plots import plot_curves

    plot_curves(path, history["track_steps"], history["train_margins"], history["val_margins"], "Steps",
                "Reward margin")
