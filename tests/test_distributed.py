"""numpygpt.distributed without MPI: the bookkeeping that N ranks rely on, checked in one
process. Sharding plus count weights must rebuild the whole batch's loss and gradient
exactly; the flat buffers must carry every gradient there and back; the NCCL path must
hand NCCL the right pointers, counts and dtypes (a stand-in NCCL here: no GPU needed).
The real multi-process runs are in test_distributed_mpi.py."""

import numpy as np
import pytest

from numpygpt import backend, distributed
from numpygpt.config import GPTConfig
from numpygpt.distributed import (Communicator, DistributedError, GradientBuckets, blas_threads_for,
                                  dropout_seed, launched_world_size)
from numpygpt.model import GPTModel
from numpygpt.nn import CrossEntropyLoss, Parameter


def fake_rank(rank: int, world_size: int) -> Communicator:
    """The single-process communicator told it is rank ``rank`` of ``world_size``: its
    shard() is the real one; nothing here communicates."""
    comm = Communicator()
    comm.rank, comm.world_size = rank, world_size
    return comm


def test_launched_world_size_reads_the_launchers_variables():
    assert launched_world_size({}) is None
    assert launched_world_size({"PMI_SIZE": "4", "PMI_RANK": "1"}) == 4  # MPICH, Intel MPI
    assert launched_world_size({"OMPI_COMM_WORLD_SIZE": "3"}) == 3  # Open MPI
    assert launched_world_size({"PMI_SIZE": "junk", "MV2_COMM_WORLD_SIZE": "2"}) == 2


def test_init_without_a_launcher_is_one_process_and_never_imports_mpi(monkeypatch):
    import sys

    monkeypatch.setattr(distributed, "_comm", None)
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # importing it would now fail
    comm = distributed.init(environ={})
    assert type(comm) is Communicator and comm.world_size == 1 and comm.is_main
    assert distributed.get() is comm
    monkeypatch.setattr(distributed, "_comm", None)
    assert type(distributed.init(environ={"PMI_SIZE": "1"})) is Communicator


def test_init_under_mpiexec_without_mpi4py_refuses(monkeypatch):
    import sys

    monkeypatch.setattr(distributed, "_comm", None)
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(DistributedError, match=r"3 processes.*mpi4py is not installed.*numpygpt\[mpi\]"):
        distributed.init(environ={"PMI_SIZE": "3"})
    assert distributed._comm is None


def test_init_with_mpi4py_but_no_mpi_library_refuses(monkeypatch, tmp_path):
    import sys

    fake = tmp_path / "mpi4py"  # a package whose MPI module fails to load its library
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "MPI.py").write_text("raise RuntimeError('cannot load MPI library')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("mpi4py", "mpi4py.MPI"):  # hidden now, as they were (present or not) afterwards
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name))
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(distributed, "_comm", None)
    with pytest.raises(DistributedError, match="mpi4py cannot load an MPI library .cannot load MPI library."):
        distributed.init(environ={"PMI_SIZE": "2"})


def test_blas_threads_divide_the_cores_among_the_local_ranks():
    assert blas_threads_for(1, cores=2) == 2
    assert blas_threads_for(2, cores=2) == 1
    assert blas_threads_for(4, cores=2) == 1  # oversubscribed: still one each
    assert blas_threads_for(2, cores=16) == 8
    assert blas_threads_for(3) >= 1


def test_dropout_seeds_are_deterministic_and_differ_by_rank_and_step():
    assert dropout_seed(123, 1, 0) == dropout_seed(123, 1, 0)
    seeds = {dropout_seed(123, r, s) for r in range(1, 4) for s in (0, 10)}
    assert len(seeds) == 6 and 123 not in seeds
    assert dropout_seed(-5, 1, 0) != dropout_seed(-6, 1, 0)


