"""ZeRO stage 1: AdamW's moments sharded over the ranks (Rajbhandari et al., 2020).

    comm = distributed.init()                                   # mpiexec -n N
    opt = ShardedAdamW(param_groups(model, 0.1), comm, lr=6e-4)
    train_model(model, train_loader, val_loader, opt, ..., comm=opt.comm)

Plain data parallelism keeps the whole AdamW state, two moments (8 bytes a float32
parameter), on every rank. Here the trainable parameters are laid end to end in one flat
vector of n elements, cut into N shards of S = ceil(n / N), and rank r keeps the moments of
shard r alone: 2n/N elements instead of 2n. A step is

    1. reduce-scatter: rank r receives shard r of the flat gradient summed over the ranks
       (and the summed loss, in a slot after its shard: one collective for both);
    2. clipping (optional): the squares of each shard summed, all-reduced (one scalar);
    3. AdamW on shard r: for each parameter (segment of one) in it, AdamW's own arithmetic
       (``optim._adamw_math``) with that parameter's group and step count;
    4. all-gather: every rank receives every updated shard, the weights are whole again.

A ring all-reduce is a reduce-scatter followed by an all-gather, so a step moves as many
bytes as plain data parallelism, 2 (N-1)/N of the flat vector a rank. The weights after
each step are the unsharded run's: the gradient sums are the same numbers (with two ranks
bit for bit, a + b), each element gets AdamW's own update; only clipping's norm is summed
in another order (float rounding).

Checkpoints hold AdamW's own state (``state_dict`` gathers the shards on rank 0; every rank
must call it, as ``Checkpointer`` does), so a run saved by N ranks resumes on M ranks
sharded, or on one process with a plain ``AdamW``, and ``load_state_dict`` takes a plain
AdamW's state and keeps this rank's shard.

On CuPy the collectives go through NCCL (``distributed._NCCL``), as the all-reduce does.
"""

from __future__ import annotations

from . import backend
from .distributed import Communicator
from .optim import AdamW, _CHUNK, _adamw_math, _flush_tiny, adamw_hyper, clip_by_total

__all__ = ["ShardedAdamW", "FlatLayout"]


