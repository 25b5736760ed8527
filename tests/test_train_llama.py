"""``numpygpt train --arch llama|qwen3``: Llama 3 and Qwen3 trained from scratch through the one
loop GPT-2 uses, with what a GPT-2 run has: the run folder, bit-for-bit resume, accumulation,
ZeRO, a trained tokenizer, --init-from, the fake GPU device (and its one host transfer a
step), and the family's own refusals."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from numpygpt.checkpoint import read_checkpoint
from numpygpt.cli import main
from numpygpt.config import LlamaConfig
from numpygpt.data import default_corpus
from numpygpt.llama import LlamaModel
from numpygpt.run import run_training


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text(default_corpus()[:8000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("tok") / "tok"
    assert main(["tokenizer", "train", "--data", str(corpus), "--vocab-size", "400", "--out", str(out)]) == 0
    return out


GPT2_SHAPE = ["--emb-dim", "16", "--n-layers", "2", "--n-heads", "4"]
LLAMA_SHAPE = [*GPT2_SHAPE, "--n-kv-heads", "2", "--hidden-dim", "32"]


def args(corpus, out, *extra, steps=6, tokenizer=None, shape=LLAMA_SHAPE, device="cpu"):
    """A tiny model (float64, so that equal runs are equal to the last bit) on the small text."""
    argv = ["train", *shape, "--context-length", "8", "--dtype", "float64", "--data", corpus,
            "--device", device, "--batch-size", "4", "--schedule", "constant", "--lr", "3e-3", "--eval-freq", "3", "--eval-iter", "1",
            "--prompt", "The", "--sample-tokens", "3", "--no-progress", "--max-steps", steps, "--out", out, *extra]
    if tokenizer is not None:
        argv += ["--tokenizer", tokenizer]
    return [str(a) for a in argv]


def history(out):
    return json.loads((out / "history.json").read_text())


def weights(out):
    return {k: v for k, v in load_file(str(out / "checkpoint.safetensors")).items() if k.startswith("model.")}


def assert_same_run(got, want, rel=0.0):
    """The same per-step losses and final weights: bit for bit, or to ``rel`` relative."""
    np.testing.assert_allclose(history(got)["step_losses"], history(want)["step_losses"], rtol=rel, atol=0)
    a, b = weights(got), weights(want)
    assert a.keys() == b.keys()
    for key in b:
        assert np.abs(a[key] - b[key]).max() <= rel * np.abs(b[key]).max(), key


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_the_default_corpus_trains_a_small_model_whose_loss_falls(arch, tmp_path, capsys):
    """The family's small default shape (SMALL_LLAMA), GPT-2's tokenizer, the default corpus: the
    run folder holds what a GPT-2 run's does, the checkpoint is the family's, and the loss falls."""
    out = tmp_path / arch
    result = run_training({"arch": arch, "context_length": 16, "batch_size": 4, "max_steps": 12, "eval_freq": 11,
                           "eval_iter": 2, "sample_tokens": 4, "device": "cpu", "no_progress": True,
                           "out": str(out)})
    printed = capsys.readouterr().out
    assert f"model       {arch}: emb_dim 128, 4 layers, 4 heads (2 key/value)" in printed
    assert "Ep 1 sample (step 12)" in printed and "The for statement is used to" in printed
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.safetensors", "history.json", "loss.png"]
    model = result["model"]
    assert isinstance(model, LlamaModel) and model.cfg.model_type == arch and model.cfg.qk_norm == (arch == "qwen3")
    assert read_checkpoint(out / "checkpoint.safetensors").config == model.cfg
    losses = history(out)["step_losses"]
    assert len(losses) == 12 and np.mean(losses[-3:]) < losses[0] - 1.0
    assert history(out)["val_losses"][-1] < history(out)["val_losses"][0]


def test_the_folder_of_a_llama_run_is_a_gpt2_runs(corpus, tokenizer_dir, tmp_path, capsys):
    """Same files (the trained tokenizer saved beside the checkpoint), the same history keys; the
    checkpoint decodes with that tokenizer."""
    runs = {}
    for arch in ("gpt2", "llama"):
        out = tmp_path / arch
        shape = GPT2_SHAPE if arch == "gpt2" else LLAMA_SHAPE
        assert main(args(corpus, out, "--arch", arch, tokenizer=tokenizer_dir, shape=shape)) == 0
        runs[arch] = out
    capsys.readouterr()
    files = [sorted(p.name for p in runs[a].iterdir()) for a in runs]
    assert files[0] == files[1] == ["checkpoint.safetensors", "history.json", "loss.png", "tokenizer.json"]
    assert history(runs["gpt2"]).keys() == history(runs["llama"]).keys()
    saved = read_checkpoint(runs["llama"] / "checkpoint.safetensors")
    assert saved.config.vocab_size == 400 and saved.extra["tokenizer"]["n_vocab"] == 400
    assert main(["generate", "--checkpoint", str(runs["llama"] / "checkpoint.safetensors"), "--prompt", "The",
                 "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("The")


@pytest.mark.parametrize("arch,accum", [("llama", 1), ("qwen3", 2)])
def test_resume_reproduces_the_uninterrupted_run(corpus, tokenizer_dir, tmp_path, capsys, arch, accum):
    """8 steps straight == 4 steps, then --resume to 8: bit for bit (weights, AdamW, dropout stream,
    data order), with gradient accumulation and a trained tokenizer."""
    extra = ["--arch", arch, "--grad-accum", str(accum)]
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    assert main(args(corpus, straight, *extra, steps=8, tokenizer=tokenizer_dir)) == 0
    assert main(args(corpus, halves, *extra, steps=4, tokenizer=tokenizer_dir)) == 0
    assert main(["train", "--resume", str(halves / "checkpoint.safetensors"), "--max-steps", "8",
                 "--no-progress", "--out", str(halves)]) == 0
    assert "resuming    at step 4" in capsys.readouterr().out
    assert_same_run(halves, straight)


def test_zero_1_and_the_fake_gpu_take_the_plain_runs_steps(corpus, tmp_path, capsys):
    """--zero 1 (one rank: the whole flat vector is its shard) and --device fake-cuda (CuPy's
    refusals, NumPy's arithmetic) take the plain CPU run's steps, to rounding: the clipping
    norm sums in another order (a flat vector; on the device, without a sync)."""
    plain = tmp_path / "plain"
    assert main(args(corpus, plain, "--arch", "qwen3", "--grad-accum", "2")) == 0
    for name, flags, device, rel in (("zero", ["--zero", "1"], "cpu", 1e-10), ("fake", [], "fake-cuda", 1e-10)):
        assert main(args(corpus, tmp_path / name, "--arch", "qwen3", "--grad-accum", "2", *flags, device=device)) == 0
        assert_same_run(tmp_path / name, plain, rel)
    assert "device      fake-cuda" in capsys.readouterr().out


@pytest.mark.parametrize("tied", [True, False])
def test_the_fused_loss_takes_the_plain_runs_steps(corpus, tmp_path, capsys, monkeypatch, tied):
    """--fused-loss on a Llama model: the fused op computes the loss (forward_hidden, then the
    head and cross-entropy chunk by chunk), and the steps are the plain loss's (float64)."""
    from numpygpt.nn import FusedLinearCrossEntropy

    calls, real = [], FusedLinearCrossEntropy.forward
    monkeypatch.setattr(FusedLinearCrossEntropy, "forward", lambda self, *a: calls.append(1) or real(self, *a))
    tie = "--tie-weights" if tied else "--no-tie-weights"
    assert main(args(corpus, tmp_path / "plain", "--arch", "llama", tie, steps=4)) == 0
    assert not calls
    assert main(args(corpus, tmp_path / "fused", "--arch", "llama", tie, "--fused-loss", steps=4)) == 0
    assert len(calls) >= 4
    assert_same_run(tmp_path / "fused", tmp_path / "plain", rel=1e-12)
    capsys.readouterr()


@pytest.mark.parametrize("flags,message", [
    (["--arch", "llama", "--qkv-bias"], "--qkv-bias: a llama model has no biases"),
    (["--arch", "qwen3", "--drop-rate", "0.1"], "--drop-rate: a qwen3 model has no dropout"),
    (["--arch", "llama", "--init", "pytorch"], "--init pytorch: a llama model starts from"),
    (["--n-kv-heads", "2"], "--n-kv-heads: GPT-2 has no such field"),
    (["--preset", "qwen3-tiny", "--arch", "llama"], "--preset qwen3-tiny is a qwen3 model, not --arch llama"),
    (["--arch", "llama", "--n-heads", "4", "--n-kv-heads", "3"], "must be a multiple of n_kv_heads"),
])
def test_flags_the_family_has_no_use_for_are_refused(corpus, tmp_path, capsys, flags, message):
    assert main(["train", "--data", str(corpus), "--device", "cpu", "--out", str(tmp_path / "x"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("numpygpt: error: model configuration:") and message in err[0], err
    assert not (tmp_path / "x").exists()


def test_a_llama_preset_names_its_family_and_the_flags_change_its_shape(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    result = run_training({"preset": "llama-tiny", "n_layers": 1, "hidden_dim": 48, "context_length": 8,
                           "data": str(corpus), "max_steps": 1, "batch_size": 2, "device": "cpu",
                           "no_progress": True, "prompt": "", "out": str(out)})
    cfg = result["model"].cfg
    want = LlamaConfig.preset("llama-tiny", n_layers=1, hidden_dim=48, context_length=8, vocab_size=50257)
    assert cfg == want  # the preset's RoPE scaling and eps kept
    assert "--resume" not in capsys.readouterr().err
    # a resumed run's shape is the checkpoint's: shape flags are refused
    code = main(["train", "--resume", str(out / "checkpoint.safetensors"), "--hidden-dim", "64"])
    assert code == 2 and "--hidden-dim cannot be used with --resume" in capsys.readouterr().err


def test_the_small_default_follows_the_width_and_heads_given():
    from numpygpt.run import TrainCommandOptions
    from numpygpt.run_model import SMALL_LLAMA, train_config

    def config(**given):
        return train_config(TrainCommandOptions.from_dict(given), n_vocab=300)

    cfg = config(arch="llama")
    assert {k: getattr(cfg, k) for k in SMALL_LLAMA} == SMALL_LLAMA and cfg.rope_scaling is None
    assert (cfg.vocab_size, cfg.rope_theta, cfg.rms_norm_eps, cfg.qk_norm) == (300, 500000.0, 1e-5, False)
    cfg = config(arch="qwen3", emb_dim=48, n_heads=6)
    assert (cfg.hidden_dim, cfg.n_kv_heads, cfg.head_dim) == (144, 3, 8)
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.qk_norm) == (1000000.0, 1e-6, True)
    assert config(arch="llama", n_heads=3, emb_dim=48).n_kv_heads == 3  # an odd count: every head its own
    cfg = config(preset="qwen3-0.6b", n_layers=1)  # a preset keeps its own shape but for the flags given
    assert (cfg.n_layers, cfg.hidden_dim, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size) == (1, 3072, 8, 128, 300)


def test_init_from_a_qwen3_directory_trains_it_with_its_own_tokenizer(corpus, tmp_path, capsys):
    """--init-from a Hugging Face Qwen3 directory: its weights (a padded vocabulary) and its
    tokenizer.json, saved beside the checkpoint."""
    from numpygpt import save_pretrained
    from numpygpt.tokenizer import train_bpe

    bpe = train_bpe(corpus.read_text(encoding="utf-8"), 300)
    directory = tmp_path / "qwen3"
    pretrained = LlamaModel(LlamaConfig.preset("qwen3-tiny", vocab_size=bpe.n_vocab + 4), seed=5)
    save_pretrained(pretrained, directory)
    bpe.save(directory)
    common = ["--data", str(corpus), "--context-length", "16", "--batch-size", "2", "--max-steps", "2",
              "--eval-freq", "1", "--eval-iter", "1", "--prompt", "The", "--sample-tokens", "2", "--device", "cpu",
              "--no-progress"]
    # lr 0: the steps leave the weights as loaded, so the checkpoint holds the directory's
    assert main(["train", "--init-from", str(directory), "--lr", "0", "--out", str(tmp_path / "run"), *common]) == 0
    assert "model       qwen3: emb_dim 32, 2 layers" in capsys.readouterr().out
    saved = read_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert saved.config == pretrained.cfg and saved.extra["tokenizer"]["n_vocab"] == bpe.n_vocab
    assert (tmp_path / "run" / "tokenizer.json").read_bytes() == (directory / "tokenizer.json").read_bytes()
    got = weights(tmp_path / "run")
    for name, p in pretrained.named_parameters():
        np.testing.assert_array_equal(got["model." + name], p.data, err_msg=name)
    # a directory without a tokenizer, a dropout the family does not have: one line each
    (directory / "tokenizer.json").unlink()
    assert main(["train", "--init-from", str(directory), "--out", str(tmp_path / "x"), *common]) == 2
    assert "has no tokenizer" in capsys.readouterr().err
    assert main(["train", "--init-from", str(directory), "--drop-rate", "0.1", "--out", str(tmp_path / "x"),
                 *common]) == 2
    assert "--drop-rate: a qwen3 model has no dropout" in capsys.readouterr().err


def test_init_from_a_gpt2_directory_keeps_gpt2s_tokenizer(corpus, tmp_path, capsys):
    from numpygpt import GPTConfig, GPTModel

    directory = tmp_path / "gpt2"
    GPTModel(GPTConfig(vocab_size=50257, context_length=16, emb_dim=8, n_heads=2, n_layers=1), seed=0
             ).save_pretrained(directory)
    assert main(["train", "--init-from", str(directory), "--data", str(corpus), "--batch-size", "2", "--max-steps",
                 "1", "--eval-iter", "1", "--prompt", "", "--device", "cpu", "--no-progress",
                 "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert read_checkpoint(tmp_path / "run" / "checkpoint.safetensors").extra["tokenizer"] == {
        "name": "gpt2", "n_vocab": 50257}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.safetensors", "history.json",
                                                                   "loss.png"]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_llama_training_step_on_the_gpu_path_costs_one_host_transfer(arch):
    """As GPT-2's (tests/test_fake_cuda.py): on the fake CUDA device a step of the one loop,
    with accumulation and clipping, reads one number back to the host."""
    from test_fake_cuda import per_step, token_loaders

    from numpygpt import backend
    from numpygpt.optim import AdamW, param_groups
    from numpygpt.train import train_model

    def run(steps):
        model = LlamaModel(LlamaConfig.preset(f"{arch}-tiny"), seed=0)
        train, val = token_loaders()
        return train_model(model, train, val, AdamW(param_groups(model, 0.1), lr=1e-3), num_epochs=1,
                           eval_freq=1000, eval_iter=2, max_steps=steps, grad_accum_steps=2, max_grad_norm=1.0,
                           progress=False, log=None)

    with backend.device("fake-cuda"):
        backend.manual_seed(0)
        assert per_step(run, 2, 6) == 1.0


def test_a_token_generated_by_qwen3_on_the_gpu_path_costs_at_most_one_host_transfer():
    from numpygpt import backend, fake_cuda
    from numpygpt.generate import generate

    prompt = np.random.default_rng(0).integers(0, 128, (2, 5))
    with backend.device("fake-cuda"):
        model = LlamaModel(LlamaConfig.preset("qwen3-tiny"), seed=0)
        with fake_cuda.count_transfers() as log:
            out = generate(model, prompt, 10, use_cache=True, temperature=0.8, top_k=5, seed=1)
    assert out.shape == (2, 15) and log.total <= 10, log.report()
    with backend.device("cpu"):
        expected = generate(LlamaModel(LlamaConfig.preset("qwen3-tiny"), seed=0), prompt, 10, use_cache=True,
                            temperature=0.8, top_k=5, seed=1)
    np.testing.assert_array_equal(backend.to_host(out), expected)


def test_weight_decay_leaves_the_token_embedding_and_the_norms_alone_as_for_gpt2():
    from numpygpt.optim import param_groups

    for tied in (True, False):
        model = LlamaModel(LlamaConfig.preset("qwen3-tiny", tie_weights=tied), seed=0)
        decayed, kept = ({name for name, _ in group["params"]} for group in param_groups(model, 0.1))
        assert "model.embed_tokens.weight" in kept and not any("norm" in name for name in decayed)
        assert ("lm_head.weight" in decayed) == (not tied)  # an untied head is a matmul weight
        assert all(name.endswith("proj.weight") for name in decayed - {"lm_head.weight"})
