"""What ``numpygpt train``, ``generate`` and ``gradcheck`` do, callable from Python with the same
names: a notebook user and a command-line user run the same code.

    result = run_training({"data": "book.txt", "max_steps": 100})   # options as parse_train_args gives them
    text = run_generate("Every effort moves you", checkpoint="runs/train/checkpoint.safetensors")

``run_training`` plans the run from the options (the model: fresh, pretrained or resumed;
the data; the optimiser and schedule; the step budget), calls ``train.train_model`` and
writes the plot and history. Problems with the user's input raise ``RunError`` (one line
for the command line, exit code 2). This module sits above ``train`` (the loop, which
knows nothing about options) and below ``cli`` (argument parsing and exit codes).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass

from . import backend, distributed
from .generate import SAMPLING_DEFAULTS, describe_sampling, generate_text
from .config import GPTConfig
from .families import build_model
from .model import GPTModel
from .objective import FusedNextTokenObjective
from .optim import AdamW, CosineWithWarmup, param_groups
from .zero import ShardedAdamW
from .options import DROP_RATE, FRACTION, NONNEG_FLOAT, NONNEG_INT, POSITIVE_INT, Options, option
from .plots import plot_losses
from .progress import say as _progress_say
from .scaffold import RunFolder
from .run_model import MODEL_KEYS, SMALL_LLAMA, SMALL_MODEL, describe_config, train_config
from .tokenizer import bits_per_character
from .train import TrainOptions, TrainState, evaluate_model, perplexity

__all__ = ["run_training", "run_generate", "load_model", "run_gradcheck", "RunError", "TrainCommandOptions",
           "TRAIN_DEFAULTS", "DEFAULT_MAX_STEPS", "sampling_options", "SMALL_MODEL", "SMALL_LLAMA"]


class RunError(Exception):
    """A problem with the user's input or files: printed as one line, exit code ``code``."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


# A model as small as SMALL_MODEL (run_model.py), trained this briefly, takes a higher peak
# learning rate than the presets' default.
SMALL_MODEL_LR = 3e-3  # the default --lr for SMALL_MODEL and SMALL_LLAMA ...
DEFAULT_LR = 1e-3  # ... and for presets and pretrained weights
DEFAULT_MAX_STEPS = 400  # used when neither --max-steps nor --epochs is given
DEFAULT_PROMPT = "The for statement is used to"  # fits the default corpus
GENERIC_PROMPT = "Every effort moves you"  # the book's, for any other model

MODEL_GROUP = "model (default: GPT-2's blocks, emb 128, 4 layers, 4 heads, context 128, tied head)"
OPT_GROUP = "optimisation"


