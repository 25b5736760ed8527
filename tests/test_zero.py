"""ZeRO stage 1 (numpygpt.zero) in one process: N ranks emulated by threads whose collectives
meet at a barrier, against one AdamW stepping the summed gradients; the flat layout; the
checkpoint format (AdamW's own) across rank counts; NCCL's calls (a stand-in); the fake
device's budget. Real ``mpiexec -n 2`` runs are in test_distributed_mpi.py."""

import threading

import numpy as np
import pytest

from numpygpt import GPTConfig, GPTModel, backend, fake_cuda
from numpygpt.distributed import Communicator
from numpygpt.nn import Parameter
from numpygpt.optim import AdamW, clip_grad_norm
from numpygpt.zero import FlatLayout, ShardedAdamW

SHAPES = [(7, 5), (3,), (4, 4), (1,), (11,), (2, 3, 2)]  # odd sizes: shards cut through parameters


class ThreadGroup:
    """The meeting point of N emulated ranks (one thread each)."""

    def __init__(self, n: int):
        self.n, self.barrier, self.slots = n, threading.Barrier(n, timeout=30), [None] * n


class ThreadComm(Communicator):
    """Rank ``rank`` of a ThreadGroup: ZeRO's collectives, summing in rank order."""

    def __init__(self, group: ThreadGroup, rank: int):
        super().__init__()
        self.group, self.rank, self.world_size = group, rank, group.n

    def _exchange(self, value) -> list:
        g = self.group
        g.slots[self.rank] = value
        g.barrier.wait()
        values = list(g.slots)
        g.barrier.wait()
        return values

    def reduce_scatter(self, send, recv) -> None:
        values = self._exchange(send.copy())
        total = values[0]
        for v in values[1:]:
            total = total + v
        recv[...] = total.reshape(self.world_size, -1)[self.rank]

    def all_gather(self, buf) -> None:
        blocks = buf.reshape(self.world_size, -1)
        for r, block in enumerate(self._exchange(blocks[self.rank].copy())):
            blocks[r] = block

    def gather(self, block, root: int = 0):
        values = self._exchange(backend.to_host(block).copy())
        return np.concatenate(values) if self.rank == root else None

    def sum_scalar(self, value):
        values = self._exchange(value.copy())
        total = values[0]
        for v in values[1:]:
            total = total + v
        return total


def make_params(seed: int = 0, dtype="float64"):
    rng = np.random.default_rng(seed)
    params = [Parameter(backend.to_device(rng.standard_normal(s), dtype=dtype)) for s in SHAPES]
    params[3].requires_grad = False  # frozen: no moments, not in the flat vector
    return [{"params": [(f"p{i}", p) for i, p in enumerate(params) if i % 2 == 0], "weight_decay": 0.1},
            {"params": [(f"p{i}", p) for i, p in enumerate(params) if i % 2 == 1], "weight_decay": 0.0}], params


def rank_grads(rank: int, step: int, params, dtype="float64"):
    """The gradient rank ``rank`` holds at ``step`` (None for one parameter on rank 1)."""
    rng = np.random.default_rng([rank, step])
    return [None if (rank == 1 and i == 4) or not p.requires_grad else
            backend.to_device(rng.standard_normal(p.shape), dtype=dtype) for i, p in enumerate(params)]


def run_ranks(n: int, steps, clip=None, start_state=None, dtype="float64"):
    """N threads, each with its replica and a ShardedAdamW; returns (rank 0's weights,
    the gathered state dict, the norms rank 0 clipped with)."""
    group, results = ThreadGroup(n), {}

    def rank(r: int) -> None:
        groups, params = make_params(dtype=dtype)
        opt = ShardedAdamW(groups, ThreadComm(group, r), lr=1e-2)
        if start_state is not None:
            opt.load_state_dict(start_state)
        norms = []
        for step in steps:
            for p, g in zip(params, rank_grads(r, step, params, dtype)):
                p.grad = g
            assert opt.reduce_gradients(float(r + 1)) == n * (n + 1) / 2  # every rank gets the summed loss
            if clip is not None:
                norms.append(clip_grad_norm(opt, clip))
            opt.step()
        results[r] = ([backend.to_host(p.data) for p in params], opt.state_dict(), norms, opt.state_nbytes())

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == n, "a rank failed"
    for r in range(1, n):  # every rank holds the same weights after the all-gather
        for a, b in zip(results[0][0], results[r][0]):
            np.testing.assert_array_equal(a, b)
    return results[0][0], results[0][1], results[0][2], [results[r][3] for r in range(n)]


