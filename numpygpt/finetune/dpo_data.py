"""Preference data for DPO, the book's chapter 7 follow-up: pairs of a chosen and a rejected
response to one Alpaca-style prompt, tokenised, split and padded into batches.

    entries = load_preference_data("instruction-data-with-preference.json")
    train, test, val = split_data(entries)                  # 85% / 10% / the rest, in file order
    loader = DataLoader(PreferenceDataset(train), 8, collate_fn=collate_preferences)

An entry is the book's ``{"instruction", "input", "output", "chosen", "rejected"}`` (``output`` is
not used). Both texts are the prompt (``format_input``), the response header and a response
(or, with ``prompts`` from ``finetune.prompts``, the model's chat template and a response
ended by its stop token);
a batch pads chosen and rejected to one length (so the policy runs them as one (2B, T)
batch) and masks every target that is not a response token: the prompt, the header and the
padding. (The book leaves the header's last tokens in its mask; numpygpt counts the response
alone: the header is the same in both texts and says nothing about which one is preferred.)
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from ..fileio import read_json
from ..tokenizer import EOT_ID
from .instruct_data import split_data, validate_entries
from .prompts import AlpacaPrompts

__all__ = ["validate_preferences", "load_preference_data", "split_data", "PreferencePair", "PreferenceDataset",
           "collate_preferences", "BATCH_KEYS"]

BATCH_KEYS = ("chosen", "chosen_targets", "chosen_mask", "rejected", "rejected_targets", "rejected_mask")


def validate_preferences(data, source: str = "data") -> list[dict]:
    """Check the book's preference format, a JSON list of {"instruction", "input", "chosen",
    "rejected"} objects (``output`` optional), and return the entries with ``input`` filled in.
    Raises ValueError naming the first problem and the entry's index."""
    if isinstance(data, list):
        data = [{"output": "", **entry} if isinstance(entry, dict) else entry for entry in data]
    entries = validate_entries(data, source)
    for i, entry in enumerate(entries):
        for key in ("chosen", "rejected"):
            if key not in entry:
                raise ValueError(f"{source}: entry {i} has no {key!r} response (a preference entry needs "
                                 "'instruction', 'chosen' and 'rejected')")
            if not isinstance(entry[key], str):
                raise ValueError(f"{source}: entry {i}'s {key!r} is a {type(entry[key]).__name__}, not a string")
            if not entry[key].strip():
                raise ValueError(f"{source}: entry {i}'s {key!r} response is empty")
    return entries


def load_preference_data(path) -> list[dict]:
    """Read and check a preference file (see ``validate_preferences``)."""
    return validate_preferences(read_json(path, "preference data"), source=os.fspath(path))


class PreferencePair(NamedTuple):
    """One tokenised entry: both full texts and how many of their tokens are the prompt (the
    Alpaca prompt and the response header, shared by both)."""
    chosen: np.ndarray  # (n_c,) int64
    rejected: np.ndarray  # (n_r,) int64
    prompt_length: int


class PreferenceDataset:
    """Entries tokenised once: ``dataset[i]`` is a ``PreferencePair``. A text is the prompt's
    tokens followed by the response's, so the mask's boundary is exact.

    ``max_length`` (the book's ``allowed_max_length``): an entry whose prompt leaves no
    response token inside it is refused (its log-probability would be empty); ``too_long``
    lists the entries whose responses are cut.
    """

    def __init__(self, entries: list, tokenizer=None, max_length: int | None = None, source: str = "data",
                 prompts=None):
        from ..tokenizer import get_tokenizer

        prompts = prompts or AlpacaPrompts(tokenizer or get_tokenizer())
        self.pairs, self.too_long = [], []
        for i, entry in enumerate(entries):
            prompt = prompts.response_prompt(entry)
            chosen, rejected = (np.asarray(prompt + prompts.response(entry[key]), dtype=np.int64)
                                for key in ("chosen", "rejected"))
            P = len(prompt)
            if max_length is not None and P > max_length:
                raise ValueError(f"{source}: entry {i}'s prompt is {P} tokens, more than the allowed length "
                                 f"{max_length}: no response token would be trained (raise the allowed length "
                                 "or shorten the prompt)")
            if max_length is not None and max(len(chosen), len(rejected)) - 1 > max_length:
                self.too_long.append(i)
            self.pairs.append(PreferencePair(chosen, rejected, P))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i) -> PreferencePair:
        return self.pairs[i]


def collate_preferences(batch, pad_id: int = EOT_ID, allowed_max_length: int | None = None) -> dict:
    """A list of ``PreferencePair`` -> a dict of (B, T) host arrays (``BATCH_KEYS``): for chosen
    and rejected, the inputs (int64), the targets (the inputs shifted by one) and the mask
    (bool, True on the targets that are response tokens).

    Both halves are padded with ``pad_id`` to one length, the batch's longest text less one
    (the last token is only a target), then cut to ``allowed_max_length`` (None: no cut).
    Target j predicts token j + 1; it is counted when that token is a response token:
    P - 1 <= j < n - 1 for a prompt of P tokens and a text of n. Padding is on the right,
    so under the causal mask the real tokens' logits are those of the unpadded text.
    """
    if not batch:
        raise ValueError("collate_preferences got an empty batch")
    if allowed_max_length is not None and allowed_max_length < 1:
        raise ValueError(f"allowed_max_length must be >= 1 or None, got {allowed_max_length}")
    prompt_lengths = np.array([pair.prompt_length for pair in batch])  # (B,) P
    L = max(max(len(pair.chosen), len(pair.rejected)) for pair in batch)  # the longest text
    positions = np.arange(L - 1)  # (T,) target positions, T = L - 1
    out = {}
    for key in ("chosen", "rejected"):
        seqs = [getattr(pair, key) for pair in batch]
        lengths = np.array([len(s) for s in seqs])  # (B,) n
        padded = np.full((len(seqs), L), pad_id, dtype=np.int64)  # (B, L)
        padded[np.arange(L)[None, :] < lengths[:, None]] = np.concatenate(seqs)  # row-major fill
        mask = (positions[None, :] >= prompt_lengths[:, None] - 1) & (positions[None, :] < lengths[:, None] - 1)
        cut = slice(0, allowed_max_length)
        out[key] = np.ascontiguousarray(padded[:, :-1][:, cut])  # (B, T)
        out[key + "_targets"] = np.ascontiguousarray(padded[:, 1:][:, cut])  # (B, T)
        out[key + "_mask"] = np.ascontiguousarray(mask[:, cut])  # (B, T)
    return out
