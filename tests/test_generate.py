"""generate(): greedy against a naive loop, cached == uncached, sampling filters and
statistics, eos, batching, argument checks."""

import numpy as np
import pytest

from numpygpt import GPTConfig, GPTModel, backend, no_grad
from numpygpt.generate import generate, generate_text, sample_next, top_k_filter, top_p_filter

CTX = 32  # the tiny preset's context_length


@pytest.fixture(scope="module")
def host_model():
    return GPTModel(GPTConfig.preset("tiny"), seed=0)


@pytest.fixture
def model(device, host_model):
    """The tiny model on the test's device (same weights everywhere)."""
    if device == "cpu":
        return host_model
    m = GPTModel(GPTConfig.preset("tiny"), init=False)
    m.load_state_dict(host_model.state_dict())
    return m


def prompt_ids(B, T, seed=0, V=128):
    return np.random.default_rng(seed).integers(0, V, size=(B, T))


def naive_greedy(model, idx, n, context_size):
    """The book's loop, written independently: full forward over the cropped context, argmax."""
    seq = backend.to_host(idx).astype(np.int64)
    for _ in range(n):
        with no_grad():
            logits = model(backend.to_device(seq[:, -context_size:], dtype="int64",
                                             device_name=backend.device_of(model.wte.weight.data)))
        last = backend.to_host(logits)[:, -1, :]
        seq = np.concatenate([seq, last.argmax(axis=-1)[:, None]], axis=1)
    return seq


# -- greedy ----------------------------------------------------------------------------------

@pytest.mark.parametrize("T, n, ctx", [(5, 10, CTX), (5, 40, CTX), (45, 6, CTX), (3, 20, 8), (12, 5, 8), (1, 3, 1)])
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_matches_naive_loop(model, T, n, ctx, use_cache):
    idx = prompt_ids(2, T, seed=T)
    out = generate(model, idx, n, context_size=ctx, use_cache=use_cache)
    assert out.shape == (2, T + n)
    assert backend.device_of(out) == backend.device_of(model.wte.weight.data)
    np.testing.assert_array_equal(backend.to_host(out), naive_greedy(model, idx, n, ctx))


@pytest.mark.parametrize("T, n, ctx", [(4, 50, CTX), (40, 10, CTX), (6, 20, 10), (32, 3, CTX)])
@pytest.mark.parametrize("sampling", [dict(), dict(temperature=1.3, seed=7),
                                      dict(temperature=0.9, top_k=20, top_p=0.9, seed=3)])
def test_cached_equals_uncached(model, T, n, ctx, sampling):
    """Including prompts longer than the context and generation past context_length."""
    idx = prompt_ids(3, T, seed=1)
    a = generate(model, idx, n, context_size=ctx, use_cache=True, **sampling)
    b = generate(model, idx, n, context_size=ctx, use_cache=False, **sampling)
    np.testing.assert_array_equal(backend.to_host(a), backend.to_host(b))
    np.testing.assert_array_equal(backend.to_host(a)[:, :T], idx)  # the whole prompt comes back


def test_1d_prompt_list_and_zero_tokens(host_model):
    out = generate(host_model, [1, 2, 3], 4)
    assert out.shape == (1, 7) and out.dtype == np.int64
    np.testing.assert_array_equal(out[0, :3], [1, 2, 3])
    np.testing.assert_array_equal(out, generate(host_model, np.array([[1, 2, 3]]), 4))
    np.testing.assert_array_equal(generate(host_model, [5, 6], 0), [[5, 6]])


def test_top_k_1_and_tiny_top_p_equal_greedy(model):
    idx = prompt_ids(2, 6, seed=4)
    greedy = backend.to_host(generate(model, idx, 30))
    for kw in (dict(top_k=1), dict(top_p=1e-9), dict(top_k=1, top_p=0.5)):
        out = generate(model, idx, 30, temperature=1.5, seed=11, **kw)
        np.testing.assert_array_equal(backend.to_host(out), greedy)


def test_seeded_sampling_reproducible_and_seed_dependent(host_model):
    idx = prompt_ids(2, 4, seed=5)
    a = generate(host_model, idx, 40, temperature=1.0, seed=1)
    b = generate(host_model, idx, 40, temperature=1.0, seed=1)
    c = generate(host_model, idx, 40, temperature=1.0, seed=2)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    # an untrained model is close to uniform over 128 tokens, so sampling is not greedy
    assert (a != generate(host_model, idx, 40)).any()


@pytest.mark.parametrize("with_cache", [True, False])
def test_batch_rows_equal_rows_alone(model, with_cache):
    idx = prompt_ids(4, 7, seed=9)
    batch = backend.to_host(generate(model, idx, 30, use_cache=with_cache))
    for i in range(4):
        alone = backend.to_host(generate(model, idx[i], 30, use_cache=with_cache))
        np.testing.assert_array_equal(batch[i:i + 1], alone)


