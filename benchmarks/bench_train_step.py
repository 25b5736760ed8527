"""One training step (forward + loss + backward + AdamW update), numpygpt against PyTorch
eager, float32, same configuration, batch, weights and thread count.

    python benchmarks/bench_train_step.py                       # GPT-2 small and 'small'
    python benchmarks/bench_train_step.py --config small --batch 8 --steps 10
    python benchmarks/bench_train_step.py --threads 1 --no-torch
    python benchmarks/bench_train_step.py --configs gpt2-hf --batch 4 --before --compile

``--before`` adds "numpygpt before": this code run as it was before the blockwise
attention and the threaded element-wise layers (``attn_impl="dense"``, numpygpt's thread
pool off, each element-wise layer on its whole array in one piece), interleaved with the
current code in the same process. The process's malloc is set up once for every
implementation (``numpygpt.memory.keep_freed_memory``, PyTorch included); add
``--default-malloc`` to measure all of them with glibc's default instead, which is how the
code before ran. ``--compile`` adds ``torch.compile`` of the SDPA model;
its first steps (compilation) are timed separately and printed under the table.
``--busy N`` keeps N spinning processes running throughout (another program taking a
core); the other-load filter is then off, since they are the load.

Each implementation runs ``--warmup`` untimed steps, then ``--steps`` timed ones; the
table gives the median step, its phases (forward + loss, backward, optimiser), tokens/s,
the achieved model FLOP rate (common.train_flops: 6 N B T + 12 L C T B T), the
throughput relative to PyTorch eager (>1: faster than torch eager) and "other load": the
largest share of the machine's CPU that other processes used during a kept step. The
implementations' steps are interleaved, so such load hits them alike, and a round in
which other load passed ``--max-load`` (10%) is taken again, up to ``--max-rounds``. "cores busy" is the process's CPU time over wall time, in user mode and in the
kernel (mostly page faults on freshly allocated arrays).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import common

common.early_threads()

import numpy  # noqa: E402,F401  (after early_threads: BLAS starts with the thread count)

from numpygpt import CrossEntropyLoss, GPTModel, count_parameters, memory, parallel  # noqa: E402
from numpygpt.optim import AdamW, param_groups  # noqa: E402

LR, WD = 3e-4, 0.1
MAX_LOAD = 0.1  # rounds with more than this share of the machine busy elsewhere are retaken


def numpygpt_stepper(model, x, y, before: bool = False):
    """A function running one training step in phases; returns (loss, t_fwd, t_bwd, t_opt).

    ``before``: the element-wise layers as they were before numpygpt.parallel, one thread
    and one chunk per array (the model should then have attn_impl="dense")."""
    loss_fn = CrossEntropyLoss()
    opt = AdamW(param_groups(model, WD), lr=LR, weight_decay=WD)

    def step():
        if not before:
            return timed_step()
        chunk_bytes = parallel.CHUNK_BYTES
        parallel.CHUNK_BYTES = 1 << 62
        try:
            with parallel.num_threads(1):
                return timed_step()
        finally:
            parallel.CHUNK_BYTES = chunk_bytes

    def timed_step():
        t0 = time.perf_counter()
        logits = model(x)
        loss = float(loss_fn(logits, y))
        del logits
        t1 = time.perf_counter()
        model.backward(loss_fn.backward())
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad()
        t3 = time.perf_counter()
        return loss, t1 - t0, t2 - t1, t3 - t2

    return step


TORCH_ADAMW = {}  # extra keyword arguments for torch.optim.AdamW (--torch-adamw)


def torch_stepper(tmodel, x, y, compile: bool = False):
    import torch
    import torch.nn.functional as F
    from torch_gpt import torch_param_groups

    opt = torch.optim.AdamW(torch_param_groups(tmodel, WD), lr=LR, weight_decay=WD, **TORCH_ADAMW)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y).flatten()
    if compile:
        tmodel = torch.compile(tmodel)  # compiles on the first call (timed as a warm-up step)

    def step():
        t0 = time.perf_counter()
        logits = tmodel(tx)
        loss = F.cross_entropy(logits.flatten(0, 1), ty)
        loss_v = loss.item()
        t1 = time.perf_counter()
        loss.backward()
        del logits, loss
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return loss_v, t1 - t0, t2 - t1, t3 - t2

    return step


def measure_interleaved(steppers: dict, warmup: int, steps: int, max_load: float = MAX_LOAD,
                        max_rounds: int | None = None) -> dict:
    """Warm each stepper up, then take timed steps round-robin (rotating the order each
    round), so load from other work on the machine hits every implementation alike.

    A round in which other processes took more than ``max_load`` of the machine during
    any implementation's step is thrown away and taken again, up to ``max_rounds`` rounds
    in all (default 3 * steps), after waiting (up to a minute) for the machine to be quiet
    again. The clean rounds are kept if there are at least two, otherwise every round is,
    and the "other load" column shows it.
    """
    max_rounds = 3 * steps if max_rounds is None else max_rounds
    out = {}
    for name, step in steppers.items():
        losses, warmup_times = [], []
        for _ in range(warmup):
            t0 = time.perf_counter()
            losses.append(step()[0])
            warmup_times.append(time.perf_counter() - t0)
        out[name] = {"rows": [], "loads": [], "cpu": [], "first_loss": losses[0] if losses else None,
                     "warmup_times": warmup_times}
    names = list(steppers)
    gc.collect()
    rounds = []  # per round: {name: (row, load, cpu)}
    for i in range(max_rounds):
        if rounds and max(v[1] for v in rounds[-1].values()) > max_load:
            # the last round was disturbed: give the other work a minute to finish first
            common.wait_for_quiet(max_load, timeout=60.0, verbose=False)
        k = i % len(names)
        rnd = {}
        for name in names[k:] + names[:k]:
            mon = common.LoadMonitor().start()
            c0 = os.times()
            t0 = time.perf_counter()
            loss, f, b, o = steppers[name]()
            wall = time.perf_counter() - t0
            c1 = os.times()
            rnd[name] = ((wall, f, b, o), mon.stop(), ((c1.user - c0.user) / wall, (c1.system - c0.system) / wall))
            if out[name]["first_loss"] is None:
                out[name]["first_loss"] = loss
        rounds.append(rnd)
        clean = [r for r in rounds if max(v[1] for v in r.values()) <= max_load]
        if len(clean) >= steps:
            break
        if len(rounds) - len(clean) > 0 and len(rounds) >= steps:
            print(f"  round {i + 1}: other load {max(v[1] for v in rnd.values()):.0%}, "
                  f"{len(clean)}/{steps} clean rounds so far", file=sys.stderr)
    clean = [r for r in rounds if max(v[1] for v in r.values()) <= max_load]
    use = clean if len(clean) >= min(steps, 2) else rounds
    for rnd in use:
        for name, (row, load, cpu) in rnd.items():
            out[name]["rows"].append(row)
            out[name]["loads"].append(load)
            out[name]["cpu"].append(cpu)
    results = {}
    for name, d in out.items():
        rows = d["rows"]
        totals = [r[0] for r in rows]
        results[name] = {
            "step": common.median(totals),
            "spread": common.spread(totals),
            "fwd": common.median([r[1] for r in rows]),
            "bwd": common.median([r[2] for r in rows]),
            "opt": common.median([r[3] for r in rows]),
            "first_loss": d["first_loss"],
            "warmup_times": d["warmup_times"],
            "times": totals,
            "other_load": max(d["loads"]),
            # cores kept busy in user and in kernel mode (page faults, zeroing fresh memory)
            "cpu_user": common.median([c[0] for c in d["cpu"]]),
            "cpu_sys": common.median([c[1] for c in d["cpu"]]),
        }
    return results


def run_config(name: str, B: int, T: int | None, warmup: int, steps: int, impls: list[str],
               max_load: float = MAX_LOAD, max_rounds: int | None = None, attn_impl: str = "auto") -> list[dict]:
    """A preset from common.CONFIGS at context T."""
    cfg = common.make_config(name, context=T, attn_impl=attn_impl)
    return run_cfg(cfg, name, B, warmup, steps, impls, max_load, max_rounds)


def run_cfg(cfg, name: str, B: int, warmup: int, steps: int, impls: list[str],
            max_load: float = MAX_LOAD, max_rounds: int | None = None) -> list[dict]:
    """Time numpygpt and the torch implementations on one GPTConfig; one dict per impl."""
    T = cfg.context_length
    x, y = common.random_batch(cfg, B, T)
    flops = common.train_flops(cfg, B, T)
    steppers = {}
    for impl in impls:
        np_model = GPTModel(cfg, seed=0)
        if impl == "numpygpt":
            steppers[impl] = numpygpt_stepper(np_model, x, y)
        elif impl == "numpygpt before":
            steppers[impl] = numpygpt_stepper(GPTModel(cfg.replace(attn_impl="dense"), seed=0), x, y, before=True)
        else:
            from torch_gpt import TorchGPT, load_numpygpt_weights

            compiled = impl == "torch compile"
            tmodel = TorchGPT(cfg, attn_impl="sdpa" if compiled else impl.split()[-1])
            load_numpygpt_weights(tmodel, np_model)  # the same initial weights
            steppers[impl] = torch_stepper(tmodel, x, y, compile=compiled)
        del np_model
    measured = measure_interleaved(steppers, warmup, steps, max_load, max_rounds)
    del steppers
    gc.collect()
    return table_rows(measured, impls, name, B, T, count_parameters(cfg), flops)


def table_rows(measured: dict, impls: list[str], name: str, B: int, T: int, params: int, flops: float) -> list[dict]:
    """measure_interleaved's results, one dict per implementation with what ``table`` shows."""
    results = []
    for impl in impls:
        r = measured[impl]
        r.update(impl=impl, config=name, B=B, T=T, params=params, flops=flops,
                 tokens_per_s=B * T / r["step"], flop_rate=flops / r["step"])
        results.append(r)
    return results


