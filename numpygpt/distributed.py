"""Data-parallel training: one model on N processes, over MPI (mpi4py), NCCL for CuPy.

    mpiexec -n 4 numpygpt train --batch-size 32 ...

Every rank holds the whole model. Each global batch of B rows is cut into N equal
shares; rank r runs forward and backward on rows [r*B/N, (r+1)*B/N), and then one
all-reduce a step sums the gradients of all ranks, so every rank takes the same
optimiser step from the same gradient and the weights stay identical, bit for bit.

    comm = distributed.init()                        # MPI under mpiexec, else one process
    inputs, targets, weight = comm.shard(x, y)       # my rows of the global batch, my weight
    loss = loss_fn(model(inputs), targets)
    model.backward(loss_fn.backward(weight / grad_accum))
    step_loss = comm.sum_gradients(model.parameters(), loss * weight) / grad_accum

Why a weight rather than a plain average: the loss is a mean over the targets that
are not ``ignore_index``, and ranks can hold different numbers n_r of them. The global
batch's mean is  sum_r (sum of my nll) / n  =  sum_r (n_r / n) * loss_r,  so rank r
scales its loss (and its backward) by w_r = n_r / n and the all-reduce *sums*. Every
rank sees the whole global batch on the host (the data loader is the same everywhere),
so n is counted locally and costs no communication. Without ignored targets w_r = 1/N,
the familiar average.

The gradients travel in one flat buffer per dtype (``GradientBuckets``), with the
step's loss in an extra slot, so a step costs one all-reduce however many tensors the
model has. On CuPy the same buffer goes through NCCL (``cupy.cuda.nccl``), with the
NCCL communicator set up over MPI; on NumPy through MPI's ``Allreduce``.

Without ``mpiexec`` (or with one rank) nothing here imports mpi4py: ``init()`` returns
a ``Communicator`` for a single process whose methods are the identity, and training is
exactly the single-process run.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time

import numpy

from . import backend

ABORT_GRACE_S = 0.5  # seconds between a failing rank's last words and MPI_Abort

__all__ = ["Communicator", "MPICommunicator", "GradientBuckets", "DistributedError", "init", "get", "current",
           "launched_world_size", "blas_threads_for", "dropout_seed"]


class DistributedError(ValueError):
    """Raised on every rank at the same point, because the ranks disagree (weights,
    options) or the batch cannot be shared out: each rank can stop cleanly."""


# -- helpers with no communication (unit-tested on their own) --------------------------------

# What launchers put in each process's environment: MPICH/Intel MPI (hydra, and Slurm's
# PMI), Open MPI, MVAPICH.
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_world_size(environ=None) -> int | None:
    """The number of ranks the launcher started, read from the environment; None when
    this process was not started by ``mpiexec`` (or ``srun``)."""
    env = os.environ if environ is None else environ
    for var in _SIZE_VARS:
        value = env.get(var)
        if value:
            try:
                return int(value)
            except ValueError:
                continue
    return None


def blas_threads_for(local_ranks: int, cores: int | None = None) -> int:
    """BLAS threads for each of ``local_ranks`` processes on a machine with ``cores``
    cores (default: those this process may run on): cores // ranks, at least 1."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, int(cores) // max(1, int(local_ranks)))


def dropout_seed(seed: int, rank: int, step: int) -> int:
    """The seed of the dropout masks that rank ``rank`` > 0 draws in step ``step`` (0-based)
    of a run seeded ``seed``: a deterministic mix of the three, so ranks draw independent
    masks, and a resumed run draws the same ones as the uninterrupted run. Rank 0 keeps the
    run's own stream (saved in checkpoints), which is why one rank is exactly the
    single-process run."""
    mix = numpy.random.SeedSequence([int(seed) % 2**63, int(rank), int(step)])
    return int(mix.generate_state(1, numpy.uint32)[0])


def _parameters(params) -> list:
    """A Module's parameters, or the Parameters given."""
    return list(params.parameters()) if hasattr(params, "parameters") else list(params)


def _digest(array) -> bytes:
    """16 bytes that change if any bit of ``array`` (on either device) does."""
    host = numpy.ascontiguousarray(backend.to_host(array))
    h = hashlib.blake2b(digest_size=16)
    h.update(str((host.dtype.str, host.shape)).encode())
    h.update(host.data)
    return h.digest()


