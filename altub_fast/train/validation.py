"""Held-out and training NLL in nats per dimension, the numbers a user reads convergence and
over-fitting from (and the trainer chooses ``best.pt`` and stops by).

Both come from the model's ``nll_per_dim(features) -> (B,)``: each image's negative log-likelihood
of its backbone features under the flow, divided by the number of feature dimensions (per image,
no gradient). The held-out NLL is its mean over the held-out normal images; the training NLL its
mean over a fixed subset of the training images, at the end of the epoch, in the same model state.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor


def require_nll(model: nn.Module) -> None:
    """Raise unless the model can give per-image NLL in nats per dimension."""
    if not callable(getattr(model, "nll_per_dim", None)):
        raise TypeError(f"{type(model).__name__} has no nll_per_dim(features) -> (B,) method: the held-out NLL "
                        f"(and best.pt, epochs='auto', calibration) needs it")


@torch.no_grad()
def nll_per_image(model: nn.Module, feature_batches: Iterable[Sequence[Tensor]]) -> Tensor:
    """Each image's NLL in nats per dimension, (N,) float64 on the CPU, over batches of per-scale
    features; the model is in eval mode meanwhile (and returned to its previous mode)."""
    was_training = model.training
    model.eval()
    try:
        parts: List[Tensor] = [model.nll_per_dim(list(f)).detach().double().cpu().reshape(-1)
                               for f in feature_batches]
    finally:
        model.train(was_training)
    if not parts:
        raise ValueError("no images to compute the NLL of")
    return torch.cat(parts)


def mean_nll(model: nn.Module, feature_batches: Iterable[Sequence[Tensor]]) -> float:
    """The mean NLL (nats per dimension) over the images; NaN if any image's NLL is not finite."""
    nll = nll_per_image(model, feature_batches)
    return float(nll.mean()) if bool(torch.isfinite(nll).all()) else float("nan")


def fixed_subset(n: int, size: int, seed: int) -> List[int]:
    """``min(size, n)`` indices of ``range(n)``, sorted, chosen by ``seed`` alone."""
    if size >= n:
        return list(range(n))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) * 4099 + 3))
    return sorted(order[:size].tolist())


def format_nll(value: Optional[float]) -> str:
    return "-" if value is None else ("nan" if not math.isfinite(value) else f"{value:.4f}")
