"""Hugging Face's Llama 3 / Qwen3 directory layout, for writing: the tensor table, config.json
and the (sharded) safetensors files.

``numpygpt.hf`` reads these directories and builds the model; this module only describes and
writes them, so the model itself (``LlamaModel.save_pretrained``) can write its directory
without importing the loader that imports it.

numpygpt's parameter names are HF's; the only difference is the layout of linear weights:
``torch.nn.Linear`` stores (out, in), ``numpygpt.nn.Linear`` (in, out), so every
``*_proj.weight`` is transposed on the way out (and in, in ``numpygpt.hf``).
"""

from __future__ import annotations

import json
import os

from .config import LlamaConfig
from .fileio import LazyTensor, atomic_write, write_safetensors
from .weights import INDEX_FILE, WEIGHTS_FILE

__all__ = ["CONFIG_FILE", "LLAMA_TYPES", "llama_tensor_shapes", "is_transposed", "llama_config_to_hf",
           "write_pretrained"]

CONFIG_FILE = "config.json"
LLAMA_TYPES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


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
    if cfg.num_classes is not None:  # numpygpt's classifier head, (in, out) with a bias, as GPT-2's
        shapes["score.weight"], shapes["score.bias"] = (C, cfg.num_classes), (cfg.num_classes,)
    elif not cfg.tie_weights:
        shapes["lm_head.weight"] = (V, C)
    return shapes


def is_transposed(name: str) -> bool:
    """Whether HF stores this tensor transposed from numpygpt's layout (the linear weights)."""
    return name.endswith("_proj.weight")


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
    if cfg.num_classes is not None:
        hf["numpygpt"] = {"num_classes": cfg.num_classes, "readout": cfg.readout, "pad_id": cfg.pad_id}
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


def write_pretrained(model, directory, tensors, max_shard_bytes: int | None = None) -> None:
    """``config.json`` (from ``model.cfg``, without LoRA) and the weights of a LlamaModel:
    ``tensors`` is (name, array or ``fileio.LazyTensor``) in numpygpt's layout for every
    parameter but the adapters; linear weights are transposed to HF's on the way."""
    directory = os.fspath(directory)
    tensors = [(n, _transposed(a) if is_transposed(n) else a) for n, a in tensors]
    if list(dict(tensors)) != list(llama_tensor_shapes(model.cfg)):
        raise RuntimeError("LlamaModel's parameter names no longer match the Hugging Face table")
    os.makedirs(directory, exist_ok=True)
    shards = _shards(tensors, max_shard_bytes)
    _remove_other_layout(directory, sharded=len(shards) > 1)
    if len(shards) == 1:
        write_safetensors(os.path.join(directory, WEIGHTS_FILE), tensors, metadata={"format": "pt"})
    else:
        _write_shards(directory, shards)
    with atomic_write(os.path.join(directory, CONFIG_FILE)) as fh:
        hf = llama_config_to_hf(model.cfg.replace(lora_rank=None, lora_alpha=None))
        fh.write((json.dumps(hf, indent=2) + "\n").encode("utf-8"))


def _transposed(a):
    """a.T, also for a LazyTensor (transposed when it is made)."""
    if isinstance(a, LazyTensor):
        return LazyTensor(a.shape[::-1], a.dtype, lambda: a.make().T)
    return a.T


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
