"""Choosing a checkpoint and when to stop, without labels: by the held-out NLL (nats per dimension)
of each epoch's record (validation.py).

- ``best.pt`` is the epoch with the lowest held-out NLL so far (the first one on ties);
  :func:`selection` says which epoch each checkpoint holds and why (stored in every checkpoint).
- ``epochs="auto"`` stops after epoch n when n >= ``max_epochs``, or when n >= ``min_epochs`` and the
  held-out NLL has not improved by more than ``min_delta`` on its best value for ``patience``
  epochs. Both decisions are functions of the history alone, so a resumed run decides as the
  uninterrupted one would have.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

KEY = "heldout_nll"


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)


def best_epoch(history: Sequence[dict], min_delta: float = 0.0) -> Optional[Tuple[int, float]]:
    """(epoch, held-out NLL) of the best epoch: the lowest NLL, where a later epoch counts as
    better only if it is lower by more than ``min_delta``; None while no epoch has a finite one."""
    best: Optional[Tuple[int, float]] = None
    for r in history:
        v = r.get(KEY)
        if _finite(v) and (best is None or v < best[1] - min_delta):
            best = (int(r["epoch"]), float(v))
    return best


def stop_reason(history: Sequence[dict], *, patience: int, min_epochs: int, max_epochs: int,
                min_delta: float = 0.0) -> Optional[str]:
    """Why training should stop after the last epoch of ``history``, or None to go on."""
    n = len(history)
    if n >= max_epochs:
        return f"reached max_epochs={max_epochs}"
    if n < min_epochs or n == 0:
        return None
    best = best_epoch(history, min_delta)
    last = int(history[-1]["epoch"])
    if best is None:
        return (f"the held-out NLL was not finite in any of the last {patience} epochs"
                if n >= patience else None)
    if last - best[0] >= patience:
        return (f"the held-out NLL did not improve for {last - best[0]} epochs (patience {patience}) on "
                f"epoch {best[0]}'s {best[1]:.5g} nats/dim")
    return None


def selection(history: Sequence[dict], epoch: int, stopped: Optional[str]) -> dict:
    """Which epoch each checkpoint holds and why, after ``epoch`` epochs of ``history``:
    {"best": {...} or None, "last": {...}, "stopped": why training stopped (None while it runs)}."""
    best = best_epoch(history)
    last_nll = history[-1].get(KEY) if history else None
    return {
        "criterion": "lowest held-out NLL (nats per dimension); no label is used",
        "best": None if best is None else {
            "epoch": best[0], "heldout_nll": best[1],
            "why": f"lowest held-out NLL ({best[1]:.5g} nats/dim) of epochs 1-{epoch}"},
        "last": {"epoch": epoch, "heldout_nll": last_nll,
                 "why": f"the last epoch trained ({stopped or 'training not finished'})"},
        "stopped": stopped,
    }
