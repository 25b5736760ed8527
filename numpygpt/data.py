"""Training data: the book's sliding-window dataset and a NumPy batch loader.

The corpus is tokenised once into one long id array. Window i is the slice
``ids[i*stride : i*stride + T + 1]``; its first T ids are the inputs and its last T
are the targets, so the target at every position is the next token::

    ids      = [ 40, 367, 2885, 1464, 1807, ... ]
    inputs   = [ 40, 367, 2885, 1464]
    targets  = [367, 2885, 1464, 1807]

Batches are host (NumPy) int64 arrays of shape (B, T); the training loop moves them
to the device. A batch is gathered with one fancy-indexing step from a (B, T + 1)
index matrix, never a Python loop over tokens.
"""

from __future__ import annotations

import math
import numbers
import re
from pathlib import Path

import numpy as np

from numpygpt.tokenizer import text_to_token_ids

# Token ids are stored as int32: 4 bytes a token (the default corpus is ~140k tokens,
# about 0.5 MB), wide enough for any vocabulary, and signed, so a stray -1 stays -1
# instead of turning into a valid-looking id. uint16 would halve the memory and does
# fit GPT-2's 50257 ids, but an ``astype(uint16)`` of a larger vocabulary's ids
# wraps without an error, and at our corpus sizes the saving does not matter.
TOKEN_DTYPE = np.int32


def _as_token_array(token_ids) -> np.ndarray:
    ids = np.asarray(token_ids)
    if ids.ndim != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"token_ids must be integers, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(TOKEN_DTYPE).max):
        raise ValueError(
            f"token ids must be in [0, {np.iinfo(TOKEN_DTYPE).max}], "
            f"got min {ids.min()} and max {ids.max()}"
        )
    return np.ascontiguousarray(ids, dtype=TOKEN_DTYPE)


