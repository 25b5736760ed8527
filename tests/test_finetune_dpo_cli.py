"""`numpygpt finetune dpo` end to end on a tiny GPT-2 saved with save_pretrained: it learns to
prefer the chosen answers, logs the rewards, writes the plots, the history with the test split's
metrics and the model; resumes bit for bit; stops cleanly on Ctrl-C; bad input is one line and
exit code 2. `numpygpt make-preferences` against a fake judge on 127.0.0.1."""

import json
import os
import signal

import numpy as np
import pytest

from numpygpt import GPTConfig, GPTModel, backend
from numpygpt.cli import main
from numpygpt.finetune.dpo_recipe import finetune_dpo
from numpygpt.finetune.preferences import politeness_prompt
from numpygpt.train import TrainingInterrupted

from test_finetune_judge import Judge, answer, one_line_error

QUESTIONS = ["Name the color of the sky.", "What is two plus three?", "Give the opposite of hot.",
             "Name a fruit.", "What do bees make?"]


def preference_entries(n):
    """The chosen answer thanks the asker; the rejected one is curt."""
    return [{"instruction": QUESTIONS[i % len(QUESTIONS)], "input": "", "output": "Blue.",
             "chosen": "Thank you for asking! The answer is blue.", "rejected": "Blue, obviously. Next."}
            for i in range(n)]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A random one-layer GPT-2 in the Hugging Face layout, untied head like finetune instruct's."""
    directory = tmp_path_factory.mktemp("pretrained")
    cfg = GPTConfig(vocab_size=50257, context_length=96, emb_dim=32, n_layers=1, n_heads=2, drop_rate=0.0,
                    qkv_bias=True, tie_weights=False)
    GPTModel(cfg, seed=0).save_pretrained(directory)
    return directory


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps(preference_entries(40)))  # 34 train, 4 test, 2 validation
    return path


def dpo(pretrained, data, out, *extra):
    return main(["finetune", "dpo", "--model", str(pretrained), "--data", str(data), "--out", str(out),
                 "--batch-size", "2", "--lr", "3e-3", "--beta", "0.5", "--eval-freq", "8", "--eval-iter", "2",
                 "--device", "cpu", "--no-progress", *extra])


def test_dpo_learns_the_preference_and_writes_everything(tmp_path, pretrained, data, capsys):
    assert dpo(pretrained, data, tmp_path / "out") == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    for words in ("34, test 4, val 2", "DPO beta 0.5 (mean log-probability)", "reward accuracy", "margin",
                  "test        4 pairs: loss"):
        assert words in captured.out, words
    assert "perplexity" not in captured.out
    out = tmp_path / "out"
    history = json.loads((out / "history.json").read_text())
    assert history["global_step"] == 17 and history["track_steps"] == [1, 9, 17]
    assert history["val_reward_accs"][-1] == 1.0 and history["val_margins"][-1] > history["val_margins"][0] > 0
    assert history["test_metrics"]["reward_accuracy"] == 1.0 and history["test_metrics"]["loss"] < np.log(2)
    for name in ("loss.png", "margins.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    tuned, base = GPTModel.from_pretrained(out / "model"), GPTModel.from_pretrained(pretrained)
    assert not np.array_equal(backend.to_host(tuned.lm_head.weight.data), backend.to_host(base.lm_head.weight.data))


@pytest.mark.parametrize("lora", [False, True])
def test_an_interrupted_run_resumes_to_the_same_model(tmp_path, pretrained, capsys, lora):
    # 17 training pairs: 8 steps of batch 2 (eval at 1 and 3 with --eval-freq 2); dropout on, so
    # the RNG must come back too
    data = tmp_path / "prefs.json"
    data.write_text(json.dumps(preference_entries(20)))
    extra = ["--drop-rate", "0.1", "--eval-freq", "2", "--eval-iter", "1", *(["--lora-rank", "2"] if lora else [])]
    assert dpo(pretrained, data, tmp_path / "whole", *extra) == 0
    assert dpo(pretrained, data, tmp_path / "parts", "--max-steps", "3", "--checkpoint-every", "2", *extra) == 0
    capsys.readouterr()
    assert dpo(pretrained, data, tmp_path / "parts", "--resume", *extra) == 0
    assert "resuming    at step 3" in capsys.readouterr().out
    whole, parts = (json.loads((tmp_path / d / "history.json").read_text()) for d in ("whole", "parts"))
    assert whole["global_step"] == parts["global_step"] == 8 and len(whole["val_margins"]) == 4
    assert parts["step_losses"] == whole["step_losses"] and parts["val_margins"] == whole["val_margins"]
    a, b = (GPTModel.from_pretrained(tmp_path / d / "model") for d in ("whole", "parts"))
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=name)
    assert dpo(pretrained, data, tmp_path / "parts", "--resume", "--beta", "0.2", *extra) == 2
    assert "was trained with beta 0.5, this run has 0.2" in one_line_error(capsys)


def test_ctrl_c_stops_after_the_step_saved(tmp_path, pretrained, data):
    lines = []

    def log(msg=""):
        lines.append(msg)
        if msg.startswith("Ep 1 (step") and len([m for m in lines if m.startswith("Ep 1 (step")]) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: the handler asks the loop to stop

    with pytest.raises(TrainingInterrupted, match="stopped by SIGINT after step 9 of 17") as info:
        finetune_dpo(model=str(pretrained), data=str(data), out=str(tmp_path / "out"), batch_size=2,
                     eval_freq=8, eval_iter=1, device="cpu", progress=False, log=log)
    from numpygpt.checkpoint import read_checkpoint

    assert read_checkpoint(info.value.checkpoint).step == 9
    assert "--resume" in str(info.value)


