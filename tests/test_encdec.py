"""The encoder-decoder: its blocks and the whole model against centred differences in
float64 (pre- and post-LayerNorm, shared and separate embeddings, padded sources, dropout
with fixed masks), the memory's gradient, cached decoding against uncached, and the
Module plumbing (state_dict, zero_grad, train/eval)."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from numpygpt import backend
from numpygpt.encdec import DecoderBlock, EncDecConfig, EncoderBlock, EncoderDecoder
from numpygpt.gradcheck import check_gradients, check_layer, check_model_loss
from numpygpt.nn import CrossEntropyLoss, no_grad
from conftest import to_dev
from test_layers import F64, assert_ok, randomize

seeds = st.integers(0, 2**16)
V, PAD = 11, 0


def config(**kw):
    base = dict(vocab_size=V, context_length=12, emb_dim=8, n_heads=2, n_enc_layers=2, n_dec_layers=2,
                drop_rate=0.0, pad_id=PAD, dtype=F64)
    return EncDecConfig(**{**base, **kw})


def padded_ids(rng, B, T, min_length=1):
    """(B, T) ids in [1, V), right-padded with PAD to random lengths of at least ``min_length``."""
    ids = rng.integers(1, V, (B, T))
    lengths = rng.integers(min_length, T + 1, B)
    ids[np.arange(T)[None, :] >= lengths[:, None]] = PAD
    return ids


def fixed_masks(seed):
    return lambda: backend.manual_seed(seed)


@given(B=st.integers(1, 3), S=st.integers(1, 5), norm_first=st.booleans(), p=st.sampled_from([0.0, 0.2]),
       seed=seeds)
def test_encoder_block(device, B, S, norm_first, p, seed):
    rng = np.random.default_rng(seed)
    block = EncoderBlock(config(norm_first=norm_first, drop_rate=p))
    randomize(block, rng)
    x = to_dev(rng.standard_normal((B, S, 8)), F64)
    src_pad = to_dev(padded_ids(rng, B, S) == PAD)
    assert_ok(check_layer(block, x, src_pad, input_names=["x", "src_pad"], before_forward=fixed_masks(seed)))


@given(B=st.integers(1, 3), T=st.integers(1, 5), S=st.integers(1, 5), norm_first=st.booleans(),
       p=st.sampled_from([0.0, 0.2]), seed=seeds)
def test_decoder_block(device, B, T, S, norm_first, p, seed):
    """Both gradients: the target stream's and the memory's (through cross-attention)."""
    rng = np.random.default_rng(seed)
    block = DecoderBlock(config(norm_first=norm_first, drop_rate=p))
    randomize(block, rng)
    x = to_dev(rng.standard_normal((B, T, 8)), F64)
    memory = to_dev(rng.standard_normal((B, S, 8)), F64)
    src_pad = to_dev(padded_ids(rng, B, S) == PAD)
    assert_ok(check_layer(block, x, memory, src_pad, input_names=["x", "memory", "src_pad"],
                          before_forward=fixed_masks(seed)))


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("share,tie", [(True, True), (False, False), (False, True)])
def test_whole_model_gradients(device, norm_first, share, tie):
    """Every parameter of the model with its loss, padded sources and ignored targets, dropout on."""
    rng = np.random.default_rng(7)
    model = EncoderDecoder(config(norm_first=norm_first, share_embeddings=share, tie_weights=tie,
                                  drop_rate=0.2), seed=3)
    randomize(model, rng, scale=0.3)
    for name, p in model.named_parameters():
        if ".ln_" in name and name.endswith(".weight"):  # LayerNorm scales near 1, as trained ones are:
            p.data += 1.0  # a chain of post-LN norms at scale 0.3 shrinks the gradient to noise
    # sources of 3 tokens or more: with one real key a row's cross-attention is constant in its
    # query, and c_q's gradient is all but zero, below what the differences can resolve
    src, tgt = padded_ids(rng, 3, 6, min_length=3), padded_ids(rng, 3, 5)
    targets = np.where(tgt == PAD, -100, rng.integers(1, V, tgt.shape))
    targets[:, 0] = rng.integers(1, V, 3)  # every row has a target
    errors = check_model_loss(model, CrossEntropyLoss(), (to_dev(src), to_dev(tgt)), to_dev(targets), eps=1e-5,
                              max_coords=12, before_forward=fixed_masks(5))
    assert len(errors) == len(model.parameters())
    assert_ok(errors)


def test_memory_gradient_sums_every_decoder_layer(device):
    """decode_backward's dmemory against centred differences of the decoder in the memory:
    it is right only if every layer's cross-attention contributes."""
    rng = np.random.default_rng(0)
    model = EncoderDecoder(config(n_dec_layers=3), seed=1)
    randomize(model, rng, scale=0.3)
    src, tgt = to_dev(padded_ids(rng, 2, 5)), to_dev(padded_ids(rng, 2, 4))
    memory, src_pad = model.encode(src)
    memory = to_dev(rng.standard_normal(memory.shape), F64)
    errors = check_gradients(lambda memory: model.decode(tgt, memory, src_pad), model.decode_backward,
                             {"memory": memory}, {}, max_coords=None)
    assert_ok(errors)


