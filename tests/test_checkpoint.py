"""Checkpoints: exact round trips, atomic writes, clear errors for bad files and misfits."""

import json
import os

import numpy as np
import pytest
import safetensors.numpy
from safetensors import safe_open

from numpygpt import GPTConfig, GPTModel, backend
from numpygpt.checkpoint import load_checkpoint, save_checkpoint
from numpygpt.optim import SGD, AdamW


@pytest.fixture(autouse=True)
def keep_rng_state():
    """load_checkpoint restores the dropout RNG; don't let that leak into other tests."""
    state = backend.get_rng_state()
    yield
    backend.set_rng_state(state)


def tiny(**overrides):
    return GPTConfig.preset("tiny", **overrides)


def fake_grads(model, seed):
    """Deterministic gradients, so two optimisers can be fed the same ones."""
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        p.grad = backend.to_device(rng.standard_normal(p.shape), dtype=p.dtype,
                                   device_name=backend.device_of(p.data))


def run_steps(model, opt, seeds):
    for s in seeds:
        fake_grads(model, s)
        opt.step()
        opt.zero_grad()


def host_params(model):
    return {n: backend.to_host(p.data).copy() for n, p in model.named_parameters()}


def assert_same_params(a, b):
    pa, pb = host_params(a), host_params(b)
    assert pa.keys() == pb.keys()
    for n in pa:
        assert pa[n].dtype == pb[n].dtype, n
        np.testing.assert_array_equal(pa[n], pb[n], err_msg=n)


def trained(cfg=None, steps=2):
    model = GPTModel(cfg or tiny(), seed=1)
    opt = AdamW(model, lr=1e-2, weight_decay=0.1)
    run_steps(model, opt, range(steps))
    return model, opt


# -- round trips --------------------------------------------------------------------------------

def test_round_trip_everything(tmp_path, device):
    model, opt = trained()
    extra = {"epoch": 2, "tokens_seen": 123456, "losses": [3.5, 2.25, float("nan")],
             "loader": {"position": 17, "order": [3, 1, 2]}}
    path = tmp_path / "runs" / "ckpt.safetensors"  # the directory is created
    save_checkpoint(path, model, opt, step=42, extra=extra)
    assert os.listdir(tmp_path / "runs") == ["ckpt.safetensors"]

    model2 = GPTModel(tiny(), seed=99)
    opt2 = AdamW(model2, lr=5.0, weight_decay=0.0)
    ck = load_checkpoint(path, model2, opt2)
    assert ck["model"] is model2 and ck["step"] == 42 and ck["config"] == model.cfg
    assert ck["extra"]["loader"] == extra["loader"] and ck["extra"]["losses"][:2] == [3.5, 2.25]
    assert np.isnan(ck["extra"]["losses"][2])
    assert_same_params(model, model2)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert json.dumps(s1["hyper"]) == json.dumps(s2["hyper"])  # lr, betas, decay, steps
    assert s1["tensors"].keys() == s2["tensors"].keys() and len(s1["tensors"]) > 0
    for k in s1["tensors"]:
        np.testing.assert_array_equal(backend.to_host(s1["tensors"][k]), backend.to_host(s2["tensors"][k]))


def test_restored_optimizer_continues_identically(tmp_path):
    """Three more AdamW steps from a restored checkpoint == three more steps of the original."""
    model, opt = trained(steps=3)
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, model, opt, step=3)
    model2 = GPTModel(tiny(), seed=7)
    opt2 = AdamW(model2, lr=1e-3, weight_decay=0.0)  # different hyperparameters, restored below
    load_checkpoint(path, model2, opt2)
    run_steps(model, opt, [10, 11, 12])
    run_steps(model2, opt2, [10, 11, 12])
    assert_same_params(model, model2)
    # and a fresh optimiser (moments zero) would not have: the state really matters
    model3 = GPTModel(tiny(), seed=7)
    load_checkpoint(path, model3)
    run_steps(model3, AdamW(model3, lr=1e-2, weight_decay=0.1), [10, 11, 12])
    assert not np.array_equal(host_params(model)["h.0.attn.c_attn.weight"],
                              host_params(model3)["h.0.attn.c_attn.weight"])


