"""Data-parallel training on one machine: N MPI ranks x (cores / N) BLAS threads against
one process using every core, the same global batch, GPT-2 small (float32, AdamW).

    python benchmarks/bench_distributed.py                      # 1 x 2 threads vs 2 ranks x 1 thread
    python benchmarks/bench_distributed.py --batch 4 --context 256 --steps 4 --rounds 2
    python benchmarks/bench_distributed.py --cost-model-only --flop-rate 140e9

Each setup runs in fresh processes (``mpiexec -n N`` for the ranks, from the mpi extra),
the setups alternating round by round so load from other work hits them alike. A step
is the training loop's: zero_grad, this rank's share of the batch forward + backward,
``comm.sum_gradients`` (pack the gradients into one flat buffer, one all-reduce, unpack),
clipping and AdamW. The table gives the median step, tokens/s, the exchange's share of
the step (pack + all-reduce + unpack) and the all-reduce call alone, and the loss of the
first step (the same for both: they train the same model on the same batch).

Then the cost of a ring all-reduce for GPT-2 small to XL, computed from the measured
FLOP rate of the one-process run (see ``cost_model``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import common

WD, LR = 0.1, 3e-4


# -- one setup, in its own processes ------------------------------------------------------------

def worker(args) -> None:
    common.early_threads(["--threads", str(args.threads)])
    import numpy as np

    from numpygpt import CrossEntropyLoss, GPTModel, count_parameters, distributed
    from numpygpt.optim import AdamW, clip_grad_norm, param_groups

    comm = distributed.init()
    cfg = common.make_config(args.config, context=args.context)
    model = GPTModel(cfg, seed=0)
    opt = AdamW(param_groups(model, WD), lr=LR, weight_decay=WD)
    loss_fn = CrossEntropyLoss()
    x, y = common.random_batch(cfg, args.batch, cfg.context_length)
    model.train()
    rows = []
    for i in range(args.warmup + args.steps):
        r0 = comm.reduce_seconds
        t0 = time.perf_counter()
        model.zero_grad()
        xs, ys, weight = comm.shard(x, y)
        loss = loss_fn(model(xs), ys)
        model.backward(loss_fn.backward(weight))
        t1 = time.perf_counter()
        step_loss = comm.sum_gradients(model, loss * weight)
        t2 = time.perf_counter()
        clip_grad_norm(model, 1.0)
        opt.step()
        t3 = time.perf_counter()
        rows.append({"step": t3 - t0, "compute": t1 - t0, "exchange": t2 - t1,
                     "reduce": comm.reduce_seconds - r0, "opt": t3 - t2, "loss": step_loss})
    if comm.is_main:
        buckets = getattr(comm, "_buckets", None)
        with open(args.worker, "w") as f:
            json.dump({"rows": rows, "warmup": args.warmup, "ranks": comm.world_size, "threads": args.threads,
                       "describe": comm.describe() if comm.world_size > 1 else "1 process",
                       "blas": common.numpy_blas(), "params": count_parameters(cfg),
                       "grad_bytes": buckets.nbytes if buckets is not None else None,
                       "flops": common.train_flops(cfg, args.batch, cfg.context_length),
                       "numpy": np.__version__}, f)
    elif comm.world_size > 1:
        comm.describe()  # collective: rank 0 calls it too


def launch(ranks: int, threads: int, args, out: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", out, "--threads", str(threads),
           "--config", args.config, "--batch", str(args.batch), "--context", str(args.context),
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if ranks > 1:
        cmd = [find_mpiexec(), "-n", str(ranks)] + cmd
    mon = common.LoadMonitor().start()
    subprocess.run(cmd, check=True, env=env, timeout=3600)
    load = mon.stop()
    with open(out) as f:
        result = json.load(f)
    result["other_load"] = load
    return result


def find_mpiexec() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(here, os.X_OK):
        return here
    import shutil

    found = shutil.which("mpiexec")
    if not found:
        sys.exit("no mpiexec next to python or on PATH: pip install -e '.[mpi]'")
    return found


# -- the cost model ------------------------------------------------------------------------------

GBIT = 1e9 / 8  # bytes per second in one Gbit/s


def cost_model(flop_rate: float, tokens_per_rank: int, context: int = 1024, ranks=(2, 8)) -> str:
    """Ring all-reduce against compute for GPT-2 small ... XL (tied head as released, float32
    gradients).

    Each of N machines takes ``tokens_per_rank`` tokens a step at ``flop_rate`` (measured),
    so its compute is t_c = train_flops / flop_rate. The ring all-reduce sends (and
    receives) 2 (N-1)/N x G bytes per rank (G: gradient bytes), so at bandwidth BW it takes
    t_ar = 2 (N-1)/N x G / BW (no overlap with the backward pass, latency ignored).

    N machines beat one (same global batch, N x tokens_per_rank) when
    t_c + t_ar < N t_c, i.e. BW > 2 G / (N t_c): the "pays above" bandwidth. Keeping 90% of
    the ideal N-fold speed-up needs t_ar <= t_c / 9, i.e. BW >= 18 (N-1)/N x G / t_c.
    Both scale with flop_rate: a machine k times faster needs k times the bandwidth.
    """
    from numpygpt import GPTConfig, count_parameters

    def gbit(bytes_per_s):
        return f"{bytes_per_s / GBIT:.3g}"

    rows = []
    big = max(ranks)
    for name in ("gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        cfg = GPTConfig.preset(name).replace(context_length=context, tie_weights=True)  # as OpenAI's
        P = count_parameters(cfg)
        G = 4 * P
        t_c = common.train_flops(cfg, tokens_per_rank // context, context) / flop_rate
        ring = 2 * (big - 1) / big * G
        rows.append([name, f"{P / 1e6:.0f}M", f"{G / 2**20:.0f} MiB", f"{t_c:.1f} s", f"{ring / 2**20:.0f} MiB",
                     f"{ring / (10 * GBIT):.2f} s",
                     " / ".join(gbit(2 * G / (n * t_c)) for n in ranks),
                     " / ".join(gbit(18 * (n - 1) / n * G / t_c) for n in ranks)])
    n_list = " / ".join(f"N={n}" for n in ranks)
    header = ["model", "params", "gradient (fp32)", f"compute a step ({tokens_per_rank} tokens a rank)",
              f"ring traffic a rank, N={big}", f"all-reduce at 10 Gbit/s, N={big}",
              f"pays above, Gbit/s ({n_list})", f"90% of N-fold, Gbit/s ({n_list})"]
    return common.md_table(header, rows)


# -- main ------------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="gpt2-small", choices=sorted(common.CONFIGS))
    p.add_argument("--batch", type=int, default=4, help="global batch (rows of --context tokens)")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="timed steps per launch")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="launches of each setup, alternating")
    p.add_argument("--threads", type=int, default=None, help="(worker) BLAS threads")
    p.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    p.add_argument("--cost-model-only", action="store_true")
    p.add_argument("--flop-rate", type=float, help="FLOP/s for --cost-model-only")
    p.add_argument("--cost-tokens", type=int, default=8 * 1024, help="tokens per rank per step in the cost model")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.cost_model_only:
        print(cost_model(args.flop_rate, args.cost_tokens))
        return

    cores = common.default_threads()
    setups = [(1, cores), (args.ranks, max(1, cores // args.ranks))]
    results = {s: [] for s in setups}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for s in (setups if r % 2 == 0 else setups[::-1]):
                print(f"round {r + 1}: {s[0]} rank(s) x {s[1]} thread(s) ...", file=sys.stderr, flush=True)
                results[s].append(launch(s[0], s[1], args, os.path.join(tmp, f"{s[0]}_{r}.json")))

    rows, summary = [], {}
    for (ranks, threads), runs in results.items():
        timed = [row for run in runs for row in run["rows"][run["warmup"]:]]
        step = common.median([t["step"] for t in timed])
        exch = common.median([t["exchange"] for t in timed])
        red = common.median([t["reduce"] for t in timed])
        first = runs[0]
        summary[ranks] = {"step": step, "flops": first["flops"]}
        gb = first["grad_bytes"]
        rows.append([f"{ranks} x {threads}", f"{step * 1e3:.0f}", f"{common.spread([t['step'] for t in timed]) * 100:.0f}%",
                     f"{common.median([t['compute'] for t in timed]) * 1e3:.0f}",
                     f"{exch * 1e3:.0f} ({exch / step:.1%})", f"{red * 1e3:.0f} ({red / step:.1%})",
                     f"{common.median([t['opt'] for t in timed]) * 1e3:.0f}",
                     f"{args.batch * args.context / step:.0f}",
                     "-" if gb is None else f"{gb / 2**20:.0f} MiB, {gb / red / 2**30:.2f} GiB/s" if red else "-",
                     f"{first['rows'][0]['loss']:.6f}", f"{max(run['other_load'] for run in runs):.0%}"])
    print(f"### {args.config} ({results[setups[0]][0]['params'] / 1e6:.1f}M parameters), global batch "
          f"{args.batch} x {args.context}, float32, AdamW, median of {args.steps} x {args.rounds} steps\n")
    print(common.md_table(["ranks x BLAS threads", "step ms", "spread", "fwd+bwd ms", "exchange ms (share)",
                           "all-reduce ms (share)", "clip+AdamW ms", "tokens/s", "gradient buffer, all-reduce rate",
                           "loss (1st step)", "other load"], rows))
    one = summary[1]
    print(f"\nspeed-up of {args.ranks} ranks over 1 process: {one['step'] / summary[args.ranks]['step']:.2f}x")
    for s, runs in results.items():
        print(f"- {s[0]} x {s[1]}: {runs[0]['describe']}; BLAS: {runs[0]['blas']}")
    rate = one["flops"] / one["step"]
    print(f"\n### Ring all-reduce cost model (measured 1-process rate {rate / 1e9:.0f} GFLOP/s)\n")
    print(cost_model(rate, args.cost_tokens))


if __name__ == "__main__":
    main()