class FlatLayout:
    """Where each trainable parameter sits in the flat vector, and which pieces of it are
    this rank's shard.

    ``entries``: (group index, key, Parameter, offset) in optimiser order. The vector is
    padded to N shards of ``shard_size``; rank r owns [r * S, min((r + 1) * S, n)).
    ``segments``: the pieces of this rank's shard, (group index, key, Parameter, start in
    the parameter, stop in the parameter, start in the shard).
    """

    def __init__(self, param_groups, world_size: int, rank: int):
        self.entries, offset = [], 0
        for gi, group in enumerate(param_groups):
            for key, p in zip(group["names"], group["params"]):
                if p.requires_grad:
                    self.entries.append((gi, key, p, offset))
                    offset += p.size
        if not self.entries:
            raise ValueError("no trainable parameters to shard")
        kinds = {(p.dtype.str, backend.device_of(p.data)) for _, _, p, _ in self.entries}
        if len(kinds) > 1:
            raise ValueError(f"ZeRO needs every trainable parameter in one dtype on one device, got {sorted(kinds)}")
        self.size, self.world_size, self.rank = offset, int(world_size), int(rank)
        self.shard_size = max(1, -(-offset // self.world_size))
        lo, hi = rank * self.shard_size, min((rank + 1) * self.shard_size, offset)
        self.segments = [(gi, key, p, max(lo, start) - start, min(hi, start + p.size) - start, max(lo, start) - lo)
                         for gi, key, p, start in self.entries if start < hi and start + p.size > lo]

    def pieces(self, offset: int, size: int):
        """(block, column, length, position in the range) of elements [offset, offset + size)
        of the flat vector laid out as blocks of shard_size."""
        pos = 0
        while pos < size:
            block, col = divmod(offset + pos, self.shard_size)
            length = min(size - pos, self.shard_size - col)
            yield block, col, length, pos
            pos += length


class ShardedAdamW(AdamW):
    """AdamW whose moments live in shards, one a rank (see the module docstring).

    ``comm``: the run's communicator (default: this process alone, where it is AdamW with a
    flat buffer). Pass ``opt.comm`` to ``train_model`` so the gradients are reduce-scattered
    into this optimiser instead of all-reduced.
    """

    def __init__(self, params, comm=None, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.base_comm = comm if comm is not None else Communicator()
        self.layout = FlatLayout(self.param_groups, self.base_comm.world_size, self.base_comm.rank)
        self.comm = ZeroCommunicator(self.base_comm, self)
        p0 = self.layout.entries[0][2].data
        xp, S, N = backend.array_module(p0), self.layout.shard_size, self.layout.world_size
        self._flat = xp.zeros((N, S + 1), dtype=p0.dtype)  # gradients (+ loss slot) out, weights back
        self._shard = xp.zeros(S + 1, dtype=p0.dtype)      # my summed gradient shard, then the loss
        self._reduced = False

    # -- the exchange ------------------------------------------------------------------------

    def reduce_gradients(self, loss=0.0, sync: bool = True):
        """Reduce-scatter every rank's ``.grad`` (zeros where None) and ``loss``: this rank
        gets its shard of the summed gradient; returns the summed loss (a float, or as it
        is with ``sync=False``: no host sync)."""
        flat, lay = self._flat, self.layout
        for _, _, p, offset in lay.entries:
            g = None if p.grad is None else p.grad.reshape(-1)
            for block, col, n, pos in lay.pieces(offset, p.size):
                if g is None:
                    flat[block, col:col + n] = 0
                else:
                    flat[block, col:col + n] = g[pos:pos + n]
        flat[:, -1] = loss  # in every block: each rank receives the sum
        self.base_comm.reduce_scatter(flat.reshape(-1), self._shard)
        self._reduced = True
        total = self._shard[-1]
        return float(total) if sync else total.copy()

    def _gather_weights(self) -> None:
        """My updated shard into my block, all-gathered; every parameter refilled from it."""
        flat, lay = self._flat, self.layout
        mine = flat[lay.rank]
        for _, _, p, lo, hi, at in lay.segments:
            mine[at:at + hi - lo] = p.data.reshape(-1)[lo:hi]
        self.base_comm.all_gather(flat.reshape(-1))
        for _, _, p, offset in lay.entries:
            data = p.data.reshape(-1)  # a view: parameters are contiguous
            for block, col, n, pos in lay.pieces(offset, p.size):
                data[pos:pos + n] = flat[block, col:col + n]

    def clip_grad_norm(self, max_norm: float, sync: bool = True):
        """``optim.clip_grad_norm`` on the summed gradient, which only exists in shards: the
        shards' squares are summed over the ranks."""
        self._need_reduced("clip_grad_norm")
        xp = backend.array_module(self._shard)
        shard = self._shard[:-1]
        total = self.base_comm.sum_scalar(xp.vdot(shard, shard).reshape(()))
        return clip_by_total([shard], total, max_norm, sync)

    def _need_reduced(self, what: str) -> None:
        if not self._reduced:
            raise RuntimeError(f"ShardedAdamW.{what}: reduce the gradients first (opt.reduce_gradients(loss), or "
                               "train_model(..., comm=opt.comm) which does it)")

    # -- the step ------------------------------------------------------------------------------

    def step(self) -> None:
        """AdamW on this rank's shard, then the weights all-gathered."""
        self._need_reduced("step")
        self.step_count += 1
        for _, key, _, _ in self.layout.entries:  # every trainable parameter got a (summed) gradient
            self.state.setdefault(key, {"step": 0})["step"] += 1
        xp = backend.array_module(self._shard)
        scratch = self._flat[self.layout.rank, :-1]  # free until the gather: the update's scratch
        for gi, key, p, lo, hi, at in self.layout.segments:
            state = self.state[key]
            if "exp_avg" not in state:
                state["exp_avg"] = xp.zeros(hi - lo, dtype=p.dtype)
                state["exp_avg_sq"] = xp.zeros(hi - lo, dtype=p.dtype)
            args = (p.data.reshape(-1)[lo:hi], self._shard[at:at + hi - lo], state["exp_avg"], state["exp_avg_sq"],
                    scratch[at:at + hi - lo])
            hyper = adamw_hyper(self.param_groups[gi], state["step"])
            if backend.is_cupy_array(p.data) or hi - lo <= 2 * _CHUNK:
                _adamw_math(xp, *args, *hyper)
            else:
                self._update_in_chunks(xp, *args, hyper)
            if state["step"] % self.FLUSH_EVERY == 0:
                _flush_tiny(xp, state["exp_avg"], state["exp_avg_sq"])
        self._gather_weights()
        self._reduced = False

    def state_nbytes(self) -> int:
        """Bytes of optimiser state (the moments) this rank holds."""
        return sum(a.nbytes for st in self.state.values() for k, a in st.items() if k != "step")

    # -- checkpoints: AdamW's own format -----------------------------------------------------

    state_dict_is_collective = True  # every rank calls state_dict(); rank 0 gets the state

    def state_dict(self):
        """AdamW's state dict (``"optimizer": "AdamW"``), the shards gathered on rank 0; None on
        the other ranks. Collective: every rank must call it at the same point."""
        full = {}
        for slot in self.slots:
            block = backend.to_host(self._flat[0, :-1]).copy()  # host, shard-sized
            block[...] = 0
            for _, key, _, lo, hi, at in self.layout.segments:
                if slot in self.state.get(key, {}):
                    block[at:at + hi - lo] = backend.to_host(self.state[key][slot])
            full[slot] = self.base_comm.gather(block)
        if self.base_comm.rank != 0:
            return None
        plain = AdamW.state_dict(self)  # hyperparameters and step counts, as AdamW writes them
        plain["hyper"]["optimizer"] = "AdamW"
        plain["tensors"] = {f"{key}.{slot}": full[slot][offset:offset + p.size].reshape(p.shape)
                            for _, key, p, offset in self.layout.entries
                            if self.state.get(key, {}).get("step", 0) > 0 for slot in self.slots}
        return plain

    def load_state_dict(self, sd: dict) -> None:
        """A plain AdamW state dict (or ours): checked as AdamW checks it, then this rank's
        shard of each moment kept."""
        check = AdamW([{"params": list(zip(g["names"], g["params"])),
                        **{k: g[k] for k in self.defaults}} for g in self.param_groups],
                      **{k: v for k, v in self.defaults.items()})
        plain = dict(sd, hyper=dict(sd["hyper"], optimizer="AdamW"))
        check.load_state_dict(plain)  # every check, on a throwaway; moves the arrays to the device
        for mine, theirs in zip(self.param_groups, check.param_groups):
            mine.update({k: theirs[k] for k in self.defaults})
        self.step_count = check.step_count
        self.state = {key: {"step": st["step"]} for key, st in check.state.items()}
        for _, key, _, lo, hi, _ in self.layout.segments:
            for slot in self.slots:
                if slot in check.state.get(key, {}):
                    self.state[key][slot] = check.state[key][slot].reshape(-1)[lo:hi].copy()


class ZeroCommunicator:
    """``opt.comm``: the run's communicator, but its ``sum_gradients`` is the sharded
    optimiser's reduce-scatter (train_model then clips and steps through the optimiser)."""

    def __init__(self, base, optimizer: ShardedAdamW):
        self._base, self._optimizer = base, optimizer

    def __getattr__(self, name):
        return getattr(self._base, name)

    def sum_gradients(self, params, loss, sync: bool = True):
        return self._optimizer.reduce_gradients(loss, sync)

    def describe(self) -> str:
        return self._base.describe() + f"; ZeRO stage 1: AdamW's moments in {self._base.world_size} shards"
