"""Training checkpoints: one safetensors file, written atomically, never a pickle.

    save_checkpoint("runs/ckpt.safetensors", model, opt, step=step, extra={"epoch": 2})
    ck = load_checkpoint("runs/ckpt.safetensors", optimizer=opt)   # ck["model"], ck["step"], ...

    saved = read_checkpoint(path)             # read and checked once, nothing applied yet
    model = saved.build_model(device="cpu")   # ... then applied: model, optimiser, RNG
    saved.apply(model, optimizer)

Layout of the file:

* tensors ``model.<parameter name>`` (host copies, in the model's dtype) and
  ``optim.<name>`` for each array of ``optimizer.state_dict()["tensors"]``;
* metadata key ``"numpygpt"``: a JSON string with the format version, the model config,
  the step, the optimiser's hyperparameters, the dropout RNG state and the caller's
  ``extra`` (the training position and history: ``numpygpt.train.TrainState``).

safetensors holds plain arrays and strings, so opening a checkpoint cannot run code, as
unpickling a file can. Writing goes through ``numpygpt.fileio``: a temporary file in the
same directory, fsync'ed and renamed over ``path``, so a crash mid-save leaves the
previous checkpoint as it was.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
from safetensors import safe_open

from . import backend
from .config import GPTConfig
from .fileio import write_safetensors
from .model import GPTModel

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint", "Checkpoint", "FORMAT_VERSION"]

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
    tensors = [(MODEL_PREFIX + name, p.data) for name, p in model.named_parameters()]
    hyper = None
    if optimizer is not None:
        sd = optimizer.state_dict()
        hyper = sd["hyper"]
        tensors += [(OPTIM_PREFIX + name, arr) for name, arr in sd["tensors"].items()]
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
    write_safetensors(path, tensors, metadata={META_KEY: meta_json})


@dataclass
class Checkpoint:
    """A checkpoint read into host memory and checked, not yet applied to anything."""

    path: str
    config: GPTConfig
    step: int
    extra: dict
    rng_state: dict
    optimizer_hyper: dict | None
    model_tensors: dict = field(repr=False)  # parameter name -> host array
    optim_tensors: dict = field(repr=False)  # optimiser tensor name -> host array

    def build_model(self, device: str | None = None) -> GPTModel:
        """A GPTModel of the saved config holding the saved weights, on ``device``."""
        with backend.device(device or backend.get_device()):
            model = GPTModel(self.config, init=False)
        self.apply(model, restore_rng=False)
        return model

    def apply(self, model, optimizer=None, restore_rng: bool = True) -> None:
        """Load the weights (and the optimiser state, and the dropout RNG) into ``model``
        (and ``optimizer``). Raises ValueError if they do not fit; then nothing changed."""
        if optimizer is not None and self.optimizer_hyper is None:
            raise ValueError(f"{self.path}: an optimizer was given but the checkpoint holds no optimizer state")
        before = model.state_dict()  # the arrays themselves: loading replaces, never overwrites, them
        try:
            model.load_state_dict(self.model_tensors)
        except ValueError as e:
            raise ValueError(f"checkpoint {self.path} does not fit the model: {e}") from e
        if optimizer is not None:
            try:
                optimizer.load_state_dict({"hyper": self.optimizer_hyper, "tensors": self.optim_tensors})
            except (ValueError, KeyError, TypeError) as e:
                for name, p in model.named_parameters():  # leave the model as it was
                    p.data = before[name]
                raise ValueError(f"checkpoint {self.path}: its optimizer state does not fit the optimizer: {e}") from e
        if restore_rng:
            backend.set_rng_state(self.rng_state)


def read_checkpoint(path) -> Checkpoint:
    """Read and check a checkpoint written by ``save_checkpoint`` (ValueError saying why not)."""
    path = os.fspath(path)
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
    try:
        config = GPTConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: the checkpoint's model config is invalid ({e})") from e
    return Checkpoint(
        path=path, config=config, step=int(meta["step"]), extra=meta["extra"], rng_state=meta["rng_state"],
        optimizer_hyper=meta.get("optimizer"),
        model_tensors={k[len(MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)},
        optim_tensors={k[len(OPTIM_PREFIX):]: v for k, v in tensors.items() if k.startswith(OPTIM_PREFIX)},
    )


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
    saved = read_checkpoint(path)
    if model is None:
        with backend.device(device or backend.get_device()):
            model = GPTModel(saved.config, init=False)
    elif device is not None:
        model.to(device)
    saved.apply(model, optimizer, restore_rng)
    return {
        "model": model,
        "config": saved.config,
        "step": saved.step,
        "extra": saved.extra,
        "rng_state": saved.rng_state,
        "optimizer_hyper": saved.optimizer_hyper,
    }
