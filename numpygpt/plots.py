"""The plots a run writes: the losses against steps (tokens or examples seen on the top axis),
and a recipe's metric (a classifier's accuracy, DPO's reward margin) against epochs or steps.

matplotlib's object API with the Agg canvas, never pyplot: no display is needed, and a
notebook's pyplot backend is left alone.
"""

from __future__ import annotations

__all__ = ["plot_losses", "plot_curves"]


def plot_curves(path, x, train, val, xlabel: str, ylabel: str, per_x: float = 0.0, seen: str = "Tokens seen",
                per_step=None) -> None:
    """One PNG: the training and validation ``ylabel`` against ``x``; ``per_step`` (optional):
    the value of every step, drawn faintly; ``per_x`` > 0: a top axis of ``seen`` (what one
    unit of x sees: every step sees as much, so the top axis is the bottom one relabelled)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.5, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if per_step:
        ax.plot(range(1, len(per_step) + 1), per_step, color="tab:blue", alpha=0.25, linewidth=0.8,
                label=f"Training {ylabel.lower()} (each step)")
    ax.plot(x, train, color="tab:blue", marker=".", label=f"Training {ylabel.lower()}")
    ax.plot(x, val, color="tab:orange", linestyle="-.", marker=".", label=f"Validation {ylabel.lower()}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole steps and epochs
    ax.legend(loc="best")
    if per_x:
        top = ax.secondary_xaxis("top", functions=(lambda s: s * per_x, lambda t: t / per_x))
        top.set_xlabel(seen)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)


def plot_losses(history: dict, path, seen: str = "Tokens seen") -> None:
    """Train and validation loss against steps (``train_model``'s history), with every step's
    loss faintly and what the steps saw (``tokens_seen``) on a top axis (PNG)."""
    n_steps, n_seen = history.get("global_step", 0), history.get("tokens_seen", 0)
    plot_curves(path, history["track_steps"], history["train_losses"], history["val_losses"], "Steps", "Loss",
                per_x=n_seen / n_steps if n_steps and n_seen else 0.0, seen=seen,
                per_step=history.get("step_losses") or [])
