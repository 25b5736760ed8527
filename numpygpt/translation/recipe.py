"""Training an encoder-decoder to translate numbers between words and digits, in the one
training loop (``train_model``) with an objective of its own.

    opts = TranslationOptions(train_numbers=20000, epochs=4)
    result = train_translation(opts)      # {"accuracy": ..., "examples": [...], "seconds": ...}

``numpygpt train-translation`` runs the same (``add_translation_args`` / ``run_translation``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from .. import backend
from ..data import DataLoader
from ..encdec import EncDecConfig, EncoderDecoder
from ..nn import CrossEntropyLoss
from ..objective import split_rows
from ..optim import AdamW, CosineWithWarmup
from ..options import DROP_RATE, NONNEG_FLOAT, NONNEG_INT, POSITIVE_INT, Options, add_arguments, option
from ..train import train_model
from .numbers import MAX_NUMBER, NumberPairs, NumberTokenizer, sample_numbers

__all__ = ["TranslationObjective", "TranslationOptions", "train_translation", "exact_match",
           "add_translation_args", "run_translation"]


class TranslationObjective:
    """Cross-entropy of ``model(src, tgt_in)`` against ``tgt_out`` (teacher forcing: the
    decoder reads the target shifted right by <bos>; padding is -100 and left out). A batch is
    NumberPairs' dict; a step "sees" its target tokens."""

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
        return split_rows(batch, comm)  # rows weigh the same: the ranks' means are averaged


@dataclass
class TranslationOptions(Options):
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
    lr: float = option(2e-3, "peak AdamW learning rate (linear warmup, cosine decay)", check=NONNEG_FLOAT,
                       group="optimisation")
    weight_decay: float = option(0.01, "", check=NONNEG_FLOAT, group="optimisation")
    seed: int = option(0, "seeds the numbers, the weights and the batch order", group="optimisation")
    eval_freq: int = option(100, "evaluate the losses every N steps", check=POSITIVE_INT, group="run")
    show: int = option(6, "held-out translations to print", check=NONNEG_INT, group="run")
    device: str = option("cpu", "", choices=("cpu", "cuda"), group="run")
    blas_threads: int = option(1, "BLAS threads: this model's matrices are small, and one thread ran a step "
                               "3x faster than two on a loaded 2-core machine", check=POSITIVE_INT, group="run")
    no_progress: bool = option(False, "no progress bar", group="run")

    def check_more(self) -> None:
        if self.train_numbers + self.test_numbers > self.max_number + 1:
            raise ValueError(f"--train-numbers + --test-numbers ({self.train_numbers + self.test_numbers}) is more "
                             f"than the {self.max_number + 1} numbers from 0 to --max-number")
        if self.emb_dim % self.n_heads:
            raise ValueError(f"--emb-dim ({self.emb_dim}) must be divisible by --n-heads ({self.n_heads})")


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


def train_translation(opts: TranslationOptions, log=print) -> dict:
    """Build the data and the model, train with ``train_model`` and a ``TranslationObjective``,
    then measure held-out exact match. Returns {"accuracy", "examples", "seconds", "history",
    "model", "parameters"}."""
    opts.validate()
    backend.set_device(opts.device)
    backend.manual_seed(opts.seed)
    tok = NumberTokenizer()
    train_pairs, test_pairs = make_data(opts, tok)
    cfg = EncDecConfig(vocab_size=tok.vocab_size, context_length=max(train_pairs.src.shape[1],
                                                                     train_pairs.tgt_in.shape[1]) + 2,
                       emb_dim=opts.emb_dim, n_heads=opts.n_heads, n_enc_layers=opts.n_layers,
                       n_dec_layers=opts.n_layers, drop_rate=opts.drop_rate, norm_first=not opts.post_norm,
                       pad_id=tok.pad_id)
    model = EncoderDecoder(cfg, seed=opts.seed)
    train_loader = DataLoader(train_pairs, opts.batch_size, shuffle=True, seed=opts.seed)
    test_loader = DataLoader(test_pairs, opts.batch_size, shuffle=False, drop_last=False)
    total = len(train_loader) * opts.epochs
    optimizer = AdamW(model, lr=opts.lr, weight_decay=opts.weight_decay)
    if log:
        log(f"{len(train_pairs)} training pairs, {len(test_pairs)} held out; {model.num_parameters():,} parameters; "
            f"{total} steps")
    start = time.perf_counter()
    with threadpool_limits(limits=opts.blas_threads, user_api="blas"):
        history = train_model(model, train_loader, test_loader, optimizer, num_epochs=opts.epochs,
                              eval_freq=opts.eval_freq, eval_iter=4, objective=TranslationObjective(),
                              scheduler=CosineWithWarmup(opts.lr, total, max(1, total // 20), min_lr=opts.lr / 20),
                              max_grad_norm=1.0, progress=not opts.no_progress, log=log)
        seconds = time.perf_counter() - start
        accuracy, rows = exact_match(model, test_pairs)
    return {"accuracy": accuracy, "examples": rows, "seconds": seconds, "history": history, "model": model,
            "parameters": model.num_parameters()}


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
    rows = result["examples"]
    print(f"trained in {result['seconds']:.0f} s; held-out exact match {result['accuracy']:.2%} "
          f"({sum(r == g for _, r, g in rows)}/{len(rows)})")
    wrong = [row for row in rows[options.show:] if row[1] != row[2]]
    for source, reference, got in rows[:options.show] + wrong[:3]:  # a few, and a few mistakes
        mark = "ok " if got == reference else "BAD"
        print(f"  {mark} {source!r} -> {got!r}" + ("" if got == reference else f" (want {reference!r})"))
    return 0
