"""The one place that decides NumPy (CPU) or CuPy (CUDA).

Everything else asks this module for its array library, so switching device is a
single call (or the ``NUMPYGPT_DEVICE`` environment variable) and is resolved when
it is asked for, never frozen at import time::

    from numpygpt import backend
    backend.set_device("cuda")        # or "cpu" / "auto" ("fake-cuda": tests, see fake_cuda)
    x = backend.xp.zeros((2, 3))      # backend.xp is numpy or cupy, looked up now

Layer code follows two rules: create arrays with ``backend.xp`` and operate on
existing arrays with ``backend.array_module(x)``, so a model keeps computing on the
device its arrays live on.

The few things that really differ between the libraries are wrapped here:
scatter-add (embedding gradients with repeated ids), random generators, moving
arrays to and from the host, and synchronising.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy

_VALID = ("cpu", "cuda", "auto", "fake-cuda")
FAKE = "fake-cuda"  # numpygpt.fake_cuda: CuPy's strictness on the CPU, for tests
_device: str | None = None  # None means: read NUMPYGPT_DEVICE when asked


class DeviceError(RuntimeError):
    """Raised when CUDA is asked for but CuPy or a CUDA device is missing."""


def _cupy_or_error():
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise DeviceError(
            "device 'cuda' needs CuPy, which is not installed: "
            "pip install 'numpygpt[cuda]' (cupy-cuda12x)"
        ) from e
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError: no driver, too old a driver, ...
        raise DeviceError(f"device 'cuda': CuPy is installed but no CUDA device is usable ({e})") from e
    if n < 1:
        raise DeviceError("device 'cuda': CuPy is installed but no CUDA device was found")
    return cupy


def cuda_available() -> bool:
    """True when CuPy imports and at least one CUDA device answers."""
    try:
        _cupy_or_error()
        return True
    except DeviceError:
        return False


def _resolve(name: str) -> str:
    name = name.lower()
    if name not in _VALID:
        raise ValueError(f"unknown device {name!r}: expected one of {', '.join(_VALID)}")
    if name == "auto":
        return "cuda" if cuda_available() else "cpu"
    if name == "cuda":
        _cupy_or_error()
    return name


def set_device(name: str) -> str:
    """Choose 'cpu', 'cuda' or 'auto' for arrays created from now on; returns the choice.

    'fake-cuda' is for tests: arrays that compute with NumPy but refuse what CuPy refuses
    and count host transfers (``numpygpt.fake_cuda``)."""
    global _device
    _device = _resolve(name)
    return _device


def get_device() -> str:
    """The current device, 'cpu' or 'cuda' ('fake-cuda' in tests; NUMPYGPT_DEVICE decides until
    set_device is called)."""
    global _device
    if _device is None:
        _device = _resolve(os.environ.get("NUMPYGPT_DEVICE", "cpu"))
    return _device


@contextmanager
def device(name: str):
    """``with backend.device("cpu"): ...`` switches device for a block of code."""
    global _device
    before = _device
    set_device(name)
    try:
        yield
    finally:
        _device = before


def get_xp():
    """The array library of the current device: numpy or cupy (or fake_cuda's xp)."""
    return _library(get_device())


def _library(device_name: str):
    if device_name == "cuda":
        import cupy

        return cupy
    if device_name == FAKE:
        from . import fake_cuda

        return fake_cuda.xp
    return numpy


def __getattr__(name):  # PEP 562: ``backend.xp`` is looked up at every access
    if name == "xp":
        return get_xp()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_cupy_array(x) -> bool:
    """True for an array on the GPU: a CuPy array, or the fake device's stand-in for one
    (every caller means "on the device, not NumPy's")."""
    module = type(x).__module__
    return module.startswith("cupy") or module == "numpygpt.fake_cuda"


def array_module(x):
    """numpy or cupy (or fake_cuda's xp), whichever ``x`` belongs to."""
    return _library(device_of(x))


def device_of(x) -> str:
    module = type(x).__module__
    if module.startswith("cupy"):
        return "cuda"
    return FAKE if module == "numpygpt.fake_cuda" else "cpu"


# -- moving data --------------------------------------------------------------------

def to_host(x):
    """A NumPy array with the same values (no copy if it already is one)."""
    if is_cupy_array(x):
        return x.get()
    return numpy.asarray(x)


def to_device(x, dtype=None, device_name: str | None = None):
    """Move ``x`` (NumPy, CuPy or a list) to ``device_name`` (default: the current device)."""
    target = _resolve(device_name) if device_name is not None else get_device()
    if target == "cuda":
        import cupy

        return cupy.asarray(x, dtype=dtype)
    if target == FAKE:
        return _library(FAKE).asarray(x, dtype=dtype)
    return numpy.asarray(to_host(x), dtype=dtype)


def host_floats(*values) -> tuple:
    """Python floats of numbers and 0-d arrays, with one device-to-host transfer for all
    the device ones (a training step's loss and gradient norm cross together)."""
    on_device = [v for v in values if is_cupy_array(v)]
    if not on_device:
        return tuple(float(v) for v in values)
    xp = array_module(on_device[0])
    fetched = iter(to_host(xp.stack([v.astype(xp.float64).reshape(()) for v in on_device])).tolist())
    return tuple(next(fetched) if is_cupy_array(v) else float(v) for v in values)


def synchronize() -> None:
    """Wait for queued GPU work (a no-op on CPU); call it before reading a timer."""
    if get_device() == "cuda":
        import cupy

        cupy.cuda.Device().synchronize()


# -- scatter-add ----------------------------------------------------------------------

def scatter_add_rows(dst, ids, src) -> None:
    """``dst[ids[n]] += src[n]`` for every n, counting repeated ids every time.

    dst: (V, C), ids: (N,) integers, src: (N, C). ``dst[ids] += src`` would keep only
    one of the repeats, and ``numpy.add.at`` is slow on 2-D arrays, so on NumPy we
    sort the ids, sum each run of equal ids with one ``add.reduceat`` and add the
    (unique) row sums in one fancy-indexed step.
    """
    if is_cupy_array(dst):
        if device_of(dst) == FAKE:
            from . import fake_cuda as cupyx
        else:
            import cupyx

        cupyx.scatter_add(dst, ids, src)
        return
    ids = numpy.asarray(ids).reshape(-1)
    if ids.size == 0:
        return
    order = numpy.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    # start index of each run of equal ids
    starts = numpy.flatnonzero(numpy.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    sums = numpy.add.reduceat(src[order], starts, axis=0)  # (U, C)
    dst[sorted_ids[starts]] += sums  # unique ids: plain fancy indexing is exact


# -- random numbers -----------------------------------------------------------------

_rngs: dict = {}


def manual_seed(seed: int) -> None:
    """Reseed the generators that dropout draws its masks from (all devices)."""
    _rngs.clear()
    _rngs["seed"] = int(seed)


def get_rng(device_name: str | None = None):
    """The generator for dropout masks on a device (default: the current one), seeded by
    manual_seed."""
    dev = device_name or get_device()
    if dev not in _rngs:
        seed = _rngs.get("seed", 0)
        if dev == "cuda":
            import cupy

            _rngs[dev] = cupy.random.default_rng(seed)
        elif dev == FAKE:
            from . import fake_cuda

            _rngs[dev] = fake_cuda.default_rng(seed)
        else:
            _rngs[dev] = numpy.random.default_rng(seed)
    return _rngs[dev]


def get_rng_state() -> dict:
    """JSON-friendly state of the CPU dropout generator (for checkpoints)."""
    with device("cpu"):
        return {"seed": _rngs.get("seed", 0), "cpu": get_rng().bit_generator.state}


def check_rng_state(state) -> None:
    """ValueError unless ``state`` is one ``get_rng_state`` could have returned (checked on a
    scratch generator: the real ones are not touched)."""
    if not isinstance(state, dict):
        raise ValueError(f"the RNG state must be a dict, got {type(state).__name__}")
    seed = state.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"the RNG state's seed must be an integer >= 0, got {seed!r}")
    if "cpu" in state:
        try:
            numpy.random.default_rng(0).bit_generator.state = state["cpu"]
        except (TypeError, ValueError, KeyError, OverflowError) as e:
            raise ValueError(f"the RNG state is malformed ({type(e).__name__}: {e})") from e


def set_rng_state(state: dict) -> None:
    check_rng_state(state)  # all or nothing: a bad state leaves the generators as they are
    manual_seed(state.get("seed", 0))
    if "cpu" in state:
        with device("cpu"):
            get_rng().bit_generator.state = state["cpu"]


def host_rng(seed: int | None):
    """A seeded NumPy generator, for weights: initialise on the host, then move, so a
    seed gives the same model on either backend."""
    return numpy.random.default_rng(seed)
