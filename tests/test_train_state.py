"""The training loop's pieces for what comes next: TrainState (the checkpoint's training
position, one owner), TrainOptions, and the seams for data parallelism (reduce_gradients,
is_main_process) and for fine-tuning (any loss over any logits shape)."""

import numpy as np
import pytest

from numpygpt import GPTConfig, GPTModel, KVCache, Module, backend, eval_mode
from numpygpt.checkpoint import load_checkpoint
from numpygpt.data import DataLoader, GPTDataset
from numpygpt.optim import SGD
from numpygpt.train import TrainOptions, TrainState, train_model


def tiny(**kw):
    return GPTConfig.preset("tiny", **kw)


def loaders(n_tokens=600, batch_size=4, T=16):
    ids = np.resize(np.random.default_rng(0).permutation(128)[:40], n_tokens)
    train = DataLoader(GPTDataset(ids[:540], T, T), batch_size, shuffle=True, seed=0)
    val = DataLoader(GPTDataset(ids[540:], T, T), batch_size, shuffle=False, drop_last=False)
    return train, val


def test_train_state_round_trip_and_checks():
    state = TrainState(global_step=7, tokens_seen=448, epoch=1, batch_in_epoch=3,
                       history={"step_losses": [1.0, 2.0], "lrs": [0.1, 0.1]}, grad_accum_steps=1,
                       loader_state={"seed": 0}, run_options={"lr": 0.1}, extra={"note": "hi"})
    d = state.to_dict()
    assert d["note"] == "hi" and d["cli_options"] == {"lr": 0.1} and d["global_step"] == 7
    back = TrainState.from_dict(d)
    assert back.to_dict() == d
    assert TrainState.from_dict(d, step=9).global_step == 9  # the checkpoint's own step wins
    for bad, match in [({**d, "epoch": -1}, "epoch"), ({**d, "tokens_seen": "x"}, "tokens_seen"),
                       ({**d, "history": []}, "history"), ({**d, "loader_state": [1]}, "loader_state"),
                       ({**d, "history": {**d["history"], "lrs": "abc"}}, "lrs"), ({"note": 1}, "training position")]:
        with pytest.raises(ValueError, match=match):
            TrainState.from_dict(bad)


def test_options_object_and_keywords_are_the_same(tmp_path):
    results = []
    for how in ("options", "keywords"):
        model = GPTModel(tiny(), seed=0)
        train, val = loaders()
        kw = dict(max_steps=3, grad_accum_steps=2, progress=False, log=None)
        if how == "options":
            h = train_model(model, train, val, SGD(model, lr=0.1), 1, 10, 1, options=TrainOptions(**kw))
        else:
            h = train_model(model, train, val, SGD(model, lr=0.1), 1, 10, 1, **kw)
        results.append(h["step_losses"])
    assert results[0] == results[1] and len(results[0]) == 3


def test_reduce_gradients_runs_once_a_step_between_backward_and_update():
    model = GPTModel(tiny(), seed=0)
    before = {n: backend.to_host(p.data).copy() for n, p in model.named_parameters()}
    train, val = loaders()
    calls = []

    def reduce(m):
        assert m is model
        assert all(p.grad is not None for p in m.parameters())  # every micro-batch's backward is done
        calls.append(1)
        for p in m.parameters():
            p.grad *= 0  # what the update then uses: no change at all

    train_model(model, train, val, SGD(model, lr=1.0), 1, 10, 1, max_steps=3, grad_accum_steps=2,
                reduce_gradients=reduce, progress=False, log=None)
    assert len(calls) == 3
    for n, p in model.named_parameters():
        np.testing.assert_array_equal(backend.to_host(p.data), before[n], err_msg=n)


def test_only_the_main_process_logs_evaluates_and_saves(tmp_path):
    model = GPTModel(tiny(), seed=0)
    train, val = loaders()
    messages = []
    h = train_model(model, train, val, SGD(model, lr=0.1), 1, 1, 1, start_context="x", max_steps=3,
                    checkpoint_path=str(tmp_path / "c.safetensors"), checkpoint_every=1,
                    is_main_process=False, progress=False, log=messages.append)
    assert messages == [] and list(tmp_path.iterdir()) == [] and h["val_losses"] == []
    assert h["global_step"] == 3 and len(h["step_losses"]) == 3


class LastTokenClassifier(Module):
    """A K-way readout of the last position's logits: (B, T) ids -> (B, K)."""

    def __init__(self, gpt, K):
        self.gpt, self.K = gpt, K

    def forward(self, idx):
        logits = self.gpt(idx)  # (B, T, V)
        self._logits_shape = logits.shape
        return logits[:, -1, :self.K]  # (B, K)

    def backward(self, dout):
        dlogits = backend.xp.zeros(self._logits_shape, dtype=dout.dtype)
        dlogits[:, -1, :self.K] = dout
        self.gpt.backward(dlogits)


class ClassificationData:
    """Sequences whose label is the parity of their first token: (B, T) ids, (B,) labels."""

    def __init__(self, n=32, B=8, T=6):
        rng = np.random.default_rng(1)
        self.x = rng.integers(0, 128, (n, T))
        self.y = self.x[:, 0] % 2
        self.B = B

    def __len__(self):
        return len(self.x) // self.B

    def __iter__(self):
        for i in range(len(self)):
            yield self.x[i * self.B:(i + 1) * self.B], self.y[i * self.B:(i + 1) * self.B]


def test_the_loop_trains_a_classifier_with_b_k_logits():
    from numpygpt.optim import AdamW

    backend.manual_seed(0)
    model = LastTokenClassifier(GPTModel(tiny(), seed=0), K=2)
    data = ClassificationData()
    h = train_model(model, data, data, AdamW(model, lr=3e-3), num_epochs=15, eval_freq=10, eval_iter=4,
                    progress=False, log=None)
    assert h["train_losses"][-1] < 0.5 * h["train_losses"][0]


def test_eval_mode_restores_each_module():
    model = GPTModel(tiny(drop_rate=0.1), seed=0).train()
    model.h[1].eval()  # a mixed state
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and not model.h[1].training and model.h[0].training
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError
    assert model.training and not model.h[1].training


def test_kv_cache_has_its_size_from_the_start():
    with pytest.raises(ValueError, match="max_length"):
        KVCache(0)
    cache = KVCache(4)
    k = np.zeros((1, 2, 3, 8))
    cache.append(k, k)
    with pytest.raises(ValueError, match="holds 4 positions"):
        cache.append(k, k)
    assert [c.max_length for c in GPTModel(tiny(), seed=0).new_kv_caches()] == [32, 32]
