"""Hugging Face model directories for every family: ``from_pretrained`` / ``save_pretrained``.

    model = numpygpt.from_pretrained("path/to/Llama-3.2-1B")   # config.json + model.safetensors
    numpygpt.save_pretrained(model, "out/")                     # the same layout back

``config.json``'s ``model_type`` picks the family: "gpt2" goes through
``numpygpt.pretrained`` (GPT-2's table), "llama" and "qwen3" build a ``LlamaModel``. The
weights may be one ``model.safetensors`` or shards listed by
``model.safetensors.index.json``, in bfloat16, float16, float32 or float64; they are
converted to the ``dtype`` asked for (float32 or float64) one tensor at a time
(``numpygpt.weights``).

numpygpt's parameter names are HF's; the only difference is the layout of linear
weights: ``torch.nn.Linear`` stores (out, in) and computes x W^T, ``numpygpt.nn.Linear``
stores (in, out) and computes x W, so every ``*_proj.weight`` is transposed on the way
in and out. The embedding, the norms and ``lm_head`` (V, C) are the same in both.
"""

from __future__ import annotations

import json
import math
import os

import numpy

from . import backend
from .config import LlamaConfig
from .fileio import atomic_write, write_safetensors
from .llama import LlamaModel
from .model import GPTModel
from .weights import INDEX_FILE, WEIGHTS_FILE, WeightFiles

CONFIG_FILE = "config.json"
LLAMA_TYPES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_IGNORED = (".rotary_emb.inv_freq",)  # buffers some old files carry: recomputed, never loaded


# -- the table --------------------------------------------------------------------------------

def llama_tensor_shapes(cfg: LlamaConfig) -> dict:
    """name -> shape of every tensor of a Llama/Qwen3 checkpoint for ``cfg``, in HF's layout
    ((out, in) for linear weights), in model order; ``lm_head.weight`` only when untied."""
    V, C, H, hs = cfg.vocab_size, cfg.emb_dim, cfg.hidden_dim, cfg.head_dim
    NH, NKV = cfg.n_heads, cfg.n_kv_heads
    shapes = {"model.embed_tokens.weight": (V, C)}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (C,)
        shapes[p + "self_attn.q_proj.weight"] = (NH * hs, C)
        shapes[p + "self_attn.k_proj.weight"] = shapes[p + "self_attn.v_proj.weight"] = (NKV * hs, C)
        shapes[p + "self_attn.o_proj.weight"] = (C, NH * hs)
        if cfg.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = shapes[p + "self_attn.k_norm.weight"] = (hs,)
        shapes[p + "post_attention_layernorm.weight"] = (C,)
        shapes[p + "mlp.gate_proj.weight"] = shapes[p + "mlp.up_proj.weight"] = (H, C)
        shapes[p + "mlp.down_proj.weight"] = (C, H)
    shapes["model.norm.weight"] = (C,)
    if not cfg.tie_weights:
        shapes["lm_head.weight"] = (V, C)
    return shapes


def is_transposed(name: str) -> bool:
    """Whether HF stores this tensor transposed from numpygpt's layout (the linear weights)."""
    return name.endswith("_proj.weight")


# -- config.json ------------------------------------------------------------------------------

def llama_config_from_hf(hf: dict, dtype: str = "float32") -> LlamaConfig:
    """LlamaConfig from a Llama or Qwen3 ``config.json``. Options that change the forward
    pass in ways this model does not compute (biases, another activation, sliding-window
    attention, other RoPE scalings) are refused, all of them in one error."""
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings")
    problems = [f"missing field {k!r}" for k in required if k not in hf]
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act is {hf['hidden_act']!r}; the SwiGLU here uses 'silu'")
    problems += [f"{k} is true: this model has no biases" for k in ("attention_bias", "mlp_bias") if hf.get(k)]
    if hf.get("use_sliding_window"):
        problems.append("use_sliding_window is true: sliding-window attention is not implemented")
    if problems:
        raise ValueError(f"config.json does not describe a {hf.get('model_type')} model numpygpt can build: "
                         + "; ".join(problems))
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})  # transformers 5 / 4 spellings
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    return LlamaConfig(
        model_type=hf["model_type"], vocab_size=hf["vocab_size"], context_length=hf["max_position_embeddings"],
        emb_dim=hf["hidden_size"], n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"], head_dim=hf.get("head_dim"),
        hidden_dim=hf["intermediate_size"], n_layers=hf["num_hidden_layers"], rope_theta=theta,
        rope_scaling=rope or None, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_weights=hf.get("tie_word_embeddings", False), dtype=dtype,
    )


