"""Fine-tuning GPT-2 as a text classifier: the book's chapter 6 (and appendix E's LoRA run).

    result = finetune_classifier(data="SMSSpamCollection", pretrained="gpt2", out="runs/classifier")
    model, info = load_classifier("runs/classifier")
    classify_text(model, "You won a free cruise! Call now", **info)     # 'spam'

``finetune_classifier`` is ``numpygpt finetune classify``: load GPT-2, read and split the
data (``classify_data``), swap the language-model head for a class head, train the last
block (or LoRA adapters), report accuracies, write the plots and the model directory that
``numpygpt classify --model DIR`` reads. ``train_classifier`` is the book's
``train_classifier_simple``: AdamW steps over the training loader, the loss on
``eval_iter`` batches every ``eval_freq`` steps, the accuracy on ``eval_iter`` batches after
every epoch.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time

from .. import backend, memory
from ..config import TRAINABLE
from ..nn import CrossEntropyLoss, eval_mode, no_grad
from ..train import loader_batches, diverged_error, forward_backward, evaluate_model
from .classify_data import PAD_ID, download_sms_spam, prepare_classification_data

__all__ = [
    "calc_accuracy_loader", "predict", "train_classifier", "plot_classifier_history",
    "finetune_classifier", "FINETUNE_CLASSIFY_DEFAULTS", "save_classifier", "load_classifier",
    "classify_text", "classify_texts", "CLASSIFIER_FILE", "LORA_FILE",
]

CLASSIFIER_FILE = "classifier.json"  # next to config.json + model.safetensors: labels and padding
LORA_FILE = "lora.safetensors"  # a LoRA run's adapters alone (numpygpt.load_lora reads them)


# -- metrics -------------------------------------------------------------------------------------

def predict(model, inputs):
    """Class ids (B,) of a batch of token ids (B, T) (host or device): the argmax of the
    (B, K) logits, on the model's device."""
    with no_grad():
        logits = model(inputs)  # (B, K)
    return logits.argmax(axis=-1)  # (B,)


def calc_accuracy_loader(model, loader, num_batches: int | None = None) -> float:
    """Fraction of correctly classified examples in the first ``num_batches`` batches
    (all if None) of ``loader``, in eval mode; NaN for an empty loader.

    Like ``calc_loss_loader`` it reads epoch 0's order, so every evaluation sees the same
    batches, and syncs with the device once, at the end.
    """
    n = len(loader)
    if n == 0:
        return float("nan")
    num_batches = n if num_batches is None else min(int(num_batches), n)
    correct, total = None, 0
    with eval_mode(model):
        for inputs, labels in itertools.islice(loader_batches(loader), num_batches):
            hits = (predict(model, inputs) == backend.to_device(labels, device_name=model.device)).sum()
            correct = hits if correct is None else correct + hits
            total += len(labels)
    return float(correct) / total


# -- the loop --------------------------------------------------------------------------------------

def _new_history() -> dict:
    return {
        "train_losses": [],         # at each evaluation: mean loss over eval_iter training batches
        "val_losses": [],           # ... and over eval_iter validation batches
        "track_steps": [],          # optimiser steps done at each evaluation
        "train_accs": [],           # after each epoch: accuracy over eval_iter training batches
        "val_accs": [],             # ... and over eval_iter validation batches
        "epoch_examples_seen": [],  # training examples consumed at the end of each epoch
        "step_losses": [],          # the training loss of every step
        "global_step": 0,
        "examples_seen": 0,
    }


