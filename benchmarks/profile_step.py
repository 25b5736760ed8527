"""Where numpygpt's training step spends its time, by op and by source line.

    python benchmarks/profile_step.py                         # GPT-2 small, batch 2, context 256
    python benchmarks/profile_step.py --config small --lines 40
    python benchmarks/profile_step.py --cprofile              # plain cProfile by tottime instead

How it measures: every function of numpygpt's layers, model, optimiser and backend is
recompiled with a timer around each statement (an AST rewrite of the real source, so
it follows the code as it changes), and every module instance's forward/backward is
tagged with its role (``attn.c_attn``, ``mlp.gelu``, ``lm_head``...). A statement's
time is its *self* time: the time of the statements it calls is taken out and
charged to them. A statement like ``y = x2 @ W`` therefore measures one BLAS call,
and ``dx -= xhat * (g * xhat).mean(...)`` one line's worth of element-wise passes.
Only the main thread is timed (work handed to a thread pool is charged to the line
that waits for it). Each statement costs two timer reads, ~1 us, against steps of
seconds; the report gives the step time with and without the timers.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import sys
import textwrap
import threading
import time
import types
from collections import defaultdict

import common

common.early_threads()

import numpy  # noqa: E402,F401  (after early_threads: BLAS starts with the thread count)

import numpygpt  # noqa: E402
from numpygpt import CrossEntropyLoss, GPTModel  # noqa: E402
from numpygpt.optim import AdamW, param_groups  # noqa: E402

_PROF_NAME = "__numpygpt_prof__"


# -- the statement profiler -------------------------------------------------------------------

class StatementProfiler:
    """Self time per (role, phase, statement), main thread only."""

    def __init__(self):
        self.stmts: list[tuple[str, str, int, str]] = []  # id -> (qualname, file, line, source)
        self.self_time = defaultdict(float)  # (role, phase, stmt id) -> seconds
        self.calls = defaultdict(int)
        self.stack: list[list] = []  # [stmt id, t0, child seconds]
        self.roles: list[tuple[str, str]] = [("driver", "")]
        self.main = threading.get_ident()
        self.enabled = False

    def register(self, qualname: str, filename: str, lineno: int, source: str) -> int:
        self.stmts.append((qualname, filename, lineno, source))
        return len(self.stmts) - 1

    def enter(self, sid: int) -> None:
        if self.enabled and threading.get_ident() == self.main:
            self.stack.append([sid, time.perf_counter(), 0.0, self.roles[-1]])

    def exit(self) -> None:
        if self.enabled and threading.get_ident() == self.main and self.stack:
            sid, t0, child, role = self.stack.pop()
            el = time.perf_counter() - t0
            key = (role[0], role[1], sid)
            self.self_time[key] += el - child
            self.calls[key] += 1
            if self.stack:
                self.stack[-1][2] += el

    def reset(self) -> None:
        self.self_time.clear()
        self.calls.clear()


class _Instrument(ast.NodeTransformer):
    """Wrap every statement of a function body (recursively) in enter(id) / try / finally exit()."""

    def __init__(self, prof: StatementProfiler, qualname: str, filename: str, lines: list[str]):
        self.prof, self.qualname, self.filename, self.lines = prof, qualname, filename, lines

    def wrap(self, body: list) -> list:
        out = []
        for stmt in body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out.append(stmt)  # nested definitions: defining is free; not timed
                continue
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
                out.append(stmt)  # docstring
                continue
            if isinstance(stmt, ast.Global) or isinstance(stmt, ast.Nonlocal):
                out.append(stmt)
                continue
            for field in ("body", "orelse", "finalbody"):
                inner = getattr(stmt, field, None)
                if isinstance(inner, list) and inner:
                    setattr(stmt, field, self.wrap(inner))
            for h in getattr(stmt, "handlers", []) or []:
                h.body = self.wrap(h.body)
            src = self.lines[stmt.lineno - 1].strip() if stmt.lineno - 1 < len(self.lines) else "?"
            sid = self.prof.register(self.qualname, self.filename, stmt.lineno, src)
            prof = ast.Name(id=_PROF_NAME, ctx=ast.Load())
            enter = ast.Expr(ast.Call(ast.Attribute(prof, "enter", ast.Load()), [ast.Constant(sid)], []))
            leave = ast.Expr(ast.Call(ast.Attribute(ast.Name(id=_PROF_NAME, ctx=ast.Load()), "exit", ast.Load()), [], []))
            out += [enter, ast.Try(body=[stmt], handlers=[], orelse=[], finalbody=[leave])]
        return out


def instrument_function(fn, prof: StatementProfiler):
    """A copy of fn whose statements are timed, or None when it can't be rewritten."""
    code = fn.__code__
    if code.co_freevars or code.co_flags & (inspect.CO_GENERATOR | inspect.CO_COROUTINE):
        return None  # closures (super(), nested functions) and generators stay as they are
    try:
        src = textwrap.dedent(inspect.getsource(fn))
        filename = inspect.getsourcefile(fn)
        with open(filename) as f:
            file_lines = f.read().splitlines()
    except (OSError, TypeError):
        return None
    tree = ast.parse(src)
    fdef = tree.body[0]
    if not isinstance(fdef, ast.FunctionDef):
        return None
    fdef.decorator_list = []
    ast.increment_lineno(tree, code.co_firstlineno - 1)
    fdef.body = _Instrument(prof, fn.__qualname__, filename, file_lines).wrap(fdef.body)
    ast.fix_missing_locations(tree)
    g = fn.__globals__  # the module's own globals: later patches and `global` stay live
    g[_PROF_NAME] = prof
    ns: dict = {}
    exec(compile(tree, filename, "exec"), g, ns)
    new = ns[fdef.name]
    new.__defaults__, new.__kwdefaults__ = fn.__defaults__, fn.__kwdefaults__
    new.__qualname__ = fn.__qualname__
    new.__wrapped_original__ = fn
    return new


