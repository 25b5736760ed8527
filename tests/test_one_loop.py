"""One training loop for every recipe (issue 21): a recipe brings an objective and its metric
hooks, and gets checkpoints, resume and accumulation from ``train_model``; every command's
options come from one dataclass that argparse reads its defaults and help from."""

import argparse
import dataclasses
import json

import numpy as np
import pytest

from numpygpt import GPTConfig, GPTModel
from numpygpt.checkpoint import load_checkpoint
from numpygpt.cli import build_parser, main
from numpygpt.data import DataLoader
from numpygpt.nn import CrossEntropyLoss
from numpygpt.objective import ClassifierObjective, NextTokenObjective, split_rows
from numpygpt.optim import SGD, AdamW
from numpygpt.options import Options, add_arguments, option, POSITIVE_INT
from numpygpt.train import TrainOptions, TrainState, train_model

from test_finetune_classify import C, LAYERS, data_file, finetune, pretrained  # noqa: F401  (fixtures)


class Windows:
    """n random windows of T tokens: (inputs, targets) pairs for a DataLoader."""

    def __init__(self, n=12, T=8, V=50, seed=0):
        rng = np.random.default_rng(seed)
        self.ids = rng.integers(0, V, size=(n, T + 1))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.ids[i, :-1], self.ids[i, 1:]


def tiny(dtype="float64"):
    cfg = GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0, dtype=dtype)
    return GPTModel(cfg, seed=3)


class DictBatches:
    """A loader of dict batches, as a recipe with more than inputs and targets has them."""

    def __init__(self, windows, B):
        self.windows, self.batch_size = windows, B

    def __len__(self):
        return len(self.windows) // self.batch_size

    def __iter__(self):
        for b in range(len(self)):
            rows = [self.windows[i] for i in range(b * self.batch_size, (b + 1) * self.batch_size)]
            yield {"ids": np.stack([r[0] for r in rows]), "next": np.stack([r[1] for r in rows])}


class DictObjective:
    """The next-token loss over dict batches, written against the protocol alone."""

    def __init__(self):
        self.loss_fn = CrossEntropyLoss()

    def loss(self, model, batch):
        return self.loss_fn(model(batch["ids"]), batch["next"])

    def backward(self, model, scale=1.0):
        model.backward(self.loss_fn.backward(scale))

    def count(self, batch):
        return int(batch["ids"].size)

    def split(self, batch, comm):
        return split_rows(batch, comm)


def test_a_recipe_objective_trains_as_the_default_one():
    """The same data as dict batches through a recipe's own objective gives the same losses
    and weights as (inputs, targets) batches through the default objective."""
    windows = Windows()
    a, b = tiny(), tiny()
    plain = DataLoader(windows, 4, shuffle=False)
    ha = train_model(a, plain, plain, SGD(a, lr=0.5), 2, 100, 1, progress=False, log=None)
    hb = train_model(b, DictBatches(windows, 4), DictBatches(windows, 4), SGD(b, lr=0.5), 2, 100, 1,
                     objective=DictObjective(), progress=False, log=None)
    assert ha["step_losses"] == hb["step_losses"] and len(ha["step_losses"]) == 6
    assert ha["tokens_seen"] == hb["tokens_seen"] == 6 * 4 * 8
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=name)


def test_hooks_metrics_are_in_the_history_and_survive_a_resume(tmp_path):
    windows = Windows(n=16)
    loader = DataLoader(windows, 4, shuffle=True, seed=1)
    calls = []

    def on_epoch_end(model, state, say):
        calls.append(state.epoch)
        say(f"epoch {state.epoch + 1} done")
        return {"epoch_marks": float(state.epoch + 1)}

    def on_evaluate(model, state, say):
        assert not model.training  # hooks run in eval mode
        return {"eval_steps": float(state.global_step)}

    lines = []
    opts = TrainOptions(on_epoch_end=on_epoch_end, on_evaluate=on_evaluate, progress=False, log=lines.append)
    model = tiny()
    whole = train_model(model, loader, loader, AdamW(model, lr=1e-2), 3, 5, 1, options=opts)
    assert whole["epoch_marks"] == [1.0, 2.0, 3.0] and whole["eval_steps"] == [1.0, 6.0, 11.0]
    assert "epoch 2 done" in lines and model.training  # back in training mode after the hooks

    ckpt = tmp_path / "c.safetensors"
    first = tiny()
    opt = AdamW(first, lr=1e-2)
    train_model(first, loader, loader, opt, 3, 5, 1, options=dataclasses.replace(
        opts, max_steps=6, checkpoint_path=ckpt))
    again = tiny()
    opt2 = AdamW(again, lr=1e-2)
    state = TrainState.from_checkpoint(load_checkpoint(ckpt, again, opt2))
    assert state.history["epoch_marks"] == [1.0]  # a recipe's list is kept in the checkpoint
    resumed = train_model(again, loader, loader, opt2, 3, 5, 1, options=dataclasses.replace(opts, resume_state=state))
    assert resumed["step_losses"] == whole["step_losses"]
    assert resumed["epoch_marks"] == whole["epoch_marks"] and resumed["eval_steps"] == whole["eval_steps"]


