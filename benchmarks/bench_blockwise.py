"""Dense against blockwise attention: one GPT-2 small attention layer (12 heads of 64,
Q/K/V bias), forward + backward, float32, at a fixed number of tokens per batch and a
range of context lengths. Its break-even sets ``numpygpt.nn.blockwise_attention.AUTO_MIN_T``,
where ``attn_impl="auto"`` switches from the one to the other.

    python benchmarks/bench_blockwise.py
    python benchmarks/bench_blockwise.py --contexts 64,128,256 --tokens 2048 --blocks 64,128,256

Both layers have the same weights and inputs and run interleaved (rotating the order each
round), median of ``--repeat`` rounds; rounds in which other processes took more than
``--max-load`` of the machine are retaken (up to 3x).
"""

from __future__ import annotations

import argparse
import sys
import time

import common

common.early_threads()

import numpy as np  # noqa: E402

from numpygpt.nn import BlockwiseAttention, MultiHeadAttention  # noqa: E402


def layers(C: int, NH: int, blocks: list[int]) -> dict:
    out = {"dense": MultiHeadAttention(C, C, NH, qkv_bias=True, seed=0)}
    for b in blocks:
        layer = BlockwiseAttention(C, C, NH, qkv_bias=True, seed=0, mode="blockwise", block_q=b, block_k=b)
        out[f"blockwise {b}x{b}"] = layer
    return out


def measure(impls: dict, x, dy, repeat: int, max_load: float) -> dict:
    times = {name: [] for name in impls}
    for layer in impls.values():  # warm-up
        layer(x)
        layer.backward(dy)
    names = list(impls)
    for i in range(3 * repeat):
        k = i % len(names)
        mon = common.LoadMonitor().start()
        rnd = {}
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            impls[name](x)
            impls[name].backward(dy)
            rnd[name] = time.perf_counter() - t0
        if mon.stop() <= max_load or i >= 3 * repeat - repeat:
            for name, t in rnd.items():
                times[name].append(t)
        if min(len(t) for t in times.values()) >= repeat:
            break
    return {name: common.median(t) for name, t in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=common.default_threads())
    p.add_argument("--contexts", default="32,64,128,256,512,1024")
    p.add_argument("--tokens", type=int, default=4096, help="B x T, the same at every T")
    p.add_argument("--blocks", default="128", help="tile sizes to try (block_q = block_k)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--max-load", type=float, default=0.1)
    args = p.parse_args(argv)
    common.apply_threads(args.threads, torch_too=False)
    print(f"threads: {args.threads}; NumPy BLAS: {common.numpy_blas()}", file=sys.stderr)
    C, NH = 768, 12
    blocks = [int(b) for b in args.blocks.split(",")]
    rows = []
    rng = np.random.default_rng(0)
    for T in [int(t) for t in args.contexts.split(",")]:
        B = max(1, args.tokens // T)
        x = rng.standard_normal((B, T, C), dtype=np.float32)
        dy = rng.standard_normal((B, T, C), dtype=np.float32)
        res = measure(layers(C, NH, blocks), x, dy, args.repeat, args.max_load)
        best = min((t, n) for n, t in res.items() if n != "dense")
        rows.append([f"{B}x{T}", f"{res['dense'] * 1e3:.1f}"] + [f"{res[n] * 1e3:.1f}" for n in res if n != "dense"]
                    + [f"{res['dense'] / best[0]:.2f}"])
        print(f"done: T={T}", file=sys.stderr)
    print(f"### One attention layer, forward + backward (C=768, 12 heads, float32, {args.threads} threads, "
          f"median of {args.repeat})\n")
    print(common.md_table(["B x T", "dense ms"] + [f"blockwise {b}x{b} ms" for b in blocks]
                          + ["dense / best blockwise"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
