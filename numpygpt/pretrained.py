"""GPT-2 weights in the Hugging Face layout: ``config.json`` + ``model.safetensors``.

    model = GPTModel.from_pretrained("gpt2")          # downloaded once into ~/.cache/numpygpt/gpt2
    model = GPTModel.from_pretrained("/path/to/dir")  # a directory with config.json + model.safetensors
    model.save_pretrained("/path/to/dir")             # the same two files, readable by HF transformers

This module does not import the model: ``GPTModel.from_pretrained`` hands
``load_pretrained`` a function that builds an empty model from a config, so the import
goes one way, model -> pretrained.

The checkpoint is a table: numpygpt's parameter names *are* the checkpoint's tensor
names (``wte.weight``, ``h.0.attn.c_attn.weight``, ...; see ``hf_tensor_shapes``) and
no tensor is transposed. HF's GPT-2 stores its linear layers as ``Conv1D`` with the
weight laid out (in, out) and computes ``x @ W + b``, exactly as ``numpygpt.nn.Linear``
does, and ``c_attn`` packs Q, K and V side by side along the output axis in the same
order our attention splits them. (nanoGPT transposes these four weights because
``torch.nn.Linear`` stores (out, in); we do not.)

Only safetensors is read: a ``pytorch_model.bin`` is a Python pickle, and unpickling a
file can run arbitrary code.
"""

from __future__ import annotations

import json
import os
import re

import numpy
from safetensors import safe_open

from . import backend, download
from .config import GPTConfig
from .fileio import SAFETENSORS_DTYPES, atomic_write, write_safetensors
from .nn.lora import LORA_SUFFIXES, is_merged, lora_layers

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
EOT_TOKEN_ID = 50256  # <|endoftext|> in GPT-2's tokenizer

# HF files from before 2020 also hold each block's causal mask as a buffer: not weights.
_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
_ST_DTYPES = {k: SAFETENSORS_DTYPES[k] for k in ("float16", "float32", "float64")}  # float weights NumPy reads


class PretrainedNotFoundError(OSError):
    """The weights could not be found, downloaded, or are not in a format we read."""


def _how_to_pass_a_directory(name: str = "gpt2") -> str:
    return (
        "To load weights without network access, fetch the two files on a machine that has it and "
        "pass their directory:\n"
        f"    huggingface-cli download openai-community/{name} config.json model.safetensors --local-dir DIR\n"
        '    model = GPTModel.from_pretrained("DIR")   # DIR holds config.json and model.safetensors'
    )


# -- the table: tensor names and shapes ----------------------------------------------

def hf_tensor_shapes(cfg: GPTConfig) -> dict:
    """name -> shape of every tensor in a GPT-2 checkpoint for ``cfg``, in model order.

    These are also ``GPTModel(cfg).named_parameters()``, one-to-one. ``lm_head.weight``
    appears only for an untied model, ``c_attn.bias`` only with ``qkv_bias``. A classifier
    (``cfg.num_classes``) has ``score.weight`` (C, K) and ``score.bias`` (K,) instead: numpygpt's
    own head, stored (in, out) like every Linear (HF's GPT2ForSequenceClassification has an
    (K, C) score without bias, so such a file is numpygpt's, not HF's).
    """
    V, T, C = cfg.vocab_size, cfg.context_length, cfg.emb_dim
    shapes = {"wte.weight": (V, C), "wpe.weight": (T, C)}
    for i in range(cfg.n_layers):
        h = f"h.{i}."
        shapes[h + "ln_1.weight"] = shapes[h + "ln_1.bias"] = (C,)
        shapes[h + "attn.c_attn.weight"] = (C, 3 * C)  # q | k | v, each (C, C)
        if cfg.qkv_bias:
            shapes[h + "attn.c_attn.bias"] = (3 * C,)
        shapes[h + "attn.c_proj.weight"], shapes[h + "attn.c_proj.bias"] = (C, C), (C,)
        shapes[h + "ln_2.weight"] = shapes[h + "ln_2.bias"] = (C,)
        shapes[h + "mlp.c_fc.weight"], shapes[h + "mlp.c_fc.bias"] = (C, 4 * C), (4 * C,)
        shapes[h + "mlp.c_proj.weight"], shapes[h + "mlp.c_proj.bias"] = (4 * C, C), (C,)
    shapes["ln_f.weight"] = shapes["ln_f.bias"] = (C,)
    if cfg.num_classes is not None:
        shapes["score.weight"], shapes["score.bias"] = (C, cfg.num_classes), (cfg.num_classes,)
    elif not cfg.tie_weights:
        shapes["lm_head.weight"] = (V, C)
    return shapes


