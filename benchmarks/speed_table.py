"""The one speed table: built from the JSON results of one ``run_all.py`` run (every script's
``--json``), with the machine it ran on, and written into the README between two markers.

    python benchmarks/speed_table.py benchmarks/out/json            # print it
    python benchmarks/speed_table.py benchmarks/out/json --readme README.md

Every figure in it comes from that one run: the machine (CPU model, cores, the BLAS and its
kernels as threadpoolctl reports them), the float32 GEMM ceiling measured in the run (NumPy's
best square GEMM), both libraries' versions, each training step's median with numpygpt's
speed over PyTorch's as the ratio of the medians and the range of the per-round ratios
(the implementations take turns, one step each a round), model FLOPs as a share of the
ceiling (MFU), the allocator each row ran with, peak memory and generation.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import common

START = "<!-- speed table: written by benchmarks/run_all.py, do not edit by hand -->"
END = "<!-- end of the speed table -->"
KEPT = "same for both: glibc keeps freed memory (numpygpt's setting)"
DEFAULT = "same for both: glibc's default"
LOADED = 10  # percent of other load above which the table says it was taken under load


def load(folder: str) -> dict[str, list[dict]]:
    """kind -> the records of that kind (one per script run), by file name order."""
    out: dict[str, list[dict]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        if os.path.basename(path) == "machine.json":
            continue
        with open(path) as f:
            rec = json.load(f)
        out.setdefault(rec["kind"], []).append(rec)
    return out


def ceiling(records: dict) -> float | None:
    """NumPy's best square float32 GEMM in GFLOP/s in this run, over every matmul record (run_all
    measures it first and last) and at the fastest call where recorded: other work on the
    machine only ever slows a GEMM down. None without a matmul run."""
    rates = [max(r["numpy"], r.get("numpy_best", 0.0)) for rec in records.get("matmul", []) for r in rec["results"]
             if r["square"]]
    return max(rates) if rates else None


def _step_cell(r: dict, peak: float | None) -> str:
    mfu = f", MFU {r['flop_rate'] / 1e9 / peak:.0%}" if peak else ""
    return (f"{r['step']:.2f} s ({r['spread']:.0%} spread), {r['tokens_per_s']:.0f} tokens/s, "
            f"{r['flop_rate'] / 1e9:.0f} GFLOP/s{mfu}")


def ratio_cell(np_times: list[float], other_times: list[float], paired: bool) -> str:
    """numpygpt's speed over the other's: the ratio of median step times, and the range of
    the per-round ratios (paired: the same rounds) or of every pair (two separate runs)."""
    med = common.median(other_times) / common.median(np_times)
    if paired:
        per = [o / n for n, o in zip(np_times, other_times)]
    else:
        per = [o / n for n in np_times for o in other_times]
    return f"**{med:.2f}x** ({min(per):.2f}-{max(per):.2f})"


def _shape(r: dict) -> str:
    return f"{r['config']} ({r['params'] / 1e6:.1f}M), {r['B']} x {r['T']}"


def train_rows(records: dict, peak: float | None) -> list[list[str]]:
    """One row per (shape, allocator, PyTorch variant) measured in turns, then numpygpt with
    its allocator setting against PyTorch eager with glibc's default (each as it runs
    out of the box, two runs) where both were measured."""
    rows, by_key = [], {}
    # numpygpt's allocator setting first, then glibc's default (sorted is stable: run order kept)
    for rec in sorted(records.get("train", []), key=lambda rec: not rec["malloc_kept"]):
        res = {r["impl"]: r for r in rec["results"]}
        if "numpygpt" not in res or rec.get("busy"):
            continue
        npg = res["numpygpt"]
        key = (npg["config"], npg["B"], npg["T"])
        by_key.setdefault(key, {}).setdefault(rec["malloc_kept"], {}).update(res)
        for impl, r in res.items():
            if not impl.startswith("torch"):
                continue
            rows.append([f"training step, {_shape(npg)}, vs {impl}", _step_cell(npg, peak), _step_cell(r, peak),
                         ratio_cell(npg["times"], r["times"], paired=True), KEPT if rec["malloc_kept"] else DEFAULT,
                         f"{max(npg['other_load'], r['other_load']):.0%}"])
    for key, by_malloc in by_key.items():
        kept, default = by_malloc.get(True, {}), by_malloc.get(False, {})
        if "numpygpt" in kept and "torch eager" in default:
            npg, r = kept["numpygpt"], default["torch eager"]
            rows.append([f"training step, {_shape(npg)}, vs torch eager", _step_cell(npg, peak),
                         _step_cell(r, peak), ratio_cell(npg["times"], r["times"], paired=False),
                         "each library's default (numpygpt keeps freed memory, PyTorch glibc's default; two runs)",
                         f"{max(npg['other_load'], r['other_load']):.0%}"])
    return rows


def memory_rows(records: dict) -> list[list[str]]:
    rows = []
    for rec in records.get("memory", []):
        res = {r["impl"]: r for r in rec["results"]}
        if "numpygpt" not in res:
            continue
        npg = res["numpygpt"]["peak_all"]
        kept = all(r.get("malloc_kept", rec["malloc_kept"]) for r in rec["results"])  # each worker's own
        for impl, r in res.items():
            if impl.startswith("torch"):
                rows.append([f"peak memory of training, {rec['config']}, {rec['B']} x {rec['T']}, vs {impl}",
                             f"{npg:.0f} MiB", f"{r['peak_all']:.0f} MiB", f"{npg / r['peak_all']:.2f}x the memory",
                             KEPT if kept else DEFAULT, ""])
    return rows


def generate_rows(records: dict) -> list[list[str]]:
    rows = []
    for rec in records.get("generate", []):
        res = {(r["impl"], r["mode"]): r for r in rec["results"]}
        npg = res.get(("numpygpt", "KV cache"))
        for (impl, mode), r in res.items():
            if npg and mode == "KV cache" and impl.startswith("torch"):
                rows.append([f"greedy generation, KV cache, {rec['config']}, {rec['new_tokens']} tokens, vs {impl}",
                             f"{npg['tokens_per_s']:.1f} tokens/s", f"{r['tokens_per_s']:.1f} tokens/s",
                             f"**{npg['tokens_per_s'] / r['tokens_per_s']:.2f}x**",
                             KEPT if rec["malloc_kept"] else DEFAULT,
                             f"{max(npg['other_load'], r['other_load']):.0%}"])
    return rows


def machine_line(machine: dict, peak: float | None, when: str, command: str, minutes=None) -> str:
    minutes = f" (the run took {minutes} minutes)" if minutes is not None else ""
    ceiling_text = f"**{peak:.0f} GFLOP/s**" if peak else "not measured in this run"
    return (f"Measured by `{command}` on {when}{minutes}: {machine['cpu']}, {machine['cores']} cores "
            f"({machine['simd']}), {machine['memory_gib']} GiB; NumPy {machine['numpy']} with "
            f"{machine['numpy_blas']}; PyTorch {machine['torch']}; Python {machine['python']}. "
            f"float32 GEMM ceiling measured in this run (NumPy's fastest square GEMM call): {ceiling_text}. "
            "float32, AdamW, dropout 0; the implementations take turns, one step each a round; "
            "ratios are numpygpt's speed over PyTorch's (>1: numpygpt faster), the median's ratio and, "
            "in brackets, the range over rounds; MFU = model FLOPs (6 N per token + attention, "
            "`common.train_flops`) per second over the ceiling. \"other load\": the most of the machine "
            "other processes took during a timed step (above ~10% the times are suspect).")


def note_run(folder: str, failed: list[str], seconds: float) -> None:
    """Add the benchmarks that failed and the run's length to machine.json (run_all.py, at the end)."""
    path = os.path.join(folder, "machine.json")
    with open(path) as f:
        meta = json.load(f)
    meta.update(failed=failed, minutes=round(seconds / 60, 1))
    with open(path, "w") as f:
        json.dump(meta, f, indent=1)


