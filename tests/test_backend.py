"""The NumPy/CuPy switch, scatter-add, random generators, and the CuPy API check."""

import ast
import pathlib

import numpy as np
import pytest

import numpygpt
from numpygpt import backend
from conftest import to_dev

PKG = pathlib.Path(numpygpt.__file__).parent


def test_device_is_resolved_at_call_time(monkeypatch):
    monkeypatch.setattr(backend, "_device", None)
    monkeypatch.setenv("NUMPYGPT_DEVICE", "cpu")
    assert backend.get_device() == "cpu" and backend.xp is np
    with backend.device("cpu"):
        assert backend.get_xp() is np


def test_unknown_device_is_rejected(monkeypatch):
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        backend.set_device("tpu")
    monkeypatch.setattr(backend, "_device", None)
    monkeypatch.setenv("NUMPYGPT_DEVICE", "gpu0")
    with pytest.raises(ValueError, match="gpu0"):
        backend.get_device()


@pytest.mark.skipif(backend.cuda_available(), reason="a CUDA device is present")
def test_cuda_without_a_device_says_why(monkeypatch):
    with pytest.raises(backend.DeviceError, match="cuda"):
        backend.set_device("cuda")
    assert backend.get_device() != "cuda"
    with backend.device("auto"):
        assert backend.get_device() == "cpu"


def test_cuda_without_cupy_says_to_install_it(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_cupy(name, *a, **k):
        if name == "cupy" or name.startswith("cupy."):
            raise ImportError("No module named 'cupy'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_cupy)
    with pytest.raises(backend.DeviceError, match=r"numpygpt\[cuda\]"):
        backend.set_device("cuda")


def test_scatter_add_counts_repeated_ids(device, rng):
    V, C, N = 7, 5, 200
    ids = rng.integers(0, V, N)
    src = rng.standard_normal((N, C))
    ref = np.zeros((V, C))
    np.add.at(ref, ids, src)  # the plain, slow reference
    dst = to_dev(np.zeros((V, C)), "float64")
    backend.scatter_add_rows(dst, to_dev(ids), to_dev(src, "float64"))
    np.testing.assert_allclose(backend.to_host(dst), ref, rtol=1e-12, atol=1e-12)
    empty = to_dev(np.zeros((V, C)), "float64")
    backend.scatter_add_rows(empty, to_dev(np.zeros(0, dtype=np.int64)), to_dev(np.zeros((0, C)), "float64"))
    assert not backend.to_host(empty).any()


def test_host_device_moves(device):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    d = backend.to_device(a)
    assert backend.device_of(d) == device
    np.testing.assert_array_equal(backend.to_host(d), a)
    assert backend.to_device(a, dtype="float64").dtype == np.float64
    backend.synchronize()


def test_manual_seed_replays_dropout_masks(device):
    backend.manual_seed(5)
    a = backend.to_host(backend.get_rng().random((4, 4)))
    backend.manual_seed(5)
    b = backend.to_host(backend.get_rng().random((4, 4)))
    np.testing.assert_array_equal(a, b)


def test_rng_state_round_trip():
    backend.manual_seed(3)
    with backend.device("cpu"):
        backend.get_rng().random(10)
        state = backend.get_rng_state()
        a = backend.get_rng().random(5)
        backend.set_rng_state(state)
        np.testing.assert_array_equal(backend.get_rng().random(5), a)


# -- every xp.<name> the package uses must exist in CuPy ------------------------------------

def _xp_attribute_chains():
    """('random', 'default_rng')-style chains of every ``xp.<...>`` access in numpygpt/."""
    chains = set()
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Attribute):
                parts = []
                cur = node
                while isinstance(cur, ast.Attribute):
                    parts.append(cur.attr)
                    cur = cur.value
                if isinstance(cur, ast.Name) and cur.id == "xp":
                    chains.add((str(path.relative_to(PKG)), tuple(reversed(parts))))
    # keep only maximal chains' prefixes once: ('random',) is implied by ('random', 'x')
    return sorted(chains)


def test_the_scan_finds_xp_uses():
    names = {c[0] for _, c in _xp_attribute_chains()}
    assert {"zeros", "exp", "arange"} <= names, names


def test_every_xp_function_used_exists_in_cupy():
    cupy = pytest.importorskip("cupy", reason="CuPy cannot be installed here")
    missing = []
    for where, chain in _xp_attribute_chains():
        obj = cupy
        for part in chain:
            if not hasattr(obj, part):
                missing.append(f"{where}: xp.{'.'.join(chain)}")
                break
            obj = getattr(obj, part)
    assert not missing, "CuPy lacks: " + ", ".join(missing)


def test_layer_code_never_uses_numpy_for_math():
    """Only the backend (and the host-side gradient checker, tokenizer and data code)
    may import numpy; layers and the model go through backend.xp."""
    for path in [*(PKG / "nn").glob("*.py"), PKG / "model.py"]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(m == "numpy" or m.startswith("numpy.") for m in mods), f"{path.name} imports numpy"
