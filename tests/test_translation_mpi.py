"""``numpygpt train-translation`` under ``mpiexec -n 2``: each rank trains on its rows of every
batch, weighted by its share of the batch's target tokens, and the run takes the steps one
process takes; rank 0 alone evaluates, reports and writes."""

import json

import numpy as np
import pytest

from numpygpt.cli import main
from numpygpt.distributed import Communicator
from numpygpt.encdec import EncDecConfig, EncoderDecoder
from numpygpt.translation import NumberPairs, NumberTokenizer, TranslationObjective


class Rank(Communicator):
    """One rank of ``world_size`` (only what ``shard`` reads: no MPI)."""

    def __init__(self, rank: int, world_size: int):
        super().__init__()
        self.rank, self.world_size = rank, world_size


def test_the_ranks_weighted_losses_add_up_to_the_batch_mean():
    """Rows of different target lengths: weights by counted tokens, not 1/N, give the mean."""
    tok = NumberTokenizer()
    batch = NumberPairs([7, 312, 999999, 40], tok).get_batch(np.arange(8))
    model = EncoderDecoder(EncDecConfig(vocab_size=tok.vocab_size, context_length=24, emb_dim=8, n_heads=2,
                                        drop_rate=0.0, dtype="float64"), seed=0)
    objective = TranslationObjective()
    whole = float(objective.loss(model, batch))
    shares = [objective.split(batch, Rank(r, 2)) for r in range(2)]
    assert sum(w for _, w in shares) == pytest.approx(1.0)
    assert shares[0][1] != pytest.approx(0.5)  # the halves hold different numbers of target tokens
    assert sum(w * float(objective.loss(model, rows)) for rows, w in shares) == pytest.approx(whole, rel=1e-12)
    np.testing.assert_array_equal(shares[1][0]["src"], batch["src"][4:])


def test_two_ranks_take_the_single_process_steps(tmp_path):
    pytest.importorskip("mpi4py", reason="the mpi extra (mpi4py + an MPI) is not installed")
    from test_distributed_mpi import mpirun

    args = ["train-translation", "--max-number", "99", "--train-numbers", "60", "--test-numbers", "20",
            "--emb-dim", "16", "--n-heads", "2", "--n-layers", "1", "--batch-size", "16", "--epochs", "2",
            "--eval-freq", "4", "--lr", "5e-3", "--no-progress", "--show", "2"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    proc = mpirun(2, ["-m", "numpygpt", *args, "--out", tmp_path / "two"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("held-out exact match") == 1  # rank 0 alone reports
    one, two = (json.loads((tmp_path / d / "history.json").read_text()) for d in ("one", "two"))
    assert one["global_step"] == two["global_step"] == 2 * (120 // 16)
    np.testing.assert_allclose(two["step_losses"], one["step_losses"], rtol=2e-5)  # float32, summed in another order
    np.testing.assert_allclose(two["val_losses"], one["val_losses"], rtol=2e-5)
    assert abs(two["exact_match"] - one["exact_match"]) <= 1 / 40  # at most one of 40 translations
    assert (tmp_path / "two" / "checkpoint.safetensors").is_file()
