"""benchmarks/speed_table.py: the README's speed table from one run's JSON results (made up here,
no benchmark runs): ratios with their range over rounds, MFU against the run's GEMM ceiling,
the allocator labels, and the README written between its markers and nowhere else."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import speed_table  # noqa: E402

MACHINE = {"cpu": "Test CPU", "cores": 2, "simd": "avx2 fma", "memory_gib": 8.0, "python": "3.11",
           "numpy": "2.4", "numpy_blas": "openblas (Haswell kernels, 2 threads)", "torch": "2.13 (BLAS mkl)",
           "os": "Linux"}


def _train(impl, times, flop_rate=None, load=0.0):
    step = sorted(times)[len(times) // 2]
    return {"impl": impl, "config": "gpt2-hf", "B": 2, "T": 256, "params": 124e6, "times": times, "step": step,
            "spread": (max(times) - min(times)) / step, "tokens_per_s": 512 / step,
            "flop_rate": flop_rate or 400e9 / step, "other_load": load}


def _write(folder: Path, name: str, record: dict) -> None:
    (folder / f"{name}.json").write_text(json.dumps(record))


@pytest.fixture
def run(tmp_path):
    _write(tmp_path, "machine", {"machine": MACHINE, "when": "2026-12-04 06:00 UTC",
                                 "command": "python benchmarks/run_all.py --long"})
    _write(tmp_path, "matmul", {"kind": "matmul", "malloc_kept": True, "results": [
        {"label": "2048 x 2048 x 2048", "square": True, "numpy": 300.0},
        {"label": "4096 x 4096 x 4096", "square": True, "numpy": 300.0, "numpy_best": 320.0},
        {"label": "lm_head fwd", "square": False, "numpy": 999.0}]})
    _write(tmp_path, "train-256", {"kind": "train", "malloc_kept": True, "busy": 0, "results": [
        _train("numpygpt", [2.0, 2.0, 1.0], flop_rate=160e9), _train("torch eager", [3.0, 4.0, 3.0], load=0.2)]})
    _write(tmp_path, "train-256-default-malloc", {"kind": "train", "malloc_kept": False, "busy": 0, "results": [
        _train("numpygpt", [2.5, 2.5, 2.5]), _train("torch eager", [5.0, 6.0, 5.0])]})
    return tmp_path


def test_the_table_has_paired_ratios_mfu_and_allocators(run):
    text = speed_table.build(str(run))
    assert "Test CPU, 2 cores" in text and "openblas (Haswell kernels, 2 threads)" in text
    assert "**320 GFLOP/s**" in text  # the best square GEMM, not the GPT-2 shape
    assert "python benchmarks/run_all.py --long" in text
    rows = [line for line in text.splitlines() if line.startswith("| training step")]
    assert len(rows) == 3  # same allocator (kept), same allocator (default), each library's default
    kept = rows[0]
    # medians 2.0 and 3.0 -> 1.50x; per round 3/2, 4/2, 3/1 -> 1.50-3.00
    assert "**1.50x** (1.50-3.00)" in kept and speed_table.KEPT in kept
    assert "MFU 50%" in kept  # 160 GFLOP/s of 320
    assert "| 20% |" in kept  # the larger other load of the two
    assert "**Taken under load**: other processes used up to 20%" in text
    assert speed_table.DEFAULT in rows[1] and "**2.00x** (2.00-2.40)" in rows[1]
    # numpygpt with its setting (median 2.0) against torch with glibc's default (median 5.0), two runs
    assert "each library's default" in rows[2] and "**2.50x** (2.50-6.00)" in rows[2]


def test_failed_benchmarks_and_the_run_length_are_named(run):
    speed_table.note_run(str(run), ["train-1024 (exit -9)"], 512.0)
    text = speed_table.build(str(run))
    assert "**Failed in this run** (no rows): train-1024 (exit -9)." in text
    assert "(the run took 8.5 minutes)" in text


def test_a_quiet_run_is_not_labelled_as_loaded(run):
    record = json.loads((run / "train-256.json").read_text())
    record["results"][1]["other_load"] = 0.05
    (run / "train-256.json").write_text(json.dumps(record))
    assert "under load" not in speed_table.build(str(run))


def test_the_fastest_of_every_matmul_record_is_the_ceiling_and_mfu_over_100_is_flagged(run):
    assert "MFU above 100%" not in speed_table.build(str(run))
    _write(run, "matmul-end", {"kind": "matmul", "malloc_kept": True, "results": [
        {"label": "4096 x 4096 x 4096", "square": True, "numpy": 400.0, "numpy_best": 410.0}]})
    assert speed_table.ceiling(speed_table.load(str(run))) == 410.0
    _write(run, "matmul-end", {"kind": "matmul", "malloc_kept": True, "results": []})
    _write(run, "matmul", {"kind": "matmul", "malloc_kept": True, "results": [
        {"label": "2048 x 2048 x 2048", "square": True, "numpy": 100.0}]})  # a disturbed measurement
    text = speed_table.build(str(run))
    assert "MFU 160%" in text and "**MFU above 100%**" in text


def test_mfu_lines_name_each_implementation(run):
    lines = speed_table.mfu_lines(str(run))
    assert "MFU numpygpt gpt2-hf 2x256 (kept malloc): 160 GFLOP/s of 320 = 50%" in lines


def test_readme_gets_the_table_between_its_markers_only(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{speed_table.START}\nold table\n{speed_table.END}\nafter\n")
    speed_table.write_readme(str(readme), "NEW TABLE")
    assert readme.read_text() == f"# title\n\nbefore\n{speed_table.START}\nNEW TABLE\n{speed_table.END}\nafter\n"
    speed_table.write_readme(str(readme), "AGAIN")  # idempotent: the markers stay
    assert "NEW TABLE" not in readme.read_text() and readme.read_text().count(speed_table.START) == 1


def test_a_readme_without_markers_is_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        speed_table.write_readme(str(readme), "T")
    assert readme.read_text() == "# no markers\n"


def test_the_projects_readme_has_the_markers():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert text.count(speed_table.START) == 1 and text.count(speed_table.END) == 1
