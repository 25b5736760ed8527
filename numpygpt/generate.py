"""Text generation: greedy decoding and temperature / top-k / top-p sampling, with a KV cache.

    ids = generate(model, prompt_ids, max_new_tokens=50, temperature=0.8, top_k=40, seed=123)
    text = generate_text(model, "Every effort moves you", max_new_tokens=20)

The loop is the book's (chapter 4/5): look at the last ``context_size`` tokens, take the
logits of the last position, pick the next token, append it. Two things are added:

* A KV cache. The cropped prompt is run once (prefill) and every later step feeds only
  the new token, so a step costs one position instead of the whole window. Once the
  sequence outgrows ``context_size`` the window slides and every token changes
  position, which cached keys cannot follow, so from then on each step recomputes the
  window without the cache, exactly as the uncached loop does. Cached and uncached
  generation therefore pick the same tokens in every case.
* Sampling on the host. Only the last position's logits, (B, V), leave the device each
  step; the filters and the draw run in NumPy from ``numpy.random.default_rng(seed)``,
  so a seed gives the same tokens on CPU and GPU.

End of sequence (``eos_id``): a row that picks ``eos_id`` is finished and the token is not
kept, as in the book (``if idx_next == eos_id: break`` comes before the append). Arrays are
rectangular, so while other rows are still going a finished row is padded with ``eos_id``;
generation stops when every row has finished. With one row the output therefore ends just
before the eos token, exactly like the book's; with several, strip trailing ``eos_id``
from a row to get what that row would have produced alone.
"""

from __future__ import annotations

import numpy as np

from . import backend
from .nn.module import eval_mode, no_grad

__all__ = ["generate", "generate_text", "sample_next", "top_k_filter", "top_p_filter", "SAMPLING_DEFAULTS",
           "describe_sampling"]


# -- filters and the draw (host, NumPy) ------------------------------------------------------

def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Set every logit below the k-th largest of its row to -inf (the book's rule: a logit
    tied with the k-th largest is kept). logits: (B, V) -> (B, V), a new array."""
    V = logits.shape[-1]
    if k >= V:
        return logits.copy()
    kth = np.partition(logits, V - k, axis=-1)[:, V - k:V - k + 1]  # (B, 1) k-th largest
    return np.where(logits < kth, -np.inf, logits)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filter: keep the smallest set of most likely tokens whose probabilities sum to
    at least ``p`` (always at least the most likely one), set the rest to -inf.

    A token is kept iff the probability of the tokens ranked above it sums to less than p.
    logits: (B, V) -> (B, V), a new array.
    """
    if p >= 1.0:
        return logits.copy()
    probs = _softmax(logits)  # (B, V)
    order = np.argsort(-probs, axis=-1, kind="stable")  # (B, V) most likely first
    sorted_probs = np.take_along_axis(probs, order, axis=-1)
    mass_above = np.cumsum(sorted_probs, axis=-1) - sorted_probs  # (B, V)
    keep_sorted = mass_above < p
    keep_sorted[:, 0] = True  # the top token survives even when rounding says otherwise
    keep = np.empty_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    return np.where(keep, logits, -np.inf)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def sample_next(logits, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, rng=None) -> np.ndarray:
    """Next token of each row from last-position logits (B, V) -> (B,) int64 NumPy array.

    ``temperature == 0``: argmax (greedy; top_k and top_p cannot change the argmax).
    Otherwise ``logits / temperature`` -> top-k -> top-p -> one draw per row from the
    softmax, by inverse CDF with ``rng`` (a NumPy Generator, or a seed for
    ``numpy.random.default_rng``). Works in float64 on the host.

    Non-finite logits: a NaN, or a row that is all -inf, is a ValueError (there is no
    distribution to sample from); +inf means certainty: the row picks among its +inf
    tokens only. A temperature so small that ``logits / temperature`` overflows is a
    ValueError (use 0 for greedy decoding).
    """
    _check_sampling(temperature, top_k, top_p)
    logits = np.asarray(backend.to_host(logits), dtype=np.float64)
    if logits.ndim != 2:
        raise ValueError(f"sample_next expects logits of shape (B, V), got {logits.shape}")
    logits = _certain_tokens(logits)
    if temperature == 0.0:
        return logits.argmax(axis=-1).astype(np.int64)
    rng = np.random.default_rng(rng)  # a Generator passes through unchanged
    with np.errstate(over="ignore"):
        scaled = logits / temperature
    finite = np.isfinite(logits)
    if not np.isfinite(scaled[finite]).all():
        raise ValueError(f"temperature {temperature!r} is too small: logits / temperature overflows; "
                         "use temperature 0 for greedy decoding")
    logits = scaled
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = _softmax(logits)  # (B, V); filtered tokens have probability exactly 0
    cdf = np.cumsum(probs, axis=-1)  # (B, V)
    u = rng.random(probs.shape[0]) * cdf[:, -1]  # (B,) uniform on [0, total)
    # token j is drawn when cdf[j-1] <= u < cdf[j]: count the cdf entries <= u
    nxt = (cdf <= u[:, None]).sum(axis=-1)
    # rounding could push u onto the total; never step past the last possible token
    last = probs.shape[1] - 1 - np.argmax(probs[:, ::-1] > 0, axis=-1)
    return np.minimum(nxt, last).astype(np.int64)


