"""Gradient checks of every layer against centred finite differences (float64).

Shapes and values are drawn by hypothesis; each check asserts the relative error of
backward against the numeric gradient is at most 1e-6 for the input and every
parameter (see numpygpt.gradcheck)."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from numpygpt import backend
from numpygpt.gradcheck import check_layer, report
from numpygpt.model import FeedForward, OutputHead, TransformerBlock
from numpygpt.config import GPTConfig
from numpygpt.nn import (CrossEntropyLoss, Dropout, Embedding, GELU, LayerNorm, Linear, MultiHeadAttention,
                         Parameter, Softmax, no_grad)
from conftest import assert_eval_between_changes_nothing, to_dev, to_host

TOL = 1e-6
F64 = "float64"


def randomize(layer, rng, scale=0.5):
    """Replace a layer's weights by random values so every gradient is exercised."""
    for p in layer.parameters():
        p.data = to_dev(rng.standard_normal(p.shape) * scale, F64)


def assert_ok(errors):
    assert errors, "nothing was checked"
    assert max(errors.values()) <= TOL, "\n" + report(errors, TOL)


small = st.integers(1, 3)
seeds = st.integers(0, 2**16)


@given(B=small, T=st.integers(1, 5), n_in=st.integers(1, 7), n_out=st.integers(1, 7), bias=st.booleans(), seed=seeds)
def test_linear(device, B, T, n_in, n_out, bias, seed):
    rng = np.random.default_rng(seed)
    layer = Linear(n_in, n_out, bias=bias, dtype=F64)
    randomize(layer, rng)
    assert_ok(check_layer(layer, to_dev(rng.standard_normal((B, T, n_in)), F64)))


@given(B=small, T=st.integers(1, 6), V=st.integers(1, 5), C=st.integers(1, 6), seed=seeds)
def test_embedding_with_repeated_ids(device, B, T, V, C, seed):
    rng = np.random.default_rng(seed)
    layer = Embedding(V, C, dtype=F64)
    randomize(layer, rng)
    ids = to_dev(rng.integers(0, V, (B, T)))  # V <= 5 makes repeats likely
    assert_ok(check_layer(layer, ids, max_coords=None))


def test_embedding_gradient_counts_every_repeat(device):
    layer = Embedding(4, 2, dtype=F64)
    layer(to_dev(np.array([[1, 1, 1, 3]])))
    layer.backward(to_dev(np.ones((1, 4, 2)), F64))
    expected = np.array([[0, 0], [3, 3], [0, 0], [1, 1]], dtype=np.float64)
    np.testing.assert_array_equal(backend.to_host(layer.weight.grad), expected)


@given(B=small, T=st.integers(1, 5), C=st.integers(3, 9), seed=seeds)
def test_layernorm(device, B, T, C, seed):
    # (C = 2 is excluded: xhat is then +-1 whatever x is, and dx is ~eps, below the noise)
    rng = np.random.default_rng(seed)
    layer = LayerNorm(C, dtype=F64)
    randomize(layer, rng)
    assert_ok(check_layer(layer, to_dev(rng.standard_normal((B, T, C)) * 2 + 1, F64)))


def test_layernorm_matches_definition(device, rng):
    x = rng.standard_normal((2, 3, 5))
    layer = LayerNorm(5, dtype=F64)
    y = backend.to_host(layer(to_dev(x, F64)))
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), seed=seeds)
def test_gelu(device, shape, seed):
    rng = np.random.default_rng(seed)
    assert_ok(check_layer(GELU(), to_dev(rng.standard_normal(shape) * 3, F64)))


def test_gelu_matches_tanh_formula(device):
    x = np.linspace(-6, 6, 101)
    ref = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(backend.to_host(GELU()(to_dev(x, F64))), ref, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("dtype, rtol", [(F64, 1e-13), ("float32", 2e-6)])
def test_gelu_backward_matches_plain_derivative(device, dtype, rtol):
    """The in-place, factored backward against the docstring's derivative written plainly."""
    x = np.linspace(-6, 6, 1001)
    dy = np.random.default_rng(0).standard_normal(x.shape)
    t = np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))
    dydx = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * x * x)
    layer = GELU()
    y = layer(to_dev(x, dtype))
    dx = backend.to_host(layer.backward(to_dev(dy, dtype)))
    assert y.dtype == dx.dtype == np.dtype(dtype)
    np.testing.assert_allclose(dx, dy * dydx, rtol=rtol, atol=rtol)


