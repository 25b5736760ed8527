"""The DPO loss op (numpygpt.nn.dpo): against a NumPy transcription of the book's
``compute_logprobs`` and ``compute_dpo_loss``, against centred differences in float64 (masked
prompt and padding positions, both reductions), stability, dtypes and bad input."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from numpygpt import backend
from numpygpt.gradcheck import check_gradients
from numpygpt.nn import no_grad
from numpygpt.nn.dpo import DPOLoss, sequence_logprobs
from conftest import assert_grads_ok, to_dev, to_host

F64 = "float64"


# -- the book's code, transcribed from PyTorch to NumPy -------------------------------------------

def book_log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def book_compute_logprobs(logits, labels, selection_mask):
    """The book's compute_logprobs: logits (B, L, V) and labels (B, L) of whole sequences."""
    labels = labels[:, 1:]
    logits = logits[:, :-1, :]
    log_probs = book_log_softmax(logits)
    selected = np.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    mask = selection_mask[:, 1:]
    selected = selected * mask
    return selected.sum(-1) / mask.sum(-1)


def book_compute_dpo_loss(model_c, model_r, ref_c, ref_r, beta=0.1):
    """The book's compute_dpo_loss (its rewards are not scaled by beta)."""
    logits = (model_c - model_r) - (ref_c - ref_r)
    losses = -np.log(1.0 / (1.0 + np.exp(-beta * logits)))  # -F.logsigmoid(beta * logits)
    chosen_rewards = model_c - ref_c
    rejected_rewards = model_r - ref_r
    return losses.mean(), chosen_rewards.mean(), rejected_rewards.mean()


def pairs(rng, B, L, V, prompt_max=3):
    """Whole sequences (B, L) for chosen and rejected, and the book's selection masks: the
    prompt (its first P tokens) and the padding (after n) masked, at least one token counted."""
    out = {}
    P = rng.integers(1, min(prompt_max, L - 1) + 1, B)  # (B,)
    for key in ("c", "r"):
        n = np.array([rng.integers(p + 1, L + 1) for p in P])  # (B,) at least one response token
        ids = rng.integers(0, V, (B, L))
        pos = np.arange(L)[None, :]
        out[key] = ids, (pos >= P[:, None]) & (pos < n[:, None])
    return out


def test_matches_the_books_compute_dpo_loss(device, rng):
    B, L, V, beta = 4, 7, 11, 0.1
    data = pairs(rng, B, L, V)
    logits = {k: rng.standard_normal((B, L, V)) * 2 for k in "cr"}
    ref_logits = {k: rng.standard_normal((B, L, V)) * 2 for k in "cr"}
    book = {k: book_compute_logprobs(logits[k], *data[k]) for k in "cr"}
    book_ref = {k: book_compute_logprobs(ref_logits[k], *data[k]) for k in "cr"}
    loss, chosen, rejected = book_compute_dpo_loss(book["c"], book["r"], book_ref["c"], book_ref["r"], beta)

    # ours: positions shifted once (target j is token j + 1), the mask over the targets
    args = {k: (to_dev(logits[k][:, :-1], F64), to_dev(data[k][0][:, 1:]), data[k][1][:, 1:]) for k in "cr"}
    ref = {k: sequence_logprobs(to_dev(ref_logits[k][:, :-1], F64), *args[k][1:]) for k in "cr"}
    np.testing.assert_allclose(to_host(ref["c"]), book_ref["c"], rtol=1e-12)
    out = DPOLoss(beta)(args["c"][0], args["r"][0], args["c"][1], args["r"][1], args["c"][2], args["r"][2],
                        ref["c"], ref["r"])
    np.testing.assert_allclose(float(out.loss), loss, rtol=1e-12)
    # our rewards are the paper's implicit rewards, beta * (logp - ref)
    np.testing.assert_allclose(float(out.chosen_rewards.mean()), beta * chosen, rtol=1e-12)
    np.testing.assert_allclose(float(out.rejected_rewards.mean()), beta * rejected, rtol=1e-12)
    np.testing.assert_allclose(to_host(out.margins), to_host(out.chosen_rewards - out.rejected_rewards))
    np.testing.assert_allclose(float(out.margins.mean()), beta * (chosen - rejected), rtol=1e-10)


def run_op(rng, B, T, V, reduction, beta=0.5):
    """A DPOLoss, its float64 inputs (masked prompt and padding positions) and references."""
    data = pairs(rng, B, T + 1, V)
    inputs = {f"logits_{k}": to_dev(rng.standard_normal((B, T, V)) * 2, F64) for k in "cr"}
    fixed = {"targets_c": to_dev(data["c"][0][:, 1:]), "targets_r": to_dev(data["r"][0][:, 1:]),
             "mask_c": data["c"][1][:, 1:], "mask_r": data["r"][1][:, 1:],
             "ref_c": to_dev(rng.standard_normal(B), F64), "ref_r": to_dev(rng.standard_normal(B), F64)}
    return DPOLoss(beta, reduction), inputs, fixed


