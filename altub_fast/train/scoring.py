"""Scoring a whole dataset with a trained model: anomaly maps and image scores, batched."""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..models.backbones import images_from_batch


@torch.no_grad()
def predict(model: nn.Module, data, batch_size: int = 32, device: Optional[Union[str, torch.device]] = None,
            progress: bool = True, num_workers: int = 0, amp: bool = False) -> Dict[str, Any]:
    """Anomaly maps and scores of a whole dataset, batched.

    Returns {"maps": (N, H, W) float32, "scores": (N,) float32, "labels": (N,) or None,
    "masks": (N, 1, H, W) or None, "defects": list or None, "paths": list or None}, on the CPU.
    CFLOW-AD's maps are normalised by the maximum over the whole set (SPEC 4).
    """
    if isinstance(data, DataLoader):
        loader = data
    else:
        loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    model.to(device).eval()
    use_amp = amp and device.type == "cuda"
    parts, labels, masks, defects, paths = [], [], [], [], []
    for batch in tqdm(loader, desc="scoring", disable=not progress, dynamic_ncols=True):
        images = images_from_batch(batch).to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext():
            parts.append(model.partial_anomaly_map(images))
        if isinstance(batch, dict):
            if "label" in batch:
                labels.append(torch.as_tensor(batch["label"]).reshape(-1).cpu())
            if "mask" in batch:
                masks.append(torch.as_tensor(batch["mask"]).cpu())
            if "defect" in batch:
                defects.extend(list(batch["defect"]))
            if "path" in batch:
                paths.extend(list(batch["path"]))
        elif isinstance(batch, (tuple, list)) and len(batch) > 1 and torch.is_tensor(batch[1]):
            labels.append(batch[1].reshape(-1).cpu())
    maps, scores = model.combine_anomaly_maps(parts)
    return {"maps": maps.float().cpu(), "scores": scores.float().cpu(),
            "labels": torch.cat(labels) if labels else None, "masks": torch.cat(masks) if masks else None,
            "defects": defects or None, "paths": paths or None}
