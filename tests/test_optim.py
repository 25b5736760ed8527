"""Optimisers, clipping and the schedule against hand-computed references.

The references below are written in plain Python scalar math, one element at a time,
straight from the published update rules, so they share no code with numpygpt.optim.
"""

import copy
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from numpygpt import backend
from numpygpt.nn.module import Module, Parameter
from numpygpt.optim import SGD, AdamW, CosineWithWarmup, clip_grad_norm, param_groups


# -- references -------------------------------------------------------------------------

def ref_adamw(p0, grads, lrs, b1, b2, eps, wd):
    """AdamW on a list of floats; grads[t] is the gradient list at step t+1."""
    p = list(p0)
    m = [0.0] * len(p)
    v = [0.0] * len(p)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        for i in range(len(p)):
            p[i] = p[i] - lr * wd * p[i]
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i]
            m_hat = m[i] / (1 - b1**t)
            v_hat = v[i] / (1 - b2**t)
            p[i] = p[i] - lr * m_hat / (math.sqrt(v_hat) + eps)
    return p


def ref_sgd(p0, grads, lr, momentum, wd):
    p = list(p0)
    buf = None
    for g in grads:
        d = [g[i] + wd * p[i] for i in range(len(p))]
        if momentum:
            buf = d if buf is None else [momentum * buf[i] + d[i] for i in range(len(p))]
            d = buf
        p = [p[i] - lr * d[i] for i in range(len(p))]
    return p


def param(values, dtype=np.float64, shape=None):
    a = np.array(values, dtype=dtype)
    return Parameter(a.reshape(shape) if shape else a)


def set_grad(p, values):
    p.grad = np.array(values, dtype=p.data.dtype).reshape(p.data.shape)


# -- AdamW ----------------------------------------------------------------------------------