@dataclass
class TrainCommandOptions(Options):
    """``numpygpt train``'s options: each field is a flag (``--batch-size``...), with its default.

    None means "chosen for you": the model's family and shape from ``--preset`` (or ``--arch``'s
    SMALL_MODEL or SMALL_LLAMA), the learning rate from the model (SMALL_MODEL_LR for the
    default model, DEFAULT_LR otherwise),
    the step budget DEFAULT_MAX_STEPS when neither ``max_steps`` nor ``epochs`` is given.
    """

    data: str | None = option(None, "UTF-8 text file to train on (default: Python's reference manual from "
                              "pydoc_data)", metavar="PATH", group="data")
    train_ratio: float = option(0.9, "fraction of the characters used for training, the rest validates",
                                check=FRACTION, metavar="R", group="data")
    stride: int | None = option(None, "offset between training windows (default: the context length)",
                                check=POSITIVE_INT, group="data")
    batch_size: int = option(8, "windows per micro-batch", check=POSITIVE_INT, metavar="B", group="data")
    tokenizer: str = option("gpt2", "GPT-2's vocabulary (with --init-from: the pretrained model's own), or a "
                            "directory with a tokenizer.json (numpygpt tokenizer train --out DIR) or tokenizer.model; "
                            "it is saved beside the checkpoint",
                            metavar="gpt2|DIR", group="data")

    arch: str | None = option(None, "the model family: gpt2 (the default), llama (Llama 3: RMSNorm, rotary positions, "
                              "SwiGLU, grouped-query attention, no biases) or qwen3 (Llama with QK-norm); a --preset "
                              "names its own", choices=("gpt2", "llama", "qwen3"), group=MODEL_GROUP)
    preset: str | None = option(None, "start from a preset: tiny, gpt2-small (gpt2), gpt2-medium, gpt2-large, gpt2-xl; "
                                "llama-tiny, llama-small, llama-3.2-1b, llama-3.2-3b, qwen3-tiny, qwen3-0.6b, "
                                "qwen3-1.7b", group=MODEL_GROUP)
    emb_dim: int | None = option(None, "", check=POSITIVE_INT, group=MODEL_GROUP)
    n_layers: int | None = option(None, "", check=POSITIVE_INT, group=MODEL_GROUP)
    n_heads: int | None = option(None, "", check=POSITIVE_INT, group=MODEL_GROUP)
    context_length: int | None = option(None, "also the length of a training window", check=POSITIVE_INT,
                                        group=MODEL_GROUP)
    n_kv_heads: int | None = option(None, "key/value heads of grouped-query attention (llama, qwen3; default: the "
                                    "preset's, else half the query heads)", check=POSITIVE_INT, group=MODEL_GROUP)
    head_dim: int | None = option(None, "size of an attention head (llama, qwen3; default emb_dim / n_heads)",
                                  check=POSITIVE_INT, group=MODEL_GROUP)
    hidden_dim: int | None = option(None, "width of the SwiGLU feed-forward (llama, qwen3; default: the preset's, "
                                    "else 3 x emb_dim)", check=POSITIVE_INT, group=MODEL_GROUP)
    drop_rate: float | None = option(None, "", check=DROP_RATE, group=MODEL_GROUP)
    tie_weights: bool | None = option(None, "share the token embedding with the output head", negatable=True,
                                      group=MODEL_GROUP)
    qkv_bias: bool | None = option(None, "bias on the Q/K/V projection", negatable=True, group=MODEL_GROUP)
    dtype: str = option("float32", "", choices=("float32", "float64"), group=MODEL_GROUP)
    init: str = option("gpt2", "random initialisation: gpt2 (N(0, 0.02)) or pytorch (the book's: PyTorch's "
                       "default nn.Embedding N(0, 1) and nn.Linear U(+-1/sqrt(fan_in)))",
                       choices=("gpt2", "pytorch"), group=MODEL_GROUP)
    init_from: str | None = option(None, "start from pretrained weights: a Hugging Face directory (gpt2, llama, qwen3; "
                                   "its own tokenizer unless --tokenizer is given) or 'gpt2', ...",
                                   metavar="DIR_OR_NAME", group=MODEL_GROUP)

    epochs: int | None = option(None, "passes over the training split", check=POSITIVE_INT, group=OPT_GROUP)
    max_steps: int | None = option(None, f"stop after this many optimiser steps (default {DEFAULT_MAX_STEPS} "
                                   "when --epochs is not given)", check=POSITIVE_INT, group=OPT_GROUP)
    lr: float | None = option(None, f"peak learning rate of AdamW (default {SMALL_MODEL_LR:g} for the default "
                              f"model, {DEFAULT_LR:g} for a preset or --init-from)", check=NONNEG_FLOAT,
                              group=OPT_GROUP)
    min_lr: float | None = option(None, "final learning rate of the cosine decay (default lr/10)",
                                  check=NONNEG_FLOAT, group=OPT_GROUP)
    weight_decay: float = option(0.1, "AdamW decoupled weight decay", check=NONNEG_FLOAT, group=OPT_GROUP)
    warmup_steps: int | None = option(None, "linear warmup steps (default 10% of the steps)", check=NONNEG_INT,
                                      group=OPT_GROUP)
    schedule: str = option("cosine", "learning-rate schedule", choices=("cosine", "constant"), group=OPT_GROUP)
    grad_clip: float = option(1.0, "clip the global gradient norm; 0 disables", check=NONNEG_FLOAT,
                              metavar="NORM", group=OPT_GROUP)
    grad_accum: int = option(1, "micro-batches per optimiser step", check=POSITIVE_INT, metavar="K", group=OPT_GROUP)
    zero: int = option(0, "ZeRO stage: 1 shards AdamW's moments over the mpiexec ranks (numpygpt.zero), 0 keeps "
                       "them whole on every rank", choices=(0, 1), check=NONNEG_INT, group=OPT_GROUP)
    fused_loss: bool = option(False, "the output head and the cross-entropy computed together, chunk by chunk of "
                              "rows, so the (B, T, V) logits never exist whole: the same loss and gradients in "
                              "less memory (numpygpt.nn.FusedLinearCrossEntropy)", negatable=True, group=OPT_GROUP)
    seed: int = option(123, "seeds weights, dropout and data order", group=OPT_GROUP)

    eval_freq: int = option(50, "evaluate every N steps", check=POSITIVE_INT, group="run")
    eval_iter: int = option(5, "batches per evaluation", check=POSITIVE_INT, group="run")
    prompt: str | None = option(None, "start of the samples printed after each epoch ('' for none)", group="run")
    sample_tokens: int = option(30, "tokens per sample", check=POSITIVE_INT, group="run")
    greedy: bool = option(False, "always take the most likely token (temperature 0)", group="run")
    temperature: float | None = option(None, f"sampling temperature, 0 is greedy (default "
                                       f"{SAMPLING_DEFAULTS['temperature']})", check=NONNEG_FLOAT, group="run")
    top_k: int | None = option(None, f"sample only from the k most likely tokens (default "
                               f"{SAMPLING_DEFAULTS['top_k']})", check=POSITIVE_INT, group="run")
    device: str = option("auto", "cpu (NumPy), cuda (CuPy) or auto; fake-cuda is for tests (NumPy that refuses what "
                         "CuPy refuses: numpygpt.fake_cuda)", choices=("cpu", "cuda", "auto", "fake-cuda"), group="run")
    out: str = option("runs/train", "where the checkpoint, plot and history go", metavar="DIR", group="run")
    checkpoint_every: int = option(100, "also checkpoint every N steps", check=POSITIVE_INT, metavar="N",
                                   group="run")
    resume: str | None = option(None, "continue the run saved in this checkpoint", metavar="CKPT", group="run")
    no_progress: bool = option(False, "no progress bar", group="run")

    def check_more(self) -> None:
        if self.resume and self.init_from:
            raise ValueError("--resume and --init-from exclude each other")


