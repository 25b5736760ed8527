"""What subnormal AdamW moments cost, and what AdamW's periodic flush saves.

An untied embedding row whose token stops appearing gets a zero gradient, and its first
moment m shrinks by b1 = 0.9 a step: after ~750 steps it is subnormal (below float32's
finfo.tiny), where every multiply takes a slow microcode path. This times one AdamW step
of a GPT-2 sized token embedding (50257 x 768, float32) in three states:

- "normal moments": m and v as after a few ordinary steps;
- "m subnormal on 96% of rows": rows 2000 and up hold m = 1e-39, as they would after
  ~750 steps without a gradient if nothing flushed them;
- "after AdamW's flush": the same state once ``numpygpt.optim._flush_tiny`` ran, which
  AdamW does every ``AdamW.FLUSH_EVERY`` steps (see its docstring).

Each step's gradient is zero but for the first 2000 rows.

    python benchmarks/bench_adamw_subnormal.py
"""

from __future__ import annotations

import argparse
import time

import common

common.early_threads()

import numpy as np  # noqa: E402

from numpygpt.nn.module import Parameter  # noqa: E402
from numpygpt.optim import AdamW, _flush_tiny  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=common.default_threads())
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    common.apply_threads(args.threads, torch_too=False)

    V, C, seen = 50257, 768, 2000
    rng = np.random.default_rng(0)
    w = Parameter(rng.standard_normal((V, C), dtype=np.float32) * 0.02)
    opt = AdamW([w], lr=1e-4, weight_decay=0.1)
    w.grad = rng.standard_normal((V, C), dtype=np.float32) * 1e-4
    opt.step()
    opt.step()
    state = opt.state["0"]
    w.grad[seen:] = 0
    # keep the step count away from the flush so that only the states below differ
    state["step"] = 1 + AdamW.FLUSH_EVERY

    def timed() -> float:
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
            state["step"] = 1 + AdamW.FLUSH_EVERY
        return common.median(times) * 1e3

    rows = [["normal moments", f"{timed():.0f}"]]
    state["exp_avg"][seen:] = np.float32(1e-39)
    rows.append([f"m subnormal on {(V - seen) / V:.0%} of rows", f"{timed():.0f}"])
    _flush_tiny(np, state["exp_avg"], state["exp_avg_sq"])
    rows.append(["after AdamW's flush", f"{timed():.0f}"])
    print(f"### One AdamW step of a (50257, 768) float32 embedding ({args.threads} threads, "
          f"median of {args.repeat})\n")
    print(common.md_table(["moments", "AdamW step ms"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
