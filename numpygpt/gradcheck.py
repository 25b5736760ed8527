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
    """Gradient check of loss_fn(model(idx), targets) for every trainable model parameter;
    ``idx`` a tuple is the model's several inputs (an encoder-decoder's source and target)."""
    inputs = idx if isinstance(idx, tuple) else (idx,)

    def forward():
        return loss_fn(model(*inputs), targets)

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

class _Draws:
    """Seeded float64 inputs and weights for the checks, on the default device: ``dev``
    moves an array, ``randn`` draws one, ``randomized`` redraws a layer's weights and
    ``fixed_masks`` reseeds the dropout generator (the same masks every forward)."""

    F64 = "float64"

    def __init__(self, seed: int):
        self.seed = seed
        self.rng = numpy.random.default_rng(seed)

    def dev(self, a, dtype=F64):
        return backend.to_device(numpy.asarray(a), dtype=dtype)

    def randn(self, *shape):
        return self.dev(self.rng.standard_normal(shape))

    def randomized(self, layer, scale=0.5):
        for p in layer.parameters():
            p.data = self.randn(*p.shape) * scale
        return layer

    def fixed_masks(self):
        backend.manual_seed(self.seed)


B, T, C, NH, V = 2, 5, 8, 2, 11  # the checks' sizes: batch, time, channels, heads, vocabulary


def gradcheck_checks(seed: int = 0) -> list:
    """[(name, thunk -> {tensor: relative error})]: each layer and a tiny model, float64.

    Weights are redrawn larger than GPT-2's 0.02 so every gradient is far from zero;
    dropout masks are held fixed by reseeding before each forward pass. The list is one
    part per family of ops (a new op adds an entry to its family's part).
    """
    d = _Draws(seed)
    return _gpt2_checks(d) + _finetune_checks(d) + _llama_checks(d) + _encdec_checks(d)


def _gpt2_checks(d: _Draws) -> list:
    """GPT-2's ops, its block and the whole model with its loss (tied and untied head)."""
    from .config import GPTConfig
    from .model import FeedForward, GPTModel, OutputHead, TransformerBlock
    from .nn import (BlockwiseAttention, CrossEntropyLoss, Dropout, Embedding, FusedLinearCrossEntropy, GELU, LayerNorm,
                     Linear, MultiHeadAttention, Parameter, Softmax)

    F64, dev, randn, randomized, fixed_masks = d.F64, d.dev, d.randn, d.randomized, d.fixed_masks
    cfg = GPTConfig(vocab_size=V, context_length=8, emb_dim=C, n_heads=NH, n_layers=2, drop_rate=0.2,
                    qkv_bias=True, dtype=F64)

    def model_check(tied: bool):
        def run():
            model = randomized(GPTModel(cfg.replace(tie_weights=tied), seed=d.seed), scale=0.3)
            idx = dev(d.rng.integers(0, V, (B, T)), None)
            targets = d.rng.integers(0, V, (B, T))
            targets[0, 0] = -100  # an ignored position
            return check_model_loss(model, CrossEntropyLoss(), idx, dev(targets, None), eps=1e-5,
                                    before_forward=fixed_masks)
        return run

    def loss_check():
        targets = d.rng.integers(0, V, (B, T))
        targets[1, 2] = -100
        return check_layer(CrossEntropyLoss(), randn(B, T, V) * 2, dev(targets, None),
                           input_names=["logits", "targets"])

    return [
        ("Linear", lambda: check_layer(randomized(Linear(C, 3 * C, dtype=F64)), randn(B, T, C))),
        ("Embedding (repeated ids)", lambda: check_layer(randomized(Embedding(4, C, dtype=F64)),
                                                         dev(d.rng.integers(0, 4, (B, T)), None), max_coords=None)),
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
        ("BlockwiseAttention", lambda: check_layer(
            randomized(BlockwiseAttention(C, C, NH, qkv_bias=True, dtype=F64, mode="blockwise", block_q=2,
                                          block_k=3)), randn(B, T, C))),
        ("FusedLinearCrossEntropy", lambda: check_layer(  # 3-row chunks, row 4 ignored
            FusedLinearCrossEntropy(Parameter(randn(V, C) * 0.5), chunk_rows=3), randn(B * T, C),
            dev(numpy.where(numpy.arange(B * T) == 4, -100, d.rng.integers(0, V, B * T)), None),
            input_names=["h", "targets"])),
    ]


