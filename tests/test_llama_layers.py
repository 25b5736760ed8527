"""The Llama 3 / Qwen3 ops (RMSNorm, SiLU, RoPE, SwiGLU, grouped-query attention): gradient
checks against centred differences in float64 with hypothesis-drawn shapes, and each
forward against a direct computation from its definition."""

import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from numpygpt import backend
from numpygpt.gradcheck import check_layer
from numpygpt.nn import GroupedQueryAttention, KVCache, Module, RMSNorm, RoPE, SiLU, SwiGLU, no_grad, rope_frequencies
from conftest import assert_grads_ok, to_dev, to_host

F64 = "float64"
seeds = st.integers(0, 2**16)
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=32)


def randomize(layer, rng, scale=0.5):
    for p in layer.parameters():
        p.data = to_dev(rng.standard_normal(p.shape) * scale, F64)
    return layer


# -- RMSNorm -------------------------------------------------------------------------------

@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), C=st.integers(2, 9), seed=seeds)
def test_rmsnorm(device, shape, C, seed):
    rng = np.random.default_rng(seed)
    layer = randomize(RMSNorm(C, eps=1e-6, dtype=F64), rng)
    assert_grads_ok(check_layer(layer, to_dev(rng.standard_normal((*shape, C)) * 2, F64)))


def test_rmsnorm_matches_definition(device, rng):
    x = rng.standard_normal((2, 3, 4, 6))  # (B, T, NH, hs): the QK-norm's per-head use
    layer = randomize(RMSNorm(6, eps=1e-6, dtype=F64), rng)
    w = to_host(layer.weight.data)
    ref = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(to_host(layer(to_dev(x, F64))), ref, rtol=1e-13, atol=1e-14)


# -- SiLU and SwiGLU -------------------------------------------------------------------------

@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), seed=seeds)
def test_silu(device, shape, seed):
    rng = np.random.default_rng(seed)
    assert_grads_ok(check_layer(SiLU(), to_dev(rng.standard_normal(shape) * 3, F64)))


def test_silu_matches_definition_without_overflow(device):
    x = np.array([-800.0, -30.0, -1.0, 0.0, 0.5, 30.0, 800.0])
    with np.errstate(over="ignore"):
        ref = x / (1.0 + np.exp(-x))
    np.testing.assert_allclose(to_host(SiLU()(to_dev(x, F64))), ref, rtol=1e-14, atol=1e-300)


@given(B=st.integers(1, 3), T=st.integers(1, 4), C=st.integers(1, 6), H=st.integers(1, 8), seed=seeds)
def test_swiglu(device, B, T, C, H, seed):
    rng = np.random.default_rng(seed)
    layer = randomize(SwiGLU(C, H, dtype=F64), rng)
    assert_grads_ok(check_layer(layer, to_dev(rng.standard_normal((B, T, C)), F64)))


def test_swiglu_matches_definition(device, rng):
    layer = randomize(SwiGLU(4, 7, dtype=F64), rng)
    x = rng.standard_normal((2, 3, 4))
    Wg, Wu, Wd = (to_host(m.weight.data) for m in (layer.gate_proj, layer.up_proj, layer.down_proj))
    g = x @ Wg
    ref = (g / (1 + np.exp(-g)) * (x @ Wu)) @ Wd
    np.testing.assert_allclose(to_host(layer(to_dev(x, F64))), ref, rtol=1e-12, atol=1e-13)
    assert [n for n, _ in layer.named_parameters()] == ["gate_proj.weight", "up_proj.weight", "down_proj.weight"]


# -- RoPE ------------------------------------------------------------------------------------

@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), T=st.integers(1, 6), half=st.integers(1, 4),
       start=st.integers(0, 40), scaled=st.booleans(), seed=seeds)
def test_rope(device, lead, T, half, start, scaled, seed):
    rng = np.random.default_rng(seed)
    rope = RoPE(2 * half, theta=500.0, scaling=LLAMA3 if scaled else None, max_positions=64)
    at_start = Module()  # forward(x) at positions start, start + 1, ...
    at_start.forward = lambda x: rope.forward(x, start)
    at_start.backward = rope.backward
    assert_grads_ok(check_layer(at_start, to_dev(rng.standard_normal((*lead, T, 2 * half)), F64)))


