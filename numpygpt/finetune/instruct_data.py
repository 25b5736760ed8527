"""Instruction data, the book's chapter 7: Alpaca-style entries, the prompt format, the
85/10/5 split and padded batches with masked targets.

    entries = load_instruction_data("instruction-data.json")
    train, test, val = split_data(entries)                    # 85% / 10% / the rest, in file order
    loader = DataLoader(InstructionDataset(train), 8, collate_fn=collate_instructions)

A training text is the Alpaca prompt (``format_input``) followed by
``"\\n\\n### Response:\\n" + output``, tokenised with GPT-2's BPE.

Batches of different lengths are padded on the right with ``<|endoftext|>`` (50256); see
``collate_instructions``. Right padding needs no attention mask: under the causal mask a
position attends only to itself and the positions before it, and the padding comes after
every real token, so the real tokens' logits are exactly those of the unpadded sequence,
and the padding's own targets are ``ignore_index`` (all but the first, which teaches the
model to stop), so they add nothing to the loss.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from ..fileio import read_json
from ..tokenizer import EOT_ID

__all__ = [
    "PREAMBLE", "RESPONSE_HEADER", "BOOK_DATA_URL", "format_input", "format_example", "validate_entries",
    "load_instruction_data", "download_book_data", "split_data", "Example", "InstructionDataset",
    "collate_instructions", "extract_response", "tokenize_example",
]

PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")
RESPONSE_HEADER = "\n\n### Response:\n"
BOOK_DATA_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/"
                 "ch07/01_main-chapter-code/instruction-data.json")


# -- the prompt ------------------------------------------------------------------------------

def format_input(entry: dict) -> str:
    """The book's Alpaca prompt: preamble, instruction, and the input when it is not empty."""
    text = PREAMBLE + "\n\n### Instruction:\n" + entry["instruction"]
    if entry.get("input"):
        text += "\n\n### Input:\n" + entry["input"]
    return text


def format_example(entry: dict) -> str:
    """The full training text: the prompt, then the response header and the output."""
    return format_input(entry) + RESPONSE_HEADER + entry["output"]


# -- the data ----------------------------------------------------------------------------------

def validate_entries(data, source: str = "data") -> list[dict]:
    """Check the book's format, a JSON list of {"instruction", "input", "output"} objects, and
    return the entries with ``input`` filled in ("" when missing or null). Other keys are kept
    but not used. Raises ValueError naming the first problem (and the entry's index)."""
    if not isinstance(data, list):
        raise ValueError(f"{source}: expected a JSON list of {{instruction, input, output}} entries, "
                         f"got a JSON {type(data).__name__}")
    if not data:
        raise ValueError(f"{source}: the list of entries is empty")
    entries = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ValueError(f"{source}: entry {i} is a {type(entry).__name__}, not an object")
        for key in ("instruction", "output"):
            if key not in entry:
                raise ValueError(f"{source}: entry {i} has no {key!r}")
            if not isinstance(entry[key], str):
                raise ValueError(f"{source}: entry {i}'s {key!r} is a {type(entry[key]).__name__}, not a string")
        if not entry["instruction"].strip():
            raise ValueError(f"{source}: entry {i}'s 'instruction' is empty")
        value = entry.get("input")
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{source}: entry {i}'s 'input' is a {type(value).__name__}, not a string")
        entries.append({**entry, "input": value or ""})
    return entries


def load_instruction_data(path) -> list[dict]:
    """Read and check an instruction file (see ``validate_entries``)."""
    return validate_entries(read_json(path, "instruction data"), source=os.fspath(path))


def download_book_data(cache_dir=None) -> str:
    """The book's instruction-data.json (1,100 entries), downloaded once into the cache.

    Offline, the error says how to pass a local copy instead."""
    from ..download import default_cache_dir, download_file

    directory = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
    path = os.path.join(directory, "instruction-data.json")
    if not os.path.isfile(path):
        os.makedirs(directory, exist_ok=True)
        try:
            download_file(BOOK_DATA_URL, path, verify=load_instruction_data)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(
                f"no --data given and the book's instruction data could not be downloaded from "
                f"{BOOK_DATA_URL} ({e}); download it where you are online and pass it with "
                "--data instruction-data.json") from e
    return path


def split_data(entries: list, train_frac: float = 0.85, test_frac: float = 0.10):
    """(train, test, val) in file order, no shuffle, as the book splits: the first
    ``int(0.85 n)`` entries train, the next ``int(0.1 n)`` test, the rest validate."""
    n = len(entries)
    n_train, n_test = int(n * train_frac), int(n * test_frac)
    return entries[:n_train], entries[n_train:n_train + n_test], entries[n_train + n_test:]


class Example(NamedTuple):
    """One tokenised training text and how many of its tokens are the prompt."""
    token_ids: np.ndarray  # (n,) int64
    prompt_length: int


