"""LoRA: the layer's gradients, a fresh adapter changes nothing, merge/unmerge, freezing,
saving and loading adapters, the book's counts and bad input."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from numpygpt import backend
from numpygpt.checkpoint import load_checkpoint, save_checkpoint
from numpygpt.config import GPTConfig, count_parameters
from numpygpt.gradcheck import check_layer, check_model_loss
from numpygpt.lora import (ADAPTERS_FILE, apply_lora, load_lora, lora_parameters, lora_tensor_shapes, merge_lora,
                           save_lora, save_merged, unmerge_lora)
from numpygpt.model import GPTModel
from numpygpt.nn import CrossEntropyLoss, Linear, LoRALinear, LoRAOutputHead, OutputHead, Parameter, no_grad
from conftest import assert_eval_between_changes_nothing, assert_grads_ok, to_dev, to_host

F64 = "float64"


def tiny(**kw):
    return GPTConfig.preset("tiny", qkv_bias=True, **kw)


def random_adapters(model_or_layer, rng, scale=0.5):
    """B is zeros when fresh, which would leave dA = 0: give the adapters values."""
    for name, p in model_or_layer.named_parameters():
        if name.endswith(("lora_A", "lora_B")):
            p.data = to_dev(rng.standard_normal(p.shape) * scale, p.dtype)


# -- the layer -------------------------------------------------------------------------------------

@given(B=st.integers(1, 3), T=st.integers(1, 4), n_in=st.integers(1, 6), o=st.integers(1, 4),
       splits=st.sampled_from([1, 3]), rank=st.integers(1, 3), bias=st.booleans(), train_base=st.booleans(),
       seed=st.integers(0, 2**16))
def test_lora_linear_gradient(device, B, T, n_in, o, splits, rank, bias, train_base, seed):
    rng = np.random.default_rng(seed)
    base = Linear(n_in, o * splits, bias=bias, dtype=F64, seed=seed)
    layer = LoRALinear(base, rank, alpha=2.0, splits=splits, seed=seed)
    random_adapters(layer, rng)
    layer.weight.requires_grad = train_base  # frozen by default; trainable too must be right
    assert_grads_ok(check_layer(layer, to_dev(rng.standard_normal((B, T, n_in)), F64)))


@given(B=st.integers(1, 3), T=st.integers(1, 4), C=st.integers(1, 5), V=st.integers(1, 7), rank=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_lora_output_head_gradient(device, B, T, C, V, rank, seed):
    rng = np.random.default_rng(seed)
    head = LoRAOutputHead(OutputHead(Parameter(to_dev(rng.standard_normal((V, C)), F64))), rank, 3.0, seed=seed)
    random_adapters(head, rng)
    assert_grads_ok(check_layer(head, to_dev(rng.standard_normal((B, T, C)), F64)))


def test_lora_linear_matches_three_separate_adapters(device):
    """splits=3 is three independent adapters on the Q, K and V column blocks (the book's layout)."""
    rng = np.random.default_rng(0)
    C, r, alpha = 4, 2, 6.0
    layer = LoRALinear(Linear(C, 3 * C, dtype=F64, seed=0), r, alpha, splits=3, seed=1)
    random_adapters(layer, rng)
    x = rng.standard_normal((5, C))
    A, B, W, b = (to_host(t) for t in (layer.lora_A.data, layer.lora_B.data, layer.weight.data, layer.bias.data))
    expected = np.concatenate([x @ W[:, k * C:(k + 1) * C] + b[k * C:(k + 1) * C] + alpha / r * (x @ A[k]) @ B[k]
                               for k in range(3)], axis=1)
    np.testing.assert_allclose(to_host(layer(to_dev(x, F64))), expected, rtol=1e-12, atol=1e-12)


def test_lora_init_and_frozen_base(device):
    base = Linear(64, 96, seed=0)
    layer = LoRALinear(base, rank=16, alpha=16, splits=3, seed=0)
    assert layer.lora_A.shape == (3, 64, 16) and layer.lora_B.shape == (3, 16, 32)
    A = to_host(layer.lora_A.data)
    assert np.abs(A).max() <= 0.25 and np.abs(A).max() > 0.24  # U(-1/sqrt(16), 1/sqrt(16))
    assert not np.any(to_host(layer.lora_B.data))
    assert layer.weight is base.weight and not layer.weight.requires_grad and not layer.bias.requires_grad
    x = to_dev(np.random.default_rng(0).standard_normal((2, 3, 64)), "float32")
    np.testing.assert_array_equal(to_host(layer(x)), to_host(base(x)))  # B = 0: exactly the base layer
    layer(x)
    layer.backward(to_dev(np.ones((2, 3, 96)), "float32"))
    assert layer.weight.grad is None and layer.bias.grad is None  # no dW matmul for the frozen base
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


@pytest.mark.parametrize("kw, message", [
    (dict(rank=0, alpha=1), "rank must be a positive integer"),
    (dict(rank=-2, alpha=1), "rank must be a positive integer"),
    (dict(rank=2.5, alpha=1), "rank must be a positive integer"),
    (dict(rank=2, alpha=0), "alpha must be a positive number"),
    (dict(rank=2, alpha=-1.0), "alpha must be a positive number"),
    (dict(rank=2, alpha=1, splits=4), "do not split into 4 equal blocks"),
])
def test_lora_linear_bad_input(kw, message):
    with pytest.raises(ValueError, match=message):
        LoRALinear(Linear(6, 6), **kw)


# -- a whole model ---------------------------------------------------------------------------------

def test_whole_classifier_with_lora_gradient(device):
    rng = np.random.default_rng(2)
    model = GPTModel(tiny(dtype=F64, drop_rate=0.2), seed=0).to_classifier(3, readout="last_non_pad", pad_id=5, seed=1)
    for p in model.parameters():
        p.data = to_dev(rng.standard_normal(p.shape) * 0.3, F64)
    apply_lora(model, rank=2, alpha=3.0, seed=4)
    random_adapters(model, rng)
    idx = rng.integers(0, 5, (3, 6))
    idx[0, 4:] = 5
    errors = check_model_loss(model, CrossEntropyLoss(), to_dev(idx), to_dev(np.array([0, 2, 1])), eps=1e-5,
                              before_forward=lambda: backend.manual_seed(0))
    assert set(errors) == {n for n, _ in lora_parameters(model)}  # only the adapters train
    assert_grads_ok(errors)


@pytest.mark.parametrize("kind", ["classifier", "untied-lm", "tied-lm"])
def test_apply_lora_wraps_every_linear_and_changes_nothing(device, kind):
    cfg = tiny(tie_weights=kind == "tied-lm")
    model = GPTModel(cfg, seed=0).eval()
    if kind == "classifier":
        model.to_classifier(2, seed=1)
    idx = to_dev(np.random.default_rng(0).integers(0, 128, (2, 7)))
    before = to_host(model(idx))
    weights = {n: to_host(p.data).copy() for n, p in model.named_parameters()}
    apply_lora(model, rank=4, alpha=8, seed=0)
    np.testing.assert_array_equal(to_host(model(idx)), before)  # B = 0 exactly
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_tensor_shapes(model.cfg))
    assert {n: tuple(p.shape) for n, p in lora_parameters(model)} == lora_tensor_shapes(model.cfg)
    assert all(n in weights for n in {n for n, _ in model.named_parameters()} - trainable)  # names kept
    wrapped_head = {"classifier": model.head, "untied-lm": model.lm_head}.get(kind)
    assert wrapped_head is None or isinstance(wrapped_head, (LoRALinear, LoRAOutputHead))
    assert (model.cfg.lora_rank, model.cfg.lora_alpha) == (4, 8)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, rank=4, alpha=8)