def build(folder: str, command: str = "python benchmarks/run_all.py") -> str:
    records = load(folder)
    with open(os.path.join(folder, "machine.json")) as f:
        meta = json.load(f)
    peak = ceiling(records)
    rows = train_rows(records, peak) + memory_rows(records) + generate_rows(records)
    table = common.md_table(["measurement", "numpygpt", "PyTorch", "numpygpt / PyTorch", "allocator", "other load"],
                            rows)
    parts = [machine_line(meta["machine"], peak, meta["when"], meta.get("command", command), meta.get("minutes")),
             table]
    if peak and any(r["flop_rate"] / 1e9 > peak for rec in records.get("train", []) for r in rec["results"]):
        parts.insert(1, "**MFU above 100%**: the GEMM ceiling was measured while other work slowed the "
                        "GEMMs down; the MFU figures are not to be trusted.")
    if meta.get("failed"):
        parts.insert(1, f"**Failed in this run** (no rows): {', '.join(meta['failed'])}.")
    loads = [float(r[-1].rstrip("%")) for r in rows if r[-1]]
    if loads and max(loads) > LOADED:
        parts.insert(1, f"**Taken under load**: other processes used up to {max(loads):.0f}% of the machine "
                        "during timed steps; the times and ratios are not to be trusted. Rerun on a quiet machine.")
    return "\n\n".join(parts)


def mfu_lines(folder: str) -> list[str]:
    """'MFU numpygpt 2x256: 45% ...' for each training shape (printed by run_all.py)."""
    records = load(folder)
    peak = ceiling(records)
    out = []
    for rec in records.get("train", []):
        for r in rec["results"]:
            if peak and not rec.get("busy"):
                out.append(f"MFU {r['impl']} {r['config']} {r['B']}x{r['T']} "
                           f"({'kept' if rec['malloc_kept'] else 'default'} malloc): "
                           f"{r['flop_rate'] / 1e9:.0f} GFLOP/s of {peak:.0f} = {r['flop_rate'] / 1e9 / peak:.0%}")
    return out


def write_readme(path: str, text: str) -> None:
    """Replace what lies between START and END in the README by ``text``."""
    with open(path) as f:
        readme = f.read()
    if START not in readme or END not in readme:
        raise SystemExit(f"{path} has no speed-table markers ({START!r} ... {END!r})")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as f:
        f.write(f"{head}{START}\n{text}\n{END}{tail}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="the JSON folder of one run_all.py run (benchmarks/out/json)")
    p.add_argument("--readme", default=None, help="write the table into this README between the markers")
    args = p.parse_args(argv)
    text = build(args.folder)
    print(text + "\n")
    print("\n".join(mfu_lines(args.folder)))
    if args.readme:
        write_readme(args.readme, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
