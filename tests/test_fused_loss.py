"""The fused output head + cross-entropy (issue 22): its gradient against centred differences
(float64), its loss, dh and dW against the plain path (OutputHead + CrossEntropyLoss) in
float64 and float32, tied and untied, the objective built on it through the one training
loop, and that it never holds the (N, V) logits."""

import json
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, strategies as st

from numpygpt import GPTConfig, GPTModel, apply_lora, backend
from numpygpt.config import LlamaConfig
from numpygpt.families import build_model
from numpygpt.data import DataLoader
from numpygpt.gradcheck import check_layer
from numpygpt.nn import CrossEntropyLoss, FusedLinearCrossEntropy, OutputHead, Parameter, fused_loss, no_grad
from numpygpt.objective import FusedNextTokenObjective, NextTokenObjective
from numpygpt.optim import AdamW
from numpygpt.train import train_model
from conftest import assert_grads_ok, to_dev, to_host

F64 = "float64"


def with_ignored(rng, targets, n_ignored):
    """targets with up to n_ignored positions (never all) set to -100."""
    flat = targets.reshape(-1)
    flat[rng.permutation(flat.size)[:min(n_ignored, flat.size - 1)]] = -100
    return targets


@given(N=st.integers(1, 9), C=st.integers(1, 5), V=st.integers(1, 9), chunk=st.integers(1, 10),
       slice_rows=st.integers(1, 4), n_ignored=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_gradcheck(device, N, C, V, chunk, slice_rows, n_ignored, seed):
    rng = np.random.default_rng(seed)
    targets = with_ignored(rng, rng.integers(0, V, N), n_ignored)
    op = FusedLinearCrossEntropy(Parameter(to_dev(rng.standard_normal((V, C)), F64)), chunk_rows=chunk)
    before, fused_loss.SLICE_ROWS = fused_loss.SLICE_ROWS, slice_rows  # dW added a few rows at a time
    try:
        errors = check_layer(op, to_dev(rng.standard_normal((N, C)) * 2, F64), to_dev(targets),
                             input_names=["h", "targets"], max_coords=None)
    finally:
        fused_loss.SLICE_ROWS = before
    assert_grads_ok(errors)


def plain_path(W, h, targets, dloss):
    """(loss, dh, dW) through OutputHead + CrossEntropyLoss."""
    head, loss_fn = OutputHead(Parameter(W.copy())), CrossEntropyLoss()
    loss = loss_fn(head(h), targets)
    dh = head.backward(loss_fn.backward(dloss))
    return float(loss), to_host(dh), to_host(head.weight.grad)


def fused_path(W, h, targets, dloss, chunk_rows):
    op = FusedLinearCrossEntropy(Parameter(W.copy()), chunk_rows=chunk_rows)
    loss = op(h, targets)
    dh = op.backward(dloss)
    return float(loss), to_host(dh), to_host(op.weight.grad)


@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-12), ("float32", 2e-5)])
@pytest.mark.parametrize("chunk_rows", [1, 5, 64])
def test_equals_the_plain_head_and_loss(device, dtype, rtol, chunk_rows):
    rng = np.random.default_rng(7)
    B, T, C, V = 3, 7, 6, 300
    W = to_dev(rng.standard_normal((V, C)), dtype)
    h = to_dev(rng.standard_normal((B, T, C)) * 2, dtype)
    targets = with_ignored(rng, rng.integers(0, V, (B, T)), 4)
    plain = plain_path(W, h, targets, 0.25)
    fused = fused_path(W, h, targets, 0.25, chunk_rows)
    assert fused[1].dtype == fused[2].dtype == np.dtype(dtype)  # the dtype is kept
    assert fused[1].shape == (B, T, C) and fused[2].shape == (V, C)
    assert abs(fused[0] - plain[0]) <= rtol * abs(plain[0])
    for name, a, b in (("dh", fused[1], plain[1]), ("dW", fused[2], plain[2])):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max(), err_msg=name)


def model_pair(tied, dtype, arch="gpt2"):
    """Two equal models of the family ``arch``: GPT-2, or the llama-tiny / qwen3-tiny shape."""
    if arch == "gpt2":
        cfg = GPTConfig(vocab_size=97, context_length=8, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0,
                        qkv_bias=True, tie_weights=tied, dtype=dtype)
    else:
        cfg = LlamaConfig.preset(f"{arch}-tiny", vocab_size=97, context_length=8, tie_weights=tied, dtype=dtype)
    return build_model(cfg, seed=1), build_model(cfg, seed=1)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen3"])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-11), ("float32", 1e-4)])
def test_objective_equals_the_plain_objective(device, arch, tied, dtype, rtol):
    """loss and every parameter's gradient of a whole model of each family, the tied
    embedding's two paths included."""
    rng = np.random.default_rng(3)
    idx, targets = rng.integers(0, 97, (2, 8)), with_ignored(rng, rng.integers(0, 97, (2, 8)), 3)
    plain_model, fused_model = model_pair(tied, dtype, arch)
    losses = []
    for model, objective in ((plain_model, NextTokenObjective()), (fused_model, FusedNextTokenObjective(chunk_rows=3))):
        losses.append(float(objective.loss(model, (idx, targets))))
        objective.backward(model, 0.5)
    assert abs(losses[0] - losses[1]) <= rtol * abs(losses[0])
    for (name, p), (_, q) in zip(plain_model.named_parameters(), fused_model.named_parameters()):
        a, b = to_host(q.grad), to_host(p.grad)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max(), err_msg=name)


