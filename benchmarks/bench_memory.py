"""Peak memory of training, numpygpt against PyTorch, each in its own fresh process.

    python benchmarks/bench_memory.py                      # GPT-2 small, batch 2, context 256
    python benchmarks/bench_memory.py --config small --batch 8

Every implementation runs in a subprocess (``--worker IMPL``) that reports, from
/proc/self/status: resident memory after the imports, after building the model and its
AdamW optimiser, and the peak (VmHWM) over three training steps. The peak of a
steady-state step (the third; its high-water mark is reset just before it through
/proc/self/clear_refs) above the memory resting before it is the step's working set:
activations kept for backward plus temporaries. Weights + gradients + AdamW's two
moments are 16 bytes per parameter in float32 (listed as "theory").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import common

common.early_threads()

IMPLS = ("numpygpt", "numpygpt before", "torch eager", "torch sdpa")


def reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(impl: str, config: str, B: int, T: int | None, threads: int) -> dict:
    import gc


    out = {"impl": impl}
    from numpygpt import GPTModel, CrossEntropyLoss
    from numpygpt.optim import AdamW, param_groups

    if not impl.startswith("numpygpt"):
        import torch
        import torch.nn.functional as F
        from torch_gpt import TorchGPT, torch_param_groups
    common.apply_threads(threads, torch_too=not impl.startswith("numpygpt"))
    out["rss_import"] = common.current_rss_mib()
    from numpygpt import memory

    out["malloc_kept"] = memory.freed_memory_kept()

    cfg = common.make_config(config, context=T)
    x, y = common.random_batch(cfg, B, cfg.context_length)
    if impl == "numpygpt before":  # dense attention, element-wise layers unthreaded, in one piece
        from numpygpt import parallel

        cfg = cfg.replace(attn_impl="dense")
        parallel.set_num_threads(1)
        parallel.CHUNK_BYTES = 1 << 62
    if impl.startswith("numpygpt"):
        model = GPTModel(cfg, seed=0)
        opt = AdamW(param_groups(model, 0.1), lr=3e-4, weight_decay=0.1)
        loss_fn = CrossEntropyLoss()

        def step():
            loss_fn(model(x), y)
            model.backward(loss_fn.backward())
            opt.step()
            opt.zero_grad()
    else:
        model = TorchGPT(cfg, attn_impl=impl.split()[-1])
        opt = torch.optim.AdamW(torch_param_groups(model, 0.1), lr=3e-4, weight_decay=0.1)
        tx, ty = torch.from_numpy(x), torch.from_numpy(y).flatten()

        def step():
            loss = F.cross_entropy(model(tx).flatten(0, 1), ty)
            loss.backward()
            del loss
            opt.step()
            opt.zero_grad(set_to_none=True)
    gc.collect()
    out["rss_model"] = common.current_rss_mib()
    step()
    step()
    gc.collect()
    out["peak_all"] = common.peak_rss_mib()
    out["rss_rest"] = common.current_rss_mib()
    out["reset_ok"] = reset_peak()
    step()
    out["peak_step"] = common.peak_rss_mib()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--context", type=int, default=None)
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.config, args.batch, args.context, args.threads)))
        return 0

    impls = [i for i in args.impls.split(",") if not (args.no_torch and i.startswith("torch"))]
    results = []
    for impl in impls:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--config", args.config,
               "--batch", str(args.batch), "--threads", str(args.threads)]
        if args.context:
            cmd += ["--context", str(args.context)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"worker {impl} failed:\n{proc.stderr}", file=sys.stderr)
            return 1
        results.append(json.loads(lines[-1][len("RESULT "):]))

    from numpygpt import count_parameters

    cfg = common.make_config(args.config, context=args.context)
    n = count_parameters(cfg)
    theory = 16 * n / 2**20
    rows = []
    for r in results:
        step_extra = r["peak_step"] - r["rss_rest"] if r["reset_ok"] else float("nan")
        rows.append([
            r["impl"], f"{r['rss_import']:.0f}", f"{r['rss_model']:.0f}", f"{r['rss_rest']:.0f}",
            f"{r['peak_all']:.0f}", f"{r['peak_all'] - r['rss_import']:.0f}", f"{step_extra:.0f}",
        ])
    print(f"### Peak memory of training (MiB; {args.config}, {common.fmt_params(n)} parameters, "
          f"B x T = {args.batch} x {cfg.context_length}, float32, AdamW; "
          f"weights + grads + AdamW moments in theory: {theory:.0f} MiB; "
          f"malloc: {'keeps freed memory' if all(r['malloc_kept'] for r in results) else 'default'})\n")
    common.save_json(args.json, "memory", results, config=args.config, B=args.batch, T=cfg.context_length)
    print(common.md_table(
        ["implementation", "RSS after imports", "after model + optimiser", "resting between steps",
         "peak (3 steps)", "peak above imports", "steady-state step above resting"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
