"""Scoring responses with a judge model, the book's section 7.8.

    result = score_responses(entries, judge_model="llama3", judge_url="http://localhost:11434",
                             out_path="test-responses-scores.json")
    result["average"], result["unreadable"]

Each entry's prompt, correct output and ``model_response`` go to an Ollama-compatible
``/api/chat`` endpoint (``ollama serve`` with ``ollama pull llama3``) with the book's
options (seed 123, temperature 0, context 2048) and ``"stream": false``; the judge answers
with a score from 0 to 100. Only the standard library talks to the server (urllib).

Failures the user can act on (no server, a timeout, an HTTP error, a reply that is not
JSON) raise ``JudgeError`` with one line that says what happened. Scores are written to
``out_path`` after every entry (atomically), so nothing is lost, and a rerun with the
same file reuses the entries already scored.
"""

from __future__ import annotations

import json
import os
import socket
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.request import ProxyHandler, Request, build_opener

from ..fileio import write_json
from ..progress import progress_bar
from .instruct_data import format_input, validate_entries

__all__ = ["JudgeError", "judge_prompt", "chat_request", "query_judge", "parse_score", "load_responses",
           "score_responses", "DEFAULT_JUDGE_URL"]

DEFAULT_JUDGE_URL = "http://localhost:11434"
_LOOPBACK = ("localhost", "127.0.0.1", "::1")


class JudgeError(RuntimeError):
    """The judge could not be asked or its reply could not be read."""


def judge_prompt(entry: dict, key: str = "model_response") -> str:
    """The book's scoring prompt for one entry."""
    return (f"Given the input `{format_input(entry)}` "
            f"and correct output `{entry['output']}`, "
            f"score the model response `{entry[key]}`"
            f" on a scale from 0 to 100, where 100 is the best score. "
            f"Respond with the integer number only.")


def chat_request(prompt: str, model: str = "llama3", seed: int = 123, num_ctx: int = 2048) -> dict:
    """The JSON body of an ``/api/chat`` request: one user message, deterministic options."""
    return {"model": model,
            "messages": [{"role": "user", "content": prompt}],
            "options": {"seed": seed, "temperature": 0, "num_ctx": num_ctx},
            "stream": False}


def _endpoint(url: str) -> str:
    """``http://host:port`` or a full ``.../api/chat`` URL -> the chat endpoint."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise JudgeError(f"judge URL {url!r} must start with http:// or https:// and name a host")
    return url if parts.path.rstrip("/").endswith("/api/chat") else url.rstrip("/") + "/api/chat"


def query_judge(prompt: str, model: str = "llama3", url: str = DEFAULT_JUDGE_URL, timeout: float = 120.0,
                **options) -> str:
    """Ask the judge once; returns its answer's text (``message.content``).

    A server that streams anyway (one JSON object a line) is read too: the contents of
    the lines are joined, as the book's streaming reader does."""
    endpoint = _endpoint(url)
    body = json.dumps(chat_request(prompt, model, **options)).encode("utf-8")
    request = Request(endpoint, data=body, method="POST", headers={"Content-Type": "application/json"})
    # a judge on this machine is never behind a proxy, even when http_proxy is set
    opener = build_opener(ProxyHandler({})) if urlsplit(endpoint).hostname in _LOOPBACK else build_opener()
    try:
        with opener.open(request, timeout=timeout) as response:
            raw = response.read().decode("utf-8", errors="replace")
    except HTTPError as e:
        detail = e.read().decode("utf-8", errors="replace").strip().replace("\n", " ")[:200]
        raise JudgeError(f"the judge at {endpoint} answered HTTP {e.code} {e.reason}"
                         + (f": {detail}" if detail else "")) from None
    except (TimeoutError, socket.timeout) as e:
        raise JudgeError(f"the judge at {endpoint} did not answer within {timeout:g} s") from e
    except URLError as e:
        if isinstance(e.reason, (TimeoutError, socket.timeout)):
            raise JudgeError(f"the judge at {endpoint} did not answer within {timeout:g} s") from None
        raise JudgeError(f"cannot reach the judge at {endpoint} ({e.reason}); is it running "
                         f"(ollama serve, then ollama pull {model})?") from None
    except (ConnectionError, OSError) as e:
        raise JudgeError(f"the connection to the judge at {endpoint} failed ({e})") from None
    return _reply_text(raw, endpoint)