def test_adamw_matches_hand_computed_update_with_decay_and_bias_correction():
    W0 = [0.5, -1.25, 2.0, 0.1]
    b0 = [0.3, -0.7, 1.1]
    gW = [[0.1, -0.2, 0.3, 0.0], [-0.5, 0.25, 0.05, 1.0], [0.02, 0.4, -0.6, -0.3]]
    gb = [[1.0, -2.0, 0.5], [0.3, 0.3, -0.1], [-0.2, 0.9, 0.0]]
    lrs = [0.01, 0.02, 0.005]  # the schedule changes lr between steps
    b1, b2, eps, wd = 0.9, 0.95, 1e-8, 0.1

    W, b = param(W0, shape=(2, 2)), param(b0)
    opt = AdamW(
        [{"params": [W], "weight_decay": wd}, {"params": [b], "weight_decay": 0.0}],
        lr=lrs[0], betas=(b1, b2), eps=eps,
    )
    for t in range(3):
        opt.lr = lrs[t]
        set_grad(W, gW[t])
        set_grad(b, gb[t])
        opt.step()

    np.testing.assert_allclose(W.data.ravel(), ref_adamw(W0, gW, lrs, b1, b2, eps, wd), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(b.data, ref_adamw(b0, gb, lrs, b1, b2, eps, 0.0), rtol=1e-12, atol=1e-15)
    # and the decay made a difference (the test would notice it missing)
    assert not np.allclose(W.data.ravel(), ref_adamw(W0, gW, lrs, b1, b2, eps, 0.0), rtol=1e-9)
    assert opt.step_count == 3 and opt.state["0"]["step"] == 3


def test_adamw_decay_only_touches_the_decayed_group():
    # zero gradients: Adam's step is 0 / (0 + eps) = 0, so only decay can move a parameter
    W, b = param([1.0, -2.0, 3.0, 4.0], shape=(2, 2)), param([1.0, -2.0])
    opt = AdamW([{"params": [W]}, {"params": [b], "weight_decay": 0.0}], lr=0.1, weight_decay=0.5)
    for _ in range(2):
        set_grad(W, [0.0] * 4)
        set_grad(b, [0.0] * 2)
        opt.step()
    np.testing.assert_array_equal(b.data, [1.0, -2.0])
    np.testing.assert_allclose(W.data.ravel(), np.array([1.0, -2.0, 3.0, 4.0]) * (1 - 0.1 * 0.5) ** 2, rtol=1e-15)


@settings(max_examples=40, deadline=None)
@given(
    lr=st.floats(1e-4, 1e-1),
    b1=st.floats(0.0, 0.99),
    b2=st.floats(0.5, 0.9999),
    eps=st.sampled_from([1e-8, 1e-6, 1e-3]),
    wd=st.floats(0.0, 0.5),
    grads=st.lists(st.lists(st.floats(-10, 10), min_size=3, max_size=3), min_size=1, max_size=5),
)
def test_adamw_matches_reference_for_any_hyperparameters(lr, b1, b2, eps, wd, grads):
    p0 = [0.7, -0.3, 1.5]
    p = param(p0)
    opt = AdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    for g in grads:
        set_grad(p, g)
        opt.step()
    np.testing.assert_allclose(p.data, ref_adamw(p0, grads, [lr] * len(grads), b1, b2, eps, wd), rtol=1e-10, atol=1e-12)


def test_adamw_bias_correction_counts_steps_per_parameter():
    # a parameter without a gradient at step 1 gets its first update at step 2 with t = 1
    late, fresh = param([0.5, -0.5]), param([0.5, -0.5])
    other = param([1.0])
    opt = AdamW([late, other], lr=0.1)
    set_grad(other, [1.0])
    opt.step()  # late.grad is None: skipped, no state
    assert "0" not in opt.state
    set_grad(late, [0.3, -0.2])
    opt.step()
    ref = AdamW([fresh], lr=0.1)
    set_grad(fresh, [0.3, -0.2])
    ref.step()
    np.testing.assert_array_equal(late.data, fresh.data)


@pytest.mark.parametrize("size", [6, 3 * (1 << 16) + 6])  # the whole-array path and the chunked one
def test_adamw_flushes_moments_before_they_decay_to_subnormals(size):
    # a float32 parameter whose gradient stopped: its moments shrink by b1 and b2 each
    # step; every FLUSH_EVERY steps those under finfo.tiny / finfo.eps (~1e-31) become 0
    p = Parameter(np.zeros(size, dtype=np.float32))
    opt = AdamW([p], lr=1e-3, weight_decay=0.0)
    p.grad = np.zeros(size, dtype=np.float32)
    opt.step()
    state = opt.state["0"]
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m[:6] = [1e-35, -1e-35, 1e-27, -1e-20, 2e-38, 0.5]
    v[:6] = [1e-35, 1e-35, 1e-29, 1e-20, 2e-38, 0.5]
    threshold = np.finfo(np.float32).tiny / np.finfo(np.float32).eps
    for step in range(2, AdamW.FLUSH_EVERY):
        opt.step()
    assert state["step"] == AdamW.FLUSH_EVERY - 1
    assert np.count_nonzero(m[:6]) == 6  # not yet: 2e-38 * 0.9^48 is subnormal by now
    assert 0 < abs(m[4]) < np.finfo(np.float32).tiny
    before_m, before_v = m[:6].copy(), v[:6].copy()
    opt.step()  # step FLUSH_EVERY: update, then flush
    expect_m = before_m * np.float32(0.9)
    expect_v = before_v * np.float32(0.999)
    expect_m[np.abs(expect_m) < threshold] = 0
    expect_v[expect_v < threshold] = 0
    np.testing.assert_allclose(m[:6], expect_m, rtol=1e-6, atol=0)
    np.testing.assert_allclose(v[:6], expect_v, rtol=1e-6, atol=0)
    assert list(m[:6] == 0) == [True, True, False, False, True, False]
    assert list(v[:6] == 0) == [True, True, False, False, True, False]
    assert not np.any((m != 0) & (np.abs(m) < np.finfo(np.float32).tiny))  # no subnormal left


# -- SGD --------------------------------------------------------------------------------------

@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 0.0), (0.9, 0.01), (0.0, 0.1)])
def test_sgd_matches_hand_computed_update(momentum, wd):
    p0 = [1.0, -2.0, 0.5]
    grads = [[0.1, 0.2, -0.3], [0.5, -0.5, 0.0], [-1.0, 0.25, 2.0], [0.0, 0.0, 0.1]]
    p = param(p0)
    opt = SGD([p], lr=0.1, momentum=momentum, weight_decay=wd)
    for g in grads:
        set_grad(p, g)
        opt.step()
        assert p.grad.tolist() == g  # the optimiser never changes the gradient
    np.testing.assert_allclose(p.data, ref_sgd(p0, grads, 0.1, momentum, wd), rtol=1e-13, atol=1e-15)


