"""The training loop: learning, gradient accumulation, divergence, exact resume, plots,
schedules. Tiny models on synthetic token streams, so every test takes a second or less."""

import math

import numpy as np
import pytest

from numpygpt import CrossEntropyLoss, GPTConfig, GPTModel, backend
from numpygpt import checkpoint as checkpoint_module
from numpygpt.checkpoint import load_checkpoint
from numpygpt.config import LlamaConfig
from numpygpt.data import DataLoader, GPTDataset
from numpygpt.families import build_model
from numpygpt.optim import SGD, AdamW, CosineWithWarmup, param_groups
from numpygpt.train import (TrainingDivergedError, calc_loss_batch, calc_loss_loader, evaluate_model,
                            plot_losses, train_model)

V = 128  # the tiny preset's vocabulary


def token_stream(n_tokens=3000, period=40, seed=0):
    """A repeated random sequence of distinct ids: each id predicts the next exactly."""
    cycle = np.random.default_rng(seed).permutation(V)[:period]
    return np.resize(cycle, n_tokens)


def loaders(T=16, batch_size=4, shuffle=True, seed=0, n_tokens=3000):
    ids = token_stream(n_tokens)
    split = int(0.9 * len(ids))
    train = DataLoader(GPTDataset(ids[:split], T, T), batch_size, shuffle=shuffle, seed=seed)
    val = DataLoader(GPTDataset(ids[split:], T, T), batch_size, shuffle=False, drop_last=False)
    return train, val


def tiny(**kw):
    return GPTConfig.preset("tiny", **kw)


def params_host(model):
    return {n: backend.to_host(p.data).copy() for n, p in model.named_parameters()}


def test_loss_falls_and_history_is_consistent(device):
    backend.manual_seed(0)
    model = GPTModel(tiny(drop_rate=0.1), seed=0)
    train, val = loaders()
    opt = AdamW(param_groups(model, 0.1), lr=3e-3)
    history = train_model(model, train, val, opt, num_epochs=3, eval_freq=5, eval_iter=3,
                          progress=False, log=None)
    steps = 3 * len(train)
    assert history["global_step"] == steps == len(history["step_losses"]) == len(history["lrs"])
    assert history["epoch"] == 3 and history["batch_in_epoch"] == 0
    assert history["tokens_seen"] == steps * 4 * 16
    assert history["track_steps"] == list(range(1, steps + 1, 5))
    assert history["track_tokens_seen"] == [s * 64 for s in history["track_steps"]]
    assert history["perplexities"] == [math.exp(v) for v in history["val_losses"]]
    first, last = history["train_losses"][0], history["train_losses"][-1]
    assert first > math.log(V) - 0.5  # ~ln(128) at initialisation
    assert last < first - 2.0, history["train_losses"]
    assert history["val_losses"][-1] < history["val_losses"][0] - 2.0
    assert model.training  # evaluations put the model back in training mode


def test_calc_loss_helpers(device):
    model = GPTModel(tiny(dtype="float64"), seed=1)
    train, val = loaders()
    loss_fn = CrossEntropyLoss()
    x, y = next(train.epoch_batches(0))
    assert isinstance(x, np.ndarray)  # host batches: calc_loss_batch moves them to the model
    expected = float(loss_fn(model(backend.to_device(x)), backend.to_device(y)))
    assert float(calc_loss_batch(model, loss_fn, x, y)) == pytest.approx(expected, rel=1e-12)
    # the mean over the first batches of epoch 0, and the loader's epoch counter is untouched
    batches = list(train.epoch_batches(0))[:3]
    manual = np.mean([float(calc_loss_batch(model, loss_fn, a, b)) for a, b in batches])
    assert calc_loss_loader(model, loss_fn, train, num_batches=3) == pytest.approx(manual, rel=1e-12)
    assert train.epoch == 0
    assert math.isnan(calc_loss_loader(model, loss_fn, []))
    model.train()
    tr, va = evaluate_model(model, train, val, eval_iter=2)
    assert model.training and tr > 0 and va > 0


def test_gradient_accumulation_equals_the_big_batch():
    """2 micro-batches of 2 windows step exactly like 1 batch of the same 4 windows."""
    cfg = tiny(dtype="float64", drop_rate=0.0)
    results = []
    for batch_size, accum in ((4, 1), (2, 2)):
        model = GPTModel(cfg, seed=5)
        train, val = loaders(batch_size=batch_size, shuffle=False)
        opt = SGD(model, lr=0.5)
        history = train_model(model, train, val, opt, num_epochs=1, eval_freq=100, eval_iter=1,
                              grad_accum_steps=accum, max_steps=1, progress=False, log=None)
        grads = {n: backend.to_host(p.grad) for n, p in model.named_parameters()}
        results.append((history, grads, params_host(model)))
    (h1, g1, p1), (h2, g2, p2) = results
    assert h1["step_losses"][0] == pytest.approx(h2["step_losses"][0], rel=1e-12)
    assert h1["tokens_seen"] == h2["tokens_seen"] == 4 * 16
    for name in g1:
        np.testing.assert_allclose(g2[name], g1[name], rtol=1e-10, atol=1e-14, err_msg=name)
        np.testing.assert_allclose(p2[name], p1[name], rtol=1e-12, atol=1e-15, err_msg=name)
    # and the gradients really moved the weights
    assert not np.allclose(p1["h.0.attn.c_attn.weight"], params_host(GPTModel(cfg, seed=5))["h.0.attn.c_attn.weight"])


