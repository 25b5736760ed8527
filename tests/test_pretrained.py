"""Hugging Face GPT-2 checkpoints: loading, saving, errors and downloads, all offline.

The checkpoints here are small random ones written in the HF layout with safetensors'
own writer, and the model's outputs and gradients are compared with an independent
NumPy GPT-2 written below from the format's definition (picoGPT style).
"""

import io
import json
import os
from urllib.error import URLError

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from numpygpt import CrossEntropyLoss, GPTConfig, GPTModel, backend, no_grad
from numpygpt import download, pretrained
from numpygpt.pretrained import PretrainedNotFoundError
from conftest import traced_peak

C, NH, L, T_MAX, V = 16, 2, 2, 32, 50


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """No test may reach the network: any download attempt fails like a machine offline."""
    def offline(*args, **kwargs):
        raise URLError("network disabled in tests")

    monkeypatch.setattr(download, "urlopen", offline)


# -- an independent GPT-2 in NumPy, from the checkpoint's definition -------------------

def gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def layer_norm(x, g, b, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return g * (x - mean) / np.sqrt(var + eps) + b


def linear(x, w, b):  # Conv1D: w is (in, out)
    return x @ w + b


def attention(q, k, v):  # (T, hs) each
    T = q.shape[0]
    mask = np.where(np.tri(T, dtype=bool), 0.0, -np.inf)  # (T, T)
    return softmax(q @ k.T / np.sqrt(q.shape[-1]) + mask) @ v


def mha(x, P, h, n_head):
    qkv = linear(x, P[h + "attn.c_attn.weight"], P.get(h + "attn.c_attn.bias", 0.0))  # (T, 3C)
    q, k, v = np.split(qkv, 3, axis=-1)  # (T, C) each
    hs = q.shape[-1] // n_head
    heads = [attention(q[:, i * hs:(i + 1) * hs], k[:, i * hs:(i + 1) * hs], v[:, i * hs:(i + 1) * hs])
             for i in range(n_head)]
    return linear(np.concatenate(heads, axis=-1), P[h + "attn.c_proj.weight"], P[h + "attn.c_proj.bias"])


def block(x, P, h, n_head, eps):
    x = x + mha(layer_norm(x, P[h + "ln_1.weight"], P[h + "ln_1.bias"], eps), P, h, n_head)
    a = layer_norm(x, P[h + "ln_2.weight"], P[h + "ln_2.bias"], eps)
    a = linear(gelu(linear(a, P[h + "mlp.c_fc.weight"], P[h + "mlp.c_fc.bias"])),
               P[h + "mlp.c_proj.weight"], P[h + "mlp.c_proj.bias"])
    return x + a


def gpt2_logits(idx, P, n_head, n_layer, eps):
    """idx (B, T) -> logits (B, T, V); the head is lm_head.weight if present, else wte."""
    out = []
    for row in idx:
        x = P["wte.weight"][row] + P["wpe.weight"][np.arange(len(row))]  # (T, C)
        for i in range(n_layer):
            x = block(x, P, f"h.{i}.", n_head, eps)
        x = layer_norm(x, P["ln_f.weight"], P["ln_f.bias"], eps)
        out.append(x @ P.get("lm_head.weight", P["wte.weight"]).T)  # (T, V)
    return np.stack(out)


def cross_entropy(logits, targets):
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -np.take_along_axis(logp, targets[..., None], axis=-1).mean()


# -- random checkpoints in the HF layout -----------------------------------------------

def hf_config(n_embd=C, n_head=NH, n_layer=L, n_positions=T_MAX, vocab_size=V, eps=1e-5, **extra):
    return {**dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=n_embd, n_head=n_head,
                   n_layer=n_layer, n_positions=n_positions, n_ctx=n_positions, vocab_size=vocab_size,
                   layer_norm_epsilon=eps, activation_function="gelu_new"), **extra}


