"""Training an encoder-decoder to translate numbers between words and digits, in the one
training loop (``train_model``) with an objective of its own.

    opts = TranslationOptions(train_numbers=20000, epochs=4)
    result = train_translation(opts)      # {"accuracy": ..., "examples": [...], "seconds": ...}

``numpygpt train-translation`` runs the same (``add_translation_args`` / ``run_translation``),
with what every training command has: the run folder ``out`` (``history.json``,
``checkpoint.safetensors`` written through the loop, ``--resume``, Ctrl-C), LoRA adapters
(``--lora-rank``), ``mpiexec`` (each rank takes its rows of every batch) and ``--device cuda``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from .. import backend, distributed
from ..data import DataLoader
from ..encdec import EncDecConfig, EncoderDecoder
from ..finetune.common import LoRAOptions, planned_steps, trainable_adamw
from ..nn import CrossEntropyLoss
from ..optim import CosineWithWarmup
from ..options import DROP_RATE, NONNEG_FLOAT, NONNEG_INT, POSITIVE_INT, add_arguments, option
from ..progress import say as _say
from .numbers import MAX_NUMBER, NumberPairs, NumberTokenizer, sample_numbers

__all__ = ["TranslationObjective", "TranslationOptions", "train_translation", "exact_match",
           "add_translation_args", "run_translation"]


class TranslationObjective:
    """Cross-entropy of ``model(src, tgt_in)`` against ``tgt_out`` (teacher forcing: the
    decoder reads the target shifted right by <bos>; padding is -100 and left out). A batch is
    NumberPairs' dict; a step "sees" its target tokens.

    Under MPI each rank takes its rows of the batch, weighted by its share of the batch's
    counted target tokens (rows hold translations of different lengths), so the ranks'
    weighted losses add up to the whole batch's mean, as one process computes it."""

    perplexity = True  # per target token

    def __init__(self):
        self.loss_fn = CrossEntropyLoss()

    def loss(self, model, batch):
        logits = model(batch["src"], batch["tgt_in"])  # (B, T, V)
        return self.loss_fn(logits, batch["tgt_out"])

    def backward(self, model, scale: float = 1.0) -> None:
        model.backward(self.loss_fn.backward(scale))  # dlogits -> decoder -> memory -> encoder

    def count(self, batch) -> int:
        return int((batch["tgt_out"] != self.loss_fn.ignore_index).sum())

    def split(self, batch, comm):
        if comm is None or comm.world_size == 1:
            return batch, 1.0
        targets = batch["tgt_out"]
        rows, _, weight = comm.shard(np.arange(len(targets)), targets, self.loss_fn.ignore_index)
        return {k: v[rows] for k, v in batch.items()}, weight


@dataclass
class TranslationOptions(LoRAOptions):
    """``numpygpt train-translation``'s options; the defaults train to >= 99% held-out exact
    match (docs/translation.md)."""

    max_number: int = option(MAX_NUMBER, "numbers go from 0 to this", check=POSITIVE_INT, group="data")
    train_numbers: int = option(20000, "numbers to train on (each in both directions)", check=POSITIVE_INT,
                                group="data")
    test_numbers: int = option(500, "held-out numbers for the loss and the exact-match accuracy",
                               check=POSITIVE_INT, group="data")
    emb_dim: int = option(64, "", check=POSITIVE_INT, group="model")
    n_heads: int = option(4, "", check=POSITIVE_INT, group="model")
    n_layers: int = option(2, "encoder blocks, and as many decoder blocks", check=POSITIVE_INT, group="model")
    drop_rate: float = option(0.0, "", check=DROP_RATE, group="model")
    post_norm: bool = option(False, "the paper's post-LayerNorm blocks instead of pre-LayerNorm", group="model")
    epochs: int = option(3, "passes over the training pairs", check=POSITIVE_INT, group="optimisation")
    batch_size: int = option(64, "pairs per step", check=POSITIVE_INT, group="optimisation")
    max_steps: int | None = option(None, "stop after this many optimiser steps (the schedule still spans "
                                   "--epochs)", check=POSITIVE_INT, group="optimisation")
    lr: float = option(2e-3, "peak AdamW learning rate (linear warmup, cosine decay)", check=NONNEG_FLOAT,
                       group="optimisation")
    weight_decay: float = option(0.01, "", check=NONNEG_FLOAT, group="optimisation")
    seed: int = option(0, "seeds the numbers, the weights and the batch order", group="optimisation")
    init_from: str | None = option(None, "start from the weights of this train-translation checkpoint (same model "
                                   "options), e.g. to train --lora-rank adapters on a trained model", metavar="CKPT",
                                   group="model")
    out: str = option("runs/translation", "the run's folder: history.json, checkpoint.safetensors (and "
                      "lora-adapters.safetensors)", metavar="DIR", group="run")
    checkpoint_every: int | None = option(None, "also write OUT/checkpoint.safetensors every N steps (it is always "
                                          "written at the end of training and on Ctrl-C/SIGTERM)",
                                          check=POSITIVE_INT, metavar="N", group="run")
    resume: bool = option(False, "continue from OUT/checkpoint.safetensors (same options as the interrupted run)",
                          group="run")
    eval_freq: int = option(100, "evaluate the losses every N steps", check=POSITIVE_INT, group="run")
    show: int = option(6, "held-out translations to print", check=NONNEG_INT, group="run")
    device: str = option("cpu", "", choices=("cpu", "cuda", "auto"), group="run")
    blas_threads: int = option(1, "BLAS threads: this model's matrices are small, and one thread ran a step "
                               "3x faster than two on a loaded 2-core machine", check=POSITIVE_INT, group="run")
    no_progress: bool = option(False, "no progress bar", group="run")

    def check_more(self) -> None:
        super().check_more()
        if self.train_numbers + self.test_numbers > self.max_number + 1:
            raise ValueError(f"--train-numbers + --test-numbers ({self.train_numbers + self.test_numbers}) is more "
                             f"than the {self.max_number + 1} numbers from 0 to --max-number")
        if self.emb_dim % self.n_heads:
            raise ValueError(f"--emb-dim ({self.emb_dim}) must be divisible by --n-heads ({self.n_heads})")

    def run_options(self) -> dict:
        """What a resumed run must share with the saved one."""
        keep = ("max_number", "train_numbers", "test_numbers", "emb_dim", "n_heads", "n_layers", "drop_rate",
                "post_norm", "epochs", "batch_size", "lr", "weight_decay", "seed", "lora_rank")
        init = os.path.abspath(self.init_from) if self.init_from is not None else None
        return {**{k: getattr(self, k) for k in keep}, "lora_alpha": self.alpha, "init_from": init}