def test_training_with_the_fused_loss_equals_the_plain_run(device):
    """Three AdamW steps of the one loop, with accumulation: the same losses and weights."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 97, size=(12, 9))
    windows = [(row[:-1], row[1:]) for row in ids]
    loader = DataLoader(windows, 2, shuffle=False)
    runs = []
    for model, objective in zip(model_pair(True, F64), (NextTokenObjective(), FusedNextTokenObjective())):
        history = train_model(model, loader, loader, AdamW(model, lr=1e-2), 1, 2, 2, objective=objective,
                              grad_accum_steps=2, progress=False, log=None)
        runs.append((history, model))
    (h_plain, m_plain), (h_fused, m_fused) = runs
    assert len(h_fused["step_losses"]) == 3
    np.testing.assert_allclose(h_fused["step_losses"], h_plain["step_losses"], rtol=1e-12)
    np.testing.assert_allclose(h_fused["val_losses"], h_plain["val_losses"], rtol=1e-12)
    for (name, p), (_, q) in zip(m_plain.named_parameters(), m_fused.named_parameters()):
        np.testing.assert_allclose(to_host(q.data), to_host(p.data), rtol=1e-9, atol=1e-12, err_msg=name)


def test_never_holds_the_whole_logits():
    """Python's allocation tracer sees NumPy's arrays: forward + backward of 2048 rows over
    V = 2000 stays far below one (N, V) array, which the plain path makes twice."""
    rng = np.random.default_rng(0)
    N, C, V = 2048, 8, 2000
    W, h = rng.standard_normal((V, C)), rng.standard_normal((N, C))
    targets = rng.integers(0, V, N)
    whole_logits = N * V * 8

    def peak(run):
        tracemalloc.start()
        try:
            run()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    def fused():
        op = FusedLinearCrossEntropy(Parameter(W), chunk_rows=64)
        op(h, targets)
        op.backward()

    with backend.device("cpu"):
        assert peak(fused) < whole_logits / 8
        assert peak(lambda: plain_path(W, h[None], targets[None], 1.0)) > 2 * whole_logits  # the measure sees it


def test_no_grad_frozen_weight_and_errors(device, rng):
    W = Parameter(to_dev(rng.standard_normal((5, 3)), F64))
    h, targets = to_dev(rng.standard_normal((4, 3)), F64), to_dev(np.array([0, 1, 4, -100]))
    op = FusedLinearCrossEntropy(W)
    with no_grad():
        loss = op(h, targets)
    with pytest.raises(RuntimeError, match="without a cached forward"):
        op.backward()
    W.requires_grad = False
    assert float(op(h, targets)) == float(loss)
    dh = op.backward()
    assert W.grad is None and dh.shape == (4, 3) and float(abs(dh).sum()) > 0
    with pytest.raises(ValueError, match="channels"):
        op(to_dev(np.zeros((4, 2)), F64), targets)
    with pytest.raises(ValueError, match="chunk_rows"):
        FusedLinearCrossEntropy(W, chunk_rows=0)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        op(h, np.array([0, 1, 5, 2]))


def test_the_objective_refuses_a_lora_head_and_a_classifier():
    model, _ = model_pair(False, F64)
    apply_lora(model, rank=2, alpha=2.0)
    batch = (np.zeros((1, 4), dtype=np.int64), np.zeros((1, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="LoRAOutputHead"):
        FusedNextTokenObjective().loss(model, batch)
    classifier = model_pair(False, F64)[0].to_classifier(3)
    with pytest.raises(ValueError, match="OutputHead"):
        FusedNextTokenObjective().loss(classifier, batch)
    with pytest.raises(ValueError, match="classifier"):
        classifier.forward_hidden(batch[0])


def test_train_command_with_and_without_fused_loss(tmp_path, monkeypatch):
    """``numpygpt train --fused-loss`` runs the same steps as the plain loss (float64), and
    it is the fused op that computes them."""
    from numpygpt.cli import main
    from numpygpt.data import default_corpus

    text = tmp_path / "text.txt"
    text.write_text(default_corpus()[:6000], encoding="utf-8")
    calls, real = [], FusedLinearCrossEntropy.forward
    monkeypatch.setattr(FusedLinearCrossEntropy, "forward", lambda self, *a: calls.append(1) or real(self, *a))
    histories, fused_calls = [], []
    for flag in ("--no-fused-loss", "--fused-loss"):
        out = tmp_path / flag
        assert main(["train", "--preset", "tiny", "--dtype", "float64", "--max-steps", "3", "--batch-size", "2",
                     "--eval-freq", "2", "--eval-iter", "1", "--prompt", "", "--data", str(text), "--out", str(out),
                     "--device", "cpu", "--no-progress", flag]) == 0
        histories.append(json.loads((out / "history.json").read_text()))
        fused_calls.append(len(calls))
    assert fused_calls[0] == 0 and fused_calls[1] >= 3
    assert len(histories[1]["step_losses"]) == 3
    np.testing.assert_allclose(histories[1]["step_losses"], histories[0]["step_losses"], rtol=1e-12)
    np.testing.assert_allclose(histories[1]["val_losses"], histories[0]["val_losses"], rtol=1e-12)


def test_default_chunks_are_at_most_chunk_bytes_and_even(monkeypatch):
    monkeypatch.setattr(fused_loss, "CHUNK_BYTES", 800)  # 10 rows of V = 10 float64 logits
    op = FusedLinearCrossEntropy(Parameter(np.zeros((10, 3))))
    assert op.rows_per_chunk() == op.rows_per_chunk(5) == op.rows_per_chunk(10) == 10
    assert op.rows_per_chunk(23) == 8  # 3 chunks: 8 + 8 + 7, not 10 + 10 + 3
    assert FusedLinearCrossEntropy(op.weight, chunk_rows=4).rows_per_chunk(23) == 4
