"""LoRA on Llama and Qwen3: adapters on q/k/v/o_proj, gate/up/down_proj and an untied head,
through the same apply/merge/save/load functions as GPT-2's, gradient-checked in float64."""

import numpy as np
import pytest

import numpygpt
from numpygpt import CrossEntropyLoss, LlamaConfig, LlamaModel, apply_lora, load_lora, merge_lora, save_lora
from numpygpt.checkpoint import load_checkpoint, save_checkpoint
from numpygpt.config import count_parameters
from numpygpt.gradcheck import check_model_loss
from conftest import assert_grads_ok, to_dev, to_host

IDS = np.random.default_rng(0).integers(0, 128, (2, 20))


def base(preset="qwen3-tiny", **changes):
    return LlamaModel(LlamaConfig.preset(preset, tie_weights=False, **changes), seed=0)


def test_adapters_on_every_projection_and_the_untied_head():
    model = base()
    before = to_host(model(IDS))
    apply_lora(model, rank=4, alpha=8, seed=1)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    wrapped = {n.split(".")[-2] for n in trainable if n.startswith("model.layers.0.")}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert "lm_head.lora_A" in trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    np.testing.assert_array_equal(to_host(model(IDS)), before)  # B starts at zero: nothing changes yet
    cfg = model.cfg
    assert (cfg.lora_rank, cfg.lora_alpha) == (4, 8)
    assert model.num_parameters(trainable_only=True) == count_parameters(cfg, trainable="lora")
    assert model.num_parameters() == count_parameters(cfg)
    assert [n for n, _ in LlamaModel(cfg, seed=0).named_parameters()] == [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize("preset", ["llama-tiny", "qwen3-tiny"])
def test_lora_model_gradients_match_finite_differences(device, preset):
    rng = np.random.default_rng(0)
    model = base(preset, dtype="float64", vocab_size=13)
    for p in model.parameters():
        p.data = to_dev(0.5 * rng.standard_normal(p.shape), "float64")
    apply_lora(model, rank=2, alpha=3.0, seed=0)
    for name, p in model.named_parameters():
        if name.endswith(".lora_B"):  # away from zero, so lora_A's gradient is exercised too
            p.data = to_dev(0.3 * rng.standard_normal(p.shape), "float64")
    idx, targets = rng.integers(0, 13, (2, 18)), rng.integers(0, 13, (2, 18))
    errors = check_model_loss(model, CrossEntropyLoss(), to_dev(idx), to_dev(targets), eps=1e-5, max_coords=6)
    assert set(errors) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert_grads_ok(errors)


def trained_adapters(model):
    for name, p in model.named_parameters():  # as if fine-tuned
        if name.endswith(".lora_B"):
            p.data = p.data + 0.05
    return model


def test_merge_then_save_pretrained_writes_a_plain_model(tmp_path):
    model = trained_adapters(apply_lora(base(dtype="float64"), rank=4, alpha=8, seed=1))
    adapted = to_host(model(IDS))
    with pytest.raises(ValueError, match="merge_lora"):
        numpygpt.save_pretrained(model, tmp_path)
    merge_lora(model)
    np.testing.assert_allclose(to_host(model(IDS)), adapted, rtol=1e-10, atol=1e-12)
    numpygpt.save_pretrained(model, tmp_path)
    plain = numpygpt.from_pretrained(tmp_path, dtype="float64")
    assert plain.cfg.lora_rank is None
    np.testing.assert_allclose(to_host(plain(IDS)), adapted, rtol=1e-10, atol=1e-12)


def test_save_lora_and_load_lora_onto_the_base_model(tmp_path):
    model = trained_adapters(apply_lora(base(), rank=4, alpha=8, seed=1))
    save_lora(model, tmp_path / "adapters.safetensors")
    fresh = load_lora(base(), tmp_path / "adapters.safetensors")
    np.testing.assert_array_equal(to_host(fresh(IDS)), to_host(model(IDS)))
    with pytest.raises(ValueError, match="does not fit"):
        load_lora(base("llama-tiny"), tmp_path / "adapters.safetensors")


def test_checkpoint_of_a_lora_model_rebuilds_its_adapters(tmp_path):
    model = trained_adapters(apply_lora(base(), rank=2, alpha=4, seed=1))
    save_checkpoint(tmp_path / "ckpt.safetensors", model, step=1)
    restored = load_checkpoint(tmp_path / "ckpt.safetensors")["model"]
    assert restored.cfg == model.cfg and restored.cfg.lora_rank == 2
    np.testing.assert_array_equal(to_host(restored(IDS)), to_host(model(IDS)))
    assert restored.num_parameters(trainable_only=True) == count_parameters(model.cfg, trainable="lora")


@pytest.mark.parametrize("preset", ["llama-tiny", "qwen3-tiny"])
@pytest.mark.parametrize("classifier", [False, True])
def test_save_merged_writes_what_merge_then_save_pretrained_writes_and_leaves_the_model(tmp_path, preset, classifier):
    from numpygpt.lora import ADAPTERS_FILE, save_merged, unmerge_lora

    model = base(preset, dtype="float64")
    if classifier:
        model.to_classifier(3, readout="last_non_pad", pad_id=0, seed=2)
    trained_adapters(apply_lora(model, rank=4, alpha=8, seed=1))
    before = {n: to_host(p.data).copy() for n, p in model.named_parameters()}
    assert save_merged(model, tmp_path / "lazy") == str(tmp_path / "lazy" / ADAPTERS_FILE)
    for name, p in model.named_parameters():  # not one bit moved
        np.testing.assert_array_equal(to_host(p.data), before[name], err_msg=name)
    adapted = to_host(model(IDS))
    numpygpt.save_pretrained(merge_lora(model), tmp_path / "eager")  # (merge then unmerge: W off by rounding)
    unmerge_lora(model)
    assert (tmp_path / "lazy" / "config.json").read_text() == (tmp_path / "eager" / "config.json").read_text()
    assert (tmp_path / "lazy" / "model.safetensors").read_bytes() == (tmp_path / "eager" / "model.safetensors").read_bytes()
    loaded = numpygpt.from_pretrained(tmp_path / "lazy", dtype="float64")
    assert loaded.cfg.lora_rank is None and loaded.cfg.num_classes == (3 if classifier else None)
    np.testing.assert_allclose(to_host(loaded(IDS)), adapted, rtol=1e-10, atol=1e-12)
    fresh = base(preset, dtype="float64")
    if classifier:
        fresh.to_classifier(3, readout="last_non_pad", pad_id=0)
    load_lora(fresh, tmp_path / "lazy" / ADAPTERS_FILE)  # the adapters alone (and the class head)
    np.testing.assert_array_equal(to_host(fresh(IDS)), adapted)