class GradientBuckets:
    """The gradients of ``params`` laid end to end in one flat buffer per dtype.

    ``pack(extras)`` copies every gradient into its slice (zeros for a parameter that
    got no gradient on this rank) and the scalars ``extras`` (the step's loss) into
    ``n_extra`` slots after the first buffer's gradients; after the buffers have been
    reduced in place, ``unpack()`` copies the slices back into ``param.grad`` and returns
    the extras' slots. Frozen parameters (``requires_grad=False``) are left out. The
    buffers are allocated once, on the parameters' device, and reused every step.
    """

    def __init__(self, params, n_extra: int = 1):
        self.params = [p for p in _parameters(params) if p.requires_grad]
        if not self.params:
            raise ValueError("no trainable parameters to reduce")
        self.n_extra = int(n_extra)
        self.buckets = []  # [(dtype, [(param, start, stop)], n_grad_elements)]
        by_dtype: dict = {}
        for p in self.params:
            by_dtype.setdefault(numpy.dtype(p.dtype), []).append(p)
        for dtype, group in by_dtype.items():
            entries, offset = [], 0
            for p in group:
                entries.append((p, offset, offset + p.size))
                offset += p.size
            self.buckets.append((dtype, entries, offset))
        self._buffers = None

    @property
    def sizes(self) -> list[int]:
        """Elements in each buffer (the first holds the extra slots too)."""
        return [n + (self.n_extra if i == 0 else 0) for i, (_, _, n) in enumerate(self.buckets)]

    @property
    def nbytes(self) -> int:
        """Bytes of gradient each all-reduce moves (the extra slots included)."""
        return sum(size * dtype.itemsize for size, (dtype, _, _) in zip(self.sizes, self.buckets))

    def buffers(self) -> list:
        if self._buffers is None:
            xp = backend.array_module(self.params[0].data)
            self._buffers = [xp.empty(size, dtype=dtype) for size, (dtype, _, _) in zip(self.sizes, self.buckets)]
        return self._buffers

    def pack(self, extras=()) -> list:
        """Gradients (and ``extras``) into the flat buffers, which are returned."""
        if len(extras) != self.n_extra:
            raise ValueError(f"expected {self.n_extra} extra values, got {len(extras)}")
        buffers = self.buffers()
        for buf, (_, entries, n) in zip(buffers, self.buckets):
            for p, start, stop in entries:
                view = buf[start:stop].reshape(p.shape)  # a view: the copy lands in the buffer
                if p.grad is None:
                    view[...] = 0
                else:
                    view[...] = p.grad
        for k, value in enumerate(extras):
            buffers[0][self.buckets[0][2] + k] = value
        return buffers

    def unpack(self):
        """Buffers back into ``param.grad``; returns the extra slots (a view, length n_extra)."""
        buffers = self.buffers()
        for buf, (_, entries, _) in zip(buffers, self.buckets):
            for p, start, stop in entries:
                view = buf[start:stop].reshape(p.shape)
                if p.grad is None:
                    p.grad = view.copy()  # own memory: the buffer is refilled next step
                else:
                    p.grad[...] = view
        n = self.buckets[0][2]
        return buffers[0][n:n + self.n_extra]


# -- the communicators -------------------------------------------------------------------------

