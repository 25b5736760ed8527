"""The fake CUDA device (numpygpt.fake_cuda): it refuses what CuPy refuses and counts host
transfers; and on it, the budgets of the GPU path: a training step (train_model, the
classifier's loop, the instruction recipe, LoRA) costs one host transfer, a generated token
at most one."""

from functools import partial

import numpy as np
import pytest

from numpygpt import GPTConfig, GPTModel, backend, fake_cuda
from numpygpt.checkpoint import load_checkpoint, save_checkpoint
from numpygpt.data import DataLoader, GPTDataset
from numpygpt.generate import generate
from numpygpt.lora import apply_lora, lora_parameters
from numpygpt.optim import AdamW, clip_grad_norm, param_groups
from numpygpt.train import train_model

V = 128  # the tiny preset's vocabulary


@pytest.fixture
def fake():
    with backend.device("fake-cuda"):
        backend.manual_seed(0)
        yield backend.xp


# -- the device itself ----------------------------------------------------------------------------

def test_arrays_refuse_implicit_conversion_and_mixing_with_numpy(fake):
    x = fake.ones((2, 3), dtype="float32")
    host = np.ones((2, 3), dtype="float32")
    refused = [
        lambda: np.asarray(x), lambda: x.__array__(), lambda: np.ascontiguousarray(x),
        lambda: x + host, lambda: host * x, lambda: x + np.float32(1) * host,
        lambda: fake.concatenate([x, host]), lambda: fake.multiply(x, host, out=x),
        lambda: x.__setitem__(slice(0, 1), host[:1]),  # a basic slice takes device data only
        lambda: x + np.asarray(1.0, dtype="float32"),  # 0-d host arrays too
    ]
    for i, call in enumerate(refused):
        with pytest.raises(TypeError):
            call()
            pytest.fail(f"case {i} was allowed")
    # what CuPy allows: scalars, host data through asarray, host indices and fancy values
    y = x * np.float32(2) + 1.0
    y[np.array([0, 1]), 0] = np.array([5.0, 6.0])
    assert backend.to_host(y).tolist() == [[5.0, 3.0, 3.0], [6.0, 3.0, 3.0]]
    assert backend.device_of(fake.asarray(host)) == "fake-cuda"


def test_results_stay_on_the_device_and_keep_numpy_semantics(fake):
    x = fake.arange(6, dtype="float64").reshape(2, 3)
    total = x.sum()
    assert isinstance(total, fake_cuda.FakeArray) and total.ndim == 0  # not a NumPy scalar
    assert isinstance(x[0, 1], fake_cuda.FakeArray)
    assert isinstance(np.exp(x), fake_cuda.FakeArray)  # NumPy functions dispatch, as to CuPy
    buf = fake.empty(3)
    assert fake.multiply(x[1], 2, out=buf) is buf
    before = x
    x += 1
    assert x is before and backend.to_host(x)[1, 2] == 6.0
    view = x[0]
    view[...] = 0  # views write through, as on the device
    assert backend.to_host(x)[0].tolist() == [0.0, 0.0, 0.0]
    host = np.zeros(3)
    dev = fake.asarray(host)
    host[0] = 9  # host -> device is a copy
    assert backend.to_host(dev)[0] == 0.0


def test_every_host_transfer_is_counted_with_its_line(fake):
    x = fake.arange(4, dtype="float32")
    with fake_cuda.count_transfers() as log:
        backend.to_host(x)            # explicit
        float(x.sum())                # implicit: CuPy's __float__ calls get()
        int(x[1]), bool(x[1] > 0), x[2].item(), x.tolist(), f"{x.sum():.1f}"
        x[x > 1]                      # a boolean-mask read sizes its output on the host
        y = x * 2 + fake.exp(x)       # stays on the device
    assert log.count("get") == 1 and log.count("implicit") == 7, log.report()
    assert "test_fake_cuda.py" in log.events[0][1]  # where: the caller, not the backend
    assert isinstance(y, fake_cuda.FakeArray)


def test_host_floats_fetches_many_values_in_one_transfer(fake):
    a, b = fake.asarray(np.float32(1.5)), fake.asarray(2.0)
    with fake_cuda.count_transfers() as log:
        assert backend.host_floats(a, 3, b) == (1.5, 3.0, 2.0)
    assert log.total == 1


