"""The training loop, one for every recipe: the book's ``train_model_simple`` with appendix D's extras.

    history = train_model(model, train_loader, val_loader, optimizer, num_epochs=10,
                          eval_freq=5, eval_iter=5, start_context="Every effort moves you")

One optimiser step is::

    zero_grad
    for each of grad_accum_steps micro-batches:
        loss = objective.loss(model, batch)          # cross_entropy(model(x), y) by default
        objective.backward(model, 1/grad_accum_steps)  # grads add up to the mean's gradient
    clip_grad_norm (optional); lr = scheduler(step) (optional); optimizer.step()

The objective (``numpygpt.objective``) is what a recipe brings: the language model's next-token
loss, the classifier's, DPO's, the translation model's. Everything else (evaluation, samples,
checkpoints, Ctrl-C, resume, accumulation, MPI, the health check) is this loop's, for all of
them; a recipe's own metrics come from its ``on_evaluate`` / ``on_epoch_end`` hooks.

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
from dataclasses import dataclass

from .checkpointer import (Checkpointer, StopRequest, TrainingDivergedError, TrainingInterrupted, diverged_error,
                           stop_on_signals)
from .nn import CrossEntropyLoss, eval_mode, no_grad
from .objective import NextTokenObjective
from .optim import clip_grad_norm
from .plots import plot_losses
from .progress import Reporter
from .train_state import HISTORY_LISTS, TrainState, new_history

__all__ = [
    "TrainingDivergedError",
    "TrainingInterrupted",
    "StopRequest",
    "stop_on_signals",
    "TrainOptions",
    "TrainState",
    "HISTORY_LISTS",
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


def calc_loss_loader(model, loss_fn, loader, num_batches: int | None = None, objective=None) -> float:
    """Mean batch loss over the first ``num_batches`` batches (all if None) of ``loader``:
    ``objective``'s loss, by default cross-entropy with ``loss_fn``.

    NaN for an empty loader, as in the book. Evaluation always reads epoch 0's order, so
    successive evaluations measure the same batches (comparable numbers, and evaluating never
    changes what training sees); the book's loaders reshuffle the training set for each
    evaluation instead, which makes its training-loss curve noisier. One host sync at the end.
    """
    objective = objective if objective is not None else NextTokenObjective(loss_fn)
    n = len(loader)
    if n == 0:
        return float("nan")
    num_batches = n if num_batches is None else min(int(num_batches), n)
    total = None
    with no_grad():
        for batch in itertools.islice(loader_batches(loader), num_batches):
            loss = objective.loss(model, batch)
            total = loss if total is None else total + loss
    return float(total) / num_batches


def evaluate_model(model, train_loader, val_loader, eval_iter: int, objective=None) -> tuple[float, float]:
    """(train loss, val loss) over ``eval_iter`` batches each, in eval mode (no dropout);
    the model goes back to the mode it was in. ``objective``: the loss (default next-token
    cross-entropy)."""
    objective = objective if objective is not None else NextTokenObjective()
    with eval_mode(model):
        train_loss = calc_loss_loader(model, None, train_loader, eval_iter, objective)
        val_loss = calc_loss_loader(model, None, val_loader, eval_iter, objective)
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
    objective: what the run minimises (``numpygpt.objective``): ``loss(model, batch)``,
        ``backward(model, scale)``, ``count(batch)``, ``split(batch, comm)``. Default:
        ``NextTokenObjective(loss_fn)``.
    loss_fn: the loss of the default objective (default ``CrossEntropyLoss()``); it sees
        ``model(x)`` and ``y`` as the loader yields them, so logits (B, K) with targets (B,)
        work as well.
    on_evaluate, on_epoch_end: a recipe's metrics, ``hook(model, state, say) -> dict | None``,
        called (on the main process only) after each evaluation and at the end of each epoch; each
        entry of the dict is appended to ``history[name]`` (and kept in checkpoints), and
        ``say`` prints a line above the bar.
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
    objective: object = None
    loss_fn: object = None
    on_evaluate: object = None
    on_epoch_end: object = None
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
    total_steps = _plan_steps(opts, len(train_loader), num_epochs, eval_freq, eval_iter)
    comm, main = _communicator(opts)
    objective = opts.objective if opts.objective is not None else NextTokenObjective(opts.loss_fn)
    state = _starting_state(opts, train_loader)
    history, accum, n_batches = state.history, opts.grad_accum_steps, len(train_loader)
    comm.begin_training(model, batch_size=getattr(train_loader, "batch_size", None),
                        plan=(n_batches, accum, total_steps, state.epoch, state.batch_in_epoch))
    ckpt = Checkpointer(opts.checkpoint_path if main else None, model, optimizer, state, objective, train_loader,
                        every=opts.checkpoint_every, stop_requested=opts.stop_requested,
                        resumed=opts.resume_state is not None, total_steps=total_steps)
    report = Reporter(total_steps, state.global_step, enabled=opts.progress, log=opts.log, quiet=not main)

    def sample(label: str) -> None:
        if main and start_context:
            report.say(f"{label}: {_sample(model, start_context, opts.sample_tokens, tokenizer, opts.sampling)}")

    model.train()
    batches = None
    try:
        while state.global_step < total_steps and state.epoch < num_epochs:
            if batches is None:
                batches = _epoch_batches(train_loader, state)
            step = state.global_step + 1
            comm.begin_step(state.global_step)  # ranks > 0: this step's dropout masks
            step_loss, seen = forward_backward(model, objective, batches, accum, comm)
            if opts.reduce_gradients is not None:
                opts.reduce_gradients(model)
            _update(model, optimizer, opts, state, ckpt, step_loss)
            state.global_step, state.tokens_seen = step, state.tokens_seen + seen
            state.batch_in_epoch += accum
            history["step_losses"].append(step_loss)
            report.step(step_loss, optimizer.lr)
            if main and (step - 1) % eval_freq == 0:
                _evaluate(model, train_loader, val_loader, eval_iter, objective, state, ckpt, report, opts)
            if state.batch_in_epoch + accum > n_batches:  # the epoch is over
                sample(f"Ep {state.epoch + 1} sample")
                if main:
                    _record(history, _call_hook(opts.on_epoch_end, model, state, report))
                state.epoch, state.batch_in_epoch, batches = state.epoch + 1, 0, None
            ckpt.after_step(comm)
    finally:
        report.close()

    comm.check_same_weights(model)  # the ranks are still in step (a no-op for one process)
    if state.batch_in_epoch > 0 and state.global_step > 0:
        sample(f"Ep {state.epoch + 1} sample (step {state.global_step})")  # stopped inside an epoch
    ckpt.finish()
    return state.history_dict()


def _communicator(opts: TrainOptions):
    """(the communicator, whether this process is the main one), with the allocator set up."""
    from . import distributed, memory

    if opts.keep_freed_memory:
        memory.keep_freed_memory()
    comm = opts.comm if opts.comm is not None else distributed.init()
    return comm, opts.is_main_process and comm.is_main


def _plan_steps(opts: TrainOptions, n_batches: int, num_epochs: int, eval_freq: int, eval_iter: int) -> int:
    """The run's number of optimiser steps, after checking the loop's arguments."""
    if num_epochs < 0 or eval_freq < 1 or eval_iter < 1 or opts.grad_accum_steps < 1:
        raise ValueError("need num_epochs >= 0, eval_freq >= 1, eval_iter >= 1 and grad_accum_steps >= 1")
    if opts.checkpoint_every is not None and opts.checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {opts.checkpoint_every}")
    steps_per_epoch = n_batches // opts.grad_accum_steps
    if steps_per_epoch == 0:
        raise ValueError(
            f"the training loader has {n_batches} batches, fewer than grad_accum_steps="
            f"{opts.grad_accum_steps}: not even one optimiser step fits in an epoch"
        )
    total_steps = num_epochs * steps_per_epoch
    return total_steps if opts.max_steps is None else min(total_steps, int(opts.max_steps))


def _starting_state(opts: TrainOptions, train_loader) -> TrainState:
    """A fresh TrainState, or the resumed run's (its loader's position restored)."""
    if opts.resume_state is not None:
        state = TrainState.from_checkpoint(opts.resume_state)
        if state.loader_state and hasattr(train_loader, "load_state_dict"):
            train_loader.load_state_dict(state.loader_state)  # raises if the data differ
    else:
        state = TrainState()
    state.grad_accum_steps = opts.grad_accum_steps
    if opts.run_options is not None:
        state.run_options = opts.run_options
    state.extra = {**state.extra, **(opts.extra or {})}
    return state


def _epoch_batches(train_loader, state: TrainState):
    """The batches of the epoch in progress, from the first one not yet consumed."""
    if hasattr(train_loader, "set_epoch"):
        train_loader.set_epoch(state.epoch)  # so its state_dict names the epoch in progress
    return loader_batches(train_loader, state.epoch, state.batch_in_epoch)


def _update(model, optimizer, opts: TrainOptions, state: TrainState, ckpt: Checkpointer, step_loss: float) -> None:
    """Check the loss, clip, set the learning rate and take the optimiser step."""
    step = state.global_step + 1
    if not math.isfinite(step_loss):
        raise ckpt.diverged("loss", step_loss, step=step)
    if opts.max_grad_norm is not None:
        norm = clip_grad_norm(model, opts.max_grad_norm)
        if not math.isfinite(norm):
            raise ckpt.diverged("gradient norm", norm, step=step)
    if opts.scheduler is not None:
        optimizer.lr = opts.scheduler(state.global_step)
    state.history["lrs"].append(float(optimizer.lr))
    optimizer.step()


def _evaluate(model, train_loader, val_loader, eval_iter: int, objective, state: TrainState, ckpt: Checkpointer,
              report: Reporter, opts: TrainOptions) -> None:
    """The losses over ``eval_iter`` batches of each split, logged and kept in the history,
    then the recipe's own metrics (``on_evaluate``)."""
    step, history = state.global_step, state.history
    train_loss, val_loss = evaluate_model(model, train_loader, val_loader, eval_iter, objective)
    if not math.isfinite(train_loss):
        raise ckpt.diverged("training loss", train_loss, after_update=True)
    ppl = perplexity(val_loss)
    history["train_losses"].append(train_loss)
    history["val_losses"].append(val_loss)
    history["perplexities"].append(ppl)
    history["track_tokens_seen"].append(state.tokens_seen)
    history["track_steps"].append(step)
    report.say(f"Ep {state.epoch + 1} (step {step:6d}/{ckpt.total_steps}): train loss {train_loss:.3f}, "
               f"val loss {val_loss:.3f}" + (f", val perplexity {ppl:.1f}" if getattr(objective, "perplexity", True)
                                             else ""))
    _record(history, _call_hook(opts.on_evaluate, model, state, report))