def _check_model_matches_table(model) -> None:
    """The model's parameters must be exactly the checkpoint's tensors (a code bug otherwise)."""
    ours = {name: tuple(p.shape) for name, p in plain_weights(model)}
    if ours != hf_tensor_shapes(model.cfg):
        raise RuntimeError("GPTModel's parameter names no longer match the GPT-2 checkpoint layout")


# -- config.json ----------------------------------------------------------------------

def config_from_hf(hf: dict, dtype: str = "float32", drop_rate: float = 0.0) -> GPTConfig:
    """GPTConfig from a Hugging Face GPT-2 ``config.json`` dictionary.

    Options of HF's GPT-2 that change the forward pass in ways this model cannot
    represent (another activation, unscaled attention, a non-4C MLP) are refused rather
    than silently ignored.
    """
    if not isinstance(hf, dict):
        raise ValueError(f"config.json must hold a JSON object, got a {type(hf).__name__}")
    extras = hf.get("numpygpt", {})  # written by save_pretrained for what HF's GPT-2 cannot say
    if not isinstance(extras, dict):
        raise ValueError(f"config.json's 'numpygpt' entry must be an object, got a {type(extras).__name__}")
    try:
        dtype = numpy.dtype(dtype).name
    except TypeError as e:
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}") from e
    problems = []
    if hf.get("model_type", "gpt2") != "gpt2":
        problems.append(f"model_type is {hf['model_type']!r}, not 'gpt2'")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"activation_function {hf['activation_function']!r} is not GELU's tanh "
                        "approximation ('gelu_new'), the only one this model computes")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        problems.append("attention scores must be scaled by 1/sqrt(head size) only")
    if hf.get("n_inner") not in (None, 4 * hf.get("n_embd", 0)):
        problems.append(f"n_inner {hf['n_inner']} is not 4 * n_embd")
    if "n_positions" not in hf and "n_ctx" not in hf:
        problems.append("missing field 'n_positions' (or 'n_ctx')")
    problems += [f"missing field {k!r}" for k in ("vocab_size", "n_embd", "n_head", "n_layer") if k not in hf]
    if problems:
        raise ValueError("config.json does not describe a GPT-2 this model can load: " + "; ".join(problems))
    # values pass unconverted: GPTConfig refuses n_layer 2.7 or "32" instead of truncating them
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        context_length=hf.get("n_positions", hf.get("n_ctx")),
        emb_dim=hf["n_embd"],
        n_heads=hf["n_head"],
        n_layers=hf["n_layer"],
        drop_rate=drop_rate,
        qkv_bias=extras.get("qkv_bias", True),
        tie_weights=extras.get("tie_weights", hf.get("tie_word_embeddings", True)),
        **{k: extras[k] for k in ("num_classes", "readout", "pad_id") if k in extras},  # a classifier
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        dtype=dtype,
    )