def table(results: list[dict]) -> str:
    rows = []
    ref = {(r["config"], r["B"], r["T"]): r["tokens_per_s"] for r in results if r["impl"] == "torch eager"}
    for r in results:
        key = (r["config"], r["B"], r["T"])
        ratio = r["tokens_per_s"] / ref[key] if key in ref else float("nan")
        rows.append([
            r["config"], common.fmt_params(r["params"]), f"{r['B']}x{r['T']}", r["impl"],
            f"{r['step'] * 1e3:.0f}", f"{r['spread'] * 100:.0f}%",
            f"{r['fwd'] * 1e3:.0f} / {r['bwd'] * 1e3:.0f} / {r['opt'] * 1e3:.0f}",
            f"{r['tokens_per_s']:.0f}", f"{r['flop_rate'] / 1e9:.1f}",
            f"{ratio:.2f}", f"{r['cpu_user']:.2f} + {r['cpu_sys']:.2f}", f"{r['first_loss']:.4f}",
            f"{r['other_load'] * 100:.0f}%",
        ])
    return common.md_table(
        ["config", "params", "B x T", "implementation", "step ms (median)", "spread", "fwd / bwd / AdamW ms",
         "tokens/s", "model GFLOP/s", "throughput vs torch eager", "cores busy: user + sys", "loss (1st step)", "other load"], rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.set_defaults(config=None)
    p.add_argument("--configs", default="gpt2-small,small", help="comma-separated list (or use --config)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--context", type=int, default=None, help="T (default: the config's, 256)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-sdpa", action="store_true", help="skip the PyTorch SDPA column")
    p.add_argument("--max-load", type=float, default=MAX_LOAD,
                   help="retake rounds in which other processes used more of the machine than this")
    p.add_argument("--max-rounds", type=int, default=None, help="give up retaking after this many (3 x steps)")
    p.add_argument("--before", action="store_true",
                   help="add 'numpygpt before': dense attention, element-wise layers unthreaded and unchunked")
    p.add_argument("--compile", action="store_true", help="add torch.compile (of the SDPA model)")
    p.add_argument("--attn-impl", default="auto", choices=("auto", "dense", "blockwise"),
                   help="numpygpt's GPTConfig.attn_impl")
    p.add_argument("--busy", type=int, default=0, help="keep N spinning processes running (a core taken)")
    p.add_argument("--no-eager", action="store_true", help="skip the PyTorch eager column")
    p.add_argument("--torch-adamw", choices=("default", "foreach", "fused"), default="default",
                   help="torch.optim.AdamW implementation (default: PyTorch's choice for CPU tensors, "
                        "the per-tensor loop)")
    args = p.parse_args(argv)
    if args.torch_adamw != "default":
        TORCH_ADAMW[args.torch_adamw] = True
    common.apply_threads(args.threads, torch_too=not args.no_torch)

    impls = ["numpygpt"] + (["numpygpt before"] if args.before else [])
    if not args.no_torch:
        impls += [] if args.no_eager else ["torch eager"]
        impls += [] if args.no_sdpa else ["torch sdpa"]
        impls += ["torch compile"] if args.compile else []
    max_load = 1.0 if args.busy else args.max_load
    configs = [args.config] if args.config else args.configs.split(",")
    print(f"threads: {args.threads}; NumPy BLAS: {common.numpy_blas()}; torch: "
          f"{common.torch_description() if not args.no_torch else 'not used'}; "
          f"malloc: {common.malloc_description()}\n", file=sys.stderr)
    results = []
    with common.BusyLoops(args.busy):
        for name in configs:
            results += run_config(name, args.batch, args.context, args.warmup, args.steps, impls,
                                  max_load, args.max_rounds, args.attn_impl)
            print(f"done: {name}", file=sys.stderr)
    adamw = "" if args.torch_adamw == "default" else f" (torch AdamW {args.torch_adamw})"
    busy = f", {args.busy} busy-loop process(es) running" if args.busy else ""
    malloc = "" if memory.freed_memory_kept() else ", malloc returning freed memory"
    print(f"### Training step (float32, AdamW{adamw}, dropout 0, {args.threads} threads{busy}{malloc}, "
          f"median of {args.steps} steps after {args.warmup} warm-up)\n")
    print(table(results))
    common.save_json(args.json, "train", results, threads=args.threads, steps=args.steps, busy=args.busy)
    for r in results:
        if r["impl"] == "torch compile" and r["warmup_times"]:
            print(f"\ntorch.compile ({r['config']}, {r['B']}x{r['T']}): warm-up steps "
                  + ", ".join(f"{t:.1f} s" for t in r["warmup_times"])
                  + f" (the first compiles), then {r['step']:.1f} s a step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
