"""The ``numpygpt`` command (also ``python -m numpygpt``)::

    numpygpt train                      # a small GPT on Python's reference manual, a few minutes on CPU
    numpygpt train --data book.txt --preset gpt2-small --context-length 256 --max-steps 500
    numpygpt train --resume runs/train/checkpoint.safetensors --max-steps 400
    numpygpt generate --checkpoint runs/train/checkpoint.safetensors --prompt "The for statement"
    numpygpt generate --model gpt2 --prompt "Every effort moves you" --temperature 0.8 --top-k 40
    numpygpt gradcheck                  # finite-difference check of every layer's backward

``examples/train_gpt.py`` and ``examples/generate.py`` run the same code
(``train_main`` and ``generate_main``). Mistakes in the arguments are argparse usage
errors; a missing file, a text too short for one window, an unreadable checkpoint or an
unavailable device is one line on stderr and exit code 2; a diverged run exits with 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

__all__ = ["main", "train_main", "generate_main", "parse_train_args", "run_training", "run_cli",
           "CLIError", "TRAIN_DEFAULTS"]


class CLIError(Exception):
    """A problem with the user's input: printed as one line, exit code ``code``."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


# -- train: options ---------------------------------------------------------------------------

# The model that `numpygpt train` builds when no --preset is given: small enough to learn
# visibly in a few minutes on two CPU cores. Most of its time goes to the 50257-way
# output layer, so the head shares the token embedding (half the embedding parameters
# and optimiser work) and the blocks stay narrow.
SMALL_MODEL = dict(emb_dim=128, n_layers=4, n_heads=4, context_length=128, drop_rate=0.0,
                   tie_weights=True, qkv_bias=False)
DEFAULT_MAX_STEPS = 200  # used when neither --max-steps nor --epochs is given
DEFAULT_PROMPT = "The for statement is used to"  # fits the default corpus

MODEL_KEYS = ("preset", "emb_dim", "n_layers", "n_heads", "context_length", "drop_rate",
              "tie_weights", "qkv_bias")

TRAIN_DEFAULTS = dict(
    data=None, preset=None, emb_dim=None, n_layers=None, n_heads=None, context_length=None,
    drop_rate=None, tie_weights=None, qkv_bias=None, dtype="float32", init="gpt2",
    batch_size=8, stride=None, epochs=None, max_steps=None, lr=1e-3, min_lr=None,
    weight_decay=0.1, warmup_steps=None, schedule="cosine", grad_clip=1.0, grad_accum=1,
    eval_freq=25, eval_iter=5, train_ratio=0.9, seed=123, device="auto", out="runs/train",
    resume=None, init_from=None, prompt=None, sample_tokens=30, checkpoint_every=100,
    no_progress=False,
)


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def _nonneg_float(s: str) -> float:
    v = float(s)
    if not v >= 0.0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def _fraction(s: str) -> float:
    v = float(s)
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {s}")
    return v


def _drop_rate(s: str) -> float:
    v = float(s)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {s}")
    return v


