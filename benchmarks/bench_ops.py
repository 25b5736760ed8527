"""Issue 22's speed directions, each op's new code against its code before, taking turns in one
process (so load from other processes hits both alike).

    python benchmarks/bench_ops.py                        # every op, GPT-2 small's shapes
    python benchmarks/bench_ops.py --ops head,gelu --rounds 7

Each entry runs the library's op as it is now ("after") and a copy of the code it replaced
("before", kept in ``ops_before.py``), on the same inputs, alternating: round r times before
then after (or after then before on odd rounds). The table gives each one's median over the
rounds after one warm-up, the spread, after / before (below 1: faster now) with the spread of
the per-round ratios, and the other processes' share of the machine while it ran ("other load";
ratios taken in turns hold up better under load than times do, but label them).
"""

from __future__ import annotations

import argparse
import sys
import time

import common

common.early_threads()


def cases(names: list[str], rows: int) -> dict:
    """name -> (description, before, after) on GPT-2 small's shapes with ``rows`` = B*T tokens;
    before and after are ``(prepare, timed)`` pairs of callables: prepare() runs untimed before
    each timed() call (a forward pass whose backward is timed), or is None."""
    import ops_before

    out = {}
    for name in names:
        out[name] = getattr(ops_before, "case_" + name.replace("-", "_"))(rows)
    return out


def measure(before, after, rounds: int) -> dict:
    """Per-round seconds of both, in turns, after one warm-up call of each."""
    tb, ta = [], []
    monitor = common.LoadMonitor().start()
    for r in range(rounds + 1):
        pair = ((before, tb), (after, ta)) if r % 2 == 0 else ((after, ta), (before, tb))
        for (prepare, timed), ts in pair:
            if prepare is not None:
                prepare()
            t0 = time.perf_counter()
            timed()
            if r > 0:  # round 0 warms up
                ts.append(time.perf_counter() - t0)
    return {"before": tb, "after": ta, "other_load": monitor.stop()}


def row(name: str, what: str, m: dict) -> list:
    ratios = [a / b for a, b in zip(m["after"], m["before"])]
    med_b, med_a = common.median(m["before"]), common.median(m["after"])
    return [name, what, f"{med_b * 1e3:.1f}", f"{common.spread(m['before']):.0%}", f"{med_a * 1e3:.1f}",
            f"{common.spread(m['after']):.0%}", f"**{med_a / med_b:.2f}**",
            f"{min(ratios):.2f}-{max(ratios):.2f}", f"{m['other_load']:.0%}"]


ALL = ("head", "gelu", "layernorm")  # the changes kept; "adamw-numexpr" (a rejected alternative) on request


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default=",".join(ALL),
                   help="comma-separated subset of: " + ",".join(ALL) + ", adamw-numexpr (needs numexpr)")
    p.add_argument("--rows", default="512,4096", help="B*T tokens: 512 = 2 x 256, 4096 = 4 x 1024")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=common.default_threads())
    args = p.parse_args(argv)
    common.apply_threads(args.threads, torch_too=False)
    table = []
    for rows in (int(r) for r in args.rows.split(",")):
        for name, (what, before, after) in cases(args.ops.split(","), rows).items():
            table.append(row(name, what, measure(before, after, args.rounds)))
            print(" | ".join(table[-1]), file=sys.stderr)
    print(f"### Ops before and after (float32, {args.threads} threads, {args.rounds} rounds in turns after 1 "
          f"warm-up; {common.numpy_blas()})\n")
    print(common.md_table(["op", "shapes", "before ms", "spread", "after ms", "spread", "after / before",
                           "per-round ratios", "other load"], table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
