"""`numpygpt finetune instruct` end to end on a tiny model saved with save_pretrained: it learns
to answer a handful of generated instructions exactly (greedy), writes the responses, the loss
plot and a model that `numpygpt chat` answers from, and the responses go to a judge (a small
HTTP server on 127.0.0.1). Bad data files are one line on stderr and exit code 2."""

import json
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from numpygpt import GPTConfig, GPTModel
from numpygpt.cli import main
from numpygpt.finetune.instruct import split_data

from conftest import terminate_after_steps
from test_finetune_judge import Judge, answer, one_line_error

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [("Name the color of the sky.", "Blue."), ("What is two plus three?", "Five."),
         ("Give the opposite of hot.", "Cold.")]
LONG = {"instruction": "Repeat the words.", "input": "la " * 60, "output": "la " * 60}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A random one-layer GPT-2 in the Hugging Face layout, tied head and qkv bias like GPT-2's."""
    directory = tmp_path_factory.mktemp("pretrained")
    cfg = GPTConfig(vocab_size=50257, context_length=64, emb_dim=128, n_layers=1, n_heads=4, drop_rate=0.0,
                    qkv_bias=True, tie_weights=True)
    GPTModel(cfg, seed=0).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, pretrained):
    """One fine-tuning run (75 steps of batch 2, a few seconds), shared by the tests below."""
    directory = tmp_path_factory.mktemp("instruct")
    entries = [{"instruction": i, "input": "", "output": o} for i, o in PAIRS] * 20
    data = directory / "data.json"
    data.write_text(json.dumps(entries))
    out = directory / "out"
    argv = ["finetune", "instruct", "--pretrained", str(pretrained), "--data", str(data), "--out", str(out),
            "--batch-size", "2", "--epochs", "3", "--lr", "5e-3", "--mask-instruction", "--eval-freq", "25",
            "--eval-iter", "1", "--max-new-tokens", "20", "--device", "cpu", "--no-progress"]
    return entries, out, argv


def test_finetune_learns_the_responses_and_writes_everything(finetuned, capsys):
    entries, out, argv = finetuned
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    for word in ("train 51, test 6, val 3", "untied head", "instruction masked", "before", "after"):
        assert word in captured.out, word
    _, test, _ = split_data(entries)
    responses = json.loads((out / "test-responses.json").read_text())
    assert [r["instruction"] for r in responses] == [e["instruction"] for e in test]
    assert [r["model_response"] for r in responses] == [e["output"] for e in test]  # learnt exactly
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    history = json.loads((out / "history.json").read_text())
    assert history["global_step"] == 75 and history["final_losses"][0] < 0.1
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # the book's untied copy of wte

    # the saved model answers from the command line with the same prompt format
    for instruction, output in PAIRS:
        assert main(["chat", "--model", str(out / "model"), instruction, "--device", "cpu"]) == 0
        assert capsys.readouterr().out == output + "\n"

    # and its answers can be judged
    server = Judge([answer("90"), answer("100"), answer("95"), answer("no idea"), answer("85"), answer("80")])
    try:
        assert main(["score-responses", str(out / "test-responses.json"), "--judge-url", server.url,
                     "--judge-model", "llama3", "--no-progress"]) == 0
    finally:
        server.close()
    printed = capsys.readouterr().out
    assert "Average score: 90.00" in printed and "Unreadable answers: 1" in printed
    assert [r["body"]["model"] for r in server.requests] == ["llama3"] * 6
    scores = json.loads((out / "test-responses-scores.json").read_text())
    assert [s["score"] for s in scores] == [90, 100, 95, None, 85, 80]


def test_entries_longer_than_the_context_are_cut_with_a_warning(tmp_path, pretrained, capsys):
    entries = [{"instruction": i, "input": "", "output": o} for i, o in PAIRS] * 4
    entries[2] = entries[9] = LONG  # 150 tokens, the model's context is 64
    data = tmp_path / "data.json"
    data.write_text(json.dumps(entries))
    rc = main(["finetune", "instruct", "--pretrained", str(pretrained), "--data", str(data), "--out",
               str(tmp_path / "out"), "--batch-size", "2", "--max-steps", "2", "--eval-iter", "1",
               "--max-new-tokens", "1", "--device", "cpu", "--no-progress"])
    assert rc == 0
    err = capsys.readouterr().err
    assert err == f"warning: 2 training entries are longer than 64 tokens (entries 2, 9 of {data}); " \
                  "they are cut to that length\n"
    assert len(json.loads((tmp_path / "out" / "test-responses.json").read_text())) == 1


@pytest.mark.parametrize("content, message", [
    ('{"instruction": "a", "input": "", "output": "b"}', "expected a JSON list"),
    ('[{"instruction": "a", "input": ""}]', "entry 0 has no 'output'"),
    ('[{"input": "x", "output": "b"}]', "entry 0 has no 'instruction'"),
    ("[{", "not valid JSON"),
])
def test_bad_data_is_a_one_line_error(tmp_path, pretrained, content, message, capsys):
    data = tmp_path / "data.json"
    data.write_text(content)
    rc = main(["finetune", "instruct", "--pretrained", str(pretrained), "--data", str(data),
               "--out", str(tmp_path / "out"), "--device", "cpu", "--no-progress"])
    assert rc == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_missing_data_offline_says_what_to_pass(tmp_path, pretrained, monkeypatch, capsys):
    from urllib.error import URLError

    def offline(url, dest, **kwargs):
        raise URLError("no network")

    monkeypatch.setenv("NUMPYGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("numpygpt.download.download_file", offline)
    rc = main(["finetune", "instruct", "--pretrained", str(pretrained), "--out", str(tmp_path / "out"),
               "--device", "cpu", "--no-progress"])
    assert rc == 2
    err = one_line_error(capsys)
    assert "could not be downloaded" in err and "--data instruction-data.json" in err


def test_too_few_entries_for_a_batch(tmp_path, pretrained, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}] * 5))
    rc = main(["finetune", "instruct", "--pretrained", str(pretrained), "--data", str(data),
               "--out", str(tmp_path / "out"), "--device", "cpu", "--no-progress"])
    assert rc == 2
    assert "fewer than the batch size 8" in one_line_error(capsys)