def test_one_process_is_the_identity():
    comm = Communicator()
    x, y = np.zeros((3, 4), np.int64), np.ones((3, 4), np.int64)
    xs, ys, w = comm.shard(x, y)
    assert xs is x and ys is y and w == 1.0
    comm.check_batch_size(3)
    assert comm.sum_gradients([], np.float32(2.5)) == 2.5
    assert comm.broadcast({"a": 1}) == {"a": 1}
    comm.check_same(1, "anything")
    comm.check_same_weights([])
    comm.barrier()


def test_shard_cuts_rows_and_weights_by_counted_targets():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 50, (4, 6))
    y = rng.integers(0, 50, (4, 6))
    y[0, :5] = -100  # rank 0's rows hold fewer counted targets than rank 1's
    y[3, 2] = -100
    n_all = int((y != -100).sum())
    weights = []
    for r in range(2):
        xs, ys, w = fake_rank(r, 2).shard(x, y)
        np.testing.assert_array_equal(xs, x[2 * r:2 * r + 2])
        np.testing.assert_array_equal(ys, y[2 * r:2 * r + 2])
        assert w == int((ys != -100).sum()) / n_all
        weights.append(w)
    assert weights[0] < 0.5 < weights[1] and sum(weights) == pytest.approx(1.0, abs=1e-15)


def test_a_batch_that_does_not_split_is_refused():
    comm = fake_rank(0, 2)
    with pytest.raises(DistributedError, match="batch of 3 rows does not split evenly over 2 ranks"):
        comm.shard(np.zeros((3, 4)), np.zeros((3, 4), np.int64))
    with pytest.raises(DistributedError, match="multiple of 2"):
        comm.check_batch_size(5)
    y = np.full((2, 3), -100)
    with pytest.raises(DistributedError, match="ignore_index"):
        comm.shard(np.zeros((2, 3), np.int64), y)


@pytest.mark.parametrize("world_size", [2, 4])
def test_weighted_shards_rebuild_the_whole_batchs_loss_and_gradient(world_size):
    """What N ranks compute, one rank after another in this process: each shard's loss
    and backward scaled by its weight, gradients summed. It must equal the whole batch's
    mean loss and gradient (float64: to rounding), ignored targets included."""
    cfg = GPTConfig(vocab_size=31, context_length=8, emb_dim=16, n_heads=2, n_layers=2,
                    drop_rate=0.0, dtype="float64")
    model = GPTModel(cfg, seed=1)
    rng = np.random.default_rng(2)
    x = rng.integers(0, 31, (4, 8))
    y = rng.integers(0, 31, (4, 8))
    y[1, 3:] = -100
    y[2, 0] = -100
    loss_fn = CrossEntropyLoss()

    model.zero_grad()
    whole = float(loss_fn(model(x), y))
    model.backward(loss_fn.backward())
    want = {name: p.grad.copy() for name, p in model.named_parameters()}

    model.zero_grad()
    total = 0.0
    for r in range(world_size):
        xs, ys, w = fake_rank(r, world_size).shard(x, y)
        total += w * float(loss_fn(model(xs), ys))
        model.backward(loss_fn.backward(w))
    assert total == pytest.approx(whole, rel=1e-13)
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, want[name], rtol=1e-11, atol=1e-14, err_msg=name)


def _params(rng):
    """Mixed dtypes, a frozen one and one that got no gradient."""
    ps = [Parameter(np.zeros((3, 4), np.float32)), Parameter(np.zeros(5, np.float64)),
          Parameter(np.zeros((2, 2), np.float32)), Parameter(np.zeros(7, np.float32), requires_grad=False),
          Parameter(np.zeros((2, 3), np.float64))]
    for p in ps[:3]:
        p.grad = rng.standard_normal(p.shape).astype(p.dtype)
    ps[3].grad = None
    ps[4].grad = None
    return ps


