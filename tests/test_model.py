"""The whole GPT: gradient checks of the loss, config, initialisation, input checks,
float32 vs float64, KV cache, and a memorisation run."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from numpygpt import CrossEntropyLoss, GPTConfig, GPTModel, backend, count_parameters, no_grad
from numpygpt.gradcheck import check_model_loss, report
from conftest import assert_eval_between_changes_nothing, to_dev

TOL = 1e-6


def tiny(**kw):
    return GPTConfig.preset("tiny", **kw)


# emb_dim >= 3: with C = 2 LayerNorm outputs +-1 whatever its input, so its input
# gradient is ~eps and the check would compare rounding noise
@given(B=st.integers(1, 2), T=st.integers(1, 6), NH=st.integers(1, 2), hs=st.integers(3, 4),
       V=st.integers(2, 11), n_layers=st.integers(1, 2), tied=st.booleans(), bias=st.booleans(),
       p=st.sampled_from([0.0, 0.2]), seed=st.integers(0, 1000))
def test_model_loss_gradients(device, B, T, NH, hs, V, n_layers, tied, bias, p, seed):
    rng = np.random.default_rng(seed)
    cfg = GPTConfig(vocab_size=V, context_length=8, emb_dim=NH * hs, n_heads=NH, n_layers=n_layers,
                    drop_rate=p, qkv_bias=bias, tie_weights=tied, dtype="float64")
    model = GPTModel(cfg, seed=seed)
    for prm in model.parameters():  # larger weights than GPT-2's 0.02 make every gradient count
        prm.data = to_dev(rng.standard_normal(prm.shape) * 0.3, "float64")
    idx = to_dev(rng.integers(0, V, (B, T)))
    targets = rng.integers(0, V, (B, T))
    if B * T > 1:
        targets.reshape(-1)[0] = -100  # ignore_index
    errors = check_model_loss(model, CrossEntropyLoss(), idx, to_dev(targets), eps=1e-5,
                              before_forward=lambda: backend.manual_seed(seed))
    assert ("lm_head.weight" in errors) == (not tied)
    assert max(errors.values()) <= TOL, "\n" + report(errors, TOL)


def test_model_gradients_with_frozen_parameters(device, rng):
    model = GPTModel(tiny(dtype="float64", drop_rate=0.1, tie_weights=True), seed=3)
    model.freeze("wte", "h.0")
    idx, targets = to_dev(rng.integers(0, 128, (2, 5))), to_dev(rng.integers(0, 128, (2, 5)))
    errors = check_model_loss(model, CrossEntropyLoss(), idx, targets, eps=1e-5, max_coords=10,
                              before_forward=lambda: backend.manual_seed(0))
    assert not any(n.startswith(("wte", "h.0.")) for n in errors)
    assert max(errors.values()) <= TOL, report(errors)
    frozen = [p for n, p in model.named_parameters() if n.startswith(("wte", "h.0."))]
    assert frozen and all(p.grad is None for p in frozen)


def test_tied_weights_share_one_parameter(device):
    model = GPTModel(tiny(tie_weights=True))
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and model.lm_head.weight is model.wte.weight
    assert model.num_parameters() == count_parameters(model.cfg)


def test_parameter_counts():
    small = GPTConfig.preset("gpt2-small")
    assert count_parameters(small, tied=False) == 163_009_536
    assert count_parameters(small, tied=True) == 124_412_160
    for name, C, L, NH in [("gpt2-medium", 1024, 24, 16), ("gpt2-large", 1280, 36, 20), ("gpt2-xl", 1600, 48, 25)]:
        cfg = GPTConfig.preset(name)
        assert (cfg.emb_dim, cfg.n_layers, cfg.n_heads, cfg.vocab_size, cfg.context_length) == (C, L, NH, 50257, 1024)
    for kw in [dict(), dict(tie_weights=True), dict(qkv_bias=True), dict(n_layers=3, emb_dim=48, n_heads=6)]:
        cfg = tiny(**kw)
        assert GPTModel(cfg).num_parameters() == count_parameters(cfg)


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(emb_dim=10, n_heads=3)
    with pytest.raises(ValueError, match="unknown preset"):
        GPTConfig.preset("gpt5")
    cfg = tiny()
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg


def test_initialisation_follows_gpt2(device):
    cfg = GPTConfig(vocab_size=500, context_length=64, emb_dim=64, n_heads=4, n_layers=4, qkv_bias=True)
    model = GPTModel(cfg, seed=0)
    p = {n: backend.to_host(q.data) for n, q in model.named_parameters()}
    assert abs(p["wte.weight"].std() - 0.02) < 0.001
    assert abs(p["h.0.mlp.c_fc.weight"].std() - 0.02) < 0.001
    assert abs(p["h.1.attn.c_proj.weight"].std() - 0.02 / np.sqrt(8)) < 0.001
    assert abs(p["h.2.mlp.c_proj.weight"].std() - 0.02 / np.sqrt(8)) < 0.001
    assert not p["h.0.attn.c_attn.bias"].any() and not p["h.0.mlp.c_fc.bias"].any()
    assert (p["h.0.ln_1.weight"] == 1).all() and not p["ln_f.bias"].any()
    assert all(a.dtype == np.float32 for a in p.values())


def test_same_seed_same_weights_on_every_backend_and_dtype(device):
    a = GPTModel(tiny(), seed=7)
    with backend.device("cpu"):
        b = GPTModel(tiny(dtype="float64"), seed=7)
    c = GPTModel(tiny(), seed=8)
    for (n, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        np.testing.assert_array_equal(backend.to_host(pa.data), backend.to_host(pb.data).astype(np.float32), err_msg=n)
        if pa.data.ndim == 2:
            assert not np.array_equal(backend.to_host(pa.data), backend.to_host(pc.data))


def test_float32_forward_agrees_with_float64(device, rng):
    m64 = GPTModel(tiny(dtype="float64"), seed=1)
    m32 = GPTModel(tiny(dtype="float32"), seed=1)
    idx = to_dev(rng.integers(0, 128, (3, 20)))
    targets = to_dev(rng.integers(0, 128, (3, 20)))
    loss_fn = CrossEntropyLoss()
    l64 = loss_fn(y64 := m64(idx), targets)
    l32 = loss_fn(y32 := m32(idx), targets)
    assert y32.dtype == np.float32 and l32.dtype == np.float32
    np.testing.assert_allclose(backend.to_host(y32), backend.to_host(y64), rtol=1e-4, atol=1e-5)
    assert abs(float(l32) - float(l64)) < 1e-5
    # gradients too
    for m, l in ((m64, l64), (m32, l32)):
        m.zero_grad()
        loss_fn(m(idx), targets)
        m.backward(loss_fn.backward())
    for (n, p64), (_, p32) in zip(m64.named_parameters(), m32.named_parameters()):
        assert p32.grad.dtype == np.float32, n
        g64, g32 = backend.to_host(p64.grad), backend.to_host(p32.grad)
        assert np.abs(g32 - g64).max() <= 1e-4 * np.abs(g64).max() + 1e-7, n


def test_bad_inputs_raise_clear_errors(device):
    model = GPTModel(tiny())
    V, T = model.cfg.vocab_size, model.cfg.context_length
    # ids are checked on the host (device ids are trusted: CuPy would wrap, not raise)
    with pytest.raises(ValueError, match=rf"token id {V} .*\[0, {V}\)"):
        model(np.array([[1, V]]))
    with pytest.raises(ValueError, match=r"token id -1 "):
        model(np.array([[-1, 2]]))
    with pytest.raises(ValueError, match=rf"sequence length {T + 1} exceeds context_length {T}"):
        model(to_dev(np.zeros((1, T + 1), dtype=np.int64)))
    with pytest.raises(ValueError, match="integers"):
        model(to_dev(np.zeros((1, 3), dtype=np.float32)))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(to_dev(np.zeros(3, dtype=np.int64)))


def test_kv_cache_gives_the_same_logits(device, rng):
    model = GPTModel(tiny(qkv_bias=True), seed=2).eval()
    idx = to_dev(rng.integers(0, 128, (2, 12)))
    with no_grad():
        full = backend.to_host(model(idx))
        caches = model.new_kv_caches()
        steps = [backend.to_host(model(idx[:, :5], caches))]  # prefill, then one token at a time
        for t in range(5, 12):
            steps.append(backend.to_host(model(idx[:, t:t + 1], caches)))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-4, atol=1e-5)


def test_state_dict_round_trip_and_mismatch(device):
    a, b = GPTModel(tiny(), seed=1), GPTModel(tiny(), seed=2)
    b.load_state_dict(a.state_dict())
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(backend.to_host(pa.data), backend.to_host(pb.data))
        assert pa.data is not pb.data
    wrong = GPTModel(tiny(emb_dim=48, n_heads=4), seed=1)
    before = backend.to_host(wrong.wte.weight.data).copy()
    with pytest.raises(ValueError, match="wte.weight"):
        wrong.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(backend.to_host(wrong.wte.weight.data), before)  # untouched
    with pytest.raises(ValueError, match="missing"):
        GPTModel(tiny(n_layers=3)).load_state_dict(a.state_dict())


def test_eval_disables_dropout(device, rng):
    model = GPTModel(tiny(drop_rate=0.5), seed=0)
    idx = to_dev(rng.integers(0, 128, (1, 8)))
    with no_grad():
        assert not np.allclose(backend.to_host(model(idx)), backend.to_host(model(idx)))
        model.eval()
        np.testing.assert_array_equal(backend.to_host(model(idx)), backend.to_host(model(idx)))


def test_memorises_a_fixed_batch(device, rng):
    """Plain gradient descent on one batch: the loss must fall steadily towards zero."""
    model = GPTModel(tiny(), seed=0)
    loss_fn = CrossEntropyLoss()
    idx = to_dev(rng.integers(0, 128, (4, 16)))
    targets = to_dev(rng.integers(0, 128, (4, 16)))
    losses = []
    for _ in range(300):
        model.zero_grad()
        losses.append(float(loss_fn(model(idx), targets)))
        model.backward(loss_fn.backward())
        for p in model.parameters():
            p.data -= 0.5 * p.grad
    assert losses[0] > 4.5  # ~ln(128) at initialisation
    checkpoints = losses[::50] + [losses[-1]]
    assert all(b < a for a, b in zip(checkpoints, checkpoints[1:])), checkpoints
    assert losses[-1] < 0.2, losses[-1]


def test_init_false_draws_nothing_and_layers_default_to_gpt2_std(device):
    model = GPTModel(tiny(), init=False)
    assert all(not backend.to_host(p.data).any() for n, p in model.named_parameters() if "ln" not in n)
    from numpygpt import Linear
    w = backend.to_host(Linear(64, 256, seed=0).weight.data)
    assert abs(w.std() - 0.02) < 0.001
    np.testing.assert_array_equal(w, backend.to_host(Linear(64, 256, seed=0).weight.data))


def test_config_module_imports_nothing_above_it():
    """config.py sits at the bottom of the package: importing the layers from it made the
    circle config -> lora -> nn -> nn.readout -> config (issue 21). Read from its source,
    so a lazy import inside a function counts too."""
    import ast

    import numpygpt.config
    import numpygpt.options

    def package_imports(module):
        tree = ast.parse(open(module.__file__, encoding="utf-8").read())
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level > 0}

    assert package_imports(numpygpt.config) == {"options"}
    assert package_imports(numpygpt.options) == set()


@pytest.mark.parametrize("trainable", [None, "last-block"])
def test_no_grad_forward_between_forward_and_backward_changes_nothing(device, trainable):
    """Which stages the backward runs through is the forward's (kept in its cache): an
    evaluation in between, which trains nothing and runs every stage without a cache,
    changes neither that nor any gradient. The language model with dropout, and a
    classifier trained from its last block up."""
    rng = np.random.default_rng(0)
    idx, other = to_dev(rng.integers(0, 128, (2, 6))), to_dev(rng.integers(0, 128, (3, 4)))
    if trainable is None:
        model = GPTModel(tiny(n_layers=3, drop_rate=0.2, dtype="float64"), seed=0)
        dlogits = to_dev(rng.standard_normal((2, 6, 128)), "float64")
    else:
        model = GPTModel(tiny(n_layers=3, dtype="float64"), seed=0).to_classifier(2, seed=1)
        model.set_trainable(trainable)
        dlogits = to_dev(rng.standard_normal((2, 2)), "float64")
    assert_eval_between_changes_nothing(model, idx, dlogits, lambda: model(other))