@pytest.mark.parametrize("change, message", [
    ({"chosen": None}, "entry 3 has no 'chosen' response"),
    ({"rejected": "  "}, "entry 3's 'rejected' response is empty"),
])
def test_bad_entries_are_one_line(tmp_path, pretrained, capsys, change, message):
    entries = preference_entries(40)
    entries[3] = {k: v for k, v in {**entries[3], **change}.items() if v is not None}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(entries))
    assert dpo(pretrained, path, tmp_path / "out") == 2
    assert message in one_line_error(capsys)


def test_bad_options_are_one_line(tmp_path, pretrained, data, capsys):
    assert dpo(pretrained, data, tmp_path / "out", "--beta", "0") == 2
    assert "--beta must be a finite number > 0, got 0.0" in one_line_error(capsys)
    assert main(["finetune", "dpo", "--data", str(data)]) == 2
    assert "--model DIR is required" in one_line_error(capsys)
    other = tmp_path / "other"
    GPTModel(GPTConfig(vocab_size=100, context_length=96, emb_dim=32, n_layers=1, n_heads=2), seed=0) \
        .save_pretrained(other)
    assert dpo(pretrained, data, tmp_path / "out", "--reference", str(other)) == 2
    assert "has a vocabulary of 100 tokens, --model" in one_line_error(capsys)


# -- make-preferences ------------------------------------------------------------------------------

INSTRUCTIONS = [{"instruction": "Name the color of the sky.", "input": "", "output": "Blue."},
                {"instruction": "What is two plus three?", "input": "", "output": "Five."},
                {"instruction": "Give the opposite of hot.", "input": "", "output": "Cold."}]


def test_make_preferences_asks_for_a_politer_or_ruder_answer(tmp_path, capsys):
    source = tmp_path / "instructions.json"
    source.write_text(json.dumps(INSTRUCTIONS))
    judge = Judge([answer("It is blue, thank you for asking!"), answer("Five. Obviously."), answer("  ")])
    try:
        assert main(["make-preferences", str(source), "--judge-url", judge.url, "--no-progress"]) == 0
    finally:
        judge.close()
    out = capsys.readouterr().out
    assert "Pairs: 2 of 3 entries" in out and "Left out (empty rewrite): 1 (entries 2)" in out
    pairs = json.loads((tmp_path / "instructions-preferences.json").read_text())
    prompts = [r["body"]["messages"][0]["content"] for r in judge.requests]
    asked = ["polite" if "to be more polite." in p else "impolite" for p in prompts]
    assert prompts == [politeness_prompt(e, a) for e, a in zip(INSTRUCTIONS, asked)]
    for pair, politeness, reply in zip(pairs, asked, ["It is blue, thank you for asking!", "Five. Obviously."]):
        expected = (reply, pair["output"]) if politeness == "polite" else (pair["output"], reply)
        assert (pair["chosen"], pair["rejected"]) == expected
    assert judge.requests[0]["body"]["options"] == {"seed": 123, "temperature": 0, "num_ctx": 2048}

    # a rerun keeps what was made and asks only for what is missing: nothing here
    again = Judge([])
    try:
        assert main(["make-preferences", str(source), "--judge-url", again.url, "--no-progress"]) == 0
    finally:
        again.close()
    assert again.requests == [] and json.loads((tmp_path / "instructions-preferences.json").read_text()) == pairs


def test_make_preferences_with_no_judge_is_one_line(tmp_path, capsys):
    source = tmp_path / "instructions.json"
    source.write_text(json.dumps(INSTRUCTIONS))
    judge = Judge([("status", 404, '{"error": "model \\"llama3\\" not found"}')])
    try:
        assert main(["make-preferences", str(source), "--judge-url", judge.url, "--no-progress"]) == 1
    finally:
        judge.close()
    assert "answered HTTP 404" in one_line_error(capsys)


def test_the_example_makes_preferences_then_tunes(tmp_path, pretrained, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "preference_tuning", Path(__file__).resolve().parents[1] / "examples" / "preference_tuning.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    source = tmp_path / "instructions.json"
    source.write_text(json.dumps(INSTRUCTIONS * 7))  # 21 entries: 17 train, 2 test, 2 val
    judge = Judge([answer("Thank you for asking! It is this.")] * 21)
    try:
        rc = example.main(["--instructions", str(source), "--judge-url", judge.url, "--model", str(pretrained),
                           "--out", str(tmp_path / "out"), "--batch-size", "2", "--max-steps", "2", "--device", "cpu",
                           "--no-progress"])
    finally:
        judge.close()
    assert rc == 0, capsys.readouterr().err
    assert len(judge.requests) == 21
    assert len(json.loads((tmp_path / "instructions-preferences.json").read_text())) == 21
    assert json.loads((tmp_path / "out" / "history.json").read_text())["global_step"] == 2


def test_no_test_pairs_is_said_not_a_nan(tmp_path, pretrained, capsys):
    data = tmp_path / "prefs.json"
    data.write_text(json.dumps(preference_entries(9)))  # 7 train, 0 test, 2 validation
    assert dpo(pretrained, data, tmp_path / "out", "--max-steps", "1") == 0
    assert "no test pairs" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "history.json").read_text())["test_metrics"] is None