# names that are not worth a timer (called per op; microseconds) or must not change
_SKIP = {"__init__", "__repr__", "__getattr__", "no_grad", "device", "__call__", "is_grad_enabled",
         "array_module", "is_cupy_array", "get_device", "get_xp", "device_of", "_resolve"}


def instrument_numpygpt(prof: StatementProfiler) -> list:
    """Rewrite the functions of numpygpt's compute modules; returns undo records."""
    import importlib
    import pkgutil

    mods = [numpygpt.backend, numpygpt.model, importlib.import_module("numpygpt.optim")]
    import numpygpt.nn as nn_pkg

    for info in pkgutil.iter_modules(nn_pkg.__path__):
        mods.append(importlib.import_module(f"numpygpt.nn.{info.name}"))
    undo = []
    # module-level functions first, so methods compiled afterwards see them through globals
    for mod in mods:
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, types.FunctionType) and obj.__module__ == mod.__name__ and name not in _SKIP:
                new = instrument_function(obj, prof)
                if new is not None:
                    setattr(mod, name, new)
                    undo.append((mod, name, obj))
    for mod in mods:
        for cname, cls in list(vars(mod).items()):
            if not (isinstance(cls, type) and cls.__module__ == mod.__name__):
                continue
            for name, obj in list(vars(cls).items()):
                if name in _SKIP:
                    continue
                if isinstance(obj, types.FunctionType):
                    new = instrument_function(obj, prof)
                    if new is not None:
                        setattr(cls, name, new)
                        undo.append((cls, name, obj))
                elif isinstance(obj, staticmethod) and isinstance(obj.__func__, types.FunctionType):
                    new = instrument_function(obj.__func__, prof)
                    if new is not None:
                        setattr(cls, name, staticmethod(new))
                        undo.append((cls, name, obj))
    return undo


def undo_instrumentation(undo) -> None:
    for owner, name, obj in reversed(undo):
        setattr(owner, name, obj)


def role_of(dotted: str) -> str:
    """'h.3.attn.c_attn' -> 'attn.c_attn'; '' -> 'model'."""
    parts = dotted.split(".")
    if len(parts) >= 2 and parts[0] == "h" and parts[1].isdigit():
        parts = parts[2:]
        return ".".join(parts) if parts else "block"
    return dotted or "model"


def tag_roles(model, loss_fn, opt, prof: StatementProfiler) -> None:
    """Give each module instance forward/backward wrappers that push (role, phase)."""

    def tagged(bound, role, phase):
        def call(*a, **k):
            prof.roles.append((role, phase))
            try:
                return bound(*a, **k)
            finally:
                prof.roles.pop()
        return call

    named = [("", model)]

    def walk(prefix, m):
        for name, child in m.named_children():
            full = f"{prefix}.{name}" if prefix else name
            named.append((full, child))
            walk(full, child)

    walk("", model)
    for dotted, m in named:
        role = role_of(dotted)
        for phase in ("forward", "backward"):
            setattr(m, phase, tagged(getattr(m, phase), role, phase))
    loss_fn.forward = tagged(loss_fn.forward, "cross-entropy", "forward")
    loss_fn.backward = tagged(loss_fn.backward, "cross-entropy", "backward")
    opt.step = tagged(opt.step, "AdamW", "step")
    opt.zero_grad = tagged(opt.zero_grad, "zero_grad", "step")