def test_clip_grad_norm_without_sync_matches_the_host_rule(fake):
    from numpygpt.nn import Parameter

    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(s).astype("float32") * 3 for s in ((4, 5), (7,))]
    for max_norm in (0.5, 1e3):
        host_params = [Parameter(np.zeros_like(g)) for g in grads]
        dev_params = [Parameter(fake.zeros(g.shape, dtype="float32")) for g in grads]
        for hp, dp, g in zip(host_params, dev_params, grads):
            hp.grad, dp.grad = g.copy(), fake.asarray(g)
        with fake_cuda.count_transfers() as log:
            norm = clip_grad_norm(dev_params, max_norm, sync=False)
        assert log.total == 0
        assert float(norm) == pytest.approx(clip_grad_norm(host_params, max_norm), rel=1e-12)
        for hp, dp in zip(host_params, dev_params):
            np.testing.assert_array_equal(backend.to_host(dp.grad), hp.grad)


# -- budgets of the GPU path ----------------------------------------------------------------------

def token_loaders(T=16, batch_size=4, n_tokens=2000):
    ids = np.resize(np.random.default_rng(0).permutation(V)[:40], n_tokens)
    split = int(0.9 * n_tokens)
    train = DataLoader(GPTDataset(ids[:split], T, T), batch_size, shuffle=True, seed=0)
    val = DataLoader(GPTDataset(ids[split:], T, T), batch_size, shuffle=False, drop_last=False)
    return train, val


def transfers_of(run) -> int:
    with fake_cuda.count_transfers() as log:
        run()
    return log.total


def per_step(run, short: int, long: int) -> float:
    """Host transfers per step: the difference between a run of ``long`` and one of ``short``
    steps (what both do once, the evaluation at step 1 and the final check, cancels)."""
    return (transfers_of(lambda: run(long)) - transfers_of(lambda: run(short))) / (long - short)


@pytest.mark.parametrize("lora", [False, True])
def test_a_training_step_costs_one_host_transfer(fake, lora):
    def run(steps):
        model = GPTModel(GPTConfig.preset("tiny", drop_rate=0.1), seed=0)
        if lora:
            apply_lora(model, rank=4, alpha=8)
        opt = AdamW(lora_parameters(model) if lora else param_groups(model, 0.1), lr=1e-3)
        train, val = token_loaders()
        return train_model(model, train, val, opt, num_epochs=1, eval_freq=1000, eval_iter=2, max_steps=steps,
                           grad_accum_steps=2, max_grad_norm=1.0, progress=False, log=None)

    assert per_step(run, 2, 6) == 1.0
    history = run(3)
    assert len(history["step_losses"]) == 3 and all(np.isfinite(history["step_losses"]))


def test_a_classifier_training_step_costs_one_host_transfer(fake):
    from numpygpt.finetune.classify import train_classifier

    rng = np.random.default_rng(1)
    texts = rng.integers(0, V - 1, (24, 10))
    texts[:, 7:] = V - 1  # right padding: read at the last real token
    data = [(row, np.int64(row[0] % 2)) for row in texts]

    def run(steps):
        model = GPTModel(GPTConfig.preset("tiny"), seed=0).to_classifier(2, readout="last_non_pad", pad_id=V - 1)
        opt = AdamW(param_groups(model, 0.1), lr=1e-3)
        train = DataLoader(data[:steps * 4], 4, shuffle=True, seed=0)
        val = DataLoader(data[-4:], 4, shuffle=False)
        return train_classifier(model, train, val, opt, num_epochs=1, eval_freq=1000, eval_iter=1, progress=False,
                                log=None)

    assert per_step(run, 2, 5) == 1.0
    assert np.isfinite(run(2)["val_accs"][0])


