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
  the step, the optimiser's hyperparameters, the dropout RNG state, the caller's
  ``extra`` (the training position and history: ``numpygpt.train.TrainState``) and a
  CRC-32 of every tensor's bytes (``checksums``), verified at load. Files written
  before checksums existed (same format version 1) load unverified.

safetensors holds plain arrays and strings, so opening a checkpoint cannot run code, as
unpickling a file can. Writing goes through ``numpygpt.fileio``: a temporary file in the
same directory, fsync'ed and renamed over ``path``, so a crash mid-save leaves the
previous checkpoint as it was.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field

import numpy as np
from safetensors import safe_open

from . import backend
from .config import EncDecConfig, GPTConfig, LlamaConfig, config_from_dict, lora_tensor_shapes
from .fileio import write_safetensors
from .families import build_model, parameter_shapes

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
    from .lora import check_unmerged

    check_unmerged(model, "save a checkpoint")  # merged weights plus adapters would count them twice
    tensors = [(MODEL_PREFIX + name, p.data) for name, p in model.named_parameters()]
    hyper = None
    if optimizer is not None:
        sd = optimizer.state_dict()
        hyper = sd["hyper"]
        tensors += [(OPTIM_PREFIX + name, arr) for name, arr in sd["tensors"].items()]
    tensors = [(name, np.ascontiguousarray(backend.to_host(a))) for name, a in tensors]
    meta = {
        "format": "numpygpt-checkpoint",
        "version": FORMAT_VERSION,
        "config": model.cfg.to_dict(),
        "step": int(step),
        "optimizer": hyper,
        "rng_state": backend.get_rng_state(),
        "extra": {} if extra is None else extra,
        "checksums": {name: _checksum(a) for name, a in tensors},  # verified at load
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
    config: GPTConfig | LlamaConfig | EncDecConfig
    step: int
    extra: dict
    rng_state: dict
    optimizer_hyper: dict | None
    model_tensors: dict = field(repr=False)  # parameter name -> host array
    optim_tensors: dict = field(repr=False)  # optimiser tensor name -> host array

    def build_model(self, device: str | None = None):
        """The model of the saved config (its family by ``model_type``) holding the saved
        weights, on ``device``."""
        with backend.device(device or backend.get_device()):
            model = build_model(self.config, init=False)
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
    """Read and check a checkpoint written by ``save_checkpoint`` (ValueError saying why not).

    The order bounds what a damaged or crafted file can cost: the metadata is parsed and
    checked, then the model config it claims is compared with the tensor table of the
    header (names and shapes, no data read), and only then are the tensors read, each
    verified against its stored checksum.
    """
    path = os.fspath(path)
    try:
        f = safe_open(path, framework="numpy")
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:  # safetensors' own error type: bad header, truncated data...
        raise ValueError(f"{path} is not a readable checkpoint: corrupt, truncated or not safetensors ({e})") from e
    with f:
        meta = _check_metadata(path, f.metadata() or {})
        try:
            config = config_from_dict(meta["config"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: the checkpoint's model config is invalid ({e})") from e
        keys = list(f.keys())
        odd = [k for k in keys if not k.startswith((MODEL_PREFIX, OPTIM_PREFIX))]
        if odd:
            raise ValueError(f"{path}: unexpected tensors {odd[:5]} in the checkpoint")
        _check_tensor_table(path, config, f, [k for k in keys if k.startswith(MODEL_PREFIX)])
        try:
            tensors = {k: f.get_tensor(k) for k in keys}
        except Exception as e:
            raise ValueError(f"{path}: cannot read the tensors: truncated or corrupt ({e})") from e
    _verify_checksums(path, meta.get("checksums"), tensors)
    return Checkpoint(
        path=path, config=config, step=meta["step"], extra=meta["extra"], rng_state=meta["rng_state"],
        optimizer_hyper=meta.get("optimizer"),
        model_tensors={k[len(MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)},
        optim_tensors={k[len(OPTIM_PREFIX):]: v for k, v in tensors.items() if k.startswith(OPTIM_PREFIX)},
    )


def _check_metadata(path: str, raw_meta: dict) -> dict:
    """The parsed ``numpygpt`` metadata, every field the loader uses checked for its type."""
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
    step = meta["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{path}: the checkpoint's step must be an integer >= 0, got {step!r}")
    if not isinstance(meta["extra"], dict):
        raise ValueError(f"{path}: the checkpoint's 'extra' must be an object, got {type(meta['extra']).__name__}")
    if meta.get("optimizer") is not None and not isinstance(meta["optimizer"], dict):
        raise ValueError(f"{path}: the checkpoint's optimizer state must be an object")
    if meta.get("checksums") is not None and not isinstance(meta["checksums"], dict):
        raise ValueError(f"{path}: the checkpoint's checksums must be an object")
    try:
        backend.check_rng_state(meta["rng_state"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    return meta


def _check_tensor_table(path: str, config: GPTConfig, f, model_keys: list) -> None:
    """The model tensors the header lists must be exactly those ``config`` needs. The
    count is compared first, so a config claiming 100,000 layers costs nothing."""
    if isinstance(config, (LlamaConfig, EncDecConfig)):
        check_count = _check_llama_count if isinstance(config, LlamaConfig) else _check_encdec_count
        check_count(path, config, len(model_keys))
        _check_shapes(path, f, model_keys, {**parameter_shapes(config), **_lora_shapes(config)})
        return
    C, L = config.emb_dim, config.n_layers
    per_block = 11 + (1 if config.qkv_bias else 0)  # ln_1 2, c_attn 1 (+ bias), c_proj 2, ln_2 2, mlp 4
    if config.num_classes is not None:
        head = 2  # score.weight, score.bias
    else:
        head = 0 if config.tie_weights else 1
    if config.lora_rank is not None:  # lora_A and lora_B on 4 Linears a block, and on a head that is not wte
        per_block += 8
        head += 0 if head == 0 else 2
    expected_count = 4 + L * per_block + head
    if len(model_keys) != expected_count:
        raise ValueError(
            f"{path}: the metadata describes a model of {expected_count} tensors (n_layers={L}, emb_dim={C}), "
            f"but the file holds {len(model_keys)} model tensors"
        )
    _check_shapes(path, f, model_keys, {**parameter_shapes(config), **_lora_shapes(config)})


def _lora_shapes(config) -> dict:
    """The LoRA adapters' tensor shapes of a config with lora_rank (none without)."""
    return {} if config.lora_rank is None else lora_tensor_shapes(config)


def _check_llama_count(path: str, config: LlamaConfig, count: int) -> None:
    """A Llama/Qwen3 checkpoint's tensor count, from the config's numbers alone."""
    lora = config.lora_rank is not None  # lora_A and lora_B on the 7 projections and an untied head
    per_block = 9 + (2 if config.qk_norm else 0) + (14 if lora else 0)  # 2 norms, q k v o (+ q/k_norm), gate up down
    if config.num_classes is not None:
        head = 2 + (2 if lora else 0)  # score.weight, score.bias (+ its adapter)
    else:
        head = 0 if config.tie_weights else 1 + (2 if lora else 0)
    expected = 2 + config.n_layers * per_block + head  # embed_tokens, norm
    if count != expected:
        raise ValueError(f"{path}: the metadata describes a {config.model_type} model of {expected} tensors "
                         f"(n_layers={config.n_layers}), but the file holds {count} model tensors")


def _check_encdec_count(path: str, config: EncDecConfig, count: int) -> None:
    """An encoder-decoder checkpoint's tensor count, from the config's numbers alone."""
    lora = config.lora_rank is not None  # lora_A and lora_B on 4 Linears an encoder block, 7 a decoder block
    enc_block = 12 + (8 if lora else 0)  # ln_1 2, ln_2 2, c_attn 2, c_proj 2, mlp 4
    dec_block = 20 + (14 if lora else 0)  # 3 norms 6, self-attention 4, cross-attention 6, mlp 4
    embeddings = 1 if config.share_embeddings else 2
    ends = (4 if config.norm_first else 0) + (0 if config.tie_weights else 1 + (2 if lora else 0))
    expected = embeddings + config.n_enc_layers * enc_block + config.n_dec_layers * dec_block + ends
    if count != expected:
        raise ValueError(f"{path}: the metadata describes an encoder-decoder of {expected} tensors "
                         f"(n_enc_layers={config.n_enc_layers}, n_dec_layers={config.n_dec_layers}), "
                         f"but the file holds {count} model tensors")


def _check_shapes(path: str, f, model_keys: list, shapes: dict) -> None:
    """Every model tensor of the file is one of ``shapes`` (parameter name -> shape), in that shape."""
    expected = {MODEL_PREFIX + k: v for k, v in shapes.items()}
    problems = []
    for key in model_keys:
        got = tuple(f.get_slice(key).get_shape())
        if key not in expected:
            problems.append(f"unknown tensor {key!r}")
        elif got != tuple(expected[key]):
            problems.append(f"tensor {key!r} has shape {got}, the config needs {tuple(expected[key])}")
    if problems:
        raise ValueError(f"{path}: the tensors do not match the model config in the metadata: "
                         + "; ".join(problems[:5]))


def _checksum(host_array) -> str:
    """CRC-32 of the array's bytes as written (C order, little-endian)."""
    a = np.ascontiguousarray(host_array)
    a = a.astype(a.dtype.newbyteorder("<"), copy=False)
    return f"crc32:{zlib.crc32(a.reshape(-1).view(np.uint8)):08x}"


def _verify_checksums(path: str, checksums, tensors: dict) -> None:
    """Checkpoints written before checksums were stored have none: they load unverified."""
    if checksums is None:
        return
    missing = [k for k in tensors if k not in checksums]
    if missing:
        raise ValueError(f"{path}: no checksum stored for tensor {missing[0]!r}")
    for name, arr in tensors.items():
        if _checksum(arr) != checksums[name]:
            raise ValueError(f"{path}: tensor {name!r} is damaged: its data do not match the checksum "
                             "stored when it was saved")


def load_checkpoint(path, model=None, optimizer=None, device: str | None = None,
                    restore_rng: bool = True) -> dict:
    """Read a checkpoint written by ``save_checkpoint``.

    model: load the weights into this model (names and shapes must match; arrays take
        the model's dtype); None builds the saved config's model (``families.build_model``).
    optimizer: restore its state too (the checkpoint must hold optimiser state).
    device: 'cpu' or 'cuda' for the model (a given model is moved there first, and moved
        back if the checkpoint does not fit it);
        None keeps a given model where it is and builds a new one on the current device.
    restore_rng: put the dropout generators back in their saved state.

    Returns ``{"model", "config", "step", "extra", "rng_state", "optimizer_hyper"}``.
    Raises ValueError for a corrupt or foreign file and for a model or optimiser that
    does not fit; then neither the model nor the optimiser is changed.
    """
    saved = read_checkpoint(path)
    moved_from = None  # where a given model was, if it was moved for the load
    if model is None:
        with backend.device(device or backend.get_device()):
            model = build_model(saved.config, init=False)
    elif device is not None:
        first = next(iter(model.parameters()), None)
        here = backend.device_of(first.data) if first is not None else None
        if here != device:
            model.to(device)
            moved_from = here
    try:
        saved.apply(model, optimizer, restore_rng)
    except ValueError:
        if moved_from is not None:
            model.to(moved_from)  # a load that does not fit leaves the model where it was, too
        raise
    return {
        "model": model,
        "config": saved.config,
        "step": saved.step,
        "extra": saved.extra,
        "rng_state": saved.rng_state,
        "optimizer_hyper": saved.optimizer_hyper,
    }
