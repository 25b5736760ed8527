"""Which vocabulary for the default corpus? GPT-2's against tokenizers trained on it, at one budget.

    python benchmarks/bench_tokenizers.py --threads 1 --budget-steps 200
    python benchmarks/bench_tokenizers.py --threads 1 --budget-steps 200 --only 4096 --out runs/bench_tok

For each vocabulary (``gpt2`` and trained byte-level BPEs of 2k, 4k, 8k and 16k tokens):

1. train the tokenizer on the training split only (the first 90% of the characters, as
   ``numpygpt train`` splits them), so the validation text is new to it too;
2. build the model of CONFIGS: about the default model's work per token, with the
   parameters moved from the embedding into wider or deeper blocks;
3. time a training step of every model in process CPU time, in turns (one step of
   each, six times: a change in the machine's load falls on all alike), and give each
   run as many steps as take the time of ``--budget-steps`` steps of today's default
   run (GPT-2's vocabulary, emb 128, 4 layers): an equal budget that other processes on
   a shared machine do not shrink (measure with ``--threads 1``, where a waiting BLAS
   thread does not count as work);
4. train with ``numpygpt train``'s recipe (``run_training``: AdamW 3e-3, warmup, cosine),
   then evaluate the whole validation split: bits per character, the figure that
   compares vocabularies (the loss per token does not).

The timings go to OUT/step_cpu_seconds.json first; runs of ``--only`` started after it
(in parallel, one process each) share it: time them first with ``--time-only``. Each vocabulary's row is written to
OUT/result-NAME.json as it finishes, and the table is printed from those.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import common

os.environ["NUMPYGPT_NUM_THREADS"] = str(common.early_threads())  # numpygpt's own pool too

import numpy as np  # noqa: E402

from numpygpt.tokenizer import bits_per_character, get_tokenizer, train_bpe  # noqa: E402

# vocabulary -> model shape. The default model spends 50257 x 128 = 6.4M parameters on the
# tied embedding and 0.8M on its blocks; these keep the per-token work of the blocks plus
# the head near its 7.2M and put it into the blocks.
CONFIGS = {
    "gpt2": dict(emb_dim=128, n_layers=4, n_heads=4),    # today's default run
    "16384": dict(emb_dim=192, n_layers=6, n_heads=6),   # head 3.1M, blocks 2.7M
    "8192": dict(emb_dim=256, n_layers=6, n_heads=8),    # head 2.1M, blocks 4.7M
    "4096": dict(emb_dim=256, n_layers=8, n_heads=8),    # head 1.0M, blocks 6.3M
    "2048": dict(emb_dim=256, n_layers=8, n_heads=8),    # head 0.5M, blocks 6.3M
    # the default model's shape with a smaller vocabulary: less work a step, so more steps
    "8192-128x4": dict(emb_dim=128, n_layers=4, n_heads=4),
    "4096-128x4": dict(emb_dim=128, n_layers=4, n_heads=4),
    "2048-128x4": dict(emb_dim=128, n_layers=4, n_heads=4),
    # the small vocabulary's model overfits the 0.4 MB corpus: the same with dropout
    "4096-128x4-drop": dict(emb_dim=128, n_layers=4, n_heads=4, drop_rate=0.1),
}
COMMON = dict(context_length=128, batch_size=8, device="cpu", no_progress=True, eval_freq=100, eval_iter=5,
              sample_tokens=40, greedy=False)


def _tokenizer(name: str, train_text: str, out: str):
    """'gpt2', or the directory of a tokenizer of ``name`` tokens ("4096", "4096-128x4")
    trained on ``train_text``."""
    if name == "gpt2":
        return "gpt2", get_tokenizer()
    size = name.split("-")[0]
    directory = os.path.join(out, f"tokenizer-{size}")
    tokenizer = train_bpe(train_text, int(size))
    tokenizer.save(directory)
    return directory, tokenizer


def _training_step(shape: dict, tokenizer, train_text: str):
    """A function that takes one training step of the model of ``shape``."""
    from numpygpt import GPTConfig, GPTModel
    from numpygpt.data import DataLoader, GPTDataset
    from numpygpt.objective import NextTokenObjective
    from numpygpt.optim import AdamW, param_groups
    from numpygpt.train import forward_backward

    cfg = GPTConfig(vocab_size=tokenizer.n_vocab, context_length=128, qkv_bias=False, tie_weights=True,
                    **{"drop_rate": 0.0, **shape})
    model = GPTModel(cfg, seed=0)
    loader = DataLoader(GPTDataset.from_text(train_text[:200_000], tokenizer, 128, 128), 8, shuffle=True, seed=0)
    optimizer, objective = AdamW(param_groups(model, 0.1), lr=1e-3), NextTokenObjective()
    batches = iter(loader)

    def step():
        forward_backward(model, objective, batches, 1)
        optimizer.step()

    return step


def calibrate(text: str, out: str, names, rounds: int = 6, warmup: int = 3) -> dict:
    """CPU seconds of a training step of every config, measured in turns (one step of each,
    ``rounds`` times, after ``warmup`` rounds) so that a change in the machine's load
    falls on all of them alike; the median of each."""
    from numpygpt.data import split_train_val
    from numpygpt.memory import keep_freed_memory

    keep_freed_memory()  # as train_model does: otherwise every step pays page faults, the large-vocabulary one most
    train_text = split_train_val(text, 0.9)[0]
    steps = {name: _training_step(shape, _tokenizer(name, train_text, out)[1], train_text)
             for name, shape in CONFIGS.items() if name in names}
    times = {name: [] for name in steps}
    for _ in range(warmup + rounds):
        for name, step in steps.items():
            start = time.process_time()
            step()
            times[name].append(time.process_time() - start)
    return {name: float(np.median(t[warmup:])) for name, t in times.items()}


def _full_validation_bits(model, val_loader, val_chars: int) -> tuple[float, float]:
    from numpygpt.nn import CrossEntropyLoss
    from numpygpt.train import calc_loss_loader

    loss = calc_loss_loader(model, CrossEntropyLoss(), val_loader)
    return loss, bits_per_character(loss, len(val_loader.dataset.token_ids), val_chars)


def run_one(name: str, steps: int, text: str, args) -> dict:
    from numpygpt.data import split_train_val
    from numpygpt.run import run_training

    train_text, val_text = split_train_val(text, 0.9)
    source, tokenizer = _tokenizer(name, train_text, args.out)
    shape = CONFIGS[name]
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    result = run_training({**COMMON, **shape, "tokenizer": source, "max_steps": steps,
                           "out": os.path.join(args.out, f"run-{name}")})
    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    from numpygpt.nn import eval_mode

    model = result["model"]
    with eval_mode(model):
        from numpygpt.data import DataLoader, GPTDataset

        val_loader = DataLoader(GPTDataset.from_text(val_text, tokenizer, 128, 128), 8, shuffle=False)
        loss, bits = _full_validation_bits(model, val_loader, len(val_text))
    return {"vocab": name, "n_vocab": tokenizer.n_vocab, **shape, "parameters": model.num_parameters(),
            "chars_per_token": len(val_text) / len(tokenizer.encode_ordinary(val_text)),
            "steps": steps, "run_wall_s": wall, "run_cpu_s": cpu,
            "val_loss": loss, "val_bits_per_char": bits}


def table(rows: list) -> str:
    lines = ["| vocabulary | model (emb x layers) | parameters | chars/token | steps | CPU s/step | "
             "run wall s | val loss | val bits/char |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['vocab']} ({r['n_vocab']:,}) | {r['emb_dim']} x {r['n_layers']} | {r['parameters']:,} | "
                     f"{r['chars_per_token']:.2f} | {r['steps']} | {r['cpu_s_per_step']:.2f} | {r['run_wall_s']:.0f} | "
                     f"{r['val_loss']:.3f} | {r['val_bits_per_char']:.3f} |")
    return "\n".join(lines)


def _step_timings(text: str, args) -> dict:
    """Every config's CPU seconds a step, from OUT/step_cpu_seconds.json; the ones missing
    there are timed now, in turns with the default model, and scaled to the file's timing
    of it."""
    path = os.path.join(args.out, "step_cpu_seconds.json")
    per_step = json.load(open(path)) if os.path.exists(path) else {}
    missing = [name for name in (args.only or CONFIGS) if name not in per_step]
    if missing:
        print(f"timing a step of {', '.join(missing)} on {common.cpu_model()}, "
              f"{common.machine_load(1.0):.0%} of the machine busy with other work",
              flush=True)
        new = calibrate(text, args.out, ["gpt2", *missing])
        scale = per_step.get("gpt2", new["gpt2"]) / new["gpt2"]
        per_step = {**{name: t * scale for name, t in new.items()}, **per_step}
        with open(path, "w") as fh:
            json.dump(per_step, fh, indent=1)
    return per_step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, help="BLAS and numpygpt threads (read before NumPy loads)")
    p.add_argument("--budget-steps", type=int, default=400, help="the budget: the time of this many default steps")
    p.add_argument("--only", nargs="*", choices=list(CONFIGS), help="these vocabularies (default all)")
    p.add_argument("--out", default="runs/bench_tokenizers")
    p.add_argument("--time-only", action="store_true", help="time the models' steps, train nothing")
    args = p.parse_args(argv)
    from numpygpt.data import default_corpus

    os.makedirs(args.out, exist_ok=True)
    text = default_corpus()
    per_step = _step_timings(text, args)
    if args.time_only:
        return
    for name in args.only if args.only is not None else list(CONFIGS):
        steps = max(1, round(args.budget_steps * per_step["gpt2"] / per_step[name]))
        row = {**run_one(name, steps, text, args), "cpu_s_per_step": per_step[name], "numpy": np.__version__}
        with open(os.path.join(args.out, f"result-{name}.json"), "w") as fh:
            json.dump(row, fh, indent=1)
        print(json.dumps(row), flush=True)
    rows = [json.load(open(os.path.join(args.out, f"result-{name}.json"))) for name in CONFIGS
            if os.path.exists(os.path.join(args.out, f"result-{name}.json"))]
    if rows:
        print(table(rows))


if __name__ == "__main__":
    sys.exit(main())
