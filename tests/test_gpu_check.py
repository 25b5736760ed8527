"""benchmarks/gpu_check.sh without a GPU: its Python parts on the fake CUDA device (the
GPT-2 step and generation code paths, the gradient checks, the table), and the script's
shape. The first GPU session runs the real thing."""

import subprocess
import sys
from pathlib import Path

import pytest

from numpygpt import backend
from numpygpt.gradcheck import run_gradchecks

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_check  # noqa: E402


def test_the_script_is_valid_bash_and_runs_the_three_checks():
    script = BENCH / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for needle in ("pip install", "'.[cuda", "pytest -m cuda", "numpygpt gradcheck --device cuda",
                   "gpu_check.py --device cuda"):
        assert needle in text, needle


def test_gradient_checks_on_the_fake_device_and_their_summary():
    lines = []
    with backend.device("fake-cuda"):
        failed = run_gradchecks(device="fake-cuda", out=lines.append)
    assert failed == 0, "\n".join(lines)
    assert gpu_check.parse_gradcheck("\n".join(lines)).endswith(" within 1e-06")
    total = gpu_check.parse_gradcheck("\n".join(lines)).split("/")[1].split()[0]
    assert gpu_check.parse_gradcheck("\n".join(lines)) == f"{total}/{total} within 1e-06"
    assert gpu_check.parse_gradcheck("Traceback ...") == "no gradcheck summary in the log"


def test_pytest_summary():
    assert gpu_check.parse_pytest("....\n40 passed, 3 skipped, 700 deselected in 9.1s") == \
        "40 passed, 3 skipped, 700 deselected"
    assert gpu_check.parse_pytest("1 failed, 39 passed in 2s") == "1 failed, 39 passed"
    assert gpu_check.parse_pytest("ImportError") == "no pytest summary in the log"


def test_the_table_on_the_fake_device(tmp_path, capsys):
    (tmp_path / "p.log").write_text("12 passed, 2 skipped in 3.0s\n")
    (tmp_path / "g.log").write_text("gradient checks: ... tolerance 1e-06\n20/20 checks within tolerance\n")
    out = tmp_path / "table.md"
    code = gpu_check.main(["--device", "fake-cuda", "--config", "tiny", "--context", "16", "--batch", "2",
                           "--warmup", "1", "--steps", "2", "--new-tokens", "4", "--pytest-log", str(tmp_path / "p.log"),
                           "--gradcheck-log", str(tmp_path / "g.log"), "--out", str(out)])
    assert code == 0
    text = out.read_text()
    assert text.strip() in capsys.readouterr().out
    assert "| pytest -m cuda | 12 passed, 2 skipped |" in text
    assert "| gradient checks, float64 | 20/20 within 1e-06 |" in text
    assert "| host transfers (fake-cuda count) | 1 a step, 1.00 a token |" in text  # the budgets
    assert "train step tiny 2x16 (ms)" in text


def test_torch_side_matches_numpygpts_first_loss_when_torch_is_here():
    pytest.importorskip("torch", reason="the bench extra (torch) is not installed")
    import common

    cfg = common.make_config("tiny", context=16)
    x, y = common.random_batch(cfg, 2, 16)
    mine = gpu_check.numpygpt_run(cfg, x, y, "fake-cuda", 0, 1, 3)
    theirs = gpu_check.torch_run(cfg, x, y, "cpu", 0, 1, 3)
    assert abs(mine["first_loss"] - theirs["first_loss"]) < 1e-4
    assert mine["greedy"] == theirs["greedy"]
