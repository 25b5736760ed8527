"""BlockwiseAttention: equal to the plain MultiHeadAttention (float64, to rounding) on
random shapes and tile sizes, gradient-checked, on the KV-cache path, with dropout,
and chosen by GPTConfig.attn_impl. Tiles are tiny so that every shape has several."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from numpygpt import GPTConfig, GPTModel, backend, parallel
from numpygpt.gradcheck import check_layer, report
from numpygpt.nn import BlockwiseAttention, KVCache, MultiHeadAttention, make_attention, no_grad
from numpygpt.nn import blockwise_attention
from conftest import assert_eval_between_changes_nothing, to_dev

F64 = "float64"


def pair(C, NH, bias, rng, block_q, block_k, dropout=0.0):
    """A plain and a blockwise attention layer with the same random weights."""
    dense = MultiHeadAttention(C, C, NH, dropout=dropout, qkv_bias=bias, dtype=F64)
    tiled = BlockwiseAttention(C, C, NH, dropout=dropout, qkv_bias=bias, dtype=F64, mode="blockwise",
                               block_q=block_q, block_k=block_k)
    for p, q in zip(dense.parameters(), tiled.parameters()):
        p.data = to_dev(rng.standard_normal(p.shape) * 0.5, F64)
        q.data = p.data.copy()
    return dense, tiled


def assert_close(a, b, what):
    a, b = backend.to_host(a), backend.to_host(b)
    scale = max(1.0, float(np.abs(b).max()))
    assert np.abs(a - b).max() <= 1e-12 * scale, f"{what}: max |diff| {np.abs(a - b).max():.3g}"


@given(B=st.integers(1, 2), T=st.integers(1, 11), NH=st.integers(1, 3), hs=st.integers(1, 4),
       block_q=st.integers(1, 5), block_k=st.integers(1, 5), bias=st.booleans(), threads=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**16))
def test_equals_dense_attention(device, B, T, NH, hs, block_q, block_k, bias, threads, seed):
    """Output, input gradient and every parameter gradient, T often not a multiple of a tile."""
    rng = np.random.default_rng(seed)
    C = NH * hs
    dense, tiled = pair(C, NH, bias, rng, block_q, block_k)
    x = to_dev(rng.standard_normal((B, T, C)), F64)
    dout = to_dev(rng.standard_normal((B, T, C)), F64)
    with parallel.num_threads(threads):
        y_tiled = tiled(x)
        dx_tiled = tiled.backward(dout)
    assert_close(y_tiled, dense(x), "output")
    assert_close(dx_tiled, dense.backward(dout), "dx")
    for (name, p), q in zip(dense.named_parameters(), tiled.parameters()):
        assert_close(q.grad, p.grad, name)


@given(B=st.integers(1, 2), T=st.integers(1, 7), NH=st.integers(1, 2), hs=st.integers(1, 3),
       block=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_gradient_check(device, B, T, NH, hs, block, seed):
    rng = np.random.default_rng(seed)
    C = NH * hs
    _, tiled = pair(C, NH, True, rng, block, block + 1)
    errors = check_layer(tiled, to_dev(rng.standard_normal((B, T, C)), F64))
    assert errors and max(errors.values()) <= 1e-6, "\n" + report(errors)


def test_no_T_by_T_array_is_kept(device, rng):
    B, T, NH, hs = 2, 12, 2, 3
    _, tiled = pair(NH * hs, NH, False, rng, 4, 4)
    tiled(to_dev(rng.standard_normal((B, T, NH * hs)), F64))
    for name, a in tiled._cache.items():
        assert a.size <= B * NH * T * hs, f"{name} {a.shape} grows with T^2"


def test_kv_cache_path(device, rng):
    """A prompt, then single tokens, then a chunk of three, through the cache: every step's
    output equals the plain attention's with its own cache, and the whole sequence at once."""
    B, NH, hs, T_max = 2, 2, 3, 16
    C = NH * hs
    dense, tiled = pair(C, NH, True, rng, 3, 2)
    x = to_dev(rng.standard_normal((B, 10, C)), F64)
    cache_dense, cache_tiled = KVCache(T_max), KVCache(T_max)
    outs = []
    with no_grad():
        for start, stop in [(0, 5), (5, 6), (6, 7), (7, 10)]:
            y = tiled(x[:, start:stop], cache_tiled)
            assert_close(y, dense(x[:, start:stop], cache_dense), f"tokens {start}:{stop}")
            outs.append(backend.to_host(y))
        whole = tiled(x)
    assert cache_tiled.length == 10
    assert_close(np.concatenate(outs, axis=1), whole, "cached steps vs whole sequence")