def _add_train_args(p: argparse.ArgumentParser) -> None:
    """Every option defaults to "not given" (SUPPRESS on the parser); TRAIN_DEFAULTS fills
    the gaps later, after a resumed checkpoint's own options, so --resume continues a run
    with the settings it was started with unless told otherwise."""
    D = TRAIN_DEFAULTS
    data = p.add_argument_group("data")
    data.add_argument("--data", metavar="PATH",
                      help="UTF-8 text file to train on (default: Python's reference manual from pydoc_data)")
    data.add_argument("--train-ratio", type=_fraction, metavar="R",
                      help=f"fraction of the characters used for training, the rest validates (default {D['train_ratio']})")
    data.add_argument("--stride", type=_positive_int, help="offset between training windows (default: the context length)")
    data.add_argument("--batch-size", type=_positive_int, metavar="B", help=f"windows per micro-batch (default {D['batch_size']})")

    model = p.add_argument_group("model (default: emb 128, 4 layers, 4 heads, context 128, tied head)")
    model.add_argument("--preset", help="start from a preset: tiny, gpt2-small (gpt2), gpt2-medium, gpt2-large, gpt2-xl")
    model.add_argument("--emb-dim", type=_positive_int)
    model.add_argument("--n-layers", type=_positive_int)
    model.add_argument("--n-heads", type=_positive_int)
    model.add_argument("--context-length", type=_positive_int, help="also the length of a training window")
    model.add_argument("--drop-rate", type=_drop_rate)
    model.add_argument("--tie-weights", action=argparse.BooleanOptionalAction,
                       help="share the token embedding with the output head")
    model.add_argument("--qkv-bias", action=argparse.BooleanOptionalAction, help="bias on the Q/K/V projection")
    model.add_argument("--dtype", choices=("float32", "float64"), help=f"(default {D['dtype']})")
    model.add_argument("--init", choices=("gpt2", "pytorch"),
                       help="random initialisation: gpt2 (N(0, 0.02), default) or pytorch (the book's: "
                            "PyTorch's default nn.Embedding N(0, 1) and nn.Linear U(+-1/sqrt(fan_in)))")
    model.add_argument("--init-from", metavar="DIR_OR_NAME",
                       help="start from pretrained GPT-2 weights (a Hugging Face directory or 'gpt2', ...)")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=_positive_int, help="passes over the training split")
    opt.add_argument("--max-steps", type=_positive_int,
                     help=f"stop after this many optimiser steps (default {DEFAULT_MAX_STEPS} when --epochs is not given)")
    opt.add_argument("--lr", type=_nonneg_float, help=f"peak learning rate of AdamW (default {D['lr']})")
    opt.add_argument("--min-lr", type=_nonneg_float, help="final learning rate of the cosine decay (default lr/10)")
    opt.add_argument("--weight-decay", type=_nonneg_float, help=f"AdamW decoupled weight decay (default {D['weight_decay']})")
    opt.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 10%% of the steps)")
    opt.add_argument("--schedule", choices=("cosine", "constant"), help="learning-rate schedule (default cosine)")
    opt.add_argument("--grad-clip", type=_nonneg_float, metavar="NORM",
                     help=f"clip the global gradient norm; 0 disables (default {D['grad_clip']})")
    opt.add_argument("--grad-accum", type=_positive_int, metavar="K", help="micro-batches per optimiser step (default 1)")
    opt.add_argument("--seed", type=int, help=f"seeds weights, dropout and data order (default {D['seed']})")

    run = p.add_argument_group("run")
    run.add_argument("--eval-freq", type=_positive_int, help=f"evaluate every N steps (default {D['eval_freq']})")
    run.add_argument("--eval-iter", type=_positive_int, help=f"batches per evaluation (default {D['eval_iter']})")
    run.add_argument("--prompt", help="start of the samples printed after each epoch ('' for none)")
    run.add_argument("--sample-tokens", type=_positive_int, help=f"tokens per sample (default {D['sample_tokens']})")
    run.add_argument("--device", choices=("cpu", "cuda", "auto"), help="cpu (NumPy), cuda (CuPy) or auto (default)")
    run.add_argument("--out", metavar="DIR", help=f"where the checkpoint, plot and history go (default {D['out']})")
    run.add_argument("--checkpoint-every", type=_positive_int, metavar="N",
                     help=f"also checkpoint every N steps (default {D['checkpoint_every']})")
    run.add_argument("--resume", metavar="CKPT", help="continue the run saved in this checkpoint")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_train_parser(prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description or "Train a GPT model.",
                                argument_default=argparse.SUPPRESS)
    _add_train_args(p)
    return p


def parse_train_args(argv) -> dict:
    """The options given on the command line (only those), as a dict."""
    return vars(build_train_parser().parse_args(argv))


# -- train: the run -----------------------------------------------------------------------------

def _say(msg: str = "") -> None:
    from .distributed import current

    comm = current()
    if comm is None or comm.is_main:  # under mpiexec rank 0 alone reports
        print(msg, flush=True)


