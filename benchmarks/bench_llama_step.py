"""One training step of a Llama 3-shaped model (forward + loss + backward + AdamW), numpygpt's
LlamaModel against Hugging Face transformers' LlamaForCausalLM in PyTorch, float32, the same
configuration, weights, batch and thread count, in one process, steps taken in turns.

    python benchmarks/bench_llama_step.py                             # llama-small and llama-124m, 2x256
    python benchmarks/bench_llama_step.py --configs llama-124m --batch 4 --context 1024 --steps 3
    python benchmarks/bench_llama_step.py --no-torch                  # numpygpt alone
    python benchmarks/bench_llama_step.py --memory --configs llama-124m  # peak memory, a process each

The configs: ``llama-small`` is numpygpt's preset (~19M parameters with GPT-2's vocabulary:
8 layers, C 256, 8 heads over 4 key/value heads, SwiGLU 768); ``llama-124m`` is a Llama of
GPT-2 small's size (12 layers, C 768, 12 heads over 4 key/value heads, SwiGLU 2048, GPT-2's
vocabulary, tied head: 114M parameters), the row issue 17 asks for. RoPE theta 500,000, no
RoPE scaling, no dropout.

numpygpt's model is drawn from a seed and written with ``numpygpt.save_pretrained``;
transformers loads that directory (``from_pretrained``), so both start from the same weights
(the first losses agree in the table). "torch eager" is transformers' ``attn_implementation=
"eager"`` (q k^T, mask, softmax, @ v), "torch sdpa" its ``F.scaled_dot_product_attention``.
The optimiser is ``torch.optim.AdamW`` with PyTorch's defaults for CPU tensors and
numpygpt's decay groups (``numpygpt.optim.param_groups``: matrices decayed, norms and the
token embedding not), lr 3e-4, weight decay 0.1.

The implementations' steps are interleaved round-robin (``bench_train_step.measure_interleaved``)
so load from other work hits them alike; the "other load" column says how much there was.
OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are unset for this process, and the OpenBLAS kernel in
use is printed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile

for _var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):  # let OpenBLAS pick its own kernel
    os.environ.pop(_var, None)

import common  # noqa: E402

common.early_threads()

import numpy  # noqa: E402,F401  (after early_threads: BLAS starts with the thread count)

from bench_finetune_step import openblas_kernel  # noqa: E402
from bench_train_step import (MAX_LOAD, measure_interleaved, numpygpt_stepper, table, table_rows,  # noqa: E402
                              torch_stepper)
from numpygpt import LlamaConfig, LlamaModel, count_parameters, save_pretrained  # noqa: E402

CONFIGS = {
    "llama-small": LlamaConfig.preset("llama-small").to_dict(),
    "llama-124m": dict(model_type="llama", vocab_size=50257, context_length=1024, emb_dim=768, n_heads=12,
                       n_kv_heads=4, hidden_dim=2048, n_layers=12, rope_theta=500000.0, tie_weights=True),
}


def llama_config(name: str, T: int) -> LlamaConfig:
    return LlamaConfig(**{**CONFIGS[name], "context_length": max(T, 16)})


def train_flops(cfg: LlamaConfig, B: int, T: int) -> float:
    """6 N B T + 12 L (NH hs) T B T, as common.train_flops for GPT-2: N the parameters in
    matmuls (the token embedding is a lookup; a tied head counts once, as a matmul)."""
    N = count_parameters(cfg) - (0 if cfg.tie_weights else cfg.vocab_size * cfg.emb_dim)
    return 6.0 * N * B * T + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * T * B * T


def hf_model(directory: str, attn: str):
    """transformers' LlamaForCausalLM from ``directory``, float32, returning the logits alone
    (what bench_train_step.torch_stepper calls)."""
    import torch
    from transformers import LlamaForCausalLM

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.m = model

        def forward(self, idx):
            return self.m(input_ids=idx, use_cache=False).logits  # (B, T, V)

    model = LlamaForCausalLM.from_pretrained(directory, torch_dtype=torch.float32, attn_implementation=attn)
    return Logits(model.train())


def run_cfg(name: str, B: int, T: int, warmup: int, steps: int, impls: list[str], max_load: float) -> list[dict]:
    cfg = llama_config(name, T)
    x, y = common.random_batch(cfg, B, T)
    steppers = {}
    with tempfile.TemporaryDirectory() as directory:
        ours = LlamaModel(cfg, seed=0)
        save_pretrained(ours, directory)
        for impl in impls:
            if impl == "numpygpt":
                steppers[impl] = numpygpt_stepper(ours.train(), x, y)
            else:
                steppers[impl] = torch_stepper(hf_model(directory, impl.split()[-1]), x, y)
    measured = measure_interleaved(steppers, warmup, steps, max_load)
    del steppers
    gc.collect()
    return table_rows(measured, impls, name, B, T, count_parameters(cfg), train_flops(cfg, B, T))


# -- peak memory: each implementation in its own process ------------------------------------------

def memory_worker(impl: str, directory: str, B: int, T: int) -> dict:
    """Resident memory (MiB) of one implementation training the model saved in ``directory``:
    after the imports, after loading the model and building AdamW, resting after two steps, the
    peak over three steps and the third step's own peak (bench_memory's measures)."""
    from bench_memory import reset_peak
    from numpygpt import from_pretrained

    out = {"impl": impl, "rss_import": common.current_rss_mib()}
    if impl == "numpygpt":
        model = from_pretrained(directory)
        x, y = common.random_batch(model.cfg, B, T)
        step = numpygpt_stepper(model.train(), x, y)
    else:
        model = hf_model(directory, impl.split()[-1])
        x, y = common.random_batch(model.m.config, B, T)
        step = torch_stepper(model, x, y)
    gc.collect()
    out["rss_model"] = common.current_rss_mib()
    step()
    step()
    gc.collect()
    out["peak_all"], out["rss_rest"] = common.peak_rss_mib(), common.current_rss_mib()
    out["reset_ok"] = reset_peak()
    step()
    out["peak_step"] = common.peak_rss_mib()
    return out


def memory_table(name: str, B: int, T: int, impls: list[str], threads: int) -> str:
    """bench_memory's table for ``name``: the model saved once, each implementation loading it
    in a fresh process (``--memory-worker``)."""
    import subprocess

    cfg = llama_config(name, T)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        save_pretrained(LlamaModel(cfg, seed=0), directory)
        for impl in impls:
            cmd = [sys.executable, os.path.abspath(__file__), "--memory-worker", impl, "--model-dir", directory,
                   "--batch", str(B), "--context", str(T), "--threads", str(threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                raise RuntimeError(f"worker {impl} failed:\n{proc.stderr}")
            r = json.loads(lines[-1][len("RESULT "):])
            step = r["peak_step"] - r["rss_rest"] if r["reset_ok"] else float("nan")
            rows.append([name, f"{B}x{T}", impl, *(f"{r[k]:.0f}" for k in ("rss_import", "rss_model", "rss_rest",
                                                                          "peak_all")),
                         f"{r['peak_all'] - r['rss_import']:.0f}", f"{step:.0f}"])
    theory = 16 * count_parameters(cfg) / 2**20
    return (f"weights + gradients + AdamW moments in theory: {theory:.0f} MiB\n\n" + common.md_table(
        ["config", "B x T", "implementation", "RSS after imports", "after model + optimiser", "resting between steps",
         "peak (3 steps)", "peak above imports", "steady-state step above resting"], rows))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="llama-small,llama-124m", help=f"comma-separated: {', '.join(CONFIGS)}")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per implementation (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=common.default_threads())
    p.add_argument("--no-torch", action="store_true", help="numpygpt only")
    p.add_argument("--no-sdpa", action="store_true", help="skip transformers' SDPA attention")
    p.add_argument("--max-load", type=float, default=MAX_LOAD,
                   help="retake rounds in which other processes used more of the machine than this "
                        "(1 keeps every round: a machine that is never quiet)")
    p.add_argument("--memory", action="store_true", help="peak memory instead of time, each implementation in "
                                                           "its own process")
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    common.apply_threads(args.threads, torch_too=not (args.no_torch or args.memory_worker == "numpygpt"))
    if args.memory_worker:
        print("RESULT " + json.dumps(memory_worker(args.memory_worker, args.model_dir, args.batch, args.context)))
        return 0
    impls = ["numpygpt"] + ([] if args.no_torch else ["torch eager"] + ([] if args.no_sdpa else ["torch sdpa"]))
    if args.memory:
        for name in args.configs.split(","):
            print(f"### Peak memory of a Llama training step (MiB; float32, AdamW, {args.threads} threads)\n")
            print(memory_table(name, args.batch, args.context, impls, args.threads) + "\n")
        return 0
    print(f"threads: {args.threads}; NumPy BLAS: {common.numpy_blas()}; OpenBLAS: {openblas_kernel()}; torch: "
          f"{common.torch_description() if not args.no_torch else 'not used'}", file=sys.stderr)
    results = []
    for name in args.configs.split(","):
        results += run_cfg(name, args.batch, args.context, args.warmup, args.steps, impls, args.max_load)
        print(f"done: {name}", file=sys.stderr)
    print(f"### Llama training step (float32, AdamW, {args.threads} threads; torch: transformers' "
          f"LlamaForCausalLM; median of {args.steps} interleaved steps after {args.warmup} warm-up)\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
