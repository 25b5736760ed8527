"""Both cores for what NumPy runs on one: chunks of rows over a small thread pool.

NumPy's element-wise ufuncs and reductions run on one core, but they release the GIL
while they work on an array, and so does a BLAS call. So a layer that cuts its rows into
chunks and hands the chunks to a few threads gets every core, in plain NumPy:

    def rows(start, stop):                    # any work on rows [start, stop)
        y[start:stop] = f(x[start:stop])
    parallel.for_rows(rows, x)                # x's rows, in cache-sized chunks

    parallel.set_num_threads(1)               # everything on the calling thread
    with parallel.num_threads(1): ...         # the same, for a block

Three properties the layers rely on:
- **Results do not depend on the threads.** Chunk boundaries depend only on the number of
  rows and the chunk size, never on how many threads there are or which thread ran which
  chunk; ``for_rows`` returns each chunk's result in chunk order, so a layer that sums
  per-chunk partials gets the same bits with one thread or eight.
- **Chunks are taken, not assigned.** Each thread takes the next chunk when it is done
  with one (the calling thread works too), so a thread that another process keeps off
  its core does less of the work instead of holding up everyone else at the end.
- **BLAS inside chunks runs on one thread** (``blas=True``): the chunks already use
  every core, and a multi-threaded GEMM per chunk would only have its threads wait for
  each other. threadpoolctl sets OpenBLAS's thread count to 1 around the parallel
  region and restores it afterwards.

Chunks of about ``CHUNK_BYTES`` of input also keep an element-wise layer's temporaries
in the core's cache: ``y = 0.5 * x * (1 + t)`` on a 256 KiB chunk reads and writes
cache, where on the whole array every operator is a pass over main memory. Smaller
chunks cost more than they save: every NumPy call in a chunk takes the GIL for a few
microseconds, and with 64 KiB chunks two threads spent more time handing the GIL back
and forth than computing (GELU on GPT-2 small's (4096, 3072) hidden array: 39 ms with
64 KiB chunks on two threads, 33 ms on one thread, 21 ms with 256 KiB chunks on two;
benchmarks/RESULTS.md).

CuPy arrays are never split: the GPU runs the whole array as one kernel.
"""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext

from . import backend

CHUNK_BYTES = 1 << 18  # input bytes per chunk: 256 KiB, so a layer's few temporaries stay in L2

_num_threads: int | None = None  # None: NUMPYGPT_NUM_THREADS or every core we may run on
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()  # held from choosing the pool to the last submit on it
_in_worker = threading.local()  # set in pool threads: nested parallel calls run inline
_blas_controller = None


def _default_threads() -> int:
    env = os.environ.get("NUMPYGPT_NUM_THREADS")
    if env:
        n = int(env)
        if n < 1:
            raise ValueError(f"NUMPYGPT_NUM_THREADS must be a positive integer, got {env!r}")
        return n
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def get_num_threads() -> int:
    """Threads that share a layer's chunks (the calling thread included)."""
    global _num_threads
    if _num_threads is None:
        _num_threads = _default_threads()
    return _num_threads


def set_num_threads(n: int) -> None:
    """Use ``n`` threads for chunked layers from now on (1: no threads at all)."""
    global _num_threads
    if int(n) < 1:
        raise ValueError(f"number of threads must be a positive integer, got {n}")
    _num_threads = int(n)


@contextmanager
def num_threads(n: int):
    """``with parallel.num_threads(1): ...`` runs a block with ``n`` threads."""
    before = get_num_threads()
    set_num_threads(n)
    try:
        yield
    finally:
        set_num_threads(before)


def _submit(fn, copies: int) -> list:
    """Futures of ``copies`` runs of ``fn`` on the pool, grown to ``copies`` threads first.

    Under the lock: a thread that grows the pool shuts the old one down, so without it a
    thread that had just been handed the old pool would submit to a shut-down executor
    (RuntimeError), and two threads growing it at once would each start one. The old
    pool finishes what was submitted to it (``shutdown(wait=False)`` cancels nothing).
    Nothing waits while holding the lock, and pool threads never take it (nested calls
    run inline).
    """
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < copies:
            old = _pool
            _pool = ThreadPoolExecutor(max_workers=copies, thread_name_prefix="numpygpt",
                                       initializer=_mark_worker)
            _pool_size = copies
            if old is not None:
                old.shutdown(wait=False)
        return [_pool.submit(fn) for _ in range(copies)]


def _mark_worker() -> None:
    _in_worker.active = True


def _forget_pool() -> None:
    """In a forked child the pool's threads do not exist: start a new pool when needed
    (and a new lock: a thread of the parent may have held the old one at the fork)."""
    global _pool, _pool_size, _pool_lock
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def single_thread_blas():
    """A context in which NumPy's BLAS uses one thread (a no-op without threadpoolctl)."""
    global _blas_controller
    if _blas_controller is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # pragma: no cover - threadpoolctl is a dependency
            return nullcontext()
        _blas_controller = ThreadpoolController()
    return _blas_controller.limit(limits=1, user_api="blas")


def for_chunks(fn, n: int, grain: int, blas: bool = False) -> list:
    """``fn(start, stop)`` for every chunk ``[start, stop)`` of ``range(n)``, ``grain``
    items a chunk, on up to ``get_num_threads()`` threads; the results in chunk order.

    ``blas=True``: ``fn`` calls BLAS, which then runs single-threaded (on one thread
    too, so that results do not depend on the thread count). An exception in any chunk is raised here once every thread stopped.
    """
    grain = max(1, int(grain))
    bounds = [(start, min(start + grain, n)) for start in range(0, n, grain)]
    workers = min(get_num_threads(), len(bounds))
    if workers <= 1 or getattr(_in_worker, "active", False):
        # the same chunks, one after the other (with the same single-threaded BLAS, so
        # that the bits do not depend on the number of threads)
        with single_thread_blas() if blas and not getattr(_in_worker, "active", False) else nullcontext():
            return [fn(start, stop) for start, stop in bounds]
    results = [None] * len(bounds)
    tickets = itertools.count()  # next() on a count is atomic under the GIL
    failed = []

    def work() -> None:
        for i in tickets:
            if i >= len(bounds) or failed:
                return
            try:
                results[i] = fn(*bounds[i])
            except BaseException as e:  # stop the others, re-raise in the caller
                failed.append(e)
                return

    with single_thread_blas() if blas else nullcontext():
        futures = _submit(work, workers - 1)
        work()  # the calling thread takes chunks too
        for f in futures:
            f.result()
    if failed:
        raise failed[0]
    return results


def rows_per_chunk(x, chunk_bytes: int | None = None) -> int:
    """How many of x's rows (first axis) make a chunk of about ``chunk_bytes``
    (default ``CHUNK_BYTES``)."""
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    row_bytes = x.nbytes // max(1, x.shape[0]) if x.ndim else x.nbytes
    return max(1, chunk_bytes // max(1, row_bytes))


def for_rows(fn, x, chunk_bytes: int | None = None, blas: bool = False) -> list:
    """``fn(start, stop)`` over chunks of x's rows (its first axis); results in chunk order.

    A CuPy array is one chunk (the GPU needs no help from host threads).
    """
    n = x.shape[0]
    if backend.is_cupy_array(x):
        return [fn(0, n)]
    return for_chunks(fn, n, rows_per_chunk(x, chunk_bytes), blas=blas)