def _set_device(name: str) -> str:
    from . import backend

    try:
        return backend.set_device(name)
    except backend.DeviceError as e:
        raise CLIError(str(e)) from e


def _load_checkpoint(path, **kw) -> dict:
    from .checkpoint import load_checkpoint

    if not os.path.isfile(path):
        raise CLIError(f"checkpoint {path!r} does not exist (or is not a file)")
    try:
        return load_checkpoint(path, **kw)
    except Exception as e:  # a damaged, foreign or mismatched file: tell the user, no traceback
        raise CLIError(f"cannot load checkpoint {path!r}: {type(e).__name__}: {e}") from e


def _from_pretrained(name: str, **kw):
    from .model import GPTModel

    try:
        return GPTModel.from_pretrained(name, **kw)
    except (OSError, ValueError, KeyError) as e:
        raise CLIError(f"cannot load pretrained weights {name!r}: {e}") from e


def _load_text(opts: dict) -> tuple[str, str]:
    """(text, description) of the training data."""
    from .data import default_corpus, load_text

    if opts["data"] is None:
        try:
            text = default_corpus()
        except RuntimeError as e:
            raise CLIError(str(e)) from e
        return text, f"default corpus (Python's reference manual, {len(text):,} characters)"
    try:
        text = load_text(opts["data"])
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"--data: {e}") from e
    return text, f"{opts['data']} ({len(text):,} characters)"


def _model_config(opts: dict):
    """GPTConfig for a fresh model: the preset (or the small default) and the model flags."""
    from .config import GPTConfig
    from .tokenizer import N_VOCAB

    try:
        base = GPTConfig.preset(opts["preset"]).to_dict() if opts["preset"] else {**GPTConfig().to_dict(), **SMALL_MODEL}
        for key in MODEL_KEYS[1:]:
            if opts[key] is not None:
                base[key] = opts[key]
        # the data are GPT-2 BPE ids, so the embedding needs GPT-2's vocabulary
        base.update(vocab_size=N_VOCAB, dtype=opts["dtype"])
        return GPTConfig(**base)
    except ValueError as e:
        raise CLIError(f"model configuration: {e}") from e


def _check_model_flags_unused(given: dict, why: str, allowed=()) -> None:
    for key in MODEL_KEYS:
        if key in given and key not in allowed:
            raise CLIError(f"--{key.replace('_', '-')} cannot be used {why}: the model's shape is fixed there")


def init_pytorch_defaults(model, seed: int | None = 0) -> None:
    """Re-initialise ``model`` the way the book's PyTorch GPTModel starts out: PyTorch's
    default ``nn.Embedding`` (N(0, 1)) and ``nn.Linear`` (weight and bias
    U(-1/sqrt(fan_in), 1/sqrt(fan_in))) initialisations, LayerNorm scale 1 and shift 0.

    GPT-2's N(0, 0.02) makes the token and position embeddings 50 times smaller, so the
    residual stream starts out dominated by the blocks; with the book's short constant-lr
    chapter-5 run that model stalls near loss 6 (PyTorch itself does the same from the
    same weights), while from these weights it memorises the story as the book shows.
    Drawn on the host from one seeded generator, then moved to the model's device.
    """
    import math as _math

    from . import backend
    from .model import OutputHead
    from .nn import Embedding, Linear

    rng = backend.host_rng(seed)

    def put(p, w):
        p.data = backend.to_device(w, dtype=p.dtype, device_name=backend.device_of(p.data))
        p.grad = None

    def uniform(p, fan_in):
        bound = 1.0 / _math.sqrt(fan_in)
        put(p, rng.uniform(-bound, bound, p.shape).astype("float32"))

    seen = set()  # a tied head is the token embedding: initialise it once, as an embedding
    for m in model.modules():
        if isinstance(m, Embedding) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            put(m.weight, rng.standard_normal(m.weight.shape, dtype="float32"))
        elif isinstance(m, Linear):
            fan_in = m.weight.shape[0]  # weights are stored (in, out)
            uniform(m.weight, fan_in)
            if m.bias is not None:
                uniform(m.bias, fan_in)
        elif isinstance(m, OutputHead) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            uniform(m.weight, m.weight.shape[1])  # (V, C): logits = x @ W.T, fan_in C
        # LayerNorm keeps scale 1 and shift 0, which GPT-2's scheme also uses