def test_kv_cache_costs_one_position_per_step(host_model, monkeypatch):
    """Spy on forward: prefill once, then one token per step with the cache growing by one;
    past the context, full windows without a cache."""
    calls = []
    real_forward = host_model.forward

    def spy(idx, kv_caches=None):
        calls.append((idx.shape[1], None if kv_caches is None else kv_caches[0].length))
        out = real_forward(idx, kv_caches)
        if kv_caches is not None:
            assert kv_caches[0].length == calls[-1][1] + idx.shape[1]
        return out

    monkeypatch.setattr(host_model, "forward", spy)
    T, ctx = 5, 10
    generate(host_model, prompt_ids(1, T), 9, context_size=ctx)
    # lengths 5..10 fit the window: prefill (5 tokens, empty cache), then 1 token each with
    # cache lengths 5, 6, 7, 8, 9; lengths 11, 12, 13 slide: 10-token windows, no cache
    assert calls == [(5, 0), (1, 5), (1, 6), (1, 7), (1, 8), (1, 9), (10, None), (10, None), (10, None)]
    calls.clear()
    generate(host_model, prompt_ids(1, T), 4, use_cache=False)
    assert calls == [(5, None), (6, None), (7, None), (8, None)]


def test_restores_train_mode_and_keeps_no_cache(host_model):
    host_model.train()
    host_model.h[0].eval()  # a mixed state must come back as it was
    generate(host_model, [1, 2], 3)
    assert host_model.training and not host_model.h[0].training and host_model.h[1].training
    assert all(getattr(m, "_cache", None) is None for m in host_model.modules())
    host_model.eval()


def test_dropout_is_off_during_generation():
    m = GPTModel(GPTConfig.preset("tiny", drop_rate=0.5), seed=0)
    m.train()
    a = generate(m, prompt_ids(2, 5), 12)
    b = generate(m, prompt_ids(2, 5), 12)
    np.testing.assert_array_equal(a, b)
    assert m.training


# -- eos -------------------------------------------------------------------------------------

def test_eos_batch_of_one_stops_before_eos_like_the_book(host_model):
    idx = prompt_ids(1, 5, seed=2)
    full = generate(host_model, idx, 20)
    eos = int(full[0, 5 + 6])  # the 7th new token
    first = 5 + int(np.flatnonzero(full[0, 5:] == eos)[0])  # it may appear earlier too
    out = generate(host_model, idx, 20, eos_id=eos)
    np.testing.assert_array_equal(out, full[:, :first])  # eos itself is not appended


def test_eos_batch_pads_finished_rows_and_stops_when_all_done(host_model):
    idx = prompt_ids(2, 5, seed=3)
    full = generate(host_model, idx, 25)
    eos = int(full[0, 5 + 3])
    out = generate(host_model, idx, 25, eos_id=eos)

    def alone_len(row):
        hits = np.flatnonzero(full[row, 5:] == eos)
        return 5 + (int(hits[0]) if hits.size else 25)

    lens = [alone_len(0), alone_len(1)]
    assert out.shape == (2, max(lens))
    for row in range(2):
        np.testing.assert_array_equal(out[row, :lens[row]], full[row, :lens[row]])
        assert (out[row, lens[row]:] == eos).all()


# -- sampling on its own ---------------------------------------------------------------------

def test_sample_next_distribution_matches_softmax():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05, 0.0]]) + 1e-300)
    rng = np.random.default_rng(0)
    draws = np.array([sample_next(np.repeat(logits, 1000, axis=0), 1.0, rng=rng) for _ in range(40)]).ravel()
    freq = np.bincount(draws, minlength=5) / draws.size  # 40,000 draws
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05, 0.0], atol=0.01)
    assert freq[4] == 0.0  # probability 0 is never drawn


def test_temperature_reshapes_the_distribution():
    logits = np.array([[2.0, 1.0, 0.0]])
    rng = np.random.default_rng(1)
    for t in (0.5, 2.0):
        draws = sample_next(np.repeat(logits, 30000, axis=0), t, rng=rng)
        expect = np.exp(logits[0] / t) / np.exp(logits[0] / t).sum()
        np.testing.assert_allclose(np.bincount(draws, minlength=3) / draws.size, expect, atol=0.012)