def train_classifier(model, train_loader, val_loader, optimizer, num_epochs: int = 5, eval_freq: int = 50,
                     eval_iter: int = 5, progress: bool = True, log=print) -> dict:
    """The book's ``train_classifier_simple``; returns the history (see ``_new_history``).

    One step: zero_grad, cross-entropy of the (B, K) logits against the (B,) labels,
    backward, AdamW. Losses are evaluated after step 1, 1 + eval_freq, ... and the
    accuracies after every epoch, each over ``eval_iter`` batches in eval mode. A NaN or
    infinite loss stops the run (``TrainingDivergedError``) before the weights change.
    """
    if num_epochs < 0 or eval_freq < 1 or eval_iter < 1:
        raise ValueError(f"need num_epochs >= 0, eval_freq >= 1 and eval_iter >= 1; "
                         f"got {num_epochs}, {eval_freq}, {eval_iter}")
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError("the training loader has no batches")
    from tqdm.auto import tqdm

    def emit(msg: str) -> None:
        if log is print:
            tqdm.write(msg)  # above the progress bar, not through it
        elif log is not None:
            log(msg)

    memory.keep_freed_memory()  # reuse each step's pages (see train.TrainOptions)
    history = _new_history()
    loss_fn = CrossEntropyLoss()
    total_steps = num_epochs * steps_per_epoch
    interactive = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()  # a log file: redraw seldom
    bar = tqdm(total=total_steps, disable=not progress, unit="step", dynamic_ncols=True,
               mininterval=0.5 if interactive else 30.0, file=sys.stderr)
    try:
        for epoch in range(num_epochs):
            model.train()
            batches = loader_batches(train_loader, epoch)
            for _ in range(steps_per_epoch):
                step = history["global_step"] + 1
                # zero_grad; loss of the (B, K) logits against the (B,) labels; backward
                step_loss, _ = forward_backward(model, loss_fn, batches, 1)
                if not math.isfinite(step_loss):
                    raise diverged_error("loss", step_loss, step, epoch, None, None)
                optimizer.step()
                history["global_step"] = step
                history["examples_seen"] += train_loader.batch_size  # drop_last: every batch is full
                history["step_losses"].append(step_loss)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.3f}", refresh=False)

                if (step - 1) % eval_freq == 0:
                    train_loss, val_loss = evaluate_model(model, train_loader, val_loader, eval_iter)
                    history["train_losses"].append(train_loss)
                    history["val_losses"].append(val_loss)
                    history["track_steps"].append(step)
                    emit(f"Ep {epoch + 1} (step {step:6d}/{total_steps}): "
                         f"train loss {train_loss:.3f}, val loss {val_loss:.3f}")

            train_acc = calc_accuracy_loader(model, train_loader, eval_iter)
            val_acc = calc_accuracy_loader(model, val_loader, eval_iter)
            history["train_accs"].append(train_acc)
            history["val_accs"].append(val_acc)
            history["epoch_examples_seen"].append(history["examples_seen"])
            emit(f"Ep {epoch + 1}: training accuracy {train_acc * 100:.2f}% | validation accuracy {val_acc * 100:.2f}%")
    finally:
        bar.close()
    return history


# -- plots ------------------------------------------------------------------------------------------

def plot_classifier_history(history: dict, loss_path, accuracy_path) -> None:
    """Two PNGs: loss against steps, accuracy against epochs; examples seen on the top axis.

    matplotlib's object API with the Agg canvas, as ``train.plot_losses``: no display, and
    a notebook's pyplot backend is left alone.
    """
    examples_per_step = history["examples_seen"] / max(history["global_step"], 1)  # every batch is full
    epochs = list(range(1, len(history["train_accs"]) + 1))
    per_epoch = history["epoch_examples_seen"][0] if history["epoch_examples_seen"] else 0
    _plot(loss_path, history["track_steps"], history["train_losses"], history["val_losses"], "Steps", "Loss",
          examples_per_step, per_step=history["step_losses"])
    _plot(accuracy_path, epochs, history["train_accs"], history["val_accs"], "Epochs", "Accuracy", per_epoch)


def _plot(path, x, train, val, xlabel: str, ylabel: str, examples_per_x: float, per_step=None) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.5, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if per_step:
        ax.plot(range(1, len(per_step) + 1), per_step, color="tab:blue", alpha=0.25, linewidth=0.8,
                label=f"Training {ylabel.lower()} (each step)")
    ax.plot(x, train, color="tab:blue", marker=".", label=f"Training {ylabel.lower()}")
    ax.plot(x, val, color="tab:orange", linestyle="-.", marker=".", label=f"Validation {ylabel.lower()}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole steps and epochs
    ax.legend(loc="best")
    if examples_per_x:
        top = ax.secondary_xaxis("top", functions=(lambda s: s * examples_per_x, lambda e: e / examples_per_x))
        top.set_xlabel("Examples seen")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)


