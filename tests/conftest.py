"""Shared fixtures: every test that takes ``device`` runs on NumPy, on the fake CUDA device
(NumPy underneath, CuPy's refusals on top: numpygpt.fake_cuda) and, where a CUDA device
exists, again on CuPy."""

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from numpygpt import backend

settings.register_profile(
    "numpygpt", max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile("numpygpt")

_CUDA = backend.cuda_available()

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("fake-cuda", id="fake-cuda"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda,
                                            pytest.mark.skipif(not _CUDA, reason="no CUDA device/CuPy here")]),
]


@pytest.fixture(params=DEVICES)
def device(request):
    """Run the test with numpygpt's backend switched to this device."""
    with backend.device(request.param):
        backend.manual_seed(0)
        yield request.param


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def to_dev(a, dtype=None):
    """Host array -> the current device."""
    return backend.to_device(np.asarray(a), dtype=dtype)


def to_host(a):
    """Device array -> NumPy."""
    return backend.to_host(a)


def assert_grads_ok(errors: dict, tol: float = 1e-6):
    """Every relative error of a gradient check (numpygpt.gradcheck) at most ``tol``."""
    from numpygpt.gradcheck import report

    assert errors, "nothing was checked"
    assert max(errors.values()) <= tol, "\n" + report(errors, tol)


def backward_with_eval_between(layer, x, dout, evaluate=None, seed=0):
    """Forward ``x``, then (if given) ``evaluate()`` under no_grad, then backward ``dout``:
    (the backward's return on the host or None, {name: grad on the host}). The dropout
    generator is seeded first, so two calls draw the same masks for the forward."""
    from numpygpt.nn import no_grad

    backend.manual_seed(seed)
    layer.zero_grad()
    layer(x)
    if evaluate is not None:
        with no_grad():
            evaluate()
    dx = layer.backward(dout)
    grads = {n: to_host(p.grad) for n, p in layer.named_parameters() if p.grad is not None}
    return (None if dx is None else to_host(dx)), grads


def assert_eval_between_changes_nothing(layer, x, dout, evaluate):
    """A no_grad forward between a forward and its backward leaves the backward's result
    and every gradient bit for bit as without it."""
    dx_alone, grads_alone = backward_with_eval_between(layer, x, dout)
    dx, grads = backward_with_eval_between(layer, x, dout, evaluate)
    assert grads_alone and grads.keys() == grads_alone.keys()
    for name, g in grads_alone.items():
        np.testing.assert_array_equal(grads[name], g, err_msg=name)
    if dx_alone is not None:
        np.testing.assert_array_equal(dx, dx_alone)
def traced_peak(fn):
    """(fn(), the peak of memory tracemalloc saw while fn ran, in bytes)."""
    import tracemalloc

    tracemalloc.start()
    try:
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


def terminate_after_steps(args, steps: int = 3, timeout: float = 120):
    """Run ``python -m numpygpt *args`` from the repository root, send SIGTERM once it has
    logged ``steps`` step lines (run it with an evaluation every step), and return
    (exit code, stderr). The process is killed if the test fails on the way."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "numpygpt", *args], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline, seen = time.monotonic() + timeout, 0
        while seen < steps:  # the run logs a line after every step
            line = proc.stdout.readline()
            assert line and time.monotonic() < deadline, "the run ended or stalled before training"
            seen += "(Step" in line or "(step" in line
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err
