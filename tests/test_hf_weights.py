"""Hugging Face directories for Llama and Qwen3: load -> save -> load bit for bit, single
and sharded files, bfloat16 widened exactly, one tensor at a time, and one clear error
(nothing loaded) for a missing tensor, an unknown model_type or a config it cannot build.
No torch here: files are written by numpygpt or by hand from the format's definition."""

import json
import os
import struct

import numpy as np
import pytest

import numpygpt
from numpygpt import GPTConfig, GPTModel, LlamaConfig, LlamaModel, backend
from numpygpt.hf import llama_tensor_shapes
from numpygpt.pretrained import PretrainedNotFoundError
from numpygpt.weights import WeightFiles
from conftest import to_host, traced_peak


def tiny(preset="llama-tiny", **changes):
    return LlamaModel(LlamaConfig.preset(preset, **changes), seed=0)


def params(model) -> dict:
    return {n: to_host(p.data) for n, p in model.named_parameters()}


def assert_same_model(a, b):
    pa, pb = params(a), params(b)
    assert list(pa) == list(pb) and a.cfg == b.cfg
    for name in pa:
        assert pa[name].dtype == pb[name].dtype and np.array_equal(pa[name], pb[name]), name


def write_raw_safetensors(path, tensors: dict) -> None:
    """name -> (dtype code, shape, raw little-endian bytes): the format written by hand."""
    header, offset, blobs = {}, 0, []
    for name, (code, shape, raw) in tensors.items():
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    head = json.dumps(header).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


@pytest.mark.parametrize("preset, tied, dtype, shard", [
    ("llama-tiny", True, "float32", None), ("llama-tiny", False, "float64", 20_000),
    ("qwen3-tiny", True, "float64", 4_096), ("qwen3-tiny", False, "float32", None)])
def test_load_save_load_is_bit_identical(tmp_path, preset, tied, dtype, shard):
    model = tiny(preset, tie_weights=tied, dtype=dtype)
    numpygpt.save_pretrained(model, tmp_path / "a", max_shard_bytes=shard)
    files = sorted(os.listdir(tmp_path / "a"))
    if shard is None:
        assert files == ["config.json", "model.safetensors"]
    else:
        assert "model.safetensors.index.json" in files and "model-00002-of-" in " ".join(files)
    loaded = numpygpt.from_pretrained(tmp_path / "a", dtype=dtype)
    assert_same_model(model, loaded)
    numpygpt.save_pretrained(loaded, tmp_path / "b", max_shard_bytes=shard)
    assert_same_model(loaded, numpygpt.from_pretrained(tmp_path / "b", dtype=dtype))
    for name in files:  # the files themselves are the same bytes
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_files_are_in_hf_layout(tmp_path):
    model = tiny("qwen3-tiny", tie_weights=False)
    numpygpt.save_pretrained(model, tmp_path)
    files = WeightFiles(tmp_path)
    assert {k: files.shape(k) for k in files.keys()} == llama_tensor_shapes(model.cfg)
    q = model.model.layers[1].self_attn.q_proj.weight.data  # (in, out) here, (out, in) in the file
    np.testing.assert_array_equal(files.read("model.layers.1.self_attn.q_proj.weight"), to_host(q).T)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["architectures"] == ["Qwen3ForCausalLM"] and hf["head_dim"] == 16 and hf["num_key_value_heads"] == 2
    assert numpygpt.from_pretrained(tmp_path, dtype="float64").cfg == model.cfg.replace(dtype="float64")


