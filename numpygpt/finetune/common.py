"""What the fine-tuning commands share: the LoRA flags and their checks, loading the model
to fine-tune, and the output that every command ends with.

``finetune classify``, ``finetune instruct`` (and ``finetune dpo``) take ``--lora-rank`` and
``--lora-alpha`` from ``LoRAOptions``, so the two flags mean the same, and fail the same way,
everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..options import POSITIVE_INT, Check, Options, option

__all__ = ["LoRAOptions", "AT_LEAST_ONE"]

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