def llama_config_to_hf(cfg: LlamaConfig) -> dict:
    """The ``config.json`` of HF's LlamaForCausalLM / Qwen3ForCausalLM for ``cfg``."""
    hf = {
        "architectures": [LLAMA_TYPES[cfg.model_type]], "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.context_length,
        "hidden_size": cfg.emb_dim, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
        "tie_word_embeddings": cfg.tie_weights, "torch_dtype": cfg.dtype,
    }
    if cfg.model_type == "llama":
        hf["mlp_bias"] = False
    return hf


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{os.path.dirname(path) or '.'} has no {os.path.basename(path)}: "
                                "a model directory holds config.json and model.safetensors (or its shards)")
    with open(path, encoding="utf-8") as fh:
        hf = json.load(fh)
    if not isinstance(hf, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return hf


# -- loading ----------------------------------------------------------------------------------

def from_pretrained(path, dtype: str = "float32", device: str | None = None):
    """The model of a Hugging Face directory, by ``config.json``'s ``model_type``: a GPTModel
    for "gpt2" (``numpygpt.pretrained``), a LlamaModel for "llama" and "qwen3". A path that
    is not a directory is taken as a GPT-2 name ('gpt2', 'gpt2-medium', ...), as
    ``GPTModel.from_pretrained`` takes it.

    Weights are converted to ``dtype`` (float32 or float64; bfloat16 and float16 files are
    widened exactly) and moved to ``device`` (default: the backend's current one) one
    tensor at a time. Every tensor name, shape and dtype is checked before any data is
    read; a missing, unknown or misshaped tensor is one ValueError listing all of them, and
    no model is returned half loaded. The model comes back in eval mode.
    """
    directory = os.path.expanduser(os.fspath(path))
    if not os.path.isdir(directory):  # a GPT-2 hub name ('gpt2', ...), fetched once into the cache
        return GPTModel.from_pretrained(os.fspath(path), dtype=dtype, device=device)
    hf = _read_json(os.path.join(directory, CONFIG_FILE))
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        return GPTModel.from_pretrained(directory, dtype=dtype, device=device)
    if model_type not in LLAMA_TYPES:
        raise ValueError(f"{directory}: unknown model_type {model_type!r} in config.json; numpygpt loads "
                         f"gpt2, {', '.join(LLAMA_TYPES)}")
    cfg = llama_config_from_hf(hf, _dtype_name(dtype))
    files = WeightFiles(directory)
    _check_tensors(files, cfg, directory)
    target = device if device is not None else backend.get_device()
    with backend.device(target):
        model = LlamaModel(cfg, init=False)
    for name, p in model.named_parameters():
        host = files.read(name)
        host = host.T if is_transposed(name) else host
        p.data, p.grad = backend.to_device(numpy.ascontiguousarray(host, dtype=cfg.dtype), device_name=target), None
    return model.eval()


def _dtype_name(dtype) -> str:
    try:
        return numpy.dtype(dtype).name
    except TypeError as e:
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}") from e


def _check_tensors(files: WeightFiles, cfg: LlamaConfig, directory: str) -> None:
    """The files hold exactly the model's tensors, in the right shapes (headers only)."""
    expected = llama_tensor_shapes(cfg)
    found = {k for k in files.keys() if not k.endswith(_IGNORED)}
    if cfg.tie_weights:
        found.discard("lm_head.weight")  # a tied head is the embedding (as HF ties it, a stored copy is unused)
    problems = [f"missing tensor {n!r} (shape {s})" for n, s in expected.items() if n not in found]
    problems += [f"unknown tensor {k!r}" for k in sorted(found - set(expected))]
    problems += [f"tensor {n!r} has shape {files.shape(n)}, expected {s}"
                 for n, s in expected.items() if n in found and files.shape(n) != s]
    if problems:
        raise ValueError(f"{directory}: the weights do not match a {cfg.model_type} with n_layers={cfg.n_layers}, "
                         f"hidden_size={cfg.emb_dim}, vocab_size={cfg.vocab_size}:\n  " + "\n  ".join(problems))


