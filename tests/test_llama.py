"""Llama 3 and Qwen3 models: presets and parameter counts, configs refused with one clear
error, whole-model gradient checks in float64, Hugging Face parameter names, and
generation with the KV cache equal to generation without it."""

import numpy as np
import pytest

from numpygpt import backend
from numpygpt.config import LLAMA_PRESETS, LlamaConfig, config_from_dict, count_parameters, preset_config
from numpygpt.generate import generate
from numpygpt.gradcheck import check_model_loss
from numpygpt.llama import LlamaModel, Qwen3Block
from numpygpt.nn import CrossEntropyLoss
from conftest import assert_grads_ok, to_dev, to_host

F64 = "float64"


@pytest.mark.parametrize("name, tied, expected", [
    ("llama-3.2-1b", True, 1_235_814_400),   # meta-llama/Llama-3.2-1B, tied head
    ("qwen3-0.6b", True, 596_049_920),       # Qwen/Qwen3-0.6B, tied head
    ("llama-3.2-1b", False, 1_235_814_400 + 128256 * 2048),
    ("qwen3-0.6b", False, 596_049_920 + 151936 * 1024),
])
def test_count_parameters_of_the_real_models(name, tied, expected):
    assert count_parameters(LlamaConfig.preset(name), tied=tied) == expected


@pytest.mark.parametrize("name", sorted(LLAMA_PRESETS))
def test_count_parameters_matches_the_built_model(name):
    cfg = LlamaConfig.preset(name)
    if count_parameters(cfg) > 50_000_000:  # the real sizes: build 1- and 2-layer, small-vocabulary copies
        one, two = (cfg.replace(n_layers=n, vocab_size=8) for n in (1, 2))
        per_layer = LlamaModel(two, init=False).num_parameters() - LlamaModel(one, init=False).num_parameters()
        assert count_parameters(cfg) == (count_parameters(one) + (cfg.n_layers - 1) * per_layer
                                         + (cfg.vocab_size - 8) * cfg.emb_dim)  # tied: one (V, C) table
        cfg = one
    model = LlamaModel(cfg, init=False)
    assert model.num_parameters() == count_parameters(cfg)
    assert count_parameters(cfg, tied=not cfg.tie_weights) != count_parameters(cfg)


def test_llama_small_is_about_20m_and_presets_are_found_by_name():
    assert 15e6 < count_parameters(LlamaConfig.preset("llama-small")) < 25e6
    assert preset_config("qwen3-tiny").qk_norm and not preset_config("llama-tiny").qk_norm
    assert preset_config("gpt2").model_type == "gpt2"
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("llama-9b")


