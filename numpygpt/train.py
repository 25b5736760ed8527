"""The training loop: the book's ``train_model_simple`` with appendix D's extras.

    history = train_model(model, train_loader, val_loader, optimizer, num_epochs=10,
                          eval_freq=5, eval_iter=5, start_context="Every effort moves you")

One optimiser step is::

    zero_grad
    for each of grad_accum_steps micro-batches:
        loss = cross_entropy(model(x), y)
        model.backward(dloss * 1/grad_accum_steps)   # grads add up to the mean's gradient
    clip_grad_norm (optional); lr = scheduler(step) (optional); optimizer.step()

Under ``mpiexec -n N`` each rank runs every micro-batch on its B/N rows and the ranks'
gradients are summed (one all-reduce, ``numpygpt.distributed``) before clipping, so N
ranks take the step one process would; rank 0 alone logs, evaluates and saves.

Every ``eval_freq`` steps the mean loss over ``eval_iter`` training and validation
batches is logged, and each epoch ends with a sample from ``start_context`` (greedy
unless ``sampling`` is given).
A non-finite loss stops the run with ``TrainingDivergedError`` before the weights are
touched. An update can also break the weights (a huge learning rate): before every save,
and at the end of a run, the weights are checked to be finite and to give a finite loss
on one batch, so a checkpoint that is written is always a good one, a bad save never
replaces a good one, and a run that ends non-finite raises.

Checkpoints record where the run is (epoch, batch inside the epoch, step, tokens seen,
the history so far); together with the weights, the optimiser state and the dropout
generator that ``save_checkpoint`` stores, ``resume_state=load_checkpoint(...)``
continues a run so that it computes exactly the losses the uninterrupted run would
have (on CPU; the data loader's epoch orders depend only on its seed and the epoch).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

from . import backend, checkpoint
from .nn import CrossEntropyLoss, eval_mode, no_grad
from .optim import clip_grad_norm

__all__ = [
    "TrainingDivergedError",
    "TrainingInterrupted",
    "StopRequest",
    "stop_on_signals",
    "TrainOptions",
    "TrainState",
    "new_history",
    "calc_loss_batch",
    "calc_loss_loader",
    "evaluate_model",
    "loader_batches",
    "forward_backward",
    "diverged_error",
    "train_model",
    "plot_losses",
    "perplexity",
]


class TrainingInterrupted(Exception):
    """Training stopped at a step boundary because a stop was requested (Ctrl-C, SIGTERM):
    ``step`` steps are done and, when the run checkpoints, saved in ``checkpoint``."""

    def __init__(self, message: str, step: int, checkpoint=None, signum: int | None = None):
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint
        self.signum = signum


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


class TrainingDivergedError(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite."""

    def __init__(self, message: str, step: int, loss: float):
        super().__init__(message)
        self.step = step
        self.loss = loss


# -- losses ------------------------------------------------------------------------------

def calc_loss_batch(model, loss_fn, inputs, targets):
    """Mean loss of one batch: ``loss_fn(model(inputs), targets)``.

    inputs, targets: host (NumPy) or device ids, e.g. (B, T) and (B, T). Host ids are
    checked on the host by the model and the loss and moved once, so this makes no
    device-to-host sync. Returns the loss as a 0-d array on the model's device, with
    the loss function's cache ready for ``loss_fn.backward()`` unless under no_grad.
    """
    logits = model(inputs)  # (B, T, V) for a language model
    return loss_fn(logits, targets)


def loader_batches(loader, epoch: int = 0, start: int = 0):
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
        for x, y in itertools.islice(loader_batches(loader), num_batches):
            loss = calc_loss_batch(model, loss_fn, x, y)
            total = loss if total is None else total + loss
    return float(total) / num_batches


def evaluate_model(model, train_loader, val_loader, eval_iter: int) -> tuple[float, float]:
    """(train loss, val loss) over ``eval_iter`` batches each, in eval mode (no dropout);
    the model goes back to the mode it was in."""
    loss_fn = CrossEntropyLoss()
    with eval_mode(model):
        train_loss = calc_loss_loader(model, loss_fn, train_loader, eval_iter)
        val_loss = calc_loss_loader(model, loss_fn, val_loader, eval_iter)
    return train_loss, val_loss


def perplexity(loss: float) -> float:
    """exp(loss), inf instead of an OverflowError for huge losses."""
    if math.isnan(loss):
        return float("nan")
    return math.exp(loss) if loss < 700.0 else float("inf")


def _sample(model, start_context: str, max_new_tokens: int, tokenizer=None, sampling=None) -> str:
    """A continuation of ``start_context`` (eval mode, no gradients), one line: greedy, or
    drawn with ``sampling`` (``generate``'s temperature, top_k, top_p, seed), prefixed
    with the settings in parentheses so that it can be reproduced."""
    from .generate import describe_sampling, generate_text

    sampling = dict(sampling or {})
    with eval_mode(model), no_grad():
        text = generate_text(model, start_context, max_new_tokens, tokenizer=tokenizer, **sampling)
    return f"({describe_sampling(**sampling)}) " + text.replace("\n", " ")  # one line, as in the book


