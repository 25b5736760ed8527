"""Atomic writes: recognisable temporaries, the ordinary file mode, stale temporaries of
killed writers removed at the next save, and the safetensors writer read back."""

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from numpygpt import GPTConfig, GPTModel
from numpygpt.checkpoint import save_checkpoint
from numpygpt.fileio import TEMP_SUFFIX, LazyTensor, atomic_write, remove_stale_temps, write_safetensors

ROOT = Path(__file__).resolve().parents[1]


def ordinary_mode():
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_killed_writer_leaves_a_temporary_that_the_next_save_removes(tmp_path):
    """SIGKILL in the middle of a save: the temporary stays (nothing can clean up), it is
    named after its target, and the next save of that target deletes it."""
    target = tmp_path / "ckpt.safetensors"
    code = ("import os, signal, sys\n"
            "from numpygpt.fileio import atomic_write\n"
            "with atomic_write(sys.argv[1]) as fh:\n"
            "    fh.write(b'x' * 100000); fh.flush()\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(target)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert proc.returncode == -9
    left = os.listdir(tmp_path)
    assert len(left) == 1 and left[0].startswith(".ckpt.safetensors.") and left[0].endswith(TEMP_SUFFIX)

    save_checkpoint(target, GPTModel(GPTConfig.preset("tiny"), seed=0))
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]


def test_only_dead_writers_temporaries_of_that_target_are_removed(tmp_path):
    target = tmp_path / "model.safetensors"
    stale = tmp_path / f".model.safetensors.{dead_pid()}.abcd1234{TEMP_SUFFIX}"
    live = tmp_path / f".model.safetensors.{os.getppid()}.abcd1234{TEMP_SUFFIX}"  # a running writer
    other = tmp_path / f".other.safetensors.{dead_pid()}.abcd1234{TEMP_SUFFIX}"  # another target's
    mine = tmp_path / "model.safetensors.notes.tmp"  # not ours at all
    for p in (stale, live, other, mine):
        p.write_bytes(b"partial")
    assert remove_stale_temps(target) == [str(stale)]
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in (live, other, mine))


def test_old_style_temporaries_are_removed_once_they_are_old(tmp_path):
    # versions before the pid-named temporaries used tempfile.mkstemp's
    # "<target>.<8 characters>.tmp": removed when unchanged for LEGACY_TEMP_AGE_S
    from numpygpt import fileio

    target = tmp_path / "model.safetensors"
    old = tmp_path / "model.safetensors.k3x_9q2a.tmp"
    recent = tmp_path / "model.safetensors.a1b2c3d4.tmp"  # may still be being written
    other = tmp_path / "other.safetensors.k3x_9q2a.tmp"  # another target's
    not_mkstemp = tmp_path / "model.safetensors.backup01x.tmp"  # 9 characters: a user's file
    for p in (old, recent, other, not_mkstemp):
        p.write_bytes(b"partial")
    long_ago = time.time() - fileio.LEGACY_TEMP_AGE_S - 60
    for p in (old, other, not_mkstemp):
        os.utime(p, (long_ago, long_ago))
    assert remove_stale_temps(target) == [str(old)]
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in (recent, other, not_mkstemp))


def test_atomic_write_gives_the_ordinary_mode_and_cleans_up_on_error(tmp_path):
    target = tmp_path / "a.txt"
    with atomic_write(target) as fh:
        fh.write(b"one")
    assert stat.S_IMODE(os.stat(target).st_mode) == ordinary_mode()
    with pytest.raises(RuntimeError):
        with atomic_write(target) as fh:
            fh.write(b"two")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"one" and os.listdir(tmp_path) == ["a.txt"]


def test_write_safetensors_reads_back(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b": np.arange(7, dtype=np.int64),
              "c": rng.standard_normal(4)}
    path = tmp_path / "t.safetensors"
    write_safetensors(path, list(arrays.items()), metadata={"k": "v"})
    back = load_file(str(path))
    for name, a in arrays.items():
        assert back[name].dtype == a.dtype
        np.testing.assert_array_equal(back[name], a)


def test_lazy_tensors_are_made_once_and_read_back(tmp_path):
    """Each LazyTensor is made exactly once, in file order, and its bytes, shape and dtype
    read back as the array's."""
    made, values = [], {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, dtype=np.float64)}

    def maker(name):
        def make():
            made.append(name)
            return values[name]
        return make

    lazies = [(n, LazyTensor(v.shape, v.dtype, maker(n))) for n, v in values.items()]
    write_safetensors(tmp_path / "t.safetensors", [("plain", np.zeros(2, np.int64))] + lazies)
    assert made == ["a", "b"]
    back = load_file(str(tmp_path / "t.safetensors"))
    for n, v in values.items():
        np.testing.assert_array_equal(back[n], v)
        assert back[n].dtype == v.dtype