def test_dropout_runs_the_plain_path_in_training(device, rng):
    """Attention dropout is not tiled: in training with dropout the plain path runs (same
    masks, same numbers); in eval mode the blockwise path runs."""
    B, T, NH, hs = 2, 6, 2, 2
    dense, tiled = pair(NH * hs, NH, False, rng, 2, 2, dropout=0.5)
    x = to_dev(rng.standard_normal((B, T, NH * hs)), F64)
    assert not tiled.uses_blockwise(x)
    backend.manual_seed(3)
    y_tiled = tiled(x)
    backend.manual_seed(3)
    assert_close(y_tiled, dense(x), "training output with dropout")
    dout = to_dev(rng.standard_normal((B, T, NH * hs)), F64)
    assert_close(tiled.backward(dout), dense.backward(dout), "training dx with dropout")
    tiled.eval()
    dense.eval()
    assert tiled.uses_blockwise(x)
    assert_close(tiled(x), dense(x), "eval output")
    assert "lse" in tiled._cache


def test_auto_mode_chooses_by_length(monkeypatch, rng):
    monkeypatch.setattr(blockwise_attention, "AUTO_MIN_T", 4)
    layer = BlockwiseAttention(4, 4, 2, mode="auto")
    assert not layer.uses_blockwise(np.zeros((1, 3, 4), dtype=np.float32))
    assert layer.uses_blockwise(np.zeros((1, 4, 4), dtype=np.float32))


def test_make_attention_and_config_choose_the_class():
    assert type(make_attention("dense", 4, 4, 2)) is MultiHeadAttention
    assert make_attention("auto", 4, 4, 2).mode == "auto"
    assert make_attention("blockwise", 4, 4, 2).mode == "blockwise"
    with pytest.raises(ValueError, match="attn_impl"):
        make_attention("flash", 4, 4, 2)
    with pytest.raises(ValueError, match="attn_impl"):
        GPTConfig.preset("tiny", attn_impl="flash")
    with pytest.raises(ValueError, match="mode"):
        BlockwiseAttention(4, 4, 2, mode="dense")
    with pytest.raises(ValueError, match="tile sizes"):
        BlockwiseAttention(4, 4, 2, block_q=0)
    model = GPTModel(GPTConfig.preset("tiny", attn_impl="dense"))
    assert all(type(b.attn) is MultiHeadAttention for b in model.h)


def test_model_logits_and_gradients_match_dense(device, rng):
    """A tiny GPT with attn_impl='blockwise' (tiles of 8) equals the same weights with 'dense'."""
    from numpygpt import CrossEntropyLoss

    cfg = GPTConfig.preset("tiny", dtype=F64, attn_impl="dense")
    dense = GPTModel(cfg, seed=1)
    tiled = GPTModel(cfg.replace(attn_impl="blockwise"), seed=1)
    for block in tiled.h:
        block.attn.block_q = block.attn.block_k = 8
    idx = to_dev(rng.integers(0, cfg.vocab_size, (2, 21)))
    targets = to_dev(rng.integers(0, cfg.vocab_size, (2, 21)))
    for model in (dense, tiled):
        loss_fn = CrossEntropyLoss()
        model.loss = loss_fn(model(idx), targets)
        model.backward(loss_fn.backward())
    assert abs(float(dense.loss) - float(tiled.loss)) <= 1e-12
    for (name, p), q in zip(dense.named_parameters(), tiled.parameters()):
        assert_close(q.grad, p.grad, name)


def test_backward_without_forward_raises():
    with pytest.raises(RuntimeError, match="without a cached forward"):
        BlockwiseAttention(4, 4, 2, mode="blockwise").backward(np.zeros((1, 2, 4), dtype=np.float32))


@pytest.mark.parametrize("T_train, T_eval", [(3, 6), (6, 3)])
def test_no_grad_forward_between_forward_and_backward_changes_nothing(monkeypatch, T_train, T_eval):
    """mode="auto" takes the plain path below AUTO_MIN_T queries and the tiles from it up: an
    evaluation that takes the other path between a forward and its backward leaves the
    backward on its own forward's path, with its gradients bit for bit. NumPy only: on CuPy
    mode="auto" always takes the plain path."""
    monkeypatch.setattr(blockwise_attention, "AUTO_MIN_T", 5)
    rng = np.random.default_rng(0)
    layer = BlockwiseAttention(6, 6, 2, qkv_bias=True, dtype=F64, mode="auto", block_q=2, block_k=2)
    x, other = (to_dev(rng.standard_normal((2, T, 6)), F64) for T in (T_train, T_eval))
    dout = to_dev(rng.standard_normal((2, T_train, 6)), F64)
    assert_eval_between_changes_nothing(layer, x, dout, lambda: layer(other))