TRAIN_DEFAULTS = TrainCommandOptions.defaults()  # the defaults as a dict (read-only use)


def sampling_options(greedy: bool = False, temperature: float | None = None, top_k: int | None = None,
                     seed: int | None = None, top_p: float | None = None) -> dict:
    """``generate``'s decoding keywords for the command line's options: SAMPLING_DEFAULTS
    (temperature 0.8, top-k 40, seed 123) where an option is not given, greedy when
    ``greedy`` is set or the temperature is 0."""
    from .generate import SAMPLING_DEFAULTS as S

    if greedy or temperature == 0:
        return dict(temperature=0.0)
    chosen = dict(temperature=S["temperature"] if temperature is None else temperature,
                  top_k=S["top_k"] if top_k is None else top_k, seed=S["seed"] if seed is None else seed)
    if top_p is not None:
        chosen["top_p"] = top_p
    return chosen


def _sampling_flags(temperature, top_k=None, seed=None, top_p=None) -> str:
    """The generate options that reproduce sampling_options' result."""
    if not temperature:
        return "--greedy"
    return f"--temperature {temperature:g} --top-k {top_k} --seed {seed}" + (f" --top-p {top_p:g}" if top_p else "")


def _say(msg: str = "") -> None:
    _progress_say(msg)  # under mpiexec rank 0 alone reports


def _set_device(name: str) -> str:
    try:
        return backend.set_device(name)
    except backend.DeviceError as e:
        raise RunError(str(e)) from e


def _read_checkpoint(path):
    """The checkpoint at ``path``, read and checked once (nothing applied yet)."""
    from .checkpoint import read_checkpoint

    if not os.path.isfile(path):
        raise RunError(f"checkpoint {path!r} does not exist (or is not a file)")
    try:
        return read_checkpoint(path)
    except Exception as e:  # a damaged, foreign or mismatched file: tell the user, no traceback
        raise RunError(f"cannot load checkpoint {path!r}: {type(e).__name__}: {e}") from e


def _apply_checkpoint(saved, model, optimizer) -> None:
    try:
        saved.apply(model, optimizer)
    except ValueError as e:
        raise RunError(f"cannot load checkpoint {saved.path!r}: {e}") from e


def _from_pretrained(name: str, dtype: str = "float32", device: str | None = None, drop_rate: float = 0.0):
    """The model of a Hugging Face directory of any family (``numpygpt.from_pretrained``), or
    of a GPT-2 name; ``drop_rate``: GPT-2's dropout (Llama and Qwen3 have none)."""
    from . import hf

    family = pretrained_family(name)
    if drop_rate and family != "gpt2":
        raise RunError(f"--drop-rate: a {family} model has no dropout")
    try:
        if family == "gpt2":
            return GPTModel.from_pretrained(name, dtype=dtype, device=device, drop_rate=drop_rate)
        return hf.from_pretrained(name, dtype=dtype, device=device)
    except (OSError, ValueError, KeyError) as e:
        raise RunError(f"cannot load pretrained weights {name!r}: {e}") from e


def pretrained_family(name: str) -> str:
    """``config.json``'s model_type of a directory; "gpt2" for a name (or a directory whose
    config the loader will report on)."""
    path = os.path.join(os.path.expanduser(os.fspath(name)), "config.json")
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError):
        return "gpt2"
    return config.get("model_type", "gpt2") if isinstance(config, dict) else "gpt2"