@pytest.mark.parametrize("norm_first", [True, False])
def test_cached_decoding_equals_uncached(device, norm_first):
    """Token by token with the KV caches (cross-attention K/V computed at the first step)
    gives the logits of one full decode, and greedy decoding the same tokens either way."""
    rng = np.random.default_rng(2)
    model = EncoderDecoder(config(norm_first=norm_first), seed=4)
    randomize(model, rng, scale=0.4)
    src, tgt = to_dev(padded_ids(rng, 3, 6)), to_dev(rng.integers(1, V, (3, 7)))
    with no_grad():
        memory, src_pad = model.encode(src)
        full = backend.to_host(model.decode(tgt, memory, src_pad))
        caches = model.new_kv_caches(memory.shape[1])
        steps = [backend.to_host(model.decode(tgt[:, t:t + 1], memory, src_pad, caches)) for t in range(7)]
    assert [c[1].length for c in caches] == [6, 6] and caches[0][0].length == 7
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-10, atol=1e-12)
    cached = model.greedy_decode(src, bos_id=1, eos_id=2, max_new_tokens=10)
    uncached = model.greedy_decode(src, bos_id=1, eos_id=2, max_new_tokens=10, use_cache=False)
    np.testing.assert_array_equal(cached, uncached)
    # each token is the argmax of one full decode of the tokens before it (up to EOS)
    prefix = np.concatenate([np.ones((3, 1), int), cached[:, :-1]], axis=1)
    with no_grad():
        best = backend.to_host(model.decode(to_dev(prefix), memory, src_pad)).argmax(-1)
    alive = np.cumsum(np.cumsum(cached == 2, axis=1), axis=1) <= 1  # to the first EOS, included
    np.testing.assert_array_equal(best[alive], cached[alive])


def test_greedy_decode_stops_when_every_row_has_ended(device):
    """A model whose head always scores EOS highest: one step, and every row is just EOS."""
    model = EncoderDecoder(config(tie_weights=False), seed=0)
    model.ln_dec.weight.data[:] = 0.0  # the decoder's output is ln_dec.bias = e_0 everywhere
    model.ln_dec.bias.data[:] = to_dev(np.eye(8)[0], F64)
    model.lm_head.weight.data[:] = 0.0
    model.lm_head.weight.data[2, 0] = 1.0  # logit of EOS = 1, every other 0
    out = model.greedy_decode(to_dev(np.array([[3, 4, 0], [5, 6, 7]])), bos_id=1, eos_id=2, max_new_tokens=8)
    np.testing.assert_array_equal(out, [[2], [2]])


def test_module_plumbing(device):
    cfg = config(share_embeddings=False, tie_weights=False)
    model = EncoderDecoder(cfg, seed=0)
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(names)) and "decoder.1.cross_attn.c_kv.weight" in names
    assert {"src_emb.weight", "tgt_emb.weight", "lm_head.weight"} <= set(names)
    shared = EncoderDecoder(config(), seed=0)
    shared_names = [n for n, _ in shared.named_parameters()]
    assert "tgt_emb.weight" not in shared_names and "lm_head.weight" not in shared_names
    assert shared.num_parameters() == model.num_parameters() - 2 * V * 8
    # the same seed, the same weights; state_dict loads into a fresh model
    again = EncoderDecoder(cfg, seed=0)
    for (n, p), (_, q) in zip(model.named_parameters(), again.named_parameters()):
        np.testing.assert_array_equal(backend.to_host(p.data), backend.to_host(q.data), err_msg=n)
    other = EncoderDecoder(cfg, seed=1)
    other.load_state_dict(model.state_dict())
    src, tgt = to_dev(np.array([[3, 4, 0]])), to_dev(np.array([[1, 5]]))
    np.testing.assert_array_equal(backend.to_host(other(src, tgt)), backend.to_host(model(src, tgt)))
    model.backward(to_dev(np.ones((1, 2, V)), F64))
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert not model.eval().decoder[0].drop_mlp.training and model.train().decoder[0].drop_mlp.training


def test_refuses_bad_inputs(device):
    """Ids are checked on the host, as the loaders give them (ids already on a GPU are
    trusted: checking them there would cost a sync per batch)."""
    model = EncoderDecoder(config(), seed=0)
    with pytest.raises(ValueError, match="all padding"):
        model(np.array([[PAD, PAD]]), np.array([[1]]))
    with pytest.raises(ValueError, match="out of range"):
        model(np.array([[3, V]]), np.array([[1]]))
    with pytest.raises(ValueError, match="context_length"):
        model(np.ones((1, 13), int), np.array([[1]]))
    with pytest.raises(ValueError, match="divisible"):
        config(emb_dim=9)