def random_params(rng, n_embd=C, n_layer=L, n_positions=T_MAX, vocab_size=V):
    """HF tensor name -> float32 array, scaled so every weight matters."""
    c = n_embd

    def w(*shape):
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    P = {"wte.weight": w(vocab_size, c), "wpe.weight": w(n_positions, c)}
    for i in range(n_layer):
        h = f"h.{i}."
        P.update({h + "ln_1.weight": 1 + w(c), h + "ln_1.bias": w(c),
                  h + "attn.c_attn.weight": w(c, 3 * c), h + "attn.c_attn.bias": w(3 * c),
                  h + "attn.c_proj.weight": w(c, c), h + "attn.c_proj.bias": w(c),
                  h + "ln_2.weight": 1 + w(c), h + "ln_2.bias": w(c),
                  h + "mlp.c_fc.weight": w(c, 4 * c), h + "mlp.c_fc.bias": w(4 * c),
                  h + "mlp.c_proj.weight": w(4 * c, c), h + "mlp.c_proj.bias": w(c)})
    P["ln_f.weight"], P["ln_f.bias"] = 1 + w(c), w(c)
    return P


def write_checkpoint(directory, P, config, prefix="", buffers=False):
    """config.json + model.safetensors as HF writes them; ``prefix='transformer.'`` and
    ``buffers`` give the layout of GPT2LMHeadModel files from older transformers versions."""
    os.makedirs(directory, exist_ok=True)
    tensors = {(n if n == "lm_head.weight" else prefix + n): a for n, a in P.items()}
    if buffers:
        T = config.get("n_positions", config["n_ctx"])
        for i in range(config["n_layer"]):
            tensors[f"{prefix}h.{i}.attn.bias"] = np.tril(np.ones((T, T), dtype=bool))[None, None]
            tensors[f"{prefix}h.{i}.attn.masked_bias"] = np.array(-1e4, dtype=np.float32)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump(config, fh)
    return str(directory)


# plain: openai-community/gpt2's file; legacy: GPT2LMHeadModel.state_dict() of old
# transformers (prefix, mask buffers, tied lm_head stored too) with another eps; n_ctx: no
# n_positions field
VARIANTS = {
    "plain": dict(),
    "legacy": dict(prefix="transformer.", buffers=True, lm_head="tied", eps=1e-3),
    "n_ctx": dict(no_n_positions=True),
    "untied": dict(lm_head="untied"),
}


def make_variant(directory, variant, seed=0):
    opts = VARIANTS[variant]
    rng = np.random.default_rng(seed)
    P = random_params(rng)
    if opts.get("lm_head") == "tied":
        P["lm_head.weight"] = P["wte.weight"].copy()
    elif opts.get("lm_head") == "untied":
        P["lm_head.weight"] = (rng.standard_normal((V, C)) * 0.3).astype(np.float32)
    cfg = hf_config(eps=opts.get("eps", 1e-5))
    if opts.get("no_n_positions"):
        del cfg["n_positions"]
    write_checkpoint(directory, P, cfg, opts.get("prefix", ""), opts.get("buffers", False))
    return str(directory), P, cfg


def host_params(model):
    return {n: backend.to_host(p.data) for n, p in model.named_parameters()}


# -- values ----------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_logits_and_loss_match_reference(device, tmp_path, variant, dtype):
    path, P, cfg = make_variant(tmp_path, variant)
    model = GPTModel.from_pretrained(path, dtype=dtype)
    assert model.cfg.tie_weights == (variant != "untied")
    assert model.cfg.layer_norm_eps == cfg["layer_norm_epsilon"] and model.cfg.context_length == T_MAX
    assert all(backend.device_of(p.data) == device and p.dtype == dtype for p in model.parameters())

    rng = np.random.default_rng(1)
    idx, targets = rng.integers(0, V, (2, 9)), rng.integers(0, V, (2, 9))
    P64 = {n: a.astype(np.float64) for n, a in P.items()}
    ref = gpt2_logits(idx, P64, NH, L, cfg["layer_norm_epsilon"])
    with no_grad():
        logits = model(backend.to_device(idx))
        loss = CrossEntropyLoss()(logits, backend.to_device(targets))
    rtol, atol = (1e-10, 1e-12) if dtype == "float64" else (2e-5, 2e-5)
    np.testing.assert_allclose(backend.to_host(logits), ref, rtol=rtol, atol=atol)
    np.testing.assert_allclose(float(loss), cross_entropy(ref, targets), rtol=rtol)