def _load_text(opts: TrainCommandOptions) -> tuple[str, str]:
    """(text, description) of the training data."""
    from .data import default_corpus, load_text

    if opts.data is None:
        try:
            text = default_corpus()
        except RuntimeError as e:
            raise RunError(str(e)) from e
        return text, f"default corpus (Python's reference manual, {len(text):,} characters)"
    try:
        text = load_text(opts.data)
    except (OSError, UnicodeDecodeError) as e:
        raise RunError(f"--data: {e}") from e
    return text, f"{opts.data} ({len(text):,} characters)"


def _model_config(opts: TrainCommandOptions, n_vocab: int):
    """The config of a fresh model (run_model.train_config): the family's preset or small
    default and the model flags, with an embedding row for each of the tokenizer's ``n_vocab`` tokens."""
    try:
        return train_config(opts, n_vocab)
    except ValueError as e:
        raise RunError(f"model configuration: {e}") from e


def _check_model_flags_unused(given: dict, why: str, allowed=()) -> None:
    for key in MODEL_KEYS:
        if key in given and key not in allowed:
            raise RunError(f"--{key.replace('_', '-')} cannot be used {why}: the model's shape is fixed there")


def _build_loaders(text: str, opts: TrainCommandOptions, T: int, tokenizer):
    """(train loader, val loader, ValidationBits of the validation split)."""
    from .data import DataLoader, GPTDataset, split_train_val

    stride = opts.stride or T
    train_text, val_text = split_train_val(text, opts.train_ratio)
    datasets = []
    for name, part in (("training", train_text), ("validation", val_text)):
        try:
            datasets.append(GPTDataset.from_text(part, tokenizer, max_length=T, stride=stride))
        except ValueError as e:
            src = opts.data or "the default corpus"
            raise RunError(f"{src}: the {name} split is too short: {e}") from e
    train_set, val_set = datasets
    B = opts.batch_size
    if len(train_set) < B:
        raise RunError(f"the training split has {len(train_set)} windows of {T} tokens, fewer than "
                       f"--batch-size {B}: use more text or a smaller --batch-size, --context-length or --stride")
    train_loader = DataLoader(train_set, B, shuffle=True, drop_last=True, seed=opts.seed)
    val_loader = DataLoader(val_set, B, shuffle=False, drop_last=False)
    return train_loader, val_loader, ValidationBits(len(val_set.token_ids), len(val_text))


def _load_tokenizer(opts: TrainCommandOptions, given: dict, saved):
    """The run's tokenizer: --tokenizer's; when resuming, the one saved beside the checkpoint
    (a --tokenizer given again must be that one)."""
    from .tokenizer import TokenizerError, check_same_tokenizer, load_saved_tokenizer, load_tokenizer

    try:
        if saved is None:
            return load_tokenizer(opts.tokenizer)
        record = (saved.extra or {}).get("tokenizer")
        if "tokenizer" not in given:
            return load_saved_tokenizer(os.path.dirname(os.path.abspath(saved.path)), record)
        tokenizer = load_tokenizer(opts.tokenizer)
        if isinstance(record, dict):
            check_same_tokenizer(tokenizer, record, opts.resume)
        return tokenizer
    except (TokenizerError, OSError) as e:
        raise RunError(f"--tokenizer: {e}") from e


def _tokenizer_and_model(opts: TrainCommandOptions, given: dict, saved, device: str):
    """The run's tokenizer and the model, whose vocabulary must be the tokenizer's. Pretrained
    weights (--init-from) come first and bring their own tokenizer unless --tokenizer is given."""
    if saved is None and opts.init_from:
        model = _build_model(opts, given, None, device, n_vocab=None)
        if "tokenizer" in given:
            tokenizer = _load_tokenizer(opts, given, None)
        else:
            tokenizer = _pretrained_tokenizer(opts.init_from, model)
    else:
        tokenizer = _load_tokenizer(opts, given, saved)
        model = _build_model(opts, given, saved, device, tokenizer.n_vocab)
    _check_tokenizer_fits(tokenizer, model)
    return tokenizer, model


def _pretrained_tokenizer(source, model):
    """The tokenizer of pretrained weights: the directory's own (GPT-2's for GPT-2 without one)."""
    from .tokenizer import TokenizerError, model_tokenizer

    try:
        return model_tokenizer(source, model.cfg.model_type, model.cfg.vocab_size)
    except (TokenizerError, OSError) as e:
        raise RunError(f"{source}: {e}") from e


def _check_tokenizer_fits(tokenizer, model, prefix: str = "--tokenizer: ") -> None:
    """A model may have more embedding rows than the tokenizer has tokens (published models pad
    theirs; a fresh model has exactly one row a token), never fewer."""
    from .tokenizer import TokenizerError, check_vocab_size

    try:
        check_vocab_size(tokenizer, model.cfg.vocab_size, padded=True)
    except TokenizerError as e:
        raise RunError(f"{prefix}{e}") from e


