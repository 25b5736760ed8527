"""The frame around every training command (``train``, ``finetune classify``, ``finetune
instruct``, ``finetune dpo``): the output folder, resuming, signals, atomic outputs.

    run = RunFolder("runs/instruct")                  # created, writable, stale temporaries gone
    state = run.resume(model, optimizer, run_options)  # None when there is nothing to resume
    history = run.train(model, train_loader, val_loader, optimizer, resume_hint="... --resume",
                        num_epochs=2, eval_freq=5, eval_iter=5, options=TrainOptions(resume_state=state))
    run.write_json("history.json", history)

Only the main process of an MPI run writes: the others get a RunFolder that checks nothing
and writes nothing, so a recipe needs no ``if rank == 0`` of its own.
"""

from __future__ import annotations

import os
import shlex

from .checkpointer import TrainingInterrupted, stop_on_signals
from .fileio import remove_stale_temps, write_json
from .train import TrainOptions, TrainState, train_model

__all__ = ["RunFolder", "check_same_options", "CHECKPOINT_FILE"]

CHECKPOINT_FILE = "checkpoint.safetensors"


def check_same_options(path, stored: dict, current: dict) -> None:
    """A resumed run must be the run that was saved: every option in both must agree."""
    for key, value in current.items():
        if key in stored and stored[key] != value:
            raise ValueError(f"cannot resume: {path} was trained with {key} {stored[key]!r}, this run has "
                             f"{value!r}: resume with the same options")


class RunFolder:
    """A run's output folder. ``out``: its path (created; an unwritable one fails now, before
    any training, naming ``flag``). ``is_main``: False on the ranks that write nothing."""

    def __init__(self, out, is_main: bool = True, flag: str = "--out"):
        self.out, self.is_main = os.fspath(out), is_main
        if not is_main:
            return
        try:
            os.makedirs(self.out, exist_ok=True)
        except OSError as e:
            raise OSError(f"{flag}: cannot create {self.out!r}: {e.strerror or e}") from e
        if not os.access(self.out, os.W_OK):
            raise PermissionError(f"{flag}: cannot write to {self.out!r}")
        remove_stale_temps(self.checkpoint)  # left by a run killed while it saved

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    @property
    def checkpoint(self) -> str:
        return self.path(CHECKPOINT_FILE)

    def resume(self, model, optimizer, run_options: dict, path=None) -> TrainState:
        """Load the checkpoint (``path``, default this folder's) into ``model`` and ``optimizer``
        (weights, AdamW state, RNG) and return its TrainState, after checking that it was
        written by a run with the same ``run_options``."""
        from .checkpoint import load_checkpoint

        path = os.fspath(path) if path is not None else self.checkpoint
        if not os.path.exists(path):
            raise ValueError(f"cannot resume: there is no {path} (runs write it every --checkpoint-every steps, "
                             "at the end of training and when interrupted)")
        state = TrainState.from_checkpoint(load_checkpoint(path, model, optimizer))
        check_same_options(path, state.run_options or {}, run_options)
        return state

    def train(self, model, train_loader, val_loader, optimizer, num_epochs: int, eval_freq: int, eval_iter: int,
              resume_hint: str | None = None, options: TrainOptions | None = None, **kwargs) -> dict:
        """``train_model`` with Ctrl-C / SIGTERM finishing the step, saving and saying how to go
        on (``resume_hint``: the command that continues the run; default ``--resume CKPT``)."""
        hint = resume_hint or f"numpygpt train --resume {shlex.quote(self.checkpoint)}"
        with stop_on_signals() as stop:
            try:
                return train_model(model, train_loader, val_loader, optimizer, num_epochs, eval_freq, eval_iter,
                                   options=options, stop_requested=stop, **kwargs)
            except TrainingInterrupted as e:
                e.args = (f"{e}\nto continue this run: {hint}",)
                raise

    def write_json(self, name: str, obj, indent: int = 1) -> str:
        """``obj`` as JSON in this folder, written atomically; returns the path."""
        path = self.path(name)
        if self.is_main:
            write_json(path, obj, indent)
        return path