@pytest.mark.parametrize("changes, message", [
    (dict(n_heads=8, n_kv_heads=3), "must be a multiple of n_kv_heads"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "unknown rope_type 'yarn'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "needs low_freq_factor"),
    (dict(model_type="mistral"), "model_type must be 'llama' or 'qwen3'"),
    (dict(head_dim=7), "head_dim must be even"),
    (dict(n_kv_heads=0), "n_kv_heads must be a positive integer"),
])
def test_bad_configs_are_refused_with_one_clear_error(changes, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig.preset("llama-tiny", **changes)


def test_config_round_trips_through_a_dict_by_model_type():
    for name in ("llama-tiny", "qwen3-tiny", "llama-3.2-1b"):
        cfg = LlamaConfig.preset(name)
        assert config_from_dict(cfg.to_dict()) == cfg
    gpt = preset_config("tiny")
    assert config_from_dict(gpt.to_dict()) == gpt  # GPT-2's dicts carry no model_type
    with pytest.raises(ValueError, match="unknown model_type 'bert'"):
        config_from_dict({"model_type": "bert"})


def test_parameter_names_are_hugging_faces():
    names = [n for n, _ in LlamaModel(LlamaConfig.preset("qwen3-tiny", tie_weights=False)).named_parameters()]
    assert names[:4] == ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
                         "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"]
    assert "model.layers.1.self_attn.q_norm.weight" in names and "model.layers.1.mlp.down_proj.weight" in names
    assert names[-2:] == ["model.norm.weight", "lm_head.weight"]
    tied = [n for n, _ in LlamaModel(LlamaConfig.preset("llama-tiny")).named_parameters()]
    assert "lm_head.weight" not in tied and not any("q_norm" in n for n in tied)


def test_init_is_seeded_and_norms_start_at_one():
    cfg = LlamaConfig.preset("qwen3-tiny")
    a, b, c = LlamaModel(cfg, seed=1), LlamaModel(cfg, seed=1), LlamaModel(cfg, seed=2)
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        np.testing.assert_array_equal(to_host(p.data), to_host(q.data))
        if name.endswith("norm.weight"):
            assert np.all(to_host(p.data) == 1)
        else:
            assert not np.array_equal(to_host(p.data), to_host(r.data))
            assert 0.01 < float(to_host(p.data).std()) < 0.03


@pytest.mark.parametrize("preset, tied, impl", [("llama-tiny", True, "dense"), ("llama-tiny", False, "blockwise"),
                                                ("qwen3-tiny", True, "blockwise"), ("qwen3-tiny", False, "dense")])
def test_whole_model_gradients_match_finite_differences(device, preset, tied, impl):
    rng = np.random.default_rng(0)
    cfg = LlamaConfig.preset(preset, vocab_size=13, dtype=F64, tie_weights=tied, attn_impl=impl)
    model = LlamaModel(cfg, seed=0)
    for p in model.parameters():  # far from zero, so every gradient is exercised
        p.data = to_dev(0.5 * rng.standard_normal(p.shape), F64)
    T = 20  # past the tiny llama3 rope's original context of 16
    idx, targets = rng.integers(0, 13, (2, T)), rng.integers(0, 13, (2, T))
    targets[0, :3] = -100
    errors = check_model_loss(model, CrossEntropyLoss(), to_dev(idx), to_dev(targets), eps=1e-5, max_coords=8)
    assert len(errors) == len(model.parameters())
    assert_grads_ok(errors)


@pytest.mark.parametrize("preset", ["llama-tiny", "qwen3-tiny"])
def test_cached_generation_equals_uncached(device, preset):
    model = LlamaModel(LlamaConfig.preset(preset, dtype=F64), seed=3)
    for p in model.parameters():  # sharper logits than the 0.02 init: greedy picks differ by row
        p.data = p.data * 20 if p.data.ndim == 2 else p.data
    prompt = np.array([[5, 9, 2, 7], [1, 1, 3, 100]])
    cached = to_host(generate(model, prompt, 30, use_cache=True))
    uncached = to_host(generate(model, prompt, 30, use_cache=False))
    np.testing.assert_array_equal(cached, uncached)
    assert len(set(cached[0, 4:].tolist())) > 2  # not one token repeated
    sampled = [to_host(generate(model, prompt, 12, temperature=1.0, seed=7, use_cache=c)) for c in (True, False)]
    np.testing.assert_array_equal(*sampled)


def test_cached_logits_equal_uncached_logits(device):
    model = LlamaModel(LlamaConfig.preset("qwen3-tiny", dtype=F64, attn_impl="dense"), seed=0)
    ids = np.random.default_rng(0).integers(0, 128, (2, 24))
    full = to_host(model(ids))
    caches = model.new_kv_caches()
    steps = [to_host(model(ids[:, :10], caches))] + [to_host(model(ids[:, t:t + 1], caches)) for t in range(10, 24)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-11, atol=1e-12)
    assert caches[0].k.shape[1] == 2  # (B, NKV, capacity, hs): the KV heads only


def test_bad_token_ids_and_contexts_are_refused():
    model = LlamaModel(LlamaConfig.preset("llama-tiny"), seed=0)
    with pytest.raises(ValueError, match="out of range"):
        model(np.array([[1, 128]]))
    with pytest.raises(ValueError, match="exceeds context_length 64"):
        model(np.zeros((1, 65), dtype=np.int64))


def test_state_dict_round_trip_and_train_eval():
    a = LlamaModel(LlamaConfig.preset("qwen3-tiny"), seed=0)
    b = LlamaModel(LlamaConfig.preset("qwen3-tiny"), seed=1)
    b.load_state_dict(a.state_dict())
    ids = np.array([[3, 4, 5]])
    np.testing.assert_array_equal(to_host(a(ids)), to_host(b(ids)))
    assert all(not m.training for m in b.eval().modules())
    assert isinstance(b.model.layers[0], Qwen3Block)
    b.zero_grad()
    assert all(p.grad is None for p in b.parameters())


def test_training_checkpoint_of_a_llama_model_resumes_identically(tmp_path):
    """save_checkpoint / load_checkpoint build the family the saved config names."""
    from numpygpt.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
    from numpygpt.optim import AdamW

    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 128, (2, 9)) for _ in range(5)]

    def steps(model, opt, which):
        loss_fn = CrossEntropyLoss()
        for ids in (batches[i] for i in which):
            model.zero_grad()
            loss_fn(model(ids[:, :-1]), ids[:, 1:])
            model.backward(loss_fn.backward())
            opt.step()

    model = LlamaModel(LlamaConfig.preset("qwen3-tiny", tie_weights=False), seed=0)
    opt = AdamW(model, lr=1e-2, weight_decay=0.1)
    steps(model, opt, [0, 1])
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, model, opt, step=2)
    restored = load_checkpoint(path)["model"]  # no model given: built from the saved config
    assert isinstance(restored, LlamaModel) and restored.cfg == model.cfg
    opt2 = AdamW(restored, lr=1.0, weight_decay=0.0)
    read_checkpoint(path).apply(restored, opt2)
    steps(model, opt, [2, 3, 4])
    steps(restored, opt2, [2, 3, 4])
    for (name, p), q in zip(model.named_parameters(), restored.parameters()):
        np.testing.assert_array_equal(to_host(p.data), to_host(q.data), err_msg=name)
    with pytest.raises(ValueError, match="does not fit the model"):
        load_checkpoint(path, LlamaModel(LlamaConfig.preset("llama-tiny"), seed=0))