def _save_tokenizer(tokenizer, run: RunFolder) -> dict:
    """Save the tokenizer beside the checkpoint (the main process; GPT-2's needs no file) and
    return the record the checkpoint keeps of it."""
    from .tokenizer import save_tokenizer, tokenizer_record

    try:
        return save_tokenizer(tokenizer, run.out) if run.is_main else tokenizer_record(tokenizer)
    except OSError as e:
        raise RunError(f"cannot save the tokenizer into {run.out}: {e}") from e


def _describe_tokenizer(record: dict, val_bits: ValidationBits) -> str:
    where = f", saved as {record['file']} beside the checkpoint" if "file" in record else ""
    return (f"{record['name']} ({record['n_vocab']:,} tokens{where}); "
            f"{val_bits.n_chars / max(val_bits.n_tokens, 1):.2f} characters a token on the validation split")


@dataclass
class ValidationBits:
    """Validation losses in bits per character, from the validation split's token and
    character counts; ``hook`` is the ``on_evaluate`` hook that prints and records them."""

    n_tokens: int
    n_chars: int

    def __call__(self, loss: float) -> float:
        return bits_per_character(loss, self.n_tokens, self.n_chars)

    def hook(self, model, state, say) -> dict:
        bits = self(state.history["val_losses"][-1])
        say(f"    val bits per character {bits:.3f}")
        return {"val_bits_per_char": bits}


def _default_prompt(opts: TrainCommandOptions, text: str) -> str:
    if opts.prompt is not None:
        return opts.prompt
    if opts.data is None:
        return DEFAULT_PROMPT
    return " ".join(text.split()[:4])  # a start the model has seen


def run_training(given) -> dict:
    """Everything ``numpygpt train`` does. ``given``: a TrainCommandOptions, or a dict of the
    options set explicitly (``parse_train_args``'s result), the defaults (or, with ``resume``,
    the resumed run's own options) filling the rest.

    Returns {"history", "model", "checkpoint", "plot", "history_path", "seconds", "final_losses", "tokenizer"}
    (final_losses: the last step's (train, val) losses when the schedule of evaluations missed it, else None).
    """
    t_start = time.perf_counter()
    if isinstance(given, TrainCommandOptions):
        given = given.to_dict()
    comm = distributed.init()  # MPI under mpiexec, else this process alone
    opts, saved, resume_state = _resolve_options(given)
    comm.check_batch_size(opts.batch_size)
    device = _set_device(opts.device)
    comm.use_device(device)
    text, data_desc = _load_text(opts)
    tokenizer, model = _tokenizer_and_model(opts, given, saved, device)
    # the window length: the model's context, or a shorter one asked of a pretrained model
    T = opts.context_length or model.cfg.context_length
    if T > model.cfg.context_length:
        raise RunError(f"--context-length {T} exceeds the model's context of {model.cfg.context_length}")
    train_loader, val_loader, val_bits = _build_loaders(text, opts, T, tokenizer)
    optimizer = _optimizer(opts, model, comm)
    if saved is not None:
        _restore(saved, resume_state, model, optimizer, train_loader, opts)
        del saved
    total, epochs = _step_budget(opts, len(train_loader))
    scheduler, lr_desc = _schedule(opts, total)
    if resume_state is not None and resume_state.global_step >= total:
        raise RunError(f"{opts.resume} is already at step {resume_state.global_step:,}, and this run stops at step "
                       f"{total:,}: nothing to do; give a larger --max-steps (or --epochs) to continue it")
    try:
        run = RunFolder(opts.out, is_main=comm.is_main)
    except OSError as e:
        raise RunError(str(e)) from e
    tokenizer_record = _save_tokenizer(tokenizer, run)
    _print_plan(opts, model, device, data_desc, train_loader, val_loader, T, total, lr_desc, resume_state, comm,
                _describe_tokenizer(tokenizer_record, val_bits))

    prompt = _default_prompt(opts, text)
    sampling = sampling_options(opts.greedy, opts.temperature, opts.top_k, opts.seed)
    # the options as given, not the derived step count, so a later --max-steps can extend the run
    run_options = {**opts.to_dict(), "resume": None, "max_steps": given.get("max_steps", opts.max_steps),
                   "epochs": given.get("epochs", opts.epochs)}
    options = TrainOptions(
        grad_accum_steps=opts.grad_accum, max_grad_norm=opts.grad_clip or None, scheduler=scheduler,
        max_steps=total, checkpoint_path=run.checkpoint, checkpoint_every=opts.checkpoint_every,
        resume_state=resume_state, run_options=run_options, extra={"tokenizer": tokenizer_record},
        progress=not opts.no_progress, sample_tokens=opts.sample_tokens, sampling=sampling,
        on_evaluate=val_bits.hook,
        comm=getattr(optimizer, "comm", None),  # ZeRO: gradients reduce-scattered into the optimiser
        objective=FusedNextTokenObjective() if opts.fused_loss else None)
    history = run.train(model, train_loader, val_loader, optimizer, epochs, opts.eval_freq, opts.eval_iter,
                        start_context=prompt or None, tokenizer=tokenizer, options=options)
    final = _write_outputs(run, model, history, train_loader, val_loader, opts.eval_iter, comm)
    seconds = time.perf_counter() - t_start
    _print_summary(run, history, final, seconds, prompt, opts, sampling, val_bits)
    return {"history": history, "model": model, "checkpoint": run.checkpoint, "plot": run.path("loss.png"),
            "history_path": run.path("history.json"), "seconds": seconds, "final_losses": final, "tokenizer": tokenizer}


