"""numpygpt.parallel and the layers that use it: chunked, threaded results are the
single-threaded ones bit for bit (element-wise and row-wise work) or to float rounding
(LayerNorm's dw and db, summed per chunk), and equal the plain whole-array formulas."""

import threading

import numpy as np
import pytest

from numpygpt import parallel
from numpygpt.nn import CrossEntropyLoss, GELU, LayerNorm, Softmax

SHAPE = (3, 5, 7)


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Chunks of 64 bytes, so test-sized arrays are split into many chunks."""
    monkeypatch.setattr(parallel, "CHUNK_BYTES", 64)


def test_for_chunks_covers_the_range_in_order_on_several_threads():
    seen_threads = set()
    barrier = threading.Barrier(2, timeout=10)

    def fn(start, stop):
        if start < 2:  # the first two chunks wait for each other: they must run at once
            barrier.wait()
        seen_threads.add(threading.get_ident())
        return list(range(start, stop))

    with parallel.num_threads(2):
        out = parallel.for_chunks(fn, 10, 1)
    assert [i for chunk in out for i in chunk] == list(range(10))
    assert len(seen_threads) == 2


def test_one_thread_runs_inline_and_nested_calls_do_not_deadlock():
    with parallel.num_threads(1):
        assert parallel.for_chunks(lambda s, e: threading.get_ident(), 4, 1) == [threading.get_ident()] * 4
    with parallel.num_threads(2):
        out = parallel.for_chunks(lambda s, e: sum(parallel.for_chunks(lambda a, b: b - a, 5, 2)), 4, 1)
    assert out == [5] * 4


def test_an_error_in_a_chunk_reaches_the_caller():
    def fn(start, stop):
        if start == 3:
            raise KeyError("chunk 3")
        return start

    with parallel.num_threads(2), pytest.raises(KeyError, match="chunk 3"):
        parallel.for_chunks(fn, 8, 1)


def test_blas_threads_are_restored():
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads():
        return [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]

    before = blas_threads()
    with parallel.num_threads(2):
        inside = parallel.for_chunks(lambda s, e: blas_threads(), 2, 1, blas=True)
    assert all(n == [1] * len(before) for n in inside)
    assert blas_threads() == before


def test_bad_thread_counts():
    with pytest.raises(ValueError, match="positive"):
        parallel.set_num_threads(0)


def run(layer_fn, threads):
    with parallel.num_threads(threads):
        return layer_fn()


def gelu_step(x, dy):
    g = GELU()
    return g(x), g.backward(dy)


def layernorm_step(x, dy):
    ln = LayerNorm(x.shape[-1], dtype=x.dtype)
    ln.weight.data = np.linspace(0.5, 1.5, x.shape[-1]).astype(x.dtype)
    ln.bias.data = np.linspace(-1, 1, x.shape[-1]).astype(x.dtype)
    y = ln(x)
    return y, ln.backward(dy), ln.weight.grad, ln.bias.grad


def softmax_step(x, dy):
    s = Softmax()
    return s(x), s.backward(dy)


def cross_entropy_step(x, dy):
    targets = (np.arange(x.shape[0] * x.shape[1]) % x.shape[2]).reshape(x.shape[:2])
    targets[0, 1] = -100
    ce = CrossEntropyLoss()
    return ce(x, targets), ce.backward()


STEPS = [gelu_step, layernorm_step, softmax_step, cross_entropy_step]


@pytest.mark.parametrize("step", STEPS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_threads_give_the_same_bits(tiny_chunks, step, dtype):
    rng = np.random.default_rng(0)
    x, dy = (rng.standard_normal(SHAPE).astype(dtype) for _ in range(2))
    one = run(lambda: step(x, dy), 1)
    two = run(lambda: step(x, dy), 2)
    for a, b in zip(one, two):
        assert a.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("step", STEPS, ids=lambda f: f.__name__)
def test_chunked_equals_whole_array(tiny_chunks, monkeypatch, step):
    """Many small chunks on two threads against one chunk holding every row."""
    rng = np.random.default_rng(1)
    x, dy = (rng.standard_normal(SHAPE) for _ in range(2))
    chunked = run(lambda: step(x, dy), 2)
    monkeypatch.setattr(parallel, "CHUNK_BYTES", 1 << 30)
    whole = run(lambda: step(x, dy), 1)
    for a, b in zip(chunked, whole):
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-15)


def test_layers_match_their_formulas(tiny_chunks):
    """The chunked layers against the textbook expressions, written out here."""
    rng = np.random.default_rng(2)
    x, dy = (rng.standard_normal(SHAPE) for _ in range(2))
    with parallel.num_threads(2):
        y, dx = gelu_step(x, dy)
        t = np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))
        np.testing.assert_allclose(y, 0.5 * x * (1 + t), rtol=1e-14)
        y, dx = softmax_step(x, dy)
        e = np.exp(x - x.max(-1, keepdims=True))
        np.testing.assert_allclose(y, e / e.sum(-1, keepdims=True), rtol=1e-14)
        loss, dlogits = cross_entropy_step(x, dy)
        targets = (np.arange(15) % 7).reshape(3, 5)
        logp = x - x.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        keep = np.ones((3, 5), bool)
        keep[0, 1] = False
        nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
        np.testing.assert_allclose(loss, nll[keep].mean(), rtol=1e-14)
        y, dx, dw, db = layernorm_step(x, dy)
        xhat = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
        np.testing.assert_allclose(y, xhat * np.linspace(0.5, 1.5, 7) + np.linspace(-1, 1, 7), rtol=1e-12)
        np.testing.assert_allclose(dw, (dy * xhat).sum((0, 1)), rtol=1e-12)
        np.testing.assert_allclose(db, dy.sum((0, 1)), rtol=1e-12)


def test_model_step_is_bit_identical_on_one_and_two_threads(tiny_chunks):
    """A whole forward + backward of a tiny GPT with the blockwise attention (tiles of 4)."""
    from numpygpt import GPTConfig, GPTModel

    cfg = GPTConfig.preset("tiny", attn_impl="blockwise")
    rng = np.random.default_rng(3)
    idx, targets = rng.integers(0, cfg.vocab_size, (2, 2, 19))
    results = []
    for threads in (1, 2):
        model = GPTModel(cfg, seed=0)
        for block in model.h:
            block.attn.block_q = block.attn.block_k = 4
        loss_fn = CrossEntropyLoss()
        with parallel.num_threads(threads):
            loss = loss_fn(model(idx), targets)
            model.backward(loss_fn.backward())
        results.append([loss] + [p.grad for p in model.parameters()])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_a_forked_child_gets_a_working_pool():
    import multiprocessing as mp

    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork on this platform")
    with parallel.num_threads(2):
        parallel.for_chunks(lambda s, e: s, 4, 1)  # the parent's pool exists now
        ctx = mp.get_context("fork")
        with ctx.Pool(1) as pool:
            assert pool.apply_async(_chunks_in_child).get(timeout=60) == [0, 1, 2, 3]  # hangs if broken


def _chunks_in_child():
    with parallel.num_threads(2):
        return parallel.for_chunks(lambda s, e: s, 4, 1)


def test_threads_racing_to_grow_the_pool(monkeypatch):
    """Threads that each need a bigger pool than the last replace it at once: every call
    still runs on a live pool (none submits to one another thread shut down) and gets its
    results. The executor's submit is slowed down to widen the window between choosing the
    pool and submitting to it, where a replacement without the lock broke a call."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    created = []

    class SlowSubmit(ThreadPoolExecutor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

        def submit(self, *args, **kwargs):
            time.sleep(0.002)
            return super().submit(*args, **kwargs)

    monkeypatch.setattr(parallel, "ThreadPoolExecutor", SlowSubmit)
    n_callers = 6
    errors, results = [], {}
    try:
        for round_ in range(3):
            with parallel._pool_lock:
                parallel._pool, parallel._pool_size = None, 0  # every round grows from nothing
            barrier = threading.Barrier(n_callers, timeout=30)

            def call(k):
                try:
                    barrier.wait()
                    time.sleep(0.001 * k)  # the smaller pools first: each caller grows the last one's
                    results[round_, k] = parallel.for_chunks(lambda s, e: s * 10, k + 2, 1)  # k + 1 pool threads
                except BaseException as e:  # noqa: BLE001 - reported below
                    errors.append(e)

            with parallel.num_threads(n_callers + 1):
                callers = [threading.Thread(target=call, args=(k,)) for k in range(n_callers)]
                for t in callers:
                    t.start()
                for t in callers:
                    t.join(timeout=60)
        assert not errors, errors
        assert results == {(r, k): [10 * i for i in range(k + 2)] for r in range(3) for k in range(n_callers)}
        assert len(created) <= 3 * n_callers  # one pool per growth at most
    finally:
        with parallel._pool_lock:
            parallel._pool, parallel._pool_size = None, 0
        for pool in created:
            pool.shutdown(wait=True)
