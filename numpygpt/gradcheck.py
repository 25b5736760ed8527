"""Finite-difference gradient checks for any layer, block or loss.

For a function y = f(x; params) and a fixed random ``dout`` with y's shape, the
scalar L = sum(f(x) * dout) has dL/dx = backward(dout). Centred differences

    dL/dx_i ~ (L(x + eps e_i) - L(x - eps e_i)) / (2 eps)

check that whole Jacobian-vector product one coordinate at a time, for the inputs
and every parameter (a sample of coordinates for large tensors). Each tensor gets
one relative error over its checked coordinates, analytic a against numeric n:

    err = ||a - n|| / max(||a|| + ||n||, tiny)

In float64 that is ~1e-9 for a correct backward and ~1 for a wrong one. It is taken
over the tensor rather than per coordinate because a single coordinate whose true
gradient is ~0 (say the key bias, to which softmax is invariant) would compare two
rounding errors and say nothing about the backward.

    from numpygpt.gradcheck import check_layer
    errors = check_layer(LayerNorm(8, dtype="float64"), x)   # {'x': 3e-10, 'weight': ...}
"""

from __future__ import annotations

import numpy

from . import backend
from .nn.module import Module

_TINY = 1e-12


def relative_error(a, n) -> float:
    """||a - n|| / max(||a|| + ||n||, tiny) for arrays (or scalars) a and n."""
    a, n = numpy.asarray(a, dtype=numpy.float64), numpy.asarray(n, dtype=numpy.float64)
    return float(numpy.linalg.norm(a - n) / max(numpy.linalg.norm(a) + numpy.linalg.norm(n), _TINY))


def _coords(size: int, max_coords: int | None, rng) -> list[int]:
    if max_coords is None or size <= max_coords:
        return list(range(size))
    return sorted(rng.choice(size, size=max_coords, replace=False).tolist())


def check_gradients(forward, backward, inputs: dict, params: dict, dout=None, eps: float = 1e-6,
                    max_coords: int | None = 40, seed: int = 0, before_forward=None) -> dict:
    """Worst relative error per tensor between backward and centred differences.

    forward(**inputs) -> y; backward(dout) -> dx for the first input, or a tuple of dxs
    in the order of ``inputs`` (None for an input without gradient, e.g. token ids).
    params: name -> Parameter whose .grad backward fills (it is cleared first).
    ``before_forward`` runs before every forward pass (e.g. to reseed dropout masks).
    Returns {name: relative error}; parameters with requires_grad=False are skipped.
    """
    # a stream of its own, so dout never equals an input drawn with default_rng(seed):
    # with dout = x, LayerNorm's true input gradient is ~0 and the check compares noise
    rng = numpy.random.default_rng([seed, 0x6772])
    for p in params.values():
        p.grad = None

    def run():
        if before_forward is not None:
            before_forward()
        return forward(**inputs)

    y = run()
    xp = backend.array_module(y)
    if dout is None:
        dout = backend.to_device(rng.standard_normal(numpy.shape(y)), dtype=y.dtype, device_name=backend.device_of(y))
    grads_in = backward(dout)
    if not isinstance(grads_in, tuple):
        grads_in = (grads_in,)

    def objective() -> float:
        return float((run() * dout).sum())

    # (name, array to perturb, analytic gradient)
    targets = []
    for (name, x), g in zip(inputs.items(), grads_in):
        if g is not None:
            targets.append((name, x, g))
    for name, p in params.items():
        if not p.requires_grad:
            continue
        g = p.grad if p.grad is not None else xp.zeros_like(p.data)
        targets.append((name, p.data, g))

    errors = {}
    for name, x, g in targets:
        if not x.flags.c_contiguous:
            raise ValueError(f"{name}: needs a C-contiguous array to perturb in place")
        coords = _coords(x.size, max_coords, rng)
        numeric = centred_differences(objective, x, coords, eps)
        errors[name] = relative_error(backend.to_host(g).reshape(-1)[coords], numeric)
    return errors


def centred_differences(objective, x, coords, eps: float = 1e-6) -> list[float]:
    """(objective() at x + eps e_i  -  at x - eps e_i) / (2 eps) for each flat index i in
    ``coords``, perturbing the C-contiguous array ``x`` in place and restoring it."""
    flat = x.reshape(-1)  # a view of x
    numeric = []
    for i in coords:
        old = float(flat[i])
        flat[i] = old + eps
        plus = objective()
        flat[i] = old - eps
        minus = objective()
        flat[i] = old
        numeric.append((plus - minus) / (2 * eps))
    return numeric