def test_sgd_momentum_by_hand():
    # p=1, g=1 each step, lr=0.1, momentum=0.5: buf = 1, 1.5, 1.75 -> p = 0.9, 0.75, 0.575
    p = param([1.0])
    opt = SGD([p], lr=0.1, momentum=0.5)
    expected = [0.9, 0.75, 0.575]
    for want in expected:
        set_grad(p, [1.0])
        opt.step()
        assert p.data[0] == pytest.approx(want, abs=1e-15)


# -- skipping and dtypes --------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda ps: AdamW(ps, lr=0.1), lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1)])
def test_frozen_and_gradless_parameters_are_skipped(make):
    frozen = param([1.0, 2.0])
    frozen.requires_grad = False
    set_grad(frozen, [5.0, 5.0])  # a stale gradient on a frozen parameter
    gradless = param([3.0, 4.0])
    live = param([1.0, 1.0])
    opt = make([frozen, gradless, live])
    set_grad(live, [1.0, -1.0])
    for _ in range(3):
        opt.step()
    np.testing.assert_array_equal(frozen.data, [1.0, 2.0])
    np.testing.assert_array_equal(gradless.data, [3.0, 4.0])
    assert not np.array_equal(live.data, [1.0, 1.0])
    assert set(opt.state) == {"2"}


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.1),
        lambda ps: SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.1),
    ],
)
def test_float32_stays_float32(make):
    rng = np.random.default_rng(0)
    W = Parameter(rng.standard_normal((4, 3)).astype(np.float32))
    b = Parameter(rng.standard_normal(3).astype(np.float32))
    W64, b64 = Parameter(W.data.astype(np.float64)), Parameter(b.data.astype(np.float64))
    opt, opt64 = make([W, b]), make([W64, b64])
    for _ in range(4):
        for p, p64 in ((W, W64), (b, b64)):
            g = rng.standard_normal(p.shape).astype(np.float32)
            p.grad, p64.grad = g, g.astype(np.float64)
        opt.step()
        opt64.step()
        opt.lr = opt64.lr = opt.lr * 0.5  # a Python float set from outside
    for p, p64 in ((W, W64), (b, b64)):
        assert p.data.dtype == np.float32
        np.testing.assert_allclose(p.data, p64.data, rtol=1e-5, atol=1e-6)
    for st_ in opt.state.values():
        for k, a in st_.items():
            if k != "step":
                assert a.dtype == np.float32, k


def test_zero_grad_and_lr_setter():
    a, b = param([1.0]), param([2.0])
    opt = AdamW([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.2}])
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.2]
    assert opt.lr == 0.1
    opt.lr = 0.05
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.05]
    set_grad(a, [1.0])
    opt.zero_grad()
    assert a.grad is None and b.grad is None


