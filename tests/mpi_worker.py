"""Trains a tiny model with ``train_model``: run by test_distributed_mpi.py under
``mpiexec -n N`` (and imported by it for the one-process reference).

    mpiexec -n 2 python tests/mpi_worker.py OUT.npz [--grad-accum 2] [--drop-rate 0.1] [--zero]
        [--device fake-cuda] [--fail-at STEP | --kill-at STEP | --term-at STEP | --perturb | --rank1-steps N]

Rank 0 writes the per-step losses, the weights after every step and at the end, and each
rank's optimiser-state bytes to OUT.npz. ``--zero``: ZeRO stage 1 (numpygpt.zero). The data are
random token windows whose targets are a fixed function of the inputs, with a fifth of
them set to ignore_index, so the ranks' shares hold different numbers of counted
targets. float64, so "the same" can be asserted to rounding.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import numpy as np

from numpygpt import backend, distributed
from numpygpt.config import GPTConfig
from numpygpt.data import DataLoader
from numpygpt.model import GPTModel
from numpygpt.optim import AdamW
from numpygpt.train import TrainingInterrupted, stop_on_signals, train_model

V, T, SEED = 64, 8, 7
BATCH, STEPS = 4, 20


class Windows:
    """n windows of T random ids; target = (7 * input + 3) mod V, 20% ignored."""

    def __init__(self, n: int, seed: int):
        rng = np.random.default_rng(seed)
        self.inputs = rng.integers(0, V, (n, T))
        self.targets = (7 * self.inputs + 3) % V
        self.targets[rng.random((n, T)) < 0.2] = -100

    def __len__(self) -> int:
        return len(self.inputs)

    def get_batch(self, indices):
        return self.inputs[indices], self.targets[indices]


def build(drop_rate: float = 0.0, grad_accum: int = 1, device: str = "cpu"):
    """(model, train_loader, val_loader, optimizer), the same on every rank."""
    backend.set_device(device)
    backend.manual_seed(SEED)
    cfg = GPTConfig(vocab_size=V, context_length=T, emb_dim=16, n_heads=2, n_layers=2,
                    drop_rate=drop_rate, qkv_bias=True, dtype="float64")
    model = GPTModel(cfg, seed=SEED)
    train_loader = DataLoader(Windows(BATCH * grad_accum * STEPS, seed=1), BATCH, shuffle=True, seed=SEED)
    val_loader = DataLoader(Windows(8, seed=2), BATCH, shuffle=False)
    optimizer = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, train_loader, val_loader, optimizer


def state_bytes(optimizer) -> int:
    """Bytes of the optimiser's arrays (AdamW's moments) held by this process."""
    return sum(a.nbytes for st in optimizer.state.values() for k, a in st.items() if k != "step")


def record_steps(model, optimizer) -> list:
    """The flat weights after every optimiser step, appended to the list returned."""
    snapshots, step = [], optimizer.step

    def step_and_record():
        step()
        snapshots.append(np.concatenate([backend.to_host(p.data).ravel() for p in model.parameters()]))

    optimizer.step = step_and_record
    return snapshots


def train(grad_accum: int = 1, drop_rate: float = 0.0, fail_at=None, kill_at=None, perturb=False,
          rank1_steps=None, term_at=None, zero=False, device="cpu"):
    """Train for STEPS steps (rank 1: ``rank1_steps`` if given); returns (history, model, optimizer,
    the weights after each step)."""
    model, train_loader, val_loader, optimizer = build(drop_rate, grad_accum, device)
    comm = distributed.init()
    if zero:
        from numpygpt.zero import ShardedAdamW

        optimizer = ShardedAdamW(model.parameters(), comm, lr=1e-2, weight_decay=0.1)
    snapshots = record_steps(model, optimizer)
    if perturb and comm.rank == 1:
        p = model.parameters()[3]
        p.data.reshape(-1)[0] += 1e-12

    def schedule(step):  # called on every rank before every step: where failures are staged
        if step == fail_at and comm.rank == 1:
            raise RuntimeError(f"staged failure on rank 1 at step {step}")
        if step == kill_at and comm.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == term_at and comm.rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # rank 1 alone asks to stop
        return 1e-2

    with stop_on_signals() as stop:
        history = train_model(model, train_loader, val_loader, optimizer, num_epochs=1, eval_freq=10, eval_iter=1,
                              grad_accum_steps=grad_accum, max_grad_norm=1.0, scheduler=schedule,
                              progress=False, log=None, stop_requested=stop, comm=optimizer.comm if zero else None,
                              max_steps=rank1_steps if rank1_steps is not None and comm.rank == 1 else None)
    return history, model, optimizer, snapshots


def save(path, history, model, snapshots=(), ranks_state_bytes=()) -> None:
    weights = {f"w:{name}": backend.to_host(p.data) for name, p in model.named_parameters()}
    np.savez(path, step_losses=np.array(history["step_losses"]), per_step=np.array(snapshots),
             state_bytes=np.array(ranks_state_bytes), **weights)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--drop-rate", type=float, default=0.0)
    p.add_argument("--fail-at", type=int)
    p.add_argument("--kill-at", type=int)
    p.add_argument("--term-at", type=int)
    p.add_argument("--perturb", action="store_true")
    p.add_argument("--rank1-steps", type=int)
    p.add_argument("--zero", action="store_true")
    p.add_argument("--device", default="cpu", help="fake-cuda: device arrays, collectives through the host")
    args = p.parse_args(argv)
    try:
        history, model, optimizer, snapshots = train(args.grad_accum, args.drop_rate, args.fail_at, args.kill_at,
                                                     args.perturb, args.rank1_steps, args.term_at, args.zero,
                                                     args.device)
    except (distributed.DistributedError, TrainingInterrupted) as e:
        what = "stopped" if isinstance(e, TrainingInterrupted) else "error"
        sys.stderr.write(f"worker: {what} (rank {distributed.current().rank}): {e}\n")  # one write: no interleaving
        sys.stderr.flush()
        return 3 if what == "stopped" else 2
    comm = distributed.get()
    ranks_state_bytes = comm.comm.allgather(state_bytes(optimizer)) if comm.world_size > 1 else [state_bytes(optimizer)]
    if comm.is_main:
        save(args.out, history, model, snapshots, ranks_state_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
