"""The ImageNet normalisation, defined once: its constants and the two directions of it.

Every pretrained backbone here expects RGB images in [0, 1] shifted and scaled per channel by
ImageNet's mean and standard deviation. The datasets (``data/mvtec.py``), the backbones
(``models/backbones.py``), the exported graph (``export.py``) and the overlays (``viz.py``) all
take the constants from this file, so there is one set of them.

    from altub_fast.imagenet import IMAGENET_MEAN, IMAGENET_STD, normalise, denormalise

    x = normalise(images)          # (..., 3, H, W) in [0, 1] -> ImageNet-normalised
    images = denormalise(x)        # back, clipped to [0, 1]

This file depends on torch only, so any layer (data, models, inference) may import it.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "normalise", "denormalise"]

IMAGENET_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)


def _per_channel(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """``values`` as a (3, 1, 1) tensor with ``like``'s dtype and device (broadcasts over (..., 3, H, W))."""
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).view(3, 1, 1)


def normalise(image: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """``(image - mean) / std`` per channel on a (..., 3, H, W) tensor in [0, 1] (a new tensor)."""
    return (image - _per_channel(mean, image)) / _per_channel(std, image)


def denormalise(image: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Undo :func:`normalise` on a (..., 3, H, W) tensor; the result is clipped to [0, 1] (a new tensor)."""
    return (image * _per_channel(std, image) + _per_channel(mean, image)).clamp_(0.0, 1.0)