@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), seed=seeds)
def test_softmax(device, shape, seed):
    rng = np.random.default_rng(seed)
    assert_ok(check_layer(Softmax(axis=-1), to_dev(rng.standard_normal(shape) * 3, F64)))


@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=3), p=st.sampled_from([0.1, 0.5, 0.9]), seed=seeds)
def test_dropout_with_fixed_mask(device, shape, p, seed):
    rng = np.random.default_rng(seed)
    layer = Dropout(p)
    assert_ok(check_layer(layer, to_dev(rng.standard_normal(shape), F64),
                          before_forward=lambda: backend.manual_seed(seed)))


def test_dropout_scales_and_is_identity_in_eval(device):
    layer = Dropout(0.5)
    x = to_dev(np.ones((200, 200)), F64)
    y = backend.to_host(layer(x))
    assert set(np.unique(y)) <= {0.0, 2.0}
    assert 0.45 < (y == 0).mean() < 0.55
    layer.eval()
    assert layer(x) is x


@given(B=small, T=st.integers(1, 6), NH=st.integers(1, 3), hs=st.integers(1, 4), bias=st.booleans(),
       p=st.sampled_from([0.0, 0.3]), seed=seeds)
def test_attention(device, B, T, NH, hs, bias, p, seed):
    rng = np.random.default_rng(seed)
    C = NH * hs
    layer = MultiHeadAttention(C, C, NH, dropout=p, qkv_bias=bias, dtype=F64)
    randomize(layer, rng)
    assert_ok(check_layer(layer, to_dev(rng.standard_normal((B, T, C)), F64),
                          before_forward=lambda: backend.manual_seed(seed)))


def test_attention_is_causal_and_matches_per_head_loop(device, rng):
    """Batched heads against a plain loop over heads and tokens; the future never leaks."""
    B, T, NH, hs = 2, 5, 3, 4
    C = NH * hs
    layer = MultiHeadAttention(C, C, NH, qkv_bias=True, dtype=F64)
    randomize(layer, rng)
    x = rng.standard_normal((B, T, C))
    y = backend.to_host(layer(to_dev(x, F64)))
    W, b = (backend.to_host(p.data) for p in (layer.c_attn.weight, layer.c_attn.bias))
    Wp, bp = (backend.to_host(p.data) for p in (layer.c_proj.weight, layer.c_proj.bias))
    qkv = x @ W + b
    out = np.zeros((B, T, C))
    for bi in range(B):
        for h in range(NH):
            q = qkv[bi, :, h * hs:(h + 1) * hs]
            k = qkv[bi, :, C + h * hs:C + (h + 1) * hs]
            v = qkv[bi, :, 2 * C + h * hs:2 * C + (h + 1) * hs]
            for t in range(T):
                s = q[t] @ k[:t + 1].T / np.sqrt(hs)
                a = np.exp(s - s.max())
                a /= a.sum()
                out[bi, t, h * hs:(h + 1) * hs] = a @ v[:t + 1]
    np.testing.assert_allclose(y, out @ Wp + bp, rtol=1e-10, atol=1e-12)
    # changing the last token changes no earlier output
    x2 = x.copy()
    x2[:, -1] += 1.0
    y2 = backend.to_host(layer(to_dev(x2, F64)))
    np.testing.assert_allclose(y2[:, :-1], y[:, :-1], rtol=0, atol=1e-12)


@given(B=small, T=st.integers(1, 5), V=st.integers(2, 9), n_ignored=st.integers(0, 3), seed=seeds)
def test_cross_entropy(device, B, T, V, n_ignored, seed):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((B, T, V)) * 2
    targets = rng.integers(0, V, (B, T))
    flat = targets.reshape(-1)
    flat[rng.permutation(flat.size)[:min(n_ignored, flat.size - 1)]] = -100
    loss_fn = CrossEntropyLoss()
    assert_ok(check_layer(loss_fn, to_dev(logits, F64), to_dev(targets), input_names=["logits", "targets"]))
    # the value against a direct log-softmax
    keep = flat != -100
    z = logits.reshape(-1, V)[keep]
    logp = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1, keepdims=True)
    ref = -logp[np.arange(len(z)), flat[keep]].mean()
    assert abs(float(loss_fn(to_dev(logits, F64), to_dev(targets))) - ref) < 1e-12


