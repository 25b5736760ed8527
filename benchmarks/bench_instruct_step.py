"""One instruction fine-tuning step (the book's chapter 7) of GPT-2 medium at batch 8:
numpygpt against PyTorch eager, on the same padded batch and the same weights, float32.

    python benchmarks/bench_instruct_step.py                       # synthetic batch, B=8, T=88
    python benchmarks/bench_instruct_step.py --data instruction-data.json   # the book's first batch
    python benchmarks/bench_instruct_step.py --impl numpygpt       # one implementation (half the memory)

The model is chapter 7's: GPT-2 medium (355M; 406M parameters with the untied head the
book makes), ``qkv_bias`` as the checkpoint, dropout 0, random weights (the cost of a step
does not depend on their values). One step is forward + cross-entropy over the targets
that are not -100 + backward + AdamW over every parameter (bench_train_step's steppers:
torch's ``F.cross_entropy`` and numpygpt's ``CrossEntropyLoss`` both skip -100).

The batch is what ``collate_instructions`` makes of 8 sequences: with ``--data``, the first
training batch of the book's split (seed 123, as ``finetune instruct`` draws it), whose
longest text sets T; without, 8 random token sequences of lengths between T/2 and T
(T = 88, the length of that first batch), padded with 50256 and masked with -100 alike.

Two GPT-2 medium models with AdamW state take ~14 GiB; the script checks MemAvailable
first and refuses when both will not fit (then run ``--impl`` one at a time). The
implementations' steps are interleaved round-robin (bench_train_step.measure_interleaved)
so load from other work hits both alike; compare the ratio, not the absolute times.
OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are unset for this process, and the OpenBLAS kernel
in use is printed.
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

from bench_finetune_step import openblas_kernel  # noqa: E402
from bench_train_step import MAX_LOAD, measure_interleaved, numpygpt_stepper, torch_stepper  # noqa: E402
from numpygpt import GPTConfig, GPTModel, count_parameters  # noqa: E402
from numpygpt.finetune.instruct import collate_instructions  # noqa: E402

BYTES_PER_PARAM = 16  # float32 weight, gradient and AdamW's two moments


def book_batch(path: str, B: int):
    """The first training batch ``finetune instruct`` draws from the book's file."""
    from numpygpt.data import DataLoader
    from numpygpt.finetune.instruct import InstructionDataset, load_instruction_data, split_data

    train, _, _ = split_data(load_instruction_data(path))
    loader = DataLoader(InstructionDataset(train), B, shuffle=True, drop_last=True, seed=123,
                        collate_fn=collate_instructions)
    return next(iter(loader))


def synthetic_batch(B: int, T: int, seed: int = 0):
    """B random sequences of lengths in [T/2, T] (one of exactly T), collated."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(T // 2, T + 1, size=B)
    lengths[0] = T
    return collate_instructions([rng.integers(0, 50256, size=n) for n in lengths])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="the book's instruction-data.json: time its first training batch")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=88, help="T of the synthetic batch (default %(default)s)")
    p.add_argument("--preset", default="gpt2-medium", help="GPTConfig preset (default %(default)s)")
    p.add_argument("--impl", choices=("both", "numpygpt", "torch"), default="both")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=common.default_threads())
    p.add_argument("--max-load", type=float, default=MAX_LOAD,
                   help="retake rounds in which other processes used more of the machine than this")
    p.add_argument("--max-rounds", type=int, default=None, help="give up retaking after this many (3 x steps)")
    args = p.parse_args(argv)
    impls = ["numpygpt", "torch eager"] if args.impl == "both" else [
        "numpygpt" if args.impl == "numpygpt" else "torch eager"]
    common.apply_threads(args.threads, torch_too="torch eager" in impls)

    cfg = GPTConfig.preset(args.preset, drop_rate=0.0, qkv_bias=True, tie_weights=False)
    x, y = book_batch(args.data, args.batch) if args.data else synthetic_batch(args.batch, args.context)
    B, T = x.shape
    n_params = count_parameters(cfg)
    # weights, gradients, AdamW moments, and the activations the backward keeps (~10 (B, T, C)
    # arrays a block) with the logits and their softmax and gradient (3 (B, T, V) arrays):
    # 7.1 GiB for GPT-2 medium at 8 x 88, where numpygpt's peak RSS was 6.7 GiB
    activations = 4 * B * T * (10 * cfg.n_layers * cfg.emb_dim + 3 * cfg.vocab_size)
    need = len(impls) * (n_params * BYTES_PER_PARAM + activations) / 2**30
    free = common.meminfo_gib("MemAvailable")
    print(f"threads: {args.threads}; {openblas_kernel()}; torch: "
          f"{common.torch_description() if 'torch eager' in impls else 'not used'}", file=sys.stderr)
    print(f"{args.preset}: {n_params:,} parameters (untied head, qkv_bias); batch {B} x {T}, "
          f"{int((y != -100).sum())} counted targets; ~{need:.0f} GiB needed, {free:.1f} GiB available",
          file=sys.stderr)
    if free < need:
        print(f"not enough memory for {' and '.join(impls)} at once: run --impl numpygpt and --impl torch "
              "one after the other", file=sys.stderr)
        return 2

    steppers = {}
    model = GPTModel(cfg, seed=0).train()
    if "torch eager" in impls:
        from torch_gpt import TorchGPT, load_numpygpt_weights

        tmodel = TorchGPT(cfg, attn_impl="eager")
        load_numpygpt_weights(tmodel, model)  # the same initial weights
        steppers["torch eager"] = torch_stepper(tmodel, x, y)
    if "numpygpt" in impls:
        steppers["numpygpt"] = numpygpt_stepper(model, x, y)
    del model
    steppers = {name: steppers[name] for name in impls}
    measured = measure_interleaved(steppers, args.warmup, args.steps, args.max_load, args.max_rounds)

    ref = measured.get("torch eager", {}).get("step")
    rows = []
    for name in impls:
        r = measured[name]
        rows.append([args.preset, f"{B}x{T}", name, f"{r['step']:.2f}", f"{r['spread'] * 100:.0f}%",
                     f"{r['fwd']:.2f} / {r['bwd']:.2f} / {r['opt']:.2f}", f"{B * T / r['step']:.0f}",
                     f"{ref / r['step']:.2f}" if ref else "-", f"{r['first_loss']:.4f}",
                     f"{r['other_load'] * 100:.0f}%", ", ".join(f"{t:.2f}" for t in r["times"])])
    print(common.md_table(["config", "B x T", "implementation", "step s (median)", "spread",
                           "fwd / bwd / AdamW s", "tokens/s", "throughput vs torch eager", "loss (1st step)",
                           "other load", "steps s"], rows))
    print(f"\npeak RSS {common.peak_rss_mib() / 1024:.1f} GiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
