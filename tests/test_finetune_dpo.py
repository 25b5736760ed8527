"""DPO's objective for the training loop: the whole-model gradient check through the DPO loss,
the concatenated chosen/rejected batch against separate forwards, the reference run once per
batch without gradients, the metrics, and an end-to-end run on pairs a tiny model can learn."""

import copy

import numpy as np
import pytest

from numpygpt import GPTConfig, GPTModel, backend, no_grad
from numpygpt.data import DataLoader
from numpygpt.finetune.dpo import DPOObjective, dpo_metrics_hook, evaluate_dpo
from numpygpt.finetune.dpo_data import PreferencePair, collate_preferences
from numpygpt.gradcheck import check_gradients
from numpygpt.nn.dpo import DPOLoss, sequence_logprobs
from numpygpt.optim import AdamW
from numpygpt.train import train_model
from conftest import assert_grads_ok, to_host

V = 16


def collate(pairs):
    return collate_preferences(pairs, pad_id=0)  # the tiny vocabulary's padding


def make_pairs(rng, n, learnable=True):
    """A prompt of tokens 1-7; the chosen response uses tokens 8-11, the rejected one 12-15
    (``learnable=False``: both draw from 8-15)."""
    pairs = []
    for _ in range(n):
        prompt = [1] + rng.integers(2, 8, rng.integers(2, 5)).tolist()
        chosen = rng.integers(8, 12 if learnable else 16, rng.integers(1, 4)).tolist()
        rejected = rng.integers(8 if not learnable else 12, 16, rng.integers(1, 4)).tolist()
        pairs.append(PreferencePair(np.array(prompt + chosen), np.array(prompt + rejected), len(prompt)))
    return pairs


def tiny(seed, dtype="float64", drop_rate=0.0, scale=None):
    cfg = GPTConfig(vocab_size=V, context_length=16, emb_dim=8, n_heads=2, n_layers=2, drop_rate=drop_rate,
                    qkv_bias=True, dtype=dtype)
    model = GPTModel(cfg, seed=seed)
    if scale is not None:  # weights far from zero, so every gradient is exercised
        rng = np.random.default_rng(seed)
        for p in model.parameters():
            p.data = backend.to_device(rng.standard_normal(p.shape) * scale, dtype=dtype)
    return model


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_whole_model_gradient_check(device, rng, reduction):
    policy, reference = tiny(0, drop_rate=0.2, scale=0.3), tiny(1, scale=0.3)
    objective = DPOObjective(reference, beta=0.5, reduction=reduction)
    batch = collate(make_pairs(rng, 3))

    def backward(dloss):
        objective.backward(policy, float(dloss))
        return ()

    errors = check_gradients(lambda: objective.loss(policy, batch), backward, {}, dict(policy.named_parameters()),
                             dout=1.0, eps=1e-5, max_coords=15, before_forward=lambda: backend.manual_seed(0))
    assert len(errors) == len(policy.parameters())
    assert_grads_ok(errors)
    assert all(p.grad is None for p in reference.parameters())  # the reference never trains


def test_one_batch_of_both_halves_is_two_forwards(device, rng):
    policy, reference = tiny(0, scale=0.3), tiny(1, scale=0.3)
    batch = collate(make_pairs(rng, 4))
    objective = DPOObjective(reference, beta=0.1)
    loss = float(objective.loss(policy, batch))
    with no_grad():
        logp = {k: sequence_logprobs(policy(batch[k]), batch[k + "_targets"], batch[k + "_mask"])
                for k in ("chosen", "rejected")}
        ref = {k: sequence_logprobs(reference(batch[k]), batch[k + "_targets"], batch[k + "_mask"])
               for k in ("chosen", "rejected")}
        out = DPOLoss(0.1)(policy(batch["chosen"]), policy(batch["rejected"]), batch["chosen_targets"],
                           batch["rejected_targets"], batch["chosen_mask"], batch["rejected_mask"],
                           ref["chosen"], ref["rejected"])
    np.testing.assert_allclose(loss, float(out.loss), rtol=1e-12)
    expected_margin = 0.1 * ((to_host(logp["chosen"]) - to_host(logp["rejected"]))
                             - (to_host(ref["chosen"]) - to_host(ref["rejected"])))
    with no_grad():
        objective.loss(policy, batch)
    np.testing.assert_allclose(to_host(objective.measured(policy, batch).margins), expected_margin, rtol=1e-10)
    assert objective.count(batch) == 2 * batch["chosen"].size


def test_the_policy_at_the_start_has_zero_margins_and_log_2(device, rng):
    policy = tiny(0, scale=0.3)
    objective = DPOObjective(copy.deepcopy(policy), beta=0.1)
    loader = DataLoader(make_pairs(rng, 6), 3, shuffle=False, collate_fn=collate)
    m = evaluate_dpo(policy, objective, loader)
    assert m["loss"] == pytest.approx(np.log(2.0), rel=1e-12)
    assert m["margin"] == m["chosen_reward"] == m["rejected_reward"] == 0.0 and m["reward_accuracy"] == 0.0


