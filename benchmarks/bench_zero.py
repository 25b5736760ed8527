"""ZeRO stage 1 against plain data parallelism, 2 ranks on one machine: optimiser memory a
rank and step time.

    python benchmarks/bench_zero.py                    # launches both runs with mpiexec -n 2
    python benchmarks/bench_zero.py --config gpt2-small --batch 4 --context 256

Each mode runs in its own ``mpiexec -n N`` launch (so one's freed memory is not the
other's), ``--steps`` training steps of the same model and batch. Per rank it reports the
bytes of AdamW's moments (``optimizer.state``), the bytes NumPy allocated for the exchange
and the optimiser (tracemalloc: the moments, the flat buffers of the all-reduce or of the
reduce-scatter/all-gather), the process's peak resident memory, and the median step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tracemalloc

import common

common.early_threads()


def one_rank(args) -> dict:
    """This rank's numbers for one mode (run under mpiexec)."""
    from numpygpt import CrossEntropyLoss, GPTModel, distributed
    from numpygpt.memory import keep_freed_memory
    from numpygpt.optim import AdamW, param_groups
    from numpygpt.train import forward_backward
    from numpygpt.zero import ShardedAdamW

    keep_freed_memory()
    comm = distributed.init()
    cfg = common.make_config(args.config, context=args.context)
    model = GPTModel(cfg, seed=0)
    x, y = common.random_batch(cfg, args.batch, args.context)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    if args.mode == "zero":
        opt = ShardedAdamW(param_groups(model, 0.1), comm, lr=1e-4)
        step_comm = opt.comm
    else:
        opt, step_comm = AdamW(param_groups(model, 0.1), lr=1e-4), comm
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        forward_backward(model, CrossEntropyLoss(), iter([(x, y)]), 1, step_comm)
        opt.step()
        times.append(time.perf_counter() - t0)
        if len(times) == 1:  # everything the optimiser and the exchange keep exists now
            grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
            kept = tracemalloc.get_traced_memory()[0] - before - grads
            tracemalloc.stop()
    state = sum(a.nbytes for st in opt.state.values() for k, a in st.items() if k != "step")
    import resource

    return {"rank": comm.rank, "state_mib": state / 2**20, "kept_mib": kept / 2**20,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "step_s": sorted(times[1:] or times)[len(times[1:] or times) // 2]}


def launch(args, mode: str) -> list[dict]:
    cmd = [os.path.join(os.path.dirname(sys.executable), "mpiexec"), "-n", str(args.ranks), sys.executable,
           os.path.abspath(__file__), "--rank-mode", mode, "--config", args.config, "--batch", str(args.batch),
           "--context", str(args.context), "--steps", str(args.steps), "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return next(json.loads(line) for line in out.splitlines() if line.startswith("[{"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="small", choices=sorted(common.CONFIGS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--threads", type=int)
    p.add_argument("--rank-mode", choices=("dp", "zero"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank_mode:
        from numpygpt import distributed

        args.mode = args.rank_mode
        mine = one_rank(args)
        comm = distributed.get()
        everyone = comm.comm.gather(mine, root=0) if comm.world_size > 1 else [mine]
        if comm.is_main:
            print(json.dumps(everyone), flush=True)
        return 0
    from numpygpt import count_parameters

    cfg = common.make_config(args.config, context=args.context)
    rows = []
    for mode, name in (("dp", "data parallel (AdamW)"), ("zero", "ZeRO stage 1 (ShardedAdamW)")):
        for r in sorted(launch(args, mode), key=lambda d: d["rank"]):
            rows.append([name, r["rank"], f"{r['state_mib']:.1f}", f"{r['kept_mib']:.1f}", f"{r['peak_rss_mib']:.0f}",
                         f"{r['step_s'] * 1e3:.0f}"])
    print(f"### {args.ranks} ranks, {args.config} ({count_parameters(cfg) / 1e6:.1f}M parameters, float32), "
          f"B x T = {args.batch} x {args.context}, 1 thread a rank, median of {args.steps} steps\n")
    print(common.md_table(["mode", "rank", "AdamW moments MiB", "optimiser + exchange MiB", "peak RSS MiB",
                           "step ms"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
