"""`numpygpt finetune dpo` under ``mpiexec -n 2``: each rank trains on its pairs of every batch,
rank 0 alone evaluates and writes, and the run takes the steps one process takes."""

import json

import numpy as np
import pytest

pytest.importorskip("mpi4py", reason="the mpi extra (mpi4py + an MPI) is not installed")

from numpygpt import GPTConfig, GPTModel  # noqa: E402
from numpygpt.cli import main  # noqa: E402
from test_distributed_mpi import mpirun  # noqa: E402
from test_finetune_dpo_cli import preference_entries  # noqa: E402


def test_finetune_dpo_on_two_ranks_takes_the_single_process_steps(tmp_path):
    pretrained = tmp_path / "pretrained"
    cfg = GPTConfig(vocab_size=50257, context_length=96, emb_dim=32, n_layers=1, n_heads=2, drop_rate=0.0,
                    qkv_bias=True, tie_weights=False)
    GPTModel(cfg, seed=0).save_pretrained(pretrained)
    data = tmp_path / "prefs.json"
    data.write_text(json.dumps(preference_entries(20)))  # 17 training pairs: 4 steps of 4
    args = ["finetune", "dpo", "--model", pretrained, "--data", data, "--batch-size", "4", "--lr", "3e-3",
            "--beta", "0.5", "--eval-freq", "2", "--eval-iter", "1", "--device", "cpu", "--dtype", "float64",
            "--no-progress"]
    assert main([str(a) for a in args] + ["--out", str(tmp_path / "one")]) == 0
    proc = mpirun(2, ["-m", "numpygpt", *args, "--out", tmp_path / "two"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("test        ") == 1 and "ranks" not in proc.stderr  # rank 0 alone reports
    one, two = (json.loads((tmp_path / d / "history.json").read_text()) for d in ("one", "two"))
    assert one["global_step"] == two["global_step"] == 4
    np.testing.assert_allclose(two["step_losses"], one["step_losses"], rtol=1e-9)
    np.testing.assert_allclose(two["val_margins"], one["val_margins"], rtol=1e-9)
    a, b = (GPTModel.from_pretrained(tmp_path / d / "model", dtype="float64") for d in ("one", "two"))
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_allclose(q.data, p.data, rtol=1e-7, atol=1e-9, err_msg=name)