def _finetune_checks(d: _Draws) -> list:
    """Fine-tuning's ops (issues 8 and 18): class logits, the classification readout, LoRA,
    a whole classifier with adapters, and the DPO loss."""
    from .config import GPTConfig
    from .lora import apply_lora
    from .model import GPTModel, OutputHead
    from .nn import CrossEntropyLoss, Linear, LoRALinear, LoRAOutputHead, Parameter, SequenceReadout

    F64, dev, randn, randomized = d.F64, d.dev, d.randn, d.randomized
    cfg = GPTConfig(vocab_size=V, context_length=8, emb_dim=C, n_heads=NH, n_layers=2, drop_rate=0.2,
                    qkv_bias=True, dtype=F64)
    K, PAD = 3, V - 1

    def padded_ids():
        """(B + 1, T) ids right-padded with PAD to different lengths; one row unpadded."""
        idx = d.rng.integers(0, PAD, (B + 1, T))
        idx[0, 3:] = idx[2, 1:] = PAD
        return dev(idx, None)

    def classifier_lora_check():
        """A whole classifier (last_non_pad readout) with LoRA on every Linear; B redrawn from
        its zeros, so the adapters' every gradient is exercised."""
        model = randomized(GPTModel(cfg, seed=d.seed).to_classifier(K, readout="last_non_pad", pad_id=PAD), 0.3)
        randomized(apply_lora(model, rank=2, alpha=3.0, seed=d.seed), scale=0.3)
        return check_model_loss(model, CrossEntropyLoss(), padded_ids(), dev(d.rng.integers(0, K, B + 1), None),
                                eps=1e-5, before_forward=d.fixed_masks)

    return [
        ("CrossEntropyLoss (B, K)", lambda: check_layer(CrossEntropyLoss(), randn(B, K) * 2,
                                                        dev(d.rng.integers(0, K, B), None),
                                                        input_names=["logits", "targets"])),
        ("SequenceReadout (last)", lambda: check_layer(SequenceReadout("last"), randn(B, T, C), max_coords=None)),
        ("SequenceReadout (non-pad)", lambda: check_layer(SequenceReadout("last_non_pad", pad_id=PAD),
                                                          randn(B + 1, T, C), padded_ids(),
                                                          input_names=["x", "idx"], max_coords=None)),
        ("LoRALinear (splits=3)", lambda: check_layer(
            randomized(LoRALinear(Linear(C, 3 * C, dtype=F64), rank=2, alpha=4.0, splits=3, seed=d.seed)),
            randn(B, T, C))),
        ("LoRAOutputHead", lambda: check_layer(
            randomized(LoRAOutputHead(OutputHead(Parameter(randn(V, C) * 0.5)), rank=2, alpha=4.0, seed=d.seed)),
            randn(B, T, C))),
        ("classifier + LoRA + loss", classifier_lora_check),
        ("DPOLoss (mean, masked)", lambda: _dpo_check(d.rng, "mean")),
        ("DPOLoss (sum, masked)", lambda: _dpo_check(d.rng, "sum")),
    ]


def _dpo_check(rng, reduction: str, B: int = 2, T: int = 5, V: int = 11) -> dict:
    """The DPO loss over chosen and rejected float64 logits, prompt and padding masked (each
    row's first target is prompt, the chosen second row's last two are padding)."""
    from .nn.dpo import DPOLoss

    def randn(*shape):
        return backend.to_device(rng.standard_normal(shape), dtype="float64")

    mask = numpy.ones((B, T), dtype=bool)
    mask[:, 0] = mask[1, -2:] = False
    fixed = dict(targets_c=rng.integers(0, V, (B, T)), targets_r=rng.integers(0, V, (B, T)), mask_c=mask,
                 mask_r=mask[::-1].copy(), ref_c=randn(B), ref_r=randn(B))
    loss_fn = DPOLoss(beta=0.5, reduction=reduction)
    return check_gradients(lambda **kw: loss_fn(**kw, **fixed).loss, loss_fn.backward,
                           {"logits_c": randn(B, T, V) * 2, "logits_r": randn(B, T, V) * 2}, {})


