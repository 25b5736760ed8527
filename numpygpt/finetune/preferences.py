"""Making preference data, as the book's DPO notebook does: a local model (through the judge's
Ollama-compatible client, ``judge.query_judge``) rewrites each entry's output to be a little
more polite, or a little less, and the politer of the two answers becomes ``chosen``.

    pairs = make_preferences(entries, judge_model="llama3", out_path="preferences.json")

For each entry a seeded generator picks "polite" or "impolite" (the book's random choice); the
rewrite is ``chosen`` and the original output ``rejected`` for "polite", the other way round
for "impolite". The file is rewritten after every answer (atomically) and a rerun with the same
output file keeps the pairs already made, so an interrupted run loses nothing. An empty answer
is not a response: that entry is left out, counted, and listed in ``<out>-skipped.json``.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..fileio import write_json
from ..progress import progress_bar
from .instruct_data import format_input, load_instruction_data
from .judge import DEFAULT_JUDGE_URL, JudgeError, query_judge

__all__ = ["politeness_prompt", "make_preferences", "make_preferences_file", "POLITENESS"]

POLITENESS = ("polite", "impolite")


def politeness_prompt(entry: dict, politeness: str) -> str:
    """The book's request: rewrite the correct output slightly, to be more ``politeness``."""
    return (f"Given the input `{format_input(entry)}` "
            f"and correct output `{entry['output']}`, "
            f"slightly rewrite the output to be more {politeness}. "
            "Keep the modification minimal. "
            "Only return the generated response and nothing else.")


def _pair(entry: dict, politeness: str, rewrite: str) -> dict:
    if politeness == "polite":
        return {**entry, "chosen": rewrite, "rejected": entry["output"]}
    return {**entry, "chosen": entry["output"], "rejected": rewrite}


def make_preferences(entries: list, judge_model: str = "llama3", judge_url: str = DEFAULT_JUDGE_URL,
                     out_path=None, seed: int = 123, timeout: float = 120.0, progress: bool = True) -> dict:
    """Each entry (``{instruction, input, output}``) with ``chosen`` and ``rejected`` added.
    Returns {"pairs": [...], "skipped": [indices of entries whose rewrite came back empty]}.
    With ``out_path`` the pairs so far are written there after every answer, and pairs already
    there (same entry, at the same place) are kept instead of being asked again."""
    choices = np.random.default_rng(seed).integers(0, 2, len(entries))  # (N,): all drawn up front, so a
    # rerun that skips the entries already done makes the same choices for the rest
    done = _previous(out_path, entries) if out_path is not None else []
    pairs, skipped = [p for p in done if p is not None], [i for i, p in enumerate(done) if p is None]
    for i in progress_bar(range(len(done), len(entries)), "rewriting", progress, initial=len(done),
                          total=len(entries)):
        politeness = POLITENESS[int(choices[i])]
        try:
            rewrite = query_judge(politeness_prompt(entries[i], politeness), judge_model, judge_url, timeout).strip()
        except JudgeError as e:
            if out_path is not None and pairs:
                raise JudgeError(f"{e}; the {len(pairs)} pairs so far are in {out_path}") from None
            raise
        if rewrite:
            pairs.append(_pair(entries[i], politeness, rewrite))
        else:
            skipped.append(i)
        if out_path is not None:
            write_json(out_path, pairs)
            _write_skipped(out_path, skipped)
    if out_path is not None and not entries:
        write_json(out_path, [])
    return {"pairs": pairs, "skipped": skipped}


def _skipped_path(out_path) -> str:
    stem, ext = os.path.splitext(os.fspath(out_path))
    return stem + "-skipped" + (ext or ".json")


def _write_skipped(out_path, skipped: list) -> None:
    """The indices of the entries left out, beside the pairs (so a rerun knows them)."""
    if skipped or os.path.exists(_skipped_path(out_path)):
        write_json(_skipped_path(out_path), skipped)


def _previous(out_path, entries: list) -> list:
    """Per leading entry already handled by an earlier run: its pair, or None if it was skipped."""
    try:
        with open(out_path, encoding="utf-8") as fh:
            pairs = json.load(fh)
    except (OSError, ValueError):
        return []
    try:
        with open(_skipped_path(out_path), encoding="utf-8") as fh:
            skipped = set(json.load(fh))
    except (OSError, ValueError, TypeError):
        skipped = set()
    if not isinstance(pairs, list):
        return []
    done, it = [], iter(pairs)
    fields = ("instruction", "input", "output")
    for i, entry in enumerate(entries):
        if i in skipped:
            done.append(None)
            continue
        pair = next(it, None)
        if not (isinstance(pair, dict) and all(pair.get(f) == entry.get(f) for f in fields)
                and isinstance(pair.get("chosen"), str) and isinstance(pair.get("rejected"), str)):
            break
        done.append(pair)
    return done


def make_preferences_file(path, judge_model: str = "llama3", judge_url: str = DEFAULT_JUDGE_URL, out_path=None,
                          seed: int = 123, timeout: float = 120.0, progress: bool = True, log=print) -> dict:
    """``numpygpt make-preferences``: pairs for an instruction file (``{instruction, input,
    output}``; finetune instruct's data) written to ``out_path`` (default: the file's name with
    ``-preferences`` before ``.json``) as they come; prints how many were made and left out."""
    if not timeout > 0:
        raise ValueError(f"the judge's timeout must be more than 0 seconds, got {timeout:g}")
    entries = load_instruction_data(path)
    if out_path is None:
        stem, ext = os.path.splitext(os.fspath(path))
        out_path = stem + "-preferences" + (ext or ".json")
    result = make_preferences(entries, judge_model, judge_url, out_path, seed, timeout, progress)
    log(f"Pairs: {len(result['pairs'])} of {len(entries)} entries")
    if result["skipped"]:
        log(f"Left out (empty rewrite): {len(result['skipped'])} (entries {', '.join(map(str, result['skipped'][:5]))}"
            f"{', ...' if len(result['skipped']) > 5 else ''})")
    log(f"Preferences: {out_path}")
    result["out_path"] = out_path
    return result
