"""Shared fixtures: every test that takes ``device`` runs on NumPy and, where a CUDA
device exists, again on CuPy."""

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