# -- where a run stands ---------------------------------------------------------------

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
        for key in HISTORY_LISTS:
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


# -- the loop ------------------------------------------------------------------------------

@dataclass
class TrainOptions:
    """How ``train_model`` runs, beyond the book's arguments. Every field may also be
    passed to ``train_model`` as a keyword.

    grad_accum_steps: micro-batches per optimiser step; an epoch has
        ``len(train_loader) // grad_accum_steps`` steps (leftover micro-batches are skipped).
    max_grad_norm: clip the global gradient norm (None: no clipping).
    scheduler: ``scheduler(step) -> lr`` for the 0-based step about to be taken.
    max_steps: stop after this many optimiser steps (counted from the run's start).
    checkpoint_path, checkpoint_every: save every ``checkpoint_every`` steps and at the end.
    resume_state: continue a saved run: a TrainState, or ``load_checkpoint``'s result
        (whose weights, optimiser state and RNG are already loaded).
    extra: more JSON-able entries for the checkpoint (kept in ``TrainState.extra``).
    run_options: the options of ``numpygpt train``, stored so --resume can reuse them.
    progress: a tqdm bar on stderr. log: where messages go; the default ``print`` is
        routed through tqdm.write so the bar stays intact; None: silent.
    sample_tokens: length of the samples from ``start_context``.
    sampling: how they are decoded (``generate``'s temperature, top_k, top_p, seed);
        None is greedy, as in the book.
    loss_fn: the loss (default ``CrossEntropyLoss()``); it sees ``model(x)`` and ``y``
        as the loader yields them, so logits (B, K) with targets (B,) work as well.
    reduce_gradients: ``reduce_gradients(model)`` runs after the backward passes of all
        micro-batches and before clipping and the optimiser step (data parallelism:
        average the gradients across processes there).
    is_main_process: False on every process but one in a multi-process run: it then
        logs nothing, draws no bar, evaluates and samples nothing, and saves nothing.
    comm: a ``distributed.Communicator`` (default ``distributed.init()``: MPI under
        mpiexec, else this process alone). Each rank trains on its share of every batch
        and the gradients (and the loss) are summed over the ranks, once a step, before
        clipping; only its rank 0 is a main process. See numpygpt/distributed.py.
    stop_requested: polled after every step (e.g. ``stop_on_signals``'s StopRequest); when
        it returns something true the run saves a checkpoint (when it checkpoints) and
        raises TrainingInterrupted.
    """

    grad_accum_steps: int = 1
    max_grad_norm: float | None = None
    scheduler: object = None
    max_steps: int | None = None
    checkpoint_path: object = None
    checkpoint_every: int | None = None
    resume_state: object = None
    extra: dict | None = None
    run_options: dict | None = None
    progress: bool = True
    log: object = print
    sample_tokens: int = 50
    sampling: dict | None = None
    loss_fn: object = None
    reduce_gradients: object = None
    is_main_process: bool = True
    comm: object = None
    stop_requested: object = None
    keep_freed_memory: bool = True