def _certain_tokens(logits: np.ndarray) -> np.ndarray:
    """Refuse NaN and all -inf rows; in a row holding +inf, only its +inf tokens remain
    possible (logit 0), the rest get -inf. logits: (B, V) float64."""
    nan_rows = np.isnan(logits).any(axis=-1)
    if nan_rows.any():
        raise ValueError(f"the logits of row {int(np.argmax(nan_rows))} contain NaN: the model's output is broken")
    dead = (logits == -np.inf).all(axis=-1)
    if dead.any():
        raise ValueError(f"every logit of row {int(np.argmax(dead))} is -inf: no token can be sampled")
    sure = logits == np.inf  # (B, V)
    rows = sure.any(axis=-1, keepdims=True)  # (B, 1)
    if not rows.any():
        return logits
    return np.where(rows, np.where(sure, 0.0, -np.inf), logits)


def _check_sampling(temperature, top_k, top_p) -> None:
    if not (isinstance(temperature, (int, float, np.floating, np.integer)) and temperature >= 0.0):
        raise ValueError(f"temperature must be a number >= 0 (0 means greedy), got {temperature!r}")
    if not np.isfinite(temperature):
        raise ValueError(f"temperature must be finite, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float, np.floating)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] (or None), got {top_p!r}")


# -- the generation loop ------------------------------------------------------------------------


def _prompt_array(idx, device_name: str, vocab_size: int):
    """NumPy/CuPy/list, (B, T) or (T,) -> (B, T) int64 array on ``device_name``, its ids
    checked against [0, vocab_size) here on the host (the model does not check device ids)."""
    host = backend.to_host(idx)  # a prompt crosses once; the ids are checked on the host
    if host.ndim == 1:
        host = host[None, :]  # (T,) -> (1, T)
    if host.ndim != 2:
        raise ValueError(f"prompt token ids must have shape (B, T) or (T,), got {host.shape}")
    if host.shape[0] == 0 or host.shape[1] == 0:
        raise ValueError(f"prompt is empty (shape {host.shape}): generation needs at least one token per row")
    if not np.issubdtype(host.dtype, np.integer):
        raise ValueError(f"prompt token ids must be integers, got dtype {host.dtype}")
    lo, hi = int(host.min()), int(host.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"prompt token id {lo if lo < 0 else hi} is out of range: the model's vocabulary "
                         f"has {vocab_size} tokens")
    return backend.to_device(host, dtype="int64", device_name=device_name)


def _check_generate_args(model, max_new_tokens, context_size, eos_id) -> int:
    """The checks of ``generate``'s arguments (ValueError); returns the context size to use."""
    if getattr(model.cfg, "num_classes", None) is not None:
        raise ValueError("this model is a classifier (to_classifier): it labels text and cannot generate tokens")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    T_max = model.cfg.context_length
    if context_size is None:
        context_size = T_max
    if isinstance(context_size, bool) or not isinstance(context_size, (int, np.integer)) or not 1 <= context_size <= T_max:
        raise ValueError(
            f"context_size must be an integer in [1, {T_max}] (the model's context_length), got {context_size!r}"
        )
    if eos_id is not None and not (isinstance(eos_id, (int, np.integer)) and 0 <= eos_id < model.cfg.vocab_size):
        raise ValueError(f"eos_id must be a token id in [0, {model.cfg.vocab_size}) or None, got {eos_id!r}")
    return context_size