def _call_hook(hook, model, state: TrainState, report: Reporter):
    """A recipe's metrics hook, in eval mode; the model goes back to training after it."""
    if hook is None:
        return None
    with eval_mode(model):
        return hook(model, state, report.say)


def _record(history: dict, metrics) -> None:
    for name, value in (metrics or {}).items():
        history.setdefault(name, []).append(float(value))


def forward_backward(model, objective, batches, accum: int, comm=None) -> tuple[float, int]:
    """zero_grad, then forward and backward over ``accum`` micro-batches, each scaled by
    1/accum so the gradients add up to the mean's. Returns (mean loss, what the step saw:
    tokens or examples, ``objective.count``); the loss is the step's one device-to-host sync.

    With N ranks each takes its rows of every micro-batch (``objective.split``), scaled also
    by its weight (its share of the batch's counted targets), and ``comm.sum_gradients``
    adds the ranks' gradients and losses: the whole batch's mean, as one process computes it.
    ``comm`` None: this process alone. ``objective`` may also be a plain loss function
    (cross-entropy of ``model(x)`` against ``y``)."""
    if comm is None:
        from .distributed import Communicator

        comm = Communicator()
    if not hasattr(objective, "split"):
        objective = NextTokenObjective(objective)
    model.zero_grad()
    loss_sum, seen = None, 0
    for _ in range(accum):
        batch = next(batches)
        seen += objective.count(batch)
        batch, weight = objective.split(batch, comm)  # my rows; weight 1 alone
        if weight == 0.0:
            continue  # every target of my rows is ignored: I add nothing
        loss = objective.loss(model, batch)
        objective.backward(model, weight / accum)
        loss = loss if weight == 1.0 else loss * weight
        loss_sum = loss if loss_sum is None else loss_sum + loss
    return comm.sum_gradients(model, 0.0 if loss_sum is None else loss_sum) / accum, seen
