"""Where a training run stands: its position in the data, its history, the options it was
started with. A checkpoint's ``extra`` is ``TrainState.to_dict()``; ``from_dict`` reads it
back, checking every field before anything is used, so ``--resume`` continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["HISTORY_LISTS", "TrainState", "new_history"]


HISTORY_LISTS = (
    "train_losses",        # at each evaluation: mean loss over eval_iter train batches
    "val_losses",          # ... and over eval_iter validation batches
    "perplexities",        # exp(val loss)
    "track_tokens_seen",   # training tokens consumed at each evaluation
    "track_steps",         # optimiser steps done at each evaluation
    "step_losses",         # the training loss of every optimiser step
    "lrs",                 # the learning rate of every optimiser step
)
_POSITION = ("global_step", "tokens_seen", "epoch", "batch_in_epoch")


def new_history() -> dict:
    """The history dict ``train_model`` returns: HISTORY_LISTS, plus where the run stands
    (``global_step``, ``tokens_seen``, ``epoch`` in progress, ``batch_in_epoch`` consumed)."""
    return TrainState().history_dict()


@dataclass
class TrainState:
    """Where a training run stands: its position, its history, and the options it was
    started with. A checkpoint's ``extra`` is ``to_dict()``; ``from_dict`` reads it back,
    checking every field (ValueError naming the bad one) before anything is used.

    Keys of the dict: ``global_step``, ``tokens_seen``, ``epoch``, ``batch_in_epoch``,
    ``grad_accum_steps``, ``history`` (the lists and the position again, as
    ``train_model`` returns it), ``loader_state`` (the DataLoader's), ``cli_options``
    (``numpygpt train``'s options), plus any caller entries, kept in ``extra``.
    """

    global_step: int = 0       # optimiser steps done
    tokens_seen: int = 0
    epoch: int = 0             # the epoch in progress (= epochs completed)
    batch_in_epoch: int = 0    # micro-batches of that epoch already consumed
    history: dict = field(default_factory=lambda: {k: [] for k in HISTORY_LISTS})
    grad_accum_steps: int | None = None
    loader_state: dict | None = None
    run_options: dict | None = None  # stored as "cli_options"
    extra: dict = field(default_factory=dict)  # the caller's own JSON-able entries

    def history_dict(self) -> dict:
        out = {k: list(self.history.get(k, [])) for k in HISTORY_LISTS}
        out.update({k: list(v) for k, v in self.history.items() if k not in out})  # a recipe's own metrics
        out.update({k: getattr(self, k) for k in _POSITION})
        return out

    def to_dict(self) -> dict:
        d = dict(self.extra)
        d.update({k: getattr(self, k) for k in _POSITION})
        d.update(history=self.history_dict(), grad_accum_steps=self.grad_accum_steps,
                 loader_state=self.loader_state)
        if self.run_options is not None:
            d["cli_options"] = dict(self.run_options)
        return d

    @classmethod
    def from_dict(cls, d, step: int | None = None) -> "TrainState":
        """Read ``to_dict()``'s output (a checkpoint's ``extra``); ``step``: the checkpoint's own."""
        if not isinstance(d, dict) or "history" not in d or "epoch" not in d or "batch_in_epoch" not in d:
            raise ValueError("the checkpoint holds no training position (epoch, batch, history): "
                             "was it written by train_model?")
        hist = d["history"]
        if not isinstance(hist, dict):
            raise ValueError(f"the checkpoint's training history is a {type(hist).__name__}, not a dict")
        history = {}
        recipe_lists = [k for k, v in hist.items() if k not in HISTORY_LISTS and k not in _POSITION
                        and isinstance(v, list)]  # a recipe's own metrics (accuracies, rewards...)
        for key in (*HISTORY_LISTS, *recipe_lists):
            values = hist.get(key, [])
            if not isinstance(values, list) or not all(_is_number(v) for v in values):
                raise ValueError(f"the checkpoint's training history {key!r} is not a list of numbers")
            history[key] = list(values)
        position = {}
        for key in _POSITION:
            value = step if key == "global_step" and step is not None else d.get(key, hist.get(key, 0))
            position[key] = _count(value, key)
        accum = d.get("grad_accum_steps")
        if accum is not None:
            accum = _count(accum, "grad_accum_steps")
        loader_state, options = d.get("loader_state"), d.get("cli_options")
        for key, value in (("loader_state", loader_state), ("cli_options", options)):
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"the checkpoint's {key!r} is a {type(value).__name__}, not a dict")
        known = set(_POSITION) | {"history", "grad_accum_steps", "loader_state", "cli_options"}
        return cls(history=history, grad_accum_steps=accum, loader_state=loader_state, run_options=options,
                   extra={k: v for k, v in d.items() if k not in known}, **position)

    @classmethod
    def from_checkpoint(cls, ck) -> "TrainState":
        """From ``load_checkpoint``'s dict or a ``checkpoint.Checkpoint`` (or a TrainState)."""
        if isinstance(ck, TrainState):
            return ck
        if isinstance(ck, dict):
            return cls.from_dict(ck.get("extra") or {}, step=ck.get("step"))
        return cls.from_dict(ck.extra, step=ck.step)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"the checkpoint's {name} must be an integer >= 0, got {value!r}")
    return value
