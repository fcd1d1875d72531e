"""What the trainer checks of a model (:func:`check_model`), and the held-out and training NLL in
nats per dimension, the numbers a user reads convergence and over-fitting from (and the trainer
chooses ``best.pt`` and stops by).

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

from ..models.protocol import TrainableFlow
from .distributed import broadcast_floats


#: what the trainer reads of a model: the TrainableFlow protocol and, for checkpoints and the epoch
#: statistics, ``bases`` (per-scale mu / log_sigma), ``backbone`` and ``trainable_state_dict``
MODEL_MEMBERS = tuple(sorted(set(TrainableFlow.__annotations__) | {
    name for name, value in vars(TrainableFlow).items() if callable(value) and not name.startswith("_")})) + (
    "bases", "backbone", "trainable_state_dict")


def check_model(model: nn.Module) -> None:
    """Raise TypeError naming what ``model`` lacks of :data:`MODEL_MEMBERS`."""
    missing = [name for name in MODEL_MEMBERS if not hasattr(model, name)]
    if missing:
        raise TypeError(f"{type(model).__name__} cannot be trained: it lacks {', '.join(missing)} (see "
                        f"altub_fast.models.protocol.TrainableFlow)")


def offers_nll(model: nn.Module) -> bool:
    """Can the model give per-image NLL in nats per dimension (a callable ``nll_per_dim``)?"""
    return callable(model.nll_per_dim)


def require_nll(model: nn.Module) -> None:
    """Raise unless the model can give per-image NLL in nats per dimension."""
    if not offers_nll(model):
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


def nll_record(model: nn.Module, heldout: Optional[Iterable[Sequence[Tensor]]],
               train: Optional[Iterable[Sequence[Tensor]]], world_size: int = 1,
               device: torch.device = torch.device("cpu")) -> dict:
    """{"heldout_nll", "train_nll"}: :func:`mean_nll` of the held-out and of the training feature
    batches (None where not given). Under DDP every rank computed the same; rank 0's numbers are
    everyone's, so that decisions taken from them agree."""
    held = None if heldout is None else mean_nll(model, heldout)
    trained = None if train is None else mean_nll(model, train)
    if world_size > 1:
        sent = broadcast_floats([float("nan") if v is None else v for v in (held, trained)], world_size, device)
        held, trained = [None if v is None else b for v, b in zip((held, trained), sent)]
    return {"heldout_nll": held, "train_nll": trained}


def fixed_subset(n: int, size: int, seed: int) -> List[int]:
    """``min(size, n)`` indices of ``range(n)``, sorted, chosen by ``seed`` alone."""
    if size >= n:
        return list(range(n))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) * 4099 + 3))
    return sorted(order[:size].tolist())


def format_nll(value: Optional[float]) -> str:
    return "-" if value is None else ("nan" if not math.isfinite(value) else f"{value:.4f}")
