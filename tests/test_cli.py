"""The numpygpt command: gradcheck, train -> checkpoint + plot -> generate, resume, and the
one-line errors (exit code 2) for missing files, short texts and bad checkpoints."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from numpygpt.cli import main
from numpygpt.data import default_corpus

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text(default_corpus()[:12000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_file):
    """One short CLI training run, shared by the tests that need its outputs."""
    out = tmp_path_factory.mktemp("run")
    argv = ["train", "--preset", "tiny", "--max-steps", "5", "--out", str(out), "--no-progress",
            "--data", str(text_file), "--device", "cpu", "--batch-size", "4", "--eval-freq", "2",
            "--eval-iter", "2", "--sample-tokens", "3", "--prompt", "The"]
    return out, argv


def test_gradcheck_passes(capsys):
    assert main(["gradcheck", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "GPTModel + loss (tied)" in out and "MultiHeadAttention" in out
    assert "FAIL" not in out


def test_gradcheck_fails_loudly_on_a_wrong_backward(capsys, monkeypatch):
    from numpygpt.nn import GELU

    real = GELU.backward
    monkeypatch.setattr(GELU, "backward", lambda self, dout: 1.01 * real(self, dout))
    assert main(["gradcheck", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "GELU" in out


def test_train_writes_checkpoint_and_plot_then_generate(trained, capsys):
    out, argv = trained
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for word in ("device", "parameters", "tokens", "5 steps", "checkpoint", "loss plot"):
        assert word in printed, word
    ckpt, plot = out / "checkpoint.safetensors", out / "loss.png"
    assert ckpt.is_file() and plot.read_bytes()[:4] == b"\x89PNG"
    history = json.loads((out / "history.json").read_text())
    assert history["global_step"] == 5 and len(history["step_losses"]) == 5
    assert history["track_steps"] == [1, 3, 5]

    assert main(["generate", "--checkpoint", str(ckpt), "--max-new-tokens", "5", "--prompt", "The",
                 "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("The") and len(text.strip()) > len("The")

    # sampling with a seed is repeatable
    sample = ["generate", "--checkpoint", str(ckpt), "--max-new-tokens", "4", "--temperature", "1.0",
              "--top-k", "20", "--seed", "3", "--device", "cpu", "--no-cache"]
    assert main(sample) == 0
    first = capsys.readouterr().out
    assert main(sample) == 0
    assert capsys.readouterr().out == first


def test_resume_continues_with_the_stored_options(trained, capsys):
    out, argv = trained
    ckpt = out / "checkpoint.safetensors"
    if not ckpt.is_file():
        assert main(argv) == 0
    assert main(["train", "--resume", str(ckpt), "--batch-size", "2", "--no-progress"]) == 2
    assert "batch_size 4, this run has 2" in capsys.readouterr().err
    # only --resume and the new step budget: data, model, out... come from the checkpoint
    assert main(["train", "--resume", str(ckpt), "--max-steps", "8", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "resuming    at step 5" in printed
    assert "final (step 8)" in printed  # evaluations ran at steps 1, 3, 5, 7: one more at the end
    history = json.loads((out / "history.json").read_text())
    assert history["global_step"] == 8 and len(history["step_losses"]) == 8
    assert history["track_steps"] == [1, 3, 5, 7]
    assert main(["train", "--resume", str(ckpt), "--emb-dim", "64"]) == 2
    assert "--emb-dim cannot be used with --resume" in capsys.readouterr().err


def test_missing_data_file_is_a_one_line_error(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path), "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert "nope.txt" in err and "does not exist" in err and "Traceback" not in err


def test_too_short_data_is_a_one_line_error(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.", encoding="utf-8")
    code = main(["train", "--data", str(short), "--out", str(tmp_path), "--device", "cpu", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "too short" in err and "tokens" in err and len(err.strip().splitlines()) == 1


def test_too_few_windows_for_a_batch(tmp_path, text_file, capsys):
    code = main(["train", "--data", str(text_file), "--preset", "tiny", "--batch-size", "1000",
                 "--out", str(tmp_path), "--device", "cpu"])
    assert code == 2 and "--batch-size 1000" in capsys.readouterr().err


def test_bad_checkpoint_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"definitely not a checkpoint")
    assert main(["generate", "--checkpoint", str(bad), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "cannot load checkpoint" in err and "Traceback" not in err
    assert main(["generate", "--checkpoint", str(tmp_path / "missing.safetensors"), "--device", "cpu"]) == 2


@pytest.mark.parametrize("argv", [
    ["train", "--batch-size", "0"],
    ["train", "--train-ratio", "1.5"],
    ["train", "--device", "tpu"],
    ["generate"],  # needs --checkpoint or --model
    ["generate", "--checkpoint", "a", "--model", "b"],
    ["frobnicate"],
])
def test_bad_arguments_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_python_dash_m_numpygpt():
    result = subprocess.run([sys.executable, "-m", "numpygpt", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    assert all(cmd in result.stdout for cmd in ("train", "generate", "gradcheck"))


@pytest.mark.parametrize("tied", [False, True])
def test_pytorch_default_init(tied):
    """--init pytorch: N(0, 1) embeddings, U(+-1/sqrt(fan_in)) linear weights and biases."""
    import numpy as np

    from numpygpt import GPTConfig, GPTModel, backend

    cfg = GPTConfig.preset("tiny", vocab_size=500, emb_dim=64, qkv_bias=True, tie_weights=tied)
    model = GPTModel(cfg, seed=0)
    model.init_weights(seed=1, scheme="pytorch")
    params = {n: backend.to_host(p.data) for n, p in model.named_parameters()}
    for name, w in params.items():
        if name in ("wte.weight", "wpe.weight"):
            assert abs(w.std() - 1.0) < 0.05 and abs(w.mean()) < 0.05, name
        elif ".ln_" in name or name.startswith("ln_f"):
            assert np.all(w == (1.0 if name.endswith("weight") else 0.0)), name
        else:
            # weights are stored (in, out); the untied head (V, C) reads C inputs
            fan_in = 64 if name == "lm_head.weight" else params[name.replace(".bias", ".weight")].shape[0]
            bound = 1 / np.sqrt(fan_in)
            assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound, name
            assert abs(w.std() - bound / np.sqrt(3)) < 0.2 * bound, name  # uniform's std
    assert ("lm_head.weight" in params) == (not tied)
    assert params["h.0.mlp.c_proj.weight"].shape[0] == 256  # fan_in 4C: the smaller bound
    # the same seed gives the same weights
    again = GPTModel(cfg, seed=0)
    again.init_weights(seed=1, scheme="pytorch")
    for name, p in again.named_parameters():
        np.testing.assert_array_equal(backend.to_host(p.data), params[name])


# -- one line and exit code 2, never a traceback ------------------------------------------------

def one_line_error(capsys, code, expected_code=2):
    err = capsys.readouterr().err
    assert code == expected_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("numpygpt: error:") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def tiny_pretrained(tmp_path):
    from numpygpt import GPTConfig, GPTModel

    directory = tmp_path / "tiny-gpt"
    GPTModel(GPTConfig.preset("tiny", vocab_size=50257), seed=0).save_pretrained(directory)
    return directory


def test_generate_with_a_truncated_weights_file(tiny_pretrained, capsys):
    weights = tiny_pretrained / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    line = one_line_error(capsys, main(["generate", "--model", str(tiny_pretrained), "--device", "cpu"]))
    assert "model.safetensors" in line


@pytest.mark.parametrize("config, match", [
    ([1, 2], "JSON object"),
    ("numpygpt-not-a-dict", "'numpygpt' entry"),
    ("n_layer-2.7", "n_layers must be a positive integer"),
    ("n_embd-str", "emb_dim must be a positive integer"),
])
def test_generate_with_a_malformed_config(tiny_pretrained, capsys, config, match):
    path = tiny_pretrained / "config.json"
    hf = json.loads(path.read_text())
    if config == "numpygpt-not-a-dict":
        hf["numpygpt"] = 5
    elif config == "n_layer-2.7":
        hf["n_layer"] = 2.7
    elif config == "n_embd-str":
        hf["n_embd"] = "32"
    else:
        hf = config
    path.write_text(json.dumps(hf))
    line = one_line_error(capsys, main(["generate", "--model", str(tiny_pretrained), "--device", "cpu"]))
    assert match in line


def test_generate_from_a_model_whose_vocabulary_is_too_small(tmp_path, capsys):
    from numpygpt import GPTConfig, GPTModel

    GPTModel(GPTConfig.preset("tiny"), seed=0).save_pretrained(tmp_path / "v128")  # 128 tokens
    line = one_line_error(capsys, main(["generate", "--model", str(tmp_path / "v128"), "--device", "cpu",
                                        "--prompt", "Every effort moves you"]))
    # refused before any token is encoded: GPT-2's BPE does not fit 128 rows
    assert "tokenizer 'gpt2' has 50257 tokens but the model's vocab_size is 128" in line


def test_generate_with_a_temperature_that_overflows(tiny_pretrained, capsys):
    line = one_line_error(capsys, main(["generate", "--model", str(tiny_pretrained), "--device", "cpu",
                                        "--temperature", "1e-320", "--max-new-tokens", "2"]))
    assert "too small" in line


@pytest.mark.parametrize("flag", ["--lr", "--min-lr", "--weight-decay", "--grad-clip"])
@pytest.mark.parametrize("value", ["inf", "nan"])
def test_non_finite_numbers_are_usage_errors(capsys, flag, value):
    with pytest.raises(SystemExit) as info:
        main(["train", flag, value])
    err = capsys.readouterr().err
    assert info.value.code == 2 and flag in err and f"got {value}" in err


def test_negative_warmup_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--warmup-steps", "-5"])
    assert info.value.code == 2 and "--warmup-steps" in capsys.readouterr().err


def test_resume_of_a_checkpoint_saved_from_python(tmp_path, text_file, capsys):
    from numpygpt import GPTConfig, GPTModel
    from numpygpt.checkpoint import save_checkpoint
    from numpygpt.optim import AdamW

    model = GPTModel(GPTConfig.preset("tiny", vocab_size=50257), seed=0)
    path = tmp_path / "py.safetensors"
    save_checkpoint(path, model, AdamW(model, lr=1e-3), step=3)
    line = one_line_error(capsys, main(["train", "--resume", str(path), "--data", str(text_file),
                                        "--device", "cpu", "--no-progress"]))
    assert "training position" in line


def test_disk_full_during_a_checkpoint(tmp_path, text_file, capsys, monkeypatch):
    import numpygpt.checkpoint

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(numpygpt.checkpoint, "write_safetensors", disk_full)
    line = one_line_error(capsys, main(["train", "--preset", "tiny", "--max-steps", "2", "--data", str(text_file),
                                        "--out", str(tmp_path / "out"), "--device", "cpu", "--no-progress",
                                        "--batch-size", "2", "--prompt="]))
    assert "No space left on device" in line and "checkpoint" in line
