"""What the fine-tuning commands share: their common options (``RecipeOptions``, with the
LoRA flags of ``LoRAOptions``; ``TextOptions`` for the commands that train on text), the
start of every run, the split check, the optimiser and the step plan.

``finetune classify``, ``finetune instruct`` and ``finetune dpo`` take ``--batch-size``,
``--lora-rank``, ``--resume``, ... from these dataclasses, so a flag means the same, has the
same help and fails the same way everywhere. A recipe whose default differs (the book's
chapter 6 trains 5 epochs, chapter 7 two) changes only the default, with ``recipe_field``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..options import DROP_RATE, NONNEG_FLOAT, POSITIVE_INT, Check, Options, option
from .prompts import PROMPT_STYLES

__all__ = ["LoRAOptions", "RecipeOptions", "TextOptions", "recipe_field", "start_run", "AT_LEAST_ONE", "check_split",
           "trainable_adamw", "planned_steps", "load_model", "directory_tokenizer", "describe_model", "MODEL_SOURCES"]

AT_LEAST_ONE = Check(int, lambda v: v >= 1, "must be >= 1, got {}")
POSITIVE_ALPHA = Check(float, lambda v: v > 0, "must be > 0, got {}")


@dataclass
class LoRAOptions(Options):
    """``--lora-rank R`` trains rank-R adapters on every linear layer instead of the weights;
    ``--lora-alpha A`` scales them by A / R (default A = R)."""

    lora_rank: int | None = option(None, "train LoRA adapters of rank R instead of the weights", check=POSITIVE_INT,
                                   metavar="R")
    lora_alpha: float | None = option(None, "LoRA scale alpha / rank (default alpha = rank)", check=POSITIVE_ALPHA,
                                      metavar="A")

    def check_more(self) -> None:
        if self.lora_rank is None and self.lora_alpha is not None:
            raise ValueError("--lora-alpha needs --lora-rank")

    @property
    def alpha(self) -> float | None:
        """The LoRA scale's alpha (the rank when not given); None without LoRA."""
        if self.lora_rank is None:
            return None
        return float(self.lora_alpha) if self.lora_alpha is not None else float(self.lora_rank)


@dataclass
class RecipeOptions(LoRAOptions):
    """The options of every fine-tuning command: the loop's (batches, accumulation, epochs,
    steps, AdamW, evaluation), the seed, the device, the run folder, checkpoints and resume."""

    out: str = option("runs/finetune", "where the model, plots and history go", metavar="DIR")
    batch_size: int = option(8, "examples per micro-batch", check=AT_LEAST_ONE, metavar="B")
    grad_accum: int = option(1, "micro-batches per optimiser step", check=AT_LEAST_ONE, metavar="K")
    epochs: int = option(1, "", check=AT_LEAST_ONE)
    max_steps: int | None = option(None, "stop after this many optimiser steps", check=AT_LEAST_ONE)
    lr: float | None = option(None, "AdamW learning rate", check=NONNEG_FLOAT)
    weight_decay: float = option(0.1, "AdamW weight decay", check=NONNEG_FLOAT)
    eval_freq: int = option(5, "evaluate the losses every N steps", check=AT_LEAST_ONE)
    eval_iter: int = option(5, "batches per evaluation", check=AT_LEAST_ONE)
    seed: int = option(123, "seeds the split, the batch order, dropout and new weights")
    device: str = option("auto", "", choices=("cpu", "cuda", "auto"))
    checkpoint_every: int | None = option(None, "also write OUT/checkpoint.safetensors every N steps (it is always "
                                          "written at the end of training and on Ctrl-C/SIGTERM)",
                                          check=AT_LEAST_ONE, metavar="N")
    resume: bool = option(False, "continue from OUT/checkpoint.safetensors (same options as the interrupted run)")
    no_progress: bool = option(False, "no progress bars")


@dataclass
class TextOptions(RecipeOptions):
    """The options of the commands that train a language model on text (instruct, dpo)."""

    drop_rate: float = option(0.0, "the model's dropout while it trains", check=DROP_RATE)
    allowed_max_length: int = option(1024, "cut longer training texts to T tokens (at most the model's context)",
                                     check=AT_LEAST_ONE, metavar="T")
    dtype: str = option("float32", "", choices=("float32", "float64"))
    prompt_style: str | None = option(None, "alpaca (the book's prompt format) or chat (the model's chat template); "
                                      "default: chat for Llama 3 and Qwen3, alpaca for GPT-2", choices=PROMPT_STYLES)


def recipe_field(name: str, default=dataclasses.MISSING, base=TextOptions, **changes):
    """The option ``name`` of ``base`` (its help, check, metavar...) with another ``default``
    and/or other ``changes`` (``help=...``): how a recipe states what it does differently."""
    field = {f.name: f for f in dataclasses.fields(base)}[name]
    if default is dataclasses.MISSING:
        default = field.default
    return option(default, **{**field.metadata, **changes})


def start_run(cls, options, given: dict, progress: bool | None = None):
    """The start of every recipe: the options (``options`` updated with ``given``, or ``cls``
    built from ``given``), checked; the process group, the batch size checked against it; the
    device chosen. Returns (options, comm, device)."""
    from .. import backend, distributed

    o = options.replace(**given) if options is not None else cls.from_dict(given)
    if progress is not None:
        o = o.replace(no_progress=not progress)
    o.validate()
    comm = distributed.init()
    comm.check_batch_size(o.batch_size)
    device = backend.set_device(o.device)
    comm.use_device(device)
    return o, comm, device


