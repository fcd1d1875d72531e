"""Scoring images with a trained model: a batch (:class:`Scorer`) or a whole dataset (:func:`score_dataset`).

:class:`Scorer` is the one object between "images" and "(maps, scores)". Its ``score(images)``
runs ``model.anomaly_map`` on ``device`` without gradients; ``input_normalised`` says which images
it takes (True: ImageNet-normalised, as :func:`~altub_fast.inference.images.read_images` gives them
by default) and ``read(files)`` reads files that way. The scorer of an exported runtime
(:class:`~altub_fast.inference.runtime_scorer.RuntimeScorer`: ONNX Runtime or OpenVINO, whose
graph holds the normalisation) replaces ``score`` and may set ``input_normalised = False``; the
callers (predict, eval) do not change. ``info`` says which runtime scores.

:func:`score_dataset` (formerly ``altub_fast.train.predict``, still importable under that name)
scores every batch of a Dataset or DataLoader through ``model.partial_anomaly_map`` (or a given
scorer's ``partial``) and combines the parts at the end (``model.combine_anomaly_maps``; for both
models today every map is per image and the parts are concatenated), collecting labels, masks,
defect names and paths on the way.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..models.backbones import images_from_batch
from .images import ImageBatch, read_images

__all__ = ["Scorer", "score_dataset"]

Device = Union[str, torch.device]


class Scorer:
    """``maps, scores = Scorer(model).score(images)``: (B, H, W) anomaly maps and (B,) image scores.

    ``device``: where the images are sent (default: the model's parameters' device; the model is not
    moved). ``amp``: bfloat16 autocast, on CUDA only. ``image_size``: the model's (H, W).
    """

    input_normalised = True   # score() takes ImageNet-normalised images

    def __init__(self, model: nn.Module, device: Optional[Device] = None, amp: bool = False):
        self.model = model
        self.device = torch.device(device) if device is not None else next(
            (p.device for p in model.parameters()), torch.device("cpu"))
        self.amp = amp and self.device.type == "cuda"
        self.image_size: Tuple[int, int] = tuple(int(v) for v in model.image_size)
        # which runtime scores (RuntimeScorer keeps the same record for its export and its check)
        self.info: Dict[str, Any] = {"requested": "torch", "runtime": "torch", "version": torch.__version__,
                                     "exports": {}, "check": None, "note": None}

    def prepare(self, size_hw: Optional[Sequence[int]] = None) -> bool:
        """Make ready to score inputs of ``size_hw``: nothing to do for eager PyTorch (False);
        an exported runtime's scorer builds or loads its graph here."""
        return False

    def read(self, files: Sequence[str]) -> ImageBatch:
        """The files as :meth:`score` takes them (see :func:`~altub_fast.inference.images.read_images`)."""
        return read_images(files, self.image_size, normalise=self.input_normalised)

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()

    @torch.no_grad()
    def score(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(maps (B, H, W), scores (B,)) of a batch, on ``device`` (``model.anomaly_map``)."""
        with self._autocast():
            return self.model.anomaly_map(images.to(self.device, non_blocking=True))

    @torch.no_grad()
    def partial(self, images: torch.Tensor):
        """The model's per-batch part of a whole-set score (``model.partial_anomaly_map``)."""
        with self._autocast():
            return self.model.partial_anomaly_map(images.to(self.device, non_blocking=True))

    def combine(self, parts: List[Any]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(maps, scores) of the whole set from its batches' parts (``model.combine_anomaly_maps``)."""
        return self.model.combine_anomaly_maps(parts)


class _BatchInfo:
    """Labels, masks, defect names and paths collected from the batches of a dataset."""

    def __init__(self) -> None:
        self.labels: List[torch.Tensor] = []
        self.masks: List[torch.Tensor] = []
        self.defects: List[str] = []
        self.paths: List[str] = []

    def add(self, batch) -> None:
        if isinstance(batch, dict):
            if "label" in batch:
                self.labels.append(torch.as_tensor(batch["label"]).reshape(-1).cpu())
            if "mask" in batch:
                self.masks.append(torch.as_tensor(batch["mask"]).cpu())
            if "defect" in batch:
                self.defects.extend(list(batch["defect"]))
            if "path" in batch:
                self.paths.extend(list(batch["path"]))
        elif isinstance(batch, (tuple, list)) and len(batch) > 1 and torch.is_tensor(batch[1]):
            self.labels.append(batch[1].reshape(-1).cpu())


@torch.no_grad()
def score_dataset(model: nn.Module, data, batch_size: int = 32, device: Optional[Device] = None,
                  progress: bool = True, num_workers: int = 0, amp: bool = False,
                  scorer: Optional[Scorer] = None) -> Dict[str, Any]:
    """Anomaly maps and scores of a whole dataset, batched.

    Returns {"maps": (N, H, W) float32, "scores": (N,) float32, "labels": (N,) or None,
    "masks": (N, 1, H, W) or None, "defects": list or None, "paths": list or None}, on the CPU.
    The model is moved to ``device`` (default: its parameters' device) and put in eval mode.
    ``scorer``: the :class:`Scorer` to use (e.g. :func:`~altub_fast.inference.make_scorer`'s, fed
    the dataset's normalised images); default eager PyTorch on ``device``.
    """
    if isinstance(data, DataLoader):
        loader = data
    else:
        loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    scorer = scorer if scorer is not None else Scorer(model, device, amp)
    model.to(scorer.device).eval()
    parts, info = [], _BatchInfo()
    for batch in tqdm(loader, desc="scoring", disable=not progress, dynamic_ncols=True):
        parts.append(scorer.partial(images_from_batch(batch)))
        info.add(batch)
    maps, scores = scorer.combine(parts)
    return {"maps": maps.float().cpu(), "scores": scores.float().cpu(),
            "labels": torch.cat(info.labels) if info.labels else None,
            "masks": torch.cat(info.masks) if info.masks else None,
            "defects": info.defects or None, "paths": info.paths or None}