def _describe_config(cfg) -> str:
    return (f"emb_dim {cfg.emb_dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, context {cfg.context_length}, "
            f"vocab {cfg.vocab_size}, drop_rate {cfg.drop_rate}, qkv_bias {cfg.qkv_bias}, "
            f"{'tied' if cfg.tie_weights else 'untied'} head, {cfg.dtype}")


def _build_loaders(text: str, opts: dict, T: int):
    from .data import DataLoader, GPTDataset, split_train_val
    from .tokenizer import get_tokenizer

    stride = opts["stride"] or T
    train_text, val_text = split_train_val(text, opts["train_ratio"])
    tokenizer = get_tokenizer()
    datasets = []
    for name, part in (("training", train_text), ("validation", val_text)):
        try:
            datasets.append(GPTDataset.from_text(part, tokenizer, max_length=T, stride=stride))
        except ValueError as e:
            src = opts["data"] or "the default corpus"
            raise CLIError(f"{src}: the {name} split is too short: {e}") from e
    train_set, val_set = datasets
    B = opts["batch_size"]
    if len(train_set) < B:
        raise CLIError(f"the training split has {len(train_set)} windows of {T} tokens, fewer than "
                       f"--batch-size {B}: use more text or a smaller --batch-size, --context-length or --stride")
    train_loader = DataLoader(train_set, B, shuffle=True, drop_last=True, seed=opts["seed"])
    val_loader = DataLoader(val_set, B, shuffle=False, drop_last=False)
    return train_loader, val_loader, tokenizer


def _default_prompt(opts: dict, text: str) -> str:
    if opts["prompt"] is not None:
        return opts["prompt"]
    if opts["data"] is None:
        return DEFAULT_PROMPT
    return " ".join(text.split()[:4])  # a start the model has seen