def _llama_checks(d: _Draws) -> list:
    """The Llama 3 / Qwen3 ops and models (issue 17)."""
    from .config import LlamaConfig
    from .llama import LlamaModel
    from .lora import apply_lora
    from .nn import CrossEntropyLoss, GroupedQueryAttention, RMSNorm, RoPE, SiLU, SwiGLU

    F64, rng, dev, randn, randomized, seed = d.F64, d.rng, d.dev, d.randn, d.randomized, d.seed
    llama3_rope = dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=16)  # head_dim 6: one middle, two slow frequencies
    rope = RoPE(6, theta=100.0, scaling=llama3_rope, max_positions=16)

    def gqa_check(impl: str, qk_norm: bool):
        layer = GroupedQueryAttention(C, 4, 2, 6, rope, qk_norm_eps=1e-6 if qk_norm else None, impl=impl,
                                      dtype=F64, block_q=2, block_k=3)
        return check_layer(randomized(layer), randn(B, T, C))

    def llama_check(model_type: str, tied: bool, lora: bool = False):
        def run():
            llama_cfg = LlamaConfig.preset(f"{model_type}-tiny", vocab_size=V, emb_dim=C, hidden_dim=12,
                                           dtype=F64, tie_weights=tied)
            model = randomized(LlamaModel(llama_cfg, seed=seed), scale=0.5)
            if lora:  # adapters drawn away from B = 0, so every adapter gradient is exercised
                randomized(apply_lora(model, rank=2, alpha=3.0, seed=seed), scale=0.3)
            idx = dev(rng.integers(0, V, (B, T)), None)
            return check_model_loss(model, CrossEntropyLoss(), idx, dev(rng.integers(0, V, (B, T)), None), eps=1e-5)
        return run

    def classifier_check():
        """A Llama classifier (last_non_pad readout, rows padded to different lengths) with
        LoRA on every projection and its score head, adapters drawn away from B = 0."""
        llama_cfg = LlamaConfig.preset("llama-tiny", vocab_size=V, emb_dim=C, hidden_dim=12, dtype=F64)
        model = randomized(LlamaModel(llama_cfg, seed=seed).to_classifier(3, readout="last_non_pad", pad_id=V - 1),
                           scale=0.5)
        randomized(apply_lora(model, rank=2, alpha=3.0, seed=seed), scale=0.3)
        idx = rng.integers(0, V - 1, (B + 1, T))
        idx[0, 3:] = idx[2, 1:] = V - 1
        return check_model_loss(model, CrossEntropyLoss(), dev(idx, None), dev(rng.integers(0, 3, B + 1), None),
                                eps=1e-5)

    return [
        ("RMSNorm", lambda: check_layer(randomized(RMSNorm(C, dtype=F64)), randn(B, T, C))),
        ("RMSNorm per head (QK-norm)", lambda: check_layer(randomized(RMSNorm(4, dtype=F64)), randn(B, T, 2, 4))),
        ("SiLU", lambda: check_layer(SiLU(), randn(B, T, C) * 2)),
        ("RoPE (llama3 scaling)", lambda: check_layer(rope, randn(B, 2, T, 6))),
        ("RoPE (offset 7)", lambda: check_layer(_Offset(rope, 7), randn(B, 2, T, 6))),
        ("SwiGLU", lambda: check_layer(randomized(SwiGLU(C, 12, dtype=F64)), randn(B, T, C))),
        ("GroupedQueryAttention", lambda: gqa_check("dense", qk_norm=False)),
        ("GQA + QK-norm", lambda: gqa_check("dense", qk_norm=True)),
        ("GQA + QK-norm (blockwise)", lambda: gqa_check("blockwise", qk_norm=True)),
        ("Llama + loss (tied)", llama_check("llama", True)),
        ("Llama + loss (untied)", llama_check("llama", False)),
        ("Qwen3 + loss (tied)", llama_check("qwen3", True)),
        ("Qwen3 + LoRA + loss", llama_check("qwen3", False, lora=True)),
        ("Llama classifier + LoRA + loss", classifier_check),
    ]