# -- saving, loading and classifying -----------------------------------------------------------------

def save_classifier(model, directory, label_names, max_length: int, pad_id: int = PAD_ID) -> None:
    """The model in the Hugging Face layout (config.json + model.safetensors, via
    ``save_pretrained``) and ``classifier.json``: the label names in class-id order and
    the length texts are padded to, which ``classify_text`` needs to read a new text the
    way the model was trained.

    A LoRA model is written with its adapters folded in (merged, saved, unmerged again), as
    a plain classifier, and its adapters alone go to ``lora.safetensors`` as well.
    """
    from ..fileio import atomic_write
    from ..lora import lora_layers, merge_lora, save_lora, unmerge_lora

    directory = os.fspath(directory)
    if lora_layers(model):
        save_lora(model, os.path.join(directory, LORA_FILE))
        merge_lora(model)
        try:
            model.save_pretrained(directory)
        finally:
            unmerge_lora(model)
    else:
        model.save_pretrained(directory)
    info = {"label_names": list(label_names), "max_length": int(max_length), "pad_id": int(pad_id)}
    with atomic_write(os.path.join(directory, CLASSIFIER_FILE)) as fh:
        fh.write((json.dumps(info, indent=2) + "\n").encode("utf-8"))


def load_classifier(directory, device: str | None = None):
    """(model, info) from a directory ``save_classifier`` wrote; ``info`` holds
    ``label_names``, ``max_length`` and ``pad_id``, the keyword arguments of ``classify_text``."""
    from ..model import GPTModel

    directory = os.fspath(directory)
    path = os.path.join(directory, CLASSIFIER_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} has no {CLASSIFIER_FILE}: not a classifier written by "
                                "`numpygpt finetune classify` (save_classifier)")
    with open(path, encoding="utf-8") as f:
        info = json.load(f)
    model = GPTModel.from_pretrained(directory, device=device)
    if model.cfg.num_classes != len(info["label_names"]):
        raise ValueError(f"{directory}: the model has {model.cfg.num_classes} classes but {CLASSIFIER_FILE} names "
                         f"{len(info['label_names'])}")
    return model.eval(), {k: info[k] for k in ("label_names", "max_length", "pad_id")}


def classify_text(model, text: str, label_names=None, max_length: int | None = None, pad_id: int = PAD_ID,
                  tokenizer=None):
    """The label of ``text`` (its class id when no ``label_names``): the book's classify_review.

    The text is tokenised, truncated to ``max_length`` (default: the model's context) and
    right-padded with ``pad_id`` to it, as the training texts were.
    """
    from ..tokenizer import get_tokenizer

    if not isinstance(text, str) or not text.strip():
        raise ValueError("the text to classify is empty")
    tokenizer = tokenizer if tokenizer is not None else get_tokenizer()
    length = min(max_length or model.cfg.context_length, model.cfg.context_length)
    ids = tokenizer.encode_ordinary(text)[:length]
    inputs = [ids + [pad_id] * (length - len(ids))]
    import numpy

    class_id = int(predict(model, numpy.asarray(inputs, dtype=numpy.int64))[0])  # (1, T) -> (1,)
    return label_names[class_id] if label_names is not None else class_id


def classify_texts(model_dir, texts, device: str = "auto", log=print) -> list:
    """``numpygpt classify``: the label of each text by the classifier in ``model_dir``,
    printed one a line (``log=None``: silent)."""
    model, info = load_classifier(model_dir, device=backend.set_device(device))
    labels = [classify_text(model, text, **info) for text in texts]
    if log is not None:
        log("\n".join(map(str, labels)))
    return labels


# -- the command ------------------------------------------------------------------------------------

# `numpygpt finetune classify` with no options: the book's recipe.
FINETUNE_CLASSIFY_DEFAULTS = dict(
    data=None, label_column=None, text_column=None, max_length=None, pretrained="gpt2",
    readout="last", trainable=None, lora_rank=None, lora_alpha=None, lr=None, weight_decay=0.1,
    epochs=5, batch_size=8, eval_freq=50, eval_iter=5, seed=123, device="auto",
    out="runs/classifier", no_progress=False,
)
DEFAULT_LR, DEFAULT_LORA_LR = 5e-5, 8e-4  # the book's chapter 6; appendix E's current code