def test_resaving_in_the_other_layout_leaves_one_copy_of_the_weights(tmp_path):
    model = tiny()
    numpygpt.save_pretrained(model, tmp_path, max_shard_bytes=4_096)
    numpygpt.save_pretrained(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    numpygpt.save_pretrained(model, tmp_path, max_shard_bytes=4_096)
    assert "model.safetensors" not in os.listdir(tmp_path)
    assert_same_model(model, numpygpt.from_pretrained(tmp_path))


def test_bfloat16_and_float16_files_are_widened_exactly(tmp_path):
    model = tiny()
    numpygpt.save_pretrained(model, tmp_path)
    files = WeightFiles(tmp_path)
    raw, expected = {}, {}
    for i, name in enumerate(files.keys()):
        w = files.read(name).astype(np.float32)
        if i % 2:  # bfloat16: the top 16 bits of the float32 (rounded toward zero here)
            top = (w.view(np.uint32) >> 16).astype("<u2")
            raw[name] = ("BF16", w.shape, top.tobytes())
            expected[name] = (top.astype(np.uint32) << 16).view(np.float32)
        else:
            raw[name] = ("F16", w.shape, w.astype("<f2").tobytes())
            expected[name] = w.astype(np.float16).astype(np.float32)
    write_raw_safetensors(tmp_path / "model.safetensors", raw)
    loaded = numpygpt.from_pretrained(tmp_path)
    for name, p in loaded.named_parameters():
        want = expected[name].T if name.endswith("_proj.weight") else expected[name]
        np.testing.assert_array_equal(to_host(p.data), want)


def test_peak_memory_is_about_one_model(tmp_path):
    model = tiny(emb_dim=64, hidden_dim=128, n_layers=8, vocab_size=64)  # no tensor over ~5% of the file
    _, save_peak = traced_peak(lambda: numpygpt.save_pretrained(model, tmp_path))
    size = os.path.getsize(tmp_path / "model.safetensors")
    with backend.device("cpu"):
        loaded, peak = traced_peak(lambda: numpygpt.from_pretrained(tmp_path))
    assert loaded.num_parameters() * 4 > 0.99 * size - 4096
    assert 0.9 * size < peak < 1.3 * size, (peak, size)  # the lower bound shows tracemalloc sees arrays
    assert save_peak < 0.25 * size, (save_peak, size)  # saving streams: no second copy either


def test_gpt2_directories_go_through_the_gpt2_loader(tmp_path):
    gpt = GPTModel(GPTConfig.preset("tiny", qkv_bias=True, tie_weights=True), seed=0)
    numpygpt.save_pretrained(gpt, tmp_path)
    loaded = numpygpt.from_pretrained(tmp_path)
    assert isinstance(loaded, GPTModel)
    assert_same_model(gpt, loaded)


# -- errors: one clear message, no model --------------------------------------------------------

def test_missing_unknown_and_misshaped_tensors_are_named_together(tmp_path):
    numpygpt.save_pretrained(tiny(), tmp_path)
    files = WeightFiles(tmp_path)
    raw = {n: ("F32", files.shape(n), files.read(n).astype("<f4").tobytes()) for n in files.keys()}
    del raw["model.layers.1.mlp.up_proj.weight"]
    raw["model.layers.0.self_attn.q_proj.bias"] = ("F32", (32,), np.zeros(32, "<f4").tobytes())
    raw["model.norm.weight"] = ("F32", (31,), np.zeros(31, "<f4").tobytes())
    write_raw_safetensors(tmp_path / "model.safetensors", raw)
    with pytest.raises(ValueError) as e:
        numpygpt.from_pretrained(tmp_path)
    message = str(e.value)
    assert "missing tensor 'model.layers.1.mlp.up_proj.weight'" in message
    assert "unknown tensor 'model.layers.0.self_attn.q_proj.bias'" in message
    assert "'model.norm.weight' has shape (31,), expected (32,)" in message


def test_truncated_file_is_refused(tmp_path):
    numpygpt.save_pretrained(tiny(), tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        numpygpt.from_pretrained(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mistral"}, "unknown model_type 'mistral'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unknown rope_type 'yarn'"),
    ({"num_key_value_heads": 3}, "must be a multiple of n_kv_heads"),
    ({"attention_bias": True}, "attention_bias is true"),
    ({"hidden_act": "gelu"}, "hidden_act is 'gelu'"),
])
def test_configs_it_cannot_build_are_refused(tmp_path, change, message):
    numpygpt.save_pretrained(tiny(), tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, **change}))
    with pytest.raises(ValueError, match=message):
        numpygpt.from_pretrained(tmp_path)


def test_transformers_5_rope_parameters_are_read(tmp_path):
    model = tiny()
    numpygpt.save_pretrained(model, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf["rope_parameters"] = {**hf.pop("rope_scaling"), "rope_theta": hf.pop("rope_theta")}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert numpygpt.from_pretrained(tmp_path).cfg == model.cfg


def test_missing_files_and_bad_shard_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        numpygpt.from_pretrained(tmp_path)
    with pytest.raises(PretrainedNotFoundError, match="is not a directory, nor one of the model names"):
        numpygpt.from_pretrained(tmp_path / "nowhere")  # not a directory: a GPT-2 name, and not one either
    numpygpt.save_pretrained(tiny(), tmp_path, max_shard_bytes=4_096)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    os.remove(tmp_path / first)
    with pytest.raises(FileNotFoundError, match=f"names the shard {first}, which is missing"):
        numpygpt.from_pretrained(tmp_path)
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="same directory"):
        numpygpt.from_pretrained(tmp_path)
