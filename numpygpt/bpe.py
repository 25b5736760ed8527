"""Byte-pair encoding in plain Python, to read: train merges, encode, decode.

``numpygpt.tokenizer.train_bpe`` trains with Hugging Face ``tokenizers`` (Rust, fast);
this module is the same algorithm written out, and tests/test_bpe.py checks that both
learn the same merges, in the same order, on a small text. It is quadratic-ish (every
step recounts every pair), so use it on a few kilobytes, not a corpus.

Training, byte-level, as GPT-2 does it:

1. Split the text into documents at ``<|endoftext|>`` and each document into "words"
   with GPT-2's pattern (letters with one leading space, digit runs, punctuation runs,
   whitespace), so that no token will ever straddle a word boundary. Count the words.
2. Write each word as its UTF-8 bytes: every byte is a token, so any text is
   encodable and the vocabulary starts with the 256 byte tokens.
3. Count every adjacent pair of tokens over all words (a word seen 5 times counts 5).
   Merge the most frequent pair into a new token, everywhere, and record the merge.
   Ties go to the pair whose tokens have the smaller ids (the first token's id, then
   the second's): byte tokens come first, in GPT-2's byte order, then merged tokens in
   the order they were made. Repeat until the vocabulary is full or no pair is left.

A merge can produce bytes that already are a token (``"ab" + "c"`` after ``"a" + "bc"``):
the existing id is reused and the vocabulary does not grow.

Encoding a word replays the merges: repeatedly merge the adjacent pair that was learned
earliest (lowest rank), leftmost occurrence first, until no learned pair is left.
"""

from __future__ import annotations

from collections import Counter

import regex

from numpygpt.tokenizer.gpt2 import GPT2_PAT_STR

EOT = "<|endoftext|>"
WORD_PATTERN = regex.compile(GPT2_PAT_STR)


def byte_order() -> list[int]:
    """The 256 byte values in GPT-2's id order: printable bytes first, then the rest.

    GPT-2 writes its vocabulary file with a printable character for each byte: bytes
    that print as themselves (``!`` to ``~``, ``¡`` to ``¬``, ``®`` to ``ÿ``) keep their
    character, the other 68 get the characters U+0100, U+0101, ... in byte order. Token
    ids follow those characters' order, so ``!`` (byte 33) is id 0.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in set(printable)]
    return printable + others


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (how tokenizer.json spells bytes)."""
    order = byte_order()
    n_printable = 188  # bytes that stand for themselves
    return {b: chr(b) if i < n_printable else chr(256 + i - n_printable) for i, b in enumerate(order)}


def words(text: str, eot: str = EOT) -> Counter:
    """Counts of the pre-tokenised words of ``text`` (as UTF-8 bytes), documents split at ``eot``."""
    counts = Counter()
    for document in text.split(eot):
        counts.update(piece.encode("utf-8") for piece in WORD_PATTERN.findall(document))
    return counts


def _merge_word(word, pair: tuple, new) -> tuple:
    """``word`` (a sequence of tokens) with every occurrence of ``pair`` replaced by ``new``, left to right."""
    merged, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            merged.append(new)
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return tuple(merged)


def _pair_counts(word_counts: dict) -> Counter:
    counts = Counter()
    for word, n in word_counts.items():
        for pair in zip(word, word[1:]):
            counts[pair] += n
    return counts


def train(text: str, vocab_size: int, eot: str = EOT) -> list[tuple[bytes, bytes]]:
    """The merges (pairs of byte strings, in order) of a ``vocab_size``-token vocabulary.

    ``vocab_size`` counts the 256 bytes, the merged tokens and ``eot`` (the last id).
    """
    vocab = [bytes([b]) for b in byte_order()]  # id -> token bytes
    token_id = {token: i for i, token in enumerate(vocab)}
    word_counts = {tuple(token_id[bytes([b])] for b in word): n for word, n in words(text, eot).items()}
    merges = []
    while len(vocab) < vocab_size - 1:
        pairs = _pair_counts(word_counts)
        if not pairs:
            break
        best = max(pairs, key=lambda pair: (pairs[pair], -pair[0], -pair[1]))
        left, right = vocab[best[0]], vocab[best[1]]
        if left + right not in token_id:
            token_id[left + right] = len(vocab)
            vocab.append(left + right)
        merges.append((left, right))
        new_id = token_id[left + right]
        merged = Counter()
        for word, n in word_counts.items():
            merged[_merge_word(word, best, new_id)] += n
        word_counts = merged
    return merges


def vocabulary(merges: list[tuple[bytes, bytes]]) -> list[bytes]:
    """Token bytes by id: the 256 bytes in GPT-2's order, then each new merged token."""
    vocab = [bytes([b]) for b in byte_order()]
    seen = set(vocab)
    for left, right in merges:
        if left + right not in seen:
            seen.add(left + right)
            vocab.append(left + right)
    return vocab


def encode(text: str, merges: list[tuple[bytes, bytes]]) -> list[int]:
    """Token ids of ``text`` (no special tokens) under ``merges``."""
    rank = {pair: r for r, pair in enumerate(merges)}
    token_id = {token: i for i, token in enumerate(vocabulary(merges))}
    ids = []
    for word in WORD_PATTERN.findall(text):
        parts = tuple(bytes([b]) for b in word.encode("utf-8"))
        while len(parts) > 1:
            pairs = list(zip(parts, parts[1:]))
            best = min(pairs, key=lambda pair: rank.get(pair, len(rank)))
            if best not in rank:
                break
            parts = _merge_word(parts, best, best[0] + best[1])
        ids += [token_id[p] for p in parts]
    return ids


def decode(ids, merges: list[tuple[bytes, bytes]]) -> str:
    """Text of ``ids`` under ``merges`` (bytes that are not valid UTF-8 become U+FFFD)."""
    vocab = vocabulary(merges)
    return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")
