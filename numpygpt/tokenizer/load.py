"""One loader for every tokenizer: ``"gpt2"``, a directory, or a tokenizer file.

``load_tokenizer(model_dir)`` reads ``tokenizer.json`` when the directory has one (ours,
Qwen3's, Llama 3's Hugging Face conversion), else Llama 3's ``tokenizer.model`` (also
in ``original/``, where Meta's downloads keep it). ``check_vocab_size`` is the check a
loader makes before pairing a tokenizer with a model.
"""

from __future__ import annotations

from pathlib import Path

from .hf import TOKENIZER_JSON, TokenizerError, load_tokenizer_json

TOKENIZER_MODEL = "tokenizer.model"
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
    from .llama3 import load_tiktoken_model

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
