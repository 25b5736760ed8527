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
import os
import time
from dataclasses import dataclass

from .. import backend
from ..config import TRAINABLE
from ..lora import ADAPTERS_FILE
from ..nn import eval_mode, no_grad
from ..options import option
from ..progress import say as _say
from ..train import loader_batches
from .classify_data import PAD_ID, download_sms_spam, prepare_classification_data
from .common import AT_LEAST_ONE, MODEL_SOURCES, RecipeOptions, describe_model, directory_tokenizer, load_model, recipe_field, start_run

__all__ = [
    "calc_accuracy_loader", "predict", "train_classifier", "classifier_options", "accuracy_hook", "plot_classifier_history",
    "finetune_classifier", "ClassifyOptions", "FINETUNE_CLASSIFY_DEFAULTS", "save_classifier", "load_classifier",
    "classify_text", "classify_texts", "CLASSIFIER_FILE",
]

CLASSIFIER_FILE = "classifier.json"  # next to config.json + model.safetensors: labels and padding


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


# -- the loop: train_model with the classifier's objective and its accuracy hook -------------------

def accuracy_hook(train_loader, val_loader, eval_iter: int):
    """``on_epoch_end`` for ``train_model``: the accuracy over ``eval_iter`` batches of each
    split after every epoch, as the book's ``train_classifier_simple`` prints it."""
    def hook(model, state, say) -> dict:
        train_acc = calc_accuracy_loader(model, train_loader, eval_iter)
        val_acc = calc_accuracy_loader(model, val_loader, eval_iter)
        say(f"Ep {state.epoch + 1}: training accuracy {train_acc * 100:.2f}% | "
            f"validation accuracy {val_acc * 100:.2f}%")
        return {"train_accs": train_acc, "val_accs": val_acc, "epoch_examples_seen": state.tokens_seen}
    return hook


def classifier_options(train_loader, val_loader, eval_iter: int, progress: bool = True, log=print,
                       options=None):
    """``TrainOptions`` (``options``, or the defaults) with the classifier's objective and its
    accuracy hook: what makes ``train_model`` the book's ``train_classifier_simple``."""
    import dataclasses

    from ..objective import ClassifierObjective
    from ..train import TrainOptions

    return dataclasses.replace(options or TrainOptions(), objective=ClassifierObjective(), progress=progress,
                               log=log, on_epoch_end=accuracy_hook(train_loader, val_loader, eval_iter))


def train_classifier(model, train_loader, val_loader, optimizer, num_epochs: int = 5, eval_freq: int = 50,
                     eval_iter: int = 5, progress: bool = True, log=print, options=None) -> dict:
    """The book's ``train_classifier_simple`` through ``train_model``: cross-entropy of the
    (B, K) logits against the (B,) labels, the losses over ``eval_iter`` batches after step 1,
    1 + eval_freq, ..., the accuracies after every epoch (``train_accs``, ``val_accs``), and
    everything the loop gives every recipe (checkpoints, Ctrl-C, resume, accumulation, MPI:
    pass a ``TrainOptions`` as ``options``). Returns the history; ``examples_seen`` counts the
    training examples (the loop's ``tokens_seen``: the classifier's objective counts examples).
    """
    from ..train import train_model

    opts = classifier_options(train_loader, val_loader, eval_iter, progress, log, options)
    history = train_model(model, train_loader, val_loader, optimizer, num_epochs, eval_freq, eval_iter,
                          options=opts)
    history["examples_seen"] = history["tokens_seen"]
    return history


# -- plots ------------------------------------------------------------------------------------------

def plot_classifier_history(history: dict, loss_path, accuracy_path) -> None:
    """Two PNGs: loss against steps, accuracy against epochs; examples seen on the top axis."""
    from ..plots import plot_curves, plot_losses

    train_accs, val_accs = history.get("train_accs", []), history.get("val_accs", [])  # none before an epoch ends
    per_epoch = history["epoch_examples_seen"][0] if history.get("epoch_examples_seen") else 0
    plot_losses(history, loss_path, seen="Examples seen")
    plot_curves(accuracy_path, list(range(1, len(train_accs) + 1)), train_accs, val_accs, "Epochs", "Accuracy",
                per_x=per_epoch, seen="Examples seen")