def run_reference(n: int, steps, clip=None, start_state=None, dtype="float64"):
    """One AdamW stepping the ranks' gradients summed in rank order."""
    groups, params = make_params(dtype=dtype)
    opt = AdamW(groups, lr=1e-2)
    if start_state is not None:
        opt.load_state_dict(start_state)
    norms = []
    for step in steps:
        per_rank = [rank_grads(r, step, params, dtype) for r in range(n)]
        for i, p in enumerate(params):
            if p.requires_grad:
                total = None
                for grads in per_rank:
                    g = grads[i] if grads[i] is not None else backend.xp.zeros(p.shape, dtype=dtype)
                    total = g if total is None else total + g
                p.grad = total
        if clip is not None:
            norms.append(clip_grad_norm(opt, clip))
        opt.step()
    return [backend.to_host(p.data) for p in params], opt.state_dict(), norms


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_sharded_steps_are_adamws_steps_bit_for_bit(device, n):
    steps = range(4)
    got, got_sd, _, nbytes = run_ranks(n, steps)
    want, want_sd, _ = run_reference(n, steps)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    # the gathered state is AdamW's own, tensor for tensor
    assert got_sd["hyper"] == want_sd["hyper"]
    assert set(got_sd["tensors"]) == set(want_sd["tensors"])
    for key, value in want_sd["tensors"].items():
        np.testing.assert_array_equal(got_sd["tensors"][key], backend.to_host(value))
    trainable = sum(int(np.prod(s)) for i, s in enumerate(SHAPES) if i != 3)
    assert sum(nbytes) == 2 * 8 * trainable and max(nbytes) == 2 * 8 * -(-trainable // n)  # 1/N each


def test_clipping_uses_the_norm_of_the_summed_gradient():
    steps = range(3)
    got, _, got_norms, _ = run_ranks(3, steps, clip=1.0)
    want, _, want_norms = run_reference(3, steps, clip=1.0)
    np.testing.assert_allclose(got_norms, want_norms, rtol=1e-12)  # summed in another order
    assert min(want_norms) > 1.0  # so every step clipped
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_a_state_saved_by_three_ranks_continues_on_two_and_on_one_adamw():
    _, saved, _, _ = run_ranks(3, range(3))
    on_two, _, _, _ = run_ranks(2, range(3, 6), start_state=saved)
    on_one, _, _ = run_reference(2, range(3, 6), start_state=saved)  # a plain AdamW loads it too
    for a, b in zip(on_two, on_one):
        np.testing.assert_array_equal(a, b)


def test_flat_layout_cuts_the_vector_into_equal_shards():
    groups, params = make_params()
    opt = AdamW(groups)
    n = sum(p.size for p in params if p.requires_grad)
    covered = []
    for rank in range(3):
        lay = FlatLayout(opt.param_groups, 3, rank)
        assert lay.size == n and lay.shard_size == -(-n // 3)
        for _, key, p, lo, hi, at in lay.segments:
            offset = next(o for _, k, _, o in lay.entries if k == key)
            assert 0 <= lo < hi <= p.size and at == offset + lo - rank * lay.shard_size
            covered.extend(range(offset + lo, offset + hi))
    assert covered == list(range(n))  # each element in exactly one shard, in order
    lay = FlatLayout(opt.param_groups, 3, 0)
    pieces = list(lay.pieces(lay.shard_size - 2, 5))  # straddles a block boundary
    assert pieces == [(0, lay.shard_size - 2, 2, 0), (1, 0, 3, 2)]


def test_mixed_dtypes_and_nothing_trainable_are_refused():
    a, b = Parameter(np.zeros(3)), Parameter(np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match="one dtype"):
        ShardedAdamW([a, b])
    b.requires_grad = a.requires_grad = False
    with pytest.raises(ValueError, match="no trainable"):
        ShardedAdamW([a, b])
    opt = ShardedAdamW([Parameter(np.zeros(3))])
    with pytest.raises(RuntimeError, match="reduce the gradients first"):
        opt.step()


def test_a_zero_training_step_on_the_fake_device_costs_one_host_transfer():
    from numpygpt.data import DataLoader, GPTDataset
    from numpygpt.optim import param_groups
    from numpygpt.train import train_model

    ids = np.resize(np.random.default_rng(0).permutation(128)[:40], 2000)

    def run(steps):
        model = GPTModel(GPTConfig.preset("tiny"), seed=0)
        opt = ShardedAdamW(param_groups(model, 0.1), lr=1e-3)
        train = DataLoader(GPTDataset(ids[:1800], 16, 16), 4, shuffle=True, seed=0)
        val = DataLoader(GPTDataset(ids[1800:], 16, 16), 4, shuffle=False, drop_last=False)
        return train_model(model, train, val, opt, num_epochs=1, eval_freq=1000, eval_iter=1, max_steps=steps,
                           max_grad_norm=1.0, comm=opt.comm, progress=False, log=None)

    with backend.device("fake-cuda"):
        counts = []
        for steps in (2, 5):
            with fake_cuda.count_transfers() as log:
                run(steps)
            counts.append(log.total)
    assert (counts[1] - counts[0]) == 3, counts


class RecordingNCCL:
    """A stand-in for cupy.cuda.nccl recording reduceScatter and allGather calls."""

    NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64, NCCL_SUM = 6, 7, 8, 0

    def __init__(self):
        self.calls = []
        outer = self

        class NcclCommunicator:
            def __init__(self, n, uid, rank):
                pass

            def reduceScatter(self, send, recv, count, dtype, op, stream):
                outer.calls.append(("reduceScatter", send, recv, count, dtype, op))

            def allGather(self, send, recv, count, dtype, stream):
                outer.calls.append(("allGather", send, recv, count, dtype))

        self.NcclCommunicator = NcclCommunicator

    def get_unique_id(self):
        return 0


def test_nccl_gets_the_shard_counts_and_an_in_place_all_gather():
    from numpygpt.distributed import _NCCL

    class TwoRanks:
        rank, world_size = 1, 2

        def broadcast(self, obj, root=0):
            return obj

    fake = RecordingNCCL()
    nccl = _NCCL(fake, TwoRanks())
    send, recv = np.zeros(10, np.float32), np.zeros(5, np.float32)
    nccl.reduce_scatter(send, recv)
    nccl.all_gather(send, rank=1, world_size=2)
    assert fake.calls[0] == ("reduceScatter", send.ctypes.data, recv.ctypes.data, 5, fake.NCCL_FLOAT32, fake.NCCL_SUM)
    # rank 1 sends its own block of the buffer it receives into (NCCL's in-place all-gather)
    assert fake.calls[1] == ("allGather", send.ctypes.data + 5 * 4, send.ctypes.data, 5, fake.NCCL_FLOAT32)
