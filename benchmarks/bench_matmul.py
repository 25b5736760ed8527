"""The machine's float32 matmul ceiling: square GEMMs and the GEMM shapes of a GPT-2 small
training step (B*T = 512 rows), in GFLOP/s, NumPy (its BLAS) against torch.

    python benchmarks/bench_matmul.py
    python benchmarks/bench_matmul.py --sizes 1024,2048,4096 --threads 1

A step's model FLOP rate can't exceed these numbers; the gap between a model's rate and
the GEMM rate for its shapes is time spent outside matrix multiplication.
"""

from __future__ import annotations

import argparse
import sys

import common

common.early_threads()

import numpy as np  # noqa: E402


def gpt2_shapes(N: int = 512, C: int = 768, V: int = 50257):
    """(label, M, K, N) of the GEMMs in a GPT-2 small step with N = B*T rows."""
    return [
        ("c_fc fwd  x @ W (N,C)x(C,4C)", N, C, 4 * C),
        ("c_fc bwd dW = x.T @ dy (C,N)x(N,4C)", C, N, 4 * C),
        ("c_proj fwd (N,4C)x(4C,C)", N, 4 * C, C),
        ("lm_head fwd (N,C)x(C,V)", N, C, V),
        ("lm_head bwd dW (V,N)x(N,C)", V, N, C),
    ]


def gflops_numpy(M, K, N, repeat, a_t=False, best: bool = False):
    """GFLOP/s of NumPy's a @ b: at the median call, or at the fastest (``best``: the ceiling,
    the least disturbed by other work on the machine)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((K, M) if a_t else (M, K), dtype=np.float32)
    b = rng.standard_normal((K, N), dtype=np.float32)
    a_ = a.T if a_t else a
    t = common.time_calls(lambda: a_ @ b, warmup=1, repeat=repeat)
    return 2.0 * M * K * N / (min(t) if best else common.median(t)) / 1e9


def gflops_torch(M, K, N, repeat, a_t=False):
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn((K, M) if a_t else (M, K), generator=g)
    b = torch.randn(K, N, generator=g)
    a_ = a.t() if a_t else a
    t = common.time_calls(lambda: a_ @ b, warmup=1, repeat=repeat)
    return 2.0 * M * K * N / common.median(t) / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--sizes", default="1024,2048,4096")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--no-gpt2-shapes", action="store_true")
    args = p.parse_args(argv)
    common.apply_threads(args.threads, torch_too=not args.no_torch)

    cases = [(f"{n} x {n} x {n}", n, n, n, False) for n in map(int, args.sizes.split(","))]
    if not args.no_gpt2_shapes:
        cases += [(label, M, K, N, "bwd" in label) for label, M, K, N in gpt2_shapes()]
    rows, results = [], []
    for label, M, K, N, a_t in cases:
        rep = args.repeat if M * K * N <= 2048**3 else max(2, args.repeat // 2)
        mon = common.LoadMonitor().start()
        res = {"label": label, "square": label.startswith(f"{M} x"), "numpy": gflops_numpy(M, K, N, rep, a_t),
               "numpy_best": gflops_numpy(M, K, N, rep, a_t, best=True)}
        if not args.no_torch:
            res["torch"] = gflops_torch(M, K, N, rep, a_t)
        res["other_load"] = mon.stop()
        results.append(res)
        rows.append([label] + [f"{res[k]:.0f}" for k in ("numpy", "torch") if k in res])
    common.save_json(args.json, "matmul", results, threads=args.threads, numpy_blas=common.numpy_blas())
    header = ["float32 GEMM (M x K x N)", "NumPy GFLOP/s"] + ([] if args.no_torch else ["torch GFLOP/s"])
    print(f"### float32 matmul ceiling ({args.threads} threads; NumPy: {common.numpy_blas()})\n")
    print(common.md_table(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