@pytest.mark.parametrize("variant", ["legacy", "untied"])
def test_gradients_match_finite_differences_of_reference(tmp_path, variant):
    """model.backward's gradient of every tensor against centred differences of the
    reference loss, on sampled coordinates (float64)."""
    path, P, cfg = make_variant(tmp_path, variant)
    model = GPTModel.from_pretrained(path, dtype="float64")
    rng = np.random.default_rng(2)
    idx, targets = rng.integers(0, V, (2, 7)), rng.integers(0, V, (2, 7))
    loss_fn = CrossEntropyLoss()
    loss = loss_fn(model(backend.to_device(idx)), backend.to_device(targets))
    model.backward(loss_fn.backward())

    ref = {n: a.astype(np.float64) for n, a in P.items()}
    if variant == "legacy":
        del ref["lm_head.weight"]  # tied: the head is wte, as the loaded model shares it
    eps = cfg["layer_norm_epsilon"]
    assert float(loss) == pytest.approx(cross_entropy(gpt2_logits(idx, ref, NH, L, eps), targets), rel=1e-12)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(names) == sorted(ref)
    h = 1e-5
    for name, p in model.named_parameters():
        grad = backend.to_host(p.grad)
        # wte: sample rows that were looked up, so the embedding path is checked too
        flat = rng.choice(p.size, size=4, replace=False)
        if name == "wte.weight":
            flat[:2] = idx[0, :2] * C + rng.integers(0, C, 2)
        for j in flat:
            coord = np.unravel_index(j, p.shape)
            old = ref[name][coord]
            ref[name][coord] = old + h
            up = cross_entropy(gpt2_logits(idx, ref, NH, L, eps), targets)
            ref[name][coord] = old - h
            down = cross_entropy(gpt2_logits(idx, ref, NH, L, eps), targets)
            ref[name][coord] = old
            numeric = (up - down) / (2 * h)
            assert abs(grad[coord] - numeric) <= 1e-8 + 1e-6 * abs(numeric), (name, coord, grad[coord], numeric)


def test_no_transposes_linear_weights_are_in_out(tmp_path):
    """A Conv1D weight (in, out) is used as x @ W: one hand-built case, no reference model."""
    path, P, _ = make_variant(tmp_path, "plain")
    model = GPTModel.from_pretrained(path, dtype="float64")
    c_fc = model.h[0].mlp.c_fc
    x = np.random.default_rng(3).standard_normal((1, 2, C))
    with no_grad():
        y = c_fc(x)
    np.testing.assert_allclose(y, x @ P["h.0.mlp.c_fc.weight"] + P["h.0.mlp.c_fc.bias"], rtol=1e-12)
    assert c_fc.weight.shape == (C, 4 * C)


# -- saving ----------------------------------------------------------------------------