def check_split(source, splits, batch_size: int, what: str = "entries"):
    """(train, test, val) as given, after checking that the training split fills a batch and that
    there is a validation split; ValueError naming ``source`` otherwise."""
    train_data, test_data, val_data = splits
    if len(train_data) < batch_size:
        raise ValueError(f"{source}: the training split has {len(train_data)} {what}, fewer than the batch size "
                         f"{batch_size}: use more entries or a smaller batch size")
    if not val_data:
        n = len(train_data) + len(test_data) + len(val_data)
        raise ValueError(f"{source}: {n} entries leave no validation {what} "
                         "(the split is 85% train, 10% test, the rest validation)")
    return train_data, test_data, val_data


def trainable_adamw(model, lr: float, weight_decay: float):
    """AdamW over the model's trainable parameters (weight decay on every one, as the book's
    ``torch.optim.AdamW(model.parameters())``)."""
    from ..optim import AdamW

    return AdamW([(name, p) for name, p in model.named_parameters() if p.requires_grad], lr=lr,
                 weight_decay=weight_decay)


def planned_steps(n_batches: int, grad_accum: int, epochs: int, max_steps: int | None) -> tuple[int, int]:
    """(optimiser steps of the run, steps per epoch), as ``train_model`` will take them."""
    per_epoch = n_batches // grad_accum
    total = epochs * per_epoch
    return (total if max_steps is None else min(max_steps, total)), per_epoch


# -- the model to fine-tune, of any family, and its tokenizer -----------------------------------------

MODEL_SOURCES = ("a Hugging Face directory of GPT-2, Llama 3 or Qwen3 (config.json + model.safetensors), a GPT-2 "
                 "name, or a numpygpt checkpoint file or run folder of any family")


def load_model(source, device: str, dtype: str | None = None, drop_rate: float | None = None,
               untie_gpt2: bool = False, fit_tokenizer: bool = True):
    """(model, tokenizer) to fine-tune, from ``source`` (``MODEL_SOURCES``):

    - a checkpoint file (``numpygpt train``'s, ``save_checkpoint``'s) or a run folder holding
      ``checkpoint.safetensors``: its model, of its family, with the tokenizer saved beside it;
    - a Hugging Face directory: ``config.json``'s ``model_type`` picks GPT-2 or Llama/Qwen3
      (``numpygpt.from_pretrained``); the directory's tokenizer, else GPT-2's;
    - a GPT-2 name ('gpt2', 'gpt2-medium', ...): downloaded once, GPT-2's tokenizer.

    ``dtype`` converts the weights (None: float32 for a directory, the checkpoint's own);
    ``drop_rate`` is GPT-2's dropout (None: 0 for a directory, the checkpoint's own; Llama and
    Qwen3 have none, so a rate above 0 is refused); ``untie_gpt2`` gives a GPT-2 an output head
    of its own, a copy of the token embedding (the book's chapter 7). The tokenizer must fit
    the vocabulary (a model may have more rows than tokens, as Qwen3's has) unless
    ``fit_tokenizer`` is False (a model whose tokenizer is not used: DPO's reference)."""
    import os

    from ..checkpoint import read_checkpoint
    from ..run import checkpoint_in
    from ..tokenizer import check_vocab_size, load_saved_tokenizer

    path = checkpoint_in(source)  # a checkpoint file, or a run folder's
    if path is not None:
        saved = read_checkpoint(path)
        model = saved.build_model(device=device)
        tokenizer = load_saved_tokenizer(os.path.dirname(os.path.abspath(path)), saved.extra.get("tokenizer"))
        if dtype is not None and model.cfg.dtype != dtype:
            model.astype(dtype)
            model.cfg = model.cfg.replace(dtype=dtype)
    else:
        model, tokenizer = _load_directory(os.fspath(source), device, dtype or "float32", drop_rate, untie_gpt2,
                                           fit_tokenizer)
    if drop_rate and model.cfg.model_type != "gpt2":
        raise ValueError(f"--drop-rate {drop_rate:g}: a {model.cfg.model_type} model has no dropout")
    if fit_tokenizer:
        check_vocab_size(tokenizer, model.cfg.vocab_size, padded=True)
    return model, tokenizer


def _load_directory(path: str, device: str, dtype: str, drop_rate: float | None, untie_gpt2: bool,
                    fit_tokenizer: bool):
    """(model, tokenizer) of a Hugging Face directory (its own tokenizer; GPT-2's for a GPT-2
    without one, checked to fit unless ``fit_tokenizer`` is False) or a GPT-2 name."""
    from ..hf import from_pretrained
    from ..model import GPTModel
    from ..run import pretrained_family
    from ..tokenizer import model_tokenizer

    if pretrained_family(path) == "gpt2":
        model = GPTModel.from_pretrained(path, dtype=dtype, device=device, drop_rate=drop_rate or 0.0,
                                         tie_weights=False if untie_gpt2 else None)
    else:
        model = from_pretrained(path, dtype=dtype, device=device)
    if not fit_tokenizer:
        return model, directory_tokenizer(path)
    return model, model_tokenizer(path, model.cfg.model_type, model.cfg.vocab_size)


def directory_tokenizer(path):
    """The tokenizer of a model directory (tokenizer.json or tokenizer.model), else GPT-2's:
    GPT-2 directories (the book's, and GPT-2 names) have none."""
    import os

    from ..tokenizer import get_tokenizer, load_tokenizer
    from ..tokenizer.load import CANDIDATES

    path = os.fspath(path)
    has_tokenizer = os.path.isdir(path) and any(os.path.isfile(os.path.join(path, c)) for c in CANDIDATES)
    return load_tokenizer(path) if has_tokenizer else get_tokenizer()


def describe_model(source, cfg) -> str:
    """One line about the model a recipe trains, for its plan: the family and the shape."""
    return (f"{source}: {cfg.model_type}, emb_dim {cfg.emb_dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
            f"context {cfg.context_length}")