# -- saving, loading and classifying -----------------------------------------------------------------

def save_classifier(model, directory, label_names, max_length: int, pad_id: int = PAD_ID, tokenizer=None) -> None:
    """The model as its family's Hugging Face directory (config.json + model.safetensors, via
    ``lora.save_merged``) and ``classifier.json``: the label names in class-id order and
    the length texts are padded to, which ``classify_text`` needs to read a new text the
    way the model was trained; a tokenizer other than GPT-2's is saved beside them.

    A LoRA model is written with its adapters folded in (the model itself unchanged), as a
    plain classifier, and its adapters alone go to ``lora-adapters.safetensors`` as well.
    """
    from ..fileio import atomic_write
    from ..lora import save_merged
    from ..tokenizer import save_tokenizer

    directory = os.fspath(directory)
    save_merged(model, directory)
    if tokenizer is not None:
        save_tokenizer(tokenizer, directory)
    info = {"label_names": list(label_names), "max_length": int(max_length), "pad_id": int(pad_id)}
    with atomic_write(os.path.join(directory, CLASSIFIER_FILE)) as fh:
        fh.write((json.dumps(info, indent=2) + "\n").encode("utf-8"))


def load_classifier(directory, device: str | None = None):
    """(model, info) from a directory ``save_classifier`` wrote (a classifier of any family);
    ``info`` holds ``label_names``, ``max_length`` and ``pad_id``, keyword arguments of
    ``classify_text`` (with the directory's tokenizer: ``finetune.common.directory_tokenizer``)."""
    from ..hf import from_pretrained

    directory = os.fspath(directory)
    path = os.path.join(directory, CLASSIFIER_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} has no {CLASSIFIER_FILE}: not a classifier written by "
                                "`numpygpt finetune classify` (save_classifier)")
    with open(path, encoding="utf-8") as f:
        info = json.load(f)
    model = from_pretrained(directory, device=device)
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
    tokenizer = directory_tokenizer(model_dir)
    labels = [classify_text(model, text, tokenizer=tokenizer, **info) for text in texts]
    if log is not None:
        log("\n".join(map(str, labels)))
    return labels


# -- the command ------------------------------------------------------------------------------------

DEFAULT_LR, DEFAULT_LORA_LR = 5e-5, 8e-4  # the book's chapter 6; appendix E's current code


@dataclass
class ClassifyOptions(RecipeOptions):
    """``numpygpt finetune classify``'s options; with none given, the book's chapter 6 recipe.
    A bad value is one line on stderr (``validate``), not a usage message."""

    ARGPARSE_CHECKS = False

    data: str | None = option(None, "label<TAB>text lines (the SMS Spam Collection's format) or a CSV with Label,Text "
                              "columns (default: download the SMS Spam Collection)", metavar="PATH")
    label_column: str | None = option(None, "the CSV's label column (default Label)", metavar="NAME")
    text_column: str | None = option(None, "the CSV's text column (default Text)", metavar="NAME")
    max_length: int | None = option(None, "truncate texts to N tokens (default: pad to the longest training text; "
                                    "longer than the model's context is an error)", check=AT_LEAST_ONE, metavar="N")
    pretrained: str = option("gpt2", "the model to start from: " + MODEL_SOURCES, metavar="DIR_OR_NAME")
    readout: str = option("last", "logits read at the last position (the book) or at the last non-padding token",
                          choices=("last", "last_non_pad"))
    trainable: str | None = option(None, "all, last-block (default: last block, final LayerNorm, head), "
                                   "last-two-blocks or head", choices=TRAINABLE, metavar="WHICH")
    out: str = recipe_field("out", "runs/classifier")
    epochs: int = recipe_field("epochs", 5)
    lr: float | None = recipe_field("lr", None, help=f"AdamW learning rate (default {DEFAULT_LR:g}; "
                                    f"{DEFAULT_LORA_LR:g} with LoRA)")
    eval_freq: int = recipe_field("eval_freq", 50)
    seed: int = recipe_field("seed", help="seeds the balancing, split, batch order and class head")

    def check_more(self) -> None:
        super().check_more()
        if self.lora_rank is not None and self.trainable is not None:
            raise ValueError("--trainable and --lora-rank exclude each other: LoRA trains only its adapters")
        if self.data is not None and not os.path.isfile(self.data):
            raise FileNotFoundError(f"--data: {self.data!r} does not exist (or is not a file)")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (DEFAULT_LORA_LR if self.lora_rank else DEFAULT_LR)


