"""The checks the models, the trainer and the inference layer share: :class:`NonFiniteError` (SPEC 6)
and where it came from, and finding the images in a batch."""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor


class NonFiniteError(FloatingPointError):
    """A NaN or Inf appeared in features, flow outputs, a loss or an anomaly map (SPEC 6)."""


def check_finite(t: Tensor, what: str) -> None:
    """Raise :class:`NonFiniteError` naming ``what`` if ``t`` holds a NaN or Inf."""
    if not bool(torch.isfinite(t).all()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise NonFiniteError(f"{what} is not finite: {n_nan} NaN and {n_inf} Inf of {t.numel()} values "
                             f"(shape {tuple(t.shape)}, dtype {t.dtype})")


def nonfinite_flow_parts(where: str, z: Tensor, log_jac_det: Tensor, base) -> List[str]:
    """Which of a flow's outputs and base parameters hold NaN/Inf, as phrases naming ``where``
    (e.g. "scale 1"); used to explain a non-finite loss or map."""
    parts = []
    if not bool(torch.isfinite(z).all()):
        parts.append(f"flow output z of {where} holds NaN/Inf")
    if not bool(torch.isfinite(log_jac_det).all()):
        parts.append(f"log-det of {where} holds NaN/Inf")
    if not (bool(torch.isfinite(base.mu).all()) and bool(torch.isfinite(base.log_sigma).all())):
        parts.append(f"base of {where} (mu/log sigma) holds NaN/Inf")
    return parts


def images_from_batch(batch) -> Tensor:
    """The image tensor of a batch: a dict's ``"image"``, a tuple/list's first item, or a tensor."""
    if torch.is_tensor(batch):
        return batch
    if isinstance(batch, dict):
        if "image" not in batch:
            raise KeyError(f"a dict batch needs an 'image' key, got keys {sorted(batch)}")
        return batch["image"]
    if isinstance(batch, (tuple, list)) and len(batch) > 0 and torch.is_tensor(batch[0]):
        return batch[0]
    raise TypeError(f"cannot find images in a batch of type {type(batch).__name__}; give tensors, "
                    "tuples whose first item is the image tensor, or dicts with an 'image' key")