def test_gradient_buckets_lay_out_one_buffer_per_dtype():
    ps = _params(np.random.default_rng(0))
    buckets = GradientBuckets(ps, n_extra=1)
    assert [d.name for d, _, _ in buckets.buckets] == ["float32", "float64"]
    assert buckets.sizes == [12 + 4 + 1, 5 + 6]  # frozen parameter left out, one extra slot
    assert buckets.nbytes == 17 * 4 + 11 * 8
    bufs = buckets.pack([np.float32(7.5)])
    np.testing.assert_array_equal(bufs[0], np.r_[ps[0].grad.ravel(), ps[2].grad.ravel(), 7.5])
    np.testing.assert_array_equal(bufs[1], np.r_[ps[1].grad, np.zeros(6)])
    assert buckets.buffers() is buckets.buffers()  # allocated once


def test_gradient_buckets_carry_a_sum_back_into_every_grad():
    """Two 'ranks' pack; the sum of their buffers, unpacked, is the sum of their grads."""
    rng = np.random.default_rng(1)
    ranks = [_params(rng) for _ in range(2)]
    ranks[1][4].grad = rng.standard_normal((2, 3))  # only rank 1 has this gradient
    mine, theirs = GradientBuckets(ranks[0]), GradientBuckets(ranks[1])
    want = [None if a.grad is None and b.grad is None else
            (0 if a.grad is None else a.grad) + (0 if b.grad is None else b.grad)
            for a, b in zip(*ranks)]
    grad_objects = [p.grad for p in ranks[0]]
    for a, b in zip(mine.pack([1.25]), theirs.pack([2.0])):
        a += b  # what the all-reduce does
    extra = mine.unpack()
    assert extra.shape == (1,) and float(extra[0]) == 3.25
    for p, w, before in zip(ranks[0], want, grad_objects):
        if not p.requires_grad:
            assert p.grad is None
            continue
        np.testing.assert_allclose(p.grad, w, rtol=1e-6)
        if before is not None:
            assert p.grad is before  # updated in place, not replaced
    assert not np.shares_memory(ranks[0][4].grad, mine.buffers()[1])  # a new grad owns its memory
    with pytest.raises(ValueError, match="extra"):
        mine.pack([])
    with pytest.raises(ValueError, match="no trainable"):
        GradientBuckets([ranks[0][3]])


class FakeNCCL:
    """A stand-in for cupy.cuda.nccl: records calls and, as N identical ranks would, sums
    N copies of the buffer at the address it is given."""

    NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64, NCCL_SUM = 6, 7, 8, 0

    def __init__(self, buffers, world_size):
        self.by_ptr = {b.ctypes.data: b for b in buffers}
        self.world_size = world_size
        self.calls = []
        fake = self

        class NcclCommunicator:
            def __init__(self, n, uid, rank):
                fake.created = (n, uid, rank)

            def allReduce(self, send, recv, count, dtype, op, stream):
                fake.calls.append((send, recv, count, dtype, op, stream))
                fake.by_ptr[recv][:count] *= fake.world_size

        self.NcclCommunicator = NcclCommunicator

    def get_unique_id(self):
        return (1, 2, 3)


class FakeMPI:
    rank, world_size = 0, 2

    def broadcast(self, obj, root=0):
        return obj


def test_nccl_path_sends_each_flat_buffer_once_in_place():
    from numpygpt.distributed import _NCCL

    ps = _params(np.random.default_rng(3))
    before = [None if p.grad is None else p.grad.copy() for p in ps]
    buckets = GradientBuckets(ps)
    bufs = buckets.pack([np.float32(0.5)])
    fake = FakeNCCL(bufs, world_size=2)
    nccl = _NCCL(fake, FakeMPI())
    assert fake.created == (2, (1, 2, 3), 0)
    for buf in bufs:
        nccl.allreduce(buf)
    assert [(c[2], c[3]) for c in fake.calls] == [(17, fake.NCCL_FLOAT32), (11, fake.NCCL_FLOAT64)]
    assert all(send == recv == b.ctypes.data and op == fake.NCCL_SUM
               for (send, recv, _, _, op, _), b in zip(fake.calls, bufs))
    assert float(buckets.unpack()[0]) == 1.0
    for p, b in zip(ps, before):
        if b is not None and p.requires_grad:
            np.testing.assert_allclose(p.grad, 2 * b, rtol=1e-6)
    with pytest.raises(TypeError, match="int32"):
        nccl.dtype_code(np.int32)


