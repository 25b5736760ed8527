"""Training checkpoints: one safetensors file, written atomically, never a pickle.

    save_checkpoint("runs/ckpt.safetensors", model, opt, step=step, extra={"epoch": 2})
    ck = load_checkpoint("runs/ckpt.safetensors", optimizer=opt)   # ck["model"], ck["step"], ...

Layout of the file:

* tensors ``model.<parameter name>`` (host copies, in the model's dtype) and
  ``optim.<name>`` for each array of ``optimizer.state_dict()["tensors"]``;
* metadata key ``"numpygpt"``: a JSON string with the format version, the model config,
  the step, the optimiser's hyperparameters, the dropout RNG state and the caller's
  ``extra`` (data-loader position, epoch, tokens seen, loss history...).

safetensors holds plain arrays and strings, so opening a checkpoint cannot run code, as
unpickling a file can. The file is written to a temporary file in the same directory,
flushed to disk and renamed over ``path``: a crash mid-save leaves the previous
checkpoint as it was.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import safetensors.numpy as st_numpy  # looked up at call time, so tests can make it fail
from safetensors import safe_open

from . import backend
from .config import GPTConfig

__all__ = ["save_checkpoint", "load_checkpoint", "FORMAT_VERSION"]

FORMAT_VERSION = 1
META_KEY = "numpygpt"
MODEL_PREFIX = "model."
OPTIM_PREFIX = "optim."


def save_checkpoint(path, model, optimizer=None, step: int = 0, extra: dict | None = None) -> None:
    """Write model weights, optimiser state, step, RNG state and ``extra`` to ``path``.

    ``extra`` must be JSON-serialisable (checked before anything is written). The parent
    directory is created if needed. Atomic: on any error the temporary file is removed
    and an existing ``path`` is untouched.
    """
    from .lora import check_unmerged

    check_unmerged(model, "save a checkpoint")  # merged weights plus adapters would count them twice
    path = os.fspath(path)
    tensors = {}
    for name, p in model.named_parameters():
        tensors[MODEL_PREFIX + name] = np.ascontiguousarray(backend.to_host(p.data))
    hyper = None
    if optimizer is not None:
        sd = optimizer.state_dict()
        hyper = sd["hyper"]
        for name, arr in sd["tensors"].items():
            tensors[OPTIM_PREFIX + name] = np.ascontiguousarray(backend.to_host(arr))
    meta = {
        "format": "numpygpt-checkpoint",
        "version": FORMAT_VERSION,
        "config": model.cfg.to_dict(),
        "step": int(step),
        "optimizer": hyper,
        "rng_state": backend.get_rng_state(),
        "extra": {} if extra is None else extra,
    }
    try:
        meta_json = json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise TypeError(f"save_checkpoint: extra must be JSON-serialisable ({e})") from e

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        st_numpy.save_file(tensors, tmp, metadata={META_KEY: meta_json})
        _fsync_file(tmp)
        os.chmod(tmp, _default_file_mode())  # mkstemp makes it owner-only
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)  # make the rename itself durable


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory; the rename is done anyway
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _default_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _read(path: str):
    """(metadata dict, {name: host array}) of a numpygpt checkpoint, or a ValueError saying why not."""
    try:
        with safe_open(path, framework="numpy") as f:
            raw_meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:  # safetensors' own error type: bad header, truncated data...
        raise ValueError(f"{path} is not a readable checkpoint: corrupt, truncated or not safetensors ({e})") from e
    if META_KEY not in raw_meta:
        raise ValueError(f"{path} is a safetensors file but not a numpygpt checkpoint (no {META_KEY!r} metadata)")
    try:
        meta = json.loads(raw_meta[META_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the checkpoint's metadata is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != "numpygpt-checkpoint":
        raise ValueError(f"{path}: the metadata does not describe a numpygpt checkpoint")
    version = meta.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format version {version!r} is not supported "
            f"(this numpygpt reads versions up to {FORMAT_VERSION})"
        )
    for key in ("config", "step", "rng_state", "extra"):
        if key not in meta:
            raise ValueError(f"{path}: the checkpoint's metadata lacks {key!r}")
    odd = [k for k in tensors if not k.startswith((MODEL_PREFIX, OPTIM_PREFIX))]
    if odd:
        raise ValueError(f"{path}: unexpected tensors {odd[:5]} in the checkpoint")
    return meta, tensors


def load_checkpoint(path, model=None, optimizer=None, device: str | None = None,
                    restore_rng: bool = True) -> dict:
    """Read a checkpoint written by ``save_checkpoint``.

    model: load the weights into this model (names and shapes must match; arrays take
        the model's dtype); None builds ``GPTModel(config)`` from the saved config.
    optimizer: restore its state too (the checkpoint must hold optimiser state).
    device: 'cpu' or 'cuda' for the model (a given model is moved there first);
        None keeps a given model where it is and builds a new one on the current device.
    restore_rng: put the dropout generators back in their saved state.

    Returns ``{"model", "config", "step", "extra", "rng_state", "optimizer_hyper"}``.
    Raises ValueError for a corrupt or foreign file and for a model or optimiser that
    does not fit; then neither the model nor the optimiser is changed.
    """
    from .model import GPTModel

    path = os.fspath(path)
    meta, tensors = _read(path)
    try:
        config = GPTConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: the checkpoint's model config is invalid ({e})") from e
    hyper = meta.get("optimizer")
    if optimizer is not None and hyper is None:
        raise ValueError(f"{path}: an optimizer was given but the checkpoint holds no optimizer state")

    model_sd = {k[len(MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    optim_sd = {k[len(OPTIM_PREFIX):]: v for k, v in tensors.items() if k.startswith(OPTIM_PREFIX)}
    if model is None:
        with backend.device(device or backend.get_device()):
            model = GPTModel(config, init=False)
    elif device is not None:
        model.to(device)

    before = model.state_dict()  # the arrays themselves: loading replaces, never overwrites, them
    try:
        model.load_state_dict(model_sd)
    except ValueError as e:
        raise ValueError(f"checkpoint {path} does not fit the model: {e}") from e
    if optimizer is not None:
        try:
            optimizer.load_state_dict({"hyper": hyper, "tensors": optim_sd})
        except (ValueError, KeyError, TypeError) as e:
            for name, p in model.named_parameters():  # leave the model as it was
                p.data = before[name]
            raise ValueError(f"checkpoint {path}: its optimizer state does not fit the optimizer: {e}") from e
    if restore_rng:
        backend.set_rng_state(meta["rng_state"])
    return {
        "model": model,
        "config": config,
        "step": int(meta["step"]),
        "extra": meta["extra"],
        "rng_state": meta["rng_state"],
        "optimizer_hyper": hyper,
    }
