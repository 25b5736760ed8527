"""The backward walkthrough: every op of a tiny GPT in backward order, each op's recorded
gradients equal to finite differences, residual sums that add up, and a broken backward
caught; the example script runs."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from numpygpt import GELU
from numpygpt.cli import main
from numpygpt.walkthrough import format_walkthrough, walkthrough

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def result():
    return walkthrough(n_layers=2, drop_rate=0.1, seed=0)


def test_ops_come_in_backward_order(result):
    names = [s.name for s in result["steps"]]
    assert names[:3] == ["loss", "lm_head", "ln_f"]
    assert names[-3:] == ["drop", "wte", "wpe"]
    block = ["drop_mlp", "mlp.c_proj", "mlp.gelu", "mlp.c_fc", "mlp", "ln_2", "drop_attn", "attn.c_proj",
             "attn.attn_dropout", "attn.softmax", "attn.c_attn", "attn", "ln_1"]
    assert names[3:-3] == [f"h.1.{n}" for n in block] + ["h.1"] + [f"h.0.{n}" for n in block] + ["h.0"]


def test_every_op_matches_finite_differences(result):
    assert set(result["errors"]) == {s.name for s in result["steps"]}
    for name, errors in result["errors"].items():
        assert errors and max(errors.values()) < 1e-6, (name, errors)
    # dropout was on, so the checks replayed the masks of the traced pass
    assert result["cfg"].drop_rate > 0


def test_recorded_contributions_add_up_to_the_model_gradients(result):
    steps = {s.name: s for s in result["steps"]}
    # tied weights: the head's and the embedding's contributions are both in wte.weight.grad
    (wte, head_part), (_, emb_part) = steps["lm_head"].dparams["wte.weight"], steps["wte"].dparams["weight"]
    assert np.allclose(head_part + emb_part, wte.grad)
    assert np.linalg.norm(head_part) > 0 and np.linalg.norm(emb_part) > 0
    # a leaf op's contribution is its parameter's whole gradient
    c_fc_weight, g = steps["h.0.mlp.c_fc"].dparams["weight"]
    assert np.array_equal(g, c_fc_weight.grad)
    # the stream: a block's dx is its dout plus what its two branches add
    block = steps["h.0"]
    assert np.allclose(block.dx, block.dout + steps["h.0.ln_2"].dx + steps["h.0.ln_1"].dx)


def test_the_printout_lists_every_op_with_residuals(result):
    text = format_walkthrough(result)
    for s in result["steps"]:
        assert s.name in text
    assert text.count("+ residual of h.") == 4
    assert "worst fd error over all 34 ops" in text


def test_a_wrong_backward_is_caught(monkeypatch, capsys):
    real = GELU.backward
    monkeypatch.setattr(GELU, "backward", lambda self, dout: 1.01 * real(self, dout))
    assert main(["walkthrough", "--n-layers", "1"]) == 1
    out = capsys.readouterr().out
    gelu_row = next(line for line in out.splitlines() if "(GELU)" in line)
    assert float(gelu_row.split()[-1]) > 1e-3


def test_bad_input_is_one_line_and_exit_2(capsys):
    assert main(["walkthrough", "--emb-dim", "15"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("numpygpt walkthrough: error:") and "divisible" in err


def test_the_example_script_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "backward_walkthrough.py"), "--n-layers", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "loss (CrossEntropyLoss)" in proc.stdout and "wpe (Embedding)" in proc.stdout


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_llama_and_qwen3_walkthroughs(arch, capsys):
    """--arch llama / qwen3: the same walk through RMSNorm, GQA with RoPE (and QK-norm), SwiGLU."""
    result = walkthrough(n_layers=2, n_heads=4, seed=0, arch=arch)
    names = [s.name for s in result["steps"]]
    assert names[:2] == ["loss", "lm_head"] and names[-2:] == ["model.embed_tokens", "model"]
    attn = ["o_proj", "softmax"] + (["q_norm", "q_proj", "k_norm", "k_proj"] if arch == "qwen3"
                                    else ["q_proj", "k_proj"]) + ["v_proj"]
    block = (["mlp.down_proj", "mlp.silu", "mlp.gate_proj", "mlp.up_proj", "mlp", "post_attention_layernorm"]
             + [f"self_attn.{n}" for n in attn] + ["self_attn", "input_layernorm"])
    assert names[3:-2] == [f"model.layers.1.{n}" for n in block] + ["model.layers.1"] + \
        [f"model.layers.0.{n}" for n in block] + ["model.layers.0"]
    assert set(result["errors"]) == set(names) - {"model"}  # the decoder stack is checked through its parts
    for name, errors in result["errors"].items():
        assert errors and max(errors.values()) < 1e-6, (name, errors)
    text = format_walkthrough(result)
    assert text.count("+ residual of model.layers.") == 4 and "sharing 2 key/value heads" in text
    steps = {s.name: s for s in result["steps"]}
    block_step = steps["model.layers.0"]
    assert np.allclose(block_step.dx, block_step.dout + steps["model.layers.0.post_attention_layernorm"].dx
                       + steps["model.layers.0.input_layernorm"].dx)
    if arch == "llama":  # the command line takes --arch (once: each run checks every op again)
        assert main(["walkthrough", "--arch", arch, "--n-layers", "1"]) == 0
        assert "1-layer llama model" in capsys.readouterr().out
