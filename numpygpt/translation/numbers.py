"""The translation task's data: whole numbers between English words and digits, made from a
seed, nothing downloaded ("three hundred and twelve" <-> "312").

    words(312)                 -> "three hundred and twelve"    (British "and", hyphenated tens)
    tok = NumberTokenizer()    a word-level vocabulary: the number words, "-", the ten digits
    data = NumberPairs([7, 312, 4005], tok)   both directions of each number, padded arrays
    data.get_batch([0, 1])     {"src": (2, S), "tgt_in": (2, T), "tgt_out": (2, T)}

A source starts with a tag that says which way to translate (``<to-digits>`` or
``<to-words>``), so one model learns both directions.
"""

from __future__ import annotations

import numpy as np

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
        "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
MAX_NUMBER = 999_999


def _below_100(n: int) -> str:
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] + (f"-{ONES[ones]}" if ones else "")


def _below_1000(n: int) -> str:
    hundreds, rest = divmod(n, 100)
    if not hundreds:
        return _below_100(rest)
    head = f"{ONES[hundreds]} hundred"
    return f"{head} and {_below_100(rest)}" if rest else head


def words(n: int) -> str:
    """n in [0, 999999] in English words: 312 -> "three hundred and twelve",
    4005 -> "four thousand and five", 21000 -> "twenty-one thousand"."""
    if not 0 <= n <= MAX_NUMBER:
        raise ValueError(f"numbers go from 0 to {MAX_NUMBER}, got {n}")
    thousands, rest = divmod(n, 1000)
    if not thousands:
        return _below_1000(rest)
    head = f"{_below_1000(thousands)} thousand"
    if not rest:
        return head
    return f"{head} and {_below_100(rest)}" if rest < 100 else f"{head} {_below_1000(rest)}"


def sample_numbers(count: int, rng, max_number: int = MAX_NUMBER) -> np.ndarray:
    """``count`` distinct numbers in [0, max_number] whose digit counts are spread evenly (a
    uniform draw would be nine tenths six-digit numbers)."""
    digits = len(str(max_number))
    if count > max_number + 1:
        raise ValueError(f"cannot draw {count} distinct numbers from 0..{max_number}")
    chosen: set[int] = set()
    while len(chosen) < count:
        k = rng.integers(1, digits + 1, count)  # how many digits
        lo = np.where(k == 1, 0, 10 ** (k - 1))
        hi = np.minimum(10 ** k - 1, max_number)
        for n in rng.integers(lo, np.maximum(hi, lo) + 1):
            if len(chosen) < count:
                chosen.add(int(n))
    return rng.permutation(np.array(sorted(chosen), dtype=np.int64))


class NumberTokenizer:
    """Word-level: a number's words and hyphens ("twenty", "-", "one"), or its digits one by one."""

    SPECIALS = ["<pad>", "<bos>", "<eos>", "<to-digits>", "<to-words>"]

    def __init__(self):
        vocab = self.SPECIALS + list("0123456789") + ONES + TENS[2:] + ["hundred", "thousand", "and", "-"]
        self.itos = vocab
        self.stoi = {s: i for i, s in enumerate(vocab)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.to_digits_id, self.to_words_id = 3, 4

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        if text.isdigit():
            pieces = list(text)
        else:
            pieces = text.replace("-", " - ").split()
        unknown = [p for p in pieces if p not in self.stoi]
        if unknown:
            raise ValueError(f"not a number in words or digits: {text!r} (unknown {unknown})")
        return [self.stoi[p] for p in pieces]

    def decode(self, ids) -> str:
        """Ids back to text, stopping at <eos>; specials other than <eos> are left out."""
        out = ""
        prev = None
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i < len(self.SPECIALS):
                continue
            piece = self.itos[i]
            joined = prev is None or piece == "-" or prev == "-" or (piece.isdigit() and prev.isdigit())
            out += piece if joined else " " + piece
            prev = piece
        return out


class NumberPairs:
    """Both directions of every number: row 2i translates number i to digits, row 2i + 1 to
    words. Arrays padded to the longest row: src (N, S) = tag + source tokens; tgt_in
    (N, T) = <bos> + target tokens; tgt_out (N, T) = target tokens + <eos>, -100 at padding
    (left out of the loss)."""

    def __init__(self, numbers, tokenizer: NumberTokenizer):
        self.numbers = np.asarray(numbers, dtype=np.int64)
        self.tokenizer = tok = tokenizer
        sources, targets = [], []
        for n in self.numbers.tolist():
            w, d = tok.encode(words(n)), tok.encode(str(n))
            sources += [[tok.to_digits_id] + w, [tok.to_words_id] + d]
            targets += [d, w]
        self.texts = [(words(n), str(n)) for n in self.numbers.tolist()]
        S, T = max(map(len, sources)), max(map(len, targets)) + 1
        N = len(sources)
        self.src = np.full((N, S), tok.pad_id, dtype=np.int64)
        self.tgt_in = np.full((N, T), tok.pad_id, dtype=np.int64)
        self.tgt_out = np.full((N, T), -100, dtype=np.int64)
        for r, (s, t) in enumerate(zip(sources, targets)):
            self.src[r, :len(s)] = s
            self.tgt_in[r, :len(t) + 1] = [tok.bos_id] + t
            self.tgt_out[r, :len(t) + 1] = t + [tok.eos_id]

    def __len__(self) -> int:
        return len(self.src)

    def get_batch(self, indices) -> dict:
        return {"src": self.src[indices], "tgt_in": self.tgt_in[indices], "tgt_out": self.tgt_out[indices]}

    def reference(self, row: int) -> tuple[str, str]:
        """(source text, target text) of a row."""
        w, d = self.texts[row // 2]
        return (w, d) if row % 2 == 0 else (d, w)