def check_layer(layer: Module, *inputs, dout=None, eps: float = 1e-6, max_coords: int | None = 40,
                seed: int = 0, input_names=None, before_forward=None) -> dict:
    """Gradient check of ``layer.forward(*inputs)`` / ``layer.backward(dout)`` for its
    floating-point inputs and every trainable parameter. Returns {name: worst rel. error}."""
    names = list(input_names or (["x"] if len(inputs) == 1 else [f"x{i}" for i in range(len(inputs))]))
    params = dict(layer.named_parameters())

    def forward(**kw):
        return layer.forward(*[kw[n] for n in names])

    return check_gradients(forward, layer.backward, dict(zip(names, inputs)), params, dout=dout, eps=eps,
                           max_coords=max_coords, seed=seed, before_forward=before_forward)


def check_model_loss(model, loss_fn, idx, targets, eps: float = 1e-6, max_coords: int | None = 20,
                     seed: int = 0, before_forward=None) -> dict:
    """Gradient check of loss_fn(model(idx), targets) for every trainable model parameter."""

    def forward():
        return loss_fn(model(idx), targets)

    def backward(dloss):
        model.backward(loss_fn.backward(float(dloss)))
        return ()

    return check_gradients(forward, backward, {}, dict(model.named_parameters()), dout=1.0, eps=eps,
                           max_coords=max_coords, seed=seed, before_forward=before_forward)


def report(errors: dict, tol: float = 1e-6) -> str:
    """A table of the errors, worst first, marking any above ``tol``."""
    lines = []
    for name, err in sorted(errors.items(), key=lambda kv: -kv[1]):
        lines.append(f"{'FAIL' if err > tol else 'ok  '}  {err:9.2e}  {name}")
    return "\n".join(lines)


# -- the checks that ``numpygpt gradcheck`` runs ---------------------------------------

