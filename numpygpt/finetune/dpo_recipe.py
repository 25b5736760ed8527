"""``numpygpt finetune dpo``: preference tuning of an instruction-tuned model with DPO.

    result = finetune_dpo(model="runs/instruct/model", data="preferences.json")
    result = finetune_dpo(DPOOptions(model="gpt2", data="prefs.json", lora_rank=8, beta=0.2))

The policy and the frozen reference both start from ``--model`` (or the reference from
``--reference``); the data (``dpo_data``) is split 85/10/5 in file order; the policy trains
through ``train_model`` with DPO's objective (``dpo``), so checkpoints, Ctrl-C, ``--resume``,
accumulation and MPI work as for every recipe. Each evaluation logs the loss and, for the
training and validation batches, the rewards, the margin and the reward accuracy; the test
split's are printed at the end. OUT gets ``loss.png``, ``margins.png``, ``history.json`` and
``model/`` (LoRA merged; the adapters alone in ``lora-adapters.safetensors``).
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass
from functools import partial

from .. import backend
from ..fileio import write_json
from ..options import POSITIVE_FLOAT, add_arguments, option
from ..progress import say as _say
from .common import (MODEL_SOURCES, TextOptions, check_split, describe_model, load_model, planned_steps,
                     recipe_field, start_run, trainable_adamw)
from .prompts import prompt_format
from .dpo import DPOObjective, dpo_metrics_hook, evaluate_dpo, plot_margins
from .dpo_data import PreferenceDataset, collate_preferences, load_preference_data, split_data

__all__ = ["DPOOptions", "finetune_dpo", "add_dpo_args"]


@dataclass
class DPOOptions(TextOptions):
    """``numpygpt finetune dpo``'s options; the defaults are the book's DPO recipe (beta 0.1,
    AdamW 5e-6 with weight decay 0.01, one epoch of batch 8). A bad value is one line."""

    ARGPARSE_CHECKS = False

    model: str | None = option(None, "the model to tune (and the reference), e.g. finetune instruct's OUT/model: "
                               + MODEL_SOURCES, metavar="DIR")
    data: str | None = option(None, "preference data, a JSON list of {instruction, input, chosen, rejected} "
                              "(numpygpt make-preferences writes one)", metavar="JSON")
    reference: str | None = option(None, "the frozen reference model (default: --model)", metavar="DIR")
    out: str = recipe_field("out", "runs/dpo")
    beta: float = option(0.1, "DPO's reward scale: how far the policy may move from the reference",
                         check=POSITIVE_FLOAT)
    reduction: str = option("mean", "a response's log-probability: the mean over its tokens (the book) or the "
                            "sum (the paper)", choices=("mean", "sum"), metavar="{mean,sum}")
    lr: float = recipe_field("lr", 5e-6)
    weight_decay: float = recipe_field("weight_decay", 0.01)

    def check_more(self) -> None:
        super().check_more()
        if self.model is None:
            raise ValueError("--model DIR is required: the model to tune (e.g. finetune instruct's OUT/model)")
        if self.data is None:
            raise ValueError("--data JSON is required: preference entries {instruction, input, chosen, rejected} "
                             "(numpygpt make-preferences writes them)")

    def run_options(self) -> dict:
        """What a resumed run must share with the saved one (paths made absolute)."""
        keep = ("batch_size", "epochs", "lr", "weight_decay", "seed", "drop_rate", "lora_rank", "allowed_max_length",
                "dtype", "beta", "reduction", "grad_accum")
        options = {k: getattr(self, k) for k in keep + (("prompt_style",) if self.prompt_style else ())}
        options.update({k: _absolute(getattr(self, k)) for k in ("model", "reference", "data")}, lora_alpha=self.alpha)
        return options


def _absolute(path):
    return os.path.abspath(path) if path is not None and os.path.exists(path) else path


def add_dpo_args(parser) -> None:
    """Every flag of DPOOptions; a flag not given is left out (its default comes from the dataclass)."""
    add_arguments(parser, DPOOptions, suppress=True)


def finetune_dpo(options: DPOOptions | None = None, log=print, progress: bool | None = None, **given) -> dict:
    """Tune ``model`` on preference pairs with DPO (``options``: a DPOOptions, or its fields as
    keywords). Returns {"model", "history", "test_metrics", "paths"}; see the module docstring."""
    from ..scaffold import RunFolder
    from ..train import TrainOptions

    o, comm, device = start_run(DPOOptions, options, given, progress)
    splits = check_split(o.data, split_data(load_preference_data(o.data)), o.batch_size, "pairs")
    backend.manual_seed(o.seed)  # the policy's dropout: the same seed gives the same run
    model, reference, tokenizer = _load_models(o, device)
    prompts = prompt_format(model, tokenizer, o.prompt_style)
    objective = DPOObjective(reference, o.beta, o.reduction)
    loaders = _loaders(o, model, splits, prompts)
    optimizer = trainable_adamw(model, o.lr, o.weight_decay)
    run = RunFolder(o.out, is_main=comm.is_main)
    state = run.resume(model, optimizer, o.run_options()) if o.resume else None
    _print_plan(o, model, splits, len(loaders[0]), device, prompts, log)
    if state is not None:
        _say(f"resuming    at step {state.global_step:,} from {run.checkpoint}", log)
    train_options = TrainOptions(
        grad_accum_steps=o.grad_accum, max_steps=o.max_steps, checkpoint_path=run.checkpoint,
        checkpoint_every=o.checkpoint_every, resume_state=state, run_options=o.run_options(),
        progress=not o.no_progress, log=log, objective=objective,
        on_evaluate=dpo_metrics_hook(objective, loaders[0], loaders[1], o.eval_iter))
    history = run.train(model, loaders[0], loaders[1], optimizer, o.epochs, o.eval_freq, o.eval_iter,
                        resume_hint="the same command with --resume", options=train_options)
    test_metrics = None
    if comm.is_main:  # under mpiexec one rank evaluates and writes
        test_metrics = evaluate_dpo(model, objective, loaders[2]) if splits[1] else None
        _say("test        " + _describe(test_metrics, len(splits[1])), log)
        history["test_metrics"] = test_metrics
    paths = _write_outputs(o, run, model, history, comm.is_main, tokenizer, log)
    return {"model": model, "history": history, "test_metrics": test_metrics, "paths": paths}


def _load_models(o: DPOOptions, device: str):
    """(policy, reference, tokenizer), any family: the reference is the policy's copy (or
    ``--reference``), frozen; LoRA adapters go on the policy only."""
    model, tokenizer = load_model(o.model, device, dtype=o.dtype, drop_rate=o.drop_rate)
    if o.reference is None:
        reference = copy.deepcopy(model)
    else:
        reference = load_model(o.reference, device, dtype=o.dtype, fit_tokenizer=False)[0]
        if reference.cfg.vocab_size != model.cfg.vocab_size:
            raise ValueError(f"--reference {o.reference} has a vocabulary of {reference.cfg.vocab_size} tokens, "
                             f"--model {o.model} one of {model.cfg.vocab_size}: DPO compares them token by token")
    reference.freeze()
    reference.eval()
    if o.lora_rank is not None:
        from ..lora import apply_lora

        apply_lora(model, o.lora_rank, o.alpha, seed=o.seed)
    return model, reference, tokenizer


def _loaders(o: DPOOptions, model, splits, prompts):
    """Training (shuffled with the seed), validation and test loaders of padded, masked pairs;
    a warning for pairs longer than the allowed length (their responses are cut)."""
    from ..data import DataLoader

    max_length = min(o.allowed_max_length, model.cfg.context_length)
    collate = partial(collate_preferences, pad_id=prompts.tokenizer.eot_token, allowed_max_length=max_length)
    loaders = []
    for name, entries, offset in (("training", splits[0], 0), ("validation", splits[2], len(splits[0]) + len(splits[1])),
                                  ("test", splits[1], len(splits[0]))):
        dataset = PreferenceDataset(entries, max_length=max_length, source=f"{o.data} ({name} split)", prompts=prompts)
        if dataset.too_long:
            first = ", ".join(str(offset + i) for i in dataset.too_long[:5])
            print(f"warning: {len(dataset.too_long)} {name} pairs are longer than {max_length} tokens (entries "
                  f"{first}{', ...' if len(dataset.too_long) > 5 else ''} of {o.data}); their responses are cut",
                  file=sys.stderr, flush=True)
        training = name == "training"
        loaders.append(DataLoader(dataset, o.batch_size, shuffle=training, drop_last=training, seed=o.seed,
                                  collate_fn=collate))
    return loaders  # train, val, test


def _print_plan(o: DPOOptions, model, splits, n_batches: int, device: str, prompts, log) -> None:
    cfg = model.cfg
    n_total, n_trainable = model.num_parameters(), model.num_parameters(trainable_only=True)
    total, steps_per_epoch = planned_steps(n_batches, o.grad_accum, o.epochs, o.max_steps)
    for line in (
        f"device      {device}",
        f"model       {describe_model(o.model, cfg)}; reference {o.reference or 'the same, frozen'}; "
        f"prompts {prompts.name}",
        f"parameters  {n_total:,}" + (f"; trainable {n_trainable:,} (LoRA rank {o.lora_rank})" if o.lora_rank else ""),
        f"data        {o.data}: {sum(len(s) for s in splits):,} pairs: train {len(splits[0]):,}, "
        f"test {len(splits[1]):,}, val {len(splits[2]):,}",
        f"plan        {total:,} steps ({o.epochs} epochs of {steps_per_epoch:,}), batch {o.batch_size}"
        + (f" x {o.grad_accum}" if o.grad_accum > 1 else "") + f", DPO beta {o.beta:g} ({o.reduction} log-probability), "
        f"AdamW lr {o.lr:g}, weight decay {o.weight_decay:g}",
    ):
        _say(line, log)


def _describe(metrics: dict | None, n_pairs: int) -> str:
    if metrics is None:
        return "no test pairs (the split gives 10% of the entries to the test set)"
    return (f"{n_pairs} pairs: loss {metrics['loss']:.4f}, reward accuracy {metrics['reward_accuracy']:.1%}, "
            f"chosen reward {metrics['chosen_reward']:+.4f}, rejected reward {metrics['rejected_reward']:+.4f}, "
            f"margin {metrics['margin']:+.4f}")


def _write_outputs(o: DPOOptions, run, model, history: dict, is_main: bool, tokenizer, log) -> dict:
    """The plots, the history and the model (LoRA merged, its adapters alone beside it)."""
    from ..plots import plot_losses
    from ..lora import ADAPTERS_FILE
    from .instruct import save_finetuned

    paths = {name: run.path(file) for name, file in (
        ("loss_plot", "loss.png"), ("margin_plot", "margins.png"), ("history", "history.json"), ("model", "model"),
        ("checkpoint", "checkpoint.safetensors"))}
    if o.lora_rank is not None:
        paths["adapters"] = os.path.join(paths["model"], ADAPTERS_FILE)
    if is_main:
        plot_losses(history, paths["loss_plot"])
        plot_margins(history, paths["margin_plot"])
        write_json(paths["history"], history)
        save_finetuned(model, paths["model"], tokenizer)
    _say(f"model       {paths['model']}" + (f" (LoRA merged; adapters alone in {paths['adapters']})"
                                            if o.lora_rank is not None else ""), log)
    _say(f"plots       {paths['loss_plot']}, {paths['margin_plot']}", log)
    return paths
