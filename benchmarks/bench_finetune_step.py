"""Fine-tuning step cost: a GPT-2 small classifier trained in full, in its last block only,
and with LoRA adapters, side by side in one run (float32, AdamW, dropout 0).

    python benchmarks/bench_finetune_step.py                        # B=8, T=120 (the spam data)
    python benchmarks/bench_finetune_step.py --batch 8 --context 120 --steps 5 --rank 16

One step is forward + cross-entropy on (B, 2) logits + backward + AdamW. The modes:

* full: every parameter trains (set_trainable("all"));
* last-block: the book's chapter 6, last block + final LayerNorm + head (7.09M trainable):
  blocks 0..10 and the embeddings run without a cache and the backward stops at block 11;
* lora: apply_lora(rank, alpha) on every block Linear and the head (2.67M trainable): every
  block keeps its cache and runs its backward (only dx and the adapters' small matmuls:
  no dW for the frozen weights), the embeddings run without a cache.

The modes' steps are interleaved round-robin (bench_train_step.measure_interleaved), so
load from other work on a shared machine hits them alike; compare the ratios, not the
absolute times. On a machine shared with other work, ``--threads 1`` gives steadier ratios:
the LoRA step's ~290 rank-16 matmuls each wait for the second BLAS thread when other
work holds its core (benchmarks/RESULTS.md). OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are unset for this process, and the
OpenBLAS kernel in use is printed.
"""

from __future__ import annotations

import argparse
import os
import sys

for _var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):  # let OpenBLAS pick its own kernel
    os.environ.pop(_var, None)

import common  # noqa: E402

common.early_threads()

import numpy as np  # noqa: E402  (after early_threads: BLAS starts with the thread count)

from bench_train_step import MAX_LOAD, measure_interleaved, numpygpt_stepper  # noqa: E402
from numpygpt import GPTConfig, GPTModel, apply_lora  # noqa: E402

MODES = ("full", "last-block", "lora")


def openblas_kernel() -> str:
    """The BLAS library, version and CPU kernel threadpoolctl reports (or why it cannot)."""
    try:
        import threadpoolctl
    except ImportError:
        return "unknown (threadpoolctl not installed)"
    blas = [d for d in threadpoolctl.threadpool_info() if d.get("user_api") == "blas"]
    return "; ".join(f"{d.get('internal_api')} {d.get('version')} kernel {d.get('architecture')}, "
                     f"{d.get('num_threads')} threads" for d in blas) or "no BLAS found"


def build(mode: str, cfg: GPTConfig, rank: int, alpha: float) -> GPTModel:
    model = GPTModel(cfg, seed=0).to_classifier(2, seed=123).train()
    if mode == "lora":
        return apply_lora(model, rank, alpha, seed=123)
    return model.set_trainable("all" if mode == "full" else mode)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=120, help="T: tokens per text (the spam data's longest: 120)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    p.add_argument("--threads", type=int, default=common.default_threads())
    p.add_argument("--max-load", type=float, default=MAX_LOAD,
                   help="retake rounds in which other processes used more of the machine than this")
    args = p.parse_args(argv)
    common.apply_threads(args.threads, torch_too=False)

    cfg = GPTConfig.preset("gpt2", qkv_bias=True, tie_weights=True, drop_rate=0.0)  # GPT-2 small as on the hub
    rng = np.random.default_rng(0)
    x = rng.integers(0, cfg.vocab_size, (args.batch, args.context), dtype=np.int64)
    y = rng.integers(0, 2, args.batch, dtype=np.int64)
    modes = args.modes.split(",")
    steppers, trainable = {}, {}
    for mode in modes:
        model = build(mode, cfg, args.rank, args.alpha)
        trainable[mode] = model.num_parameters(trainable_only=True)
        steppers[mode] = numpygpt_stepper(model, x, y)
    print(f"threads: {args.threads}; NumPy BLAS: {common.numpy_blas()}; OpenBLAS: {openblas_kernel()}",
          file=sys.stderr)
    measured = measure_interleaved(steppers, args.warmup, args.steps, args.max_load)

    ref = measured["full"]["step"] if "full" in measured else None
    rows = []
    for mode in modes:
        r = measured[mode]
        rows.append([
            mode, f"{trainable[mode]:,}", f"{r['step'] * 1e3:.0f}", f"{r['spread'] * 100:.0f}%",
            f"{r['fwd'] * 1e3:.0f} / {r['bwd'] * 1e3:.0f} / {r['opt'] * 1e3:.0f}",
            f"{r['step'] / ref:.2f}" if ref else "n/a", f"{r['other_load'] * 100:.0f}%",
        ])
    lora = f"LoRA rank {args.rank} alpha {args.alpha:g}"
    print(f"### Fine-tuning step, GPT-2 small classifier (2 classes), B={args.batch} T={args.context}, "
          f"{lora}, float32, AdamW, {args.threads} threads, median of {args.steps} interleaved steps "
          f"after {args.warmup} warm-up\n")
    print(common.md_table(["mode", "trainable", "step ms", "spread", "fwd+loss / bwd / AdamW ms",
                           "step / full step", "other load"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
