"""What the fine-tuning commands share: the LoRA flags and their checks, loading the model
to fine-tune, and the output that every command ends with.

``finetune classify``, ``finetune instruct`` (and ``finetune dpo``) take ``--lora-rank`` and
``--lora-alpha`` from ``LoRAOptions``, so the two flags mean the same, and fail the same way,
everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..options import POSITIVE_INT, Check, Options, option

__all__ = ["LoRAOptions", "AT_LEAST_ONE", "check_split", "trainable_adamw", "planned_steps"]

AT_LEAST_ONE = Check(int, lambda v: v >= 1, "must be >= 1, got {}")
POSITIVE_ALPHA = Check(float, lambda v: v > 0, "must be > 0, got {}")


@dataclass
class LoRAOptions(Options):
    """``--lora-rank R`` trains rank-R adapters on every linear layer instead of the weights;
    ``--lora-alpha A`` scales them by A / R (default A = R)."""

    lora_rank: int | None = option(None, "train LoRA adapters of rank R instead of the weights", check=POSITIVE_INT,
                                   metavar="R")
    lora_alpha: float | None = option(None, "LoRA scale alpha / rank (default alpha = rank)", check=POSITIVE_ALPHA,
                                      metavar="A")

    def check_more(self) -> None:
        if self.lora_rank is None and self.lora_alpha is not None:
            raise ValueError("--lora-alpha needs --lora-rank")

    @property
    def alpha(self) -> float | None:
        """The LoRA scale's alpha (the rank when not given); None without LoRA."""
        if self.lora_rank is None:
            return None
        return float(self.lora_alpha) if self.lora_alpha is not None else float(self.lora_rank)


def check_split(source, splits, batch_size: int, what: str = "entries"):
    """(train, test, val) as given, after checking that the training split fills a batch and that
    there is a validation split; ValueError naming ``source`` otherwise."""
    train_data, test_data, val_data = splits
    if len(train_data) < batch_size:
        raise ValueError(f"{source}: the training split has {len(train_data)} {what}, fewer than the batch size "
                         f"{batch_size}: use more entries or a smaller batch size")
    if not val_data:
        n = len(train_data) + len(test_data) + len(val_data)
        raise ValueError(f"{source}: {n} entries leave no validation {what} "
                         "(the split is 85% train, 10% test, the rest validation)")
    return train_data, test_data, val_data


def trainable_adamw(model, lr: float, weight_decay: float):
    """AdamW over the model's trainable parameters (weight decay on every one, as the book's
    ``torch.optim.AdamW(model.parameters())``)."""
    from ..optim import AdamW

    return AdamW([(name, p) for name, p in model.named_parameters() if p.requires_grad], lr=lr,
                 weight_decay=weight_decay)


def planned_steps(n_batches: int, grad_accum: int, epochs: int, max_steps: int | None) -> tuple[int, int]:
    """(optimiser steps of the run, steps per epoch), as ``train_model`` will take them."""
    per_epoch = n_batches // grad_accum
    total = epochs * per_epoch
    return (total if max_steps is None else min(max_steps, total)), per_epoch