def test_accumulation_needs_enough_batches():
    model = GPTModel(tiny(), seed=0)
    train, val = loaders(n_tokens=200)  # 11 windows: 2 batches of 4
    with pytest.raises(ValueError, match="grad_accum_steps=3"):
        train_model(model, train, val, SGD(model, lr=0.1), 1, 1, 1, grad_accum_steps=3, progress=False)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    backend.manual_seed(0)
    model = GPTModel(tiny(), seed=0)
    train, val = loaders()
    path = tmp_path / "ckpt.safetensors"
    saved = {}
    real_save = checkpoint_module.save_checkpoint

    def save_then_poison(p, model_, optimizer=None, step=0, extra=None):
        real_save(p, model_, optimizer, step=step, extra=extra)
        saved[step] = path.read_bytes()
        if step == 4:  # after the step-4 checkpoint a NaN weight makes the next loss NaN
            model_.h[0].mlp.c_fc.weight.data[0, 0] = np.nan

    monkeypatch.setattr(checkpoint_module, "save_checkpoint", save_then_poison)
    messages = []
    with pytest.raises(TrainingDivergedError, match=r"loss is nan at step 5") as info:
        train_model(model, train, val, AdamW(model, lr=1e-3), num_epochs=2, eval_freq=100, eval_iter=1,
                    checkpoint_path=str(path), checkpoint_every=2, progress=False, log=messages.append)
    assert info.value.step == 5 and math.isnan(info.value.loss)
    assert str(path) in str(info.value) and "step 4" in str(info.value)
    assert sorted(saved) == [2, 4]  # nothing was saved after the NaN
    assert path.read_bytes() == saved[4]
    ck = load_checkpoint(path, device="cpu")
    assert ck["step"] == 4
    assert all(np.isfinite(backend.to_host(p.data)).all() for p in ck["model"].parameters())


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_non_finite_weights_stop_the_first_step():
    model = GPTModel(tiny(), seed=0)
    train, val = loaders()
    model.wte.weight.data[:] = np.inf
    with pytest.raises(TrainingDivergedError, match="step 1"):
        train_model(model, train, val, SGD(model, lr=0.1), 1, 1, 1, progress=False, log=None)


@pytest.mark.parametrize("accum,family", [(1, "gpt2"), (2, "gpt2"), (2, "llama"), (1, "qwen3")])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, accum, family):
    """k steps, checkpoint, fresh objects, load, continue == N steps straight (CPU, exact),
    with dropout masks (GPT-2; Llama and Qwen3 have none), shuffled epochs, a cosine schedule
    and an epoch boundary in between."""
    N, k = 14, 5
    cfg = tiny(drop_rate=0.2) if family == "gpt2" else LlamaConfig.preset(f"{family}-tiny")

    def setup(seed):
        backend.manual_seed(seed)
        model = build_model(cfg, seed=seed)
        train, val = loaders(batch_size=4, shuffle=True, seed=7, n_tokens=600)  # 8 batches an epoch
        opt = AdamW(param_groups(model, 0.1), lr=2e-3)
        sched = CosineWithWarmup(2e-3, total_steps=N, warmup_steps=3, min_lr=1e-4, initial_lr=1e-4)
        return model, train, val, opt, sched

    def run(model, train, val, opt, sched, **kw):
        return train_model(model, train, val, opt, num_epochs=4, eval_freq=3, eval_iter=2,
                           grad_accum_steps=accum, scheduler=sched, progress=False, log=None, **kw)

    straight = setup(0)
    assert len(straight[1]) // accum < N  # the run crosses an epoch boundary
    h_straight = run(*straight, max_steps=N)

    path = str(tmp_path / "ckpt.safetensors")
    first = setup(0)
    h_first = run(*first, max_steps=k, checkpoint_path=path)
    assert h_first["step_losses"] == h_straight["step_losses"][:k]

    model, train, val, opt, sched = setup(123)  # other weights and dropout stream, until loaded
    ck = load_checkpoint(path, model=model, optimizer=opt)
    h_resumed = run(model, train, val, opt, sched, max_steps=N, resume_state=ck)

    for key in ("step_losses", "train_losses", "val_losses", "lrs", "track_steps", "track_tokens_seen",
                "global_step", "tokens_seen", "epoch", "batch_in_epoch"):
        assert h_resumed[key] == h_straight[key], key
    straight_params = params_host(straight[0])
    for name, value in params_host(model).items():
        np.testing.assert_array_equal(value, straight_params[name], err_msg=name)


