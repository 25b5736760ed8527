"""LoRA on a whole GPTModel: apply, merge, unmerge, save and load adapters, save merged.

    apply_lora(model, rank=16, alpha=16, seed=123)   # adapters on every block Linear and the head
    ...train: only lora_A / lora_B have requires_grad...
    save_lora(model, "adapters.safetensors")          # the adapters alone (a few MB)
    save_merged(model, "out/")                        # a plain model with them folded in, model unchanged
    merge_lora(model)                                 # fold into the weights for inference

What gets an adapter is the model's ``lora_targets()``: for GPT-2 in every block
``attn.c_attn`` (three, for Q, K and V: splits=3), ``attn.c_proj``, ``mlp.c_fc`` and
``mlp.c_proj``; for Llama and Qwen3 every ``q/k/v/o_proj`` and ``gate/up/down_proj``; and
the head: a classifier's ``score`` or an untied language-model head (a tied one is the
token embedding and stays frozen).
Everything else is frozen. The layer itself is numpygpt.nn.LoRALinear / LoRAOutputHead.

The model's config records ``lora_rank`` and ``lora_alpha``, so ``save_checkpoint`` /
``load_checkpoint`` rebuild a LoRA model with its adapters.
"""

from __future__ import annotations

import json
import os

from safetensors import safe_open

from . import backend, pretrained
from .config import lora_tensor_shapes  # computed from the config alone; public here as before
from .fileio import LazyTensor, write_safetensors
from .nn import LoRALinear, LoRAOutputHead, OutputHead
from .nn.lora import LORA_SUFFIXES, is_merged, lora_layers  # beside the layers; public here as before

__all__ = ["apply_lora", "merge_lora", "unmerge_lora", "save_lora", "load_lora", "save_merged", "lora_layers",
           "lora_parameters", "lora_tensor_shapes", "ADAPTERS_FILE"]

LORA_FORMAT = "numpygpt-lora"
ADAPTERS_FILE = "lora-adapters.safetensors"  # save_merged's adapters, beside the merged model


def lora_parameters(model) -> list:
    """(name, Parameter) of every adapter tensor, in model order."""
    return [(n, p) for n, p in model.named_parameters() if n.endswith(LORA_SUFFIXES)]


def apply_lora(model, rank: int, alpha: float, seed: int | None = None):
    """Wrap every Linear of the blocks (``c_attn`` with one adapter each for Q, K and V) and
    the head (a classifier's ``score`` or an untied LM head) in LoRA layers of this rank and
    alpha, and freeze every other parameter. A fresh model computes what it did before
    (B starts at zero). ``seed`` draws every A from one generator. Returns the model.

    Raises ValueError for rank < 1, alpha <= 0, or a model that already has adapters.
    """
    if lora_layers(model):
        raise ValueError("this model already has LoRA adapters: apply_lora was called twice "
                         f"(rank {model.cfg.lora_rank}, alpha {model.cfg.lora_alpha})")
    cfg = model.cfg.replace(lora_rank=rank, lora_alpha=alpha)  # validates rank and alpha
    rng = backend.host_rng(seed)

    def seed_next():
        return int(rng.integers(2**31))

    for p in model.parameters():
        p.requires_grad, p.grad = False, None
    for owner, attribute, splits in model.lora_targets():  # in model order: one seed each
        layer = getattr(owner, attribute)
        if isinstance(layer, OutputHead):
            adapted = LoRAOutputHead(layer, rank, alpha, seed=seed_next())
        else:
            adapted = LoRALinear(layer, rank, alpha, splits=splits, seed=seed_next())
        setattr(owner, attribute, adapted)
    model.cfg = cfg
    return model


def merge_lora(model):
    """Fold every adapter into its weight (W += s A B) for inference: outputs unchanged up
    to float rounding and the forward skips the adapters. Returns the model."""
    layers = _require_lora(model)
    for layer in layers:
        layer.merge()
    return model


def unmerge_lora(model):
    """Undo merge_lora (W -= s A B), so the adapters can train again. Returns the model."""
    layers = _require_lora(model)
    for layer in layers:
        layer.unmerge()
    return model


def _require_lora(model) -> list:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("this model has no LoRA adapters (call apply_lora first)")
    return layers


def check_unmerged(model, action: str) -> None:
    """A merged model's weights already hold the adapters: saving them with the adapters
    would count the adapters twice when loaded."""
    if is_merged(model):
        raise ValueError(f"cannot {action} while LoRA is merged into the weights: call unmerge_lora(model) first")


def _saved_alone(model) -> list:
    """(name, Parameter) that save_lora writes: the adapters, and a classifier's head (drawn
    by to_classifier, so no pretrained file has it)."""
    head = [("score.weight", model.score.weight), ("score.bias", model.score.bias)] if model.is_classifier else []
    return lora_parameters(model) + head