def test_the_classifier_objective_counts_examples():
    batch = (np.zeros((3, 7), dtype=np.int64), np.zeros(3, dtype=np.int64))
    assert ClassifierObjective().count(batch) == 3 and NextTokenObjective().count(batch) == 21


# -- the classifier inside the loop: resume and accumulation -------------------------------------------

def test_an_interrupted_classifier_run_resumes_to_the_same_model(pretrained, data_file, tmp_path, capsys):  # noqa: F811
    from numpygpt.finetune.classify import load_classifier

    common = ("--epochs", "2", "--lr", "2e-3", "--batch-size", "16")
    assert finetune(pretrained, data_file, tmp_path / "whole", *common) == 0
    assert finetune(pretrained, data_file, tmp_path / "parts", *common, "--max-steps", "9",
                    "--checkpoint-every", "4") == 0
    capsys.readouterr()
    assert finetune(pretrained, data_file, tmp_path / "parts", *common, "--resume") == 0
    assert "Ep 2: training accuracy" in capsys.readouterr().out
    whole, parts = (json.loads((tmp_path / d / "history.json").read_text()) for d in ("whole", "parts"))
    assert whole["global_step"] == parts["global_step"] == 2 * (224 // 16)
    assert parts["step_losses"] == whole["step_losses"]
    assert parts["val_accs"] == whole["val_accs"] and len(whole["val_accs"]) == 2
    assert parts["accuracy"] == whole["accuracy"]
    (a, _), (b, _) = (load_classifier(tmp_path / d, device="cpu") for d in ("whole", "parts"))
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=name)
    # another learning rate is not the same run
    assert finetune(pretrained, data_file, tmp_path / "parts", *common, "--resume", "--lr", "1e-3") == 2
    assert "was trained with lr 0.002, this run has 0.001" in capsys.readouterr().err


def test_the_classifier_accumulates_micro_batches(pretrained, data_file, tmp_path):  # noqa: F811
    """--grad-accum reaches the loop: 2 micro-batches of 8 make a step of 16 examples (the loop's
    accumulation itself is checked against one big batch in test_train.py)."""
    from numpygpt.finetune.classify import finetune_classifier

    common = dict(data=str(data_file), pretrained=str(pretrained), device="cpu", no_progress=True, epochs=1,
                  max_steps=3, lr=2e-3, log=None)
    one = finetune_classifier(out=str(tmp_path / "one"), batch_size=16, **common)
    two = finetune_classifier(out=str(tmp_path / "two"), batch_size=8, grad_accum=2, seed=123, **common)
    # the two loaders draw different orders (batch size changes the batches), so compare what
    # accumulation promises: the same number of examples a step, and a loss per step
    assert one["history"]["examples_seen"] == two["history"]["examples_seen"] == 3 * 16
    assert len(two["history"]["step_losses"]) == 3


# -- options: one dataclass per command -------------------------------------------------------------

@dataclasses.dataclass
class Toy(Options):
    steps: int = option(7, "how many", check=POSITIVE_INT)
    mode: str = option("a", "which", choices=("a", "b"))


def test_argparse_reads_defaults_help_and_checks_from_the_dataclass():
    p = argparse.ArgumentParser()
    add_arguments(p, Toy)
    assert vars(p.parse_args([])) == {"steps": 7, "mode": "a"}
    assert "how many (default 7)" in p.format_help()
    with pytest.raises(SystemExit):
        p.parse_args(["--steps", "0"])
    with pytest.raises(ValueError, match="--steps must be a positive integer, got 0"):
        Toy(steps=0).validate()
    with pytest.raises(ValueError, match="--mode must be one of a, b"):
        Toy(mode="c").validate()
    with pytest.raises(TypeError, match="unknown options"):
        Toy.from_dict({"stepz": 1})


@pytest.mark.parametrize("command, cls", [
    (["train"], "numpygpt.run:TrainCommandOptions"),
    (["finetune", "classify"], "numpygpt.finetune.classify:ClassifyOptions"),
    (["finetune", "instruct"], "numpygpt.finetune.instruct:InstructOptions"),
])
def test_every_flag_of_every_command_is_a_field_with_the_same_default(command, cls):
    import importlib

    module, name = cls.split(":")
    options = getattr(importlib.import_module(module), name)
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command[0]]
    if len(command) > 1:
        sub = sub._subparsers._group_actions[0].choices[command[1]]
    flags = {a.dest for a in sub._actions if a.dest != "help"}
    fields = {f.name: f for f in dataclasses.fields(options)}
    assert flags == set(fields)
    for action in sub._actions:
        if action.dest in fields and action.default is not argparse.SUPPRESS:
            assert action.default == fields[action.dest].default, action.dest


@pytest.mark.parametrize("task", ["classify", "instruct"])
def test_lora_alpha_without_rank_is_the_same_error_for_both_commands(task, tmp_path, capsys):
    assert main(["finetune", task, "--lora-alpha", "4", "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--lora-alpha needs --lora-rank" in err and err.count("\n") == 1
