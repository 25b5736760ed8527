"""Classification head, readout, partial training (set_trainable) and their checkpoints."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from numpygpt import backend
from numpygpt.checkpoint import load_checkpoint, save_checkpoint
from numpygpt.config import GPTConfig, count_parameters
from numpygpt.generate import generate
from numpygpt.gradcheck import check_layer, check_model_loss
from numpygpt.model import GPTModel
from numpygpt.nn import CrossEntropyLoss, SequenceReadout, no_grad
from conftest import assert_grads_ok, to_dev, to_host

F64 = "float64"


def tiny(**kw):
    return GPTConfig.preset("tiny", qkv_bias=True, **kw)


def randomized(model, rng, scale=0.3):
    for p in model.parameters():
        p.data = to_dev(rng.standard_normal(p.shape) * scale, model.cfg.dtype)
    return model


# -- loss and readout: gradient checks -----------------------------------------------------------

@given(B=st.integers(1, 5), K=st.integers(2, 6), seed=st.integers(0, 2**16))
def test_cross_entropy_on_class_logits(device, B, K, seed):
    rng = np.random.default_rng(seed)
    logits = to_dev(rng.standard_normal((B, K)) * 2, F64)
    targets = to_dev(rng.integers(0, K, B))
    assert_grads_ok(check_layer(CrossEntropyLoss(), logits, targets, input_names=["logits", "targets"]))


def test_cross_entropy_on_class_logits_matches_log_softmax(device):
    logits = np.array([[2.0, -1.0], [0.5, 0.5], [-3.0, 1.0]])
    targets = np.array([0, 1, 1])
    loss = float(CrossEntropyLoss()(to_dev(logits, F64), to_dev(targets)))
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    assert loss == pytest.approx(-logp[np.arange(3), targets].mean(), rel=1e-12)


@given(B=st.integers(1, 4), T=st.integers(1, 6), C=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_readout_last_gradient(device, B, T, C, seed):
    rng = np.random.default_rng(seed)
    assert_grads_ok(check_layer(SequenceReadout("last"), to_dev(rng.standard_normal((B, T, C)), F64), max_coords=None))


@given(B=st.integers(1, 4), T=st.integers(1, 6), C=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_readout_last_non_pad_gradient(device, B, T, C, seed):
    rng = np.random.default_rng(seed)
    pad = 3
    idx = rng.integers(0, 3, (B, T))  # never pad ...
    lengths = rng.integers(1, T + 1, B)
    idx[np.arange(T)[None, :] >= lengths[:, None]] = pad  # ... then right padding
    errors = check_layer(SequenceReadout("last_non_pad", pad_id=pad), to_dev(rng.standard_normal((B, T, C)), F64),
                         to_dev(idx), input_names=["x", "idx"], max_coords=None)
    assert_grads_ok(errors)


def test_readout_reads_each_rows_last_real_token(device):
    x = to_dev(np.arange(2 * 4 * 3).reshape(2, 4, 3), F64)
    idx = to_dev(np.array([[5, 6, 9, 9], [9, 5, 9, 7]]))  # pad 9; row 1 has a pad inside, not at the end
    r = SequenceReadout("last_non_pad", pad_id=9)
    np.testing.assert_array_equal(to_host(r(x, idx)), to_host(x)[[0, 1], [1, 3]])
    dx = to_host(r.backward(to_dev(np.ones((2, 3)), F64)))
    expected = np.zeros((2, 4, 3))
    expected[0, 1] = expected[1, 3] = 1
    np.testing.assert_array_equal(dx, expected)  # the gradient lands at the read positions only
    np.testing.assert_array_equal(to_host(SequenceReadout("last")(x)), to_host(x)[:, -1])


def test_readout_bad_input():
    x = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match="readout must be one of"):
        SequenceReadout("first")
    with pytest.raises(ValueError, match="needs the token ids"):
        SequenceReadout("last_non_pad")(x)
    with pytest.raises(ValueError, match="row 1 .* all padding"):
        SequenceReadout("last_non_pad", pad_id=0)(x, np.array([[1, 0, 0], [0, 0, 0]]))


# -- to_classifier --------------------------------------------------------------------------------

@pytest.mark.parametrize("readout", ["last", "last_non_pad"])
def test_whole_classifier_gradient(device, readout):
    rng = np.random.default_rng(3)
    model = GPTModel(tiny(dtype=F64, drop_rate=0.2), seed=0).to_classifier(3, readout=readout, pad_id=7, seed=1)
    randomized(model, rng)
    idx = rng.integers(0, 7, (3, 6))
    idx[0, 4:] = idx[2, 1:] = 7
    errors = check_model_loss(model, CrossEntropyLoss(), to_dev(idx), to_dev(np.array([0, 2, 1])), eps=1e-5,
                              before_forward=lambda: backend.manual_seed(0))
    assert_grads_ok(errors)


@pytest.mark.parametrize("tied", [True, False])
def test_to_classifier_keeps_the_body_and_reads_one_position(device, tied):
    model = GPTModel(tiny(tie_weights=tied), seed=0).eval()
    body = {n: to_host(p.data).copy() for n, p in model.named_parameters() if not n.startswith("lm_head")}
    idx = to_dev(np.random.default_rng(0).integers(0, 100, (2, 5)))
    assert model.to_classifier(4, seed=2) is model
    logits = model(idx)
    assert logits.shape == (2, 4) and model.cfg.num_classes == 4 and model.lm_head is None
    names = [n for n, _ in model.named_parameters()]
    assert names[-2:] == ["score.weight", "score.bias"] and not any(n.startswith("lm_head") for n in names)
    for n, p in model.named_parameters():
        if n in body:
            np.testing.assert_array_equal(to_host(p.data), body[n])
    # the head reads the last position: changing an earlier token changes the logits only through attention
    with no_grad():
        idx2 = idx.copy()
        idx2[:, -1] = (idx2[:, -1] + 1) % 100
        assert not np.allclose(to_host(model(idx2)), to_host(logits))
    np.testing.assert_array_equal(to_host(GPTModel(tiny(tie_weights=tied), seed=0).to_classifier(4, seed=2)(idx)),
                                  to_host(logits))  # seeded head


@pytest.mark.parametrize("C, K", [(32, 2), (64, 3)])
def test_the_head_starts_as_the_books_torch_linear(device, C, K):
    """torch.nn.Linear(C, K) after the seed: weight and bias U(-1/sqrt(C), 1/sqrt(C)), the
    bias not zero; the same seed draws the same head, another seed another."""
    def head(seed):
        model = GPTModel(tiny(emb_dim=C), seed=0).to_classifier(K, seed=seed)
        return to_host(model.score.weight.data), to_host(model.score.bias.data)

    weight, bias = head(123)
    assert weight.shape == (C, K) and bias.shape == (K,)
    bound = 1.0 / np.sqrt(C)
    for a in (weight, bias):
        assert np.abs(a).max() <= bound and np.all(a != 0)
    assert np.abs(weight).max() > 0.8 * bound  # spread over the range, not N(0, 0.02)
    assert abs(float(weight.std()) - bound / np.sqrt(3)) < 0.25 * bound / np.sqrt(3)  # a uniform's std
    again = head(123)
    np.testing.assert_array_equal(again[0], weight)
    np.testing.assert_array_equal(again[1], bias)
    assert not np.array_equal(head(124)[0], weight)


def test_to_classifier_bad_input():
    model = GPTModel(tiny(), seed=0)
    with pytest.raises(ValueError, match="is a classifier"):
        generate(GPTModel(tiny(), seed=0).to_classifier(2), np.array([[1, 2]]), 3)
    for bad in (1, 0, 2.5, "2", True):
        with pytest.raises(ValueError, match="num_classes must be an integer of at least 2"):
            model.to_classifier(bad)
    with pytest.raises(ValueError, match="pad_id must be a token id"):
        model.to_classifier(2, pad_id=-1)
    with pytest.raises(ValueError, match="readout must be one of"):
        model.to_classifier(2, readout="mean")
    assert model.cfg.num_classes is None and model.lm_head is not None  # nothing changed


def test_last_non_pad_ignores_what_follows_the_text(device):
    model = GPTModel(tiny(), seed=0).eval().to_classifier(2, readout="last_non_pad", pad_id=99, seed=1)
    short = to_dev(np.array([[5, 6, 7]]))
    padded = to_dev(np.array([[5, 6, 7, 99, 99]]))
    np.testing.assert_allclose(to_host(model(padded)), to_host(model(short)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tied", [True, False])
def test_classifier_round_trips_through_checkpoint_and_pretrained(device, tmp_path, tied):
    model = GPTModel(tiny(tie_weights=tied), seed=0).to_classifier(3, readout="last_non_pad", pad_id=9, seed=1)
    model.eval()
    idx = to_dev(np.array([[1, 2, 3, 9], [4, 5, 9, 9]]))
    expected = to_host(model(idx))
    save_checkpoint(tmp_path / "ck.safetensors", model)
    loaded = load_checkpoint(tmp_path / "ck.safetensors")["model"].eval()
    np.testing.assert_array_equal(to_host(loaded(idx)), expected)
    model.save_pretrained(tmp_path / "hf")
    again = GPTModel.from_pretrained(tmp_path / "hf")
    assert (again.cfg.num_classes, again.cfg.readout, again.cfg.pad_id) == (3, "last_non_pad", 9)
    np.testing.assert_array_equal(to_host(again(idx)), expected)


def test_from_pretrained_then_to_classifier_keeps_every_body_weight(tmp_path):
    lm = GPTModel(tiny(tie_weights=True), seed=5)
    lm.save_pretrained(tmp_path)
    clf = GPTModel.from_pretrained(tmp_path).to_classifier(2, seed=0)
    ref = dict(lm.named_parameters())
    for name, p in clf.named_parameters():
        if not name.startswith("score."):
            np.testing.assert_array_equal(to_host(p.data), to_host(ref[name].data))


# -- set_trainable: what trains, what is cached, what the backward computes ----------------------

def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_set_trainable_choices():
    model = GPTModel(GPTConfig(vocab_size=20, context_length=8, emb_dim=8, n_heads=2, n_layers=12), seed=0)
    model.to_classifier(2, seed=0)
    last = {n for n, _ in model.named_parameters() if n.startswith(("h.11.", "ln_f.", "score."))}
    assert trainable_names(model.set_trainable("last-block")) == last
    assert not any(n.startswith("h.1.") for n in last)  # h.1 is not h.11
    two = last | {n for n, _ in model.named_parameters() if n.startswith("h.10.")}
    assert trainable_names(model.set_trainable("last-two-blocks")) == two
    assert trainable_names(model.set_trainable("head")) == {"score.weight", "score.bias"}
    assert model.num_parameters(trainable_only=True) == 8 * 2 + 2
    assert trainable_names(model.set_trainable("all")) == {n for n, _ in model.named_parameters()}
    with pytest.raises(ValueError, match="unknown choice 'last-3'"):
        model.set_trainable("last-3")
    model.freeze("h.1")
    assert not any(n.startswith("h.1.") for n in trainable_names(model))
    assert any(n.startswith("h.11.") for n in trainable_names(model))


def caches(module):
    return [getattr(m, "_cache", None) for m in module.modules()]


@pytest.mark.parametrize("which", ["last-block", "last-two-blocks", "head"])
def test_frozen_layers_below_keep_no_cache_and_get_the_same_gradients(device, which):
    cfg = tiny(n_layers=4, drop_rate=0.0, dtype=F64)
    rng = np.random.default_rng(0)
    idx, targets = to_dev(rng.integers(0, 128, (2, 6))), to_dev(np.array([1, 0]))

    def step(model):
        loss_fn = CrossEntropyLoss()
        loss_fn(model(idx), targets)
        model.backward(loss_fn.backward())

    full = GPTModel(cfg, seed=0).to_classifier(2, seed=1)
    step(full)
    part = GPTModel(cfg, seed=0).to_classifier(2, seed=1).set_trainable(which)
    n_train = {"last-block": 1, "last-two-blocks": 2, "head": 0}[which]
    part(idx)
    frozen_below = [part.wte, part.wpe, part.drop] + part.h[:4 - n_train]
    assert all(c is None for m in frozen_below for c in caches(m))
    for block in part.h[4 - n_train:]:
        assert block.ln_1._cache is not None and block.attn.c_attn._cache is not None
    part.zero_grad()
    step(part)  # a frozen layer's backward would raise: it has no cache
    full_grads = dict(full.named_parameters())
    for name, p in part.named_parameters():
        if p.requires_grad:
            np.testing.assert_allclose(to_host(p.grad), to_host(full_grads[name].grad), rtol=1e-12, atol=1e-14)
        else:
            assert p.grad is None, name
    assert part.num_parameters(trainable_only=True) == count_parameters(part.cfg, trainable=which)


def test_language_model_trains_partially_too(device):
    model = GPTModel(tiny(n_layers=3), seed=0).set_trainable("last-block")  # untied: wte stays frozen
    idx = to_dev(np.random.default_rng(0).integers(0, 128, (2, 5)))
    loss_fn = CrossEntropyLoss()
    loss_fn(model(idx), idx)
    assert all(c is None for c in caches(model.h[0]))
    model.backward(loss_fn.backward())
    assert model.lm_head.weight.grad is not None and model.h[0].ln_1.weight.grad is None


GPT2_SMALL = GPTConfig.preset("gpt2", qkv_bias=True, tie_weights=True)


def test_book_count_last_block_classifier():
    cfg = GPT2_SMALL.replace(num_classes=2)
    assert count_parameters(cfg, trainable="last-block") == 7_090_946
    model = GPTModel(GPT2_SMALL, init=False).to_classifier(2, seed=0).set_trainable("last-block")  # zeros: cheap
    assert model.num_parameters(trainable_only=True) == 7_090_946


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("num_classes", [None, 3])
def test_counts_from_config_match_the_model(tied, num_classes):
    cfg = tiny(tie_weights=tied, num_classes=num_classes)
    model = GPTModel(cfg, seed=0)
    assert model.num_parameters() == count_parameters(cfg)
    for which in ("all", "head", "last-block", "last-two-blocks"):
        assert model.set_trainable(which).num_parameters(trainable_only=True) == count_parameters(cfg, trainable=which)