def test_bad_arguments_fail_loudly():
    p = param([1.0])
    with pytest.raises(ValueError, match="empty"):
        AdamW([])
    with pytest.raises(ValueError, match="more than once"):
        AdamW([p, p])
    with pytest.raises(ValueError, match="weight_deacy"):
        AdamW([{"params": [p], "weight_deacy": 0.1}])
    with pytest.raises(ValueError, match="betas"):
        AdamW([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        SGD([p], lr=-1.0)


# -- parameter groups ----------------------------------------------------------------------

def gpt2_like_named_params(tied=True):
    shapes = {
        "wte.weight": (10, 4),
        "wpe.weight": (8, 4),
        "h.0.ln_1.weight": (4,),
        "h.0.ln_1.bias": (4,),
        "h.0.attn.c_attn.weight": (4, 12),
        "h.0.attn.c_attn.bias": (12,),
        "h.0.attn.c_proj.weight": (4, 4),
        "h.0.attn.c_proj.bias": (4,),
        "h.0.ln_2.weight": (4,),
        "h.0.ln_2.bias": (4,),
        "h.0.mlp.c_fc.weight": (4, 16),
        "h.0.mlp.c_fc.bias": (16,),
        "h.0.mlp.c_proj.weight": (16, 4),
        "h.0.mlp.c_proj.bias": (4,),
        "ln_f.weight": (4,),
        "ln_f.bias": (4,),
    }
    if not tied:
        shapes["lm_head.weight"] = (10, 4)
    return [(n, Parameter(np.zeros(s))) for n, s in shapes.items()]


def test_param_groups_split_like_gpt2():
    named = gpt2_like_named_params(tied=False)
    decay, keep = param_groups(named, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and keep["weight_decay"] == 0.0
    assert [n for n, _ in decay["params"]] == [
        "h.0.attn.c_attn.weight",
        "h.0.attn.c_proj.weight",
        "h.0.mlp.c_fc.weight",
        "h.0.mlp.c_proj.weight",
        "lm_head.weight",
    ]
    kept = {n for n, _ in keep["params"]}
    assert {"wte.weight", "wpe.weight", "ln_f.weight", "h.0.ln_1.bias", "h.0.attn.c_attn.bias"} <= kept
    assert len(decay["params"]) + len(keep["params"]) == len(named)

    decay_e, _ = param_groups(named, weight_decay=0.1, decay_embeddings=True)
    assert {"wte.weight", "wpe.weight"} <= {n for n, _ in decay_e["params"]}

    # works with a Module and feeds straight into AdamW with names as state keys
    class Tiny(Module):
        def __init__(self):
            self.wte = Parameter(np.zeros((3, 2)))
            self.proj = Parameter(np.zeros((2, 2)))

    groups = param_groups(Tiny(), weight_decay=0.1)
    opt = AdamW(groups, lr=0.1)
    assert opt.param_groups[0]["names"] == ["proj"] and opt.param_groups[1]["names"] == ["wte"]


# -- gradient clipping ---------------------------------------------------------------------

@pytest.mark.parametrize("max_norm", [6.5, 12.0])
def test_clip_grad_norm_scales_large_gradients(max_norm):
    a, b, c = param([0.0, 0.0]), param([0.0]), param([9.0])
    set_grad(a, [3.0, 4.0])
    set_grad(b, [12.0])  # global norm sqrt(9 + 16 + 144) = 13; c has no gradient
    norm = clip_grad_norm([a, b, c], max_norm=max_norm)
    assert isinstance(norm, float) and norm == pytest.approx(13.0, rel=1e-12)
    coef = max_norm / (13.0 + 1e-6)
    np.testing.assert_allclose(a.grad, [3.0 * coef, 4.0 * coef], rtol=1e-12)
    np.testing.assert_allclose(b.grad, [12.0 * coef], rtol=1e-12)
    assert math.sqrt(float((a.grad**2).sum() + (b.grad**2).sum())) == pytest.approx(max_norm, rel=1e-6)
    assert c.grad is None


def test_clip_grad_norm_leaves_small_gradients_alone():
    a = param([0.0, 0.0], dtype=np.float32)
    set_grad(a, [0.3, 0.4])
    before = a.grad.copy()
    norm = clip_grad_norm([("x", a)], max_norm=1.0)
    assert norm == pytest.approx(0.5, rel=1e-6)
    np.testing.assert_array_equal(a.grad, before)
    assert a.grad.dtype == np.float32
    assert clip_grad_norm([param([1.0])], 1.0) == 0.0  # no gradients at all


def test_clip_grad_norm_keeps_float32():
    a = param([0.0, 0.0], dtype=np.float32)
    set_grad(a, [30.0, 40.0])
    assert clip_grad_norm([a], 1.0) == pytest.approx(50.0, rel=1e-6)
    assert a.grad.dtype == np.float32
    assert float(np.linalg.norm(a.grad)) == pytest.approx(1.0, rel=1e-5)


# -- schedule ---------------------------------------------------------------------------------

def test_cosine_with_warmup_values():
    s = CosineWithWarmup(peak_lr=1e-3, total_steps=110, warmup_steps=10, min_lr=1e-5, initial_lr=1e-6)
    assert s(0) == pytest.approx(1e-6)  # warmup start
    assert s(5) == pytest.approx((1e-6 + 1e-3) / 2)  # halfway through warmup
    assert s(10) == pytest.approx(1e-3)  # warmup end: peak
    assert s(60) == pytest.approx((1e-3 + 1e-5) / 2)  # cosine midpoint
    assert s(35) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert s(110) == pytest.approx(1e-5)  # end
    assert s(500) == 1e-5  # after the end
    assert s.lr_at(60) == s(60)
    lrs = [s(t) for t in range(10, 111)]
    assert all(x >= y for x, y in zip(lrs, lrs[1:]))  # decays monotonically


def test_cosine_without_warmup_and_bad_arguments():
    s = CosineWithWarmup(peak_lr=0.1, total_steps=4, warmup_steps=0)
    assert [s(t) for t in range(5)] == pytest.approx([0.1, 0.1 * (1 + math.cos(math.pi / 4)) / 2, 0.05,
                                                      0.1 * (1 + math.cos(3 * math.pi / 4)) / 2, 0.0])
    with pytest.raises(ValueError):
        CosineWithWarmup(peak_lr=0.1, total_steps=5, warmup_steps=10)
    with pytest.raises(ValueError):
        s(-1)


# -- state dict ------------------------------------------------------------------------------

def _grads_for(named, step):
    rng = np.random.default_rng(1000 + step)
    return {n: rng.standard_normal(p.shape) for n, p in named}


def _clone(named):
    return [(n, Parameter(p.data.copy())) for n, p in named]


@pytest.mark.parametrize(
    "make",
    [
        lambda named: AdamW(param_groups(named, 0.1), lr=3e-3, betas=(0.8, 0.9)),
        lambda named: SGD(param_groups(named, 0.01), lr=0.05, momentum=0.9),
    ],
)
def test_state_dict_round_trip_continues_identically(make):
    rng = np.random.default_rng(0)
    named = [(n, Parameter(rng.standard_normal(p.shape))) for n, p in gpt2_like_named_params()]
    opt = make(named)
    for step in range(3):
        for n, p in named:
            p.grad = _grads_for(named, step)[n]
        opt.lr = opt.lr * 0.9
        opt.step()
        opt.zero_grad()

    sd = opt.state_dict()
    # what a checkpoint does: arrays go to safetensors, everything else to JSON
    saved = {"hyper": json.loads(json.dumps(sd["hyper"])), "tensors": copy.deepcopy(sd["tensors"])}
    assert all(isinstance(a, np.ndarray) for a in saved["tensors"].values())
    slot = type(opt).slots[0]
    assert f"h.0.attn.c_attn.weight.{slot}" in saved["tensors"]

    named2 = _clone(named)
    restored = make(named2)
    restored.lr = 123.0  # overwritten by the load
    restored.load_state_dict(saved)
    assert restored.lr == opt.lr and restored.step_count == 3

    for step in range(3, 6):
        for (n, p), (_, p2) in zip(named, named2):
            p.grad = _grads_for(named, step)[n]
            p2.grad = p.grad.copy()
        opt.step()
        restored.step()
    for (n, p), (_, p2) in zip(named, named2):
        np.testing.assert_array_equal(p.data, p2.data, err_msg=n)
    # the restored state never aliased the saved arrays
    for k, a in saved["tensors"].items():
        assert not np.shares_memory(a, restored.state[k.rsplit(".", 1)[0]][k.rsplit(".", 1)[1]])


def test_state_dict_names_unnamed_parameters_by_index():
    a, b = param([1.0, 2.0]), param([3.0])
    opt = AdamW([a, b], lr=0.1)
    set_grad(b, [1.0])
    opt.step()
    sd = opt.state_dict()
    assert set(sd["tensors"]) == {"1.exp_avg", "1.exp_avg_sq"}
    assert sd["hyper"]["groups"][0]["params"] == ["0", "1"]
    assert sd["hyper"]["param_steps"] == {"1": 1}


def test_load_state_dict_rejects_mismatches_and_changes_nothing():
    W, b = param([1.0] * 6, shape=(2, 3)), param([1.0, 2.0, 3.0])
    opt = AdamW([("W", W), ("b", b)], lr=0.1)
    set_grad(W, [0.5] * 6)
    set_grad(b, [0.1, 0.2, 0.3])
    opt.step()
    good = opt.state_dict()
    good = {"hyper": json.loads(json.dumps(good["hyper"])), "tensors": copy.deepcopy(good["tensors"])}
    before = {k: v.copy() for k, v in opt.state_dict()["tensors"].items()}

    bad = copy.deepcopy(good)
    bad["tensors"]["W.exp_avg_sq"] = np.zeros((3, 2))
    bad["hyper"]["groups"][0]["lr"] = 9.0
    with pytest.raises(ValueError, match=r"W\.exp_avg_sq"):
        opt.load_state_dict(bad)
    assert opt.lr == 0.1
    for k, v in opt.state_dict()["tensors"].items():
        np.testing.assert_array_equal(v, before[k])

    bad = copy.deepcopy(good)
    del bad["tensors"]["b.exp_avg"]
    with pytest.raises(ValueError, match=r"b\.exp_avg"):
        opt.load_state_dict(bad)

    bad = copy.deepcopy(good)
    bad["tensors"]["nope.exp_avg"] = np.zeros(3)
    with pytest.raises(ValueError, match="nope"):
        opt.load_state_dict(bad)

    with pytest.raises(ValueError, match="AdamW"):
        SGD([("W", W), ("b", b)], lr=0.1).load_state_dict(good)

    other = AdamW([("W", W)], lr=0.1)
    with pytest.raises(ValueError, match="b"):
        other.load_state_dict(good)

    opt.load_state_dict(good)  # the unmodified one still loads


# -- independent implementations, where available ---------------------------------------------

def adamw_reference(W0, grads, lr, betas, eps, weight_decay):
    """AdamW as PyTorch's documentation states the algorithm (torch.optim.AdamW, amsgrad
    off, maximize off), one line per line of it, in float64:
        theta <- theta - lr * lambda * theta                (decoupled weight decay)
        m <- beta1 m + (1 - beta1) g;   v <- beta2 v + (1 - beta2) g^2
        m_hat = m / (1 - beta1^t);     v_hat = v / (1 - beta2^t)
        theta <- theta - lr * m_hat / (sqrt(v_hat) + eps)
    """
    b1, b2 = betas
    theta, m, v = W0.copy(), np.zeros_like(W0), np.zeros_like(W0)
    for t, g in enumerate(grads, start=1):
        theta = theta - lr * weight_decay * theta
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** t)
        v_hat = v / (1 - b2 ** t)
        theta = theta - lr * m_hat / (np.sqrt(v_hat) + eps)
    return theta


def test_adamw_matches_the_documented_algorithm():
    rng = np.random.default_rng(0)
    W0 = rng.standard_normal((5, 3))
    grads = [rng.standard_normal((5, 3)) for _ in range(5)]
    W = Parameter(W0.copy())
    opt = AdamW([W], lr=1e-2, betas=(0.9, 0.98), eps=1e-7, weight_decay=0.1)
    for g in grads:
        W.grad = g.copy()
        opt.step()
    expected = adamw_reference(W0, grads, lr=1e-2, betas=(0.9, 0.98), eps=1e-7, weight_decay=0.1)
    np.testing.assert_allclose(W.data, expected, rtol=1e-12, atol=1e-14)
    assert not np.allclose(W.data, W0, atol=1e-3)  # five steps of lr 1e-2 moved every weight


@pytest.mark.cuda
def test_optimisers_and_clipping_on_cupy_match_numpy():
    if not backend.cuda_available():
        pytest.skip("needs CuPy and a CUDA device")
    import cupy

    rng = np.random.default_rng(0)
    shapes = [(64, 32), (32,), (7, 5, 3)]
    for make in (lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.1), lambda ps: SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.1)):
        host = [Parameter(rng.standard_normal(s).astype(np.float32)) for s in shapes]
        dev = [Parameter(cupy.asarray(p.data)) for p in host]
        opt_h, opt_d = make(host), make(dev)
        for _ in range(3):
            for ph, pd in zip(host, dev):
                ph.grad = (rng.standard_normal(ph.shape) * 10).astype(np.float32)
                pd.grad = cupy.asarray(ph.grad)
            nh, nd = clip_grad_norm(host, 1.0), clip_grad_norm(dev, 1.0)
            assert nd == pytest.approx(nh, rel=1e-5)
            opt_h.step()
            opt_d.step()
        for ph, pd in zip(host, dev):
            assert pd.data.dtype == cupy.float32
            np.testing.assert_allclose(cupy.asnumpy(pd.data), ph.data, rtol=1e-5, atol=1e-6)
        # state round trip through the host
        sd = opt_d.state_dict()
        host_sd = {"hyper": json.loads(json.dumps(sd["hyper"])), "tensors": {k: cupy.asnumpy(v) for k, v in sd["tensors"].items()}}
        opt_d.load_state_dict(host_sd)
        assert all(isinstance(v, cupy.ndarray) for v in opt_d.state_dict()["tensors"].values())