def _check_options(o: dict) -> None:
    """Every option that can be checked before anything is loaded."""
    unknown = set(o) - set(FINETUNE_CLASSIFY_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown options: {sorted(unknown)}")
    if o["lora_rank"] is None and o["lora_alpha"] is not None:
        raise ValueError("--lora-alpha needs --lora-rank")
    if o["lora_rank"] is not None:
        if o["lora_rank"] <= 0:
            raise ValueError(f"--lora-rank must be a positive integer, got {o['lora_rank']}")
        if o["lora_alpha"] is not None and not o["lora_alpha"] > 0:
            raise ValueError(f"--lora-alpha must be > 0, got {o['lora_alpha']}")
        if o["trainable"] is not None:
            raise ValueError("--trainable and --lora-rank exclude each other: LoRA trains only its adapters")
    if o["trainable"] is not None and o["trainable"] not in TRAINABLE:
        raise ValueError(f"--trainable must be one of {', '.join(TRAINABLE)}, got {o['trainable']!r}")
    if o["readout"] not in ("last", "last_non_pad"):
        raise ValueError(f"--readout must be 'last' or 'last_non_pad', got {o['readout']!r}")
    for key in ("epochs", "batch_size", "eval_freq", "eval_iter"):
        if o[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {o[key]}")
    if o["max_length"] is not None and o["max_length"] < 1:
        raise ValueError(f"--max-length must be >= 1, got {o['max_length']}")
    for key in ("lr", "weight_decay"):
        if o[key] is not None and not o[key] >= 0:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 0, got {o[key]}")
    if o["data"] is not None and not os.path.isfile(o["data"]):
        raise FileNotFoundError(f"--data: {o['data']!r} does not exist (or is not a file)")


def _load_base_model(pretrained, device: str):
    """GPT-2 weights (a Hugging Face directory or a name) with dropout 0, or the model of a
    checkpoint file written by ``numpygpt train`` / ``save_checkpoint`` (its own dropout)."""
    from ..checkpoint import load_checkpoint
    from ..model import GPTModel

    if os.path.isfile(os.fspath(pretrained)):
        return load_checkpoint(pretrained, device=device)["model"]
    return GPTModel.from_pretrained(pretrained, device=device, drop_rate=0.0)


def finetune_classifier(log=print, **options) -> dict:
    """Everything ``numpygpt finetune classify`` does; the options are its flags
    (``FINETUNE_CLASSIFY_DEFAULTS`` fills the ones not given).

    Returns {"model", "data", "history", "accuracy": {"train", "val", "test"}, "out",
    "trainable_parameters", "seconds"}. Bad input raises ValueError or OSError (no data
    and no network: OSError saying what to pass) before any training.
    """
    from ..lora import apply_lora
    from ..optim import AdamW

    t_start = time.perf_counter()
    o = {**FINETUNE_CLASSIFY_DEFAULTS, **options}
    _check_options(o)
    use_lora = o["lora_rank"] is not None
    lora_alpha = o["lora_alpha"] if o["lora_alpha"] is not None else float(o["lora_rank"] or 0)
    lr = o["lr"] if o["lr"] is not None else (DEFAULT_LORA_LR if use_lora else DEFAULT_LR)
    say = log if log is not None else (lambda msg: None)

    data_path = o["data"] if o["data"] is not None else download_sms_spam()
    device = backend.set_device(o["device"])
    model = _load_base_model(o["pretrained"], device)
    cfg = model.cfg
    if cfg.lora_rank is not None:  # a checkpoint of a LoRA model
        raise ValueError(
            f"{o['pretrained']} already has LoRA adapters (rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g})"
            + ("; --lora-rank would add a second set" if use_lora else "")
            + ": fold them into the weights first (numpygpt.merge_lora, then save_pretrained) and fine-tune that")
    data = prepare_classification_data(
        data_path, context_length=cfg.context_length, max_length=o["max_length"], batch_size=o["batch_size"],
        seed=o["seed"], label_column=o["label_column"], text_column=o["text_column"])
    K = len(data.label_names)

    # the class head (drawn from the seed; a classifier given as --pretrained keeps its own),
    # then what trains: LoRA adapters or --trainable
    if not model.is_classifier:
        model.to_classifier(K, readout=o["readout"], pad_id=PAD_ID, seed=o["seed"])
    elif cfg.num_classes != K:
        raise ValueError(f"{o['pretrained']} is a classifier with {cfg.num_classes} classes, the data has {K}")
    if use_lora:
        apply_lora(model, o["lora_rank"], lora_alpha, seed=o["seed"])
        what = f"LoRA rank {o['lora_rank']}, alpha {lora_alpha:g}"
    else:
        model.set_trainable(o["trainable"] or "last-block")
        what = f"--trainable {o['trainable'] or 'last-block'}"
    cfg = model.cfg
    n_trainable, n_total = model.num_parameters(trainable_only=True), model.num_parameters()
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    optimizer = AdamW(params, lr=lr, weight_decay=o["weight_decay"])

    out = o["out"]
    try:  # now, so an unusable --out fails before the training, not after it
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise OSError(f"--out: cannot create {out!r}: {e.strerror or e}") from e
    if not os.access(out, os.W_OK):
        raise PermissionError(f"--out: cannot write to {out!r}")

    T = data.train.max_length
    truncated = data.train.truncated + data.val.truncated + data.test.truncated
    say(f"device      {device} ({'CuPy' if device == 'cuda' else 'NumPy'})")
    say(f"model       {o['pretrained']}: emb_dim {cfg.emb_dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
        f"context {cfg.context_length}, drop_rate {cfg.drop_rate}, readout {cfg.readout}")
    say(f"data        {data_path}: " + ", ".join(f"{n:,} {name}" for name, n in data.class_counts.items()))
    say("labels      " + ", ".join(f"{i} = {name}" for i, name in enumerate(data.label_names)))
    say(f"balanced    {data.balanced_per_class:,} per class; split {len(data.train):,} train, {len(data.val):,} "
        f"validation, {len(data.test):,} test; padded to {T} tokens"
        + (f" ({truncated:,} longer text{'s' if truncated > 1 else ''} truncated)" if truncated else ""))
    say(f"trainable   {n_trainable:,} of {n_total:,} parameters ({what})")
    say(f"plan        {o['epochs']} epochs of {len(data.train_loader):,} steps (batch {o['batch_size']}), "
        f"AdamW lr {lr:g}, weight decay {o['weight_decay']:g}; evaluation every {o['eval_freq']} steps "
        f"over {o['eval_iter']} batches")
    say("")

    history = train_classifier(model, data.train_loader, data.val_loader, optimizer, num_epochs=o["epochs"],
                               eval_freq=o["eval_freq"], eval_iter=o["eval_iter"],
                               progress=not o["no_progress"], log=log)
    accuracy = {name: calc_accuracy_loader(model, loader)
                for name, loader in (("train", data.train_loader), ("val", data.val_loader),
                                     ("test", data.test_loader))}

    save_classifier(model, out, data.label_names, T)
    loss_plot, accuracy_plot = os.path.join(out, "loss.png"), os.path.join(out, "accuracy.png")
    plot_classifier_history(history, loss_plot, accuracy_plot)
    with open(os.path.join(out, "history.json"), "w") as f:
        json.dump({**history, "accuracy": accuracy, "label_names": data.label_names}, f, indent=1)
    seconds = time.perf_counter() - t_start
    say("")
    say(f"accuracy    training {accuracy['train'] * 100:.2f}%, validation {accuracy['val'] * 100:.2f}%, "
        f"test {accuracy['test'] * 100:.2f}%")
    say(f"model       {out} (numpygpt classify --model {out} \"some text\")"
        + (f"; adapters alone in {os.path.join(out, LORA_FILE)}" if use_lora else ""))
    say(f"plots       {loss_plot}, {accuracy_plot}")
    say(f"time        {seconds:.0f} s")
    return {"model": model, "data": data, "history": history, "accuracy": accuracy, "out": out,
            "trainable_parameters": n_trainable, "seconds": seconds}
