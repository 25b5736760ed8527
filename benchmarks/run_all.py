"""Run every benchmark, one fresh process each, write a Markdown summary, and build the speed
table (speed_table.py) from the scripts' JSON results of this one run.

    python benchmarks/run_all.py --quick               # CI-sized: the small model, a few minutes
    python benchmarks/run_all.py --long --readme README.md   # GPT-2 small, 4 x 1024 and 2 x 256, ~25 min
    python benchmarks/run_all.py                       # the small and the book's GPT-2, scaling, profile
    python benchmarks/run_all.py --only train,memory --out my_results.md
    python benchmarks/run_all.py --no-torch            # numpygpt alone

Benchmarks run one after another (never two at once: they would share the cores); with
``--wait-quiet`` each one first waits until other processes use less than 10% of the
machine. The summary goes to ``benchmarks/out/summary.md`` (or ``--out``) and to stdout,
the table first; ``--readme README.md`` also writes the table into the README's speed
section, between its markers, so the README shows one run on one machine. The plans also run
``llama`` (a Llama 3 step against transformers, bench_llama_step.py), outside the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import common

common.early_threads()

import speed_table  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def plan(quick: bool) -> dict[str, list[str]]:
    """name -> script and arguments (the defaults: see each script's --help)."""
    if quick:
        return {
            "check": ["check_reference.py"],
            "matmul": ["bench_matmul.py", "--sizes", "1024,2048", "--no-gpt2-shapes"],
            # --max-load 1: no retaking of disturbed rounds or runs (the "other load" columns say how disturbed)
            "train": ["bench_train_step.py", "--configs", "small", "--steps", "5", "--warmup", "1", "--max-load", "1"],
            "train-default-malloc": ["bench_train_step.py", "--configs", "small", "--no-sdpa", "--steps", "5",
                                     "--warmup", "1", "--max-load", "1", "--default-malloc"],
            "llama": ["bench_llama_step.py", "--configs", "llama-small", "--steps", "3", "--warmup", "1"],
            "memory": ["bench_memory.py", "--config", "small"],
            "generate": ["bench_generate.py", "--config", "small", "--new-tokens", "50", "--max-load", "1"],
            "ops": ["bench_ops.py", "--rows", "512", "--rounds", "3"],
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
        "ops": ["bench_ops.py"],
    }


def plan_long() -> dict[str, list[str]]:
    """GPT-2 small in Hugging Face's layout (tied head, Q/K/V bias) at 4 x 1024 and 2 x 256:
    what the README's speed table needs, in ~25 minutes on 2 cores (RESULTS.md has the run
    times). Against PyTorch eager with the same allocator (numpygpt's setting) and with
    glibc's default for both, against torch.compile, peak memory, generation, and each speed
    change of issue 22 against the code it replaced (bench_ops). The 4 x 1024 PyTorch runs
    are split over processes: each model holds ~2 GB of weights, gradients and moments, and
    PyTorch eager's step alone peaks near 10 GB. A training round disturbed by other load is
    retaken at most twice (each retake first waits up to a minute for quiet)."""
    def train(B: int, T: int, steps: int, warmup: int, *extra: str) -> list[str]:
        return ["bench_train_step.py", "--configs", "gpt2-hf", "--batch", str(B), "--context", str(T),
                "--steps", str(steps), "--warmup", str(warmup), "--max-rounds", str(steps + 2), *extra]

    return {
        "matmul": ["bench_matmul.py", "--sizes", "2048,4096", "--no-gpt2-shapes"],
        "train-1024": train(4, 1024, 3, 1, "--no-sdpa"),
        "train-1024-compile": train(4, 1024, 3, 2, "--no-eager", "--no-sdpa", "--compile"),
        "train-1024-default-malloc": train(4, 1024, 2, 1, "--no-sdpa", "--default-malloc"),
        "train-256": train(2, 256, 5, 3, "--compile"),
        "train-256-default-malloc": train(2, 256, 5, 2, "--no-sdpa", "--default-malloc"),
        "memory-1024": ["bench_memory.py", "--config", "gpt2-hf", "--batch", "4", "--context", "1024",
                        "--impls", "numpygpt,torch eager"],
        "memory-256": ["bench_memory.py", "--config", "gpt2-hf", "--batch", "2", "--context", "256",
                       "--impls", "numpygpt,torch eager,torch sdpa"],
        "generate": ["bench_generate.py", "--new-tokens", "50"],
        "ops": ["bench_ops.py", "--rounds", "5"],
        # the ceiling again at the end: speed_table takes the fastest, in case other work slowed the first
        "matmul-end": ["bench_matmul.py", "--sizes", "2048,4096", "--no-gpt2-shapes"],
    }


# scripts that write --json (speed_table.py builds the README's table from them)
JSON_SCRIPTS = ("bench_train_step.py", "bench_matmul.py", "bench_memory.py", "bench_generate.py")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small model, fewer steps (CI-sized, a few minutes)")
    p.add_argument("--long", action="store_true", help="GPT-2 small at 4 x 1024 and 2 x 256 (see plan_long)")
    p.add_argument("--only", default=None, help="comma-separated subset of the plan's benchmarks")
    p.add_argument("--threads", type=int, default=common.default_threads())
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--wait-quiet", action="store_true", help="wait for other load to drop before each benchmark")
    p.add_argument("--out", default=os.path.join(HERE, "out", "summary.md"))
    p.add_argument("--json-dir", default=os.path.join(HERE, "out", "json"),
                   help="the scripts' JSON results (emptied first); the speed table is built from them")
    p.add_argument("--readme", default=None, metavar="PATH",
                   help="write the speed table into this README (README.md) between its markers")
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
    return args, todo


def command_for(name: str, script: str, extra: list[str], args) -> list[str]:
    cmd = [sys.executable, os.path.join(HERE, script), *extra, "--threads", str(args.threads)]
    if args.no_torch and not name.startswith(("profile", "blockwise", "ops")):
        cmd.append("--no-torch")
    if name == "check":
        cmd = cmd[:2] + ["--threads", str(args.threads)]
    if script in JSON_SCRIPTS:
        cmd += ["--json", os.path.join(args.json_dir, f"{name}.json")]
    return cmd


def start_json_dir(args, argv) -> str:
    """Empty the JSON folder and write machine.json: this run's machine, time and command."""
    os.makedirs(args.json_dir, exist_ok=True)
    for old in os.listdir(args.json_dir):
        if old.endswith(".json"):
            os.remove(os.path.join(args.json_dir, old))
    when = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    # the command without where its output went (--out, --json-dir, --readme): what was measured
    given, kept = list(sys.argv[1:] if argv is None else argv), []
    while given:
        arg = given.pop(0)
        if arg in ("--out", "--json-dir", "--readme"):
            given = given[1:]
        elif not arg.startswith(("--out=", "--json-dir=", "--readme=")):
            kept.append(arg)
    command = "python benchmarks/run_all.py " + " ".join(kept)
    with open(os.path.join(args.json_dir, "machine.json"), "w") as f:
        json.dump({"machine": common.machine_info(), "when": when, "command": command.strip()}, f, indent=1)
    return when


def run_plan(todo: dict, args) -> tuple[list[str], list[str]]:
    """Each benchmark in a fresh process, one after another: (Markdown parts, failed names)."""
    parts, failed = [], []
    for name, (script, *extra) in todo.items():
        cmd = command_for(name, script, extra, args)
        if args.wait_quiet:
            load = common.wait_for_quiet()
            print(f"[{name}] other load before start: {load:.0%}", file=sys.stderr)
        print(f"[{name}] {' '.join(cmd[1:])}", file=sys.stderr)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        dt = time.perf_counter() - t0
        print(f"[{name}] {dt:.0f} s, exit {proc.returncode}", file=sys.stderr)
        parts += [f"## {name}\n", proc.stdout.strip(),
                  f"\n_`python benchmarks/{script} {' '.join(cmd[2:])}` took {dt:.0f} s._\n"]
        if proc.returncode != 0:
            failed.append(f"{name} (exit {proc.returncode})")
            parts.append(f"**{name} FAILED (exit {proc.returncode})**\n")
    return parts, failed


def main(argv=None) -> int:
    args, todo = parse(argv)
    common.apply_threads(args.threads, torch_too=not args.no_torch)
    when = start_json_dir(args, argv)
    t_all = time.perf_counter()
    parts, failed = run_plan(todo, args)
    total = time.perf_counter() - t_all
    speed_table.note_run(args.json_dir, failed, total)
    table = speed_table.build(args.json_dir)
    mfu = speed_table.mfu_lines(args.json_dir)
    head = [f"# numpygpt benchmarks ({when}, {total / 60:.1f} minutes)\n", "## The speed table\n", table, "",
            "\n".join(f"- {line}" for line in mfu), "", "## Machine\n", common.machine_markdown(), ""]
    text = "\n".join(head + parts + [f"_Total: {total:.0f} s._"]) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    if args.readme:
        speed_table.write_readme(args.readme, table)
        print(f"speed table written into {args.readme}", file=sys.stderr)
    print(f"written to {args.out}; took {total / 60:.1f} minutes", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
