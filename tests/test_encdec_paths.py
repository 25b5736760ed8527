"""The encoder-decoder on the paths every model family shares: training checkpoints (built
from the config's model_type, checked, resumed bit for bit through ``train-translation``),
LoRA (its targets, adapters, save/load/merge, counts, gradients) and the fake CUDA device
with the GPU path's host-transfer budgets. MPI is in test_translation_mpi.py."""

import json
import signal
import sys

import numpy as np
import pytest
import safetensors.numpy
from safetensors import safe_open

from numpygpt import backend, fake_cuda
from numpygpt.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from numpygpt.cli import main
from numpygpt.config import _adapted_layers, config_from_dict, count_parameters, encdec_tensor_shapes
from numpygpt.encdec import EncDecConfig, EncoderDecoder
from numpygpt.families import parameter_shapes
from numpygpt.gradcheck import check_model_loss, gradcheck_checks
from numpygpt.lora import apply_lora, load_lora, lora_parameters, lora_tensor_shapes, merge_lora, save_lora, unmerge_lora
from numpygpt.nn import CrossEntropyLoss, no_grad
from numpygpt.optim import AdamW
from numpygpt.translation import TranslationOptions, train_translation
from conftest import terminate_after_steps, to_dev
from test_layers import F64, assert_ok

V, PAD = 11, 0
SRC = np.array([[3, 4, 5, 0], [6, 7, 8, 9]])
TGT = np.array([[1, 5, 6], [1, 2, 0]])
TARGETS = np.array([[5, 6, 2], [2, -100, -100]])


def config(**kw):
    base = dict(vocab_size=V, context_length=8, emb_dim=8, n_heads=2, n_enc_layers=2, n_dec_layers=1,
                drop_rate=0.0, pad_id=PAD)
    return EncDecConfig(**{**base, **kw})


def host(model) -> dict:
    return {n: backend.to_host(p.data).copy() for n, p in model.named_parameters()}


def trained(cfg, steps: int = 2):
    """A model and its AdamW after a few steps on one batch (adapters only, with LoRA)."""
    model = EncoderDecoder(cfg, seed=1)
    opt = AdamW([(n, p) for n, p in model.named_parameters() if p.requires_grad], lr=1e-2)
    loss_fn = CrossEntropyLoss()
    for _ in range(steps):
        model.zero_grad()
        loss_fn(model(SRC, TGT), TARGETS)
        model.backward(loss_fn.backward())
        opt.step()
    return model, opt


def logits(model):
    with no_grad():
        return backend.to_host(model(SRC, TGT))


# -- the family in configs and checkpoints --------------------------------------------------------

VARIANTS = [dict(), dict(norm_first=False), dict(share_embeddings=False, tie_weights=False),
            dict(tie_weights=False, lora_rank=2, lora_alpha=4.0), dict(share_embeddings=False, lora_rank=3,
                                                                       lora_alpha=3.0)]


@pytest.mark.parametrize("changes", VARIANTS)
def test_shapes_and_counts_from_the_config_alone(changes):
    cfg = config(**changes)
    model = EncoderDecoder(cfg, seed=0)
    assert model.cfg == cfg
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    adapters = lora_tensor_shapes(cfg) if cfg.lora_rank else {}
    assert shapes == {**parameter_shapes(cfg), **adapters}
    assert list(parameter_shapes(cfg)) == [n for n in shapes if not n.endswith((".lora_A", ".lora_B"))]
    assert count_parameters(cfg) == model.num_parameters()
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    if cfg.lora_rank:
        assert count_parameters(cfg, trainable="lora") == model.num_parameters(trainable_only=True)
        assert count_parameters(cfg, trainable="all") == model.num_parameters() - count_parameters(cfg, trainable="lora")
    else:
        with pytest.raises(ValueError, match="lora_rank"):
            count_parameters(cfg, trainable="lora")


def test_config_refuses_bad_fields():
    with pytest.raises(ValueError, match="unknown EncDecConfig fields"):
        config_from_dict({**config().to_dict(), "n_layers": 2})
    for bad, match in ((dict(norm_first="yes"), "norm_first"), (dict(lora_rank=2), "together"),
                       (dict(model_type="gpt2"), "model_type"), (dict(n_dec_layers=1.5), "n_dec_layers")):
        with pytest.raises(ValueError, match=match):
            config(**bad)