class Communicator:
    """One process: rank 0 of 1. Every method is what N ranks do, for N = 1.

    ``MPICommunicator`` is the same interface over MPI; the training loop calls these
    methods and never asks which one it has.
    """

    rank = 0
    world_size = 1
    local_rank = 0   # the rank among the processes on this machine (picks the GPU)
    local_size = 1   # processes on this machine (divides its cores)
    blas_threads = None  # BLAS threads chosen for each rank (None: left as they were)

    def __init__(self):
        self.reduce_seconds = 0.0    # time inside the all-reduce calls themselves
        self.exchange_seconds = 0.0  # pack + all-reduce + unpack: what a step pays for N ranks
        self.reduce_calls = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, evaluates, samples, plots and saves."""
        return self.rank == 0

    def describe(self) -> str:
        return "1 process"

    # -- sharing out the batch ------------------------------------------------------------

    def check_batch_size(self, batch_size: int) -> None:
        """DistributedError (on every rank) unless ``batch_size`` rows split evenly."""
        if int(batch_size) % self.world_size:
            raise DistributedError(
                f"the batch of {batch_size} rows does not split evenly over {self.world_size} ranks: "
                f"use a --batch-size that is a multiple of {self.world_size}")

    def shard(self, inputs, targets, ignore_index: int | None = -100):
        """(my inputs, my targets, my weight) of a global batch (B, ...).

        The weight n_r / n (my counted targets over the whole batch's) makes the sum over
        ranks of weight * my mean loss the mean loss of the whole batch; with one process
        the batch is all mine and the weight is 1. ``ignore_index`` None: every target
        counts (a loss without one).
        """
        if self.world_size == 1:
            return inputs, targets, 1.0
        B = inputs.shape[0]
        self.check_batch_size(B)
        rows = slice(self.rank * (B // self.world_size), (self.rank + 1) * (B // self.world_size))
        xp = backend.array_module(targets)
        mine = targets[rows]
        if ignore_index is None:
            return inputs[rows], mine, 1.0 / self.world_size
        n_all = int(xp.count_nonzero(targets != ignore_index))
        if n_all == 0:
            raise DistributedError("every target of the batch equals ignore_index: the mean loss is undefined")
        n_mine = int(xp.count_nonzero(mine != ignore_index))
        return inputs[rows], mine, n_mine / n_all

    # -- the step's one exchange --------------------------------------------------------------

    def sum_gradients(self, params, loss, sync: bool = True):
        """Sum every parameter's ``.grad`` and ``loss`` (a 0-d array or a float) over the
        ranks, in place; return the summed loss as a float (the step's one host sync), or
        with ``sync=False`` as it is (a 0-d device array on the GPU: no sync here)."""
        return float(loss) if sync else loss

    # -- ZeRO's collectives (numpygpt.zero) -------------------------------------------------

    def reduce_scatter(self, send, recv) -> None:
        """``send`` holds world_size equal blocks; block ``rank`` of their sum over the ranks
        lands in ``recv`` (one rank: a copy)."""
        recv[...] = send

    def all_gather(self, buf) -> None:
        """``buf`` holds world_size equal blocks, this rank's filled in: afterwards every block
        holds its rank's, on every rank (in place; one rank: nothing to do)."""

    def gather(self, block, root: int = 0):
        """The ranks' equal host ``block``s end to end on ``root`` (None elsewhere)."""
        return backend.to_host(block).copy()

    def sum_scalar(self, value):
        """A 0-d array summed over the ranks, on its device (no host sync on NCCL)."""
        return value

    # -- agreement ------------------------------------------------------------------------

    def check_same(self, value, what: str) -> None:
        """DistributedError on every rank unless every rank passes an equal ``value``."""

    def check_same_weights(self, params) -> None:
        """DistributedError on every rank, naming a tensor, unless every rank holds
        bit-identical weights (a digest of each tensor, compared across ranks)."""

    def broadcast(self, obj, root: int = 0):
        """``obj`` of rank ``root`` on every rank (any picklable object)."""
        return obj

    def any_stop(self, request):
        """Every rank's stop request (a signal number, something else true, or None),
        agreed: the largest signal number any rank got, True for a request that is not a
        signal, None if no rank has one. A Ctrl-C that reaches the ranks between two
        different steps still stops them all after the same one."""
        return request

    def barrier(self) -> None:
        """Wait until every rank gets here."""

    def abort(self, code: int = 1) -> None:
        """Stop every rank now (after a failure on this one); one process just exits."""
        sys.exit(code)

    def use_device(self, device: str) -> None:
        """Called once the device is known: picks this rank's GPU and sets up NCCL."""

    def begin_training(self, model, batch_size: int | None = None, plan=None) -> None:
        """Before the first step (of a run or of a resumed one): the batch splits evenly,
        every rank has the same ``plan`` and bit-identical weights, else DistributedError
        on every rank. Remembers the run's dropout seed for ``begin_step``."""
        if batch_size is not None:
            self.check_batch_size(batch_size)
        if plan is not None:
            self.check_same(plan, "the training plan")
        self.check_same_weights(model)
        self._dropout_base = backend.get_rng_state()["seed"]

    def begin_step(self, step: int) -> None:
        """Before step ``step`` (0-based): a rank > 0 reseeds its dropout masks with
        ``dropout_seed(run seed, rank, step)``; rank 0 draws on from the run's stream."""
        if self.rank > 0:
            backend.manual_seed(dropout_seed(self._dropout_base, self.rank, step))


class MPICommunicator(Communicator):
    """N ranks over MPI: ``comm`` is an mpi4py communicator (COMM_WORLD by default)."""

    def __init__(self, comm=None, set_blas_threads: bool = True):
        super().__init__()
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()
        self.library = " ".join(MPI.Get_library_version().strip().splitlines()[0].split())
        self.nccl = None      # _NCCL once use_device("cuda") has set it up
        self.device = "cpu"
        self._buckets = None
        self._blas_note = ""
        if set_blas_threads:
            self._set_blas_threads()

    def describe(self) -> str:
        hosts = self.comm.allgather(os.uname().nodename if hasattr(os, "uname") else "")
        line = (f"{self.world_size} ranks over MPI ({self.library}), {len(set(hosts))} "
                f"host{'s' if len(set(hosts)) > 1 else ''}, {self.local_size} on this one")
        if self._blas_note:
            line += f"; {self._blas_note}"
        if self.device == "cuda":
            line += "; gradients over NCCL" if self.nccl is not None else "; gradients over MPI via the host"
        return line

    def _set_blas_threads(self) -> None:
        n = blas_threads_for(self.local_size)
        from . import parallel

        if not os.environ.get("NUMPYGPT_NUM_THREADS"):
            # numpygpt's own pool (layers, AdamW) gets this rank's share whatever BLAS is told
            parallel.set_num_threads(n)
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            if os.environ.get(var):
                self._blas_note = (f"BLAS threads as {var}={os.environ[var]} says, "
                                   f"{parallel.get_num_threads()} numpygpt threads a rank")
                return
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            self._blas_note = ("BLAS threads left as they were (no threadpoolctl: set OMP_NUM_THREADS "
                               f"to {n})")
            return
        self._blas_limiter = threadpool_limits(limits=n, user_api="blas")  # kept: the limit holds while it lives
        self.blas_threads = n
        self._blas_note = f"{n} BLAS thread{'s' if n > 1 else ''} a rank ({cores} cores / {self.local_size} ranks)"

    # -- device ------------------------------------------------------------------------------

    def use_device(self, device: str) -> None:
        """Call before the model is built: on 'cuda' the local rank picks this rank's GPU
        (CUDA_VISIBLE_DEVICES may already have given each rank one) and NCCL is set up."""
        self.device = device
        if device != "cuda" or self.nccl is not None:
            return
        import cupy

        cupy.cuda.Device(self.local_rank % cupy.cuda.runtime.getDeviceCount()).use()
        self._setup_nccl()

    def _setup_nccl(self) -> None:
        """NCCL over this rank's current GPU, unless NUMPYGPT_NCCL=0 or CuPy lacks NCCL
        (then CuPy gradients go through the host and MPI)."""
        self._nccl_tried = True
        if os.environ.get("NUMPYGPT_NCCL", "1") == "0":
            return
        try:
            from cupy.cuda import nccl
        except ImportError:
            return
        self.nccl = _NCCL(nccl, self)

    # -- the exchange ------------------------------------------------------------------------

    def sum_gradients(self, params, loss, sync: bool = True):
        t0 = time.perf_counter()
        plist = _parameters(params)
        if self._buckets is None or self._buckets.params != [p for p in plist if p.requires_grad]:
            self._buckets = GradientBuckets(plist, n_extra=1)
        buffers = self._buckets.pack([loss])
        t1 = time.perf_counter()
        for buf in buffers:
            self._allreduce(buf)
        t2 = time.perf_counter()
        total = self._buckets.unpack()[0]  # a view into the buffer the next step refills
        total = float(total) if sync else total.copy()  # float(): the host sync (waits for NCCL too)
        self.reduce_seconds += t2 - t1
        self.reduce_calls += len(buffers)
        self.exchange_seconds += time.perf_counter() - t0
        return total

    def _allreduce(self, buf) -> None:
        """Sum ``buf`` over the ranks in place."""
        if backend.is_cupy_array(buf):
            if self._use_nccl(buf):
                self.nccl.allreduce(buf)
                return
            host = backend.to_host(buf)  # no NCCL: through the host
            self.comm.Allreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM)
            buf.set(host)
            return
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)

    def _use_nccl(self, buf) -> bool:
        """NCCL for a device buffer: the communicator already set up (a stand-in, in tests of
        the fake device), or set up now for a CuPy buffer."""
        if self.nccl is None and backend.device_of(buf) == "cuda" and not getattr(self, "_nccl_tried", False):
            self._setup_nccl()  # a script that never called use_device: its current GPU
        return self.nccl is not None

    def reduce_scatter(self, send, recv) -> None:
        if not backend.is_cupy_array(send):
            self.comm.Reduce_scatter_block(send, recv, op=self.MPI.SUM)
        elif self._use_nccl(send):
            self.nccl.reduce_scatter(send, recv)
        else:  # through the host
            mine = numpy.empty(recv.size, dtype=recv.dtype)
            self.comm.Reduce_scatter_block(backend.to_host(send), mine, op=self.MPI.SUM)
            recv.set(mine.reshape(recv.shape))

    def all_gather(self, buf) -> None:
        if not backend.is_cupy_array(buf):
            self.comm.Allgather(self.MPI.IN_PLACE, buf)
        elif self._use_nccl(buf):
            self.nccl.all_gather(buf, self.rank, self.world_size)
        else:
            host = backend.to_host(buf)
            self.comm.Allgather(self.MPI.IN_PLACE, host)
            buf.set(host)

    def gather(self, block, root: int = 0):
        host = numpy.ascontiguousarray(backend.to_host(block))
        out = numpy.empty(host.size * self.world_size, dtype=host.dtype) if self.rank == root else None
        self.comm.Gather(host, out, root=root)
        return out

    def sum_scalar(self, value):
        buf = value.reshape(1).copy()
        self._allreduce(buf)
        return buf.reshape(())

    # -- agreement ------------------------------------------------------------------------------

    def check_same(self, value, what: str) -> None:
        values = self.comm.allgather(value)
        differ = [r for r, v in enumerate(values) if v != values[0]]
        if differ:
            raise DistributedError(f"the ranks disagree on {what}: rank 0 has {values[0]!r}, rank {differ[0]} "
                                   f"has {values[differ[0]]!r}; start every rank with the same options")

    def check_same_weights(self, params) -> None:
        named = (list(params.named_parameters()) if hasattr(params, "named_parameters")
                 else [(str(i), p) for i, p in enumerate(params)])
        mine = [_digest(p.data) for _, p in named]
        everyone = self.comm.allgather(mine)
        if any(len(theirs) != len(mine) for theirs in everyone):
            raise DistributedError("the ranks hold models with different numbers of tensors: "
                                   "start every rank with the same model options")
        bad = [(name, r) for r, theirs in enumerate(everyone)
               for (name, _), a, b in zip(named, everyone[0], theirs) if a != b]
        if bad:
            tensors = sorted({name for name, _ in bad})
            ranks = sorted({r for _, r in bad})
            raise DistributedError(
                f"the ranks do not hold identical weights: {len(tensors)} of {len(named)} tensors differ "
                f"from rank 0's on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} "
                f"(first: {tensors[0]}); every rank must start from the same --seed or checkpoint")

    def broadcast(self, obj, root: int = 0):
        return self.comm.bcast(obj, root=root)

    def any_stop(self, request):
        other = 1 << 16  # above every signal number
        code = 0 if not request else (request if type(request) is int else other)
        agreed = self.comm.allreduce(code, op=self.MPI.MAX)
        return None if agreed == 0 else True if agreed == other else agreed

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        # MPI_Abort makes the launcher kill every rank, and it may do so before it has
        # forwarded what this rank just wrote: give it a moment to pass the message on.
        time.sleep(ABORT_GRACE_S)
        self.comm.Abort(code)