def test_chat_with_a_missing_model_is_a_one_line_error(tmp_path, capsys):
    assert main(["chat", "--model", str(tmp_path / "nothing"), "Say hi.", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    # pretrained's own message: one error line, then how to fetch weights without network
    assert err.startswith("numpygpt: error: ") and "is not a directory" in err.splitlines()[0]
    assert "Traceback" not in err


def test_lora_trains_adapters_only_and_saves_a_plain_merged_model(tmp_path, pretrained, capsys):
    from numpygpt import backend, count_parameters

    entries = [{"instruction": i, "input": "", "output": o} for i, o in PAIRS] * 4
    data = tmp_path / "data.json"
    data.write_text(json.dumps(entries))
    out = tmp_path / "out"
    rc = main(["finetune", "instruct", "--pretrained", str(pretrained), "--data", str(data), "--out", str(out),
               "--batch-size", "2", "--max-steps", "2", "--eval-iter", "1", "--lr", "1e-2", "--lora-rank", "4",
               "--lora-alpha", "8", "--max-new-tokens", "2", "--device", "cpu", "--no-progress"])
    assert rc == 0
    base = GPTModel.from_pretrained(pretrained, tie_weights=False)
    adapters = count_parameters(base.cfg.replace(lora_rank=4, lora_alpha=8), trainable="lora")
    assert f"trainable {adapters:,} (LoRA rank 4)" in capsys.readouterr().out  # blocks and the untied head
    assert (out / "model" / "lora-adapters.safetensors").is_file()  # lora.save_merged writes them beside the model
    # model/ is a plain GPT-2 whose weights moved by a rank-4 update at most; wte stayed frozen
    saved = GPTModel.from_pretrained(out / "model")
    assert saved.cfg.lora_rank is None and not saved.cfg.tie_weights
    for name in ("h.0.mlp.c_fc.weight", "lm_head.weight"):
        W0, W1 = (backend.to_host(dict(m.named_parameters())[name].data) for m in (base, saved))
        assert not np.array_equal(W0, W1) and np.linalg.matrix_rank(W1 - W0, tol=1e-6) <= 4, name
    np.testing.assert_array_equal(backend.to_host(saved.wte.weight.data), backend.to_host(base.wte.weight.data))


@pytest.mark.parametrize("lora", [False, True])
def test_an_interrupted_run_resumes_to_the_same_model(tmp_path, pretrained, capsys, lora):
    # 15 training entries, batch 2, 2 epochs: 14 steps; dropout on, so the RNG must come back too
    entries = [{"instruction": i, "input": "", "output": o} for i, o in PAIRS] * 6
    data = tmp_path / "data.json"
    data.write_text(json.dumps(entries))

    def run(out, *extra):
        return main(["finetune", "instruct", "--pretrained", str(pretrained), "--data", str(data),
                     "--out", str(out), "--batch-size", "2", "--epochs", "2", "--lr", "5e-3", "--drop-rate", "0.1",
                     "--eval-freq", "3", "--eval-iter", "1", "--max-new-tokens", "2", "--device", "cpu",
                     "--no-progress", *(["--lora-rank", "4"] if lora else []), *extra])

    assert run(tmp_path / "whole") == 0
    assert run(tmp_path / "parts", "--max-steps", "5", "--checkpoint-every", "2") == 0
    assert (tmp_path / "parts" / "checkpoint.safetensors").is_file()
    capsys.readouterr()
    assert run(tmp_path / "parts", "--resume") == 0
    assert "resuming    at step 5" in capsys.readouterr().out
    whole = json.loads((tmp_path / "whole" / "history.json").read_text())
    parts = json.loads((tmp_path / "parts" / "history.json").read_text())
    assert whole["global_step"] == parts["global_step"] == 14
    assert parts["step_losses"] == whole["step_losses"]
    a, b = (GPTModel.from_pretrained(tmp_path / d / "model") for d in ("whole", "parts"))
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=name)

    # the options are checked: another learning rate is refused, in one line
    assert run(tmp_path / "parts", "--resume", "--lr", "1e-3") == 2
    err = capsys.readouterr().err
    assert "was trained with lr 0.005, this run has 0.001" in err and len(err.strip().splitlines()) == 1
    # and there must be a checkpoint to resume from
    assert run(tmp_path / "nothing", "--resume") == 2
    assert "cannot resume: there is no" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_saves_a_checkpoint_and_says_to_resume(tmp_path, pretrained):
    entries = [{"instruction": i, "input": "", "output": o} for i, o in PAIRS] * 6
    data = tmp_path / "data.json"
    data.write_text(json.dumps(entries))
    out = tmp_path / "out"
    code, err = terminate_after_steps(
        ["finetune", "instruct", "--pretrained", str(pretrained), "--data", str(data), "--out", str(out),
         "--batch-size", "2", "--epochs", "100000", "--eval-freq", "1", "--eval-iter", "1", "--max-new-tokens", "2",
         "--device", "cpu", "--no-progress"])
    assert code == 128 + signal.SIGTERM, err
    assert "--resume" in err
    from numpygpt.checkpoint import read_checkpoint

    assert read_checkpoint(out / "checkpoint.safetensors").step >= 3