def train_model(model, train_loader, val_loader, optimizer, num_epochs: int, eval_freq: int,
                eval_iter: int, start_context: str | None = None, tokenizer=None,
                options: TrainOptions | None = None, **kwargs) -> dict:
    """Train ``model`` and return the history dict (see ``new_history`` for its keys).

    num_epochs: passes over ``train_loader`` (``max_steps`` in the options stops earlier).
    eval_freq, eval_iter: evaluate after step 1, 1 + eval_freq, ... over eval_iter batches.
    start_context: the prompt of the sample printed at the end of each epoch.
    options: a TrainOptions; or pass its fields as keywords (``grad_accum_steps=4``...).
    """
    opts = dataclasses.replace(options or TrainOptions(), **kwargs)
    if num_epochs < 0 or eval_freq < 1 or eval_iter < 1 or opts.grad_accum_steps < 1:
        raise ValueError("need num_epochs >= 0, eval_freq >= 1, eval_iter >= 1 and grad_accum_steps >= 1")
    if opts.checkpoint_every is not None and opts.checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {opts.checkpoint_every}")
    accum = opts.grad_accum_steps
    n_batches = len(train_loader)
    steps_per_epoch = n_batches // accum
    if steps_per_epoch == 0:
        raise ValueError(
            f"the training loader has {n_batches} batches, fewer than grad_accum_steps="
            f"{accum}: not even one optimiser step fits in an epoch"
        )
    total_steps = num_epochs * steps_per_epoch
    if opts.max_steps is not None:
        total_steps = min(total_steps, int(opts.max_steps))
    from . import distributed, memory

    if opts.keep_freed_memory:
        memory.keep_freed_memory()

    comm = opts.comm if opts.comm is not None else distributed.init()
    main = opts.is_main_process and comm.is_main
    checkpoint_path = opts.checkpoint_path if main else None

    from tqdm.auto import tqdm

    def emit(msg: str) -> None:
        if not main or opts.log is None:
            return
        if opts.log is print:
            tqdm.write(msg)  # prints above the bar instead of through it
        else:
            opts.log(msg)

    if opts.resume_state is not None:
        state = TrainState.from_checkpoint(opts.resume_state)
        if state.loader_state and hasattr(train_loader, "load_state_dict"):
            train_loader.load_state_dict(state.loader_state)  # raises if the data differ
        last_saved = state.global_step
    else:
        state = TrainState()
        last_saved = None
    state.grad_accum_steps = accum
    if opts.run_options is not None:
        state.run_options = opts.run_options
    state.extra = {**state.extra, **(opts.extra or {})}
    history = state.history
    comm.begin_training(model, batch_size=getattr(train_loader, "batch_size", None),
                        plan=(n_batches, accum, total_steps, state.epoch, state.batch_in_epoch))

    def check_health() -> None:
        """The weights the optimiser just made must be finite and give a finite loss,
        or the run stops here: nothing non-finite is saved or returned as trained."""
        problem = _unhealthy(model, loss_fn, train_loader)
        if problem is not None:
            raise diverged_error(problem[0], problem[1], state.global_step, state.epoch, checkpoint_path, last_saved,
                            after_update=True)

    def save() -> None:
        nonlocal last_saved
        check_health()  # a checkpoint always holds finite weights with a finite loss
        if hasattr(train_loader, "state_dict"):
            state.loader_state = train_loader.state_dict()
        try:
            checkpoint.save_checkpoint(checkpoint_path, model, optimizer, step=state.global_step,
                                       extra=state.to_dict())
        except OSError as e:  # a full disk: say what is still on it
            before = (f"the previous checkpoint (step {last_saved}) is unchanged" if last_saved is not None
                      else "no checkpoint was written")
            raise OSError(e.errno, f"cannot write checkpoint {checkpoint_path} at step {state.global_step}: "
                                   f"{e.strerror or e}; {before}") from e
        last_saved = state.global_step

    loss_fn = opts.loss_fn if opts.loss_fn is not None else CrossEntropyLoss()
    model.train()
    # When stderr is a log file rather than a terminal, redraw seldom: each redraw is a line.
    interactive = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    bar = tqdm(total=total_steps, initial=min(state.global_step, total_steps), disable=not (opts.progress and main),
               unit="step", dynamic_ncols=True, mininterval=0.5 if interactive else 30.0, file=sys.stderr)
    batches = None
    try:
        while state.global_step < total_steps and state.epoch < num_epochs:
            if batches is None:
                if hasattr(train_loader, "set_epoch"):
                    train_loader.set_epoch(state.epoch)  # so its state_dict names the epoch in progress
                batches = loader_batches(train_loader, state.epoch, state.batch_in_epoch)

            step = state.global_step + 1
            comm.begin_step(state.global_step)  # ranks > 0: this step's dropout masks
            step_loss, step_tokens = forward_backward(model, loss_fn, batches, accum, comm, sync=False)
            if opts.reduce_gradients is not None:
                opts.reduce_gradients(model)
            norm = clip_grad_norm(model, opts.max_grad_norm, sync=False) if opts.max_grad_norm is not None else 0.0
            step_loss, norm = backend.host_floats(step_loss, norm)  # the step's one host transfer
            if not math.isfinite(step_loss):
                raise diverged_error("loss", step_loss, step, state.epoch, checkpoint_path, last_saved)
            if opts.max_grad_norm is not None:
                if not math.isfinite(norm):
                    raise diverged_error("gradient norm", norm, step, state.epoch, checkpoint_path, last_saved)
            if opts.scheduler is not None:
                optimizer.lr = opts.scheduler(state.global_step)
            history["lrs"].append(float(optimizer.lr))
            optimizer.step()

            state.global_step = step
            state.batch_in_epoch += accum
            state.tokens_seen += step_tokens
            history["step_losses"].append(step_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{optimizer.lr:.2e}", refresh=False)

            if main and (step - 1) % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, eval_iter)
                if not math.isfinite(train_loss):
                    raise diverged_error("training loss", train_loss, step, state.epoch, checkpoint_path, last_saved,
                                    after_update=True)
                ppl = perplexity(val_loss)
                history["train_losses"].append(train_loss)
                history["val_losses"].append(val_loss)
                history["perplexities"].append(ppl)
                history["track_tokens_seen"].append(state.tokens_seen)
                history["track_steps"].append(step)
                emit(f"Ep {state.epoch + 1} (step {step:6d}/{total_steps}): train loss {train_loss:.3f}, "
                     f"val loss {val_loss:.3f}, val perplexity {ppl:.1f}")

            if state.batch_in_epoch + accum > n_batches:  # the epoch is over
                if main and start_context:
                    emit(f"Ep {state.epoch + 1} sample: "
                         f"{_sample(model, start_context, opts.sample_tokens, tokenizer, opts.sampling)}")
                state.epoch, state.batch_in_epoch, batches = state.epoch + 1, 0, None

            if checkpoint_path is not None and opts.checkpoint_every and step % opts.checkpoint_every == 0:
                save()
            signum = opts.stop_requested() if opts.stop_requested is not None else None
            if opts.stop_requested is not None:
                signum = comm.any_stop(signum)  # every rank stops after the same step
            if signum:
                raise _interrupted(signum, state.global_step, total_steps, checkpoint_path,
                                   save if checkpoint_path is not None and last_saved != state.global_step else None)
    finally:
        bar.close()

    comm.check_same_weights(model)  # the ranks are still in step (a no-op for one process)
    if main and start_context and state.batch_in_epoch > 0 and state.global_step > 0:
        # stopped inside an epoch (max_steps): still show what the model does now
        emit(f"Ep {state.epoch + 1} sample (step {state.global_step}): "
             f"{_sample(model, start_context, opts.sample_tokens, tokenizer, opts.sampling)}")
    if checkpoint_path is not None and last_saved != state.global_step:
        save()
    elif state.global_step > 0 and last_saved != state.global_step:
        check_health()  # a run that ends with non-finite weights or loss is not a success
    return state.history_dict()


