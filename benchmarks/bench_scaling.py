"""How the training step scales with context length and with width, numpygpt against
PyTorch eager (and SDPA for the context sweep, where attention grows quadratically).

    python benchmarks/bench_scaling.py
    python benchmarks/bench_scaling.py --sweep context --contexts 128,256,512,1024,2048
    python benchmarks/bench_scaling.py --sweep width --widths 256,512,768,1024 --layers 6

Context sweep: 4 layers of GPT-2 small's width (C=768, 12 heads), vocabulary 50257,
batch 1, T = 128 ... 1024. Width sweep: 4 layers, head size 64, batch 2, T = 256,
C = 256 ... 1024. (``--config`` picks the base model whose layers are overridden.) "attn FLOP share" is the attention term's part of the model FLOPs
(12 L C T^2 B of 6 N B T + 12 L C T^2 B).
"""

from __future__ import annotations

import argparse
import sys

import common

common.early_threads()

import bench_train_step as bts  # noqa: E402


def sweep(cfgs: list[tuple[str, object]], B: int, warmup: int, steps: int, impls: list[str],
          max_load: float = bts.MAX_LOAD) -> list[dict]:
    results = []
    for label, cfg in cfgs:
        results += bts.run_cfg(cfg, label, B, warmup, steps, impls, max_load)
        print(f"done: {label}", file=sys.stderr)
    return results


def table(results: list[dict], key: str) -> str:
    by_label = {}
    for r in results:
        by_label.setdefault(r["config"], {})[r["impl"]] = r
    impls = list(dict.fromkeys(r["impl"] for r in results))
    header = [key, "params", "B x T", "attn FLOP share"] + [f"{i} ms" for i in impls]
    header += [f"{i} tokens/s" for i in impls]
    if "torch eager" in impls:
        header += [f"{i} vs torch eager" for i in impls if i != "torch eager"]
    header += ["other load"]
    rows = []
    for label, d in by_label.items():
        any_r = next(iter(d.values()))
        cfg_attn = 12.0 * any_r["n_layers"] * any_r["C"] * any_r["T"] * any_r["B"] * any_r["T"]
        row = [label, common.fmt_params(any_r["params"]), f"{any_r['B']}x{any_r['T']}",
               f"{cfg_attn / any_r['flops']:.0%}"]
        row += [f"{d[i]['step'] * 1e3:.0f}" for i in impls]
        row += [f"{d[i]['tokens_per_s']:.0f}" for i in impls]
        if "torch eager" in impls:
            row += [f"{d[i]['tokens_per_s'] / d['torch eager']['tokens_per_s']:.2f}" for i in impls if i != "torch eager"]
        row.append(f"{max(d[i]['other_load'] for i in impls) * 100:.0f}%")
        rows.append(row)
    return common.md_table(header, rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--sweep", choices=("context", "width", "both"), default="both")
    p.add_argument("--contexts", default="128,256,512,1024")
    p.add_argument("--widths", default="256,512,768,1024")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-sdpa", action="store_true")
    p.add_argument("--max-load", type=float, default=bts.MAX_LOAD,
                   help="retake rounds in which other processes used more of the machine than this")
    args = p.parse_args(argv)
    common.apply_threads(args.threads, torch_too=not args.no_torch)
    impls = ["numpygpt"] + ([] if args.no_torch else ["torch eager"] + ([] if args.no_sdpa else ["torch sdpa"]))

    def annotate(results):
        for r in results:
            cfg = r["cfg"]
            r.update(n_layers=cfg.n_layers, C=cfg.emb_dim)
        return results

    if args.sweep in ("context", "both"):
        cfgs = [(f"T={T}", common.make_config(args.config, context=T, n_layers=args.layers))
                for T in map(int, args.contexts.split(","))]
        res = annotate(sweep_with_cfg(cfgs, 1, args.warmup, args.steps, impls, args.max_load))
        c0 = cfgs[0][1]
        print(f"### Step time against context length ({args.layers} layers, C={c0.emb_dim}, {c0.n_heads} heads, "
              f"V={c0.vocab_size}, "
              f"batch 1, {args.threads} threads, median of {args.steps})\n")
        print(table(res, "context"))
        print()
    if args.sweep in ("width", "both"):
        cfgs = [(f"C={C}", common.make_config(args.config, context=256, n_layers=args.layers, emb_dim=C,
                                                n_heads=C // 64))
                for C in map(int, args.widths.split(","))]
        wimpls = [i for i in impls if i != "torch sdpa"]
        res = annotate(sweep_with_cfg(cfgs, 2, args.warmup, args.steps, wimpls, args.max_load))
        print(f"### Step time against width ({args.layers} layers, head size 64, V={cfgs[0][1].vocab_size}, "
              f"batch 2, T=256, "
              f"{args.threads} threads, median of {args.steps})\n")
        print(table(res, "width"))
    return 0


def sweep_with_cfg(cfgs, B, warmup, steps, impls, max_load=bts.MAX_LOAD):
    results = sweep(cfgs, B, warmup, steps, impls, max_load)
    by_label = dict(cfgs)
    for r in results:
        r["cfg"] = by_label[r["config"]]
    return results


if __name__ == "__main__":
    sys.exit(main())
