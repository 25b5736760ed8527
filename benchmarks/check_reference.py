"""Check that torch_gpt.TorchGPT computes what numpygpt computes, so the speed comparisons
compare the same work (and torch_gpt can serve as a reference for numpygpt).

For a few small configurations, in float64 (and float32 with looser tolerances), with the
same weights copied from numpygpt into torch: logits, loss, every parameter's gradient,
the parameters after three AdamW steps, and greedy generation with and without the KV
cache must agree. Exits 1 on any mismatch.

    python benchmarks/check_reference.py
"""

from __future__ import annotations

import sys

import common

common.early_threads()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from numpygpt import CrossEntropyLoss, GPTConfig, GPTModel  # noqa: E402
from numpygpt.optim import AdamW, param_groups  # noqa: E402
from torch_gpt import TorchGPT, generate as torch_generate, load_numpygpt_weights, torch_param_groups  # noqa: E402

_TORCH_DTYPE = {"float64": torch.float64, "float32": torch.float32}


def max_rel(a, b) -> float:
    """max |a - b| / (max |b| + tiny): error relative to the tensor's scale."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def numpygpt_generate(model, idx, n: int, use_cache: bool):
    """Greedy decoding with numpygpt.generate."""
    from numpygpt.generate import generate

    return np.asarray(generate(model, idx, n, use_cache=use_cache))[:, : idx.shape[1] + n]


def check(cfg: GPTConfig, attn_impl: str, B: int = 2, T: int = 12, seed: int = 0) -> list[str]:
    tol = 1e-9 if cfg.dtype == "float64" else 2e-4
    failures = []

    def expect(what, err, tol_=tol):
        status = "ok" if err <= tol_ else "MISMATCH"
        if err > tol_:
            failures.append(f"{what}: {err:.2e} > {tol_:.0e}")
        return status

    nm = GPTModel(cfg, seed=seed)
    tm = TorchGPT(cfg, attn_impl=attn_impl)
    load_numpygpt_weights(tm, nm)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, size=(B, T + 1))
    x, y = ids[:, :-1], ids[:, 1:]
    y = y.copy()
    y[0, 0] = -100  # an ignored target, as the book's instruction fine-tuning uses

    np_groups = param_groups(nm, weight_decay=0.1)
    n_opt = AdamW(np_groups, lr=1e-3, weight_decay=0.1)
    t_opt = torch.optim.AdamW(torch_param_groups(tm, 0.1), lr=1e-3, weight_decay=0.1)
    loss_fn = CrossEntropyLoss()
    for step in range(3):
        logits = nm(x)
        loss = loss_fn(logits, y)
        nm.backward(loss_fn.backward())
        t_logits = tm(torch.from_numpy(x))
        t_loss = F.cross_entropy(t_logits.flatten(0, 1), torch.from_numpy(y).flatten(), ignore_index=-100)
        t_loss.backward()
        if step == 0:
            expect("logits", max_rel(logits, t_logits.detach().numpy()))
            expect("loss", abs(float(loss) - t_loss.item()) / abs(t_loss.item()))
            tparams = dict(tm.named_parameters())
            worst = max((max_rel(p.grad, tparams[n].grad.numpy()), n) for n, p in nm.named_parameters())
            expect(f"gradients (worst: {worst[1]})", worst[0])
        n_opt.step()
        n_opt.zero_grad()
        t_opt.step()
        t_opt.zero_grad()
    tparams = dict(tm.named_parameters())
    worst = max((max_rel(p.data, tparams[n].detach().numpy()), n) for n, p in nm.named_parameters())
    expect(f"parameters after 3 AdamW steps (worst: {worst[1]})", worst[0], max(tol, 1e-6) if cfg.dtype == "float32" else tol)

    prompt = ids[:1, :4]
    n_new = min(8, cfg.context_length - 4)
    gens = {
        "numpygpt, no cache": numpygpt_generate(nm, prompt, n_new, False),
        "numpygpt, cache": numpygpt_generate(nm, prompt, n_new, True),
        "torch, no cache": torch_generate(tm, torch.from_numpy(prompt), n_new, False).numpy(),
        "torch, cache": torch_generate(tm, torch.from_numpy(prompt), n_new, True).numpy(),
    }
    ref = gens["torch, no cache"]
    for k, g in gens.items():
        if not np.array_equal(g, ref):
            failures.append(f"greedy tokens differ: {k} {g.tolist()} vs torch, no cache {ref.tolist()}")
    return failures


def main() -> int:
    common.apply_threads(common.default_threads())
    tiny = dict(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
    cases = [
        (GPTConfig(**tiny, dtype="float64"), "eager"),
        (GPTConfig(**tiny, dtype="float64", qkv_bias=True, tie_weights=True), "eager"),
        (GPTConfig(**tiny, dtype="float64"), "sdpa"),
        (GPTConfig(**tiny, dtype="float32"), "eager"),
    ]
    rows, all_failures = [], []
    for cfg, impl in cases:
        fails = check(cfg, impl)
        name = f"{cfg.dtype}, qkv_bias={cfg.qkv_bias}, tied={cfg.tie_weights}, {impl}"
        rows.append([name, "ok" if not fails else "FAIL: " + "; ".join(fails)])
        all_failures += fails
    print(common.md_table(["torch_gpt vs numpygpt", "logits, loss, grads, AdamW x3, greedy decoding"], rows))
    return 1 if all_failures else 0


if __name__ == "__main__":
    sys.exit(main())