class GPTDataset:
    """Overlapping next-token windows over one token array (the book's GPTDatasetV1).

    ``dataset[i]`` is ``(inputs, targets)``, both (T,) int64 with T = max_length.
    With stride == max_length the windows tile the corpus without overlap; a smaller
    stride makes them overlap (more, correlated, windows).
    """

    def __init__(self, token_ids, max_length: int, stride: int):
        _check_count("max_length", max_length)
        _check_count("stride", stride)
        self.token_ids = _as_token_array(token_ids)  # (N,)
        self.max_length = int(max_length)
        self.stride = int(stride)
        n = len(self.token_ids)
        # A window reads max_length + 1 tokens: T inputs plus the target after the last.
        if n < self.max_length + 1:
            raise ValueError(
                f"text has {n} tokens, but one window of max_length={self.max_length} "
                f"needs at least {self.max_length + 1} (inputs plus one target); "
                "use more text or a smaller max_length"
            )
        # Window i fits while i*stride + max_length + 1 <= n; this is the same count as
        # the book's range(0, n - max_length, stride).
        self.n_windows = (n - self.max_length - 1) // self.stride + 1
        self._offsets = np.arange(self.max_length + 1)  # (T+1,) positions inside a window

    @classmethod
    def from_text(cls, text: str, tokenizer=None, max_length: int = 256, stride: int = 128):
        """Tokenise ``text`` with GPT-2's BPE (``<|endoftext|>`` allowed) and window it."""
        return cls(text_to_token_ids(text, tokenizer), max_length, stride)

    def __len__(self) -> int:
        return self.n_windows

    def __getitem__(self, i):
        i = int(i)
        if i < 0:
            i += self.n_windows
        if not 0 <= i < self.n_windows:
            raise IndexError(f"window {i} out of range for {self.n_windows} windows")
        start = i * self.stride
        window = self.token_ids[start : start + self.max_length + 1].astype(np.int64)  # (T+1,)
        return window[:-1].copy(), window[1:].copy()  # (T,), (T,)

    def get_batch(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """Windows ``indices`` stacked: (inputs (B, T), targets (B, T)), int64."""
        indices = np.asarray(indices, dtype=np.int64)  # (B,)
        if indices.size and (indices.min() < 0 or indices.max() >= self.n_windows):
            raise IndexError(f"window indices must be in [0, {self.n_windows})")
        starts = indices * self.stride  # (B,)
        rows = starts[:, None] + self._offsets[None, :]  # (B, T+1) token positions
        chunk = self.token_ids[rows].astype(np.int64)  # (B, T+1)
        # Copies, so the training code gets contiguous (B, T) arrays, not strided views.
        inputs = np.ascontiguousarray(chunk[:, :-1])  # (B, T)
        targets = np.ascontiguousarray(chunk[:, 1:])  # (B, T)
        return inputs, targets


class DataLoader:
    """Batches of windows: iterating yields (inputs (B, T), targets (B, T)) int64 arrays.

    Every ``iter()`` is one epoch that visits each window exactly once. With shuffle,
    epoch k's order is a permutation drawn from a generator seeded by (seed, k), so it
    depends only on the seed and the epoch number, never on what ran before; the
    epoch counter advances each time an iteration starts. ``state_dict()`` saves the
    counter so a resumed run sees the same orders; ``set_epoch(k)`` or
    ``epoch_batches(k, start)`` jump to an epoch (and to a batch inside it).

    Each iteration is independent, so a loader can be iterated inside a loop over
    itself (the book estimates the training loss that way).

    ``collate_fn(items) -> (inputs, targets)`` builds a batch from the list of
    ``dataset[i]`` items, for items of different lengths (the instruction data's
    padding collate); without it, a dataset's ``get_batch`` or a stack of its
    (inputs, targets) pairs is used.
    """

    def __init__(self, dataset, batch_size: int, shuffle: bool = True,
                 drop_last: bool = True, seed: int = 0, collate_fn=None):
        _check_count("batch_size", batch_size)
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.collate_fn = collate_fn
        self.epoch = 0  # the epoch the next iter() will use

    def __len__(self) -> int:
        n = len(self.dataset)
        if self.drop_last:
            return n // self.batch_size
        return math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration use epoch ``epoch``'s order."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def order(self, epoch: int) -> np.ndarray:
        """The window indices of epoch ``epoch``, in visiting order, (N,)."""
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n)
        # A fresh generator per (seed, epoch) rather than one generator drawn from
        # epoch after epoch: resuming at epoch k needs no replay of epochs 0..k-1.
        rng = np.random.default_rng([self.seed, int(epoch)])
        return rng.permutation(n)

    def epoch_batches(self, epoch: int, start: int = 0):
        """Yield the batches of epoch ``epoch`` from batch number ``start`` on."""
        order = self.order(epoch)
        B = self.batch_size
        for b in range(start, len(self)):
            yield self._batch(order[b * B : (b + 1) * B])

    def _batch(self, indices):
        if self.collate_fn is not None:
            return self.collate_fn([self.dataset[int(i)] for i in indices])
        if hasattr(self.dataset, "get_batch"):
            return self.dataset.get_batch(indices)
        # Any other dataset of (x, y) pairs: a loop over the batch, not over tokens.
        pairs = [self.dataset[int(i)] for i in indices]
        return np.stack([x for x, _ in pairs]), np.stack([y for _, y in pairs])

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1  # advanced now, so nested or abandoned iterations count too
        return self.epoch_batches(epoch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "seed": self.seed, "batch_size": self.batch_size,
                "shuffle": self.shuffle, "drop_last": self.drop_last,
                "n_windows": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        # A different data set or batch size would make "epoch k" mean other batches.
        for key in ("batch_size", "n_windows"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise ValueError(f"loader state has {key}={state[key]}, this loader has {mine}")
        self.seed = int(state.get("seed", self.seed))
        self.set_epoch(state["epoch"])


def split_train_val(text_or_ids, train_ratio: float = 0.9):
    """Split a text (by characters, as the book does) or a token id array by ratio.

    Returns (train, val): the first ``int(train_ratio * len)`` characters or ids, and
    the rest.
    """
    if not 0.0 <= train_ratio <= 1.0:
        raise ValueError(f"train_ratio must be in [0, 1], got {train_ratio}")
    data = text_or_ids if isinstance(text_or_ids, str) else np.asarray(text_or_ids)
    split = int(train_ratio * len(data))
    return data[:split], data[split:]


def _check_count(name: str, value) -> None:
    """A positive integer: 2.5 or True is refused, never truncated."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def create_dataloader(text: str, batch_size: int = 4, max_length: int = 256,
                      stride: int = 128, shuffle: bool = True, drop_last: bool = True,
                      seed: int = 0, tokenizer=None) -> DataLoader:
    """The book's create_dataloader_v1: tokenise, window, batch."""
    dataset = GPTDataset.from_text(text, tokenizer, max_length=max_length, stride=stride)
    return DataLoader(dataset, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed)


def tidy_text(text: str) -> str:
    """Reflow a plain-text manual so that its tokens go to words, not to whitespace.

    GPT-2's BPE gives every space of an indentation its own token and every line break
    one more: in Python's reference manual (``default_corpus``), hard-wrapped at 72
    characters and indented by 3 to 15 spaces, 18% of the 139k tokens are single spaces
    and 7% are newlines, many in the middle of a sentence. A small model trained on that
    spends its capacity, and its samples, on whitespace. So, paragraph by paragraph
    (paragraphs are separated by blank lines):

    - heading underlines (a line of one repeated ``* = - ~ ^ + #``) are dropped;
    - a paragraph whose first line is not indented by 3 or more spaces is prose or a
      list item: its lines are joined with single spaces into one line;
    - an indented paragraph is code or grammar: its lines are kept and their indentation
      is dropped (nested code loses its nesting: a tab per level, tried, left the small
      default model's samples with fewer words and more layout);
    - runs of spaces inside a line become one space, and paragraphs are separated by
      one blank line;
    - curly quotes become straight ones: GPT-2 spends two tokens on each, and a model
      that samples the first of the two alone prints a broken character.

    The words are untouched. On the manual: 139k -> 110k tokens (single-space tokens
    from 25k to none, line breaks from 9.1k to 7.7k).
    """
    paragraphs = []
    for block in re.split(r"\n[ \t]*\n", text.translate(_STRAIGHT_QUOTES)):
        lines = [line.rstrip() for line in block.split("\n") if line.strip() and not _RULE.match(line)]
        if not lines:
            continue
        indents = [len(line) - len(line.lstrip(" ")) for line in lines]
        if indents[0] < 3:  # prose or a list item: one line
            paragraphs.append(" ".join(" ".join(line.split()) for line in lines))
        else:  # code or grammar: keep the lines, drop the indentation
            paragraphs.append("\n".join(" ".join(line.split()) for line in lines))
    return "\n\n".join(paragraphs) + "\n"


_RULE = re.compile(r"^\s*([*=\-~^+#])\1{2,}\s*$")  # a heading underline
_STRAIGHT_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})


def default_corpus(tidy: bool = True) -> str:
    """A training text that needs no download: Python's own reference-manual topics.

    ``pydoc_data.topics`` ships with CPython (it is what ``help("if")`` prints), about
    0.5 MB of English prose and code examples. Keys are sorted so the text is the same
    on every machine with the same Python. ``tidy`` (the default) passes it through
    ``tidy_text``, which removes the indentation and hard line wraps that would
    otherwise be a quarter of its tokens; ``tidy=False`` gives the text as pydoc has it.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions strip pydoc_data
        raise RuntimeError(
            "default_corpus() needs the standard library's pydoc_data package, which this "
            "Python lacks; pass a text file instead (load_text(path))"
        ) from e
    text = "\n\n".join(topics[key] for key in sorted(topics))
    return tidy_text(text) if tidy else text


def load_text(path) -> str:
    """Read a UTF-8 text file, with an error that names the missing path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training text {str(path)!r} does not exist (or is not a file)")
    return path.read_text(encoding="utf-8")