def test_rope_is_hf_rotate_half_and_backward_is_the_inverse_rotation(device, rng):
    hs, T, start = 8, 5, 3
    rope = RoPE(hs, theta=10000.0, max_positions=16)
    x = rng.standard_normal((2, 3, T, hs))
    y = to_host(rope.forward(to_dev(x, F64), start))
    f = 1.0 / 10000.0 ** (np.arange(0, hs, 2) / hs)
    angles = np.arange(start, start + T)[:, None] * np.concatenate([f, f])[None, :]  # (T, hs)
    rotate_half = np.concatenate([-x[..., hs // 2:], x[..., :hs // 2]], axis=-1)
    np.testing.assert_allclose(y, x * np.cos(angles) + rotate_half * np.sin(angles), rtol=1e-13, atol=1e-14)
    # a rotation keeps lengths, and its backward (rotation by -angle) undoes it
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-13)
    np.testing.assert_allclose(to_host(rope.backward(to_dev(y, F64))), x, rtol=1e-12, atol=1e-13)


def test_rope_scores_depend_on_distance_only(rng):
    rope = RoPE(6, theta=100.0, scaling=LLAMA3, max_positions=64)
    q, k = rng.standard_normal((2, 6))
    score = lambda i, j: float(rope.rotate(q[None], i)[0] @ rope.rotate(k[None], j)[0])  # noqa: E731
    assert score(7, 3) == pytest.approx(score(40, 36), rel=1e-12)
    assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-3)


def test_llama3_frequencies_keep_fast_divide_slow_and_blend_the_middle():
    hs, theta = 64, 500000.0
    plain = rope_frequencies(hs, theta)
    scaled = rope_frequencies(hs, theta, LLAMA3)
    wavelength = 2 * np.pi / plain
    L = LLAMA3["original_max_position_embeddings"]
    fast, slow = wavelength < L / 4, wavelength > L / 1
    middle = ~fast & ~slow
    assert fast.any() and slow.any() and middle.any()
    np.testing.assert_array_equal(scaled[fast], plain[fast])
    np.testing.assert_allclose(scaled[slow], plain[slow] / 8.0, rtol=1e-15)
    ratio = scaled[middle] / plain[middle]  # runs from 1 (fast side) down to 1/8 (slow side)
    assert np.all((ratio < 1) & (ratio > 1 / 8)) and np.all(np.diff(ratio) < 0)
    with pytest.raises(ValueError, match="unknown rope_type 'yarn'"):
        rope_frequencies(hs, theta, {"rope_type": "yarn"})


def test_rope_tables_are_computed_once_per_dtype(rng):
    rope = RoPE(4, max_positions=1000)
    x = rng.standard_normal((1, 3, 4))
    rope.rotate(x)
    first = rope.tables._tables[("float64", "numpy")]
    rope.rotate(x, 20)
    assert rope.tables._tables[("float64", "numpy")] is first  # long enough already: reused
    rope.rotate(x.astype("float32"))
    assert set(rope.tables._tables) == {("float64", "numpy"), ("float32", "numpy")}
    with pytest.raises(ValueError, match="beyond"):
        rope.rotate(x, 998)


# -- grouped-query attention --------------------------------------------------------------

def reference_gqa(layer, x, start_rope):
    """A loop over heads and tokens, with K/V repeated per query head (as HF's repeat_kv)."""
    B, T, C = x.shape
    NH, NKV, hs = layer.n_heads, layer.n_kv_heads, layer.head_dim
    W = {n: to_host(m.weight.data) for n, m in (("q", layer.q_proj), ("k", layer.k_proj), ("v", layer.v_proj),
                                                 ("o", layer.o_proj))}

    def heads(h, n, norm):
        h = h.reshape(B, T, n, hs)
        if norm is not None:
            h = h / np.sqrt((h ** 2).mean(-1, keepdims=True) + norm.eps) * to_host(norm.weight.data)
        return start_rope(h.transpose(0, 2, 1, 3))

    q, k = heads(x @ W["q"], NH, layer.q_norm), heads(x @ W["k"], NKV, layer.k_norm)
    v = (x @ W["v"]).reshape(B, T, NKV, hs).transpose(0, 2, 1, 3)
    y = np.zeros((B, NH, T, hs))
    for b in range(B):
        for h in range(NH):
            kv = h // (NH // NKV)
            for t in range(T):
                s = q[b, h, t] @ k[b, kv, :t + 1].T / math.sqrt(hs)
                a = np.exp(s - s.max())
                y[b, h, t] = (a / a.sum()) @ v[b, kv, :t + 1]
    return y.transpose(0, 2, 1, 3).reshape(B, T, NH * hs) @ W["o"]


@given(B=st.integers(1, 2), T=st.integers(1, 6), NKV=st.integers(1, 3), NG=st.integers(1, 3),
       half=st.integers(1, 3), qk_norm=st.booleans(), impl=st.sampled_from(["dense", "blockwise"]), seed=seeds)
def test_grouped_query_attention(device, B, T, NKV, NG, half, qk_norm, impl, seed):
    rng = np.random.default_rng(seed)
    C, hs = 5, 2 * half  # hs independent of C / NH
    rope = RoPE(hs, theta=100.0, scaling=LLAMA3, max_positions=16)
    layer = GroupedQueryAttention(C, NKV * NG, NKV, hs, rope, qk_norm_eps=1e-6 if qk_norm else None,
                                  impl=impl, dtype=F64, block_q=2, block_k=3)
    randomize(layer, rng)
    x = rng.standard_normal((B, T, C))
    ref = reference_gqa(layer, x, lambda h: rope.rotate(h))
    np.testing.assert_allclose(to_host(layer(to_dev(x, F64))), ref, rtol=1e-10, atol=1e-12)
    assert_grads_ok(check_layer(layer, to_dev(x, F64)))


def test_gqa_cache_holds_kv_heads_only_and_matches_uncached(device, rng):
    rope = RoPE(4, theta=10000.0, max_positions=32)
    layer = randomize(GroupedQueryAttention(6, 6, 2, 4, rope, qk_norm_eps=1e-6, dtype=F64), rng)
    x = to_dev(rng.standard_normal((2, 9, 6)), F64)
    with no_grad():
        full = to_host(layer(x))
        cache = KVCache(32)
        parts = [to_host(layer(x[:, a:b], cache)) for a, b in ((0, 4), (4, 5), (5, 9))]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=1e-12, atol=1e-13)
    assert cache.k.shape[:2] == (2, 2) and cache.length == 9  # (B, NKV): 2 KV heads, not 6


def test_gqa_backward_after_cached_prefix_matches_finite_differences(rng):
    """Tokens fed after a cache: RoPE's offset and the cached keys enter the backward too."""
    rope = RoPE(4, theta=10000.0, scaling=dict(LLAMA3, original_max_position_embeddings=4), max_positions=32)
    layer = randomize(GroupedQueryAttention(6, 4, 2, 4, rope, dtype=F64), rng)
    prefix, x = rng.standard_normal((1, 5, 6)), rng.standard_normal((1, 3, 6))

    class AfterPrefix(GroupedQueryAttention):
        def forward(self, x):
            cache = KVCache(16)
            with no_grad():
                super().forward(prefix, cache)
            return super().forward(x, cache)

    layer.__class__ = AfterPrefix
    # the cached keys and values are constants to this backward; a finite difference in
    # W_k or W_v would move them too, so those two are left out (x's k and v still count)
    layer.k_proj.weight.requires_grad = layer.v_proj.weight.requires_grad = False
    errors = check_layer(layer, x)
    assert set(errors) == {"x", "q_proj.weight", "o_proj.weight"}
    assert_grads_ok(errors)


def test_gqa_refuses_heads_that_do_not_group():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        GroupedQueryAttention(8, 6, 4, 2, RoPE(2))