def test_sgd_momentum_round_trip(tmp_path):
    model = GPTModel(tiny(), seed=1)
    opt = SGD(model, lr=0.1, momentum=0.9)
    run_steps(model, opt, [0, 1])
    save_checkpoint(tmp_path / "c.safetensors", model, opt)
    model2 = GPTModel(tiny(), seed=2)
    opt2 = SGD(model2, lr=0.1, momentum=0.9)
    load_checkpoint(tmp_path / "c.safetensors", model2, opt2)
    run_steps(model, opt, [5])
    run_steps(model2, opt2, [5])
    assert_same_params(model, model2)


def test_model_none_builds_saved_config(tmp_path, device):
    cfg = tiny(n_layers=3, emb_dim=48, n_heads=3, qkv_bias=True, tie_weights=True, context_length=20)
    model = GPTModel(cfg, seed=3)
    save_checkpoint(tmp_path / "c.safetensors", model, step=5)
    ck = load_checkpoint(tmp_path / "c.safetensors")
    assert ck["config"] == cfg and ck["model"].cfg == cfg and ck["step"] == 5 and ck["extra"] == {}
    assert ck["optimizer_hyper"] is None
    assert backend.device_of(ck["model"].wte.weight.data) == device
    assert ck["model"].lm_head.weight is ck["model"].wte.weight  # still tied
    assert_same_params(model, ck["model"])


def test_float64_round_trip_exact(tmp_path):
    model = GPTModel(tiny(dtype="float64"), seed=4)
    model.wte.weight.data[0, 0] = np.pi  # a value float32 cannot hold
    opt = AdamW(model, lr=1e-3)
    run_steps(model, opt, [0])
    save_checkpoint(tmp_path / "c.safetensors", model, opt)
    ck = load_checkpoint(tmp_path / "c.safetensors")
    w = ck["model"].wte.weight.data
    assert w.dtype == np.float64 and (w != w.astype(np.float32)).any()  # float32 would lose bits
    assert_same_params(model, ck["model"])


def test_file_layout_is_plain_safetensors(tmp_path):
    model, opt = trained()
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, model, opt, step=9)
    with safe_open(str(path), framework="numpy") as f:
        meta = json.loads(f.metadata()["numpygpt"])
        keys = set(f.keys())
    assert meta["version"] == 1 and meta["step"] == 9 and meta["config"] == model.cfg.to_dict()
    assert meta["optimizer"]["optimizer"] == "AdamW"
    assert {"model." + n for n, _ in model.named_parameters()} <= keys
    assert "optim.h.0.attn.c_attn.weight.exp_avg" in keys
    assert open(path, "rb").read(2) != b"\x80\x04"  # not a pickle


def test_rng_state_restored(tmp_path):
    backend.manual_seed(123)
    with backend.device("cpu"):
        backend.get_rng().random(5)  # move the stream along
        model = GPTModel(tiny(), seed=0)
        save_checkpoint(tmp_path / "c.safetensors", model)
        expected = backend.get_rng().random(4)
        backend.manual_seed(999)
        ck = load_checkpoint(tmp_path / "c.safetensors")
        assert ck["rng_state"]["seed"] == 123
        np.testing.assert_array_equal(backend.get_rng().random(4), expected)
        backend.manual_seed(999)
        load_checkpoint(tmp_path / "c.safetensors", restore_rng=False)
        assert not np.array_equal(backend.get_rng().random(4), expected)


# -- atomic writes --------------------------------------------------------------------------------

def good_checkpoint(tmp_path):
    model, opt = trained()
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, model, opt, step=1, extra={"v": 1})
    return path, model, opt


def disk_full(array):
    """Stands in for the copy of a tensor to the host, after the header is written:
    the disk fills up half-way through the file."""
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("target, fake", [
    ("numpygpt.fileio.backend.to_host", disk_full),
    ("os.fsync", None),
    ("os.replace", None),
])
def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch, target, fake):
    path, model, opt = good_checkpoint(tmp_path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("simulated failure")

    run_steps(model, opt, [7])  # the model has moved on since the good checkpoint
    monkeypatch.setattr(target, fake or boom)
    with pytest.raises(OSError):
        save_checkpoint(path, model, opt, step=2, extra={"v": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]  # no temp file left behind
    ck = load_checkpoint(path)
    assert ck["step"] == 1 and ck["extra"] == {"v": 1}


def test_unserialisable_extra_writes_nothing(tmp_path):
    model = GPTModel(tiny(), seed=0)
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path / "c.safetensors", model, extra={"arr": np.zeros(3)})
    assert os.listdir(tmp_path) == []


# -- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("other, name", [
    (dict(emb_dim=64), "wte.weight"),
    (dict(context_length=16), "wpe.weight"),
    (dict(vocab_size=100), "wte.weight"),
])
def test_mismatched_model_names_the_tensor(tmp_path, other, name):
    save_checkpoint(tmp_path / "c.safetensors", GPTModel(tiny(), seed=0))
    other_model = GPTModel(tiny(**other), seed=0)
    before = host_params(other_model)
    with pytest.raises(ValueError, match="checkpoint") as e:
        load_checkpoint(tmp_path / "c.safetensors", other_model)
    assert repr(name) in str(e.value)
    for n, a in host_params(other_model).items():
        np.testing.assert_array_equal(a, before[n])