def _encdec_checks(d: _Draws) -> list:
    """The encoder-decoder (issue 19): its ops with key padding masks, its blocks and the
    whole model."""
    from .encdec import DecoderBlock, EncDecConfig, EncoderBlock, EncoderDecoder
    from .nn import CrossAttention, CrossEntropyLoss, MultiHeadAttention, SinusoidalPositionalEncoding

    F64, dev, randn, randomized, fixed_masks = d.F64, d.dev, d.randn, d.randomized, d.fixed_masks
    S = T + 2
    cfg = EncDecConfig(vocab_size=V, context_length=8, emb_dim=C, n_heads=NH, drop_rate=0.2, dtype=F64)

    def source_padding(S):
        """(B, S) bool key padding mask, True at padding: row 0 padded after 2 keys, row 1 unpadded."""
        pad = numpy.zeros((B, S), bool)
        pad[0, 2:] = True
        return dev(pad, None)

    def masked_self_attention_check():
        layer = randomized(MultiHeadAttention(C, C, NH, dropout=0.2, qkv_bias=True, dtype=F64, causal=False))
        pad = source_padding(T)
        return check_gradients(lambda x: layer(x, key_padding_mask=pad), layer.backward, {"x": randn(B, T, C)},
                               dict(layer.named_parameters()), before_forward=fixed_masks)

    def model_check(norm_first: bool, lora: bool = False):
        def run():
            # with lora: adapters on every Linear of both stacks and the untied head, B drawn away
            # from 0 with the rest, so every adapter gradient is exercised (the frozen weights are not checked)
            lora_cfg = dict(tie_weights=False, lora_rank=2, lora_alpha=3.0) if lora else {}
            model = randomized(EncoderDecoder(cfg.replace(norm_first=norm_first, **lora_cfg), seed=0), scale=0.3)
            for name, p in model.named_parameters():
                if "ln_" in name and name.endswith(".weight"):
                    p.data += 1.0  # scales near 1: a chain of post-LN norms at 0.3 leaves no gradient
            src = numpy.arange(B * S).reshape(B, S) % (V - 1) + 1
            src[0, 3:] = cfg.pad_id
            targets = numpy.arange(B * T).reshape(B, T) % V
            targets[1, 2] = -100
            return check_model_loss(model, CrossEntropyLoss(), (dev(src, None), dev(src[:, :T], None)),
                                    dev(targets, None), eps=1e-5, before_forward=fixed_masks)
        return run

    def positional_check():
        layer = SinusoidalPositionalEncoding(C, max_length=2 * T, dtype=F64)
        return check_gradients(lambda x: layer(x, start=2), layer.backward, {"x": randn(B, T, C)}, {})

    return [
        ("SinusoidalPositionalEncoding", positional_check),
        ("Self-attention (pad mask)", masked_self_attention_check),
        ("CrossAttention (pad mask)", lambda: check_layer(
            randomized(CrossAttention(C, C, C, NH, dropout=0.2, qkv_bias=True, dtype=F64)), randn(B, T, C),
            randn(B, S, C), source_padding(S), input_names=["x", "memory", "key_padding_mask"],
            before_forward=fixed_masks)),
        ("EncoderBlock (pad mask)", lambda: check_layer(
            randomized(EncoderBlock(cfg)), randn(B, S, C), source_padding(S), input_names=["x", "src_pad"],
            before_forward=fixed_masks)),
        ("DecoderBlock (post-LN)", lambda: check_layer(
            randomized(DecoderBlock(cfg.replace(norm_first=False))), randn(B, T, C), randn(B, S, C),
            source_padding(S), input_names=["x", "memory", "src_pad"], before_forward=fixed_masks)),
        ("EncoderDecoder + loss", model_check(True)),
        ("EncDec (post-LN) + loss", model_check(False)),
        ("EncDec + LoRA + loss", model_check(False, lora=True)),
    ]


class _Offset(Module):
    """A RoPE applied at positions start, start + 1, ... (tokens after a KV cache)."""

    def __init__(self, rope, start: int):
        self.rope, self.start = rope, start

    def forward(self, x):
        return self.rope.forward(x, self.start)

    def backward(self, dout):
        return self.rope.backward(dout)


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