def _saved_alone_shapes(cfg) -> dict:
    shapes = lora_tensor_shapes(cfg)
    if cfg.num_classes is not None:
        shapes.update({"score.weight": (cfg.emb_dim, cfg.num_classes), "score.bias": (cfg.num_classes,)})
    return shapes


def save_lora(model, path) -> None:
    """Write the adapters (``*.lora_A``, ``*.lora_B``) to a small safetensors file, with the
    rank, alpha and model config in its metadata. A classifier's head (``score.weight``,
    ``score.bias``) goes in too: to_classifier drew it, no pretrained file holds it. Atomic:
    written to a temporary file and renamed."""
    _require_lora(model)
    check_unmerged(model, "save the adapters")
    meta = {"format": LORA_FORMAT, "rank": model.cfg.lora_rank, "alpha": model.cfg.lora_alpha,
            "config": model.cfg.to_dict()}
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_safetensors(path, [(n, p.data) for n, p in _saved_alone(model)], metadata={"numpygpt": json.dumps(meta)})


def save_merged(model, directory) -> str | None:
    """Write ``model`` to ``directory`` as ``save_pretrained`` does (config.json and
    model.safetensors: GPT-2's layout for GPT-2, Hugging Face's Llama/Qwen3 layout for
    those, which ``numpygpt.from_pretrained`` reads), every LoRA adapter
    folded into its weight (W + s A B), and the adapters alone (``save_lora``) to
    ``directory/lora-adapters.safetensors`` (``ADAPTERS_FILE``); returns that path.

    The model is not changed: each merged weight is a new array made while it is written
    (one at a time), the same additions ``merge_lora`` makes, so the file holds the bits a
    merged model would have and the model keeps its own, where a merge then unmerge
    (W + d - d) leaves W off by rounding. A model without adapters is saved as it is
    (returns None). Raises ValueError for a merged model, whose weights already hold the
    adapters: call ``unmerge_lora`` first, or ``save_pretrained``.
    """
    layers = lora_layers(model)
    if not layers:
        model.save_pretrained(directory)
        return None
    check_unmerged(model, "save the merged weights")
    merged = {id(layer.weight): layer for layer in layers}
    tensors = [(name, LazyTensor(p.shape, p.dtype, merged[id(p)].merged_weight) if id(p) in merged else p.data)
               for name, p in pretrained.plain_weights(model)]
    model.write_pretrained(directory, tensors)
    path = os.path.join(os.fspath(directory), ADAPTERS_FILE)
    save_lora(model, path)
    return path


def load_lora(model, path):
    """Load adapters saved by ``save_lora`` into ``model`` (typically the pretrained model,
    after ``to_classifier`` with the same number of classes for a classifier, whose head
    is loaded too). A model without adapters gets them first (``apply_lora`` with the
    file's rank and alpha); one with adapters must have the same rank and alpha. Every
    name and shape is checked before anything changes. Returns the model."""
    path = os.fspath(path)
    try:
        with safe_open(path, framework="numpy") as f:
            raw = (f.metadata() or {}).get("numpygpt")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:  # safetensors' own error type
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from e
    try:
        meta = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        meta = {}
    if meta.get("format") != LORA_FORMAT:
        raise ValueError(f"{path} is not a numpygpt LoRA adapter file (written by save_lora)")
    rank, alpha = meta["rank"], meta["alpha"]
    layers = lora_layers(model)
    if layers and (model.cfg.lora_rank, model.cfg.lora_alpha) != (rank, alpha):
        raise ValueError(f"{path} holds rank {rank}, alpha {alpha} adapters; the model has rank "
                         f"{model.cfg.lora_rank}, alpha {model.cfg.lora_alpha}")
    check_unmerged(model, "load adapters")
    _check_shapes(path, _saved_alone_shapes(model.cfg.replace(lora_rank=rank, lora_alpha=alpha)), tensors)
    if not layers:
        apply_lora(model, rank, alpha)
    params = dict(_saved_alone(model))
    for name, p in params.items():
        p.data = backend.to_device(tensors[name], dtype=p.dtype, device_name=backend.device_of(p.data)).copy()
        p.grad = None
    return model


def _check_shapes(path: str, expected: dict, tensors: dict) -> None:
    problems = [f"missing {n}" for n in expected if n not in tensors]  # e.g. a classifier's file for an LM
    problems += [f"unexpected {n}" for n in tensors if n not in expected]
    problems += [f"{n} has shape {tuple(tensors[n].shape)}, the model needs {s}"
                 for n, s in expected.items() if n in tensors and tuple(tensors[n].shape) != s]
    if problems:
        raise ValueError(f"{path} does not fit the model's LoRA adapters: " + "; ".join(problems[:6]))
