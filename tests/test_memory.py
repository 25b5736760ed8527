"""numpygpt.memory: glibc keeps freed memory, so a step reuses the last step's pages.

The setting is process-wide and cannot be undone, so each check runs in its own Python
process and reads that process's resident size (/proc/self/statm) around a large array's
free: with the setting the pages stay in the process; without it they go back to the
kernel, which is what the control run shows (so the check can fail).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

glibc_linux = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="mallopt is glibc's; elsewhere keep_freed_memory() is a documented no-op",
)

MIB = 1 << 20

_PROBE = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    from numpygpt import memory

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    kept = memory.keep_freed_memory() if sys.argv[1] == "keep" else False
    a = np.ones(256 << 18, dtype=np.float32)   # 256 MiB, every page touched
    before_free = rss()
    del a
    after_free = rss()
    b = np.ones(256 << 18, dtype=np.float32)   # the same size again
    after_again = rss()
    print(json.dumps({"kept": kept, "queried": memory.freed_memory_kept(),
                      "freed": before_free - after_free, "regrown": after_again - after_free}))
""")


def _probe(mode: str, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env}, check=True)
    return json.loads(out.stdout)


@glibc_linux
def test_freed_memory_stays_in_the_process_and_is_reused():
    kept = _probe("keep")
    assert kept["kept"] is True and kept["queried"] is True
    assert kept["freed"] < 32 * MIB  # the 256 MiB stayed
    assert kept["regrown"] < 32 * MIB  # and the second array took the same pages


@glibc_linux
def test_without_it_glibc_returns_a_large_array_to_the_kernel():
    # the control: what keep_freed_memory changes (and what the test above would see
    # if it did nothing)
    default = _probe("default")
    assert default["kept"] is False and default["queried"] is False
    assert default["freed"] > 200 * MIB
    assert default["regrown"] > 200 * MIB


@glibc_linux
def test_environment_turns_it_off():
    off = _probe("keep", NUMPYGPT_KEEP_FREED_MEMORY="0")
    assert off["kept"] is False and off["queried"] is False
    assert off["freed"] > 200 * MIB


def test_train_model_turns_it_on_unless_told_not_to(tmp_path):
    script = textwrap.dedent("""
        import json, sys
        import numpy as np
        from numpygpt import GPTConfig, GPTModel, memory
        from numpygpt.data import DataLoader, GPTDataset
        from numpygpt.optim import AdamW
        from numpygpt.train import train_model

        cfg = GPTConfig(vocab_size=50, context_length=8, emb_dim=8, n_heads=2, n_layers=1, drop_rate=0.0)
        model = GPTModel(cfg, seed=0)
        ids = list(np.random.default_rng(0).integers(0, 50, 200))
        loader = DataLoader(GPTDataset(ids, 8, 8), 2, shuffle=False, drop_last=True)
        train_model(model, loader, loader, AdamW(model.parameters(), lr=1e-3), num_epochs=1, eval_freq=100,
                    eval_iter=1, progress=False, log=None, max_steps=1,
                    keep_freed_memory=(sys.argv[1] == "on"))
        print(json.dumps(memory.freed_memory_kept()))
    """)
    results = {}
    for mode in ("on", "off"):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=120,
                             cwd=tmp_path, env={**os.environ, "NUMPYGPT_KEEP_FREED_MEMORY": "1"})
        assert out.returncode == 0, out.stderr
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert results == {"on": glibc, "off": False}
