"""`numpygpt finetune classify` and `numpygpt classify` end to end, offline: a tiny GPT saved
as a pretrained directory learns a generated two-class data set in seconds (last block, and
LoRA), labels new text, and every kind of bad input is one line on stderr with exit code 2."""

import json

import numpy as np
import pytest

from numpygpt import GPTConfig, GPTModel
from numpygpt.cli import main

FRUIT = "apple banana cherry grape lemon mango melon peach pear plum".split()
SPACE = "rocket planet galaxy comet orbit star moon nebula quasar meteor".split()
C, K, LAYERS = 32, 2, 2


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny GPT-2-shaped model (GPT-2's vocabulary, random weights) in the HF layout."""
    directory = tmp_path_factory.mktemp("tiny-gpt2")
    cfg = GPTConfig(vocab_size=50257, context_length=32, emb_dim=C, n_heads=2, n_layers=LAYERS,
                    drop_rate=0.1, qkv_bias=True, tie_weights=True)
    GPTModel(cfg, seed=1).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """400 messages of 3 to 8 words: fruit ones are ham, space ones spam; 240 ham and 160 spam,
    so that balancing has something to drop."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(400):
        spam = i % 5 in (1, 3)
        words = rng.choice(SPACE if spam else FRUIT, rng.integers(3, 9))
        lines.append(f"{'spam' if spam else 'ham'}\t{' '.join(words)}")
    path = tmp_path_factory.mktemp("data") / "messages.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def finetune(pretrained, data, out, *extra):
    return main(["finetune", "classify", "--data", str(data), "--pretrained", str(pretrained), "--out", str(out),
                 "--device", "cpu", "--no-progress", "--eval-freq", "10", *extra])


def printed_value(out: str, key: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(key))[len(key):].strip()


def assert_one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert err.startswith("numpygpt: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err


# -- it learns ---------------------------------------------------------------------------------------

def test_last_block_recipe_learns_and_classify_labels_new_text(pretrained, data_file, tmp_path, capsys):
    out = tmp_path / "classifier"
    assert finetune(pretrained, data_file, out, "--lr", "2e-3") == 0
    printed = capsys.readouterr().out
    # last block (12 C^2 + 13 C) + final LayerNorm (2 C) + head (C K + K), counted by hand
    assert printed_value(printed, "trainable").startswith(f"{12 * C * C + 13 * C + 2 * C + C * K + K:,} of ")
    assert "labels      0 = ham, 1 = spam" in printed
    assert "balanced    160 per class; split 224 train, 32 validation, 64 test" in printed
    assert "training accuracy" in printed and "val loss" in printed

    history = json.loads((out / "history.json").read_text())
    assert history["accuracy"]["test"] >= 0.95, history["accuracy"]
    assert history["global_step"] == 5 * (224 // 8)
    assert history["track_steps"][:3] == [1, 11, 21]
    for name in ("config.json", "model.safetensors", "classifier.json"):
        assert (out / name).is_file()
    for name in ("loss.png", "accuracy.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"

    assert main(["classify", "--model", str(out), "--device", "cpu", "plum pear apple", "comet orbit star moon"]) == 0
    assert capsys.readouterr().out.split() == ["ham", "spam"]


def test_lora_learns_with_only_its_adapters_trainable(pretrained, data_file, tmp_path, capsys):
    out = tmp_path / "lora"
    r = 4
    assert finetune(pretrained, data_file, out, "--lora-rank", str(r), "--lora-alpha", "8", "--lr", "5e-3") == 0
    printed = capsys.readouterr().out
    # adapters A (in, r) and B (r, out) on c_attn (three: Q, K, V), attn.c_proj, c_fc, mlp.c_proj
    # of every block and on the head: r * (6C + 2C + 5C + 5C) a block, r * (C + K) the head
    expected = LAYERS * r * 18 * C + r * (C + K)
    assert printed_value(printed, "trainable").startswith(f"{expected:,} of ")
    assert "LoRA rank 4, alpha 8" in printed
    history = json.loads((out / "history.json").read_text())
    assert history["accuracy"]["test"] >= 0.9, history["accuracy"]
    assert main(["classify", "--model", str(out), "--device", "cpu", "melon mango", "quasar nebula rocket"]) == 0
    assert capsys.readouterr().out.split() == ["ham", "spam"]


def test_python_api_lora_model_saves_merged_and_loads_with_the_same_outputs(pretrained, data_file, tmp_path):
    from numpygpt.finetune.classify import classify_text, finetune_classifier, load_classifier
    from numpygpt.nn import no_grad

    result = finetune_classifier(data=str(data_file), pretrained=str(pretrained), out=str(tmp_path / "o"),
                                 device="cpu", no_progress=True, epochs=1, lora_rank=2, lr=5e-3, log=None)
    model, data = result["model"], result["data"]
    assert result["trainable_parameters"] == LAYERS * 2 * 18 * C + 2 * (C + K)
    assert (tmp_path / "o" / "lora-adapters.safetensors").is_file()  # the adapters alone, too (lora.save_merged)
    loaded, info = load_classifier(tmp_path / "o")
    assert info == {"label_names": ["ham", "spam"], "max_length": data.train.max_length, "pad_id": 50256}
    assert loaded.cfg.lora_rank is None  # saved merged: a plain classifier
    inputs, _ = data.test.get_batch(range(8))
    model.eval()
    with no_grad():
        np.testing.assert_allclose(loaded(inputs), model(inputs), rtol=1e-4, atol=1e-5)
    assert classify_text(loaded, "star moon", **info) == classify_text(model, "star moon", **info)


def test_pretrained_may_be_a_checkpoint_or_a_classifier_but_not_lora(pretrained, data_file, tmp_path, capsys):
    from numpygpt import apply_lora
    from numpygpt.checkpoint import save_checkpoint

    model = GPTModel.from_pretrained(str(pretrained))
    save_checkpoint(tmp_path / "plain.safetensors", model)
    assert finetune(tmp_path / "plain.safetensors", data_file, tmp_path / "o", "--epochs", "1") == 0
    assert "trainable" in capsys.readouterr().out
    # a classifier this command wrote trains on with its own head ...
    head = GPTModel.from_pretrained(str(tmp_path / "o")).score.weight.data
    assert finetune(tmp_path / "o", data_file, tmp_path / "o3", "--epochs", "1", "--lr", "0") == 0
    np.testing.assert_array_equal(GPTModel.from_pretrained(str(tmp_path / "o3")).score.weight.data, head)
    # ... but not on data with another number of classes
    three = tmp_path / "three.txt"
    three.write_text("".join(f"{c}\tword {i}\n" for i in range(30) for c in "abc"), encoding="utf-8")
    assert finetune(tmp_path / "o", three, tmp_path / "o4") == 2
    assert_one_line_error(capsys, "is a classifier with 2 classes, the data has 3")
    save_checkpoint(tmp_path / "lora.safetensors", apply_lora(model, 2, 4.0))
    assert finetune(tmp_path / "lora.safetensors", data_file, tmp_path / "o2", "--lora-rank", "4") == 2
    assert_one_line_error(capsys, "already has LoRA adapters (rank 2, alpha 4)", "a second set")


def test_the_example_script_is_the_command(pretrained, data_file, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / "examples" / "finetune_classifier.py"), "--data", str(data_file),
                             "--pretrained", str(pretrained), "--out", str(tmp_path / "ex"), "--device", "cpu",
                             "--epochs", "1", "--no-progress"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "trainable   12,834 of " in result.stdout and "accuracy    training" in result.stdout
    assert (tmp_path / "ex" / "classifier.json").is_file()
    bad = subprocess.run([sys.executable, str(root / "examples" / "finetune_classifier.py"), "--lora-rank", "0"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == "numpygpt: error: --lora-rank must be a positive integer, got 0"


# -- bad input: one line on stderr, exit code 2 -------------------------------------------------------

@pytest.mark.parametrize("name, content, extra, needles", [
    ("data.csv", "Category,Message\nham,hi\nspam,win\n", [], ["no label column 'Label'", "'Category', 'Message'"]),
    ("data.csv", "Label,Text\nham,hi\n", ["--label-column", "Class"], ["no label column 'Class'"]),
    ("one.txt", "ham\thello\nham\tthere\n", [], ["every example has the label 'ham'"]),
    ("empty.txt", "", [], ["holds no examples"]),
    ("long.txt", ("ham\tshort\nspam\t" + " ".join(["word"] * 40) + "\n") * 20, [],  # every spam text is 40 tokens
     ["is 40 tokens long, longer than the model's context of 32", "--max-length"]),
    ("few.txt", "ham\ta\nspam\tb\n", [], ["too few examples"]),
])
def test_bad_data(pretrained, tmp_path, capsys, name, content, extra, needles):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    assert finetune(pretrained, path, tmp_path / "out", *extra) == 2
    assert_one_line_error(capsys, *needles)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, needle", [
    (["--lora-rank", "0"], "--lora-rank must be a positive integer, got 0"),
    (["--lora-rank", "-2"], "--lora-rank must be a positive integer, got -2"),
    (["--lora-rank", "4", "--lora-alpha", "0"], "--lora-alpha must be > 0"),
    (["--lora-rank", "4", "--lora-alpha", "-1"], "--lora-alpha must be > 0"),
    (["--lora-alpha", "4"], "--lora-alpha needs --lora-rank"),
    (["--lora-rank", "4", "--trainable", "all"], "exclude each other"),
    (["--trainable", "h.1"], "--trainable must be one of all, last-block, last-two-blocks, head"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--max-length", "0"], "--max-length must be >= 1"),
    (["--max-length", "33"], "max_length 33 exceeds the model's context length 32"),
])
def test_bad_options(pretrained, data_file, tmp_path, capsys, extra, needle):
    assert finetune(pretrained, data_file, tmp_path / "out", *extra) == 2
    assert_one_line_error(capsys, needle)


def test_an_unusable_out_fails_before_training(pretrained, data_file, tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    assert finetune(pretrained, data_file, tmp_path / "file" / "out") == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("numpygpt: error: ") and captured.err.count("\n") == 1
    assert "--out: cannot create" in captured.err and "Ep 1" not in captured.out  # no step was taken


def test_missing_files(pretrained, data_file, tmp_path, capsys):
    assert finetune(pretrained, tmp_path / "nope.txt", tmp_path / "out") == 2
    assert_one_line_error(capsys, "--data", "does not exist")
    assert finetune(tmp_path / "no-model", data_file, tmp_path / "out") == 2
    assert_one_line_error(capsys, "no-model")
    assert main(["classify", "--model", str(pretrained), "--device", "cpu", "hello"]) == 2
    assert_one_line_error(capsys, "has no classifier.json")


def test_offline_without_data_says_what_to_pass(pretrained, tmp_path, capsys, monkeypatch):
    from urllib.error import URLError

    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("NUMPYGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("numpygpt.download.download_file", offline)
    assert main(["finetune", "classify", "--pretrained", str(pretrained), "--device", "cpu",
                 "--out", str(tmp_path / "out")]) == 2
    assert_one_line_error(capsys, "could not be downloaded", "--data PATH", "SMSSpamCollection")
