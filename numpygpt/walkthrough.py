"""Watch one backward pass of a tiny GPT (or Llama, Qwen3), op by op, each op checked against
finite differences.

    python examples/backward_walkthrough.py        # or: numpygpt walkthrough [--arch llama]

``trace_backward`` runs one forward and one backward pass of a real ``GPTModel`` (the
model's own code, unchanged) while recording, for every op, what its forward saw
(inputs, the dropout generator's state) and what its backward received and returned
(``dout``, ``dx``, and what it added into each parameter's ``.grad``). ``check_step``
then checks one recorded op against centred differences of the scalar

    L(x, W) = sum(op(x; W) * dout)

whose gradient is exactly what the backward returned (dL/dx = dx) and added (dL/dW).
Replaying the generator's state makes a dropout mask the same on every replay, so the
check compares the very numbers the model's backward produced.

The printout lists the ops in the order the backward runs them, loss first and
embeddings last, with the residual additions between: in a pre-LayerNorm block the
gradient of the residual stream passes every block unchanged and each branch adds its
share, so ``|dx|`` barely moves from block to block.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

import numpy

from . import backend
from .config import GPTConfig, LlamaConfig
from .gradcheck import centred_differences, relative_error
from .llama import LlamaBlock, LlamaDecoder, LlamaModel
from .model import FeedForward, GPTModel, TransformerBlock
from .nn import CrossEntropyLoss, GroupedQueryAttention, Module, MultiHeadAttention, SwiGLU, no_grad

__all__ = ["Step", "trace_backward", "check_step", "walkthrough", "format_walkthrough", "main"]

COMPOSITES = (TransformerBlock, MultiHeadAttention, FeedForward,  # modules made of traced modules
              LlamaDecoder, LlamaBlock, GroupedQueryAttention, SwiGLU)
ARCHS = ("gpt2", "llama", "qwen3")
# each block's residual norms: (the first branch's, the second's)
RESIDUAL_NORMS = {TransformerBlock: ("ln_1", "ln_2"), LlamaBlock: ("input_layernorm", "post_attention_layernorm")}
DEFAULT_TEXT = "The for statement is used to iterate over the elements of a sequence"


@dataclass
class Step:
    """One op's forward inputs and backward traffic, as the model's own pass produced them."""

    name: str                  # dotted name in the model ('h.0.mlp.c_fc'), 'loss' for the loss
    module: Module
    depth: int                 # nesting: the dots in its name (h.0 is 1, h.0.attn.c_proj 3)
    args: tuple                # what forward was called with (copies)
    kwargs: dict
    rng_state: dict            # dropout generator before forward, to replay its masks
    dout: object = None        # gradient arriving at the op's output
    dx: object = None          # gradient it returned for its input (None for token ids)
    dparams: dict = field(default_factory=dict)  # name -> (Parameter, what this op added to its .grad)
    started: int = -1          # clock ticks: when its backward began ...
    order: int = -1            # ... and when it finished (one clock for all ops)


def _named_modules(module: Module, prefix: str = "", _seen=None):
    """(dotted name, module) below ``module``; a module shared by several parents (Llama's
    one RoPE) once, under its first name."""
    seen = set() if _seen is None else _seen
    for name, child in module.named_children():
        if id(child) in seen:
            continue
        seen.add(id(child))
        full = prefix + name
        yield full, child
        yield from _named_modules(child, full + ".", seen)


def _copy(a):
    return a.copy() if hasattr(a, "copy") and not isinstance(a, dict) else a


def trace_backward(model: GPTModel, loss_fn: CrossEntropyLoss, idx, targets):
    """Run loss_fn(model(idx), targets) and its backward, recording every op.

    Returns (loss, steps): ``steps`` in the order their backward passes finished, each a
    ``Step``. Composite modules (blocks, attention, MLP) are recorded too; their
    ``started`` field says when their backward began. The model's parameters end up
    with the same ``.grad`` as ``model.backward`` alone would give them.
    """
    named = [("loss", loss_fn, 0)] + [(n, m, n.count(".")) for n, m in _named_modules(model)]
    owner = {id(p): n for n, p in model.named_parameters()}
    steps: dict[int, Step] = {}
    clock = [0]

    def tick() -> int:
        clock[0] += 1
        return clock[0]

    originals = []

    def wrap(name, module, depth):
        fwd, bwd = module.forward, module.backward
        originals.append((module, fwd, bwd))
        # a parameter shared with another op (the tied head's weight is wte.weight) under its model name
        params = {n if owner.get(id(p)) in (None, f"{name}.{n}") else owner[id(p)]: p
                  for n, p in module.named_parameters()}

        def forward(*args, **kwargs):
            steps[id(module)] = Step(name, module, depth, tuple(_copy(a) for a in args), dict(kwargs),
                                     backend.get_rng_state())
            return fwd(*args, **kwargs)

        def backward(dout):
            step = steps[id(module)]
            step.started = tick()
            before = {n: None if p.grad is None else p.grad.copy() for n, p in params.items()}
            dx = bwd(dout)
            step.dout, step.dx = _copy(dout), _copy(dx)
            for n, p in params.items():
                if p.grad is not None:  # a copy: a tied weight's .grad keeps growing
                    step.dparams[n] = (p, p.grad.copy() if before[n] is None else p.grad - before[n])
            step.order = tick()
            return dx

        module.forward, module.backward = forward, backward

    for name, module, depth in named:
        wrap(name, module, depth)
    try:
        model.zero_grad()
        loss = loss_fn(model(idx), targets)
        model.backward(loss_fn.backward(1.0))
    finally:
        for module, _, _ in originals:  # back to the class's own methods
            del module.forward, module.backward
    loss_step = steps[id(loss_fn)]  # its "input gradient" is dlogits, its dout dL/dL = 1
    loss_step.dout = numpy.asarray(1.0, dtype=loss_step.dx.dtype)
    return float(loss), sorted(steps.values(), key=lambda s: s.order)


def _coords(a: numpy.ndarray, n: int, rng) -> numpy.ndarray:
    """Flat indices to check: the n largest |a| and n random ones. The largest make the
    check meaningful where most entries are 0 (an embedding's unused rows); the random
    ones would catch a backward that wrongly leaves an entry at 0."""
    flat = numpy.abs(a.reshape(-1))
    top = numpy.argpartition(flat, flat.size - n)[-n:] if flat.size > n else numpy.arange(flat.size)
    rand = rng.choice(flat.size, size=min(n, flat.size), replace=False)
    return numpy.unique(numpy.concatenate([top, rand]))


def check_step(step: Step, eps: float = 1e-6, n_coords: int = 8, seed: int = 0) -> dict:
    """{tensor name: relative error} of the recorded backward of one op against centred
    differences of sum(op(x; W) * dout), with the op's dropout masks replayed."""
    rng = numpy.random.default_rng(seed)
    module = step.module
    dout = backend.to_host(step.dout)

    def objective() -> float:
        backend.set_rng_state(step.rng_state)
        with no_grad():
            y = module.forward(*step.args, **step.kwargs)
        return float((backend.to_host(y) * dout).sum())

    targets = []
    if step.dx is not None:
        x = step.args[0]
        if numpy.issubdtype(x.dtype, numpy.floating):
            targets.append(("x", x, step.dx))
    for name, (p, g) in step.dparams.items():
        targets.append((name, p.data, g))

    errors = {}
    for name, x, g in targets:
        g = backend.to_host(g).reshape(-1)
        coords = _coords(g, n_coords, rng)
        errors[name] = relative_error(g[coords], centred_differences(objective, x, coords, eps))
    return errors


def _norm(a) -> float:
    return float(numpy.linalg.norm(backend.to_host(a)))


def _shape(a) -> str:
    return "-" if a is None else "(" + ", ".join(str(d) for d in numpy.shape(a)) + ")"


def walkthrough(text: str = DEFAULT_TEXT, n_layers: int = 2, emb_dim: int = 16, n_heads: int = 2,
                drop_rate: float = 0.1, seed: int = 0, check: bool = True, arch: str = "gpt2") -> dict:
    """One traced forward + backward of a tiny float64 model on ``text`` (GPT-2 tokens):
    GPT-2 (``arch="gpt2"``), or Llama 3 / Qwen3 ("llama", "qwen3": n_heads / 2 key/value
    heads, llama3 RoPE scaling from position 8, no dropout).

    Returns {"cfg", "loss", "tokens", "steps", "errors"}: ``errors`` maps each step's
    name to its {tensor: relative error} (empty when ``check`` is False).
    """
    from .tokenizer import N_VOCAB, text_to_token_ids

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    ids = numpy.asarray(text_to_token_ids(text), dtype=numpy.int64)
    if ids.size < 2:
        raise ValueError("the walkthrough needs a text of at least two tokens")
    T = ids.size - 1
    if arch == "gpt2":
        cfg = GPTConfig(vocab_size=N_VOCAB, context_length=T, emb_dim=emb_dim, n_heads=n_heads,
                        n_layers=n_layers, drop_rate=drop_rate, qkv_bias=True, tie_weights=True, dtype="float64")
    else:
        rope = dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8)
        cfg = LlamaConfig(model_type=arch, vocab_size=N_VOCAB, context_length=T, emb_dim=emb_dim, n_heads=n_heads,
                          n_kv_heads=max(1, n_heads // 2), hidden_dim=2 * emb_dim, n_layers=n_layers,
                          rope_scaling=rope, tie_weights=True, dtype="float64", attn_impl="dense")
    with backend.device("cpu"):
        model = (GPTModel if arch == "gpt2" else LlamaModel)(cfg, seed=seed).train()
        backend.manual_seed(seed)
        loss, steps = trace_backward(model, CrossEntropyLoss(), ids[None, :-1], ids[None, 1:])
        # the whole decoder stack (Llama's "model") is checked through its parts: checking it
        # whole would rerun every layer for each sampled coordinate of each of its parameters
        errors = {s.name: check_step(s, seed=seed) for s in steps if not isinstance(s.module, LlamaDecoder)} \
            if check else {}
    return {"cfg": cfg, "loss": loss, "tokens": T, "steps": steps, "errors": errors}


def _residual_lines(steps: list[Step]) -> dict:
    """Lines for the two residual additions of each block, keyed by the name of the
    LayerNorm after whose backward they happen.

    In the forward x1 = x + attn_branch(ln_1(x)), x2 = x1 + mlp_branch(ln_2(x1)); so
    backward dx1 = dx2 + ln_2.dx and dx = dx1 + ln_1.dx.
    """
    by_name = {s.name: s for s in steps}
    lines = {}
    for s in steps:
        norms = RESIDUAL_NORMS.get(type(s.module)) or RESIDUAL_NORMS.get(type(s.module).__mro__[1])
        if norms is None:
            continue
        ln_1, ln_2 = (by_name[f"{s.name}.{n}"] for n in norms)
        dx1 = s.dout + ln_2.dx
        dx0 = dx1 + ln_1.dx
        if not numpy.allclose(dx0, s.dx):
            raise RuntimeError(f"{s.name}: the block's dx is not the sum of its residual paths")
        for ln, stream, out in ((ln_2, s.dout, dx1), (ln_1, dx1, dx0)):
            lines[ln.name] = (f"+ residual of {s.name}: the stream's gradient ({_norm(stream):.3e}) passes "
                              f"straight through, plus {ln.name}'s dx ({_norm(ln.dx):.3e}) = {_norm(out):.3e}")
    return lines


def format_walkthrough(result: dict) -> str:
    """The walkthrough as a table, in backward order."""
    cfg, steps, errors = result["cfg"], result["steps"], result["errors"]
    if isinstance(cfg, LlamaConfig):
        what = (f"{cfg.model_type} model: emb_dim {cfg.emb_dim}, {cfg.n_heads} query heads sharing "
                f"{cfg.n_kv_heads} key/value head{'s' if cfg.n_kv_heads > 1 else ''}, RoPE" + (", QK-norm" if cfg.qk_norm else ""))
    else:
        what = f"GPT: emb_dim {cfg.emb_dim}, {cfg.n_heads} heads, dropout {cfg.drop_rate}"
    lines = [
        f"one backward pass of a {cfg.n_layers}-layer {what}, vocab {cfg.vocab_size}, tied head, float64; "
        f"1 x {result['tokens']} tokens, loss {result['loss']:.4f}",
        "rows in the order the backward runs; |.| is the Frobenius norm; 'fd error' is the worst relative",
        "error of the op's dx and parameter gradients against centred differences of sum(op(x) * dout)",
        "",
        f"{'op':<40} {'dout shape':<16} {'dx shape':<15} {'|dout|':>9} {'|dx|':>9} {'fd error':>8}  "
        "parameter gradients added",
    ]
    residual = _residual_lines(steps)
    # a composite (block, attention, MLP) opens where its backward starts and closes where it ends
    events = [(s.started, s, "begins") for s in steps if isinstance(s.module, COMPOSITES)]
    events += [(s.order, s, "ends" if isinstance(s.module, COMPOSITES) else "") for s in steps]
    for _, s, what in sorted(events, key=lambda e: e[0]):
        pad = "  " * s.depth
        label = f"{pad}{s.name} ({type(s.module).__name__})"
        if what == "begins":
            lines.append(f"{label} backward begins")
            continue
        if s.name.endswith(".attn.attn_dropout"):
            lines.append(f"{pad}(y = A' v, inside the attention's backward: dA' = dy v^T, dv = A'^T dy)")
        err = errors.get(s.name)
        err_txt = f"{max(err.values()):8.1e}" if err else f"{'-':>8}"
        dx_norm = f"{_norm(s.dx):9.3e}" if s.dx is not None else f"{'-':>9}"
        if what:  # a composite: its layers' gradients are listed on their own rows
            grads = f"(its {len(s.dparams)} parameter gradients: rows above)"
        else:
            grads = ", ".join(f"{n} {_norm(g):.2e}" for n, (_, g) in s.dparams.items())
        lines.append(f"{label + (' ends' if what else ''):<40} {_shape(s.dout):<16} {_shape(s.dx):<15} "
                     f"{_norm(s.dout):9.3e} {dx_norm} {err_txt}  {grads}")
        if s.name in residual:
            lines.append(f"{pad}{residual[s.name]}")
        if s.name.endswith(".attn.softmax"):
            lines.append(f"{pad}(S = q k^T / sqrt(hs) + mask: dq = dS k / sqrt(hs), dk = dS^T q / sqrt(hs); "
                         "the masked entries' dS is exactly 0)")
        elif s.name.endswith(".self_attn.softmax"):
            lines.append(f"{pad}(S = q k^T / sqrt(hs) + mask, a group's query heads stacked: dk = dS^T q / sqrt(hs) "
                         "and dv = A^T dy sum over the group; then RoPE's backward turns dq, dk by -angle)")
    worst = max((max(e.values()) for e in errors.values() if e), default=float("nan"))
    lines += ["", f"worst fd error over all {len(errors)} ops: {worst:.1e}"]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", choices=ARCHS, default="gpt2", help="the model family (default %(default)s)")
    p.add_argument("--text", default=DEFAULT_TEXT, help="the tokens of the one training step (default: %(default)r)")
    p.add_argument("--n-layers", type=int, default=2, help="(default %(default)s)")
    p.add_argument("--emb-dim", type=int, default=16, help="(default %(default)s)")
    p.add_argument("--n-heads", type=int, default=2, help="(default %(default)s)")
    p.add_argument("--drop-rate", type=float, default=0.1, help="(default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    p.add_argument("--tol", type=float, default=1e-6, help="exit 1 if an op's error exceeds this (default %(default)g)")


def run(args: argparse.Namespace) -> int:
    """Print the walkthrough; 0 if every op is within ``args.tol``, 1 if not, 2 for bad input."""
    try:
        result = walkthrough(args.text, args.n_layers, args.emb_dim, args.n_heads, args.drop_rate, args.seed,
                             arch=getattr(args, "arch", "gpt2"))
    except ValueError as e:
        print(f"numpygpt walkthrough: error: {e}", file=sys.stderr)
        return 2
    print(format_walkthrough(result))
    worst = max(max(e.values()) for e in result["errors"].values() if e)
    return 0 if worst <= args.tol else 1


DESCRIPTION = "One forward and backward pass of a tiny GPT, op by op, each op checked against finite differences."


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=DESCRIPTION)
    add_arguments(p)
    return run(p.parse_args(argv))