class _NCCL:
    """One NCCL communicator over the ranks (its id travels over MPI) and the in-place
    sum of a CuPy buffer. ``nccl`` is the ``cupy.cuda.nccl`` module (a stand-in in tests)."""

    def __init__(self, nccl, mpi: MPICommunicator):
        self.nccl = nccl
        uid = nccl.get_unique_id() if mpi.rank == 0 else None
        uid = mpi.broadcast(uid, root=0)
        self.comm = nccl.NcclCommunicator(mpi.world_size, uid, mpi.rank)
        self.calls = []  # (count, dtype code) of every all-reduce, for the record

    def dtype_code(self, dtype) -> int:
        codes = {"float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64"}
        name = numpy.dtype(dtype).name
        if name not in codes:
            raise TypeError(f"no NCCL all-reduce for dtype {name}")
        return getattr(self.nccl, codes[name])

    def allreduce(self, buf) -> None:
        stream = _current_stream_ptr(buf)
        code = self.dtype_code(buf.dtype)
        ptr = _device_ptr(buf)
        self.comm.allReduce(ptr, ptr, buf.size, code, self.nccl.NCCL_SUM, stream)
        self.calls.append((int(buf.size), code))

    def reduce_scatter(self, send, recv) -> None:
        code = self.dtype_code(send.dtype)
        self.comm.reduceScatter(_device_ptr(send), _device_ptr(recv), recv.size, code, self.nccl.NCCL_SUM,
                                _current_stream_ptr(send))
        self.calls.append((int(recv.size), code))

    def all_gather(self, buf, rank: int, world_size: int) -> None:
        """In place: this rank's block of ``buf`` is the one it sends (NCCL allows that)."""
        code, count = self.dtype_code(buf.dtype), buf.size // world_size
        ptr = _device_ptr(buf)
        self.comm.allGather(ptr + rank * count * buf.dtype.itemsize, ptr, count, code, _current_stream_ptr(buf))
        self.calls.append((int(count), code))


