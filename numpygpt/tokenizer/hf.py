"""Byte-level BPE in Hugging Face's ``tokenizer.json`` format: train, save, load.

``train_bpe(text, vocab_size)`` learns a vocabulary for *your* corpus, laid out as
GPT-2's is: the 256 byte tokens first (ids 0-255, in GPT-2's byte order), then the
merges in the order they were learned, then ``<|endoftext|>`` as the last id. Text is
split with GPT-2's pre-tokenisation pattern before merging, so no token crosses a
word/number/punctuation boundary. Hugging Face ``tokenizers`` does the training and
the encoding (Rust, fast); ``numpygpt/bpe.py`` is the same algorithm in plain Python to
read. The trained tokenizer is saved as ``tokenizer.json``, which is also what a model
directory such as Qwen3's carries; ``load_tokenizer_json`` reads both::

    tok = train_bpe(text, vocab_size=4096)
    tok.save("my_tokenizer")                     # my_tokenizer/tokenizer.json
    tok = load_tokenizer_json("my_tokenizer")
    tok.decode(tok.encode("x = 1")) == "x = 1"

The object returned speaks tiktoken's ``Encoding`` interface (``encode`` with
``allowed_special``, ``encode_ordinary``, ``decode``, ``n_vocab``, ``eot_token``), so
every function that takes GPT-2's tokenizer takes this one too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

EOT = "<|endoftext|>"
# Names the end-of-document token goes by: GPT-2's and Qwen's, then Llama 3's.
END_OF_TEXT_NAMES = ("<|endoftext|>", "<|end_of_text|>")
N_BYTES = 256
TOKENIZER_JSON = "tokenizer.json"


class TokenizerError(ValueError):
    """A tokenizer file is missing or unusable, or does not fit the model."""


def _special_token_regex(tokens) -> re.Pattern:
    # Longest first, so a special token that is a prefix of another never wins.
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` behind tiktoken's ``Encoding`` interface.

    Special tokens (added tokens marked ``special``) follow tiktoken's rules: in
    ``encode`` a special token's text becomes its id only when it is in
    ``allowed_special``; text matching any other special token raises (unless
    ``disallowed_special`` excludes it, when it is encoded as ordinary text). Added
    tokens that are not special (Qwen3's ``<think>``) are ordinary vocabulary entries.
    """

    def __init__(self, tokenizer, name: str = "bpe"):
        self._tokenizer = tokenizer
        # Never match special tokens inside the fast tokenizer: encode() below decides.
        tokenizer.encode_special_tokens = True
        self.name = name
        added = tokenizer.get_added_tokens_decoder()  # {id: AddedToken}
        self._special_tokens = {t.content: i for i, t in added.items() if t.special}
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        # The embedding needs a row for the largest id, whether or not ids have gaps.
        self.n_vocab = max(vocab.values()) + 1

    @property
    def hf_tokenizer(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tokenizer

    @property
    def special_tokens_set(self) -> set:
        return set(self._special_tokens)

    @property
    def eot_token(self) -> int:
        """Id of the end-of-document token (``<|endoftext|>`` or ``<|end_of_text|>``)."""
        for name in END_OF_TEXT_NAMES:
            if name in self._special_tokens:
                return self._special_tokens[name]
        raise TokenizerError(f"tokenizer {self.name!r} has no end-of-text token {END_OF_TEXT_NAMES}")

    def token_id(self, text: str) -> int:
        """Id of one special token given by its text (``"<|im_start|>"``)."""
        if text not in self._special_tokens:
            raise TokenizerError(f"tokenizer {self.name!r} has no special token {text!r}")
        return self._special_tokens[text]

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of ``text``, special tokens' text encoded as ordinary text."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode(self, text: str, *, allowed_special=frozenset(), disallowed_special="all") -> list[int]:
        """Token ids of ``text``; see the class docstring for special tokens."""
        allowed = self.special_tokens_set if allowed_special == "all" else set(allowed_special)
        disallowed = self.special_tokens_set - allowed if disallowed_special == "all" else set(disallowed_special)
        if disallowed and (found := _special_token_regex(disallowed).search(text)):
            raise ValueError(
                f"text contains the special token {found.group()!r}; pass allowed_special to encode it "
                "as its id, or disallowed_special=() to encode it as ordinary text"
            )
        allowed &= self.special_tokens_set
        if not allowed:
            return self.encode_ordinary(text)
        ids, start = [], 0
        for match in _special_token_regex(allowed).finditer(text):
            ids += self.encode_ordinary(text[start:match.start()])
            ids.append(self._special_tokens[match.group()])
            start = match.end()
        return ids + self.encode_ordinary(text[start:])

    def decode(self, ids) -> str:
        """Text of a sequence of ids (bytes that are not valid UTF-8 become U+FFFD)."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory) -> Path:
        """Write ``directory/tokenizer.json`` (atomically) and return its path."""
        from ..fileio import atomic_write

        path = Path(directory) / TOKENIZER_JSON
        with atomic_write(path) as fh:
            fh.write(self._tokenizer.to_str(pretty=True).encode("utf-8"))
        return path

    def __repr__(self) -> str:
        return f"<HFTokenizer {self.name!r} n_vocab={self.n_vocab}>"


def train_bpe(text: str, vocab_size: int, eot: str = EOT, name: str | None = None) -> HFTokenizer:
    """Train a byte-level BPE tokenizer of ``vocab_size`` tokens on ``text``.

    ``vocab_size`` counts the 256 bytes, the merges and ``eot`` (appended last, as in
    GPT-2: ``vocab_size - 257`` merges). ``eot`` in ``text`` separates documents: no
    merge is learned across it or from its characters. A text with too few distinct
    pairs stops early, with a smaller vocabulary (see ``n_vocab``). The result depends
    only on ``text`` and ``vocab_size``: there is no randomness in BPE training (ties
    between equally frequent pairs go to the pair whose tokens have the smaller ids).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    if not isinstance(text, str):
        raise TypeError(f"train_bpe expects a str, got {type(text).__name__}")
    if vocab_size < N_BYTES + 1:
        raise ValueError(f"vocab_size must be at least {N_BYTES + 1} (256 bytes and {eot}), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    # GPT-2's pattern and byte-to-printable-character map (add_prefix_space=False: the
    # first word of a text gets no invented leading space, so decoding gives it back).
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # the last id is eot's
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.split(eot), trainer)
    tokenizer.add_special_tokens([AddedToken(eot, special=True, normalized=False)])
    return HFTokenizer(tokenizer, name or f"bpe-{tokenizer.get_vocab_size()}")


def load_tokenizer_json(path) -> HFTokenizer:
    """Load a ``tokenizer.json`` (a file, or a directory holding one): ours or a model's."""
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_JSON
    if not path.is_file():
        raise TokenizerError(f"no tokenizer file at {path}")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise TokenizerError(f"{path} is not a valid tokenizer.json: {e}") from e
    return HFTokenizer(tokenizer, name=path.parent.name or TOKENIZER_JSON)


def merges_of(tokenizer: HFTokenizer) -> list[tuple[bytes, bytes]]:
    """The BPE merges of a byte-level tokenizer, in order, as pairs of raw bytes."""
    from ..bpe import byte_to_unicode

    model = json.loads(tokenizer.hf_tokenizer.to_str())["model"]
    decoder = {c: b for b, c in byte_to_unicode().items()}
    merges = []
    for merge in model["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge  # older files use "a b"
        merges.append((bytes(decoder[c] for c in left), bytes(decoder[c] for c in right)))
    return merges