FINETUNE_CLASSIFY_DEFAULTS = ClassifyOptions.defaults()  # the book's recipe, as a dict


def _classifier_model(o: ClassifyOptions, num_classes: int, model, pad_id: int) -> tuple:
    """The model to train: the base model with a class head drawn from the seed (a classifier
    given as --pretrained keeps its own), then what trains: LoRA adapters or --trainable.
    Returns (model, a description of what trains)."""
    from ..lora import apply_lora

    cfg = model.cfg
    if not model.is_classifier:
        model.to_classifier(num_classes, readout=o.readout, pad_id=pad_id, seed=o.seed)
    elif cfg.num_classes != num_classes:
        raise ValueError(f"{o.pretrained} is a classifier with {cfg.num_classes} classes, the data has {num_classes}")
    if o.lora_rank is not None:
        apply_lora(model, o.lora_rank, o.alpha, seed=o.seed)
        return model, f"LoRA rank {o.lora_rank}, alpha {o.alpha:g}"
    model.set_trainable(o.trainable or "last-block")
    return model, f"--trainable {o.trainable or 'last-block'}"


def _load_model_and_data(o: ClassifyOptions, device: str, data_path: str):
    """(model, data, what trains, tokenizer): the model of --pretrained (any family) made a
    classifier, and the data tokenised with its tokenizer, padded with its end-of-text."""
    model, tokenizer = load_model(o.pretrained, device)
    cfg = model.cfg
    if cfg.lora_rank is not None:  # a checkpoint of a LoRA model
        raise ValueError(
            f"{o.pretrained} already has LoRA adapters (rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g})"
            + ("; --lora-rank would add a second set" if o.lora_rank else "")
            + ": fold them into the weights first (numpygpt.merge_lora, then save_pretrained) and fine-tune that")
    pad_id = tokenizer.eot_token
    data = prepare_classification_data(
        data_path, context_length=cfg.context_length, tokenizer=tokenizer, max_length=o.max_length,
        batch_size=o.batch_size, seed=o.seed, label_column=o.label_column, text_column=o.text_column, pad_id=pad_id)
    model, what = _classifier_model(o, len(data.label_names), model, pad_id)
    return model, data, what, tokenizer


def _print_plan(o: ClassifyOptions, model, data, data_path, device, what, log) -> None:
    cfg, T = model.cfg, data.train.max_length
    truncated = data.train.truncated + data.val.truncated + data.test.truncated
    n_trainable, n_total = model.num_parameters(trainable_only=True), model.num_parameters()
    for line in (
        f"device      {device} ({'CuPy' if device == 'cuda' else 'NumPy'})",
        f"model       {describe_model(o.pretrained, cfg)}, readout {cfg.readout}",
        f"data        {data_path}: " + ", ".join(f"{n:,} {name}" for name, n in data.class_counts.items()),
        "labels      " + ", ".join(f"{i} = {name}" for i, name in enumerate(data.label_names)),
        f"balanced    {data.balanced_per_class:,} per class; split {len(data.train):,} train, {len(data.val):,} "
        f"validation, {len(data.test):,} test; padded to {T} tokens"
        + (f" ({truncated:,} longer text{'s' if truncated > 1 else ''} truncated)" if truncated else ""),
        f"trainable   {n_trainable:,} of {n_total:,} parameters ({what})",
        f"plan        {o.epochs} epochs of {len(data.train_loader) // o.grad_accum:,} steps (batch {o.batch_size}"
        + (f" x {o.grad_accum}" if o.grad_accum > 1 else "") + f"), AdamW lr {o.learning_rate:g}, weight decay "
        f"{o.weight_decay:g}; evaluation every {o.eval_freq} steps over {o.eval_iter} batches",
        "",
    ):
        _say(line, log)


