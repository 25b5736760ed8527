"""The attention matmuls of one GPT-2 small layer, (B, NH, T, hs) = (2, 12, 256, 64), done
several ways on NumPy: which is fastest, and which survives other load on the machine.

    python benchmarks/bench_attention.py
    python benchmarks/bench_attention.py --batch 8 --context 1024

A batched ``@`` on 4-D arrays is B * NH separate small GEMMs (256 x 64 x 256: 8 MFLOP
each); OpenBLAS splits each one over its threads and joins them again, so every head pays
a thread start and barrier, and one thread delayed by another process stalls all of them.

Variants, each running the six products of a layer's forward + backward
(q k^T, att v; datt = dy v^T, dv = att^T dy, dq = ds k, dk = ds^T q):
- ``numpy @, BLAS N threads``: what numpygpt does now (views of the fused qkv, as it has);
- ``numpy @, BLAS 1 thread``: the same with OpenBLAS limited to one thread (threadpoolctl);
- ``heads over a thread pool``: the B * NH heads split into one contiguous part per core,
  each part a batched ``@`` on a single-threaded BLAS (NumPy releases the GIL in matmul);
- ``contiguous q, k, v``: as the first, after copying q, k, v into contiguous arrays.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor

import common

common.early_threads()

import numpy as np  # noqa: E402


def make(B, NH, T, hs, seed=0):
    rng = np.random.default_rng(seed)
    C = NH * hs
    qkv = rng.standard_normal((B, T, 3 * C), dtype=np.float32)
    q, k, v = qkv.reshape(B, T, 3, NH, hs).transpose(2, 0, 3, 1, 4)  # views, as numpygpt
    att = rng.random((B, NH, T, T), dtype=np.float32)
    dy = rng.standard_normal((B, NH, T, hs), dtype=np.float32)
    return q, k, v, att, dy


def six(q, k, v, att, dy):
    """The six attention products of one layer (forward and backward)."""
    q @ k.transpose(0, 1, 3, 2)
    att @ v
    dy @ v.transpose(0, 1, 3, 2)
    att.transpose(0, 1, 3, 2) @ dy
    att @ k
    att.transpose(0, 1, 3, 2) @ q


def pooled(pool, n_workers, arrays):
    """six() on each worker's contiguous share of the B * NH heads."""
    B, NH = arrays[0].shape[:2]
    flat = [a.reshape(B * NH, *a.shape[2:]) for a in arrays]
    per = -(-(B * NH) // n_workers)
    parts = [(i, min(i + per, B * NH)) for i in range(0, B * NH, per)]
    futs = [pool.submit(lambda s, e: six(*(a[None, s:e] for a in flat)), s, e) for s, e in parts]
    for f in futs:
        f.result()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args(argv)
    common.apply_threads(args.threads, torch_too=False)
    import threadpoolctl

    B, NH, T, hs = args.batch, args.heads, args.context, args.head_size
    arrays = make(B, NH, T, hs)
    q, k, v, att, dy = arrays
    contiguous = tuple(np.ascontiguousarray(a) for a in arrays)
    flops = 6 * 2.0 * B * NH * T * T * hs
    pool = ThreadPoolExecutor(max_workers=args.threads)
    ctl = threadpoolctl.ThreadpoolController()

    def one_thread(fn):
        def run():
            with ctl.limit(limits=1, user_api="blas"):
                fn()
        return run

    variants = [
        (f"numpy @, BLAS {args.threads} threads (numpygpt now)", lambda: six(*arrays)),
        ("numpy @, BLAS 1 thread", one_thread(lambda: six(*arrays))),
        (f"heads over a {args.threads}-thread pool, BLAS 1 thread each",
         one_thread(lambda: pooled(pool, args.threads, arrays))),
        (f"contiguous q, k, v; BLAS {args.threads} threads", lambda: six(*contiguous)),
    ]
    rows = []
    for name, fn in variants:
        mon = common.LoadMonitor().start()
        t = common.time_calls(fn, warmup=2, repeat=args.repeat)
        load = mon.stop()
        ms = common.median(t) * 1e3
        rows.append([name, f"{ms:.1f}", f"{flops / (ms / 1e3) / 1e9:.0f}", f"{load:.0%}"])
    print(f"### Attention matmuls of one layer, forward + backward ((B, NH, T, hs) = ({B}, {NH}, {T}, {hs}), "
          f"{flops / 1e9:.2f} GFLOP, {args.threads} threads)\n")
    print(common.md_table(["variant", "ms (median)", "GFLOP/s", "other load"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