def gradcheck_checks(seed: int = 0) -> list:
    """[(name, thunk -> {tensor: relative error})]: each layer and a tiny model, float64.

    Weights are redrawn larger than GPT-2's 0.02 so every gradient is far from zero;
    dropout masks are held fixed by reseeding before each forward pass. A new layer adds
    one entry to the list at the end (the helpers above it draw inputs and weights).
    """
    from .config import GPTConfig
    from .lora import apply_lora
    from .model import FeedForward, GPTModel, OutputHead, TransformerBlock
    from .nn import (BlockwiseAttention, CrossEntropyLoss, Dropout, Embedding, FusedLinearCrossEntropy, GELU, LayerNorm,
                     Linear, LoRALinear, LoRAOutputHead, MultiHeadAttention, Parameter, SequenceReadout, Softmax)

    F64 = "float64"
    rng = numpy.random.default_rng(seed)

    def dev(a, dtype=F64):
        return backend.to_device(numpy.asarray(a), dtype=dtype)

    def randn(*shape):
        return dev(rng.standard_normal(shape))

    def randomized(layer, scale=0.5):
        for p in layer.parameters():
            p.data = randn(*p.shape) * scale
        return layer

    def fixed_masks():
        backend.manual_seed(seed)

    B, T, C, NH, V = 2, 5, 8, 2, 11
    cfg = GPTConfig(vocab_size=V, context_length=8, emb_dim=C, n_heads=NH, n_layers=2, drop_rate=0.2,
                    qkv_bias=True, dtype=F64)

    def model_check(tied: bool):
        def run():
            model = randomized(GPTModel(cfg.replace(tie_weights=tied), seed=seed), scale=0.3)
            idx = dev(rng.integers(0, V, (B, T)), None)
            targets = rng.integers(0, V, (B, T))
            targets[0, 0] = -100  # an ignored position
            return check_model_loss(model, CrossEntropyLoss(), idx, dev(targets, None), eps=1e-5,
                                    before_forward=fixed_masks)
        return run

    K, PAD = 3, V - 1

    def padded_ids():
        """(B + 1, T) ids right-padded with PAD to different lengths; one row unpadded."""
        idx = rng.integers(0, PAD, (B + 1, T))
        idx[0, 3:] = idx[2, 1:] = PAD
        return dev(idx, None)

    def classifier_lora_check():
        """A whole classifier (last_non_pad readout) with LoRA on every Linear; B redrawn from
        its zeros, so the adapters' every gradient is exercised."""
        model = randomized(GPTModel(cfg, seed=seed).to_classifier(K, readout="last_non_pad", pad_id=PAD), 0.3)
        randomized(apply_lora(model, rank=2, alpha=3.0, seed=seed), scale=0.3)
        return check_model_loss(model, CrossEntropyLoss(), padded_ids(), dev(rng.integers(0, K, B + 1), None),
                                eps=1e-5, before_forward=fixed_masks)

    def loss_check():
        targets = rng.integers(0, V, (B, T))
        targets[1, 2] = -100
        return check_layer(CrossEntropyLoss(), randn(B, T, V) * 2, dev(targets, None),
                           input_names=["logits", "targets"])

    return [
        ("Linear", lambda: check_layer(randomized(Linear(C, 3 * C, dtype=F64)), randn(B, T, C))),
        ("Embedding (repeated ids)", lambda: check_layer(randomized(Embedding(4, C, dtype=F64)),
                                                         dev(rng.integers(0, 4, (B, T)), None), max_coords=None)),
        ("LayerNorm", lambda: check_layer(randomized(LayerNorm(C, dtype=F64)), randn(B, T, C))),
        ("GELU", lambda: check_layer(GELU(), randn(B, T, C) * 2)),
        ("Softmax", lambda: check_layer(Softmax(axis=-1), randn(B, T, C) * 2)),
        ("Dropout (fixed mask)", lambda: check_layer(Dropout(0.3), randn(B, T, C), before_forward=fixed_masks)),
        ("MultiHeadAttention", lambda: check_layer(
            randomized(MultiHeadAttention(C, C, NH, dropout=0.2, qkv_bias=True, dtype=F64)), randn(B, T, C),
            before_forward=fixed_masks)),
        ("FeedForward", lambda: check_layer(randomized(FeedForward(C, dtype=F64)), randn(B, T, C))),
        ("TransformerBlock", lambda: check_layer(randomized(TransformerBlock(cfg)), randn(B, T, C),
                                                 before_forward=fixed_masks)),
        ("OutputHead", lambda: check_layer(OutputHead(Parameter(randn(V, C) * 0.5)), randn(B, T, C))),
        ("CrossEntropyLoss", loss_check),
        ("GPTModel + loss (untied)", model_check(False)),
        ("GPTModel + loss (tied)", model_check(True)),
        # fine-tuning (issue 8): class logits, the classification readout, LoRA
        ("CrossEntropyLoss (B, K)", lambda: check_layer(CrossEntropyLoss(), randn(B, K) * 2,
                                                        dev(rng.integers(0, K, B), None),
                                                        input_names=["logits", "targets"])),
        ("SequenceReadout (last)", lambda: check_layer(SequenceReadout("last"), randn(B, T, C), max_coords=None)),
        ("SequenceReadout (non-pad)", lambda: check_layer(SequenceReadout("last_non_pad", pad_id=PAD),
                                                          randn(B + 1, T, C), padded_ids(),
                                                          input_names=["x", "idx"], max_coords=None)),
        ("LoRALinear (splits=3)", lambda: check_layer(
            randomized(LoRALinear(Linear(C, 3 * C, dtype=F64), rank=2, alpha=4.0, splits=3, seed=seed)),
            randn(B, T, C))),
        ("LoRAOutputHead", lambda: check_layer(
            randomized(LoRAOutputHead(OutputHead(Parameter(randn(V, C) * 0.5)), rank=2, alpha=4.0, seed=seed)),
            randn(B, T, C))),
        ("classifier + LoRA + loss", classifier_lora_check),
        ("BlockwiseAttention", lambda: check_layer(
            randomized(BlockwiseAttention(C, C, NH, qkv_bias=True, dtype=F64, mode="blockwise", block_q=2,
                                          block_k=3)), randn(B, T, C))),
        ("FusedLinearCrossEntropy", lambda: check_layer(  # 3-row chunks, row 4 ignored
            FusedLinearCrossEntropy(Parameter(randn(V, C) * 0.5), chunk_rows=3), randn(B * T, C),
            dev(numpy.where(numpy.arange(B * T) == 4, -100, rng.integers(0, V, B * T)), None),
            input_names=["h", "targets"])),
    ]


def run_gradchecks(seed: int = 0, tol: float = 1e-6, verbose: bool = False, device: str = "cpu", out=None) -> int:
    """Run every check of ``gradcheck_checks`` and print a table (or pass each line to
    ``out``); returns how many failed."""
    if out is None:
        def out(line):
            print(line, flush=True)
    checks = gradcheck_checks(seed)
    failed = 0
    out(f"gradient checks: centred differences in float64 on {device}, tolerance {tol:g}")
    out(f"{'check':<28} {'worst rel. error':>16}  {'in tensor':<22} result")
    for name, run in checks:
        errors = run()
        worst_name, worst = max(errors.items(), key=lambda kv: kv[1])
        ok = worst <= tol
        failed += not ok
        out(f"{name:<28} {worst:>16.2e}  {worst_name:<22} {'ok' if ok else 'FAIL'}")
        if verbose or not ok:
            out("    " + report(errors, tol).replace("\n", "\n    "))
    total = len(checks)
    out(f"{total - failed}/{total} checks within tolerance" + ("" if failed else ": all backward passes agree"))
    return failed