def test_adamw_chunked_cpu_path_equals_whole_array_update(monkeypatch):
    """The cache-sized chunking of the CPU AdamW update changes nothing but speed."""
    from numpygpt import optim as optim_mod

    rng = np.random.default_rng(0)
    monkeypatch.setattr(optim_mod, "_CHUNK", 1000)
    data = rng.standard_normal((300, 257)).astype(np.float32)  # many chunks, a ragged end
    grads = [rng.standard_normal(data.shape).astype(np.float32) for _ in range(3)]
    results = []
    assert data.size > 2 * optim_mod._CHUNK
    for chunk in (1000, 10**9):
        monkeypatch.setattr(optim_mod, "_CHUNK", chunk)
        p = Parameter(data.copy())
        opt = AdamW([p], lr=1e-2, weight_decay=0.1)
        for g in grads:
            p.grad = g.copy()
            opt.step()
        results.append(p.data)
    np.testing.assert_array_equal(results[0], results[1])


@pytest.mark.parametrize("threads", [1, 2])
def test_adamw_chunks_run_on_numpygpts_pool_with_its_thread_count(monkeypatch, threads):
    """The chunked update takes parallel's threads (NUMPYGPT_NUM_THREADS, affinity, a rank's
    share), not a pool of its own sized from os.cpu_count(); the bits do not depend on them."""
    import threading

    from numpygpt import optim as optim_mod
    from numpygpt import parallel

    monkeypatch.setattr(optim_mod, "_CHUNK", 1000)
    seen, math_before = set(), optim_mod._adamw_math

    def recording(*args):
        seen.add(threading.current_thread().name)
        return math_before(*args)

    monkeypatch.setattr(optim_mod, "_adamw_math", recording)
    rng = np.random.default_rng(0)
    data = rng.standard_normal((64, 250)).astype(np.float32)  # 16 chunks
    p = Parameter(data.copy())
    p.grad = rng.standard_normal(data.shape).astype(np.float32)
    with parallel.num_threads(threads):
        AdamW([p], lr=1e-2).step()
    assert len(seen) <= threads
    assert all(name == threading.main_thread().name or name.startswith("numpygpt_") for name in seen), seen
    q = Parameter(data.copy())
    q.grad = p.grad
    monkeypatch.setattr(optim_mod, "_CHUNK", 10**9)  # the whole array at once
    AdamW([q], lr=1e-2).step()
    np.testing.assert_array_equal(p.data, q.data)