class CountingModel:
    """A model that counts its forward passes."""

    def __init__(self, model):
        self.model, self.calls, self.cfg = model, 0, model.cfg

    def __call__(self, idx):
        self.calls += 1
        return self.model(idx)

    def __getattr__(self, name):
        return getattr(self.model, name)


def test_metrics_hook_reuses_the_loops_evaluation(device, rng):
    """The hook's numbers are a fresh evaluation's, read from what the loop's evaluation measured
    (neither model runs again); the frozen reference runs once per batch, ever."""
    from numpygpt.train import evaluate_model

    policy, reference = CountingModel(tiny(0, scale=0.3)), CountingModel(tiny(1, scale=0.3))
    objective = DPOObjective(reference, beta=0.1)
    train = DataLoader(make_pairs(rng, 8, False), 2, shuffle=True, seed=3, collate_fn=collate)
    val = DataLoader(make_pairs(rng, 5, False), 2, shuffle=False, drop_last=False, collate_fn=collate)
    evaluate_model(policy, train, val, 3, objective)
    assert policy.calls == reference.calls == 6  # three training and three validation batches, once each
    said = []
    metrics = dpo_metrics_hook(objective, train, val, 3)(policy, None, said.append)
    assert policy.calls == reference.calls == 6 and len(said) == 2
    fresh_train, fresh_val = evaluate_dpo(policy, objective, train, 3), evaluate_dpo(policy, objective, val, 3)
    assert policy.calls == 12 and reference.calls == 6
    for split, fresh in (("train", fresh_train), ("val", fresh_val)):
        assert metrics[f"{split}_margins"] == pytest.approx(fresh["margin"], rel=1e-12)
        assert metrics[f"{split}_reward_accs"] == fresh["reward_accuracy"]
        assert metrics[f"{split}_chosen_rewards"] == pytest.approx(fresh["chosen_reward"], rel=1e-12)
    assert 0 < fresh_val["reward_accuracy"] < 1  # a real mix: the check above could fail
    # a batch that differs only in a target the mask counts is another batch
    batch = collate(make_pairs(rng, 2, False))
    other = {**batch, "chosen_targets": batch["chosen_targets"].copy()}
    row, col = np.argwhere(batch["chosen_mask"])[-1]
    other["chosen_targets"][row, col] = (other["chosen_targets"][row, col] + 1) % V
    with no_grad():
        assert float(objective.loss(policy, batch)) != float(objective.loss(policy, other))
    assert reference.calls == 8


def test_a_reference_with_another_vocabulary_is_refused(device, rng):
    other = GPTModel(GPTConfig(vocab_size=V + 1, context_length=16, emb_dim=8, n_heads=2, n_layers=1,
                               dtype="float64"), seed=0)
    with pytest.raises(ValueError, match=r"reference model's vocabulary \(17 tokens\) is not the policy's \(16\)"):
        DPOObjective(other).loss(tiny(0), collate(make_pairs(rng, 2)))


def test_end_to_end_reward_accuracy_rises(device):
    """A tiny model tuned on pairs whose chosen responses use other tokens than the rejected
    ones ranks held-out pairs right far above chance (0.5)."""
    rng = np.random.default_rng(0)
    policy = tiny(0, dtype="float32")
    objective = DPOObjective(copy.deepcopy(policy), beta=0.5)
    train = DataLoader(make_pairs(rng, 64), 8, shuffle=True, seed=1, collate_fn=collate)
    val = DataLoader(make_pairs(rng, 16), 8, shuffle=False, drop_last=False, collate_fn=collate)
    held_out = DataLoader(make_pairs(rng, 32), 8, shuffle=False, collate_fn=collate)
    before = evaluate_dpo(policy, objective, held_out)
    optimizer = AdamW(list(policy.named_parameters()), lr=3e-3, weight_decay=0.01)
    history = train_model(policy, train, val, optimizer, num_epochs=5, eval_freq=10, eval_iter=2, progress=False,
                          log=None, objective=objective, on_evaluate=dpo_metrics_hook(objective, train, val, 2))
    after = evaluate_dpo(policy, objective, held_out)
    assert before["reward_accuracy"] == 0.0 and before["loss"] == pytest.approx(np.log(2), rel=1e-6)
    assert after["reward_accuracy"] >= 0.9, after
    assert after["margin"] > 0.5 and after["loss"] < 0.5
    assert history["val_reward_accs"][-1] >= 0.9 and len(history["val_margins"]) == len(history["track_steps"])
    assert history["train_losses"][-1] < history["train_losses"][0]
