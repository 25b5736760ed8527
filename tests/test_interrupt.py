"""Ctrl-C and SIGTERM during `numpygpt train`: the run finishes the step in progress, saves a
checkpoint, prints the exact --resume command and exits 128 + signal; a second Ctrl-C quits
at once without damaging what is on disk. Real processes and real signals, bounded in time."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from numpygpt.checkpoint import load_checkpoint
from numpygpt.data import default_corpus

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text(default_corpus()[:12000], encoding="utf-8")
    return path


def start_training(text_file, out, *extra):
    """A run far too long to finish, printing a line after every step."""
    cmd = [sys.executable, "-m", "numpygpt", "train", "--data", str(text_file), "--preset", "tiny",
           "--context-length", "16", "--batch-size", "2", "--max-steps", "100000", "--checkpoint-every", "100000",
           "--eval-freq", "1", "--eval-iter", "1", "--prompt=", "--no-progress", "--device", "cpu",
           "--out", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_steps(proc, n, timeout=120):
    """Read stdout until the run has logged ``n`` steps (it evaluates after every one)."""
    deadline, seen = time.monotonic() + timeout, 0
    while seen < n:
        line = proc.stdout.readline()
        assert line and time.monotonic() < deadline, "the run ended or stalled before training"
        seen += "(step" in line


def finish(proc, timeout=60):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the interrupted run did not exit in time")
    return proc.returncode, err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_and_says_how_to_resume(tmp_path, text_file, sig):
    out = tmp_path / "run"
    proc = start_training(text_file, out)
    wait_for_steps(proc, 3)
    proc.send_signal(sig)
    code, err = finish(proc)
    ckpt = out / "checkpoint.safetensors"
    assert code == 128 + sig, err
    assert "Traceback" not in err
    assert f"numpygpt train --resume {ckpt}" in err  # the exact command
    ck = load_checkpoint(ckpt, device="cpu", restore_rng=False)
    assert ck["step"] >= 3 and f"holds step {ck['step']}" in err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.safetensors"]  # no temporary file left

    if sig == signal.SIGINT:  # and the printed command continues the run
        target = ck["step"] + 2
        done = subprocess.run([sys.executable, "-m", "numpygpt", "train", "--resume", str(ckpt),
                               "--max-steps", str(target)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert load_checkpoint(ckpt, device="cpu", restore_rng=False)["step"] == target


def test_a_second_ctrl_c_quits_at_once_and_leaves_no_damage(tmp_path, text_file):
    out = tmp_path / "run"
    # a checkpoint every step, so the second Ctrl-C has saves to land in
    proc = start_training(text_file, out, "--checkpoint-every", "1")
    wait_for_steps(proc, 3)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)  # two signals sent back to back can merge into one pending signal
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    code, err = finish(proc, timeout=30)
    assert time.monotonic() - t0 < 30
    # 130 from numpygpt; -SIGINT when the second signal lands while the interpreter is
    # already shutting down (after the message; Python's finalisation restores SIG_DFL):
    # a shell reports both as 130
    assert code in (130, -signal.SIGINT), err
    assert "Traceback" not in err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["checkpoint.safetensors"], names  # a save cut short left no temporary file
    # the second Ctrl-C may cut the save of the last step short: then the one before is on disk
    assert load_checkpoint(out / "checkpoint.safetensors", device="cpu", restore_rng=False)["step"] >= 2
