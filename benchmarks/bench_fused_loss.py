"""The fused output head + cross-entropy against the plain head and loss: peak memory and
step time of a GPT-2 training step, each variant in its own fresh process.

    python benchmarks/bench_fused_loss.py                          # gpt2-hf, B x T = 2x256 and 4x1024
    python benchmarks/bench_fused_loss.py --shapes 2x256 --steps 3

A step is numpygpt's training step as ``train_model`` takes it: the objective's loss and
backward (``NextTokenObjective``: model(x) -> (B, T, V) logits -> CrossEntropyLoss, or
``FusedNextTokenObjective``: the model to its final hidden states -> FusedLinearCrossEntropy
chunk by chunk), then AdamW and zero_grad. Each worker reports the memory resting between
steps, the peak resident memory of the steady-state steps (VmHWM reset through
/proc/self/clear_refs after the warm-up step, as bench_memory.py does; with numpygpt's
allocator setting freed memory stays resident, so "resting" already holds most of the
warm-up's peak, and the peaks, not the differences to resting, compare the variants), the
first loss (the variants must agree), and the median step time over ``--steps`` steps after one warm-up, with the other processes' share
of the machine while it ran ("other load"; timings under load are not to be trusted).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import common

common.early_threads()

VARIANTS = ("plain", "fused")


def worker(variant: str, config: str, B: int, T: int, steps: int, threads: int, chunk_rows: int | None) -> dict:
    import gc

    common.apply_threads(threads, torch_too=False)
    from numpygpt import GPTModel
    from numpygpt.objective import FusedNextTokenObjective, NextTokenObjective
    from numpygpt.optim import AdamW, param_groups
    from bench_memory import reset_peak

    cfg = common.make_config(config, context=T)
    x, y = common.random_batch(cfg, B, T)
    model = GPTModel(cfg, seed=0)
    opt = AdamW(param_groups(model, 0.1), lr=3e-4, weight_decay=0.1)
    objective = FusedNextTokenObjective(chunk_rows=chunk_rows) if variant == "fused" else NextTokenObjective()
    losses = []

    def step():
        losses.append(float(objective.loss(model, (x, y))))
        objective.backward(model, 1.0)
        opt.step()
        opt.zero_grad()

    step()  # warm-up: the gradient buffers and AdamW's moments are allocated here
    gc.collect()
    out = {"variant": variant, "B": B, "T": T, "first_loss": losses[0], "rss_rest": common.current_rss_mib(),
           "reset_ok": reset_peak()}
    monitor = common.LoadMonitor().start()
    out["times"] = common.time_calls(step, 0, steps)
    out["other_load"] = monitor.stop()
    out["peak_step"] = common.peak_rss_mib()
    return out


def head_only(config: str, B: int, T: int, rounds: int, threads: int, chunk_rows: int | None) -> list[list]:
    """The head and the loss alone on random hidden states, plain and fused taking turns in
    this one process (so load from other processes hits both alike): [B x T, variant, median
    s, spread, time / plain's, peak traced MiB] rows. The peak is what NumPy allocated during
    one forward + backward, from a separate call under tracemalloc."""
    import tracemalloc

    import numpy as np

    common.apply_threads(threads, torch_too=False)
    from numpygpt import CrossEntropyLoss, FusedLinearCrossEntropy, OutputHead, Parameter

    cfg = common.make_config(config, context=T)
    rng = np.random.default_rng(0)
    W = Parameter((rng.standard_normal((cfg.vocab_size, cfg.emb_dim), dtype=np.float32) * 0.02))
    h = rng.standard_normal((B, T, cfg.emb_dim), dtype=np.float32)
    _, y = common.random_batch(cfg, B, T)

    def plain():
        head, loss_fn = OutputHead(W), CrossEntropyLoss()
        loss_fn(head(h), y)
        head.backward(loss_fn.backward())
        W.grad = None

    def fused():
        op = FusedLinearCrossEntropy(W, chunk_rows=chunk_rows)
        op(h, y)
        op.backward()
        W.grad = None

    fns = {"plain": plain, "fused": fused}
    times = {name: [] for name in fns}
    for _ in range(rounds + 1):  # the first round warms up
        for name, fn in fns.items():
            times[name].append(common.time_calls(fn, 0, 1)[0])
    peaks = {}
    for name, fn in fns.items():
        tracemalloc.start()
        fn()
        peaks[name] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    t_plain = common.median(times["plain"][1:])
    return [[f"{B}x{T}", name, f"{common.median(ts[1:]):.2f}", f"{common.spread(ts[1:]):.0%}",
             f"{common.median(ts[1:]) / t_plain:.2f}", f"{peaks[name]:.0f}"] for name, ts in times.items()]


def run_worker(args, variant: str, B: int, T: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--config", args.config,
           "--shapes", f"{B}x{T}", "--steps", str(args.steps), "--threads", str(args.threads)]
    if args.chunk_rows:
        cmd += ["--chunk-rows", str(args.chunk_rows)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {variant} {B}x{T} failed:\n{proc.stderr}")
    return json.loads(lines[-1][len("RESULT "):])


def table(results: list[dict]) -> str:
    rows = []
    for r in results:
        plain = next(p for p in results if p["variant"] == "plain" and (p["B"], p["T"]) == (r["B"], r["T"]))
        t, t_plain = common.median(r["times"]), common.median(plain["times"])
        rows.append([f"{r['B']}x{r['T']}", r["variant"], f"{r['first_loss']:.6f}", f"{r['rss_rest']:.0f}",
                     f"{r['peak_step']:.0f}" if r["reset_ok"] else "n/a",
                     f"{plain['peak_step'] - r['peak_step']:.0f}" if r is not plain else "",
                     f"{t:.2f}", f"{common.spread(r['times']):.0%}", f"{t / t_plain:.2f}", f"{r['other_load']:.0%}"])
    return common.md_table(["B x T", "loss", "first loss", "resting MiB", "steady-step peak MiB",
                            "peak below plain's MiB", "step s (median)", "spread", "time / plain's",
                            "other load"], rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, config_default="gpt2-hf")
    p.add_argument("--shapes", default="2x256,4x1024", help="B x T of the steps, comma-separated")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    p.add_argument("--chunk-rows", type=int, default=None, help="rows per chunk of the fused loss "
                   "(default: numpygpt.nn.fused_loss.CHUNK_BYTES of logits)")
    p.add_argument("--head-rounds", type=int, default=3, help="rounds of the head + loss alone (0: skip)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]

    if args.worker:
        (B, T), = shapes
        print("RESULT " + json.dumps(worker(args.worker, args.config, B, T, args.steps, args.threads,
                                            args.chunk_rows)))
        return 0

    from numpygpt import count_parameters

    results = []
    for B, T in shapes:
        for variant in VARIANTS:
            results.append(run_worker(args, variant, B, T))
            print(f"  {variant} {B}x{T}: {common.median(results[-1]['times']):.2f} s", file=sys.stderr)
    cfg = common.make_config(args.config)
    print(f"### Fused head + cross-entropy against the plain path ({args.config}, "
          f"{common.fmt_params(count_parameters(cfg))} parameters, float32, AdamW, {args.threads} threads, "
          f"median of {args.steps} steps after 1 warm-up, each variant in a fresh process)\n")
    print(common.machine_markdown() + "\n")
    print(table(results))
    if args.head_rounds:
        rows = []
        for B, T in shapes:
            monitor = common.LoadMonitor().start()
            shape_rows = head_only(args.config, B, T, args.head_rounds, args.threads, args.chunk_rows)
            other_load = monitor.stop()
            rows += [r + [f"{other_load:.0%}"] for r in shape_rows]
        print(f"\n#### The head + loss alone (forward + backward on random hidden states; plain and fused "
              f"taking turns in one process, median of {args.head_rounds} rounds after 1 warm-up)\n")
        print(common.md_table(["B x T", "variant", "s (median)", "spread", "time / plain's",
                               "peak NumPy allocation MiB", "other load"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
