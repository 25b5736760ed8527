"""Keep freed memory in the process, so a training step does not page-fault its arrays.

A training step allocates the same large arrays every time: each layer's activations,
the (B*T, V) logits and their gradient, the MLP's (B*T, 4C) hidden arrays. NumPy asks
the C library's ``malloc`` for them, and glibc serves every request above its mmap
threshold (at most 32 MiB) with a fresh ``mmap`` and gives it back to the kernel on
``free``. So each step, every one of those arrays arrives as untouched pages: the first
write to each 4 KiB page (or 2 MiB huge page) traps into the kernel, which finds a page,
zeroes it and maps it. For GPT-2 small at B x T = 4 x 1024 that is ~10 GB of fresh
arrays a step, and measured, a quarter of a core spends the whole step in the kernel
(see ``benchmarks/RESULTS.md``).

``keep_freed_memory()`` tells glibc to take large blocks from its heap too and not to
give freed memory back, so the second step reuses the first step's pages, already
mapped, as CuPy's memory pool does for GPU arrays. Here it takes two ``mallopt``
settings:

- ``M_MMAP_MAX = 0``: never serve a request with its own ``mmap``;
- ``M_TRIM_THRESHOLD = -1``: never give the top of the heap back (mallopt(3): "-1
  disables trimming completely").

The price: memory the step freed stays counted in the process's resident size between
steps, and the peak grew 3% at 4 x 1024 (``benchmarks/bench_memory.py``). It is process-wide
and cannot be undone cheaply, so it is a switch, not a default of the library:
``train_model`` and the command line turn it on (``keep_freed_memory=False`` in
``TrainOptions`` and ``NUMPYGPT_KEEP_FREED_MEMORY=0`` turn it off). Elsewhere than glibc
(macOS, musl, Windows) it does nothing and returns False.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
NEVER_TRIM = -1

_kept = False


def _mallopt():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library this Python already uses
    except OSError:
        return None
    fn = getattr(libc, "mallopt", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_int]
        fn.restype = ctypes.c_int
    return fn


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep and reuse freed memory instead of returning it to the
    kernel (see the module's docstring). Idempotent; returns whether it is in effect.
    ``NUMPYGPT_KEEP_FREED_MEMORY=0`` in the environment turns it into a no-op."""
    global _kept
    if _kept:
        return True
    if os.environ.get("NUMPYGPT_KEEP_FREED_MEMORY", "1").strip() == "0":
        return False
    mallopt = _mallopt()
    if mallopt is None:
        return False
    # mallopt returns 1 on success, 0 on error
    _kept = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
    return _kept


def freed_memory_kept() -> bool:
    """Whether ``keep_freed_memory()`` is in effect in this process."""
    return _kept
