"""One DPO step (``numpygpt finetune dpo``) against one full fine-tuning step, GPT-2 small and
medium at batch 8 with the book's lengths, float32, on the same model.

    python benchmarks/bench_dpo_step.py                         # gpt2 and gpt2-medium, T = 88
    python benchmarks/bench_dpo_step.py --preset gpt2 --steps 5

The full fine-tuning step is bench_instruct_step's: 8 sequences padded to T = 88 (the length of
the first batch ``finetune instruct`` draws from the book's data), forward + cross-entropy +
backward + AdamW over every parameter. The DPO step is 8 pairs whose chosen and rejected texts
(a prompt of 30-60 tokens, then a response) are padded to the same T = 88, so the policy runs 16
sequences: the reference's forward under no_grad, the policy's forward, the DPO loss, one
backward, AdamW. Both steppers share the model (a step costs the same whatever the weights
are), each with its own AdamW; the reference is a copy. Random weights, untied head, qkv_bias,
dropout 0. Steps are interleaved round-robin (bench_train_step.measure_interleaved), so load
from other work hits both alike: compare the ratio.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import common

common.early_threads()

import numpy as np  # noqa: E402  (after early_threads: BLAS starts with the thread count)

from bench_instruct_step import synthetic_batch  # noqa: E402
from bench_train_step import MAX_LOAD, LR, WD, measure_interleaved, numpygpt_stepper  # noqa: E402
from numpygpt import GPTConfig, GPTModel, count_parameters  # noqa: E402
from numpygpt.finetune.dpo import DPOObjective  # noqa: E402
from numpygpt.finetune.dpo_data import PreferencePair, collate_preferences  # noqa: E402
from numpygpt.optim import AdamW, param_groups  # noqa: E402


def preference_batch(B: int, T: int, seed: int = 0) -> dict:
    """B pairs of random tokens: a prompt of 30-60 tokens (at most T - 1), responses filling up to T + 1 tokens
    (one text exactly T + 1, so the batch is B x T)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for b in range(B):
        P = int(rng.integers(min(30, T // 2), min(61, T)))
        n_c, n_r = (int(rng.integers(P + 1, T + 2)) for _ in range(2))
        if b == 0:
            n_c = T + 1
        pairs.append(PreferencePair(rng.integers(0, 50256, n_c), rng.integers(0, 50256, n_r), P))
    return collate_preferences(pairs)


def dpo_stepper(model, batch: dict):
    """One DPO step in phases: (loss, t_fwd (reference + policy + loss), t_bwd, t_opt)."""
    objective = DPOObjective(copy.deepcopy(model).eval(), beta=0.1)
    opt = AdamW(param_groups(model, WD), lr=LR, weight_decay=WD)

    def step():
        objective.forget(reference=True)  # a real step meets a new batch: time the reference too
        t0 = time.perf_counter()
        loss = float(objective.loss(model, batch))
        t1 = time.perf_counter()
        objective.backward(model, 1.0)
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad()
        t3 = time.perf_counter()
        return loss, t1 - t0, t2 - t1, t3 - t2

    return step


def run_preset(preset: str, args) -> list[list]:
    cfg = GPTConfig.preset(preset, drop_rate=0.0, qkv_bias=True, tie_weights=False)
    x, y = synthetic_batch(args.batch, args.context)
    batch = preference_batch(args.batch, args.context)
    model = GPTModel(cfg, seed=0).train()
    print(f"{preset}: {count_parameters(cfg):,} parameters; full step {x.shape[0]} x {x.shape[1]}, DPO "
          f"{args.batch} pairs x {batch['chosen'].shape[1]} (x 2 halves)", file=sys.stderr, flush=True)
    steppers = {"full fine-tuning": numpygpt_stepper(model, x, y), "DPO": dpo_stepper(model, batch)}
    measured = measure_interleaved(steppers, args.warmup, args.steps, args.max_load, args.max_rounds)
    ref = measured["full fine-tuning"]["step"]
    rows = []
    for name, r in measured.items():
        rows.append([preset, name, f"{r['step']:.2f}", f"{r['spread'] * 100:.0f}%",
                     f"{r['fwd']:.2f} / {r['bwd']:.2f} / {r['opt']:.2f}", f"{r['step'] / ref:.2f}",
                     f"{r['other_load'] * 100:.0f}%", ", ".join(f"{t:.2f}" for t in r["times"])])
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", action="append", help="GPTConfig preset(s) (default gpt2 and gpt2-medium)")
    p.add_argument("--batch", type=int, default=8, help="sequences of the full step, pairs of the DPO step")
    p.add_argument("--context", type=int, default=88, help="T (default %(default)s, the book's first batch)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=common.default_threads())
    p.add_argument("--max-load", type=float, default=MAX_LOAD)
    p.add_argument("--max-rounds", type=int, default=None)
    args = p.parse_args(argv)
    common.apply_threads(args.threads, torch_too=False)
    rows = []
    for preset in args.preset or ["gpt2", "gpt2-medium"]:
        rows += run_preset(preset, args)
    print(common.md_table(["model", "step", "s (median)", "spread", "fwd / bwd / AdamW s", "vs full step",
                           "other load", "steps s"], rows))
    print(f"\nthreads {args.threads}; peak RSS {common.peak_rss_mib() / 1024:.1f} GiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
