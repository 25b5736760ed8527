"""The fine-tuning commands under ``mpiexec -n 2`` (issue 20): each rank trains on its rows of
every batch through the one training loop, rank 0 alone evaluates, logs and writes, and the run
takes the steps one process takes with the same global batch."""

import json

import numpy as np
import pytest

pytest.importorskip("mpi4py", reason="the mpi extra (mpi4py + an MPI) is not installed")

from numpygpt import GPTModel  # noqa: E402
from numpygpt.cli import main  # noqa: E402
from test_distributed_mpi import mpirun  # noqa: E402
from test_finetune_classify import data_file, pretrained  # noqa: E402,F401  (fixtures)
from test_finetune_cli import PAIRS  # noqa: E402


def test_finetune_classify_on_two_ranks_takes_the_single_process_steps(pretrained, data_file, tmp_path):  # noqa: F811
    args = ["finetune", "classify", "--data", data_file, "--pretrained", pretrained, "--device", "cpu",
            "--no-progress", "--epochs", "1", "--batch-size", "16", "--lr", "2e-3", "--eval-freq", "5"]
    assert main([str(a) for a in args] + ["--out", str(tmp_path / "one")]) == 0
    proc = mpirun(2, ["-m", "numpygpt", *args, "--out", tmp_path / "two"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("accuracy    training") == 1  # rank 0 alone reports
    one, two = (json.loads((tmp_path / d / "history.json").read_text()) for d in ("one", "two"))
    assert one["global_step"] == two["global_step"] == 224 // 16
    np.testing.assert_allclose(two["step_losses"], one["step_losses"], rtol=2e-5)  # float32, summed in another order
    assert set(two["accuracy"]) == {"train", "val", "test"}
    assert abs(two["accuracy"]["test"] - one["accuracy"]["test"]) <= 1 / 64  # at most one of 64 test texts


def test_finetune_instruct_on_two_ranks_takes_the_single_process_steps(tmp_path):
    from numpygpt import GPTConfig

    pretrained = tmp_path / "pretrained"
    cfg = GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_layers=1, n_heads=2, drop_rate=0.0,
                    qkv_bias=True, tie_weights=True)
    GPTModel(cfg, seed=0).save_pretrained(pretrained)
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": i, "input": "", "output": o} for i, o in PAIRS] * 6))
    args = ["finetune", "instruct", "--pretrained", pretrained, "--data", data, "--batch-size", "4", "--epochs", "2",
            "--lr", "5e-3", "--eval-freq", "2", "--eval-iter", "1", "--max-new-tokens", "2", "--device", "cpu",
            "--dtype", "float64", "--no-progress"]
    assert main([str(a) for a in args] + ["--out", str(tmp_path / "one")]) == 0
    proc = mpirun(2, ["-m", "numpygpt", *args, "--out", tmp_path / "two"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("responses   ") == 1 and "ranks" not in proc.stderr
    one, two = (json.loads((tmp_path / d / "history.json").read_text()) for d in ("one", "two"))
    assert one["global_step"] == two["global_step"] == 2 * (15 // 4)
    np.testing.assert_allclose(two["step_losses"], one["step_losses"], rtol=1e-9)
    a, b = (GPTModel.from_pretrained(tmp_path / d / "model", dtype="float64") for d in ("one", "two"))
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_allclose(q.data, p.data, rtol=1e-7, atol=1e-9, err_msg=name)
    assert (tmp_path / "two" / "test-responses.json").is_file()