def _interrupted(signum, step: int, total_steps: int, checkpoint_path, save) -> TrainingInterrupted:
    """Save (if ``save``) and describe where the stopped run stands."""
    if save is not None:
        save()
    name = signal.Signals(signum).name if isinstance(signum, int) and not isinstance(signum, bool) else "a stop request"
    msg = f"stopped by {name} after step {step} of {total_steps}"
    msg += (f"; checkpoint {checkpoint_path} holds step {step}" if checkpoint_path is not None
            else "; no checkpoint path was given, nothing was saved")
    return TrainingInterrupted(msg, step=step, checkpoint=checkpoint_path,
                               signum=signum if isinstance(signum, int) else None)


def _unhealthy(model, loss_fn, loader):
    """None if every weight is finite and the loss of the loader's first batch (eval mode,
    no gradients, so the dropout generator is untouched) is finite; else (what, value).
    One host sync for the weights, one for the loss."""
    params = model.parameters()
    if params:
        xp = backend.array_module(params[0].data)
        if not bool(xp.stack([xp.isfinite(p.data).all() for p in params]).all()):
            bad = next(name for name, p in model.named_parameters() if not bool(xp.isfinite(p.data).all()))
            return f"weight {bad}", "non-finite"
    x, y = next(iter(loader_batches(loader)))
    with eval_mode(model), no_grad():
        loss = float(calc_loss_batch(model, loss_fn, x, y))
    return None if math.isfinite(loss) else ("loss at the updated weights", loss)


def forward_backward(model, loss_fn, batches, accum: int, comm=None, sync: bool = True) -> tuple[float, int]:
    """zero_grad, then forward and backward over ``accum`` micro-batches, each scaled by
    1/accum so the gradients add up to the mean's. Returns (mean loss, tokens seen); the
    loss is the step's one device-to-host sync (``sync=False``: left on the device).

    With N ranks each takes its rows of every micro-batch, scaled also by its weight (its
    share of the batch's counted targets), and ``comm.sum_gradients`` adds the ranks'
    gradients and losses: the whole batch's mean, as one process computes it. ``comm``
    None: this process alone."""
    if comm is None:
        from .distributed import Communicator

        comm = Communicator()
    model.zero_grad()
    loss_sum, tokens = None, 0
    for _ in range(accum):
        x, y = next(batches)
        tokens += int(x.size)
        x, y, weight = comm.shard(x, y, getattr(loss_fn, "ignore_index", None))  # (B/N, T); 1 alone
        if weight == 0.0:
            continue  # every target of my rows is ignored: I add nothing
        loss = calc_loss_batch(model, loss_fn, x, y)
        model.backward(loss_fn.backward(weight / accum))
        loss = loss if weight == 1.0 else loss * weight
        loss_sum = loss if loss_sum is None else loss_sum + loss
    total = comm.sum_gradients(model, 0.0 if loss_sum is None else loss_sum, sync=sync)
    if hasattr(total, "astype"):
        total = total.astype("float64")  # divided in float64, as the synced Python float is
    return total / accum, tokens


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
