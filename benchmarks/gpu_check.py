"""The first GPU session's table: numpygpt on CuPy against PyTorch eager on CUDA.

    python benchmarks/gpu_check.py --pytest-log P --gradcheck-log G --out table.md
    python benchmarks/gpu_check.py --device fake-cuda --config tiny --context 16 --batch 2 \
        --steps 2 --warmup 1 --new-tokens 4 --torch-device cpu          # CI, no GPU

``gpu_check.sh`` runs ``pytest -m cuda`` and ``numpygpt gradcheck --device cuda`` and hands
their logs here; this script adds a GPT-2 small (124M, Hugging Face layout: tied head,
Q/K/V bias) training step at 8 x 1024 tokens (forward, loss, backward, AdamW; float32, no
TF32 on either side, both from the same weights and batch) and greedy generation with the
KV cache (batch 1, 200 new tokens), and writes everything as one Markdown table.

Timings wait for the device (``backend.synchronize`` / ``torch.cuda.synchronize``) before
the clock stops. On the fake device (``--device fake-cuda``: NumPy that refuses what CuPy
refuses) the timings mean nothing, but every code path of the GPU run is exercised and
the host transfers of a training step and of a generated token are counted.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time

import common

GOAL = 0.8  # numpygpt's step at least 0.8x PyTorch eager's speed (issue 20)
LR, WD = 3e-4, 0.1


# -- the logs of the two commands gpu_check.sh runs first --------------------------------------

def parse_pytest(text: str) -> str:
    """pytest's summary counts ('12 passed, 3 skipped'), or what went wrong."""
    found = re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)", text)
    if not found:
        return "no pytest summary in the log"
    return ", ".join(f"{n} {what}" for n, what in found)


def parse_gradcheck(text: str) -> str:
    """'20/20 within 1e-06' from ``numpygpt gradcheck``'s output, or what went wrong."""
    done = re.search(r"(\d+)/(\d+) checks within tolerance", text)
    tol = re.search(r"tolerance ([0-9.e+-]+)", text)
    if not done:
        return "no gradcheck summary in the log"
    return f"{done.group(1)}/{done.group(2)} within {tol.group(1) if tol else '?'}"


# -- numpygpt -----------------------------------------------------------------------------------

def numpygpt_run(cfg, x, y, device: str, warmup: int, steps: int, new_tokens: int) -> dict:
    """Median step time, first loss, generation speed (and host transfers on the fake device)."""
    from numpygpt import CrossEntropyLoss, GPTModel, backend
    from numpygpt.generate import generate
    from numpygpt.optim import AdamW, param_groups

    with backend.device(device):
        model = GPTModel(cfg, seed=0)
        loss_fn = CrossEntropyLoss()
        opt = AdamW(param_groups(model, WD), lr=LR, weight_decay=WD)
        x_dev, y_dev = backend.to_device(x), backend.to_device(y)  # on the device once, as torch's

        def step() -> float:
            opt.zero_grad()
            loss = loss_fn(model(x_dev), y_dev)
            model.backward(loss_fn.backward())
            opt.step()
            return float(loss)  # the step's one host transfer

        first_loss = step()
        out = {"first_loss": first_loss, "step": _timed(step, warmup, steps, backend.synchronize)}
        out["transfers_per_step"] = _fake_transfers(device, step)
        P = _prompt_length(cfg, new_tokens)
        prompt = x[:1, :P]
        gen = _timed(lambda: generate(model, prompt, new_tokens), 1, 3, backend.synchronize)
        out["tokens_per_s"] = new_tokens / gen
        out["transfers_per_token"] = _fake_transfers(device, lambda: generate(model, prompt, new_tokens))
        if out["transfers_per_token"] is not None:
            out["transfers_per_token"] /= new_tokens
        out["greedy"] = backend.to_host(generate(model, prompt, new_tokens))[0, P:].tolist()
        out["memory_gib"] = _cupy_pool_gib(device)
    return out


def _prompt_length(cfg, new_tokens: int) -> int:
    """The generation prompt's length: 16 tokens, fewer where the prompt and the new tokens
    would not fit the context (both sides decode with a KV cache, which must hold them all)."""
    return max(1, min(16, cfg.context_length - new_tokens))