def _optimizer(opts: TrainCommandOptions, model, comm):
    """AdamW (sharded over the ranks with --zero 1) at --lr, or the model's default rate."""
    if opts.lr is None:
        opts.lr = SMALL_MODEL_LR if not (opts.preset or opts.init_from) else DEFAULT_LR
    groups = param_groups(model, opts.weight_decay)
    if opts.zero:
        return ShardedAdamW(groups, comm, lr=opts.lr, weight_decay=opts.weight_decay)
    return AdamW(groups, lr=opts.lr, weight_decay=opts.weight_decay)


def _resolve_options(given: dict):
    """(the options, the checkpoint read for --resume or None, its TrainState or None). A resumed
    run takes its stored options where ``given`` says nothing."""
    try:
        TrainCommandOptions.from_dict(given)  # unknown names: TypeError
    except TypeError as e:
        raise TypeError(f"unknown training options: {str(e).split(': ', 1)[-1]}") from e
    saved, resume_state, stored = None, None, {}
    if given.get("resume") and not given.get("init_from"):
        _check_model_flags_unused(given, "with --resume")
        saved = _read_checkpoint(given["resume"])  # read once: weights, optimiser, RNG, position, options
        try:
            resume_state = TrainState.from_checkpoint(saved)
        except ValueError as e:
            raise RunError(f"cannot resume from {given['resume']!r}: {e}") from e
        stored = {k: v for k, v in (resume_state.run_options or {}).items()
                  if k in TRAIN_DEFAULTS and k not in ("resume", "init_from", "no_progress")}
    opts = TrainCommandOptions.from_dict({**stored, **given})
    try:
        opts.validate()
    except ValueError as e:
        raise RunError(str(e)) from e
    return opts, saved, resume_state


def _build_model(opts: TrainCommandOptions, given: dict, saved, device: str, n_vocab: int):
    """The model: a resumed run's (its weights come with the optimiser state), pretrained
    GPT-2 (--init-from), or a fresh one drawn from the seed."""
    if saved is not None:
        with backend.device(device):
            return build_model(saved.config, init=False)
    if opts.init_from:
        _check_model_flags_unused(given, "with --init-from", allowed=("context_length", "drop_rate"))
        return _from_pretrained(opts.init_from, dtype=opts.dtype, device=device, drop_rate=opts.drop_rate or 0.0)
    cfg = _model_config(opts, n_vocab)
    backend.manual_seed(opts.seed)
    if isinstance(cfg, GPTConfig):
        return GPTModel(cfg, seed=opts.seed, init=opts.init)
    return build_model(cfg, seed=opts.seed)


def _restore(saved, resume_state, model, optimizer, train_loader, opts: TrainCommandOptions) -> None:
    """The resumed run's weights, optimiser state and dropout generator, after checking that
    its data are these."""
    theirs, mine = resume_state.loader_state or {}, train_loader.state_dict()
    for key in ("batch_size", "n_windows"):
        if key in theirs and theirs[key] != mine[key]:
            raise RunError(f"{opts.resume} was trained with {key} {theirs[key]}, this run has {mine[key]}: "
                           "resume with the same data, --batch-size, --stride and --train-ratio")
    _apply_checkpoint(saved, model, optimizer)


def _step_budget(opts: TrainCommandOptions, n_batches: int) -> tuple[int, int]:
    """(optimiser steps, epochs): --max-steps, --epochs, or the default step budget."""
    steps_per_epoch = n_batches // opts.grad_accum
    if steps_per_epoch == 0:
        raise RunError(f"--grad-accum {opts.grad_accum} exceeds the {n_batches} batches of an epoch")
    max_steps, epochs = opts.max_steps, opts.epochs
    if max_steps is None and epochs is None:
        max_steps = DEFAULT_MAX_STEPS
    if epochs is None:
        epochs = math.ceil(max_steps / steps_per_epoch)
    total = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    return total, epochs