def test_top_k_and_top_p_restrict_the_support():
    probs = np.array([0.4, 0.25, 0.2, 0.1, 0.05])
    logits = np.log(probs)[None, :].repeat(20000, axis=0)
    rng = np.random.default_rng(2)
    k2 = sample_next(logits, 1.0, top_k=2, rng=rng)
    assert set(np.unique(k2)) == {0, 1}
    np.testing.assert_allclose((k2 == 0).mean(), 0.4 / 0.65, atol=0.012)
    # smallest set reaching 0.8: {0.4, 0.25, 0.2} (0.85); 0.65 alone would not reach it
    p8 = sample_next(logits, 1.0, top_p=0.8, rng=rng)
    assert set(np.unique(p8)) == {0, 1, 2}
    np.testing.assert_allclose(np.bincount(p8) / p8.size, probs[:3] / 0.85, atol=0.012)


def test_filters_by_hand():
    x = np.array([[1.0, 3.0, 2.0, 3.0, -1.0]])
    np.testing.assert_array_equal(top_k_filter(x, 1), [[-np.inf, 3.0, -np.inf, 3.0, -np.inf]])  # ties kept
    np.testing.assert_array_equal(top_k_filter(x, 3), [[-np.inf, 3.0, 2.0, 3.0, -np.inf]])
    np.testing.assert_array_equal(top_k_filter(x, 99), x)
    y = np.log(np.array([[0.1, 0.6, 0.3]]))
    np.testing.assert_array_equal(np.isfinite(top_p_filter(y, 0.6)), [[False, True, False]])
    np.testing.assert_array_equal(np.isfinite(top_p_filter(y, 0.61)), [[False, True, True]])
    np.testing.assert_array_equal(np.isfinite(top_p_filter(y, 1.0)), [[True, True, True]])
    np.testing.assert_array_equal(np.isfinite(top_p_filter(y, 1e-12)), [[False, True, False]])


def test_sample_next_greedy_and_seeded():
    x = np.random.default_rng(0).normal(size=(6, 50))
    np.testing.assert_array_equal(sample_next(x), x.argmax(-1))
    np.testing.assert_array_equal(sample_next(x, 1.0, rng=5), sample_next(x, 1.0, rng=5))


# -- arguments and text ------------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(context_size=0), "context_size"),
    (dict(context_size=CTX + 1), "context_size"),
    (dict(eos_id=128), "eos_id"),
    (dict(idx=[]), "empty"),
    (dict(idx=[[[1]]]), "shape"),
    (dict(idx=[1.0, 2.0]), "integers"),
    (dict(idx=[1, 500]), "out of range"),
])
def test_argument_errors(host_model, kw, match):
    args = dict(idx=[1, 2, 3], max_new_tokens=2)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        generate(host_model, **args)


class CharTokenizer:
    """A stand-in for tiktoken with the tiny model's 128-token vocabulary: one id per ASCII char."""

    n_vocab = 128

    def encode(self, text, allowed_special=()):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_generate_text(host_model):
    tok = CharTokenizer()
    text = generate_text(host_model, "Hello", max_new_tokens=8, tokenizer=tok)
    assert text.startswith("Hello") and len(text) == 13
    ids = generate(host_model, np.array([ord(c) for c in "Hello"]), 8)
    assert text == tok.decode(ids[0].tolist())
    sampled = generate_text(host_model, "Hi", 5, tokenizer=tok, temperature=1.0, seed=3)
    assert sampled == generate_text(host_model, "Hi", 5, tokenizer=tok, temperature=1.0, seed=3)


# -- non-finite logits and overflowing temperatures -------------------------------------------

@pytest.mark.parametrize("logits, match", [
    ([[np.nan, np.nan, np.nan]], "NaN"),
    ([[0.0, np.nan, 1.0]], "NaN"),
    ([[-np.inf, -np.inf, -np.inf]], "-inf"),
])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_non_finite_logits_are_refused(logits, match, temperature):
    with pytest.raises(ValueError, match=match):
        sample_next(np.array(logits), temperature=temperature, rng=0)


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0, 5.0])
def test_plus_inf_is_certainty(temperature):
    for seed in range(20):
        assert sample_next(np.array([[0.0, np.inf, 1.0]]), temperature=temperature, rng=seed)[0] == 1
    picks = {int(sample_next(np.array([[np.inf, 3.0, np.inf]]), temperature=temperature, rng=s)[0])
             for s in range(40)}
    assert picks <= {0, 2} and (temperature == 0.0 or picks == {0, 2})


def test_a_temperature_that_overflows_is_refused():
    with pytest.raises(ValueError, match="too small"):
        sample_next(np.array([[0.5, 1.0, -2.0]]), temperature=1e-320, rng=0)
    # a small temperature that does not overflow still samples, close to greedy
    assert sample_next(np.array([[0.5, 1.0, -2.0]]), temperature=1e-3, rng=0)[0] == 1
