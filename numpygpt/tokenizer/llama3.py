"""Llama 3's ``tokenizer.model``: tiktoken's BPE file, Llama 3's pattern and special tokens.

The file (in a model directory, or its ``original/`` folder) has one line per token:
the token's bytes in base64 and its rank, which is also its id (``IQ== 0`` is ``!``).
tiktoken merges by rank: within a pre-tokenised piece, the adjacent pair whose
concatenation has the lowest rank is merged first. The 256 special tokens follow the
last rank (``<|begin_of_text|>`` is 128000 in Llama 3's 128,000-token file)::

    tok = load_tiktoken_model("Llama-3.2-1B/original/tokenizer.model")
    tok.encode("<|begin_of_text|>Hi", allowed_special="all")   # [128000, 13347]
    tok.n_vocab                                                # 128256
"""

from __future__ import annotations

from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from .gpt2 import no_tiktoken_cache
from .hf import TokenizerError

# Llama 3's pre-tokenisation (cl100k's): contractions in any case, a letter run with
# one leading non-letter, digits in groups of at most three, punctuation runs that keep
# their newlines, newline runs, and whitespace.
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
N_SPECIAL = 256
TOKENIZER_MODEL = "tokenizer.model"
# The named special tokens by offset after the last rank (Llama 3.1/3.2's table);
# every other offset is a <|reserved_special_token_K|>, K counting up from 3 at offset 11.
NAMED_SPECIAL = {
    0: "<|begin_of_text|>", 1: "<|end_of_text|>", 2: "<|reserved_special_token_0|>",
    3: "<|reserved_special_token_1|>", 4: "<|finetune_right_pad_id|>", 5: "<|reserved_special_token_2|>",
    6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>", 10: "<|python_tag|>",
}


def llama3_special_tokens(n_base: int) -> dict[str, int]:
    """Llama 3's 256 special tokens, numbered from ``n_base`` (the number of ranks)."""
    names = [NAMED_SPECIAL.get(k, f"<|reserved_special_token_{k - 8}|>") for k in range(N_SPECIAL)]
    return {name: n_base + k for k, name in enumerate(names)}


class TiktokenModel(tiktoken.Encoding):
    """A tiktoken Encoding whose end-of-text token is Llama 3's ``<|end_of_text|>``;
    ``file_bytes`` is the ``tokenizer.model`` it was read from (``save`` writes it back)."""

    file_bytes: bytes = b""

    @property
    def eot_token(self) -> int:
        return self._special_tokens["<|end_of_text|>"]

    def token_id(self, text: str) -> int:
        """Id of one special token given by its text (``"<|eot_id|>"``)."""
        if text not in self._special_tokens:
            raise TokenizerError(f"tokenizer {self.name!r} has no special token {text!r}")
        return self._special_tokens[text]

    def save(self, directory) -> Path:
        """Write ``directory/tokenizer.model`` (atomically) and return its path."""
        from ..fileio import atomic_write

        path = Path(directory) / TOKENIZER_MODEL
        with atomic_write(path) as fh:
            fh.write(self.file_bytes)
        return path


def load_tiktoken_model(path, name: str | None = None) -> TiktokenModel:
    """Load a Llama 3 ``tokenizer.model`` (tiktoken's BPE file format)."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"no tokenizer file at {path}")
    try:
        with no_tiktoken_cache():  # tiktoken would otherwise copy the file into a cache keyed by path
            ranks = load_tiktoken_bpe(str(path))
    except (ValueError, UnicodeDecodeError) as e:
        raise TokenizerError(
            f"{path} is not a tiktoken BPE file (lines of base64 token and rank; a SentencePiece "
            f"model, as Llama 2 has, is not supported): {e}"
        ) from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: the ranks are not 0, 1, ..., {len(ranks) - 1} (each once)")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{path}: single bytes {missing[:5]} have no token, so some text cannot be encoded")
    tokenizer = TiktokenModel(
        name=name or path.parent.name or TOKENIZER_MODEL,
        pat_str=LLAMA3_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens=llama3_special_tokens(len(ranks)),
    )
    tokenizer.file_bytes = path.read_bytes()
    return tokenizer
