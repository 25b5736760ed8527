"""One loader for every tokenizer: ``"gpt2"``, a directory, or a tokenizer file.

``load_tokenizer(model_dir)`` reads ``tokenizer.json`` when the directory has one (ours,
Qwen3's, Llama 3's Hugging Face conversion), else Llama 3's ``tokenizer.model`` (also
in ``original/``, where Meta's downloads keep it). ``check_vocab_size`` is the check a
loader makes before pairing a tokenizer with a model.

A checkpoint carries its tokenizer: ``save_tokenizer`` writes it beside the checkpoint
and returns a record (name, file, size, sha256) for the checkpoint's metadata, and
``load_saved_tokenizer`` reads it back and checks it against that record. GPT-2's
tokenizer is recorded by name alone: it ships with numpygpt.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .hf import TOKENIZER_JSON, HFTokenizer, TokenizerError, load_tokenizer_json
from .llama3 import TOKENIZER_MODEL, TiktokenModel, load_tiktoken_model
# Where a model directory may keep its tokenizer, in order of preference.
CANDIDATES = (TOKENIZER_JSON, TOKENIZER_MODEL, f"original/{TOKENIZER_MODEL}")


def find_tokenizer_file(model_dir) -> Path:
    """The tokenizer file of a model directory (see CANDIDATES for the order)."""
    model_dir = Path(model_dir)
    for name in CANDIDATES:
        if (model_dir / name).is_file():
            return model_dir / name
    raise TokenizerError(f"{model_dir} has no tokenizer: looked for {', '.join(CANDIDATES)}")


def load_tokenizer(source):
    """A tokenizer from ``"gpt2"``, a model or tokenizer directory, or a tokenizer file."""
    from .gpt2 import get_tokenizer

    if str(source) == "gpt2":
        return get_tokenizer()
    path = Path(source)
    if path.is_dir():
        path = find_tokenizer_file(path)
    elif not path.is_file():
        raise TokenizerError(f"no tokenizer at {source} (a directory, a {TOKENIZER_JSON} or "
                             f"{TOKENIZER_MODEL} file, or 'gpt2')")
    if path.suffix == ".json":
        return load_tokenizer_json(path)
    name = path.parent.parent.name if path.parent.name == "original" else path.parent.name
    return load_tiktoken_model(path, name=name or None)


def model_tokenizer(source, model_type: str, vocab_size: int):
    """The tokenizer of the model that ``source`` names (a Hugging Face directory, or a GPT-2
    name): the directory's own tokenizer file when it has one, else GPT-2's BPE for a
    ``model_type`` "gpt2" model; any other model without a tokenizer file is an error. It must
    fit the model's ``vocab_size`` (published models may pad their rows: ``padded``)."""
    from .gpt2 import get_tokenizer

    path = Path(source).expanduser()
    if path.is_dir() and any((path / name).is_file() for name in CANDIDATES):
        tokenizer = load_tokenizer(path)
    elif model_type == "gpt2":
        tokenizer = get_tokenizer()
    else:
        raise TokenizerError(f"{source} has no tokenizer ({', '.join(CANDIDATES)}), and a {model_type} model has "
                             "no default one: put the model's tokenizer file into the directory")
    check_vocab_size(tokenizer, vocab_size, padded=True)
    return tokenizer


def check_vocab_size(tokenizer, vocab_size: int, padded: bool = False) -> None:
    """Raise one clear TokenizerError unless ``tokenizer`` fits a model of ``vocab_size`` tokens.

    Exact by default: a model trained with a tokenizer has one embedding row per token.
    ``padded=True`` also accepts a model with more rows than tokens, as published models
    often round their vocabulary up (Qwen3: 151,669 tokens, 151,936 rows); never fewer,
    since an id past the last row has no embedding.
    """
    n_vocab = tokenizer.n_vocab
    if n_vocab == vocab_size or (padded and n_vocab < vocab_size):
        return
    raise TokenizerError(
        f"tokenizer {tokenizer.name!r} has {n_vocab} tokens but the model's vocab_size is {vocab_size}"
        + ("" if padded else "; the model was trained with a different tokenizer")
    )


def is_gpt2(tokenizer) -> bool:
    """Whether ``tokenizer`` is GPT-2's (``get_tokenizer()``), which needs no file."""
    return not isinstance(tokenizer, (HFTokenizer, TiktokenModel)) and tokenizer.name == "gpt2"


def tokenizer_record(tokenizer) -> dict:
    """What a checkpoint keeps about its tokenizer: name and size, and for a tokenizer
    saved with it the file's name and sha256."""
    record = {"name": tokenizer.name, "n_vocab": tokenizer.n_vocab}
    if is_gpt2(tokenizer):
        return record
    if isinstance(tokenizer, HFTokenizer):
        name, content = TOKENIZER_JSON, tokenizer.hf_tokenizer.to_str(pretty=True).encode("utf-8")
    elif isinstance(tokenizer, TiktokenModel):
        name, content = TOKENIZER_MODEL, tokenizer.file_bytes
    else:
        raise TypeError(f"cannot save a tokenizer of type {type(tokenizer).__name__}")
    return {**record, "file": name, "sha256": hashlib.sha256(content).hexdigest()}


def save_tokenizer(tokenizer, directory) -> dict:
    """Write ``tokenizer`` into ``directory`` (nothing for GPT-2's) and return its record."""
    record = tokenizer_record(tokenizer)
    if "file" in record:
        tokenizer.save(directory)
    return record


def check_same_tokenizer(tokenizer, record: dict, where: str) -> None:
    """One TokenizerError unless ``tokenizer`` is the one ``record`` describes (``where``:
    whose record, for the message)."""
    if tokenizer.n_vocab != record["n_vocab"]:
        raise TokenizerError(f"{where} was trained with a tokenizer of {record['n_vocab']} tokens "
                             f"({record['name']!r}); {tokenizer.name!r} has {tokenizer.n_vocab}")
    mine = tokenizer_record(tokenizer)
    if mine.get("sha256") != record.get("sha256"):
        raise TokenizerError(f"{where} was trained with tokenizer {record['name']!r}, and {tokenizer.name!r} is a "
                             "different one of the same size")


def load_saved_tokenizer(directory, record) -> object:
    """The tokenizer a checkpoint in ``directory`` was trained with, checked against its
    ``record`` (None or ``"gpt2"``, as older checkpoints have it: GPT-2's)."""
    from .gpt2 import get_tokenizer

    if record is None or record == "gpt2" or "file" not in record:
        tokenizer = get_tokenizer()
        if isinstance(record, dict):
            check_same_tokenizer(tokenizer, record, f"the checkpoint in {directory}")
        return tokenizer
    path = Path(directory) / record["file"]
    if not path.is_file():
        raise TokenizerError(f"the checkpoint in {directory} was trained with the tokenizer saved beside it as "
                             f"{record['file']}, which is missing")
    tokenizer = load_tokenizer(path)
    check_same_tokenizer(tokenizer, record, f"the checkpoint in {directory}")
    tokenizer.name = record["name"]  # the name it was trained under, not the checkpoint's folder
    return tokenizer