def generate(model, idx, max_new_tokens: int, context_size: int | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, seed=None, use_cache: bool = True):
    """Continue token sequences; returns (B, T + n) int64 ids on the model's device, n <= max_new_tokens.

    idx: (B, T) or (T,) token ids (NumPy, CuPy or a list); (T,) is a batch of one and
        comes back as (1, T + n). The whole prompt is returned; only the last
        ``context_size`` tokens are shown to the model.
    context_size: tokens the model sees (default and maximum: ``model.cfg.context_length``).
    temperature, top_k, top_p: see ``sample_next``; temperature 0 is greedy.
    eos_id: rows stop at this token, which is not kept; finished rows are padded with
        eos_id until every row has finished (see the module docstring).
    seed: seed (or NumPy Generator) for the sampling draws.
    use_cache: feed one token per step through a KV cache (same tokens as without it).

    Runs under ``no_grad()`` in eval mode (dropout off); every module's train/eval mode is
    restored afterwards.
    """
    _check_sampling(temperature, top_k, top_p)
    context_size = _check_generate_args(model, max_new_tokens, context_size, eos_id)
    dev = model.device
    seq = _prompt_array(idx, dev, model.cfg.vocab_size)  # (B, T)
    B = seq.shape[0]
    xp = backend.array_module(seq)
    rng = np.random.default_rng(seed)
    finished = np.zeros(B, dtype=bool)

    with eval_mode(model), no_grad():
        caches = None
        for _ in range(max_new_tokens):
            L = seq.shape[1]
            if use_cache and L <= context_size:
                # the sequence still fits: positions 0..L-1 are those of the uncached window
                if caches is None:
                    caches = model.new_kv_caches()
                    logits = model(seq, caches)  # prefill: (B, L, V)
                else:
                    logits = model(seq[:, -1:], caches)  # one new position: (B, 1, V)
            else:
                # the window slides (or no cache): every token changes position, recompute
                caches = None
                logits = model(seq[:, -context_size:])  # (B, min(L, context_size), V)
            nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, rng)  # (B,) host
            if eos_id is not None:
                finished |= nxt == eos_id
                if finished.all():
                    break  # the book's rule: the eos token itself is not appended
                nxt[finished] = eos_id  # pad rows that are done
            seq = xp.concatenate([seq, backend.to_device(nxt[:, None], dtype="int64", device_name=dev)], axis=1)
    return seq


def generate_text(model, prompt: str, max_new_tokens: int = 50, tokenizer=None, **kw) -> str:
    """Encode ``prompt``, ``generate`` (keyword arguments pass through) and decode: returns
    the prompt followed by its continuation, as one string."""
    from .tokenizer import text_to_token_ids, token_ids_to_text

    ids = text_to_token_ids(prompt, tokenizer)  # (T,)
    out = generate(model, ids, max_new_tokens, **kw)  # (1, T + n)
    return token_ids_to_text(out, tokenizer)


# -- the settings the command line samples with ---------------------------------------------

# A small model decoded greedily falls into a loop ("the the the ..."), so the sample that
# `numpygpt train` prints and `numpygpt generate`'s default draw from the 40 most likely
# tokens at temperature 0.8, with a fixed seed so that a sample can be reproduced. Greedy
# decoding is one flag away (--greedy, i.e. temperature 0).
SAMPLING_DEFAULTS = dict(temperature=0.8, top_k=40, seed=123)


def describe_sampling(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                      seed: int | None = None) -> str:
    """The decoding settings in words, e.g. 'temperature 0.8, top-k 40, seed 123' or 'greedy'."""
    if not temperature:
        return "greedy"
    parts = [f"temperature {temperature:g}"]
    if top_k is not None:
        parts.append(f"top-k {top_k}")
    if top_p is not None and top_p < 1.0:
        parts.append(f"top-p {top_p:g}")
    parts.append(f"seed {seed}" if seed is not None else "unseeded")
    return ", ".join(parts)