def test_cross_entropy_rejects_bad_targets(device):
    loss_fn = CrossEntropyLoss()
    logits = to_dev(np.zeros((1, 2, 5)), F64)
    # host targets (the data loader's) are checked; device targets are trusted, as CuPy
    # would wrap an out-of-range id instead of raising
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        loss_fn(logits, np.array([[1, 5]]))
    with pytest.raises(ValueError, match="ignore_index"):
        loss_fn(logits, np.array([[-100, -100]]))


@given(B=small, T=st.integers(1, 4), C=st.integers(1, 5), seed=seeds)
def test_feedforward(device, B, T, C, seed):
    rng = np.random.default_rng(seed)
    layer = FeedForward(C, dtype=F64)
    randomize(layer, rng)
    assert_ok(check_layer(layer, to_dev(rng.standard_normal((B, T, C)), F64)))


@given(B=small, T=st.integers(1, 5), V=st.integers(1, 6), C=st.integers(1, 5), transposed=st.booleans(),
       seed=seeds)
def test_output_head(device, B, T, V, C, transposed, seed):
    rng = np.random.default_rng(seed)
    layer = OutputHead(Parameter(to_dev(rng.standard_normal((V, C)), F64)))
    layer.TRANSPOSED_DX_ROWS = 10**9 if transposed else 0  # both GEMM forms of dx: (W^T G^T)^T and G W
    assert_ok(check_layer(layer, to_dev(rng.standard_normal((B, T, C)), F64)))


@given(B=small, T=st.integers(1, 5), NH=st.integers(1, 3), hs=st.integers(1, 3), bias=st.booleans(),
       p=st.sampled_from([0.0, 0.25]), seed=seeds)
def test_transformer_block(device, B, T, NH, hs, bias, p, seed):
    rng = np.random.default_rng(seed)
    cfg = GPTConfig(vocab_size=5, context_length=8, emb_dim=NH * hs, n_heads=NH, n_layers=1,
                    drop_rate=p, qkv_bias=bias, dtype=F64)
    layer = TransformerBlock(cfg)
    randomize(layer, rng)
    assert_ok(check_layer(layer, to_dev(rng.standard_normal((B, T, NH * hs)), F64),
                          before_forward=lambda: backend.manual_seed(seed)))


def test_backward_without_forward_raises(device):
    layer = Linear(3, 2, dtype=F64)
    with pytest.raises(RuntimeError, match="without a cached forward"):
        layer.backward(to_dev(np.ones((1, 2)), F64))
    layer(to_dev(np.ones((1, 3)), F64))
    layer.backward(to_dev(np.ones((1, 2)), F64))
    with pytest.raises(RuntimeError, match="once per forward"):
        layer.backward(to_dev(np.ones((1, 2)), F64))
    with no_grad():
        layer(to_dev(np.ones((1, 3)), F64))
    with pytest.raises(RuntimeError):
        layer.backward(to_dev(np.ones((1, 2)), F64))


def test_frozen_parameter_gets_no_grad_but_passes_dx(device, rng):
    layer = Linear(3, 2, dtype=F64)
    randomize(layer, rng)
    layer.weight.requires_grad = False
    x = to_dev(rng.standard_normal((4, 3)), F64)
    layer(x)
    dx = layer.backward(to_dev(np.ones((4, 2)), F64))
    assert layer.weight.grad is None and layer.bias.grad is not None
    np.testing.assert_allclose(backend.to_host(dx), np.ones((4, 2)) @ backend.to_host(layer.weight.data).T)
    errors = check_layer(layer, x)
    assert "weight" not in errors and max(errors.values()) <= TOL