def test_round_trip_is_bit_exact_and_in_hf_layout(tmp_path):
    path, P, _ = make_variant(tmp_path / "src", "legacy")
    model = GPTModel.from_pretrained(path)
    model.save_pretrained(tmp_path / "out")
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]  # no temporary files left

    # safetensors' own reader sees HF's names (no prefix, no buffers, tied: no lm_head)
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    expected = {n: a.shape for n, a in P.items() if n != "lm_head.weight"}
    assert shapes == expected
    saved = load_file(str(out / "model.safetensors"))
    for n, a in expected.items():
        assert saved[n].dtype == np.float32 and np.array_equal(saved[n], P[n]), n
    raw = (out / "model.safetensors").read_bytes()
    assert (8 + int.from_bytes(raw[:8], "little")) % 8 == 0  # data 8-byte aligned

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    assert (cfg["n_embd"], cfg["n_head"], cfg["n_layer"], cfg["n_positions"], cfg["n_ctx"], cfg["vocab_size"]) \
        == (C, NH, L, T_MAX, T_MAX, V)
    assert cfg["layer_norm_epsilon"] == 1e-3 and cfg["activation_function"] == "gelu_new"
    assert cfg["bos_token_id"] == cfg["eos_token_id"] == 50256
    assert cfg["resid_pdrop"] == cfg["embd_pdrop"] == cfg["attn_pdrop"] == 0.0
    assert cfg["numpygpt"] == {"tie_weights": True, "qkv_bias": True} and cfg["tie_word_embeddings"] is True

    again = GPTModel.from_pretrained(out)
    assert again.cfg == model.cfg
    a, b = host_params(model), host_params(again)
    assert a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)
    again.save_pretrained(tmp_path / "out2")  # deterministic: the same bytes
    assert (tmp_path / "out2" / "model.safetensors").read_bytes() == raw
    assert (tmp_path / "out2" / "config.json").read_bytes() == (out / "config.json").read_bytes()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("tied,qkv_bias", [(True, True), (False, True), (False, False)])
def test_round_trip_of_any_model(tmp_path, dtype, tied, qkv_bias):
    cfg = GPTConfig(vocab_size=V, context_length=T_MAX, emb_dim=C, n_heads=NH, n_layers=L, drop_rate=0.1,
                    qkv_bias=qkv_bias, tie_weights=tied, layer_norm_eps=1e-6, dtype=dtype)
    model = GPTModel(cfg, seed=5)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
        names = set(f.keys())
    assert ("lm_head.weight" in names) == (not tied)
    assert ("h.0.attn.c_attn.bias" in names) == qkv_bias
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["numpygpt"] == {"tie_weights": tied, "qkv_bias": qkv_bias} and hf["resid_pdrop"] == 0.1
    again = GPTModel.from_pretrained(tmp_path, dtype=dtype, drop_rate=0.1)
    assert again.cfg == cfg
    a, b = host_params(model), host_params(again)
    assert a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)


def test_half_precision_file_is_cast_on_load(tmp_path):
    P = {n: a.astype(np.float16) for n, a in random_params(np.random.default_rng(0)).items()}
    path = write_checkpoint(tmp_path, P, hf_config())
    loaded = host_params(GPTModel.from_pretrained(path, dtype="float32"))
    assert all(loaded[n].dtype == np.float32 and np.array_equal(loaded[n], P[n].astype(np.float32)) for n in P)


def test_fine_tune_save_and_load(tmp_path):
    path, P, _ = make_variant(tmp_path / "src", "plain")
    model = GPTModel.from_pretrained(path).train()
    rng = np.random.default_rng(4)
    idx, targets = rng.integers(0, V, (2, 8)), rng.integers(0, V, (2, 8))
    loss_fn, losses = CrossEntropyLoss(), []
    for _ in range(3):
        model.zero_grad()
        losses.append(float(loss_fn(model(idx), targets)))
        model.backward(loss_fn.backward())
        for p in model.parameters():
            p.data -= 0.05 * p.grad
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path / "tuned")
    again = GPTModel.from_pretrained(tmp_path / "tuned")
    a, b = host_params(model), host_params(again)
    assert all(np.array_equal(a[n], b[n]) for n in a)
    assert not np.array_equal(a["h.0.mlp.c_fc.weight"], P["h.0.mlp.c_fc.weight"])  # it did train
    with no_grad():
        np.testing.assert_array_equal(model.eval()(idx), again(idx))


# -- reading is tensor by tensor -------------------------------------------------------

def test_reads_each_tensor_once_through_safe_open(tmp_path, monkeypatch):
    path, P, _ = make_variant(tmp_path, "plain")
    reads = []

    class Spy:
        def __init__(self, *args, **kwargs):
            self.f = safe_open(*args, **kwargs)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, name):
            reads.append(name)
            return self.f.get_tensor(name)

        def __getattr__(self, attr):
            return getattr(self.f, attr)

    monkeypatch.setattr(pretrained, "safe_open", Spy)
    GPTModel.from_pretrained(path)
    assert sorted(reads) == sorted(P)