def _timed(fn, warmup: int, repeat: int, synchronize) -> float:
    """Median seconds of ``fn()`` after ``warmup`` untimed calls, the device drained each time."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        synchronize()
        t0 = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fake_transfers(device: str, fn):
    if device != "fake-cuda":
        return None  # CuPy's own arrays cannot be counted from outside; the fake device's can
    from numpygpt import fake_cuda

    with fake_cuda.count_transfers() as log:
        fn()
    return log.total


def _cupy_pool_gib(device: str):
    if device != "cuda":
        return None
    import cupy

    return cupy.get_default_memory_pool().total_bytes() / 2**30


# -- PyTorch ------------------------------------------------------------------------------------

def torch_run(cfg, x, y, device: str, warmup: int, steps: int, new_tokens: int) -> dict | None:
    """The same as numpygpt_run for torch_gpt.TorchGPT (eager attention); None without torch."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    if device == "cuda" and not torch.cuda.is_available():
        return None
    from numpygpt import GPTModel, backend
    from torch_gpt import TorchGPT, generate, load_numpygpt_weights, torch_param_groups

    with backend.device("cpu"):
        tmodel = TorchGPT(cfg, attn_impl="eager")
        load_numpygpt_weights(tmodel, GPTModel(cfg, seed=0))  # numpygpt's weights, bit for bit
    tmodel = tmodel.to(device)
    opt = torch.optim.AdamW(torch_param_groups(tmodel, WD), lr=LR, weight_decay=WD)
    tx, ty = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device).flatten()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(tmodel(tx).flatten(0, 1), ty)
        loss.backward()
        opt.step()
        return loss.item()

    out = {"first_loss": step(), "step": _timed(step, warmup, steps, sync)}
    P = _prompt_length(cfg, new_tokens)
    prompt = tx[:1, :P]
    out["tokens_per_s"] = new_tokens / _timed(lambda: generate(tmodel, prompt, new_tokens), 1, 3, sync)
    out["greedy"] = generate(tmodel, prompt, new_tokens)[0, P:].tolist()
    out["memory_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return out


# -- the table ----------------------------------------------------------------------------------

def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def table(mine: dict, theirs: dict | None, setup: dict, pytest_result: str, gradcheck_result: str) -> str:
    """One Markdown table: what was checked, numpygpt, PyTorch, verdict."""
    t = theirs or {}
    speed = t["step"] / mine["step"] if theirs else None
    tokens = setup["B"] * setup["T"]
    agree = sum(a == b for a, b in zip(mine["greedy"], t.get("greedy", [])))
    rows = [
        ["pytest -m cuda", pytest_result, "", ""],
        ["gradient checks, float64", gradcheck_result, "", ""],
        [f"train step {setup['config']} {setup['B']}x{setup['T']} (ms)", _fmt(mine["step"] * 1e3, ".1f"),
         _fmt(t.get("step", 0) * 1e3 if theirs else None, ".1f"),
         f"speed {speed:.2f}x PyTorch (goal >= {GOAL})" if speed else "no PyTorch"],
        ["train tokens/s", _fmt(tokens / mine["step"], ",.0f"), _fmt(tokens / t["step"] if theirs else None, ",.0f"), ""],
        ["first loss (same weights and batch)", f"{mine['first_loss']:.4f}", _fmt(t.get("first_loss"), ".4f"),
         f"diff {abs(mine['first_loss'] - t['first_loss']):.1e}" if theirs else ""],
        [f"greedy generation, KV cache, {setup['new_tokens']} tokens (tokens/s)", _fmt(mine["tokens_per_s"], ",.1f"),
         _fmt(t.get("tokens_per_s"), ",.1f"), f"{agree}/{len(mine['greedy'])} tokens agree" if theirs else ""],
        ["device memory (GiB: CuPy pool / torch peak)", _fmt(mine["memory_gib"], ".2f"), _fmt(t.get("memory_gib"), ".2f"),
         ""],
    ]
    if mine["transfers_per_step"] is not None:
        rows.append(["host transfers (fake-cuda count)", f"{mine['transfers_per_step']} a step, "
                     f"{mine['transfers_per_token']:.2f} a token", "", "budget: 1 and <= 1"])
    header = f"device: {setup['device']} vs torch on {setup['torch_device']}"
    return header + "\n\n" + common.md_table(["check", "numpygpt", "PyTorch eager", "verdict"], rows)


def describe_versions(device: str) -> str:
    parts = [f"python {sys.version.split()[0]}"]
    try:
        import cupy

        parts.append(f"CuPy {cupy.__version__}")
        if device == "cuda":
            props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
            parts.append(props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"]))
    except Exception:  # noqa: BLE001 - versions are a courtesy, never a failure
        pass
    try:
        import torch

        parts.append(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
    except ImportError:
        parts.append("torch not installed")
    return ", ".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "fake-cuda", "cpu"))
    p.add_argument("--torch-device", default=None, help="default: cuda for --device cuda, else cpu")
    p.add_argument("--config", default="gpt2-hf", choices=sorted(common.CONFIGS))
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--pytest-log", help="output of pytest -m cuda")
    p.add_argument("--gradcheck-log", help="output of numpygpt gradcheck --device cuda")
    p.add_argument("--out", help="also write the table here")
    a = p.parse_args(argv)
    torch_device = a.torch_device or ("cuda" if a.device == "cuda" else "cpu")
    cfg = common.make_config(a.config, context=a.context)
    x, y = common.random_batch(cfg, a.batch, a.context)
    mine = numpygpt_run(cfg, x, y, a.device, a.warmup, a.steps, a.new_tokens)
    theirs = torch_run(cfg, x, y, torch_device, a.warmup, a.steps, a.new_tokens)
    setup = dict(config=a.config, B=a.batch, T=a.context, new_tokens=a.new_tokens, device=a.device,
                 torch_device=torch_device)
    text = table(mine, theirs, setup, _read_and(a.pytest_log, parse_pytest, "not run"),
                 _read_and(a.gradcheck_log, parse_gradcheck, "not run"))
    text = f"{describe_versions(a.device)}\n\n{text}\n"
    print(text)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


def _read_and(path, parse, missing: str) -> str:
    if not path:
        return missing
    with open(path, encoding="utf-8", errors="replace") as f:
        return parse(f.read())


if __name__ == "__main__":
    sys.exit(main())
