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

import os

import numpy

from . import backend
from .config import LlamaConfig
from .hf_layout import CONFIG_FILE, LLAMA_TYPES, _read_json, is_transposed, llama_tensor_shapes
from .hf_layout import llama_config_to_hf  # noqa: F401  (public here as before)
from .llama import LlamaModel
from .model import GPTModel
from .weights import WeightFiles

_IGNORED = (".rotary_emb.inv_freq",)  # buffers some old files carry: recomputed, never loaded


# -- config.json (the tensor table and writing are in numpygpt.hf_layout) ---------------------- ------------------------------------------------------------------------------

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
        **{k: v for k, v in _numpygpt_section(hf).items() if k in ("num_classes", "readout", "pad_id")},
    )


def _numpygpt_section(hf: dict) -> dict:
    """config.json's ``numpygpt`` entry: what HF's config cannot say (a classifier's head)."""
    extras = hf.get("numpygpt", {})
    if not isinstance(extras, dict):
        raise ValueError(f"config.json's 'numpygpt' entry must be an object, got a {type(extras).__name__}")
    return extras


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
    if cfg.tie_weights and cfg.num_classes is None:
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
    written to a temporary and renamed. A GPTModel is written in GPT-2's layout. A LoRA
    model must be merged first (or saved with ``numpygpt.lora.save_merged``)."""
    if isinstance(model, GPTModel):
        if max_shard_bytes is not None:
            raise ValueError("GPT-2 directories are written as one model.safetensors (no max_shard_bytes)")
        return model.save_pretrained(directory)
    return model.save_pretrained(directory, max_shard_bytes)
