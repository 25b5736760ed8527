"""What a run shows while it works: one progress bar, log lines printed above it, and the
rank that speaks under mpiexec.

    reporter = Reporter(total=400, enabled=True, log=print)
    reporter.step(loss=3.21, lr=1e-3)          # the bar moves, its postfix shows the loss
    reporter.say("Ep 1 (step 50/400): ...")    # a line above the bar, not through it
    reporter.close()

Every command (``train``, ``finetune classify``, ``finetune instruct``) and the training loop
report through this module, so the bar, the routing of ``print`` through ``tqdm.write`` and
the quiet ranks are written once.
"""

from __future__ import annotations

import sys

__all__ = ["Reporter", "progress_bar", "say", "interactive"]


def interactive() -> bool:
    """True when stderr is a terminal. A log file gets few redraws: each one is a line there."""
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def progress_bar(items=None, desc: str | None = None, enabled: bool = True, **kw):
    """A tqdm bar on stderr (over ``items``, or one to ``update`` by hand with ``total=``),
    redrawn seldom when stderr is a log file."""
    from tqdm.auto import tqdm

    kw.setdefault("unit", "entry")
    return tqdm(items, desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5 if interactive() else 30.0, **kw)


def say(msg: str = "", log=print) -> None:
    """``log(msg)`` on the main rank only (under mpiexec the other ranks keep quiet);
    ``log`` None says nothing. ``print`` flushes, so lines and bars keep their order."""
    from .distributed import current

    comm = current()
    if log is None or (comm is not None and not comm.is_main):
        return
    if log is print:
        print(msg, flush=True)
    else:
        log(msg)


class Reporter:
    """The training loop's bar and log lines.

    total, initial: optimiser steps of the run, and those already done (a resumed run).
    enabled: draw the bar. log: where lines go (``print`` is routed through ``tqdm.write``
    so the bar stays intact; None: silent). quiet: say nothing and draw nothing (the ranks
    other than 0 of a multi-process run).
    """

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, log=print, quiet: bool = False):
        self.log = None if quiet else log
        self.bar = progress_bar(total=total, initial=min(initial, total), enabled=enabled and not quiet, unit="step")

    def say(self, msg: str) -> None:
        if self.log is None:
            return
        if self.log is print:
            from tqdm.auto import tqdm

            tqdm.write(msg)  # above the bar instead of through it
        else:
            self.log(msg)

    def step(self, loss: float, lr: float | None = None) -> None:
        self.bar.update(1)
        postfix = {"loss": f"{loss:.3f}"}
        if lr is not None:
            postfix["lr"] = f"{lr:.2e}"
        self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        self.bar.close()