@pytest.mark.parametrize("changes", VARIANTS)
def test_checkpoint_builds_the_family_and_continues_identically(tmp_path, device, changes):
    """load_checkpoint with no model builds an EncoderDecoder from the saved model_type, with
    its adapters; weights, AdamW state and the next steps are the same."""
    model, opt = trained(config(**changes))
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, model, opt, step=2)
    ck = load_checkpoint(path)
    restored = ck["model"]
    assert isinstance(restored, EncoderDecoder) and restored.cfg == model.cfg and ck["step"] == 2
    for name, value in host(model).items():
        np.testing.assert_array_equal(host(restored)[name], value, err_msg=name)
    opt2 = AdamW([(n, p) for n, p in restored.named_parameters() if p.requires_grad], lr=1.0)
    read_checkpoint(path).apply(restored, opt2)
    for m, o in ((model, opt), (restored, opt2)):
        loss_fn = CrossEntropyLoss()
        m.zero_grad()
        loss_fn(m(SRC, TGT), TARGETS)
        m.backward(loss_fn.backward())
        o.step()
    np.testing.assert_array_equal(logits(restored), logits(model))


def rewrite_metadata(path, change):
    with safe_open(str(path), framework="numpy") as f:
        meta = json.loads(f.metadata()["numpygpt"])
    tensors = safetensors.numpy.load_file(str(path))
    change(meta["config"])
    safetensors.numpy.save_file(tensors, str(path), metadata={"numpygpt": json.dumps(meta)})


@pytest.mark.parametrize("change, match", [
    (lambda c: c.update(n_dec_layers=100000), "describes an encoder-decoder of .* tensors"),
    (lambda c: c.update(share_embeddings=False), "describes an encoder-decoder of"),
    (lambda c: c.update(emb_dim=16), "tensors do not match the model config"),
    (lambda c: c.update(n_heads=3), "divisible"),
    (lambda c: c.update(model_type="encoder-only"), "unknown model_type"),
])
def test_a_checkpoint_that_does_not_match_its_config_is_refused(tmp_path, change, match):
    model, opt = trained(config())
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, model, opt, step=2)
    rewrite_metadata(path, change)
    with pytest.raises(ValueError, match=match):
        load_checkpoint(path, device="cpu")