def config_to_hf(cfg: GPTConfig) -> dict:
    """The ``config.json`` of HF's GPT2LMHeadModel for ``cfg``, plus a ``numpygpt`` section."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_head": cfg.n_heads,
        "n_layer": cfg.n_layers,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "resid_pdrop": cfg.drop_rate,
        "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.drop_rate,
        "initializer_range": 0.02,
        "bos_token_id": EOT_TOKEN_ID,
        "eos_token_id": EOT_TOKEN_ID,
        "tie_word_embeddings": cfg.tie_weights,
        "torch_dtype": cfg.dtype,
        "numpygpt": {"tie_weights": cfg.tie_weights, "qkv_bias": cfg.qkv_bias,
                     **({"num_classes": cfg.num_classes, "readout": cfg.readout, "pad_id": cfg.pad_id}
                        if cfg.num_classes is not None else {})},
    }


# -- loading --------------------------------------------------------------------------

def load_pretrained(path_or_name, build, dtype: str = "float32", cache_dir=None, device: str | None = None,
                    drop_rate: float = 0.0, tie_weights: bool | None = None):
    """Load GPT-2 weights from a directory or by name into the model ``build(cfg)`` makes
    (``GPTModel.from_pretrained`` passes an empty GPTModel's constructor).

    ``path_or_name``: a directory holding ``config.json`` and ``model.safetensors``, or one
    of 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' (optionally 'openai-community/...'),
    which is read from ``<cache>/<name>`` and downloaded there from the Hugging Face hub
    if missing. ``<cache>`` is ``cache_dir``, else $NUMPYGPT_CACHE, else ~/.cache/numpygpt.

    Tensors may carry HF's ``transformer.`` prefix; the causal-mask buffers of old files
    (``h.N.attn.bias``, ``h.N.attn.masked_bias``) are skipped. An ``lm_head.weight`` equal to
    ``wte.weight`` is the tied head; one that differs gives an untied model. Every name and
    shape is checked before any weight is loaded, and all problems are reported together.

    Tensors are read one at a time, cast to ``dtype`` and moved to ``device`` (default: the
    backend's current device), so memory peaks at about the model plus one tensor.
    ``drop_rate`` is 0 (inference); pass GPT-2's 0.1 to fine-tune with dropout. The model
    is returned in eval mode; call ``model.train()`` before fine-tuning with dropout.

    ``tie_weights=False`` gives an untied output head, a copy of the token embedding when
    the file's head is tied (the book's chapter-7 model); None keeps the file's choice.
    True asks for a tied head and is refused for a file whose head differs from ``wte``.
    """
    directory = _resolve(path_or_name, cache_dir)
    hf = _read_config(directory)
    cfg = config_from_hf(hf, dtype=dtype, drop_rate=drop_rate)
    target = device if device is not None else backend.get_device()
    with _open_weights(os.path.join(directory, WEIGHTS_FILE)) as f:
        keys, cfg = _plan(f, cfg)
        if tie_weights is False and cfg.tie_weights:
            cfg = cfg.replace(tie_weights=False)
            keys["lm_head.weight"] = keys["wte.weight"]  # read twice: two separate arrays
        elif tie_weights and not cfg.tie_weights:
            raise ValueError(f"{directory}: the output head differs from the token embedding, "
                             "so the model cannot be loaded with tie_weights=True")
        with backend.device(target):
            model = build(cfg)  # zeros: no random draw for weights about to be replaced
        _check_model_matches_table(model)
        for name, p in model.named_parameters():
            arr = backend.to_device(f.get_tensor(keys[name]), dtype=cfg.dtype, device_name=target)
            if not backend.is_cupy_array(arr) and not arr.flags.writeable:
                arr = arr.copy()  # optimisers update weights in place
            p.data, p.grad = arr, None
    return model.eval()


def _open_weights(path: str):
    """safe_open, with a damaged file (bad header, truncated data) as a ValueError."""
    try:
        return safe_open(path, framework="numpy")
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as e:  # safetensors raises its own error type
        raise ValueError(f"{path} is not a valid safetensors file: corrupt or truncated ({e})") from e


def _plan(f, cfg: GPTConfig):
    """Match the file's tensors to the model's: ({model name: file key}, final config).

    Raises ValueError listing every missing, unknown, duplicated, misshaped or unreadable
    tensor. Reads only the header, except to compare an ``lm_head.weight`` with ``wte``.
    """
    keys, problems = {}, []
    for key in f.keys():
        name = key[len("transformer."):] if key.startswith("transformer.") else key
        if _BUFFER.fullmatch(name):
            continue
        if name in keys:
            problems.append(f"{name!r} appears twice ({keys[name]!r} and {key!r})")
        keys[name] = key

    def shape(name):
        return tuple(f.get_slice(keys[name]).get_shape())

    if "lm_head.weight" in keys and cfg.tie_weights and cfg.num_classes is None:
        V, C = cfg.vocab_size, cfg.emb_dim
        tied = ("wte.weight" in keys and shape("wte.weight") == shape("lm_head.weight") == (V, C)
                and numpy.array_equal(f.get_tensor(keys["wte.weight"]), f.get_tensor(keys["lm_head.weight"])))
        if tied:
            del keys["lm_head.weight"]  # the same matrix stored twice: share one
        else:
            cfg = cfg.replace(tie_weights=False)

    expected = hf_tensor_shapes(cfg)
    problems += [f"missing tensor {n!r} (shape {s})" for n, s in expected.items() if n not in keys]
    problems += [f"unknown tensor {keys[n]!r}" for n in keys if n not in expected]
    for name, want in expected.items():
        if name not in keys:
            continue
        got = shape(name)
        if got != want:
            problems.append(f"tensor {keys[name]!r} has shape {got}, expected {want}")
        st_dtype = f.get_slice(keys[name]).get_dtype()
        if st_dtype not in _ST_DTYPES.values():
            problems.append(f"tensor {keys[name]!r} has dtype {st_dtype}, which NumPy cannot read "
                            "(convert the checkpoint to float32)")
    if problems:
        raise ValueError(f"{WEIGHTS_FILE} does not match a GPT-2 with n_layer={cfg.n_layers}, "
                         f"n_embd={cfg.emb_dim}, vocab_size={cfg.vocab_size}, n_positions="
                         f"{cfg.context_length}:\n  " + "\n  ".join(problems))
    return keys, cfg


def _read_config(directory: str) -> dict:
    """config.json of a checkpoint directory, once we know its weights are safetensors."""
    weights = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        if os.path.isfile(os.path.join(directory, "pytorch_model.bin")):
            raise PretrainedNotFoundError(
                f"{directory} has pytorch_model.bin but no {WEIGHTS_FILE}. numpygpt reads only "
                "safetensors: a .bin file is a Python pickle, and unpickling a file can run "
                "arbitrary code, so it is never opened here. Fetch the safetensors file instead "
                "(huggingface-cli download openai-community/gpt2 model.safetensors --local-dir DIR), "
                "or convert a file you trust where torch and transformers are installed: "
                "GPT2LMHeadModel.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)."
            )
        raise PretrainedNotFoundError(f"{directory} has no {WEIGHTS_FILE}.\n" + _how_to_pass_a_directory())
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise PretrainedNotFoundError(f"{directory} has no {CONFIG_FILE}.\n" + _how_to_pass_a_directory())
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# -- finding and downloading ----------------------------------------------------------

def _resolve(path_or_name, cache_dir) -> str:
    """The directory to load from: the path itself, or a hub model's cache (filled if needed)."""
    text = os.fspath(path_or_name)
    path = os.path.expanduser(text)
    if os.path.isdir(path):
        return path
    name = text[len("openai-community/"):] if text.startswith("openai-community/") else text
    if name not in download.HUB_NAMES:
        raise PretrainedNotFoundError(
            f"{text!r} is not a directory, nor one of the model names {', '.join(download.HUB_NAMES)}.\n"
            + _how_to_pass_a_directory()
        )
    directory = os.path.join(os.fspath(cache_dir) if cache_dir is not None else download.default_cache_dir(), name)
    config_path = os.path.join(directory, CONFIG_FILE)
    try:
        download.fetch_hub_files(name, directory, [
            (CONFIG_FILE, lambda tmp: config_from_hf(_read_json(tmp))),
            (WEIGHTS_FILE, lambda tmp: _verify_weights(tmp, config_from_hf(_read_json(config_path)))),
        ])
    except (OSError, ValueError) as e:  # URLError is an OSError
        raise PretrainedNotFoundError(
            f"could not download {name!r} from https://huggingface.co/openai-community/{name} "
            f"into {directory}: {e}\n" + _how_to_pass_a_directory(name)
        ) from e
    return directory


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _verify_weights(path: str, cfg: GPTConfig) -> None:
    """The header parses and names exactly the tensors a GPT-2 with ``cfg`` needs."""
    with _open_weights(path) as f:
        _plan(f, cfg)


# -- saving ---------------------------------------------------------------------------

def save_pretrained(model, directory) -> None:
    """Write ``config.json`` and ``model.safetensors`` in HF's GPT-2 layout.

    Tensor names carry no ``transformer.`` prefix, as in openai-community/gpt2's file;
    ``lm_head.weight`` is written only for an untied model. A model without ``qkv_bias``
    has no ``c_attn.bias`` tensor: the file is not a standard GPT-2 then (HF would
    initialise the missing biases), but ``config.json``'s ``numpygpt`` section records it
    and ``from_pretrained`` reads it back. Each file is written to a temporary file and
    renamed, and tensors are copied to the host one at a time.

    A classifier is written with its ``score`` head and ``config.json`` records its
    ``num_classes``, ``readout`` and ``pad_id``. A LoRA model must be merged first
    (``merge_lora``): its merged weights are written, without adapters, as a plain model;
    ``numpygpt.lora.save_merged`` writes the same without changing the model.
    """
    if lora_layers(model) and not is_merged(model):
        raise ValueError("save_pretrained writes plain GPT-2 weights: call merge_lora(model) first to fold the "
                         "LoRA adapters in, or numpygpt.lora.save_merged(model, directory), which writes them folded "
                         "in and leaves the model as it is (or keep them apart with save_lora / save_checkpoint)")
    write_pretrained(model, directory, [(n, p.data) for n, p in plain_weights(model)])


def write_pretrained(model, directory, tensors) -> None:
    """``config.json`` (from ``model.cfg``, without LoRA) and ``model.safetensors`` holding
    ``tensors``: (name, array or fileio.LazyTensor) for every name of ``plain_weights(model)``."""
    _check_model_matches_table(model)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    write_safetensors(os.path.join(directory, WEIGHTS_FILE), tensors,
                      metadata={"format": "pt"})  # HF transformers asks for format 'pt'
    cfg = model.cfg.replace(lora_rank=None, lora_alpha=None)
    with atomic_write(os.path.join(directory, CONFIG_FILE)) as fh:
        fh.write((json.dumps(config_to_hf(cfg), indent=2) + "\n").encode("utf-8"))


def plain_weights(model) -> list:
    """(name, Parameter) of the model's GPT-2 weights: LoRA adapters left out."""
    return [(n, p) for n, p in model.named_parameters() if not n.endswith(LORA_SUFFIXES)]