def run_training(given: dict) -> dict:
    """Everything ``numpygpt train`` does. ``given``: the options set explicitly
    (``parse_train_args``'s result); TRAIN_DEFAULTS (or a resumed run's options) fill the rest.

    Returns {"history", "model", "checkpoint", "plot", "history_path", "seconds", "final_losses"}
    (the last step's (train, val) losses when the schedule of evaluations missed it, else None).
    """
    from . import backend, distributed
    from .optim import AdamW, CosineWithWarmup, param_groups
    from .train import evaluate_model, perplexity, plot_losses, train_model

    t_start = time.perf_counter()
    unknown = set(given) - set(TRAIN_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown training options: {sorted(unknown)}")
    comm = distributed.init()  # MPI under mpiexec, else this process alone
    if given.get("resume") and given.get("init_from"):
        raise CLIError("--resume and --init-from exclude each other")
    stored, model = {}, None
    if given.get("resume"):
        _check_model_flags_unused(given, "with --resume")
        # read on the host first: the run's own options (device included) are inside
        first = _load_checkpoint(given["resume"], device="cpu")
        model = first["model"]
        stored = {k: v for k, v in ((first.get("extra") or {}).get("cli_options") or {}).items()
                  if k in TRAIN_DEFAULTS and k not in ("resume", "init_from", "no_progress")}
        del first
    opts = {**TRAIN_DEFAULTS, **stored, **given}
    comm.check_batch_size(opts["batch_size"])
    device = _set_device(opts["device"])
    comm.use_device(device)

    text, data_desc = _load_text(opts)

    # the model (and, for a resumed run, its optimiser state below)
    if model is not None:
        model.to(device)
    elif opts["init_from"]:
        _check_model_flags_unused(given, "with --init-from", allowed=("context_length", "drop_rate"))
        model = _from_pretrained(opts["init_from"], dtype=opts["dtype"], device=device,
                                 drop_rate=opts["drop_rate"] or 0.0)
    else:
        from .model import GPTModel

        backend.manual_seed(opts["seed"])
        model = GPTModel(_model_config(opts), seed=opts["seed"])
        if opts["init"] == "pytorch":
            init_pytorch_defaults(model, opts["seed"])
    cfg = model.cfg
    # the window length: the model's context, or a shorter one asked of a pretrained model
    T = opts["context_length"] or cfg.context_length
    if T > cfg.context_length:
        raise CLIError(f"--context-length {T} exceeds the model's context of {cfg.context_length}")

    train_loader, val_loader, tokenizer = _build_loaders(text, opts, T)

    optimizer = AdamW(param_groups(model, opts["weight_decay"]), lr=opts["lr"], weight_decay=opts["weight_decay"])
    resume_state = None
    if opts["resume"]:
        # the weights again plus the optimiser state and the dropout generator
        resume_state = _load_checkpoint(opts["resume"], model=model, optimizer=optimizer, device=device)
        saved = (resume_state.get("extra") or {}).get("loader_state") or {}
        mine = train_loader.state_dict()
        for key in ("batch_size", "n_windows"):
            if key in saved and saved[key] != mine[key]:
                raise CLIError(f"{opts['resume']} was trained with {key} {saved[key]}, this run has {mine[key]}: "
                               "resume with the same data, --batch-size, --stride and --train-ratio")

    # how long: --max-steps, --epochs, or the default step budget
    steps_per_epoch = len(train_loader) // opts["grad_accum"]
    if steps_per_epoch == 0:
        raise CLIError(f"--grad-accum {opts['grad_accum']} exceeds the {len(train_loader)} batches of an epoch")
    max_steps, epochs = opts["max_steps"], opts["epochs"]
    if max_steps is None and epochs is None:
        max_steps = DEFAULT_MAX_STEPS
    if epochs is None:
        epochs = math.ceil(max_steps / steps_per_epoch)
    total = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)

    scheduler, lr_desc = None, f"AdamW lr {opts['lr']:g} constant"
    if opts["schedule"] == "cosine":
        warmup = opts["warmup_steps"] if opts["warmup_steps"] is not None else round(0.1 * total)
        warmup = max(0, min(warmup, total))
        min_lr = opts["min_lr"] if opts["min_lr"] is not None else opts["lr"] / 10
        # warmup starts at lr / warmup rather than 0, so no step is spent at lr = 0
        scheduler = CosineWithWarmup(opts["lr"], total, warmup, min_lr=min_lr,
                                     initial_lr=opts["lr"] / warmup if warmup else 0.0)
        lr_desc = f"AdamW lr {opts['lr']:g}, {warmup} warmup steps, cosine to {min_lr:g}"

    out = opts["out"]
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise CLIError(f"--out: cannot create {out!r}: {e}") from e
    ckpt_path = os.path.join(out, "checkpoint.safetensors")
    plot_path = os.path.join(out, "loss.png")
    history_path = os.path.join(out, "history.json")

    n_train, n_val = len(train_loader.dataset.token_ids), len(val_loader.dataset.token_ids)
    B = opts["batch_size"]
    ranks = comm.describe() if comm.world_size > 1 else None  # every rank takes part
    _say(f"device      {device} ({'CuPy' if device == 'cuda' else 'NumPy'})")
    if ranks:
        _say(f"ranks       {ranks}")
    where = (f" (resumed from {opts['resume']})" if opts["resume"]
             else f" (from {opts['init_from']})" if opts["init_from"] else "")
    _say(f"model       {_describe_config(cfg)}{where}")
    _say(f"parameters  {model.num_parameters():,}")
    _say(f"data        {data_desc}")
    _say(f"tokens      train {n_train:,} ({len(train_loader.dataset):,} windows of {T}), "
         f"val {n_val:,} ({len(val_loader.dataset):,} windows)")
    _say(f"plan        {total:,} steps ({total / steps_per_epoch:.2f} epochs of {steps_per_epoch:,} steps), "
         f"{opts['grad_accum']} x {B} x {T} tokens a step"
         + (f" ({B // comm.world_size} rows a rank)" if comm.world_size > 1 else "") + f"; {lr_desc}")
    if resume_state is not None:
        _say(f"resuming    at step {resume_state['step']:,}")
    _say(f"output      {out}")
    _say()

    prompt = _default_prompt(opts, text)
    cli_options = {k: opts[k] for k in TRAIN_DEFAULTS}
    cli_options["resume"] = None
    # the options as given, not the derived step count, so a later --max-steps can extend the run
    cli_options.update(max_steps=opts["max_steps"], epochs=opts["epochs"])
    history = train_model(
        model, train_loader, val_loader, optimizer, num_epochs=epochs, eval_freq=opts["eval_freq"],
        eval_iter=opts["eval_iter"], start_context=prompt or None, tokenizer=tokenizer,
        grad_accum_steps=opts["grad_accum"], max_grad_norm=opts["grad_clip"] or None, scheduler=scheduler,
        checkpoint_path=ckpt_path, checkpoint_every=opts["checkpoint_every"], resume_state=resume_state,
        progress=not opts["no_progress"], sample_tokens=opts["sample_tokens"], max_steps=total,
        extra={"cli_options": cli_options, "tokenizer": "gpt2"},
    )

    final = None
    if comm.is_main:  # under mpiexec the others wait at the barrier below
        if history["global_step"] and (not history["track_steps"] or history["track_steps"][-1] != history["global_step"]):
            final = evaluate_model(model, train_loader, val_loader, opts["eval_iter"])
        plot_losses(history, plot_path)
        with open(history_path, "w") as f:
            json.dump(history, f, indent=1)
    comm.barrier()
    seconds = time.perf_counter() - t_start
    _say()
    if history["val_losses"]:
        _say(f"last evaluation (step {history['track_steps'][-1]}): train loss {history['train_losses'][-1]:.3f}, "
             f"val loss {history['val_losses'][-1]:.3f}, val perplexity {history['perplexities'][-1]:.1f}")
    if final is not None:
        _say(f"final (step {history['global_step']}): train loss {final[0]:.3f}, val loss {final[1]:.3f}, "
             f"val perplexity {perplexity(final[1]):.1f}")
    _say(f"checkpoint  {ckpt_path}")
    _say(f"loss plot   {plot_path}")
    _say(f"history     {history_path}")
    _say(f"time        {seconds:.0f} s")
    return {"history": history, "model": model, "checkpoint": ckpt_path, "plot": plot_path,
            "history_path": history_path, "seconds": seconds, "final_losses": final}