def _reply_text(raw: str, endpoint: str) -> str:
    excerpt = raw.strip().replace("\n", " ")[:120]
    try:
        messages = [json.loads(raw)]
    except json.JSONDecodeError:
        try:
            messages = [json.loads(line) for line in raw.splitlines() if line.strip()]
        except json.JSONDecodeError:
            raise JudgeError(f"the judge at {endpoint} sent a reply that is not JSON: {excerpt!r}") from None
    parts = []
    for message in messages:
        content = message.get("message", {}).get("content") if isinstance(message, dict) else None
        if not isinstance(content, str):
            raise JudgeError(f"the judge at {endpoint} sent JSON without message.content: {excerpt!r}")
        parts.append(content)
    return "".join(parts)


def parse_score(reply: str) -> int | None:
    """The score in a judge's answer: an integer from 0 to 100 and nothing else (around it
    only white space), else None, which is counted as unreadable (the book skips them)."""
    try:
        score = int(reply.strip())
    except ValueError:
        return None
    return score if 0 <= score <= 100 else None


def load_responses(path, key: str = "model_response") -> list[dict]:
    """A responses file (``finetune_instruct``'s test-responses.json): entries with ``key``."""
    from .instruct import load_instruction_data

    entries = load_instruction_data(path)
    for i, entry in enumerate(entries):
        if not isinstance(entry.get(key), str):
            raise ValueError(f"{os.fspath(path)}: entry {i} has no {key!r} string to score")
    return entries


def score_responses(entries: list, judge_model: str = "llama3", judge_url: str = DEFAULT_JUDGE_URL,
                    out_path=None, key: str = "model_response", timeout: float = 120.0,
                    progress: bool = True) -> dict:
    """Score every entry's ``key`` with the judge. Returns {"scores": [int or None, ...],
    "average": mean of the readable scores (None if none), "unreadable": how many answers
    were not a score}.

    With ``out_path`` the entries scored so far, each with ``score`` and ``judge_reply``,
    are rewritten there after every answer; entries already in that file (same
    instruction, input, output and response, at the same place) are not asked again.
    """
    entries = validate_entries(entries, "responses")
    scored = _previous_scores(out_path, entries, key) if out_path is not None else []
    for entry in progress_bar(entries[len(scored):], "scoring", progress, initial=len(scored),
                              total=len(entries)):
        try:
            reply = query_judge(judge_prompt(entry, key), judge_model, judge_url, timeout)
        except JudgeError as e:
            if out_path is not None and scored:
                raise JudgeError(f"{e}; the {len(scored)} scores so far are in {out_path}") from None
            raise
        scored.append({**entry, "score": parse_score(reply), "judge_reply": reply})
        if out_path is not None:
            write_json(out_path, scored)
    scores = [s["score"] for s in scored]
    readable = [s for s in scores if s is not None]
    return {"scores": scores, "average": sum(readable) / len(readable) if readable else None,
            "unreadable": len(scores) - len(readable), "entries": scored}


def _previous_scores(out_path, entries: list, key: str) -> list:
    """The leading entries of an earlier run's scores file that match ``entries``."""
    if not os.path.isfile(out_path):
        return []
    try:
        with open(out_path, encoding="utf-8") as fh:
            previous = json.load(fh)
    except (OSError, ValueError):
        return []
    if not isinstance(previous, list):
        return []
    kept = []
    fields = ("instruction", "input", "output", key)
    for old, entry in zip(previous, entries):
        if not (isinstance(old, dict) and "score" in old and all(old.get(f) == entry.get(f) for f in fields)):
            break
        kept.append(old)
    return kept


def score_file(path, judge_model: str = "llama3", judge_url: str = DEFAULT_JUDGE_URL, out_path=None,
               key: str = "model_response", timeout: float = 120.0, progress: bool = True, log=print) -> dict:
    """``numpygpt score-responses``: score a responses file, print the average and how many
    answers could not be read. Scores go to ``out_path`` (default: the file's name with
    ``-scores`` before ``.json``) as they come."""
    if not timeout > 0:
        raise ValueError(f"the judge's timeout must be more than 0 seconds, got {timeout:g}")
    entries = load_responses(path, key)
    if out_path is None:
        stem, ext = os.path.splitext(os.fspath(path))
        out_path = stem + "-scores" + (ext or ".json")
    result = score_responses(entries, judge_model, judge_url, out_path, key, timeout, progress)
    n, bad = len(result["scores"]), result["unreadable"]
    average = "none (no answer was a number)" if result["average"] is None else f"{result['average']:.2f}"
    log(f"Number of scores: {n - bad} of {n}")
    log(f"Average score: {average}")
    log(f"Unreadable answers: {bad}")
    log(f"Scores: {out_path}")
    result["out_path"] = out_path
    return result