def test_corrupt_and_mismatched_checkpoints_are_clear_errors(tmp_path):
    model, opt = trained(config())
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, model, opt, step=2)
    raw = path.read_bytes()
    with pytest.raises(ValueError, match="does not fit the model"):
        load_checkpoint(path, EncoderDecoder(config(n_dec_layers=2), seed=0))
    with pytest.raises(ValueError, match="does not fit the model"):
        load_checkpoint(path, EncoderDecoder(config(lora_rank=2, lora_alpha=2.0), seed=0))
    damaged = bytearray(raw)
    damaged[-7] ^= 0x10  # inside the last tensor's data
    path.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="is damaged"):
        load_checkpoint(path, device="cpu")
    path.write_bytes(raw[:len(raw) // 2])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(path, device="cpu")


# -- LoRA -----------------------------------------------------------------------------------------

def test_lora_targets_are_every_linear_and_an_untied_head():
    """The model's targets in the order of the config's table (apply_lora draws one seed per
    target in that order); a tied head stays the frozen embedding."""
    for tie in (True, False):
        model = EncoderDecoder(config(tie_weights=tie), seed=0)
        names = {id(m): n for n, m in _named_modules(model)}
        got = [(names[id(getattr(owner, attr))], getattr(owner, attr).weight.shape, splits)
               for owner, attr, splits in model.lora_targets()]
        table = _adapted_layers(model.cfg.replace(lora_rank=2, lora_alpha=2.0))
        want = [(name, (n_in, n_out) if name != "lm_head" else (n_out, n_in), splits)
                for name, n_in, n_out, splits in table]
        assert got == want
        assert len(got) == 2 * 4 + 7 + (0 if tie else 1)


def _named_modules(module, prefix=""):
    yield prefix.rstrip("."), module
    for name, child in module.named_children():
        yield from _named_modules(child, f"{prefix}{name}.")


def test_adapters_apply_save_load_and_merge(tmp_path):
    cfg = config(tie_weights=False, dtype=F64)
    base = EncoderDecoder(cfg, seed=1)
    before = logits(base)
    model = apply_lora(EncoderDecoder(cfg, seed=1), rank=2, alpha=4.0, seed=3)
    np.testing.assert_array_equal(logits(model), before)  # B starts at zero: nothing changes
    assert [n for n, _ in lora_parameters(model)] == list(lora_tensor_shapes(model.cfg))
    assert model.num_parameters(trainable_only=True) == count_parameters(model.cfg, trainable="lora")
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.endswith(("lora_A", "lora_B")))
    opt = AdamW(lora_parameters(model), lr=1e-2)
    for _ in range(3):
        loss_fn = CrossEntropyLoss()
        model.zero_grad()
        loss_fn(model(SRC, TGT), TARGETS)
        model.backward(loss_fn.backward())
        opt.step()
    adapted = logits(model)
    assert not np.allclose(adapted, before)
    np.testing.assert_array_equal(host(model)["decoder.0.cross_attn.c_kv.weight"],
                                  host(base)["decoder.0.cross_attn.c_kv.weight"])  # frozen
    save_lora(model, tmp_path / "adapters.safetensors")
    fresh = load_lora(EncoderDecoder(cfg, seed=1), tmp_path / "adapters.safetensors")
    np.testing.assert_array_equal(logits(fresh), adapted)
    merge_lora(fresh)
    np.testing.assert_allclose(logits(fresh), adapted, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="unmerge_lora"):
        save_checkpoint(tmp_path / "c.safetensors", fresh)
    unmerge_lora(fresh)
    np.testing.assert_allclose(logits(fresh), adapted, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="does not fit"):
        load_lora(EncoderDecoder(config(tie_weights=True, dtype=F64), seed=1), tmp_path / "adapters.safetensors")


@pytest.mark.parametrize("norm_first", [True, False])
def test_gradients_with_adapters(device, norm_first):
    """Every adapter's gradient (B drawn away from zero) against centred differences, dropout on."""
    rng = np.random.default_rng(4)
    model = EncoderDecoder(config(norm_first=norm_first, tie_weights=False, drop_rate=0.2, dtype=F64,
                                  lora_rank=2, lora_alpha=3.0), seed=2)
    for name, p in model.named_parameters():
        p.data = to_dev(rng.standard_normal(p.shape) * 0.3 + (1.0 if ".ln_" in name and "weight" in name else 0.0),
                        F64)
    src = np.array([[3, 4, 5, 0, 0], [6, 7, 8, 9, 10]])
    errors = check_model_loss(model, CrossEntropyLoss(), (to_dev(src), to_dev(TGT)), to_dev(TARGETS), eps=1e-5,
                              max_coords=8, before_forward=lambda: backend.manual_seed(5))
    assert set(errors) == {n for n, _ in lora_parameters(model)}
    assert_ok(errors)


def test_gradcheck_command_checks_the_model_with_adapters():
    names = [name for name, _ in gradcheck_checks()]
    assert "EncDec + LoRA + loss" in names


# -- the recipe: checkpoints, resume, LoRA --------------------------------------------------------

SMALL = ["--max-number", "99", "--train-numbers", "60", "--test-numbers", "20", "--emb-dim", "16", "--n-heads",
         "2", "--n-layers", "1", "--batch-size", "16", "--epochs", "2", "--eval-freq", "3", "--lr", "5e-3",
         "--drop-rate", "0.1", "--no-progress", "--show", "1"]


@pytest.mark.parametrize("lora", [False, True])
def test_an_interrupted_translation_run_resumes_bit_for_bit(tmp_path, capsys, lora):
    """7 steps an epoch, 14 in all, dropout on: 5 steps, checkpoint, --resume == 14 straight."""
    def run(out, *extra):
        return main(["train-translation", "--out", str(out), *SMALL, *(["--lora-rank", "2"] if lora else []),
                     *extra])

    assert run(tmp_path / "whole") == 0
    assert run(tmp_path / "parts", "--max-steps", "5", "--checkpoint-every", "2") == 0
    first = json.loads((tmp_path / "parts" / "history.json").read_text())
    assert first["global_step"] == 5
    capsys.readouterr()
    assert run(tmp_path / "parts", "--resume") == 0
    assert "resuming at step 5" in capsys.readouterr().out
    whole, parts = (json.loads((tmp_path / d / "history.json").read_text()) for d in ("whole", "parts"))
    assert whole["global_step"] == parts["global_step"] == 14
    for key in ("step_losses", "train_losses", "val_losses", "lrs", "exact_match"):
        assert parts[key] == whole[key], key
    a, b = (read_checkpoint(tmp_path / d / "checkpoint.safetensors") for d in ("whole", "parts"))
    assert isinstance(a.build_model(), EncoderDecoder) and a.config == b.config
    assert a.config.lora_rank == (2 if lora else None)
    for name, value in a.model_tensors.items():
        np.testing.assert_array_equal(b.model_tensors[name], value, err_msg=name)
    assert (tmp_path / "whole" / "lora-adapters.safetensors").is_file() == lora
    # the options are checked, and there must be a checkpoint
    assert run(tmp_path / "parts", "--resume", "--lr", "1e-3") == 2
    assert "was trained with lr 0.005, this run has 0.001" in capsys.readouterr().err
    assert run(tmp_path / "nothing", "--resume") == 2
    assert "cannot resume: there is no" in capsys.readouterr().err


def test_lora_trains_only_the_adapters(tmp_path):
    opts = TranslationOptions(max_number=99, train_numbers=60, test_numbers=20, emb_dim=16, n_heads=2, n_layers=1,
                              epochs=1, batch_size=16, no_progress=True, out=str(tmp_path), lora_rank=2,
                              lora_alpha=4.0)
    result = train_translation(opts, log=None)
    model = result["model"]
    assert model.cfg.lora_rank == 2 and model.cfg.lora_alpha == 4.0
    fresh = EncoderDecoder(model.cfg.replace(lora_rank=None, lora_alpha=None), seed=opts.seed)
    trained_weights = host(model)
    for name, value in host(fresh).items():
        np.testing.assert_array_equal(trained_weights[name], value, err_msg=name)  # the base is frozen
    assert any(np.abs(trained_weights[n]).max() > 0 for n in trained_weights if n.endswith("lora_B"))
    restored = load_lora(fresh, result["paths"]["adapters"])
    src = np.array([[4, 20, 21]])
    np.testing.assert_array_equal(logits_of(restored, src), logits_of(model, src))


def test_lora_adapters_on_a_trained_model(tmp_path, capsys):
    """--init-from a trained run's checkpoint, then --lora-rank: the frozen weights are that
    run's, so the adapters start from its loss, far below a fresh model's."""
    def run(out, *extra):
        return main(["train-translation", "--out", str(tmp_path / out), *SMALL, "--drop-rate", "0", *extra])

    assert run("full") == 0
    full_ckpt = tmp_path / "full" / "checkpoint.safetensors"
    assert run("lora", "--init-from", str(full_ckpt), "--lora-rank", "2", "--epochs", "1") == 0
    full, lora = (json.loads((tmp_path / d / "history.json").read_text()) for d in ("full", "lora"))
    assert lora["val_losses"][0] < 0.9 * full["val_losses"][0]  # after one step: where the full run ended
    base, adapted = (read_checkpoint(tmp_path / d / "checkpoint.safetensors") for d in ("full", "lora"))
    assert adapted.config.lora_rank == 2
    for name, value in base.model_tensors.items():
        np.testing.assert_array_equal(adapted.model_tensors[name], value, err_msg=name)  # frozen
    capsys.readouterr()
    assert run("other", "--init-from", str(full_ckpt), "--emb-dim", "32") == 2
    assert "does not fit the model" in capsys.readouterr().err
    assert run("again", "--init-from", str(tmp_path / "lora" / "checkpoint.safetensors")) == 2
    assert "holds LoRA adapters" in capsys.readouterr().err
    from numpygpt import GPTConfig, GPTModel

    save_checkpoint(tmp_path / "gpt2.safetensors", GPTModel(GPTConfig.preset("tiny"), seed=0))
    assert run("gpt", "--init-from", str(tmp_path / "gpt2.safetensors")) == 2
    assert "a gpt2 checkpoint, not an encoder-decoder's" in capsys.readouterr().err


def logits_of(model, src):
    with no_grad():
        return backend.to_host(model(src, np.array([[1, 5]])))


def test_a_corrupt_or_foreign_checkpoint_stops_the_resume_with_one_line(tmp_path, capsys):
    def run(*extra):
        return main(["train-translation", "--out", str(tmp_path), *SMALL, *extra])

    assert run("--max-steps", "2") == 0
    ckpt = tmp_path / "checkpoint.safetensors"
    good = ckpt.read_bytes()
    capsys.readouterr()
    assert run("--resume", "--emb-dim", "32") == 2
    err = capsys.readouterr().err
    assert "does not fit the model" in err and len(err.strip().splitlines()) == 1
    ckpt.write_bytes(good[:len(good) // 3])
    assert run("--resume") == 2
    assert "not a readable checkpoint" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_saves_a_checkpoint_and_says_to_resume(tmp_path):
    out = tmp_path / "out"
    code, err = terminate_after_steps(["train-translation", "--out", str(out), *SMALL, "--epochs", "100000",
                                       "--eval-freq", "1"])
    assert code == 128 + signal.SIGTERM, err
    assert "the same command with --resume" in err
    assert read_checkpoint(out / "checkpoint.safetensors").step >= 3


# -- the GPU path, on the fake device -------------------------------------------------------------

@pytest.fixture
def recipe_device(monkeypatch):
    """train_translation with its --device choice sent to ``recipe_device["name"]`` (at first
    the fake CUDA device, which the command line does not offer)."""
    chosen, set_device = {"name": "fake-cuda"}, backend.set_device
    monkeypatch.setattr(backend, "set_device", lambda name: set_device(chosen["name"]))
    with backend.device("cpu"):
        yield chosen


def small_run(tmp_path, steps: int, **kw):
    opts = TranslationOptions(max_number=99, train_numbers=60, test_numbers=20, emb_dim=16, n_heads=2, n_layers=1,
                              batch_size=8, epochs=1, max_steps=steps, eval_freq=1000, no_progress=True, show=0,
                              out=str(tmp_path / f"s{steps}"), **kw)
    return train_translation(opts, log=None)


def transfers_of(run) -> int:
    with fake_cuda.count_transfers() as log:
        run()
    return log.total


@pytest.mark.parametrize("lora", [None, 2])
def test_a_translation_step_costs_one_host_transfer(tmp_path, recipe_device, lora):
    """The whole recipe on the fake device: the difference between 6 steps and 2 is 4 transfers
    (what both do once, the first evaluation, the checkpoint, the exact match, cancels); and
    it computes what it computes on the CPU (NumPy is underneath both)."""
    short = transfers_of(lambda: small_run(tmp_path, 2, lora_rank=lora))
    long = transfers_of(lambda: small_run(tmp_path, 6, lora_rank=lora))
    assert (long - short) / 4 == 1.0
    result = small_run(tmp_path, 6, lora_rank=lora)
    assert backend.device_of(result["model"].src_emb.weight.data) == "fake-cuda"
    recipe_device["name"] = "cpu"
    reference = small_run(tmp_path / "cpu", 6, lora_rank=lora)
    assert backend.device_of(reference["model"].src_emb.weight.data) == "cpu"
    assert result["history"]["step_losses"] == reference["history"]["step_losses"]
    assert result["examples"] == reference["examples"]


def test_greedy_decoding_costs_at_most_one_transfer_a_token():
    src = np.array([[3, 4, 5, 0], [6, 7, 8, 9], [2, 3, 0, 0]])  # host ids: checked there, no transfer
    with backend.device("fake-cuda"):
        model = EncoderDecoder(config(context_length=12), seed=3)
        with fake_cuda.count_transfers() as log:
            out = model.greedy_decode(src, bos_id=1, eos_id=2, max_new_tokens=10)
    assert log.total <= out.shape[1] + 1, log.report()  # one a token (has every row ended?), the ids at the end
    with backend.device("cpu"):
        expected = EncoderDecoder(config(context_length=12), seed=3).greedy_decode(src, bos_id=1, eos_id=2,
                                                                                    max_new_tokens=10)
    np.testing.assert_array_equal(out, expected)