def make_data(opts: TranslationOptions, tokenizer: NumberTokenizer):
    """(train pairs, held-out pairs): distinct numbers drawn from ``seed``, none in both."""
    rng = np.random.default_rng([opts.seed, 0x7a])
    numbers = sample_numbers(opts.train_numbers + opts.test_numbers, rng, opts.max_number)
    return (NumberPairs(numbers[opts.test_numbers:], tokenizer),
            NumberPairs(numbers[:opts.test_numbers], tokenizer))


def exact_match(model: EncoderDecoder, pairs: NumberPairs, batch_size: int = 256) -> tuple[float, list]:
    """(fraction of rows whose greedy translation is exactly the reference, every row's
    (source, reference, output))."""
    tok = pairs.tokenizer
    rows = []
    max_new = pairs.tgt_out.shape[1]
    for start in range(0, len(pairs), batch_size):
        out = model.greedy_decode(pairs.src[start:start + batch_size], tok.bos_id, tok.eos_id, max_new)
        for r, ids in enumerate(out, start):
            source, reference = pairs.reference(r)
            rows.append((source, reference, tok.decode(ids)))
    correct = sum(ref == got for _, ref, got in rows)
    return correct / len(rows), rows


def build_model(opts: TranslationOptions, tokenizer: NumberTokenizer, pairs: NumberPairs) -> EncoderDecoder:
    """The encoder-decoder the options describe, sized for ``pairs``: seeded weights, or those of
    ``init_from``; with LoRA adapters when ``lora_rank`` is set (the weights are then frozen)."""
    from ..lora import apply_lora

    cfg = EncDecConfig(vocab_size=tokenizer.vocab_size, context_length=max(pairs.src.shape[1],
                                                                           pairs.tgt_in.shape[1]) + 2,
                       emb_dim=opts.emb_dim, n_heads=opts.n_heads, n_enc_layers=opts.n_layers,
                       n_dec_layers=opts.n_layers, drop_rate=opts.drop_rate, norm_first=not opts.post_norm,
                       pad_id=tokenizer.pad_id)
    model = EncoderDecoder(cfg, seed=opts.seed)
    if opts.init_from is not None:
        _load_weights(model, opts.init_from)
    if opts.lora_rank is not None:
        apply_lora(model, opts.lora_rank, opts.alpha, seed=opts.seed)
    return model


def _load_weights(model: EncoderDecoder, path) -> None:
    """``--init-from``: the weights of an encoder-decoder checkpoint without adapters, which must
    fit the model the options describe (ValueError naming the first difference)."""
    from ..checkpoint import read_checkpoint

    saved = read_checkpoint(path)
    if not isinstance(saved.config, EncDecConfig):
        raise ValueError(f"--init-from {path}: a {saved.config.model_type} checkpoint, not an encoder-decoder's")
    if saved.config.lora_rank is not None:
        raise ValueError(f"--init-from {path}: the checkpoint holds LoRA adapters; start from one without")
    saved.apply(model, restore_rng=False)  # "does not fit the model: ..." for other sizes