def test_checkpoint_extra_holds_the_position(tmp_path):
    model = GPTModel(tiny(), seed=0)
    train, val = loaders()
    path = str(tmp_path / "c.safetensors")
    train_model(model, train, val, SGD(model, lr=0.1), 2, 100, 1, max_steps=len(train) + 3,
                checkpoint_path=path, progress=False, log=None, extra={"note": "hi"})
    extra = load_checkpoint(path, device="cpu")["extra"]
    assert extra["note"] == "hi"
    assert (extra["epoch"], extra["batch_in_epoch"], extra["global_step"]) == (1, 3, len(train) + 3)
    assert extra["tokens_seen"] == (len(train) + 3) * 4 * 16
    assert extra["loader_state"]["n_windows"] == len(train.dataset)
    assert len(extra["history"]["step_losses"]) == len(train) + 3


def test_scheduler_sets_the_learning_rate_of_every_step():
    model = GPTModel(tiny(), seed=0)
    train, val = loaders()
    opt = AdamW(model, lr=123.0)  # overwritten by the schedule before the first step
    sched = CosineWithWarmup(1e-3, total_steps=12, warmup_steps=4, min_lr=1e-5)
    history = train_model(model, train, val, opt, num_epochs=1, eval_freq=100, eval_iter=1,
                          scheduler=sched, max_steps=12, progress=False, log=None)
    assert history["lrs"] == [sched(i) for i in range(12)]
    assert history["lrs"][0] == 0.0 and max(history["lrs"]) == pytest.approx(1e-3)
    assert opt.lr == sched(11)


def test_samples_after_each_epoch_and_log_messages():
    from numpygpt.tokenizer import get_tokenizer

    model = GPTModel(tiny(vocab_size=50257), seed=0)
    train, val = loaders(n_tokens=600)
    messages = []
    train_model(model, train, val, SGD(model, lr=0.1), num_epochs=2, eval_freq=2, eval_iter=1,
                start_context="Every effort", tokenizer=get_tokenizer(), sample_tokens=3,
                progress=False, log=messages.append)
    samples = [m for m in messages if "sample" in m]
    assert len(samples) == 2 and all("Every effort" in m for m in samples)
    assert any("train loss" in m and "val loss" in m for m in messages)


def test_progress_bar_works_without_a_terminal(capsys):
    model = GPTModel(tiny(), seed=0)
    train, val = loaders(n_tokens=600)
    train_model(model, train, val, SGD(model, lr=0.1), num_epochs=1, eval_freq=1, eval_iter=1, progress=True)
    out, err = capsys.readouterr()
    assert "train loss" in out  # default log: print through tqdm.write
    assert "step" in err  # the bar went to stderr, which is not a TTY here


def test_plot_losses_writes_a_png(tmp_path):
    history = {"train_losses": [10.0, 7.0, 5.0], "val_losses": [10.1, 8.0, 7.5], "track_steps": [1, 6, 11],
               "track_tokens_seen": [512, 3072, 5632], "step_losses": list(np.linspace(10, 5, 12)),
               "global_step": 12, "tokens_seen": 6144}
    path = tmp_path / "loss.png"
    plot_losses(history, path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


# -- defect 1: the guard looks at the weights the update made ----------------------------------

def assert_good_checkpoint(path):
    """A checkpoint on disk holds finite weights whose loss is finite."""
    ck = load_checkpoint(path, device="cpu", restore_rng=False)
    assert all(np.isfinite(backend.to_host(p.data)).all() for p in ck["model"].parameters())
    train, _ = loaders()
    x, y = next(train.epoch_batches(0))
    assert math.isfinite(float(calc_loss_batch(ck["model"].eval(), CrossEntropyLoss(), x, y)))
    return ck


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("lr, clip, every, max_steps", [
    (1e39, 1.0, 1, 5),   # the first update makes every weight inf/nan
    (1e4, None, 2, 8),   # finite but enormous weights: their loss is nan/inf
    (1e3, None, 2, 8),   # every step's own loss is finite, the weights are not
])
def test_a_step_that_breaks_the_weights_is_never_saved(tmp_path, lr, clip, every, max_steps):
    model = GPTModel(tiny(), seed=0)
    train, val = loaders()
    path = tmp_path / "ckpt.safetensors"
    with pytest.raises(TrainingDivergedError) as info:
        train_model(model, train, val, AdamW(model, lr=lr), num_epochs=2, eval_freq=100, eval_iter=1,
                    max_grad_norm=clip, checkpoint_path=str(path), checkpoint_every=every, max_steps=max_steps,
                    progress=False, log=None)
    if path.exists():  # only a good step's checkpoint may be on disk, and the error names it
        ck = assert_good_checkpoint(path)
        assert f"step {ck['step']})" in str(info.value)
    else:
        assert "no checkpoint had been written" in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] in ([], ["ckpt.safetensors"])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_run_ending_with_broken_weights_raises():
    """One step at lr 1e39 leaves non-finite weights: not a successful run, even without
    checkpoints and with the evaluation schedule missing the last step."""
    model = GPTModel(tiny(), seed=0)
    train, val = loaders()
    with pytest.raises(TrainingDivergedError, match="after step 1"):
        train_model(model, train, val, SGD(model, lr=1e39), num_epochs=1, eval_freq=100, eval_iter=1,
                    max_steps=1, progress=False, log=None)
