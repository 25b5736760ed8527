"""The encoder-decoder's ops: sinusoidal positions, self-attention with a key padding
mask, cross-attention. Gradient checks in float64 (hypothesis draws shapes, lengths and
padding), plus the properties a mask must have: a padded key changes nothing and gets no
gradient."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from numpygpt import backend
from numpygpt.gradcheck import check_gradients, check_layer
from numpygpt.nn import CrossAttention, KVCache, MultiHeadAttention, SinusoidalPositionalEncoding, no_grad
from conftest import to_dev
from test_layers import F64, assert_ok, randomize

small = st.integers(1, 3)
seeds = st.integers(0, 2**16)


def padding(rng, B, S):
    """(B, S) bool, True at padding: right padding of random lengths, every row keeps a key."""
    lengths = rng.integers(1, S + 1, B)
    return np.arange(S)[None, :] >= lengths[:, None]


@given(B=small, T=st.integers(1, 6), C=st.integers(1, 7), start=st.integers(0, 3), seed=seeds)
def test_sinusoidal_encoding(device, B, T, C, start, seed):
    rng = np.random.default_rng(seed)
    layer = SinusoidalPositionalEncoding(C, max_length=10, dtype=F64)
    x = rng.standard_normal((B, T, C))
    assert_ok(check_gradients(lambda x: layer(x, start), layer.backward, {"x": to_dev(x, F64)}, {}))
    # the paper's formula, position by position
    pe = backend.to_host(layer(to_dev(x, F64), start)) - x
    for t in range(T):
        for j in range(C):
            angle = (start + t) / 10000 ** (2 * (j // 2) / C)
            want = np.sin(angle) if j % 2 == 0 else np.cos(angle)
            np.testing.assert_allclose(pe[:, t, j], want, rtol=0, atol=1e-12)


def test_sinusoidal_encoding_passes_the_gradient_through(device, rng):
    layer = SinusoidalPositionalEncoding(4, max_length=8, dtype=F64)
    layer(to_dev(rng.standard_normal((2, 3, 4)), F64))
    dout = to_dev(rng.standard_normal((2, 3, 4)), F64)
    assert layer.backward(dout) is dout


@given(B=small, T=st.integers(1, 6), NH=st.integers(1, 3), hs=st.integers(1, 3), causal=st.booleans(),
       p=st.sampled_from([0.0, 0.3]), seed=seeds)
def test_self_attention_with_key_padding(device, B, T, NH, hs, causal, p, seed):
    rng = np.random.default_rng(seed)
    C = NH * hs
    layer = MultiHeadAttention(C, C, NH, dropout=p, qkv_bias=True, dtype=F64, causal=causal)
    randomize(layer, rng)
    pad = to_dev(padding(rng, B, T))
    x = to_dev(rng.standard_normal((B, T, C)), F64)
    errors = check_gradients(lambda x: layer(x, key_padding_mask=pad), layer.backward, {"x": x},
                             dict(layer.named_parameters()), before_forward=lambda: backend.manual_seed(seed))
    assert_ok(errors)


@given(B=small, T=st.integers(1, 5), S=st.integers(1, 6), NH=st.integers(1, 3), hs=st.integers(1, 3),
       bias=st.booleans(), masked=st.booleans(), p=st.sampled_from([0.0, 0.3]), seed=seeds)
def test_cross_attention(device, B, T, S, NH, hs, bias, masked, p, seed):
    rng = np.random.default_rng(seed)
    C = NH * hs
    layer = CrossAttention(C, C + 1, C, NH, dropout=p, qkv_bias=bias, dtype=F64)  # memory of another width
    randomize(layer, rng)
    x = to_dev(rng.standard_normal((B, T, C)), F64)
    memory = to_dev(rng.standard_normal((B, S, C + 1)), F64)
    pad = to_dev(padding(rng, B, S)) if masked else None
    assert_ok(check_layer(layer, x, memory, pad, input_names=["x", "memory", "key_padding_mask"],
                          before_forward=lambda: backend.manual_seed(seed)))


def test_cross_attention_ignores_padded_keys(device, rng):
    """Whatever a padded source position holds, the output is the same and it gets no gradient."""
    B, T, S, C, NH = 2, 3, 5, 6, 2
    layer = CrossAttention(C, C, C, NH, qkv_bias=True, dtype=F64)
    randomize(layer, rng)
    pad = np.zeros((B, S), bool)
    pad[0, 2:] = pad[1, 4:] = True
    x = to_dev(rng.standard_normal((B, T, C)), F64)
    memory = rng.standard_normal((B, S, C))
    y = backend.to_host(layer(x, to_dev(memory, F64), to_dev(pad)))
    _, dmemory = layer.backward(to_dev(np.ones((B, T, C)), F64))
    np.testing.assert_array_equal(backend.to_host(dmemory)[pad], 0.0)
    assert np.abs(backend.to_host(dmemory)[~pad]).min() > 0
    memory[pad] = rng.standard_normal((int(pad.sum()), C)) * 100
    y2 = backend.to_host(layer(x, to_dev(memory, F64), to_dev(pad)))
    np.testing.assert_allclose(y2, y, rtol=1e-12, atol=1e-12)


def test_cross_attention_is_not_causal(device, rng):
    """Every query sees every source position, the last one included."""
    layer = CrossAttention(4, 4, 4, 2, dtype=F64)
    randomize(layer, rng)
    x, memory = rng.standard_normal((1, 3, 4)), rng.standard_normal((1, 5, 4))
    y = backend.to_host(layer(to_dev(x, F64), to_dev(memory, F64)))
    memory[:, -1] += 1.0
    y2 = backend.to_host(layer(to_dev(x, F64), to_dev(memory, F64)))
    assert np.abs(y2 - y).min() > 0


def test_cross_attention_cache_computes_keys_once(device, rng):
    """With a KVCache the first call projects the memory; later calls reuse it (memory unused)."""
    B, T, S, C = 2, 4, 5, 6
    layer = CrossAttention(C, C, C, 3, qkv_bias=True, dtype=F64)
    randomize(layer, rng)
    x = to_dev(rng.standard_normal((B, T, C)), F64)
    memory = to_dev(rng.standard_normal((B, S, C)), F64)
    with no_grad():
        full = backend.to_host(layer(x, memory))
        cache = KVCache(S)
        steps = [backend.to_host(layer(x[:, t:t + 1], memory if t == 0 else None, kv_cache=cache))
                 for t in range(T)]
    assert cache.length == S
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-12, atol=1e-12)


def test_key_padding_mask_must_match_the_keys(device, rng):
    layer = CrossAttention(4, 4, 4, 2, dtype=F64)
    x, memory = to_dev(rng.standard_normal((1, 2, 4)), F64), to_dev(rng.standard_normal((1, 3, 4)), F64)
    with pytest.raises(ValueError, match="3 long"):
        layer(x, memory, to_dev(np.zeros((1, 2), bool)))