def test_a_load_that_does_not_fit_moves_the_model_back(tmp_path, monkeypatch):
    # device= moves a given model before loading (the optimiser state is loaded next to
    # the weights); when the checkpoint then does not fit, the model goes back where it
    # was. Moves are recorded instead of made, so this runs without a GPU.
    save_checkpoint(tmp_path / "c.safetensors", GPTModel(tiny(), seed=0))
    model = GPTModel(tiny(emb_dim=64), seed=0)
    moves = []
    monkeypatch.setattr(model, "to", lambda device_name: moves.append(device_name) or model)
    with pytest.raises(ValueError, match="does not fit"):
        load_checkpoint(tmp_path / "c.safetensors", model, device="cuda")
    assert moves == ["cuda", "cpu"]
    # a model already on the asked device is not moved at all
    moves.clear()
    fits = GPTModel(tiny(), seed=1)
    monkeypatch.setattr(fits, "to", lambda device_name: moves.append(device_name) or fits)
    load_checkpoint(tmp_path / "c.safetensors", fits, device="cpu")
    assert moves == []


def test_missing_layers_is_an_error(tmp_path):
    save_checkpoint(tmp_path / "c.safetensors", GPTModel(tiny(), seed=0))
    with pytest.raises(ValueError, match="checkpoint.*h.2"):
        load_checkpoint(tmp_path / "c.safetensors", GPTModel(tiny(n_layers=3), seed=0))


def test_optimizer_misfit_leaves_model_and_optimizer_alone(tmp_path):
    model, opt = trained()
    save_checkpoint(tmp_path / "c.safetensors", model, opt)
    model2 = GPTModel(tiny(), seed=5)
    sgd = SGD(model2, lr=0.1, momentum=0.9)
    before = host_params(model2)
    with pytest.raises(ValueError, match="optimizer"):
        load_checkpoint(tmp_path / "c.safetensors", model2, sgd)
    for n, a in host_params(model2).items():
        np.testing.assert_array_equal(a, before[n])
    assert sgd.state == {}
    # a checkpoint without optimiser state cannot restore one
    save_checkpoint(tmp_path / "bare.safetensors", model)
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(tmp_path / "bare.safetensors", model2, AdamW(model2))


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path, _, _ = good_checkpoint(tmp_path)
    data = path.read_bytes()
    for n in (len(data) - 100, len(data) // 2, 20, 3, 0):
        bad = tmp_path / f"cut{n}.safetensors"
        bad.write_bytes(data[:n])
        with pytest.raises(ValueError, match="truncated") as e:
            load_checkpoint(bad)
        assert str(bad) in str(e.value)


def test_garbage_and_foreign_files_are_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(garbage)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, this is not a checkpoint\n" * 10)
    with pytest.raises(ValueError, match=str(text)):
        load_checkpoint(text)
    # a valid safetensors file that numpygpt did not write
    foreign = tmp_path / "foreign.safetensors"
    safetensors.numpy.save_file({"wte.weight": np.zeros((2, 2), np.float32)}, str(foreign))
    with pytest.raises(ValueError, match="not a numpygpt checkpoint"):
        load_checkpoint(foreign)
    broken = tmp_path / "broken.safetensors"
    safetensors.numpy.save_file({"model.x": np.zeros(2, np.float32)}, str(broken),
                                metadata={"numpygpt": "{not json"})
    with pytest.raises(ValueError, match="JSON"):
        load_checkpoint(broken)
    future = tmp_path / "future.safetensors"
    safetensors.numpy.save_file({"model.x": np.zeros(2, np.float32)}, str(future),
                                metadata={"numpygpt": json.dumps({"format": "numpygpt-checkpoint", "version": 99})})
    with pytest.raises(ValueError, match="version"):
        load_checkpoint(future)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.safetensors")


# -- crafted, inconsistent and damaged files ----------------------------------------------

def rewrite_metadata(path, change):
    """Rewrite the checkpoint at ``path`` with ``change(meta)`` applied to its metadata."""
    with safe_open(str(path), framework="numpy") as f:
        meta = json.loads(f.metadata()["numpygpt"])
    tensors = safetensors.numpy.load_file(str(path))
    change(meta)
    safetensors.numpy.save_file(tensors, str(path), metadata={"numpygpt": json.dumps(meta)})


def saved_tiny(tmp_path):
    model, opt = trained()
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, model, opt, step=2, extra={"v": 1})
    return path