def test_each_step_reseeds_dropout_on_ranks_after_the_first():
    """Rank 0 draws on from the run's stream; rank 1's masks of step s come from
    dropout_seed(run seed, 1, s), whatever ran before (so a resumed run draws the same)."""
    backend.manual_seed(123)
    with backend.device("cpu"):
        run_stream = backend.get_rng().random(4)
    for rank in (0, 1):
        backend.manual_seed(123)
        comm = fake_rank(rank, 2)
        comm.begin_training([])
        drawn = []
        for step in (0, 1, 1):
            comm.begin_step(step)
            with backend.device("cpu"):
                drawn.append(backend.get_rng().random(4))
        if rank == 0:
            np.testing.assert_array_equal(drawn[0], run_stream)
            assert not np.array_equal(drawn[1], drawn[2])  # one stream, drawn on
        else:
            want = [np.random.default_rng(dropout_seed(123, 1, s)).random(4) for s in (0, 1, 1)]
            np.testing.assert_array_equal(np.array(drawn), np.array(want))


class RecordingRanks(Communicator):
    """Rank 1 of 2 that records an abort instead of ending the process."""

    rank, world_size = 1, 2

    def __init__(self):
        super().__init__()
        self.aborted = None

    def abort(self, code: int = 1) -> None:
        self.aborted = code


@pytest.mark.parametrize("error, code, aborts", [
    (DistributedError("the ranks disagree"), 2, False),  # every rank meets it: each exits
    ("run", 2, True),                                     # maybe this rank alone: stop them all
])
def test_run_cli_names_the_rank_and_aborts_only_for_one_rank_errors(monkeypatch, capsys, error, code, aborts):
    from numpygpt.cli import RunError, run_cli

    comm = RecordingRanks()
    monkeypatch.setattr(distributed, "_comm", comm)
    err = RunError("--data: no such file") if error == "run" else error

    def fail():
        raise err

    assert run_cli(fail) == code
    assert capsys.readouterr().err == f"numpygpt: error (rank 1 of 2): {err}\n"
    assert comm.aborted == (code if aborts else None)


@pytest.mark.parametrize("omp", [None, "1"])
def test_each_rank_gets_its_share_of_numpygpts_threads_whatever_omp_says(monkeypatch, omp):
    """MPICommunicator gives numpygpt's pool cores // local ranks threads, with or without
    OMP_NUM_THREADS (which only decides BLAS's); NUMPYGPT_NUM_THREADS is left to rule."""
    from numpygpt import parallel

    monkeypatch.setattr(distributed, "blas_threads_for", lambda local_ranks, cores=None: 3)
    monkeypatch.setattr(parallel, "_num_threads", None)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMPYGPT_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    if omp is not None:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    comm = distributed.MPICommunicator.__new__(distributed.MPICommunicator)  # no MPI needed for this part
    comm.local_size = 2
    comm._set_blas_threads()
    if hasattr(comm, "_blas_limiter"):
        comm._blas_limiter.restore_original_limits()
    assert parallel.get_num_threads() == 3
    assert ("OMP_NUM_THREADS=1" in comm._blas_note) == (omp is not None)
    monkeypatch.setenv("NUMPYGPT_NUM_THREADS", "5")
    monkeypatch.setattr(parallel, "_num_threads", None)
    comm._set_blas_threads()
    if hasattr(comm, "_blas_limiter"):
        comm._blas_limiter.restore_original_limits()
    assert parallel.get_num_threads() == 5