# -- saving -----------------------------------------------------------------------------------

def save_pretrained(model, directory, max_shard_bytes: int | None = None) -> None:
    """Write ``model`` as a Hugging Face directory: ``config.json`` and ``model.safetensors``,
    or with ``max_shard_bytes`` shards ``model-0000i-of-0000n.safetensors`` of at most that
    size (a bigger tensor gets a shard of its own) and ``model.safetensors.index.json``.
    Tensors are in the model's dtype, copied to the host one at a time; each file is
    written to a temporary and renamed. A GPTModel is written in GPT-2's layout."""
    from .lora import LORA_SUFFIXES, is_merged, lora_layers

    if isinstance(model, GPTModel):
        if max_shard_bytes is not None:
            raise ValueError("GPT-2 directories are written as one model.safetensors (no max_shard_bytes)")
        return model.save_pretrained(directory)
    if lora_layers(model) and not is_merged(model):
        raise ValueError("save_pretrained writes plain weights: call merge_lora(model) first to fold the LoRA "
                         "adapters in (or keep them apart with save_lora / save_checkpoint)")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tensors = [(n, p.data.T if is_transposed(n) else p.data) for n, p in model.named_parameters()
               if not n.endswith(LORA_SUFFIXES)]  # merged adapters are inside the weights
    if list(dict(tensors)) != list(llama_tensor_shapes(model.cfg)):
        raise RuntimeError("LlamaModel's parameter names no longer match the Hugging Face table")
    shards = _shards(tensors, max_shard_bytes)
    _remove_other_layout(directory, sharded=len(shards) > 1)
    if len(shards) == 1:
        write_safetensors(os.path.join(directory, WEIGHTS_FILE), tensors, metadata={"format": "pt"})
    else:
        _write_shards(directory, shards)
    with atomic_write(os.path.join(directory, CONFIG_FILE)) as fh:
        hf = llama_config_to_hf(model.cfg.replace(lora_rank=None, lora_alpha=None))
        fh.write((json.dumps(hf, indent=2) + "\n").encode("utf-8"))


def _shards(tensors: list, max_bytes: int | None) -> list:
    """The (name, array) list cut, in order, into runs of at most ``max_bytes`` (one run if None)."""
    if max_bytes is None:
        return [tensors]
    shards, size = [[]], 0
    for name, a in tensors:
        nbytes = int(a.size) * a.dtype.itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, a))
        size += nbytes
    return shards


def _write_shards(directory: str, shards: list) -> None:
    n = len(shards)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        filename = f"model-{i:05d}-of-{n:05d}.safetensors"
        write_safetensors(os.path.join(directory, filename), shard, metadata={"format": "pt"})
        for name, a in shard:
            weight_map[name] = filename
            total += int(a.size) * a.dtype.itemsize
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with atomic_write(os.path.join(directory, INDEX_FILE)) as fh:
        fh.write((json.dumps(index, indent=2) + "\n").encode("utf-8"))


def _remove_other_layout(directory: str, sharded: bool) -> None:
    """Before writing one layout, remove the other's files from an earlier save, so that a
    directory never holds two versions of the weights."""
    single, index = os.path.join(directory, WEIGHTS_FILE), os.path.join(directory, INDEX_FILE)
    old = [single] if sharded else []
    if os.path.isfile(index):
        try:
            old += [os.path.join(directory, os.path.basename(f)) for f in set(_read_json(index)["weight_map"].values())]
        except (ValueError, KeyError, TypeError, AttributeError):
            pass  # not an index we wrote: leave its shards, remove the index itself
        old.append(index)
    for path in old:
        if os.path.isfile(path):
            os.remove(path)