def _device_ptr(buf) -> int:
    return buf.data.ptr if backend.is_cupy_array(buf) else buf.ctypes.data


def _current_stream_ptr(buf) -> int:
    if backend.is_cupy_array(buf):
        import cupy

        return cupy.cuda.get_current_stream().ptr
    return 0


# -- the process's communicator ------------------------------------------------------------------

_comm: Communicator | None = None


def init(environ=None) -> Communicator:
    """This process's communicator, set up on the first call.

    MPI when the launcher started more than one rank (``NUMPYGPT_DISTRIBUTED=1`` forces
    MPI even for one; ``=0`` forbids it), else the single-process ``Communicator``.
    Under MPI a rank that dies with an uncaught exception aborts every rank rather than
    leaving them waiting in the next all-reduce.
    """
    global _comm
    if _comm is not None:
        return _comm
    env = os.environ if environ is None else environ
    size = launched_world_size(env)
    want = env.get("NUMPYGPT_DISTRIBUTED", "").strip().lower()
    use_mpi = (size is not None and size > 1) if want in ("", "auto") else want in ("1", "mpi", "yes", "true")
    if not use_mpi:
        _comm = Communicator()
        return _comm
    try:
        import mpi4py  # noqa: F401
    except ImportError as e:
        raise DistributedError(
            f"started by mpiexec as {size} processes, but mpi4py is not installed, so they cannot "
            "train together: pip install 'numpygpt[mpi]'") from e
    try:
        from mpi4py import MPI  # noqa: F401  (loads the MPI library)
    except (ImportError, RuntimeError, OSError) as e:
        raise DistributedError(f"mpi4py cannot load an MPI library ({e}): pip install 'numpygpt[mpi]' "
                               "(MPICH from its wheel) or install an MPI") from e
    _comm = MPICommunicator()
    if _comm.world_size > 1:
        _install_abort_hook(_comm)
    return _comm


def get() -> Communicator:
    """The communicator ``init`` set up (setting it up if nobody has)."""
    return init()


def current() -> Communicator | None:
    """The communicator ``init`` set up, or None before it has been called."""
    return _comm


def _install_abort_hook(comm: MPICommunicator) -> None:
    before = sys.excepthook

    def hook(kind, value, tb):
        before(kind, value, tb)
        print(f"numpygpt: rank {comm.rank} failed; stopping all {comm.world_size} ranks", file=sys.stderr)
        comm.abort(1)

    sys.excepthook = hook