@pytest.mark.parametrize("change, match", [
    (lambda m: m["config"].update(n_layers=2000), "metadata describes a model of"),
    (lambda m: m["config"].update(vocab_size=10**9), "shape"),
    (lambda m: m["config"].update(emb_dim="32"), "emb_dim must be a positive integer"),
    (lambda m: m["config"].update(n_layers=2.7), "n_layers must be a positive integer"),
])
def test_metadata_is_checked_against_the_tensor_table_before_building(tmp_path, change, match):
    """A small file claiming a huge model is refused without allocating that model."""
    import tracemalloc

    path = saved_tiny(tmp_path)
    rewrite_metadata(path, change)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=match):
            load_checkpoint(path, device="cpu")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, f"{peak / 2**20:.0f} MiB allocated to refuse the file"


@pytest.mark.parametrize("change, match", [
    (lambda m: m.update(step="abc"), "step"),
    (lambda m: m.update(step=-1), "step"),
    (lambda m: m.update(rng_state={"seed": 0, "cpu": {"bit_generator": "PCG64", "state": "garbage"}}), "RNG"),
    (lambda m: m.update(rng_state={"seed": "x"}), "seed"),
    (lambda m: m.update(rng_state=[1, 2]), "RNG"),
    (lambda m: m.update(extra=[1]), "extra"),
])
def test_a_failed_load_changes_nothing(tmp_path, change, match):
    """Model, optimiser and dropout generator are exactly as they were after a refused load."""
    path = saved_tiny(tmp_path)
    rewrite_metadata(path, change)
    model, opt = trained(steps=3)  # a different state from the file's
    backend.manual_seed(99)
    backend.get_rng().random(5)  # move the generator off its seed
    params, rng_state = host_params(model), backend.get_rng_state()
    opt_state = {k: backend.to_host(v).copy() for k, v in opt.state_dict()["tensors"].items()}
    opt_hyper = json.dumps(opt.state_dict()["hyper"])
    with pytest.raises(ValueError, match=match):
        load_checkpoint(path, model=model, optimizer=opt)
    after = host_params(model)
    for name in params:
        np.testing.assert_array_equal(after[name], params[name], err_msg=name)
    assert backend.get_rng_state() == rng_state
    assert json.dumps(opt.state_dict()["hyper"]) == opt_hyper
    for k, v in opt.state_dict()["tensors"].items():
        np.testing.assert_array_equal(backend.to_host(v), opt_state[k], err_msg=k)


def tensor_data_offset(path, name):
    """Byte offset in the file where tensor ``name``'s data begin."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    return 8 + n + header[name]["data_offsets"][0]


@pytest.mark.parametrize("name", ["model.h.1.mlp.c_fc.weight", "optim.h.0.attn.c_attn.weight.exp_avg_sq"])
def test_a_flipped_byte_is_found_and_the_tensor_named(tmp_path, name):
    path = saved_tiny(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[tensor_data_offset(path, name) + 5] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"tensor '{name}' is damaged"):
        load_checkpoint(path, device="cpu")


def test_checkpoints_without_checksums_still_load(tmp_path):
    """Files written before checksums existed (the same format version) load as before."""
    path = saved_tiny(tmp_path)
    rewrite_metadata(path, lambda m: m.pop("checksums"))
    ck = load_checkpoint(path, device="cpu")
    assert ck["step"] == 2 and ck["extra"] == {"v": 1}