def _schedule(opts: TrainCommandOptions, total: int):
    """(the learning-rate scheduler or None, its description)."""
    if opts.schedule != "cosine":
        return None, f"AdamW lr {opts.lr:g} constant"
    warmup = opts.warmup_steps if opts.warmup_steps is not None else round(0.1 * total)
    warmup = max(0, min(warmup, total))
    min_lr = opts.min_lr if opts.min_lr is not None else opts.lr / 10
    # warmup starts at lr / warmup rather than 0, so no step is spent at lr = 0
    scheduler = CosineWithWarmup(opts.lr, total, warmup, min_lr=min_lr, initial_lr=opts.lr / warmup if warmup else 0.0)
    return scheduler, f"AdamW lr {opts.lr:g}, {warmup} warmup steps, cosine to {min_lr:g}"


def _print_plan(opts, model, device, data_desc, train_loader, val_loader, T, total, lr_desc, resume_state, comm,
                tokenizer_desc: str):
    n_train, n_val = len(train_loader.dataset.token_ids), len(val_loader.dataset.token_ids)
    B, steps_per_epoch = opts.batch_size, len(train_loader) // opts.grad_accum
    _say(f"device      {device} ({'CuPy' if device == 'cuda' else 'NumPy'})")
    if comm.world_size > 1:
        _say(f"ranks       {comm.describe()}")
    where = (f" (resumed from {opts.resume})" if opts.resume else f" (from {opts.init_from})" if opts.init_from else "")
    _say(f"model       {describe_config(model.cfg)}{where}")
    _say(f"parameters  {model.num_parameters():,}")
    _say(f"data        {data_desc}")
    _say(f"tokenizer   {tokenizer_desc}")
    _say(f"tokens      train {n_train:,} ({len(train_loader.dataset):,} windows of {T}), "
         f"val {n_val:,} ({len(val_loader.dataset):,} windows)")
    _say(f"plan        {total:,} steps ({total / steps_per_epoch:.2f} epochs of {steps_per_epoch:,} steps), "
         f"{opts.grad_accum} x {B} x {T} tokens a step"
         + (f" ({B // comm.world_size} rows a rank)" if comm.world_size > 1 else "") + f"; {lr_desc}")
    if resume_state is not None:
        _say(f"resuming    at step {resume_state.global_step:,}")
    _say(f"output      {opts.out}")
    _say()


def _write_outputs(run: RunFolder, model, history, train_loader, val_loader, eval_iter: int, comm):
    """The loss plot and the history (rank 0); returns the final (train, val) losses when the
    last evaluation was not at the last step, else None."""
    final = None
    if comm.is_main:  # under mpiexec the others wait at the barrier below
        if history["global_step"] and (not history["track_steps"] or history["track_steps"][-1] != history["global_step"]):
            final = evaluate_model(model, train_loader, val_loader, eval_iter)
        plot_losses(history, run.path("loss.png"))
        run.write_json("history.json", history)
    comm.barrier()
    return final


def _print_summary(run: RunFolder, history, final, seconds, prompt, opts, sampling, to_bits) -> None:
    """``to_bits(val_loss)``: the validation loss in bits per character (a ValidationBits)."""
    _say()
    if history["val_losses"]:
        _say(f"last evaluation (step {history['track_steps'][-1]}): train loss {history['train_losses'][-1]:.3f}, "
             f"val loss {history['val_losses'][-1]:.3f}, val perplexity {history['perplexities'][-1]:.1f}, "
             f"val bits per character {to_bits(history['val_losses'][-1]):.3f}")
    if final is not None:
        _say(f"final (step {history['global_step']}): train loss {final[0]:.3f}, val loss {final[1]:.3f}, "
             f"val perplexity {perplexity(final[1]):.1f}, val bits per character {to_bits(final[1]):.3f}")
    _say(f"checkpoint  {run.checkpoint}")
    _say(f"loss plot   {run.path('loss.png')}")
    _say(f"history     {run.path('history.json')}")
    _say(f"time        {seconds:.0f} s")
    if prompt:
        _say(f"sample more python -m numpygpt generate --checkpoint {shlex.quote(run.checkpoint)} "
             f"--prompt {shlex.quote(prompt)} --max-new-tokens {opts.sample_tokens} {_sampling_flags(**sampling)}")