# -- grouping ---------------------------------------------------------------------------------

def op_group(role: str, phase: str) -> str:
    """The op class a (role, phase) belongs to, for the summary table."""
    ph = {"forward": "fwd", "backward": "bwd"}.get(phase, phase)
    if role in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        return f"Linear {ph} (c_attn, c_proj, c_fc)"
    if role == "lm_head":
        return f"lm_head {ph} (x @ W.T, V = vocab)"
    if role == "attn":
        return f"attention core {ph} (q k^T, att v, mask, head reshapes)"
    if role == "attn.softmax":
        return f"softmax {ph}"
    if role in ("ln_1", "ln_2", "ln_f"):
        return f"LayerNorm {ph}"
    if role == "mlp.gelu":
        return f"GELU {ph}"
    if role == "cross-entropy":
        return f"cross-entropy {ph}"
    if role in ("wte", "wpe"):
        return f"embeddings {ph}"
    if role in ("block", "model", "mlp"):
        return f"residual adds / glue {ph}"
    if "drop" in role:
        return f"dropout (p=0) {ph}"
    return f"{role} {ph}".strip()


def is_matmul(source: str) -> bool:
    return " @ " in source or "matmul(" in source or ".dot(" in source


# -- running ----------------------------------------------------------------------------------

def build(cfg_name: str, B: int, T: int | None, before: bool = False):
    """The model, loss, optimiser and a step function; ``before``: the code as it was before
    the blockwise attention and numpygpt.parallel (dense attention, element-wise layers on
    one thread in one piece)."""
    cfg = common.make_config(cfg_name, context=T, attn_impl="dense" if before else "auto")
    model = GPTModel(cfg, seed=0)
    loss_fn = CrossEntropyLoss()
    opt = AdamW(param_groups(model, 0.1), lr=3e-4, weight_decay=0.1)
    x, y = common.random_batch(cfg, B, cfg.context_length)
    if before:
        numpygpt.parallel.set_num_threads(1)
        numpygpt.parallel.CHUNK_BYTES = 1 << 62

    def step():
        logits = model(x)
        loss_fn(logits, y)
        del logits
        model.backward(loss_fn.backward())
        opt.step()
        opt.zero_grad()

    return cfg, model, loss_fn, opt, step


