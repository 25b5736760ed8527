"""Run every benchmark, one fresh process each, and write a Markdown summary.

    python benchmarks/run_all.py                       # about 8-12 minutes on 2 cores
    python benchmarks/run_all.py --quick               # about 2 minutes: small model only
    python benchmarks/run_all.py --only train,memory --out my_results.md
    python benchmarks/run_all.py --no-torch            # numpygpt alone
    python benchmarks/run_all.py --long --wait-quiet   # GPT-2's context (issue 10), ~25 minutes

Benchmarks: check (torch_gpt agrees with numpygpt), matmul, train, llama (a Llama 3 step
against transformers), memory, generate, scaling, profile. Benchmarks run one after another (never two at once: they would
share the cores); with ``--wait-quiet`` each one first waits until other processes use
less than 10% of the machine. The summary goes to ``benchmarks/out/summary.md``
(or ``--out``) and to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time

import common

common.early_threads()

HERE = os.path.dirname(os.path.abspath(__file__))


def plan(quick: bool) -> dict[str, list[str]]:
    """name -> script and arguments (the defaults: see each script's --help)."""
    if quick:
        return {
            "check": ["check_reference.py"],
            "matmul": ["bench_matmul.py", "--sizes", "1024,2048", "--no-gpt2-shapes"],
            "train": ["bench_train_step.py", "--configs", "small", "--steps", "5", "--warmup", "1"],
            "llama": ["bench_llama_step.py", "--configs", "llama-small", "--steps", "3", "--warmup", "1"],
            "memory": ["bench_memory.py", "--config", "small"],
            "generate": ["bench_generate.py", "--config", "small", "--new-tokens", "50"],
            "scaling": ["bench_scaling.py", "--config", "small", "--contexts", "128,256,512",
                        "--widths", "128,256", "--layers", "2", "--steps", "2", "--no-sdpa"],
            "profile": ["profile_step.py", "--config", "small", "--steps", "2", "--lines", "15"],
        }
    return {
        "check": ["check_reference.py"],
        "matmul": ["bench_matmul.py"],
        "train": ["bench_train_step.py", "--configs", "gpt2-small,small", "--steps", "5", "--warmup", "2"],
        "llama": ["bench_llama_step.py", "--configs", "llama-small,llama-124m", "--steps", "5", "--warmup", "1"],
        "memory": ["bench_memory.py", "--config", "gpt2-small"],
        "generate": ["bench_generate.py", "--config", "gpt2-small", "--new-tokens", "200"],
        "scaling": ["bench_scaling.py"],
        "profile": ["profile_step.py", "--config", "gpt2-small", "--steps", "2"],
        "adamw-subnormal": ["bench_adamw_subnormal.py"],
    }


def plan_long() -> dict[str, list[str]]:
    """GPT-2 small in Hugging Face's layout at its own context 1024 (and at 256), with the
    code before the blockwise attention and threaded layers, PyTorch eager, SDPA and
    torch.compile; memory, a profile, the dense/blockwise break-even and a busy core.
    The "-default-malloc" runs leave glibc's malloc as it is (numpygpt.memory), for the
    code as it was before issue 10 and for PyTorch as it runs by default."""
    return {
        "matmul": ["bench_matmul.py", "--sizes", "2048,4096", "--no-gpt2-shapes"],
        # two runs at 1024 (each model holds ~2 GB of weights, gradients and AdamW moments,
        # and PyTorch eager's step alone peaks near 10 GB): numpygpt is in both
        "train-1024": ["bench_train_step.py", "--configs", "gpt2-hf", "--batch", "4", "--context", "1024",
                       "--before", "--no-sdpa", "--steps", "3", "--warmup", "2"],
        "train-1024-sdpa-compile": ["bench_train_step.py", "--configs", "gpt2-hf", "--batch", "4", "--context",
                                    "1024", "--no-eager", "--compile", "--steps", "3", "--warmup", "2"],
        "train-1024-default-malloc": ["bench_train_step.py", "--configs", "gpt2-hf", "--batch", "4", "--context",
                                      "1024", "--before", "--no-sdpa", "--steps", "2", "--warmup", "1",
                                      "--default-malloc"],
        "train-256": ["bench_train_step.py", "--configs", "gpt2-hf", "--batch", "2", "--context", "256",
                      "--before", "--compile", "--steps", "5", "--warmup", "3"],
        "train-256-default-malloc": ["bench_train_step.py", "--configs", "gpt2-hf", "--batch", "2", "--context",
                                     "256", "--before", "--no-sdpa", "--steps", "5", "--warmup", "2",
                                     "--default-malloc"],
        "memory-1024": ["bench_memory.py", "--config", "gpt2-hf", "--batch", "4", "--context", "1024",
                        "--impls", "numpygpt,torch eager,torch sdpa"],
        "memory-1024-default-malloc": ["bench_memory.py", "--config", "gpt2-hf", "--batch", "4", "--context",
                                       "1024", "--impls", "numpygpt,torch eager,torch sdpa", "--default-malloc"],
        "memory-256": ["bench_memory.py", "--config", "gpt2-hf", "--batch", "2", "--context", "256",
                       "--impls", "numpygpt,torch eager,torch sdpa"],
        "fused-loss": ["bench_fused_loss.py", "--shapes", "2x256,4x1024", "--steps", "3"],
        "profile-1024": ["profile_step.py", "--config", "gpt2-hf", "--batch", "4", "--context", "1024",
                         "--steps", "2", "--lines", "20"],
        "blockwise": ["bench_blockwise.py", "--contexts", "64,128,256,512,1024", "--tokens", "2048",
                      "--repeat", "3"],
        "generate": ["bench_generate.py", "--new-tokens", "50"],
        "busy-256": ["bench_train_step.py", "--configs", "gpt2-hf", "--batch", "2", "--context", "256",
                     "--before", "--no-sdpa", "--busy", "1", "--steps", "3", "--warmup", "1"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small model, fewer steps (~2 minutes)")
    p.add_argument("--long", action="store_true", help="GPT-2 small at context 1024 (see plan_long)")
    p.add_argument("--only", default=None, help="comma-separated subset of: " + ",".join(plan(False)))
    p.add_argument("--threads", type=int, default=common.default_threads())
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--wait-quiet", action="store_true", help="wait for other load to drop before each benchmark")
    p.add_argument("--out", default=os.path.join(HERE, "out", "summary.md"))
    args = p.parse_args(argv)

    todo = plan_long() if args.long else plan(args.quick)
    if args.only:
        names = args.only.split(",")
        unknown = set(names) - set(todo)
        if unknown:
            p.error(f"unknown benchmarks {sorted(unknown)}: choose from {', '.join(todo)}")
        todo = {k: v for k, v in todo.items() if k in names}
    if args.no_torch:
        todo.pop("check", None)

    common.apply_threads(args.threads, torch_too=not args.no_torch)
    parts = [f"# numpygpt benchmarks ({datetime.datetime.now():%Y-%m-%d %H:%M})\n",
             "## Machine\n", common.machine_markdown(), ""]
    failed = []
    t_all = time.perf_counter()
    for name, (script, *extra) in todo.items():
        cmd = [sys.executable, os.path.join(HERE, script), *extra, "--threads", str(args.threads)]
        if args.no_torch and not name.startswith(("profile", "blockwise")):
            cmd.append("--no-torch")
        if name == "check":
            cmd = cmd[:2] + ["--threads", str(args.threads)]
        if args.wait_quiet:
            load = common.wait_for_quiet()
            print(f"[{name}] other load before start: {load:.0%}", file=sys.stderr)
        print(f"[{name}] {' '.join(cmd[1:])}", file=sys.stderr)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        dt = time.perf_counter() - t0
        print(f"[{name}] {dt:.0f} s, exit {proc.returncode}", file=sys.stderr)
        parts.append(f"## {name}\n")
        parts.append(proc.stdout.strip())
        parts.append(f"\n_`python benchmarks/{script} {' '.join(cmd[2:])}` took {dt:.0f} s._\n")
        if proc.returncode != 0:
            failed.append(name)
            parts.append(f"**{name} FAILED (exit {proc.returncode})**\n")
    parts.append(f"_Total: {time.perf_counter() - t_all:.0f} s._")
    text = "\n".join(parts) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    print(f"written to {args.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
