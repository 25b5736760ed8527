"""The training loop: the book's ``train_model_simple`` with appendix D's extras.

    history = train_model(model, train_loader, val_loader, optimizer, num_epochs=10,
                          eval_freq=5, eval_iter=5, start_context="Every effort moves you")

One optimiser step is::

    zero_grad
    for each of grad_accum_steps micro-batches:
        loss = cross_entropy(model(x), y)
        model.backward(dloss * 1/grad_accum_steps)   # grads add up to the mean's gradient
    clip_grad_norm (optional); lr = scheduler(step) (optional); optimizer.step()

Every ``eval_freq`` steps the mean loss over ``eval_iter`` training and validation
batches is logged, and each epoch ends with a greedy sample from ``start_context``.
A non-finite loss stops the run with ``TrainingDivergedError`` before the weights are
touched and before any checkpoint is written, so the last checkpoint is a good one.

Checkpoints record where the run is (epoch, batch inside the epoch, step, tokens seen,
the history so far); together with the weights, the optimiser state and the dropout
generator that ``save_checkpoint`` stores, ``resume_state=load_checkpoint(...)``
continues a run so that it computes exactly the losses the uninterrupted run would
have (on CPU; the data loader's epoch orders depend only on its seed and the epoch).
"""

from __future__ import annotations

import itertools
import math
import sys

from . import backend
from .nn import CrossEntropyLoss, no_grad

__all__ = [
    "TrainingDivergedError",
    "calc_loss_batch",
    "calc_loss_loader",
    "evaluate_model",
    "train_model",
    "plot_losses",
    "perplexity",
]