def extract_response(continuation: str) -> str:
    """The response in a generated continuation of a prompt, as the book cuts it out
    (``generated_text[len(input_text):].replace("### Response:", "").strip()``): every
    "### Response:" removed, wherever it is, and the rest stripped."""
    return continuation.replace(RESPONSE_HEADER.strip(), "").strip()


def tokenize_example(tokenizer, entry: dict) -> tuple[list[int], int]:
    """(ids of ``format_example``, how many of them ``format_input``'s are): the book's
    training text and its prompt's length, which ``mask_instruction`` needs."""
    return tokenizer.encode(format_example(entry)), len(tokenizer.encode(format_input(entry)))


class InstructionDataset:
    """Entries tokenised once: ``dataset[i]`` is an ``Example`` (ids of ``format_example``,
    and the length of ``format_input``'s ids, which ``mask_instruction`` needs), or with
    ``prompts`` (``finetune.prompts``) in that format (the model's chat template).

    ``too_long`` lists the entries with more than ``max_length`` tokens: the collate cuts
    them to ``max_length`` (the book's ``allowed_max_length``), so their ends, and their
    end-of-text target, are not trained on.
    """

    def __init__(self, entries: list, tokenizer=None, max_length: int | None = None, prompts=None):
        from ..tokenizer import get_tokenizer

        tokenizer = tokenizer or get_tokenizer()
        self.examples = []
        for entry in entries:
            ids, prompt_length = prompts.tokenize(entry) if prompts is not None else tokenize_example(tokenizer, entry)
            self.examples.append(Example(np.asarray(ids, dtype=np.int64), prompt_length))
        self.too_long = ([i for i, ex in enumerate(self.examples) if len(ex.token_ids) > max_length]
                         if max_length is not None else [])

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i) -> Example:
        return self.examples[i]


# -- the collate function ------------------------------------------------------------------------

def collate_instructions(batch, pad_id: int = EOT_ID, ignore_index: int = -100,
                         allowed_max_length: int | None = 1024, mask_instruction: bool = False):
    """Pad a list of token sequences into (inputs (B, T), targets (B, T)) int64 host arrays.

    The book's ``custom_collate_fn``: every sequence gets one ``pad_id`` (the end-of-text
    token) and is padded with ``pad_id`` to the batch's longest + 1, L = max(n) + 1; inputs
    are positions [0, L - 1), targets positions [1, L). In the targets every padding token
    but the first becomes ``ignore_index``, so the model learns to emit one end-of-text and
    the rest of the padding adds nothing to the loss. Then both are cut to
    ``allowed_max_length`` (None: no cut). Padding is on the right: see the module
    docstring for why no attention mask is needed.

    ``mask_instruction`` (the book's exercise 7.2) also sets the targets that predict a
    prompt token to ``ignore_index``, so only the response (from the "### Response:" header
    on) and the end-of-text are trained. It needs ``Example`` items (with the prompt
    length); plain sequences of ids are accepted otherwise.

    Targets are masked by position, not by value: an end-of-text token inside a text
    stays a target (the book's version masks every 50256 after the first by value).
    """
    seqs = [np.asarray(item.token_ids if isinstance(item, Example) else item, dtype=np.int64)
            for item in batch]
    if not seqs:
        raise ValueError("collate_instructions got an empty batch")
    if any(s.ndim != 1 or s.size == 0 for s in seqs):
        raise ValueError("every item must be a non-empty 1-D sequence of token ids")
    if allowed_max_length is not None and allowed_max_length < 1:
        raise ValueError(f"allowed_max_length must be >= 1 or None, got {allowed_max_length}")
    lengths = np.array([s.size for s in seqs])  # (B,) n
    B, L = len(seqs), int(lengths.max()) + 1
    positions = np.arange(L)  # (L,)
    padded = np.full((B, L), pad_id, dtype=np.int64)  # (B, L)
    padded[positions[None, :] < lengths[:, None]] = np.concatenate(seqs)  # row-major fill
    inputs = padded[:, :-1].copy()  # (B, L-1)
    targets = padded[:, 1:].copy()  # (B, L-1); target j is token j + 1
    # target j is padding when j + 1 > n; the first padding token (j = n - 1) stays
    targets[positions[None, :-1] >= lengths[:, None]] = ignore_index
    if mask_instruction:
        if not all(isinstance(item, Example) for item in batch):
            raise ValueError("mask_instruction needs Example items (InstructionDataset's), "
                             "which carry the prompt length")
        prompt_lengths = np.array([item.prompt_length for item in batch])  # (B,) P
        # target j predicts token j + 1, a prompt token while j + 1 < P
        targets[positions[None, :-1] < prompt_lengths[:, None] - 1] = ignore_index
    if allowed_max_length is not None:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    return np.ascontiguousarray(inputs), np.ascontiguousarray(targets)


# -- responses -------------------------------------------------------------------------------------