# -- generate -------------------------------------------------------------------------------------

def _add_generate_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="PATH", help="a checkpoint written by `numpygpt train`")
    src.add_argument("--model", metavar="DIR_OR_NAME",
                     help="GPT-2 weights in the Hugging Face layout: a directory, or gpt2 / gpt2-medium / ...")
    p.add_argument("--prompt", default="Every effort moves you", help="text to continue (default: %(default)r)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=50, help="(default %(default)s)")
    p.add_argument("--temperature", type=_nonneg_float, default=0.0,
                   help="0 picks the most likely token every time (default %(default)s)")
    p.add_argument("--top-k", type=_positive_int, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=_fraction_or_one, help="sample from the smallest set with this much probability")
    p.add_argument("--seed", type=int, help="seed for sampling")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto", help="(default %(default)s)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="dtype for --model weights (default %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context for every token")


def _fraction_or_one(s: str) -> float:
    v = float(s)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {s}")
    return v


def run_generate(args: argparse.Namespace) -> str:
    from .generate import generate_text

    device = _set_device(args.device)
    if args.checkpoint:
        model = _load_checkpoint(args.checkpoint, device=device)["model"]
    else:
        model = _from_pretrained(args.model, dtype=args.dtype, device=device)
    model.eval()
    if not args.prompt:
        raise CLIError("--prompt must not be empty")
    text = generate_text(model, args.prompt, args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed, use_cache=not args.no_cache)
    print(text, flush=True)
    return text


