"""Runs that lose nothing: saving, the health check and stopping on signals, in one place.

``train_model`` owns one ``Checkpointer``. After every optimiser step it asks it to save when
one is due and whether a stop was requested; at the end it saves (or, without a checkpoint
path, only checks) once more. Every save first checks the weights: finite, and a finite loss
on one batch, so a checkpoint that is written is always a good one and a bad update never
replaces a good save. A stop request (Ctrl-C, SIGTERM through ``stop_on_signals``) ends the
run after the step in progress, saved, with ``TrainingInterrupted`` saying how far it got.
"""

from __future__ import annotations

import math
import os
import signal
import threading
from contextlib import contextmanager

from . import backend, checkpoint
from .nn import eval_mode, no_grad

__all__ = ["TrainingInterrupted", "TrainingDivergedError", "StopRequest", "stop_on_signals", "diverged_error",
           "Checkpointer", "first_batch"]


class TrainingInterrupted(Exception):
    """Training stopped at a step boundary because a stop was requested (Ctrl-C, SIGTERM):
    ``step`` steps are done and, when the run checkpoints, saved in ``checkpoint``."""

    def __init__(self, message: str, step: int, checkpoint=None, signum: int | None = None):
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint
        self.signum = signum


class TrainingDivergedError(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite."""

    def __init__(self, message: str, step: int, loss: float):
        super().__init__(message)
        self.step = step
        self.loss = loss


class StopRequest:
    """Set by ``stop_on_signals``'s handler; ``train_model(stop_requested=...)`` polls it
    after every step. Calling it returns the signal number asked to stop (None: go on)."""

    def __init__(self):
        self.signum = None

    def __call__(self):
        return self.signum


@contextmanager
def stop_on_signals(signals=(signal.SIGINT, signal.SIGTERM)):
    """Within this block the first SIGINT/SIGTERM asks the training loop to stop after the
    step in progress (it saves a checkpoint and raises TrainingInterrupted); a second one
    raises KeyboardInterrupt at once (a save in progress then leaves the previous
    checkpoint as it was). Yields the StopRequest to pass as ``stop_requested``.
    Outside the main thread signals cannot be caught: the request then never fires."""
    request = StopRequest()

    def handler(signum, frame):
        if request.signum is not None:
            raise KeyboardInterrupt
        request.signum = signum
        # os.write, not print: a handler that prints while the loop prints can raise
        # "reentrant call" on the buffered stream
        os.write(2, f"\nnumpygpt: {signal.Signals(signum).name}: stopping after this step and saving a "
                    "checkpoint (press Ctrl-C again to quit at once)\n".encode())

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def diverged_error(what: str, value, step: int, epoch: int, checkpoint_path, last_saved, after_update: bool = False):
    """The TrainingDivergedError for a non-finite ``what`` (loss, gradient norm...) at ``step``,
    naming the last good checkpoint if one was written."""
    if after_update:
        msg = (f"training diverged: the {what} is {value} after step {step} (epoch {epoch + 1}); "
               "these weights were not saved")
    else:
        msg = (f"training diverged: the {what} is {value} at step {step} (epoch {epoch + 1}); "
               "stopped before updating the weights")
    if checkpoint_path is not None and last_saved is not None:
        msg += f"; the last good checkpoint is {checkpoint_path} (step {last_saved})"
    elif checkpoint_path is not None:
        msg += "; no checkpoint had been written yet"
    msg += ". Try a lower learning rate or gradient clipping."
    return TrainingDivergedError(msg, step=step, loss=value if isinstance(value, float) else math.nan)


def first_batch(loader):
    """The first batch of the loader's epoch 0 (our DataLoader is asked for it directly)."""
    if hasattr(loader, "epoch_batches"):
        return next(iter(loader.epoch_batches(0, 0)))
    return next(iter(loader))


class Checkpointer:
    """Saves ``model``, ``optimizer`` and the run's ``state`` (a TrainState) to ``path``.

    path: the checkpoint file, None to save nothing (the ranks other than 0 of an MPI run,
    or a run without checkpoints; the health check still runs at the end). every: also
    save every ``every`` steps. objective, loader: the health check's loss on one batch.
    stop_requested: polled after every step (``stop_on_signals``'s StopRequest).
    resumed: the model holds ``state``'s step as saved there. total_steps: for the messages.
    """

    def __init__(self, path, model, optimizer, state, objective, loader, every: int | None = None,
                 stop_requested=None, resumed: bool = False, total_steps: int = 0):
        self.path, self.every, self.stop_requested, self.total_steps = path, every, stop_requested, total_steps
        self.model, self.optimizer, self.state = model, optimizer, state
        self.objective, self.loader = objective, loader
        self.last_saved = state.global_step if resumed else None

    def diverged(self, what: str, value, after_update: bool = False, step: int | None = None):
        """The TrainingDivergedError for a non-finite ``what`` at ``step`` (default: the last one done)."""
        step = self.state.global_step if step is None else step
        return diverged_error(what, value, step, self.state.epoch, self.path, self.last_saved, after_update)

    def problem(self):
        """None if every weight is finite and the loss of the loader's first batch (eval mode,
        no gradients, so the dropout generator is untouched) is finite; else (what, value).
        One host sync for the weights, one for the loss."""
        model = self.model
        params = model.parameters()
        if params:
            xp = backend.array_module(params[0].data)
            if not bool(xp.stack([xp.isfinite(p.data).all() for p in params]).all()):
                bad = next(name for name, p in model.named_parameters() if not bool(xp.isfinite(p.data).all()))
                return f"weight {bad}", "non-finite"
        with eval_mode(model), no_grad():
            loss = float(self.objective.loss(model, first_batch(self.loader)))
        return None if math.isfinite(loss) else ("loss at the updated weights", loss)

    def check_health(self) -> None:
        """The weights the optimiser just made must be finite and give a finite loss, or the
        run stops here: nothing non-finite is saved or returned as trained."""
        problem = self.problem()
        if problem is not None:
            raise self.diverged(problem[0], problem[1], after_update=True)

    def save(self) -> None:
        self.check_health()  # a checkpoint always holds finite weights with a finite loss
        state = self.state
        if hasattr(self.loader, "state_dict"):
            state.loader_state = self.loader.state_dict()
        try:
            checkpoint.save_checkpoint(self.path, self.model, self.optimizer, step=state.global_step,
                                       extra=state.to_dict())
        except OSError as e:  # a full disk: say what is still on it
            before = (f"the previous checkpoint (step {self.last_saved}) is unchanged" if self.last_saved is not None
                      else "no checkpoint was written")
            raise OSError(e.errno, f"cannot write checkpoint {self.path} at step {state.global_step}: "
                                   f"{e.strerror or e}; {before}") from e
        self.last_saved = state.global_step

    def after_step(self, comm) -> None:
        """Save when due; stop (saved) when asked: every rank stops after the same step."""
        step = self.state.global_step
        if self.path is not None and self.every and step % self.every == 0:
            self.save()
        if self.stop_requested is None:
            return
        signum = comm.any_stop(self.stop_requested())
        if signum:
            raise self.interrupted(signum)

    def interrupted(self, signum) -> TrainingInterrupted:
        """Save (when the run checkpoints and has not just saved) and describe where it stands."""
        step, total = self.state.global_step, self.total_steps
        if self.path is not None and self.last_saved != step:
            self.save()
        name = (signal.Signals(signum).name if isinstance(signum, int) and not isinstance(signum, bool)
                else "a stop request")
        msg = f"stopped by {name} after step {step} of {total}"
        msg += (f"; checkpoint {self.path} holds step {step}" if self.path is not None
                else "; no checkpoint path was given, nothing was saved")
        return TrainingInterrupted(msg, step=step, checkpoint=self.path,
                                   signum=signum if isinstance(signum, int) else None)

    def finish(self) -> None:
        """The run's last save; without a checkpoint path, its last health check: a run that
        ends with non-finite weights or loss is not a success."""
        step = self.state.global_step
        if self.last_saved == step:
            return
        if self.path is not None:
            self.save()
        elif step > 0:
            self.check_health()