def test_an_instruction_step_costs_one_host_transfer(fake):
    from numpygpt.finetune.instruct import collate_instructions

    rng = np.random.default_rng(2)
    items = [rng.integers(0, V - 1, int(n)) for n in rng.integers(5, 15, 40)]
    collate = partial(collate_instructions, pad_id=V - 1, allowed_max_length=16)

    def run(steps):
        model = GPTModel(GPTConfig.preset("tiny"), seed=0)
        opt = AdamW(param_groups(model, 0.1), lr=1e-3)
        train = DataLoader(items, 4, shuffle=True, seed=0, collate_fn=collate)
        val = DataLoader(items[:8], 4, shuffle=False, collate_fn=collate)
        return train_model(model, train, val, opt, num_epochs=1, eval_freq=1000, eval_iter=1, max_steps=steps,
                           progress=False, log=None)

    assert per_step(run, 2, 5) == 1.0


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_k": 5, "seed": 1}])
def test_a_generated_token_costs_at_most_one_host_transfer(fake, sampling):
    model = GPTModel(GPTConfig.preset("tiny"), seed=0)
    prompt = np.random.default_rng(0).integers(0, V, (2, 5))  # host ids: checked there, no transfer
    with fake_cuda.count_transfers() as log:
        out = generate(model, prompt, 10, use_cache=True, **sampling)
    assert out.shape == (2, 15) and backend.device_of(out) == "fake-cuda"
    assert log.total <= 10, log.report()
    with backend.device("cpu"):
        host_model = GPTModel(GPTConfig.preset("tiny"), seed=0)
        expected = generate(host_model, prompt, 10, use_cache=True, **sampling)
    np.testing.assert_array_equal(backend.to_host(out), expected)  # the same tokens as on NumPy


def test_checkpoint_of_a_fake_device_run_resumes_on_the_cpu(fake, tmp_path):
    model = GPTModel(GPTConfig.preset("tiny"), seed=0)
    opt = AdamW(param_groups(model, 0.1), lr=1e-3)
    train, val = token_loaders()
    train_model(model, train, val, opt, num_epochs=1, eval_freq=1000, eval_iter=1, max_steps=2, progress=False,
                log=None)
    save_checkpoint(tmp_path / "ck.safetensors", model, opt, step=2)
    with backend.device("cpu"):
        host = GPTModel(GPTConfig.preset("tiny"), init=False)
        host_opt = AdamW(param_groups(host, 0.1), lr=1e-3)
        load_checkpoint(tmp_path / "ck.safetensors", host, host_opt, device="cpu")
    for (name, p), (_, q) in zip(model.named_parameters(), host.named_parameters()):
        np.testing.assert_array_equal(backend.to_host(p.data), q.data, err_msg=name)
    key = next(iter(opt.state))
    np.testing.assert_array_equal(backend.to_host(opt.state[key]["exp_avg"]), host_opt.state[key]["exp_avg"])


def test_the_recipes_other_pieces_on_the_fake_device(fake, tmp_path):
    """What the fine-tuning commands do around the loop: accuracy, saving a LoRA classifier
    (merged), loading it back, classifying a text; an instruction model's greedy answer,
    saved and loaded for chat. Any host/device mix in them raises here."""
    from numpygpt.finetune.classify import calc_accuracy_loader, classify_text, load_classifier, save_classifier
    from numpygpt.finetune.instruct import chat, generate_response, load_for_chat, save_finetuned

    cfg = GPTConfig(vocab_size=50257, context_length=32, emb_dim=32, n_heads=2, n_layers=2, qkv_bias=True,
                    tie_weights=True)
    clf = GPTModel(cfg, seed=1).to_classifier(2, readout="last_non_pad", pad_id=50256)
    apply_lora(clf, rank=2, alpha=4.0)
    rows = [(np.r_[np.full(5, 7 + i), np.full(3, 50256)], np.int64(i % 2)) for i in range(8)]
    accuracy = calc_accuracy_loader(clf, DataLoader(rows, 4, shuffle=False), 2)
    assert 0.0 <= accuracy <= 1.0
    save_classifier(clf, tmp_path / "clf", ["ham", "spam"], max_length=8, pad_id=50256)
    loaded, info = load_classifier(tmp_path / "clf", device="fake-cuda")
    assert backend.device_of(loaded.wte.weight.data) == "fake-cuda"
    with fake_cuda.count_transfers() as log:
        label = classify_text(loaded, "free cruise, call now", **info)
    assert label in ("ham", "spam") and log.total == 1, log.report()  # the class id, once

    lm = GPTModel(cfg, seed=2)
    with fake_cuda.count_transfers() as log:
        answer = generate_response(lm, {"instruction": "Say hi.", "input": ""}, max_new_tokens=4)
    assert isinstance(answer, str) and log.total <= 4 + 1, log.report()  # a token each, the ids at the end
    save_finetuned(lm, tmp_path / "lm")
    assert isinstance(chat(load_for_chat(tmp_path / "lm", device="fake-cuda"), "Say hi.", max_new_tokens=3), str)