def test_peak_memory_is_about_one_model(tmp_path):
    c, n_layer = 64, 8  # many tensors, none larger than ~4% of the file
    P = random_params(np.random.default_rng(0), n_embd=c, n_layer=n_layer, n_positions=64, vocab_size=64)
    path = write_checkpoint(tmp_path, P, hf_config(n_embd=c, n_head=4, n_layer=n_layer, n_positions=64,
                                                   vocab_size=64))
    size = os.path.getsize(os.path.join(path, "model.safetensors"))
    with backend.device("cpu"):
        model, peak = traced_peak(lambda: GPTModel.from_pretrained(path))
    assert model.num_parameters() * 4 > 0.99 * size - 4096
    assert 0.9 * size < peak < 1.5 * size, (peak, size)  # the lower bound shows tracemalloc sees arrays
    _, peak = traced_peak(lambda: model.save_pretrained(tmp_path / "out"))  # streamed: no second copy
    assert peak < 0.25 * size, (peak, size)


# -- errors ----------------------------------------------------------------------------

def test_every_bad_tensor_is_named_at_once(tmp_path):
    P = random_params(np.random.default_rng(0))
    del P["h.1.mlp.c_fc.bias"]
    P["h.0.attn.c_attn.weight"] = P["h.0.attn.c_attn.weight"][:, :-1].copy()
    P["h.0.attn.rotary.weight"] = np.zeros(3, np.float32)
    P["h.2.ln_1.weight"] = np.ones(C, np.float32)  # a third block in a 2-layer config
    path = write_checkpoint(tmp_path, P, hf_config())
    with pytest.raises(ValueError) as e:
        GPTModel.from_pretrained(path)
    msg = str(e.value)
    for fragment in ["missing tensor 'h.1.mlp.c_fc.bias'", "unknown tensor 'h.0.attn.rotary.weight'",
                     "unknown tensor 'h.2.ln_1.weight'",
                     f"'h.0.attn.c_attn.weight' has shape ({C}, {3 * C - 1}), expected ({C}, {3 * C})"]:
        assert fragment in msg, msg


def test_misshaped_lm_head_is_reported(tmp_path):
    P = random_params(np.random.default_rng(0))
    P["lm_head.weight"] = np.zeros((V + 1, C), np.float32)
    path = write_checkpoint(tmp_path, P, hf_config(), prefix="transformer.")
    with pytest.raises(ValueError, match=r"'lm_head.weight' has shape \(51, 16\)"):
        GPTModel.from_pretrained(path)


def test_tensor_stored_with_and_without_prefix_is_reported(tmp_path):
    P = random_params(np.random.default_rng(0))
    tensors = dict(P, **{"transformer.wpe.weight": P["wpe.weight"]})
    path = write_checkpoint(tmp_path, tensors, hf_config())
    with pytest.raises(ValueError, match="'wpe.weight' appears twice"):
        GPTModel.from_pretrained(path)


def test_config_without_required_fields(tmp_path):
    cfg = hf_config(activation_function="relu")
    del cfg["n_embd"]
    path = write_checkpoint(tmp_path, random_params(np.random.default_rng(0)), cfg)
    with pytest.raises(ValueError) as e:
        GPTModel.from_pretrained(path)
    assert "'n_embd'" in str(e.value) and "'relu'" in str(e.value)