def finetune_classifier(options: ClassifyOptions | None = None, log=print, **given) -> dict:
    """Everything ``numpygpt finetune classify`` does: ``options`` (a ClassifyOptions) or its
    fields as keywords (the defaults fill the rest: the book's recipe).

    Returns {"model", "data", "history", "accuracy": {"train", "val", "test"}, "out",
    "trainable_parameters", "seconds"}. Bad input raises ValueError or OSError (no data
    and no network: OSError saying what to pass) before any training.
    """
    from ..optim import AdamW
    from ..scaffold import RunFolder
    from ..train import TrainOptions

    t_start = time.perf_counter()
    o, comm, device = start_run(ClassifyOptions, options, given)
    data_path = o.data if o.data is not None else download_sms_spam()
    model, data, what, tokenizer = _load_model_and_data(o, device, data_path)
    optimizer = AdamW([(n, p) for n, p in model.named_parameters() if p.requires_grad], lr=o.learning_rate,
                      weight_decay=o.weight_decay)
    run = RunFolder(o.out, is_main=comm.is_main)  # an unusable --out fails now, before the training
    run_options = {k: v for k, v in o.to_dict().items()
                   if k not in ("device", "out", "resume", "no_progress", "max_steps", "checkpoint_every")}
    state = run.resume(model, optimizer, run_options) if o.resume else None
    _print_plan(o, model, data, data_path, device, what, log)
    options = classifier_options(data.train_loader, data.val_loader, o.eval_iter, not o.no_progress, log, TrainOptions(
        grad_accum_steps=o.grad_accum, max_steps=o.max_steps, checkpoint_path=run.checkpoint,
        checkpoint_every=o.checkpoint_every, resume_state=state, run_options=run_options))
    history = run.train(model, data.train_loader, data.val_loader, optimizer, o.epochs, o.eval_freq, o.eval_iter,
                        resume_hint="the same command with --resume", options=options)
    history["examples_seen"] = history["tokens_seen"]
    accuracy = {}
    if run.is_main:  # under mpiexec one rank evaluates and writes
        accuracy = {name: calc_accuracy_loader(model, loader)
                    for name, loader in (("train", data.train_loader), ("val", data.val_loader),
                                         ("test", data.test_loader))}
        _write_outputs(run, model, data, history, accuracy, tokenizer)
    seconds = time.perf_counter() - t_start
    _print_summary(run, accuracy, o.lora_rank is not None, seconds, log)
    return {"model": model, "data": data, "history": history, "accuracy": accuracy, "out": o.out,
            "trainable_parameters": model.num_parameters(trainable_only=True), "seconds": seconds}


def _write_outputs(run, model, data, history: dict, accuracy: dict, tokenizer) -> None:
    """The classifier directory (with the tokenizer), the two plots and the history."""
    save_classifier(model, run.out, data.label_names, data.train.max_length, model.cfg.pad_id, tokenizer)
    plot_classifier_history(history, run.path("loss.png"), run.path("accuracy.png"))
    run.write_json("history.json", {**history, "accuracy": accuracy, "label_names": data.label_names})


def _print_summary(run, accuracy: dict, lora: bool, seconds: float, log) -> None:
    if not run.is_main:
        return
    out = run.out
    _say("", log)
    _say(f"accuracy    training {accuracy['train'] * 100:.2f}%, validation {accuracy['val'] * 100:.2f}%, "
         f"test {accuracy['test'] * 100:.2f}%", log)
    _say(f"model       {out} (numpygpt classify --model {out} \"some text\")"
         + (f"; adapters alone in {os.path.join(out, ADAPTERS_FILE)}" if lora else ""), log)
    _say(f"plots       {run.path('loss.png')}, {run.path('accuracy.png')}", log)
    _say(f"time        {seconds:.0f} s", log)
