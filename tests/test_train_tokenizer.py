"""`numpygpt tokenizer train`, then `numpygpt train --tokenizer DIR`: the tokenizer sizes the
model, travels with the checkpoint (checked on resume and on generate), and every run
reports validation bits per character."""

import json
import math

import pytest

from numpygpt.checkpoint import read_checkpoint
from numpygpt.cli import main
from numpygpt.data import default_corpus, split_train_val
from numpygpt.tokenizer import load_tokenizer


def one_line_error(capsys, code):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("numpygpt: error:"), err
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 600-token tokenizer trained by the command, then a 4-step run with it."""
    root = tmp_path_factory.mktemp("tok_run")
    data = root / "small.txt"
    data.write_text(default_corpus()[:15000], encoding="utf-8")
    assert main(["tokenizer", "train", "--data", str(data), "--vocab-size", "600", "--out", str(root / "tok")]) == 0
    argv = ["train", "--data", str(data), "--tokenizer", str(root / "tok"), "--preset", "tiny", "--max-steps", "4",
            "--eval-freq", "2", "--eval-iter", "2", "--batch-size", "2", "--context-length", "32",
            "--sample-tokens", "3", "--prompt", "The", "--device", "cpu", "--no-progress", "--out", str(root / "run")]
    assert main(argv) == 0
    return root, data, argv


def test_the_tokenizer_sizes_the_model_and_is_saved_beside_the_checkpoint(run):
    root, _, _ = run
    assert (root / "run" / "tokenizer.json").read_bytes() == (root / "tok" / "tokenizer.json").read_bytes()
    saved = read_checkpoint(root / "run" / "checkpoint.safetensors")
    assert saved.config.vocab_size == 600
    record = saved.extra["tokenizer"]
    assert record["n_vocab"] == 600 and record["file"] == "tokenizer.json" and record["name"] == "tok"


def test_validation_bits_per_character(run, capsys):
    root, data, _ = run
    history = json.loads((root / "run" / "history.json").read_text())
    _, val_text = split_train_val(data.read_text(encoding="utf-8"), 0.9)
    n_tokens = len(load_tokenizer(root / "tok").encode_ordinary(val_text))
    expected = [loss * n_tokens / len(val_text) / math.log(2) for loss in history["val_losses"]]
    assert history["val_bits_per_char"] == pytest.approx(expected, rel=1e-9)
    assert len(expected) == 2 and all(0 < bits < 8 for bits in expected)


def test_generate_decodes_with_the_checkpoints_tokenizer(run, capsys):
    root, _, _ = run
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(root / "run" / "checkpoint.safetensors"), "--prompt", "The for",
                 "--max-new-tokens", "5", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("The for")


def test_resume_refuses_another_tokenizer(run, capsys):
    root, _, argv = run
    resume = ["train", "--resume", str(root / "run" / "checkpoint.safetensors"), "--max-steps", "6",
              "--out", str(root / "run"), "--no-progress", "--device", "cpu"]
    line = one_line_error(capsys, main(resume + ["--tokenizer", "gpt2"]))
    assert "was trained with a tokenizer of 600 tokens" in line and "50257" in line


def test_generate_refuses_a_missing_or_replaced_tokenizer(run, tmp_path, capsys):
    root, data, _ = run
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(root / "run", copy)
    checkpoint = ["generate", "--checkpoint", str(copy / "checkpoint.safetensors"), "--device", "cpu"]
    assert main(["tokenizer", "train", "--data", str(data), "--vocab-size", "500", "--out", str(copy)]) == 0
    capsys.readouterr()
    assert "600 tokens" in one_line_error(capsys, main(checkpoint))
    (copy / "tokenizer.json").unlink()
    assert "which is missing" in one_line_error(capsys, main(checkpoint))


def test_gpt2_is_the_default_and_is_recorded_by_name(tmp_path, capsys):
    data = tmp_path / "small.txt"
    data.write_text(default_corpus()[:12000], encoding="utf-8")
    assert main(["train", "--data", str(data), "--preset", "tiny", "--max-steps", "1", "--batch-size", "2",
                 "--context-length", "32", "--prompt", "", "--device", "cpu", "--no-progress",
                 "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "tokenizer   gpt2 (50,257 tokens)" in out and "val bits per character" in out
    assert not (tmp_path / "run" / "tokenizer.json").exists()


def test_a_tokenizer_that_does_not_exist(tmp_path, capsys):
    line = one_line_error(capsys, main(["train", "--tokenizer", str(tmp_path / "nowhere"), "--max-steps", "1",
                                        "--no-progress", "--out", str(tmp_path / "run")]))
    assert "--tokenizer: no tokenizer at" in line
