"""Data-parallel training for real: ``mpiexec -n 2`` runs (the MPI wheel's mpiexec from the
test extra) against one process with the same global batch and seed.

Each run has a hard timeout and is killed with its whole process group, so a hung rank
fails the test instead of hanging CI. Runs are float64 so that "the same" is asserted
to 1e-6 relative with room to spare (the sums differ only in rounding order). The
worker (tests/mpi_worker.py) trains a tiny model with train_model; the CLI tests run
``numpygpt train`` itself.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

mpi4py = pytest.importorskip("mpi4py", reason="the mpi extra (mpi4py + an MPI) is not installed")

import mpi_worker  # noqa: E402  (tests/ is on sys.path)
from numpygpt import backend  # noqa: E402
from numpygpt.data import default_corpus  # noqa: E402
from numpygpt.distributed import dropout_seed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(mpi_worker.__file__)
TIMEOUT = 180  # seconds a launch may take before it counts as hung


def find_mpiexec() -> str:
    """The mpiexec that came with this Python's MPI wheel (next to python in a venv),
    else the first on PATH."""
    for folder in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        candidate = folder / "mpiexec"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("mpiexec")
    if found is None:
        pytest.fail("mpi4py is installed but no mpiexec was found next to python or on PATH")
    return found


def mpirun(n: int, args, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """``mpiexec -n n python ARGS`` from the repository root; killed (all of it) on timeout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(WORKER.parent)]),
               # Open MPI refuses to run as root (CI does) without these; MPICH ignores them
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env.pop("NUMPYGPT_DISTRIBUTED", None)
    cmd = [find_mpiexec(), "-n", str(n), sys.executable, *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"mpiexec -n {n} {' '.join(map(str, args))} hung for {timeout} s\n{out}\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def worker_run(tmp_path, n: int, *flags):
    out = tmp_path / f"n{n}.npz"
    proc = mpirun(n, [WORKER, out, *flags])
    assert proc.returncode == 0, proc.stderr
    return dict(np.load(out))


def assert_same_run(got: dict, want: dict, rel: float = 1e-6) -> None:
    """Same per-step losses, weights after every step and final weights, to ``rel`` relative
    (per tensor: the largest difference over the largest magnitude)."""
    np.testing.assert_allclose(got["step_losses"], want["step_losses"], rtol=rel, atol=0)
    got, want = ({k: v for k, v in d.items() if k != "state_bytes"} for d in (got, want))
    assert set(got) == set(want)
    for key in want:
        scale = np.abs(want[key]).max()
        assert np.abs(got[key] - want[key]).max() <= rel * scale, key


def reference(grad_accum=1, drop_rate=0.0) -> dict:
    """The same training in this process, alone."""
    history, model, _, snapshots = mpi_worker.train(grad_accum, drop_rate)
    out = {"step_losses": np.array(history["step_losses"]), "per_step": np.array(snapshots)}
    out.update({f"w:{name}": backend.to_host(p.data).copy() for name, p in model.named_parameters()})
    return out


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_two_ranks_train_exactly_like_one_process(tmp_path, grad_accum):
    flags = ["--grad-accum", grad_accum]
    got = worker_run(tmp_path, 2, *flags)
    want = reference(grad_accum)
    assert len(want["step_losses"]) == mpi_worker.STEPS
    assert_same_run(got, want)
    assert want["step_losses"][-1] < want["step_losses"][0] - 0.5  # it did learn something


def emulate_two_ranks_with_dropout(drop_rate: float) -> dict:
    """What 2 ranks compute, written out step by step in one process: each half-batch
    with its rank's own dropout masks (rank 0: the run's stream; rank 1: reseeded each
    step with dropout_seed(seed, 1, step)), scaled by its share of the counted targets,
    gradients summed, clipped, stepped."""
    from numpygpt.nn import CrossEntropyLoss
    from numpygpt.optim import clip_grad_norm

    model, train_loader, _, optimizer = mpi_worker.build(drop_rate)
    snapshots = mpi_worker.record_steps(model, optimizer)
    backend.manual_seed(mpi_worker.SEED)
    rank0_stream = backend.get_rng_state()
    loss_fn = CrossEntropyLoss()
    model.train()
    losses = []
    for step, (x, y) in enumerate(train_loader.epoch_batches(0)):
        backend.manual_seed(dropout_seed(mpi_worker.SEED, 1, step))
        streams = [rank0_stream, backend.get_rng_state()]
        model.zero_grad()
        n_all = (y != -100).sum()
        step_loss = 0.0
        for r in range(2):
            rows = slice(2 * r, 2 * r + 2)
            weight = (y[rows] != -100).sum() / n_all
            backend.set_rng_state(streams[r])
            loss = loss_fn(model(x[rows]), y[rows])
            streams[r] = backend.get_rng_state()
            model.backward(loss_fn.backward(float(weight)))
            step_loss += float(weight) * float(loss)
        rank0_stream = streams[0]
        clip_grad_norm(model, 1.0)
        optimizer.step()
        losses.append(step_loss)
    out = {"step_losses": np.array(losses), "per_step": np.array(snapshots)}
    out.update({f"w:{name}": backend.to_host(p.data).copy() for name, p in model.named_parameters()})
    return out


def test_dropout_each_rank_draws_its_own_deterministic_masks(tmp_path):
    got = worker_run(tmp_path, 2, "--drop-rate", 0.2)
    assert_same_run(got, emulate_two_ranks_with_dropout(0.2))
    # and it is not the one-process run: the second half of each batch saw other masks
    alone = reference(drop_rate=0.2)
    assert np.abs(got["step_losses"] - alone["step_losses"]).max() > 1e-4


@pytest.mark.parametrize("flags, message", [
    (["--perturb"], "the ranks do not hold identical weights: 1 of 29 tensors differ from rank 0's on rank 1 "
                    "(first: h.0.ln_1.bias)"),
    (["--rank1-steps", "5"], "the ranks disagree on the training plan: rank 0 has (20, 1, 20, 0, 0), rank 1 has "
                             "(20, 1, 5, 0, 0)"),
], ids=["weights", "plan"])
def test_ranks_that_disagree_stop_every_rank_with_one_message(tmp_path, flags, message):
    proc = mpirun(2, [WORKER, tmp_path / "x.npz", *flags])
    assert proc.returncode == 2, proc.stderr
    lines = sorted(ln for ln in proc.stderr.splitlines() if ln.startswith("worker: error"))
    assert len(lines) == 2 and all(message in ln for ln in lines), proc.stderr
    assert [ln.split(":")[1] for ln in lines] == [" error (rank 0)", " error (rank 1)"]
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize("how", ["--fail-at", "--kill-at"])
def test_a_rank_that_fails_takes_the_run_down(tmp_path, how):
    proc = mpirun(2, [WORKER, tmp_path / "x.npz", how, 3], timeout=120)
    assert proc.returncode != 0
    if how == "--fail-at":
        assert "staged failure on rank 1 at step 3" in proc.stderr
        assert "numpygpt: rank 1 failed; stopping all 2 ranks" in proc.stderr
    assert not (tmp_path / "x.npz").exists()


def test_a_stop_request_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """SIGTERM reaches rank 1 alone during step 4: both ranks finish step 4 and stop,
    instead of rank 0 waiting forever in step 5's all-reduce."""
    proc = mpirun(2, [WORKER, tmp_path / "x.npz", "--term-at", 3], timeout=120)
    assert proc.returncode == 3, proc.stderr
    lines = sorted(ln for ln in proc.stderr.splitlines() if ln.startswith("worker: stopped"))
    assert lines == [f"worker: stopped (rank {r}): stopped by SIGTERM after step 4 of 20; no checkpoint path "
                     "was given, nothing was saved" for r in (0, 1)], proc.stderr


# -- the command line ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text(default_corpus()[:5000], encoding="utf-8")
    return path


def cli_args(corpus, out, steps):
    return [str(a) for a in [
        "train", "--preset", "tiny", "--emb-dim", "16", "--tie-weights", "--dtype", "float64", "--data", corpus,
        "--device", "cpu", "--batch-size", "4", "--context-length", "8", "--schedule", "constant", "--lr", "3e-3",
        "--eval-freq", "100", "--eval-iter", "1", "--prompt=", "--no-progress", "--max-steps", steps,
        "--out", out]]


def test_a_batch_that_does_not_split_is_refused_on_every_rank(tmp_path, corpus):
    args = cli_args(corpus, tmp_path / "run", 2)
    args[args.index("--batch-size") + 1] = "3"
    proc = mpirun(2, ["-m", "numpygpt", *args], timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert sorted(lines) == [
        f"numpygpt: error (rank {r} of 2): the batch of 3 rows does not split evenly over 2 ranks: "
        "use a --batch-size that is a multiple of 2" for r in (0, 1)], proc.stderr
    assert not (tmp_path / "run").exists()


def _weights(path):
    from safetensors.numpy import load_file

    return {k: v for k, v in load_file(str(path)).items() if k.startswith("model.")}


def test_a_checkpoint_resumes_across_a_change_of_ranks(tmp_path, corpus, capsys):
    """8 steps straight on 1 process == 4 on 2 ranks then 4 on 1 == 4 on 1 then 4 on 2."""
    from numpygpt.cli import main

    straight = tmp_path / "straight"
    assert main(cli_args(corpus, straight, 8)) == 0

    two_then_one = tmp_path / "two_then_one"
    proc = mpirun(2, ["-m", "numpygpt", *cli_args(corpus, two_then_one, 4)])
    assert proc.returncode == 0, proc.stderr
    assert "ranks       2 ranks over MPI" in proc.stdout and "(2 rows a rank)" in proc.stdout
    assert main(["train", "--resume", str(two_then_one / "checkpoint.safetensors"), "--max-steps", "8",
                 "--no-progress", "--out", str(two_then_one)]) == 0

    one_then_two = tmp_path / "one_then_two"
    assert main(cli_args(corpus, one_then_two, 4)) == 0
    proc = mpirun(2, ["-m", "numpygpt", "train", "--resume", one_then_two / "checkpoint.safetensors",
                      "--max-steps", "8", "--no-progress", "--out", one_then_two])
    assert proc.returncode == 0, proc.stderr
    capsys.readouterr()

    assert_like_straight(straight, (two_then_one, one_then_two))


def assert_like_straight(straight, runs) -> None:
    """Each run folder holds 8 steps whose losses and final weights are the straight run's."""
    want_losses = json.loads((straight / "history.json").read_text())["step_losses"]
    want = _weights(straight / "checkpoint.safetensors")
    for run in runs:
        history = json.loads((run / "history.json").read_text())
        assert history["global_step"] == 8
        np.testing.assert_allclose(history["step_losses"], want_losses, rtol=1e-6, atol=0)
        got = _weights(run / "checkpoint.safetensors")
        assert set(got) == set(want)
        for key in want:
            assert np.abs(got[key] - want[key]).max() <= 1e-6 * np.abs(want[key]).max(), (run.name, key)


# -- ZeRO stage 1: AdamW's moments in shards (numpygpt.zero) ---------------------------------------

@pytest.mark.parametrize("grad_accum", [1, 2])
def test_zero_takes_the_steps_of_the_unsharded_run_with_half_the_state_a_rank(tmp_path, grad_accum):
    """2 ranks with sharded moments against 2 ranks with whole ones: the weights after every
    step agree to rounding (float64 here; only clipping's norm is summed in another order),
    and each rank holds half of AdamW's state."""
    (tmp_path / "zero").mkdir()
    (tmp_path / "plain").mkdir()
    zero = worker_run(tmp_path / "zero", 2, "--grad-accum", grad_accum, "--zero")
    plain = worker_run(tmp_path / "plain", 2, "--grad-accum", grad_accum)
    assert zero["per_step"].shape == plain["per_step"].shape == (mpi_worker.STEPS, zero["per_step"].shape[1])
    assert_same_run(zero, plain, rel=1e-10)  # far inside float32 rounding (1.2e-7)
    assert_same_run(zero, reference(grad_accum), rel=1e-6)  # and one process's run, as DP is
    whole = plain["state_bytes"]  # both moments of every parameter, on each rank
    n = sum(v.size for k, v in plain.items() if k.startswith("w:"))
    assert list(whole) == [2 * 8 * n] * 2  # float64
    shards = zero["state_bytes"]  # the two halves of the flat vector: ceil(n / 2) and the rest
    assert shards.sum() == whole[0] and shards.max() == 2 * 8 * -(-n // 2)


def test_device_arrays_cross_the_ranks_through_the_host_without_nccl(tmp_path):
    """On the fake GPU device (CuPy's rules, no NCCL), the all-reduce and ZeRO's
    reduce-scatter and all-gather copy through the host: the same run as on the CPU."""
    for name in ("cpu", "fake"):
        (tmp_path / name).mkdir()
    on_cpu = worker_run(tmp_path / "cpu", 2, "--zero")
    assert_same_run(worker_run(tmp_path / "fake", 2, "--zero", "--device", "fake-cuda"), on_cpu, rel=0)
    assert_same_run(worker_run(tmp_path / "fake", 2, "--device", "fake-cuda"), on_cpu, rel=1e-10)


def test_zero_checkpoints_resume_on_any_number_of_ranks(tmp_path, corpus, capsys):
    """8 steps straight on 1 process == 4 on 2 ranks with --zero 1, then 4 on 1 process (plain
    AdamW) == 4 on 1 process, then 4 on 2 ranks with --zero 1: the checkpoint holds AdamW's
    whole state whatever wrote it."""
    from numpygpt.cli import main

    straight = tmp_path / "straight"
    assert main(cli_args(corpus, straight, 8)) == 0
    zero_then_one = tmp_path / "zero_then_one"
    proc = mpirun(2, ["-m", "numpygpt", *cli_args(corpus, zero_then_one, 4), "--zero", "1"])
    assert proc.returncode == 0, proc.stderr
    from numpygpt.checkpoint import read_checkpoint

    assert read_checkpoint(zero_then_one / "checkpoint.safetensors").extra["cli_options"]["zero"] == 1
    assert main(["train", "--resume", str(zero_then_one / "checkpoint.safetensors"), "--max-steps", "8",
                 "--zero", "0", "--no-progress", "--out", str(zero_then_one)]) == 0
    one_then_zero = tmp_path / "one_then_zero"
    assert main(cli_args(corpus, one_then_zero, 4)) == 0
    proc = mpirun(2, ["-m", "numpygpt", "train", "--resume", one_then_zero / "checkpoint.safetensors",
                      "--max-steps", "8", "--zero", "1", "--no-progress", "--out", one_then_zero])
    assert proc.returncode == 0, proc.stderr
    capsys.readouterr()

    assert_like_straight(straight, (zero_then_one, one_then_zero))


def qwen3_cli_args(corpus, out, steps):
    """cli_args with a tiny Qwen3 model (numpygpt train --arch qwen3) in place of the GPT-2 preset."""
    args = cli_args(corpus, out, steps)
    at = args.index("--preset")
    args[at:at + 2] = ["--arch", "qwen3", "--n-layers", "2", "--n-heads", "4", "--n-kv-heads", "2", "--hidden-dim", "32"]
    return args


def test_a_qwen3_model_trains_on_two_ranks_like_one_process(tmp_path, corpus, capsys):
    """The GPT-2 runs' checks for Llama's family: 8 steps straight on 1 process == 4 on 2 ranks
    with --zero 1, then 4 more on 2 ranks with the moments whole."""
    from numpygpt.cli import main

    straight = tmp_path / "straight"
    assert main(qwen3_cli_args(corpus, straight, 8)) == 0
    ranks = tmp_path / "ranks"
    proc = mpirun(2, ["-m", "numpygpt", *qwen3_cli_args(corpus, ranks, 4), "--zero", "1"])
    assert proc.returncode == 0, proc.stderr
    assert "model       qwen3:" in proc.stdout and "(2 rows a rank)" in proc.stdout
    proc = mpirun(2, ["-m", "numpygpt", "train", "--resume", ranks / "checkpoint.safetensors", "--max-steps", "8",
                      "--zero", "0", "--no-progress", "--out", ranks])
    assert proc.returncode == 0, proc.stderr
    capsys.readouterr()
    assert_like_straight(straight, (ranks,))