# -- gradcheck --------------------------------------------------------------------------------------

def _add_gradcheck_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tol", type=_nonneg_float, default=1e-6, help="largest relative error allowed (default %(default)g)")
    p.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu", help="(default %(default)s)")
    p.add_argument("--verbose", action="store_true", help="print every tensor's error, not only the worst")


def gradcheck_checks(seed: int = 0) -> list:
    """[(name, thunk -> {tensor: relative error})]: each layer and a tiny model, float64.

    Weights are redrawn larger than GPT-2's 0.02 so every gradient is far from zero;
    dropout masks are held fixed by reseeding before each forward pass.
    """
    import numpy

    from . import backend
    from .config import GPTConfig
    from .gradcheck import check_layer, check_model_loss
    from .model import FeedForward, GPTModel, OutputHead, TransformerBlock
    from .nn import (CrossEntropyLoss, Dropout, Embedding, GELU, LayerNorm, Linear, MultiHeadAttention,
                     Parameter, Softmax)

    F64 = "float64"
    rng = numpy.random.default_rng(seed)

    def dev(a, dtype=F64):
        return backend.to_device(numpy.asarray(a), dtype=dtype)

    def randn(*shape):
        return dev(rng.standard_normal(shape))

    def randomized(layer, scale=0.5):
        for p in layer.parameters():
            p.data = randn(*p.shape) * scale
        return layer

    def fixed_masks():
        backend.manual_seed(seed)

    B, T, C, NH, V = 2, 5, 8, 2, 11
    cfg = GPTConfig(vocab_size=V, context_length=8, emb_dim=C, n_heads=NH, n_layers=2, drop_rate=0.2,
                    qkv_bias=True, dtype=F64)

    def model_check(tied: bool):
        def run():
            model = randomized(GPTModel(cfg.replace(tie_weights=tied), seed=seed), scale=0.3)
            idx = dev(rng.integers(0, V, (B, T)), None)
            targets = rng.integers(0, V, (B, T))
            targets[0, 0] = -100  # an ignored position
            return check_model_loss(model, CrossEntropyLoss(), idx, dev(targets, None), eps=1e-5,
                                    before_forward=fixed_masks)
        return run

    def loss_check():
        targets = rng.integers(0, V, (B, T))
        targets[1, 2] = -100
        return check_layer(CrossEntropyLoss(), randn(B, T, V) * 2, dev(targets, None),
                           input_names=["logits", "targets"])

    return [
        ("Linear", lambda: check_layer(randomized(Linear(C, 3 * C, dtype=F64)), randn(B, T, C))),
        ("Embedding (repeated ids)", lambda: check_layer(randomized(Embedding(4, C, dtype=F64)),
                                                         dev(rng.integers(0, 4, (B, T)), None), max_coords=None)),
        ("LayerNorm", lambda: check_layer(randomized(LayerNorm(C, dtype=F64)), randn(B, T, C))),
        ("GELU", lambda: check_layer(GELU(), randn(B, T, C) * 2)),
        ("Softmax", lambda: check_layer(Softmax(axis=-1), randn(B, T, C) * 2)),
        ("Dropout (fixed mask)", lambda: check_layer(Dropout(0.3), randn(B, T, C), before_forward=fixed_masks)),
        ("MultiHeadAttention", lambda: check_layer(
            randomized(MultiHeadAttention(C, C, NH, dropout=0.2, qkv_bias=True, dtype=F64)), randn(B, T, C),
            before_forward=fixed_masks)),
        ("FeedForward", lambda: check_layer(randomized(FeedForward(C, dtype=F64)), randn(B, T, C))),
        ("TransformerBlock", lambda: check_layer(randomized(TransformerBlock(cfg)), randn(B, T, C),
                                                 before_forward=fixed_masks)),
        ("OutputHead", lambda: check_layer(OutputHead(Parameter(randn(V, C) * 0.5)), randn(B, T, C))),
        ("CrossEntropyLoss", loss_check),
        ("GPTModel + loss (untied)", model_check(False)),
        ("GPTModel + loss (tied)", model_check(True)),
    ]