def test_pickle_checkpoint_is_refused_unopened(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps(hf_config()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle")
    real_open = open

    def guarded_open(file, *args, **kwargs):
        assert not str(file).endswith(".bin"), "the pickle must never be opened"
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", guarded_open)
    with pytest.raises(PretrainedNotFoundError) as e:
        GPTModel.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "pytorch_model.bin" in msg and "safetensors" in msg and "pickle" in msg


def test_missing_directory_and_unknown_name(tmp_path):
    for target in [str(tmp_path / "nowhere"), "gpt5"]:
        with pytest.raises(PretrainedNotFoundError) as e:
            GPTModel.from_pretrained(target)
        msg = str(e.value)
        assert isinstance(e.value, OSError) and "GPTModel.from_pretrained(\"DIR\")" in msg and "config.json" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedNotFoundError, match="has no model.safetensors"):
        GPTModel.from_pretrained(tmp_path / "empty")


def test_no_network_tells_how_to_pass_a_directory(tmp_path, monkeypatch):
    def offline(url, dest, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(download, "download_file", offline)
    monkeypatch.setenv("NUMPYGPT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(PretrainedNotFoundError) as e:
        GPTModel.from_pretrained("openai-community/gpt2-medium")
    msg = str(e.value)
    assert "could not download 'gpt2-medium'" in msg and "name resolution" in msg
    assert "huggingface-cli download openai-community/gpt2-medium config.json model.safetensors" in msg
    assert 'GPTModel.from_pretrained("DIR")' in msg
    assert os.listdir(tmp_path / "cache" / "gpt2-medium") == []  # looked in $NUMPYGPT_CACHE, left nothing


# -- downloading, with a fake hub ------------------------------------------------------

class FakeHub:
    """Serves files for urlopen from a dict url -> bytes; ``lie`` adds to the weights'
    Content-Length, as when a connection drops mid-file."""

    def __init__(self, files, lie=0):
        self.files, self.lie, self.requested = files, lie, []

    def __call__(self, request, timeout=None):
        url = request.full_url
        self.requested.append(url)
        if url not in self.files:
            raise URLError(f"404 {url}")
        body = self.files[url]
        hub = self

        class Response(io.BytesIO):
            headers = {"Content-Length": str(len(body) + (hub.lie if url.endswith(".safetensors") else 0))}

        return Response(body)


def hub_files(src, name="gpt2"):
    base = f"https://huggingface.co/openai-community/{name}/resolve/main/"
    return {base + f: (src / f).read_bytes() for f in ("config.json", "model.safetensors")}


def test_download_into_cache_then_load_offline(tmp_path, monkeypatch):
    src = tmp_path / "src"
    _, P, cfg = make_variant(src, "plain")
    hub = FakeHub(hub_files(src))
    monkeypatch.setattr(download, "urlopen", hub)
    model = GPTModel.from_pretrained("gpt2", cache_dir=tmp_path / "cache", dtype="float64")
    assert sorted(os.listdir(tmp_path / "cache" / "gpt2")) == ["config.json", "model.safetensors"]
    assert hub.requested == list(hub.files)
    assert all(np.array_equal(host_params(model)[n], P[n]) for n in P)

    monkeypatch.setattr(download, "urlopen", FakeHub({}))  # offline now: the cache suffices
    again = GPTModel.from_pretrained("openai-community/gpt2", cache_dir=tmp_path / "cache")
    assert again.cfg.emb_dim == C


@pytest.mark.parametrize("fault", ["truncated", "garbage", "wrong tensors"])
def test_bad_download_is_not_cached(tmp_path, monkeypatch, fault):
    src = tmp_path / "src"
    P = random_params(np.random.default_rng(0))
    if fault == "wrong tensors":
        del P["ln_f.bias"]
    write_checkpoint(src, P, hf_config())
    files = hub_files(src)
    weights_url = next(u for u in files if u.endswith(".safetensors"))
    if fault == "garbage":
        files[weights_url] = b"\xff" * 64
    hub = FakeHub(files, lie=100 if fault == "truncated" else 0)
    monkeypatch.setattr(download, "urlopen", hub)
    with pytest.raises(PretrainedNotFoundError) as e:
        GPTModel.from_pretrained("gpt2", cache_dir=tmp_path / "cache")
    msg = str(e.value)
    assert {"truncated": "bytes", "garbage": "not a valid safetensors", "wrong tensors": "'ln_f.bias'"}[fault] in msg
    left = os.listdir(tmp_path / "cache" / "gpt2")
    assert "config.json" in left and "model.safetensors" not in left and not any(n.endswith(".numpygpt-tmp") for n in left)