def test_lora_step_trains_only_adapters_and_keeps_no_embedding_cache(device):
    model = GPTModel(tiny(), seed=0).to_classifier(2, seed=1)
    apply_lora(model, rank=2, alpha=2, seed=0)
    idx = to_dev(np.random.default_rng(0).integers(0, 128, (2, 5)))
    loss_fn = CrossEntropyLoss()
    loss_fn(model(idx), to_dev(np.array([0, 1])))
    assert model.wte._cache is None and model.wpe._cache is None  # frozen embeddings: run without a cache
    model.backward(loss_fn.backward())
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.endswith(("lora_A", "lora_B")), name


def test_merge_and_unmerge(device):
    rng = np.random.default_rng(0)
    model = GPTModel(tiny(), seed=0).eval()
    apply_lora(model, rank=4, alpha=8, seed=0)
    random_adapters(model, rng, scale=0.05)
    idx = to_dev(rng.integers(0, 128, (2, 6)))
    before = to_host(model(idx))
    weights = {n: to_host(p.data).copy() for n, p in model.named_parameters()}
    merge_lora(model)
    changed = [n for n, p in model.named_parameters() if not np.array_equal(to_host(p.data), weights[n])]
    assert set(changed) == {n.replace(".lora_A", ".weight") for n, _ in lora_parameters(model) if n.endswith("A")}
    np.testing.assert_allclose(to_host(model(idx)), before, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unmerge_lora"):
        save_checkpoint("never-written.safetensors", model)
    model.train()
    loss_fn = CrossEntropyLoss()
    loss_fn(model(idx), idx)
    with pytest.raises(RuntimeError, match="merged"):
        model.backward(loss_fn.backward())
    unmerge_lora(model)
    for n, p in model.named_parameters():
        np.testing.assert_allclose(to_host(p.data), weights[n], rtol=0, atol=1e-6)
    np.testing.assert_allclose(to_host(model.eval()(idx)), before, rtol=1e-5, atol=1e-6)


def test_merged_model_saves_as_a_plain_pretrained_model(tmp_path):
    rng = np.random.default_rng(0)
    model = GPTModel(tiny(), seed=0).eval().to_classifier(2, seed=0)
    apply_lora(model, rank=2, alpha=4, seed=0)
    random_adapters(model, rng, scale=0.1)
    idx = rng.integers(0, 128, (2, 6))
    expected = to_host(model(idx))
    with pytest.raises(ValueError, match="merge_lora"):
        model.save_pretrained(tmp_path)
    merge_lora(model).save_pretrained(tmp_path)
    plain = GPTModel.from_pretrained(tmp_path)
    assert plain.cfg.lora_rank is None and not lora_parameters(plain)
    np.testing.assert_allclose(to_host(plain(idx)), expected, rtol=1e-5, atol=1e-6)


def test_adapters_save_and_load_alone_and_in_a_checkpoint(device, tmp_path):
    rng = np.random.default_rng(1)
    GPTModel(tiny(), seed=0).save_pretrained(tmp_path / "base")  # a pretrained language model
    model = GPTModel.from_pretrained(tmp_path / "base").to_classifier(2, readout="last_non_pad", seed=1)
    apply_lora(model, rank=4, alpha=8, seed=0)
    random_adapters(model, rng, scale=0.1)
    idx = to_dev(rng.integers(0, 128, (2, 6)))
    expected = to_host(model(idx))

    save_lora(model, tmp_path / "adapters.safetensors")
    saved = sum(p.size for _, p in lora_parameters(model)) + model.score.weight.size + model.score.bias.size
    assert (tmp_path / "adapters.safetensors").stat().st_size < saved * 4 + 8192  # adapters and head only
    fresh = GPTModel.from_pretrained(tmp_path / "base").to_classifier(2, readout="last_non_pad", seed=99)
    load_lora(fresh, tmp_path / "adapters.safetensors")  # applies LoRA with the file's rank and alpha
    np.testing.assert_array_equal(to_host(fresh(idx)), expected)  # the head came from the file too
    assert fresh.num_parameters(trainable_only=True) == model.num_parameters(trainable_only=True)

    save_checkpoint(tmp_path / "ck.safetensors", model)
    loaded = load_checkpoint(tmp_path / "ck.safetensors")["model"].eval()
    assert (loaded.cfg.lora_rank, loaded.cfg.lora_alpha) == (4, 8)
    np.testing.assert_array_equal(to_host(loaded(idx)), expected)
    assert loaded.num_parameters(trainable_only=True) == model.num_parameters(trainable_only=True)


def test_load_lora_refuses_what_does_not_fit(tmp_path):
    model = GPTModel(tiny(), seed=0).to_classifier(2, seed=1)
    apply_lora(model, rank=4, alpha=8, seed=0)
    save_lora(model, tmp_path / "a.safetensors")
    other_rank = GPTModel(tiny(), seed=0).to_classifier(2, seed=1)
    apply_lora(other_rank, rank=2, alpha=8)
    with pytest.raises(ValueError, match="rank 4, alpha 8"):
        load_lora(other_rank, tmp_path / "a.safetensors")
    lm = GPTModel(tiny(), seed=0)  # a language model: its head adapter has another shape
    with pytest.raises(ValueError, match="does not fit"):
        load_lora(lm, tmp_path / "a.safetensors")
    assert not lora_parameters(lm)  # nothing applied
    save_checkpoint(tmp_path / "ck.safetensors", GPTModel(tiny(), seed=0))
    with pytest.raises(ValueError, match="not a numpygpt LoRA adapter file"):
        load_lora(lm, tmp_path / "ck.safetensors")
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_lora(lm, tmp_path / "b.safetensors")


@pytest.mark.parametrize("rank, alpha, message", [(0, 16, "rank"), (-1, 16, "rank"), (16, 0, "alpha"),
                                                  (16, -2.0, "alpha")])
def test_apply_lora_bad_input_changes_nothing(rank, alpha, message):
    model = GPTModel(tiny(), seed=0)
    with pytest.raises(ValueError, match=message):
        apply_lora(model, rank, alpha)
    assert not lora_parameters(model) and all(p.requires_grad for p in model.parameters())


def test_to_classifier_after_lora_is_refused():
    model = apply_lora(GPTModel(tiny(), seed=0), 2, 2)
    with pytest.raises(ValueError, match="before apply_lora"):
        model.to_classifier(2)


# -- the book's counts -----------------------------------------------------------------------------

def test_book_lora_count_gpt2_small_classifier():
    cfg = GPTConfig.preset("gpt2", qkv_bias=True, tie_weights=True, num_classes=2, lora_rank=16, lora_alpha=16)
    assert count_parameters(cfg, trainable="lora") == 2_666_528
    model = GPTModel(cfg.replace(num_classes=None, lora_rank=None, lora_alpha=None), init=False)  # zeros: cheap
    apply_lora(model.to_classifier(2, seed=0), rank=16, alpha=16, seed=0)
    assert model.num_parameters(trainable_only=True) == 2_666_528


def test_book_lora_count_gpt2_medium_untied_lm_head():
    cfg = GPTConfig.preset("gpt2-medium", qkv_bias=True, tie_weights=False)
    assert count_parameters(cfg.replace(lora_rank=16, lora_alpha=16), trainable="lora") == 7_898_384
    model = apply_lora(GPTModel(cfg, init=False), rank=16, alpha=16, seed=0)
    assert model.num_parameters(trainable_only=True) == 7_898_384
    assert isinstance(model.lm_head, LoRAOutputHead)


def test_lora_counts_from_config_match_the_model():
    for cfg in (tiny(), tiny(tie_weights=True), tiny(num_classes=3)):
        model = apply_lora(GPTModel(cfg, seed=0), rank=3, alpha=1.5)
        assert model.num_parameters(trainable_only=True) == count_parameters(model.cfg, trainable="lora")
        assert model.num_parameters() == count_parameters(model.cfg)
        with no_grad():
            assert GPTModel(model.cfg, seed=0).num_parameters() == model.num_parameters()


@pytest.mark.parametrize("classifier", [False, True])
def test_no_grad_forward_between_forward_and_backward_changes_nothing(device, classifier):
    """The adapters' u = s x A is kept in the layer's cache only by a forward with
    gradients: an evaluation in between leaves the pending backward's u, so dA is its own."""
    rng = np.random.default_rng(0)
    model = GPTModel(tiny(dtype="float64"), seed=0)
    if classifier:
        model.to_classifier(2, seed=1)
    apply_lora(model, rank=2, alpha=4, seed=0)
    for _, p in lora_parameters(model):
        p.data = to_dev(rng.standard_normal(p.shape) * 0.3, "float64")  # B != 0: dA depends on it
    idx, other = to_dev(rng.integers(0, 128, (2, 5))), to_dev(rng.integers(0, 128, (2, 5)))
    dlogits = to_dev(rng.standard_normal((2, 2) if classifier else (2, 5, 128)), "float64")
    assert_eval_between_changes_nothing(model, idx, dlogits, lambda: model(other))


def lora_model(classifier: bool, seed: int = 0):
    """A tiny LoRA model with random adapters (an untied LM head gets one too), the same for a seed."""
    model = GPTModel(tiny(tie_weights=False), seed=0)
    if classifier:
        model.to_classifier(2, seed=1)
    apply_lora(model, rank=2, alpha=4, seed=0)
    random_adapters(model, np.random.default_rng(seed), scale=0.3)
    return model


@pytest.mark.parametrize("classifier", [False, True])
def test_save_merged_writes_the_merged_weights_and_leaves_the_model_bit_for_bit(device, tmp_path, classifier):
    from safetensors.numpy import load_file

    model = lora_model(classifier)
    before = {n: to_host(p.data).copy() for n, p in model.named_parameters()}
    path = save_merged(model, tmp_path / "m")
    assert path == str(tmp_path / "m" / ADAPTERS_FILE)
    for n, p in model.named_parameters():
        np.testing.assert_array_equal(to_host(p.data), before[n], err_msg=n)  # not one bit moved
    assert not any(layer.merged for layer in model.modules() if hasattr(layer, "merged"))

    merged = merge_lora(lora_model(classifier))  # the same model, merged in place
    expected = {n: to_host(p.data) for n, p in merged.named_parameters() if not n.endswith(("lora_A", "lora_B"))}
    written = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert written.keys() == expected.keys()
    for n, a in expected.items():
        np.testing.assert_array_equal(written[n], a, err_msg=n)  # the bits merge_lora gives
    assert any(not np.array_equal(written[n], before[n]) for n in written)  # the adapters are in there

    plain = GPTModel.from_pretrained(tmp_path / "m")  # a plain model: no adapters
    assert plain.cfg.lora_rank is None and not lora_parameters(plain)
    fresh = lora_model(classifier, seed=99)
    load_lora(fresh, path)  # the adapters alone, as save_lora writes them
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        np.testing.assert_array_equal(to_host(q.data), before[n], err_msg=n)


def test_save_merged_refuses_a_merged_model_and_saves_a_plain_one_as_it_is(tmp_path):
    model = merge_lora(lora_model(classifier=True))
    with pytest.raises(ValueError, match="unmerge_lora"):
        save_merged(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    plain = GPTModel(tiny(), seed=0)
    assert save_merged(plain, tmp_path / "b") is None
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["config.json", "model.safetensors"]