def train_translation(opts: TranslationOptions, log=print) -> dict:
    """Build the data and the model, train with ``train_model`` and a ``TranslationObjective``
    in the run folder ``opts.out`` (checkpoints, ``resume``), then measure held-out exact match
    (on the main process; under mpiexec the others return accuracy None). Returns
    {"accuracy", "examples", "seconds", "history", "model", "parameters", "paths"}."""
    from ..scaffold import RunFolder
    from ..train import TrainOptions

    opts.validate()
    comm = distributed.init()
    comm.check_batch_size(opts.batch_size)
    comm.use_device(backend.set_device(opts.device))
    log = log if comm.is_main else None
    backend.manual_seed(opts.seed)
    tok = NumberTokenizer()
    train_pairs, test_pairs = make_data(opts, tok)
    model = build_model(opts, tok, train_pairs)
    train_loader = DataLoader(train_pairs, opts.batch_size, shuffle=True, seed=opts.seed)
    test_loader = DataLoader(test_pairs, opts.batch_size, shuffle=False, drop_last=False)
    total = len(train_loader) * opts.epochs  # the schedule's length; --max-steps may stop before
    optimizer = trainable_adamw(model, opts.lr, opts.weight_decay)
    run = RunFolder(opts.out, is_main=comm.is_main)
    state = run.resume(model, optimizer, opts.run_options()) if opts.resume else None
    steps = planned_steps(len(train_loader), 1, opts.epochs, opts.max_steps)[0]
    _print_plan(opts, model, train_pairs, test_pairs, steps,
                None if state is None else (state.global_step, run.checkpoint), log)
    options = TrainOptions(objective=TranslationObjective(), max_steps=opts.max_steps, max_grad_norm=1.0,
                           scheduler=CosineWithWarmup(opts.lr, total, max(1, total // 20), min_lr=opts.lr / 20),
                           checkpoint_path=run.checkpoint, checkpoint_every=opts.checkpoint_every,
                           resume_state=state, run_options=opts.run_options(), progress=not opts.no_progress,
                           log=log)
    start = time.perf_counter()
    with threadpool_limits(limits=opts.blas_threads, user_api="blas"):
        history = run.train(model, train_loader, test_loader, optimizer, opts.epochs, opts.eval_freq, 4,
                            resume_hint="the same command with --resume", options=options)
        seconds = time.perf_counter() - start
        accuracy, rows = exact_match(model, test_pairs) if comm.is_main else (None, [])
    history["exact_match"] = accuracy
    paths = _write_outputs(run, model, history)
    return {"accuracy": accuracy, "examples": rows, "seconds": seconds, "history": history, "model": model,
            "parameters": model.num_parameters(), "paths": paths}


def _print_plan(opts: TranslationOptions, model, train_pairs, test_pairs, steps: int, resumed, log) -> None:
    """What the run will do; ``resumed``: (step, checkpoint path) of a resumed run, else None."""
    trainable = model.num_parameters(trainable_only=True)
    lora = f"; trainable {trainable:,} (LoRA rank {opts.lora_rank})" if opts.lora_rank is not None else ""
    _say(f"{len(train_pairs)} training pairs, {len(test_pairs)} held out; {model.num_parameters():,} "
         f"parameters{lora}; {steps} steps", log)
    if resumed:
        _say(f"resuming at step {resumed[0]:,} from {resumed[1]}", log)


def _write_outputs(run, model, history) -> dict:
    """history.json, and the adapters alone (``save_lora``) for a LoRA run; the main process
    writes, the others only name the paths."""
    from ..lora import ADAPTERS_FILE, lora_layers, save_lora

    paths = {"history": run.path("history.json"), "checkpoint": run.checkpoint}
    if lora_layers(model):
        paths["adapters"] = run.path(ADAPTERS_FILE)
        if run.is_main:
            save_lora(model, paths["adapters"])
    run.write_json("history.json", history)
    return paths


def add_translation_args(parser) -> None:
    add_arguments(parser, TranslationOptions)


def run_translation(options) -> int:
    """``numpygpt train-translation``: train, then print the held-out accuracy and a few
    translations. ``options``: a TranslationOptions, or the parsed namespace or dict of its
    fields. Returns 0."""
    if not isinstance(options, TranslationOptions):
        given = options if isinstance(options, dict) else vars(options)
        options = TranslationOptions.from_dict({k: v for k, v in given.items() if k in TranslationOptions.defaults()})
    result = train_translation(options)
    if result["accuracy"] is None:
        return 0  # a rank other than the main one of an MPI run: the main one reports
    rows = result["examples"]
    print(f"trained in {result['seconds']:.0f} s; held-out exact match {result['accuracy']:.2%} "
          f"({sum(r == g for _, r, g in rows)}/{len(rows)})")
    wrong = [row for row in rows[options.show:] if row[1] != row[2]]
    for source, reference, got in rows[:options.show] + wrong[:3]:  # a few, and a few mistakes
        mark = "ok " if got == reference else "BAD"
        print(f"  {mark} {source!r} -> {got!r}" + ("" if got == reference else f" (want {reference!r})"))
    return 0