def run_generate(prompt: str | None = None, checkpoint=None, model=None, max_new_tokens: int = 50,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, greedy: bool = False, device: str = "auto", dtype: str = "float32",
                 use_cache: bool = True) -> str:
    """Everything ``numpygpt generate`` does: load a checkpoint (``checkpoint``) or a model
    (``model``: anything ``load_model`` reads), continue ``prompt`` and decode with the model's
    own tokenizer, print and return the text.

    Decoding: ``sampling_options(greedy, temperature, top_k, seed, top_p)``, so by default
    temperature 0.8, top-k 40, seed 123; the settings are printed on stderr. ``prompt``
    None: DEFAULT_PROMPT for a checkpoint trained on the default corpus, else GENERIC_PROMPT.
    """
    if (checkpoint is None) == (model is None):
        raise RunError("give exactly one of a checkpoint and a model")
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise RunError(f"checkpoint {checkpoint!r} does not exist (or is not a file)")
    gpt, tokenizer, saved = load_model(checkpoint if checkpoint is not None else model, device, dtype)
    options = ((saved.extra or {}).get("cli_options") or {}) if saved is not None else {}
    default_corpus_run = "data" in options and options["data"] is None
    if prompt is None:
        prompt = DEFAULT_PROMPT if default_corpus_run else GENERIC_PROMPT
    if not prompt:
        raise RunError("--prompt must not be empty")
    gpt.eval()
    sampling = sampling_options(greedy, temperature, top_k, seed, top_p)
    try:
        text = generate_text(gpt, prompt, max_new_tokens, tokenizer=tokenizer, use_cache=use_cache, **sampling)
    except ValueError as e:  # a prompt the model cannot read, a temperature that overflows...
        raise RunError(f"cannot generate: {e}") from e
    # the settings go to stderr, so that stdout is the text alone
    how = (f"sampling with {describe_sampling(**sampling)} (--greedy for greedy decoding)"
           if sampling["temperature"] else "greedy decoding")
    print(f"numpygpt: {how}", file=sys.stderr, flush=True)
    print(text, flush=True)
    return text


def load_model(source, device: str = "auto", dtype: str = "float32"):
    """(model, tokenizer, the Checkpoint read or None) of ``source``, the model decoding with its
    own tokenizer, whatever its family (GPT-2, Llama 3, Qwen3):

    - a numpygpt checkpoint, or a run folder holding one (``checkpoint.safetensors``, no
      ``config.json``): the tokenizer it was trained with, saved beside it;
    - a Hugging Face directory (``config.json``, ``model_type`` gpt2, llama or qwen3): its
      ``tokenizer.json`` or ``tokenizer.model``, or GPT-2's BPE for a GPT-2 model without one;
    - a GPT-2 name ('gpt2', 'gpt2-medium', ...): GPT-2's BPE.

    A tokenizer whose vocabulary does not fit the model is one RunError (check_vocab_size).
    """
    device = _set_device(device)
    path = checkpoint_in(source)
    if path is not None:
        saved = _read_checkpoint(path)
        tokenizer = _checkpoint_tokenizer(saved)
        model = _build_from_checkpoint(saved, device)
        _check_tokenizer_fits(tokenizer, model, prefix=f"{path}: ")
        return model, tokenizer, saved
    model = _from_pretrained(source, dtype=dtype, device=device)
    return model, _pretrained_tokenizer(source, model), None


def checkpoint_in(source) -> str | None:
    """The numpygpt checkpoint ``source`` names: the file itself, or a run folder's (a folder with
    ``checkpoint.safetensors`` and no Hugging Face ``config.json``); None for anything else."""
    from .scaffold import CHECKPOINT_FILE

    path = os.path.expanduser(os.fspath(source))
    if os.path.isfile(path):
        return path
    if os.path.isfile(os.path.join(path, CHECKPOINT_FILE)) and not os.path.isfile(os.path.join(path, "config.json")):
        return os.path.join(path, CHECKPOINT_FILE)
    return None


def _checkpoint_tokenizer(saved):
    """The tokenizer a checkpoint was trained with (saved beside it), checked against its record."""
    from .tokenizer import TokenizerError, load_saved_tokenizer

    try:
        return load_saved_tokenizer(os.path.dirname(os.path.abspath(saved.path)), (saved.extra or {}).get("tokenizer"))
    except (TokenizerError, OSError) as e:
        raise RunError(str(e)) from e


def _build_from_checkpoint(saved, device: str):
    try:
        return saved.build_model(device)
    except ValueError as e:
        raise RunError(f"cannot load checkpoint {saved.path!r}: {e}") from e


def run_gradcheck(seed: int = 0, tol: float = 1e-6, verbose: bool = False, device: str = "cpu") -> int:
    """Everything ``numpygpt gradcheck`` does: every check of ``gradcheck.gradcheck_checks``
    on ``device``, a table printed; returns 0 if all are within ``tol``, else 1."""
    from .gradcheck import run_gradchecks

    device = _set_device(device)
    with backend.device(device):
        failed = run_gradchecks(seed=seed, tol=tol, verbose=verbose, device=device)
    return 1 if failed else 0