class TrainingDivergedError(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite."""

    def __init__(self, message: str, step: int, loss: float):
        super().__init__(message)
        self.step = step
        self.loss = loss


# -- losses ------------------------------------------------------------------------------

def calc_loss_batch(model, loss_fn, inputs, targets):
    """Mean cross-entropy of one batch: inputs, targets (B, T) host or device ids.

    Returns the loss as a 0-d array on the model's device (no host sync here), with
    the loss function's cache ready for ``loss_fn.backward()`` unless under no_grad.
    """
    device = model.device
    inputs = backend.to_device(inputs, device_name=device)  # (B, T)
    targets = backend.to_device(targets, device_name=device)  # (B, T)
    logits = model(inputs)  # (B, T, V)
    return loss_fn(logits, targets)


def _batches(loader, epoch: int = 0, start: int = 0):
    """Batches of ``loader``'s epoch ``epoch`` from batch ``start`` on.

    Our DataLoader is asked for that epoch directly, so its epoch counter does not
    move; any other iterable of (inputs, targets) is simply iterated.
    """
    if hasattr(loader, "epoch_batches"):
        return loader.epoch_batches(epoch, start)
    return itertools.islice(iter(loader), start, None)


def calc_loss_loader(model, loss_fn, loader, num_batches: int | None = None) -> float:
    """Mean batch loss over the first ``num_batches`` batches (all if None) of ``loader``.

    NaN for an empty loader, as in the book. Evaluation always reads epoch 0's order,
    so successive evaluations measure the same batches (comparable numbers, and
    evaluating never changes what training sees). One host sync at the end.
    """
    n = len(loader)
    if n == 0:
        return float("nan")
    num_batches = n if num_batches is None else min(int(num_batches), n)
    total = None
    with no_grad():
        for x, y in itertools.islice(_batches(loader), num_batches):
            loss = calc_loss_batch(model, loss_fn, x, y)
            total = loss if total is None else total + loss
    return float(total) / num_batches


def evaluate_model(model, train_loader, val_loader, eval_iter: int) -> tuple[float, float]:
    """(train loss, val loss) over ``eval_iter`` batches each, in eval mode (no dropout);
    the model goes back to the mode it was in."""
    loss_fn = CrossEntropyLoss()
    was_training = model.training
    model.eval()
    try:
        train_loss = calc_loss_loader(model, loss_fn, train_loader, eval_iter)
        val_loss = calc_loss_loader(model, loss_fn, val_loader, eval_iter)
    finally:
        model.train(was_training)
    return train_loss, val_loss


def perplexity(loss: float) -> float:
    """exp(loss), inf instead of an OverflowError for huge losses."""
    if math.isnan(loss):
        return float("nan")
    return math.exp(loss) if loss < 700.0 else float("inf")


def _sample(model, start_context: str, max_new_tokens: int, tokenizer=None) -> str:
    """A greedy continuation of ``start_context`` (eval mode, no gradients), one line."""
    from .generate import generate_text

    was_training = model.training
    model.eval()
    try:
        with no_grad():
            text = generate_text(model, start_context, max_new_tokens, tokenizer=tokenizer,
                                 temperature=0.0)
    finally:
        model.train(was_training)
    return text.replace("\n", " ")  # compact print format, as in the book


# -- the loop ------------------------------------------------------------------------------

def new_history() -> dict:
    return {
        "train_losses": [],        # at each evaluation: mean loss over eval_iter train batches
        "val_losses": [],          # ... and over eval_iter validation batches
        "perplexities": [],        # exp(val loss)
        "track_tokens_seen": [],   # training tokens consumed at each evaluation
        "track_steps": [],         # optimiser steps done at each evaluation
        "step_losses": [],         # the training loss of every optimiser step
        "lrs": [],                 # the learning rate of every optimiser step
        "global_step": 0,          # optimiser steps done
        "tokens_seen": 0,
        "epoch": 0,                # the epoch in progress (= epochs completed)
        "batch_in_epoch": 0,       # micro-batches of that epoch already consumed
    }


def _is_finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))


def train_model(model, train_loader, val_loader, optimizer, num_epochs: int, eval_freq: int,
                eval_iter: int, start_context: str | None = None, tokenizer=None,
                grad_accum_steps: int = 1, max_grad_norm: float | None = None, scheduler=None,
                checkpoint_path=None, checkpoint_every: int | None = None, resume_state=None,
                progress: bool = True, sample_tokens: int = 50, log=print,
                max_steps: int | None = None, extra: dict | None = None, comm=None) -> dict:
    """Train ``model`` and return the history dict (see ``new_history`` for its keys).

    num_epochs: passes over ``train_loader``; ``max_steps`` stops earlier (optimiser steps).
    eval_freq, eval_iter: evaluate after step 1, 1 + eval_freq, ... over eval_iter batches.
    grad_accum_steps: micro-batches per optimiser step; an epoch has
        ``len(train_loader) // grad_accum_steps`` steps (leftover micro-batches are skipped).
    max_grad_norm: clip the global gradient norm (None: no clipping).
    scheduler: ``scheduler(step) -> lr`` for the 0-based step about to be taken.
    checkpoint_path, checkpoint_every: save every ``checkpoint_every`` steps and at the end.
    resume_state: ``load_checkpoint(path, model, optimizer)``'s result: continue that run.
    log: where messages go; the default ``print`` is routed through tqdm.write so the
        progress bar stays intact. extra: more JSON-able entries for the checkpoint.
    comm: a ``distributed.Communicator`` (default ``distributed.init()``: MPI under
        mpiexec, else this process alone). Each rank trains on its share of every batch
        and the gradients are summed over the ranks before clipping; rank 0 alone logs,
        evaluates, samples and saves (the others wait at the next all-reduce).
    """
    if num_epochs < 0 or eval_freq < 1 or eval_iter < 1 or grad_accum_steps < 1:
        raise ValueError("need num_epochs >= 0, eval_freq >= 1, eval_iter >= 1 and grad_accum_steps >= 1")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    n_batches = len(train_loader)
    steps_per_epoch = n_batches // grad_accum_steps
    if steps_per_epoch == 0:
        raise ValueError(
            f"the training loader has {n_batches} batches, fewer than grad_accum_steps="
            f"{grad_accum_steps}: not even one optimiser step fits in an epoch"
        )
    total_steps = num_epochs * steps_per_epoch
    if max_steps is not None:
        total_steps = min(total_steps, int(max_steps))

    from tqdm.auto import tqdm

    from . import distributed

    comm = distributed.init() if comm is None else comm

    def emit(msg: str) -> None:
        if not comm.is_main:
            return
        if log is print:
            tqdm.write(msg)  # prints above the bar instead of through it
        elif log is not None:
            log(msg)

    history = new_history()
    if resume_state is not None:
        history = _resume_history(resume_state, train_loader)
    global_step = history["global_step"]
    tokens_seen = history["tokens_seen"]
    epoch, batch = history["epoch"], history["batch_in_epoch"]
    last_saved = global_step if resume_state is not None else None
    comm.begin_training(model, batch_size=getattr(train_loader, "batch_size", None), step=global_step,
                        plan=(n_batches, grad_accum_steps, total_steps, epoch, batch))

    def save() -> None:
        from .checkpoint import save_checkpoint

        nonlocal last_saved
        if not comm.is_main:
            last_saved = global_step
            return
        history.update(global_step=global_step, tokens_seen=tokens_seen, epoch=epoch, batch_in_epoch=batch)
        state = dict(extra or {})
        state.update(
            history=history,
            epoch=epoch,
            batch_in_epoch=batch,
            tokens_seen=tokens_seen,
            global_step=global_step,
            grad_accum_steps=grad_accum_steps,
            loader_state=train_loader.state_dict() if hasattr(train_loader, "state_dict") else None,
        )
        save_checkpoint(checkpoint_path, model, optimizer, step=global_step, extra=state)
        last_saved = global_step

    loss_fn = CrossEntropyLoss()
    model.train()
    # When stderr is a log file rather than a terminal, redraw seldom: each redraw is a line.
    interactive = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    bar = tqdm(total=total_steps, initial=min(global_step, total_steps), disable=not (progress and comm.is_main),
               unit="step", dynamic_ncols=True, mininterval=0.5 if interactive else 30.0,
               file=sys.stderr)
    batches = None
    try:
        while global_step < total_steps and epoch < num_epochs:
            if batches is None:
                if hasattr(train_loader, "set_epoch"):
                    train_loader.set_epoch(epoch)  # so its state_dict names the epoch in progress
                batches = _batches(train_loader, epoch, batch)

            # one optimiser step over grad_accum_steps micro-batches
            model.zero_grad()
            loss_sum, step_tokens = None, 0
            for _ in range(grad_accum_steps):
                x, y = next(batches)
                step_tokens += int(x.size)
                # this rank's rows; weight: their share of the batch's counted targets (1 alone)
                x, y, weight = comm.shard(x, y, loss_fn.ignore_index)
                if weight == 0.0:
                    continue  # every target of my rows is ignored: I add nothing
                loss = calc_loss_batch(model, loss_fn, x, y)
                model.backward(loss_fn.backward(weight / grad_accum_steps))
                loss = loss if weight == 1.0 else loss * weight
                loss_sum = loss if loss_sum is None else loss_sum + loss
            # gradients and loss summed over the ranks; the one host sync of the step
            step_loss = comm.sum_gradients(model, 0.0 if loss_sum is None else loss_sum) / grad_accum_steps
            if not _is_finite(step_loss):
                raise _diverged("loss", step_loss, global_step + 1, epoch, checkpoint_path, last_saved)
            if max_grad_norm is not None:
                from .optim import clip_grad_norm

                norm = clip_grad_norm(model, max_grad_norm)
                if not _is_finite(norm):
                    raise _diverged("gradient norm", norm, global_step + 1, epoch, checkpoint_path, last_saved)
            if scheduler is not None:
                optimizer.lr = scheduler(global_step)
            history["lrs"].append(float(optimizer.lr))
            optimizer.step()

            global_step += 1
            batch += grad_accum_steps
            tokens_seen += step_tokens
            history["step_losses"].append(step_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{optimizer.lr:.2e}", refresh=False)

            if comm.is_main and (global_step - 1) % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, eval_iter)
                ppl = perplexity(val_loss)
                history["train_losses"].append(train_loss)
                history["val_losses"].append(val_loss)
                history["perplexities"].append(ppl)
                history["track_tokens_seen"].append(tokens_seen)
                history["track_steps"].append(global_step)
                emit(f"Ep {epoch + 1} (step {global_step:6d}/{total_steps}): train loss {train_loss:.3f}, "
                     f"val loss {val_loss:.3f}, val perplexity {ppl:.1f}")

            if batch + grad_accum_steps > n_batches:  # the epoch is over
                if start_context and comm.is_main:
                    emit(f"Ep {epoch + 1} sample: {_sample(model, start_context, sample_tokens, tokenizer)}")
                epoch, batch, batches = epoch + 1, 0, None

            if checkpoint_path is not None and checkpoint_every and global_step % checkpoint_every == 0:
                save()
    finally:
        bar.close()

    comm.check_same_weights(model)  # still in step (a no-op for one process)
    if start_context and batch > 0 and global_step > 0 and comm.is_main:
        # stopped inside an epoch (max_steps): still show what the model does now
        emit(f"Ep {epoch + 1} sample (step {global_step}): "
             f"{_sample(model, start_context, sample_tokens, tokenizer)}")
    history.update(global_step=global_step, tokens_seen=tokens_seen, epoch=epoch, batch_in_epoch=batch)
    if checkpoint_path is not None and last_saved != global_step:
        save()
    return history


def _diverged(what: str, value: float, step: int, epoch: int, checkpoint_path, last_saved):
    msg = (f"training diverged: the {what} is {value} at step {step} (epoch {epoch + 1}); "
           "stopped before updating the weights")
    if checkpoint_path is not None and last_saved is not None:
        msg += f"; the last good checkpoint is {checkpoint_path} (step {last_saved})"
    elif checkpoint_path is not None:
        msg += "; no checkpoint had been written yet"
    msg += ". Try a lower learning rate or gradient clipping."
    return TrainingDivergedError(msg, step=step, loss=value)


def _resume_history(resume_state: dict, train_loader) -> dict:
    """The history and position stored by train_model's checkpoints, checked."""
    extra = resume_state.get("extra") or {}
    if "history" not in extra or "epoch" not in extra or "batch_in_epoch" not in extra:
        raise ValueError("the checkpoint holds no training position (epoch, batch, history): "
                         "was it written by train_model?")
    history = new_history()
    history.update({k: v for k, v in extra["history"].items() if k in history})
    history.update(
        global_step=int(resume_state.get("step", extra.get("global_step", 0))),
        tokens_seen=int(extra.get("tokens_seen", history["tokens_seen"])),
        epoch=int(extra["epoch"]),
        batch_in_epoch=int(extra["batch_in_epoch"]),
    )
    for key, value in history.items():
        if isinstance(value, list):
            history[key] = list(value)
    if extra.get("loader_state") and hasattr(train_loader, "load_state_dict"):
        train_loader.load_state_dict(extra["loader_state"])  # raises if the data differ
    return history


# -- plotting ------------------------------------------------------------------------------

def plot_losses(history: dict, path) -> None:
    """Train and validation loss against steps, tokens seen on a second x-axis (PNG).

    Uses matplotlib's object API with the Agg canvas and never touches pyplot, so
    it neither needs a display nor switches the backend of a notebook that imports us.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = history["track_steps"]
    per_step = history.get("step_losses") or []
    if per_step:
        ax.plot(range(1, len(per_step) + 1), per_step, color="tab:blue", alpha=0.25, linewidth=0.8,
                label="Training loss (each step)")
    ax.plot(steps, history["train_losses"], color="tab:blue", marker=".", label="Training loss")
    ax.plot(steps, history["val_losses"], color="tab:orange", linestyle="-.", marker=".",
            label="Validation loss")
    ax.set_xlabel("Steps")
    ax.set_ylabel("Loss")
    ax.legend(loc="upper right")
    n_steps, n_tokens = history.get("global_step", 0), history.get("tokens_seen", 0)
    if n_steps and n_tokens:
        # every step sees the same number of tokens, so tokens = steps * tokens_per_step
        # and the top axis is the bottom one relabelled
        per = n_tokens / n_steps
        top = ax.secondary_xaxis("top", functions=(lambda s: s * per, lambda t: t / per))
        top.set_xlabel("Tokens seen")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