@given(B=st.integers(1, 3), T=st.integers(2, 6), V=st.integers(2, 6), reduction=st.sampled_from(["mean", "sum"]),
       seed=st.integers(0, 2**16))
def test_gradient_check(device, B, T, V, reduction, seed):
    rng = np.random.default_rng(seed)
    op, inputs, fixed = run_op(rng, B, T, V, reduction)
    errors = check_gradients(lambda **kw: op(**kw, **fixed).loss, lambda dout: op.backward(dout), inputs, {},
                             max_coords=None)
    assert_grads_ok(errors)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_masked_positions_get_no_gradient(device, rng, reduction):
    op, inputs, fixed = run_op(rng, 3, 6, 5, reduction)
    op(**inputs, **fixed)
    for dlogits, mask in zip(op.backward(), (fixed["mask_c"], fixed["mask_r"])):
        g = to_host(dlogits)
        assert np.all(g[~mask] == 0.0)
        assert np.all(np.abs(g[mask]).sum(axis=-1) > 0)  # every counted position moves
        np.testing.assert_allclose(g.sum(axis=-1), 0.0, atol=1e-15)  # softmax minus one-hot


def test_stacked_backward_is_chosen_then_rejected(device, rng):
    op, inputs, fixed = run_op(rng, 2, 4, 5, "mean")
    op(**inputs, **fixed)
    stacked = to_host(op.backward_stacked(0.7)).copy()
    op(**inputs, **fixed)
    dc, dr = op.backward(0.7)
    np.testing.assert_array_equal(stacked, np.concatenate([to_host(dc), to_host(dr)]))


def test_reference_equal_to_policy_gives_log_2(device, rng):
    """Policy = reference: every margin is 0 and the loss is log 2; the gradient pushes the
    chosen response up (its targets' logits rise) and the rejected one down."""
    op, inputs, fixed = run_op(rng, 3, 5, 7, "sum")
    with no_grad():
        fixed["ref_c"] = sequence_logprobs(inputs["logits_c"], fixed["targets_c"], fixed["mask_c"], "sum")
        fixed["ref_r"] = sequence_logprobs(inputs["logits_r"], fixed["targets_r"], fixed["mask_r"], "sum")
    out = op(**inputs, **fixed)
    np.testing.assert_allclose(to_host(out.margins), 0.0, atol=1e-12)
    np.testing.assert_allclose(float(out.loss), np.log(2.0), rtol=1e-12)
    dc, dr = op.backward()
    take = lambda d, t: np.take_along_axis(to_host(d), to_host(t)[..., None], -1)[..., 0]  # noqa: E731
    assert np.all(take(dc, fixed["targets_c"])[fixed["mask_c"]] < 0)  # descent raises the chosen target
    assert np.all(take(dr, fixed["targets_r"])[fixed["mask_r"]] > 0)


def test_float32_kept_and_huge_margins_stay_finite(device, rng):
    op, inputs, fixed = run_op(rng, 2, 4, 6, "sum", beta=50.0)
    inputs = {k: (v * 1e3).astype("float32") for k, v in inputs.items()}
    out = op(**inputs, **fixed)
    assert all(a.dtype == np.float32 for a in out)
    assert np.all(np.abs(to_host(out.margins)) > 1e3)  # far beyond exp's range in float32
    assert np.isfinite(float(out.loss))
    for d in op.backward():
        assert d.dtype == np.float32 and np.all(np.isfinite(to_host(d)))


def test_bad_input(device, rng):
    for beta in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta must be"):
            DPOLoss(beta)
    with pytest.raises(ValueError, match="reduction must be"):
        DPOLoss(0.1, "max")
    op, inputs, fixed = run_op(rng, 2, 4, 5, "mean")
    empty = fixed["mask_r"].copy()
    empty[1] = False
    with pytest.raises(ValueError, match="rejected sequence 1 has no response token"):
        op(**inputs, **{**fixed, "mask_r": empty})
    bad = to_host(fixed["targets_c"]).copy()
    bad[fixed["mask_c"]] = 99
    with pytest.raises(ValueError, match=r"chosen target ids must be in \[0, 5\)"):
        op(**inputs, **{**fixed, "targets_c": bad})
    with pytest.raises(ValueError, match="same shape"):
        op(inputs["logits_c"], inputs["logits_r"][:, :-1], **fixed)
    with pytest.raises(RuntimeError, match="without a cached forward"):
        DPOLoss().backward()


def test_masked_targets_may_be_anything(device, rng):
    """Targets under the mask are never read: ignore_index there changes nothing."""
    op, inputs, fixed = run_op(rng, 2, 5, 6, "mean")
    before = float(op(**inputs, **fixed).loss)
    targets = to_host(fixed["targets_c"]).copy()
    targets[~fixed["mask_c"]] = -100
    assert float(op(**inputs, **{**fixed, "targets_c": targets}).loss) == before
    assert backend.get_device() == device