@pytest.mark.parametrize("frozen", [("weight",), ("bias",), ("weight", "bias")])
def test_frozen_layernorm_skips_its_sums_and_passes_the_same_dx(device, rng, frozen):
    x, dy = to_dev(rng.standard_normal((3, 4, 6)), F64), to_dev(rng.standard_normal((3, 4, 6)), F64)
    plain, part = LayerNorm(6, dtype=F64), LayerNorm(6, dtype=F64)
    randomize(plain, rng)
    part.load_state_dict(plain.state_dict())
    for name in frozen:
        getattr(part, name).requires_grad = False
    plain(x), part(x)
    dx_plain, dx_part = plain.backward(dy), part.backward(dy)
    np.testing.assert_array_equal(backend.to_host(dx_part), backend.to_host(dx_plain))
    for name in ("weight", "bias"):
        got = getattr(part, name).grad
        if name in frozen:
            assert got is None
        else:
            np.testing.assert_array_equal(backend.to_host(got), backend.to_host(getattr(plain, name).grad))


@pytest.mark.parametrize("broken", ["gelu", "layernorm", "attention_scale"])
def test_gradcheck_catches_a_wrong_backward(monkeypatch, rng, broken):
    """The checks above can fail: break one backward and watch the error jump."""
    x = rng.standard_normal((2, 3, 4))
    if broken == "gelu":
        layer = GELU()
        monkeypatch.setattr(GELU, "backward", lambda self, d: d * 0.5 * (1.0 + self._take()["kept"]))
    elif broken == "layernorm":
        layer = LayerNorm(4, dtype=F64)

        def wrong(self, dout):  # forgets the xhat * mean(g * xhat) term
            c = self._take()
            g = dout * self.weight.data
            return (g - g.mean(-1, keepdims=True)) * c["rstd"]
        monkeypatch.setattr(LayerNorm, "backward", wrong)
    else:
        layer = MultiHeadAttention(4, 4, 2, dtype=F64)
        randomize(layer, rng)
        orig = Softmax.backward
        monkeypatch.setattr(Softmax, "backward", lambda self, d: orig(self, d) * 2.0)
    errors = check_layer(layer, x)
    assert max(errors.values()) > 1e-3


def test_embedding_gradient_buffer_is_reused_and_rezeroed(device, rng):
    """zero_grad keeps the embedding's (V, C) buffer; the next backward must start from zero."""
    layer = Embedding(6, 3, dtype=F64)
    ids1, ids2 = to_dev(np.array([[0, 1, 1]])), to_dev(np.array([[2, 5, 2]]))
    d = to_dev(rng.standard_normal((1, 3, 3)), F64)
    layer(ids1)
    layer.backward(d)
    first = layer.weight.grad
    layer.zero_grad()
    assert layer.weight.grad is None
    layer(ids2)
    layer.backward(d)
    assert layer.weight.grad is first  # the same memory, refilled
    expected = np.zeros((6, 3))
    np.add.at(expected, backend.to_host(ids2).reshape(-1), backend.to_host(d).reshape(3, 3))
    np.testing.assert_array_equal(backend.to_host(layer.weight.grad), expected)


def test_no_grad_forward_between_forward_and_backward_changes_nothing(device, rng):
    """A block with dropout (masks, attention, LayerNorm, GELU, Linear) and the loss: an
    evaluation on another input between a forward and its backward keeps no cache and
    replaces none, so the backward is its own forward's."""
    cfg = GPTConfig(vocab_size=5, context_length=8, emb_dim=6, n_heads=2, n_layers=1, drop_rate=0.3, dtype=F64)
    block = TransformerBlock(cfg)
    randomize(block, rng)
    x, other = (to_dev(rng.standard_normal((2, T, 6)), F64) for T in (5, 3))
    dout = to_dev(rng.standard_normal((2, 5, 6)), F64)
    assert_eval_between_changes_nothing(block, x, dout, lambda: block(other))

    loss_fn = CrossEntropyLoss()
    logits, targets = to_dev(rng.standard_normal((4, 7)), F64), to_dev(np.array([0, 6, 2, 3]))
    loss_fn(logits, targets)
    dlogits = to_host(loss_fn.backward())
    loss_fn(logits, targets)
    with no_grad():
        loss_fn(logits[:2] * 3.0, targets[:2])
    np.testing.assert_array_equal(to_host(loss_fn.backward()), dlogits)
