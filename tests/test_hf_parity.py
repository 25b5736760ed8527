"""Equality with Hugging Face transformers' LlamaForCausalLM and Qwen3ForCausalLM, float64.

Tiny random configurations are built here (nothing is downloaded), saved by transformers
and loaded by ``numpygpt.from_pretrained``; logits, the loss and every parameter's
gradient must agree to float64 rounding, at positions past the llama3 RoPE's original
context too, and greedy decoding with the KV cache must pick HF's tokens.

transformers computes some steps in float32 whatever the model's dtype (RMSNorm casts
to float32, eager attention's softmax runs in float32, the rotary frequencies and
cos/sin are float32). ``float32_means_float64`` points torch.float32 (alias torch.float)
at float64 while HF builds and runs its model, so those steps run in float64 as well
and the comparison is float64 against float64 throughout.
"""

import contextlib

import numpy as np
import pytest
import torch
import transformers

import numpygpt
from numpygpt import CrossEntropyLoss, backend
from numpygpt.generate import generate

F64 = "float64"
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


@contextlib.contextmanager
def float32_means_float64():
    saved = torch.float32, torch.float
    torch.float32 = torch.float = torch.float64
    try:
        yield
    finally:
        torch.float32, torch.float = saved


def hf_model(model_type: str, tied: bool):
    common = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
                  attn_implementation="eager")
    if model_type == "llama":
        config = transformers.LlamaConfig(**common, head_dim=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                                          rope_scaling=LLAMA3_ROPE)
        cls = transformers.LlamaForCausalLM
    else:
        config = transformers.Qwen3Config(**common, head_dim=16, rms_norm_eps=1e-6, rope_theta=1000000.0)
        cls = transformers.Qwen3ForCausalLM
    torch.manual_seed(0)
    with float32_means_float64():
        model = cls(config).to(torch.float64)
    with torch.no_grad():  # HF's init leaves the norms at exactly 1: perturb them so they count
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=[("llama", True), ("llama", False), ("qwen3", True), ("qwen3", False)],
                ids=["llama-tied", "llama-untied", "qwen3-tied", "qwen3-untied"])
def pair(request, tmp_path_factory):
    """(HF model, the same weights loaded by numpygpt from HF's own save_pretrained files)."""
    theirs = hf_model(*request.param)
    directory = tmp_path_factory.mktemp("hf")
    theirs.save_pretrained(directory)
    with backend.device("cpu"):
        ours = numpygpt.from_pretrained(directory, dtype=F64)
    assert ours.cfg.model_type == request.param[0] and ours.cfg.tie_weights == request.param[1]
    return theirs, ours


def test_logits_loss_and_every_gradient_equal_hf(pair):
    theirs, ours = pair
    rng = np.random.default_rng(0)
    B, T = 2, 40  # positions 16..39 lie past the llama3 scaling's original context
    idx, targets = rng.integers(0, 61, (B, T)), rng.integers(0, 61, (B, T))
    targets[1, :5] = -100
    with float32_means_float64():
        logits_hf = theirs(torch.tensor(idx)).logits
        loss_hf = torch.nn.functional.cross_entropy(logits_hf.reshape(B * T, -1), torch.tensor(targets).reshape(-1),
                                                    ignore_index=-100)
        theirs.zero_grad()
        loss_hf.backward()
    ours.train().zero_grad()
    loss_fn = CrossEntropyLoss()
    logits = ours(idx)
    loss = loss_fn(logits, targets)
    ours.backward(loss_fn.backward())
    np.testing.assert_allclose(logits, logits_hf.detach().numpy(), rtol=1e-11, atol=1e-12)
    assert float(loss) == pytest.approx(loss_hf.item(), rel=1e-13)
    grads_hf = {n: p.grad.numpy() for n, p in theirs.named_parameters()}
    ours_named = dict(ours.named_parameters())
    assert set(ours_named) == set(grads_hf)
    for name, p in ours_named.items():
        want = grads_hf[name].T if name.endswith("_proj.weight") else grads_hf[name]
        scale = np.abs(want).max()
        np.testing.assert_allclose(p.grad, want, rtol=1e-10, atol=1e-12 * scale, err_msg=name)


def test_greedy_decoding_with_the_cache_equals_hf_generate(pair):
    theirs, ours = pair
    prompt = np.random.default_rng(1).integers(0, 61, (1, 7))
    with float32_means_float64(), torch.no_grad():
        want = theirs.generate(torch.tensor(prompt), max_new_tokens=33, do_sample=False, eos_token_id=None,
                               pad_token_id=0).numpy()
    got = generate(ours, prompt, 33, use_cache=True)  # to position 39: past the original context
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(generate(ours, prompt, 33, use_cache=False), got)


@pytest.mark.parametrize("name", ["llama-3.2-1b", "llama-3.2-3b", "qwen3-0.6b", "qwen3-1.7b", "llama-small"])
def test_count_parameters_equals_transformers_count_of_the_same_config(name):
    """Built on torch's meta device: shapes only, no memory."""
    from numpygpt.config import LlamaConfig, count_parameters
    from numpygpt.hf import LLAMA_TYPES, llama_config_to_hf

    cfg = LlamaConfig.preset(name)
    hf = llama_config_to_hf(cfg)
    config = transformers.AutoConfig.for_model(**hf)
    with torch.device("meta"):
        model = getattr(transformers, LLAMA_TYPES[cfg.model_type])(config)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)


@pytest.mark.parametrize("preset", ["llama-tiny", "qwen3-tiny"])
def test_transformers_loads_what_numpygpt_saves(tmp_path, preset):
    from numpygpt import LlamaConfig, LlamaModel

    ours = LlamaModel(LlamaConfig.preset(preset, dtype=F64, tie_weights=False), seed=0)
    numpygpt.save_pretrained(ours, tmp_path)
    with float32_means_float64():
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64,
                                                                   attn_implementation="eager")
        idx = np.random.default_rng(0).integers(0, 128, (1, 30))
        logits_hf = theirs(torch.tensor(idx)).logits.detach().numpy()
    np.testing.assert_allclose(ours(idx), logits_hf, rtol=1e-11, atol=1e-12)