def run_gradcheck(args: argparse.Namespace) -> int:
    from . import backend
    from .gradcheck import report

    device = _set_device(args.device)
    failed = 0
    print(f"gradient checks: centred differences in float64 on {device}, tolerance {args.tol:g}")
    print(f"{'check':<28} {'worst rel. error':>16}  {'in tensor':<22} result")
    with backend.device(device):
        for name, run in gradcheck_checks(args.seed):
            errors = run()
            worst_name, worst = max(errors.items(), key=lambda kv: kv[1])
            ok = worst <= args.tol
            failed += not ok
            print(f"{name:<28} {worst:>16.2e}  {worst_name:<22} {'ok' if ok else 'FAIL'}", flush=True)
            if args.verbose or not ok:
                print("    " + report(errors, args.tol).replace("\n", "\n    "))
    total = len(gradcheck_checks(args.seed))
    print(f"{total - failed}/{total} checks within tolerance" + ("" if failed else ": all backward passes agree"))
    return 1 if failed else 0


# -- entry points -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="numpygpt", description="GPT-2 in NumPy/CuPy with hand-written backward passes.")
    sub = parser.add_subparsers(dest="command", metavar="{train,generate,gradcheck}", required=True)
    _add_train_args(sub.add_parser("train", help="train a model (a small one on Python's manual by default)",
                                   description="Train a GPT model.", argument_default=argparse.SUPPRESS))
    _add_generate_args(sub.add_parser("generate", help="continue a prompt with a trained or pretrained model",
                                      description="Generate text from a checkpoint or GPT-2 weights."))
    _add_gradcheck_args(sub.add_parser("gradcheck", help="check every backward pass against finite differences",
                                       description="Check every layer's backward pass against finite differences."))
    return parser


def run_cli(fn) -> int:
    """Run ``fn()`` turning user-facing failures into a message and an exit code.

    Under mpiexec every rank prints its own line, naming itself. A DistributedError or a
    diverged loss reaches every rank at the same point, so each simply exits; a CLIError
    may be one rank's alone (a file missing on one machine), so it aborts all the ranks
    rather than leave the others waiting in the next all-reduce.
    """
    from .distributed import DistributedError, current
    from .train import TrainingDivergedError

    try:
        result = fn()
    except (CLIError, DistributedError, TrainingDivergedError) as e:
        comm = current()
        many = comm is not None and comm.world_size > 1
        where = f" (rank {comm.rank} of {comm.world_size})" if many else ""
        sys.stderr.write(f"numpygpt: error{where}: {e}\n")  # one write: ranks' lines do not interleave
        sys.stderr.flush()
        code = 1 if isinstance(e, TrainingDivergedError) else getattr(e, "code", 2)
        if many and isinstance(e, CLIError):
            comm.abort(code)
        return code
    except KeyboardInterrupt:
        print("numpygpt: interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        given = {k: v for k, v in vars(args).items() if k != "command"}
        return run_cli(lambda: run_training(given))
    if args.command == "generate":
        return run_cli(lambda: run_generate(args))
    return run_cli(lambda: run_gradcheck(args))


def train_main(argv=None, description: str | None = None) -> None:
    """``numpygpt train`` as a script (examples/train_gpt.py); exits with its code."""
    given = vars(build_train_parser(description=description).parse_args(argv))
    sys.exit(run_cli(lambda: run_training(given)))


def generate_main(argv=None, description: str | None = None) -> None:
    """``numpygpt generate`` as a script (examples/generate.py); exits with its code."""
    p = argparse.ArgumentParser(description=description or "Generate text from a checkpoint or GPT-2 weights.")
    _add_generate_args(p)
    args = p.parse_args(argv)
    sys.exit(run_cli(lambda: run_generate(args)))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
