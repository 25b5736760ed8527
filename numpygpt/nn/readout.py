"""Sequence readout: one position's hidden state per row, for a classification head."""

from __future__ import annotations

from .module import Module
from .. import backend
from ..config import READOUTS


class SequenceReadout(Module):
    r"""$y[b] = x[b, \text{pos}[b]]$: (B, T, C) -> (B, C).

    ``mode="last"``: pos[b] = T - 1 for every row (the book's classifier).
    ``mode="last_non_pad"``: pos[b] is the last position whose token id is not ``pad_id``,
    so a short text right-padded to the batch length is read at its own last token. The
    token ids must then be given: ``readout(x, idx)`` with idx (B, T).

    Backward: y is a selection, $y[b] = \sum_t [t = \text{pos}[b]]\, x[b, t]$, so

    $$dx[b, t] = \begin{cases} dy[b] & t = \text{pos}[b] \\ 0 & \text{otherwise} \end{cases}$$

    a scatter of the (B, C) gradient into zeros (B, T, C) at the read positions only.
    """

    def __init__(self, mode: str = "last", pad_id: int = 50256):
        if mode not in READOUTS:
            raise ValueError(f"readout must be one of {', '.join(READOUTS)}, got {mode!r}")
        self.mode = mode
        self.pad_id = int(pad_id)

    def positions(self, idx, T: int, xp):
        """(B,) index of the position read in each row."""
        if self.mode == "last":
            return None
        if idx is None:
            raise ValueError('readout="last_non_pad" needs the token ids: call readout(x, idx)')
        not_pad = idx != self.pad_id  # (B, T)
        if not bool(not_pad.any(axis=1).all()):
            row = int(xp.argmin(not_pad.any(axis=1)))
            raise ValueError(f"row {row} of the batch is all padding (pad_id={self.pad_id}): nothing to read")
        # the last True of each row: T - 1 - (first True of the reversed row)
        return T - 1 - xp.argmax(not_pad[:, ::-1], axis=1)  # (B,)

    def forward(self, x, idx=None):
        B, T, C = x.shape
        xp = backend.array_module(x)
        if idx is not None and tuple(idx.shape) != (B, T):
            raise ValueError(f"token ids have shape {tuple(idx.shape)}; the hidden states need {(B, T)}")
        pos = self.positions(idx, T, xp)
        self._save(pos=pos, shape=x.shape)
        if pos is None:
            return x[:, -1, :].copy()  # (B, C)
        return x[xp.arange(B), pos]  # (B, C)

    def backward(self, dout):
        cache = self._take()
        pos, (B, T, C) = cache["pos"], cache["shape"]
        xp = backend.array_module(dout)
        dx = xp.zeros((B, T, C), dtype=dout.dtype)
        if pos is None:
            dx[:, -1, :] = dout
        else:
            dx[xp.arange(B), pos] = dout  # one position per row: no repeats to accumulate
        return dx