def report(prof: StatementProfiler, n_steps: int, step_plain: float, step_prof: float, n_lines: int, cfg, B) -> str:
    per = {k: v / n_steps for k, v in prof.self_time.items()}
    total = step_prof
    accounted = sum(per.values())
    by_group = defaultdict(float)
    by_role = defaultdict(float)
    matmul = 0.0
    by_line = defaultdict(float)
    kind = defaultdict(lambda: [0.0, 0.0])  # group -> [matmul, other]
    for (role, phase, sid), t in per.items():
        q, f, ln, src = prof.stmts[sid]
        g = op_group(role, phase)
        by_group[g] += t
        kind[g][0 if is_matmul(src) else 1] += t
        ph = {"forward": "fwd", "backward": "bwd"}.get(phase, phase)
        by_role[f"{role} {ph}"] += t
        by_line[(q, f, ln, src)] += t
        if is_matmul(src):
            matmul += t
    out = []
    out.append(f"### Profile of one numpygpt training step ({cfg.n_layers} layers, C={cfg.emb_dim}, "
               f"V={cfg.vocab_size}, B x T = {B} x {cfg.context_length}, float32, AdamW)\n")
    out.append(f"Step time {step_plain * 1e3:.0f} ms without timers, {step_prof * 1e3:.0f} ms with them "
               f"(mean of {n_steps} profiled steps); {accounted / total:.0%} of it is inside timed numpygpt code. "
               f"BLAS matmul lines (`@`): {matmul * 1e3:.0f} ms = **{matmul / total:.0%}** of the step; "
               f"everything else (element-wise NumPy, copies, allocation, Python): "
               f"{(accounted - matmul) * 1e3:.0f} ms = **{(accounted - matmul) / total:.0%}**.\n")
    rows = [[g, f"{t * 1e3:.0f}", f"{t / total:.1%}", f"{kind[g][0] * 1e3:.0f}", f"{kind[g][1] * 1e3:.0f}"]
            for g, t in sorted(by_group.items(), key=lambda kv: -kv[1])]
    rows.append(["(outside numpygpt: the driver loop)", f"{(total - accounted) * 1e3:.0f}",
                 f"{(total - accounted) / total:.1%}", "", ""])
    out.append("By op (self time, summed over layers; split into BLAS matmul lines and the rest):\n")
    out.append(common.md_table(["op", "ms / step", "share", "of which matmul ms", "other ms"], rows))
    rows = [[r, f"{t * 1e3:.0f}", f"{t / total:.1%}"] for r, t in sorted(by_role.items(), key=lambda kv: -kv[1])[:25]]
    out.append("\nBy module role and phase (top 25):\n")
    out.append(common.md_table(["role phase", "ms / step", "share"], rows))
    rows = []
    import os

    for (q, f, ln, src), t in sorted(by_line.items(), key=lambda kv: -kv[1])[:n_lines]:
        rel = os.path.relpath(f, common.REPO_ROOT)
        src = src if len(src) < 80 else src[:77] + "..."
        rows.append([f"`{rel}:{ln}`", q, f"`{src.replace('|', '/')}`", f"{t * 1e3:.1f}", f"{t / total:.1%}"])
    out.append(f"\nTop {n_lines} source lines (self time, all layers and calls together):\n")
    out.append(common.md_table(["where", "function", "statement", "ms / step", "share"], rows))
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--context", type=int, default=None)
    p.add_argument("--steps", type=int, default=3, help="profiled steps (averaged)")
    p.add_argument("--lines", type=int, default=25, help="how many source lines to list")
    p.add_argument("--cprofile", action="store_true", help="cProfile by tottime instead of the statement timers")
    p.add_argument("--before", action="store_true",
                   help="profile the code as before the blockwise attention and threaded layers")
    p.add_argument("--max-load", type=float, default=0.1,
                   help="drop steps during which other processes used more of the machine than this")
    args = p.parse_args(argv)
    common.apply_threads(args.threads, torch_too=False)

    cfg, model, loss_fn, opt, step = build(args.config, args.batch, args.context, args.before)
    step()  # warm-up: the optimiser's moments are allocated on the first step

    def quiet_steps(fn, n: int):
        """Run fn until n calls saw little other load (or 4n calls); yields (seconds, load, kept)."""
        kept = 0
        for _ in range(4 * n):
            mon = common.LoadMonitor().start()
            t0 = time.perf_counter()
            fn()
            dt, load = time.perf_counter() - t0, mon.stop()
            ok = load <= args.max_load
            kept += ok
            yield dt, load, ok
            if kept >= n:
                return

    plain_runs = list(quiet_steps(step, 2))
    plain = common.median([dt for dt, _, ok in plain_runs if ok] or [dt for dt, _, _ in plain_runs])

    if args.cprofile:
        import cProfile
        import io
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        for _ in range(args.steps):
            step()
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(args.lines)
        print(f"step {plain * 1e3:.0f} ms without profiler\n")
        print(s.getvalue())
        return 0

    prof = StatementProfiler()
    undo = instrument_numpygpt(prof)
    tag_roles(model, loss_fn, opt, prof)
    step()  # one profiled warm-up
    # profile step by step; a step during which other processes were busy is dropped
    runs = []  # (seconds, load, kept, {key: self seconds})
    prof.enabled = True
    for dt, load, ok in quiet_steps(step, args.steps):
        runs.append((dt, load, ok, dict(prof.self_time)))
        prof.reset()
    prof.enabled = False
    undo_instrumentation(undo)
    use = [r for r in runs if r[2]]
    if not use:
        print("warning: no profiled step ran on a quiet machine; reporting them all", file=sys.stderr)
        use = runs
    total = defaultdict(float)
    for _, _, _, d in use:
        for k, v in d.items():
            total[k] += v
    kept_times, loads = [r[0] for r in use], [r[1] for r in use]
    prof.self_time = total
    n = len(kept_times)
    print(report(prof, n, plain, sum(kept_times) / n, args.lines, cfg, args.batch))
    worst = max(loads)
    n_quiet = sum(1 for r in runs if r[2])
    print(f"\n{n} profiled steps reported ({n_quiet} of the {len(runs)} run had other load under "
          f"{args.max_load:.0%}); other load during the reported ones: at most {worst:.0%}"
          + (" (too high: rerun on a quiet machine)" if not worst <= args.max_load else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
