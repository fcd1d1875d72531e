"""The feature cache. The backbone is frozen and nothing is augmented, so every training image can
go through the backbone once and the flows train on the cached features (per scale, (N, C, h, w)
in dataset order); without the cache the features are extracted batch by batch."""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..models.backbones import check_finite, images_from_batch

logger = logging.getLogger(__name__)


def autocast(device: torch.device, amp: bool):
    """bfloat16 autocast on CUDA when ``amp``; a no-op context otherwise."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def build_feature_cache(model: nn.Module, loader: Iterable, n: int, *, device: torch.device,
                        cache_device: torch.device, amp: bool = False, check: bool = True,
                        progress: Callable = lambda it, **kw: it, what: str = "training images") -> List[Tensor]:
    """Run the ``n`` images that ``loader`` yields (in dataset order) through the frozen backbone
    once; returns per-scale tensors (n, C, h, w) on ``cache_device`` (bfloat16 under ``amp`` on CUDA).
    ``check`` raises naming the images whose features hold NaN/Inf."""
    cache: Optional[List[Tensor]] = None
    t0 = time.perf_counter()
    model.eval()
    pos = 0
    for batch in progress(loader, desc="extracting features"):
        images = images_from_batch(batch).to(device, non_blocking=True)
        with autocast(device, amp):
            feats = model.extract_features(images)
        if check:
            for i, f in enumerate(feats):
                check_finite(f, f"backbone features of scale {i} for {what} {pos}..{pos + len(images) - 1}")
        if cache is None:
            cache = [torch.empty((n, *f.shape[1:]), dtype=f.dtype, device=cache_device) for f in feats]
        for c, f in zip(cache, feats):
            c[pos:pos + f.shape[0]] = f.to(cache_device)
        pos += images.shape[0]
    if cache is None:
        raise ValueError("the training set is empty" if what == "training images" else f"no {what}")
    seconds = time.perf_counter() - t0
    nbytes = sum(c.numel() * c.element_size() for c in cache)
    logger.info("cached backbone features of %d %s (%.1f MiB on %s) in %.1f s", n, what, nbytes / 2**20,
                cache_device, seconds)
    return cache


def check_feature_cache(features: Sequence[Tensor], n: int, num_scales: Optional[int]) -> List[Tensor]:
    """Precomputed features checked against the dataset's length ``n`` and the model's scales."""
    feats = list(features)
    if not feats or any(f.dim() < 2 or f.shape[0] != n for f in feats):
        raise ValueError(f"features must be one (N, ...) tensor per scale with N = {n} (the training set), "
                         f"got shapes {[tuple(f.shape) for f in feats]}")
    expected = num_scales if num_scales is not None else len(feats)
    if len(feats) != expected:
        raise ValueError(f"the model has {expected} scales, got features for {len(feats)}")
    return feats


def cached_batches(cache: Sequence[Tensor], batches: Sequence[Tensor], device: torch.device) -> Iterable[List[Tensor]]:
    """The cached features of each batch of indices, moved to ``device``."""
    for idx in batches:
        yield [c[idx.to(c.device)].to(device, non_blocking=True) for c in cache]


def extracted_batches(model: nn.Module, loader: Iterable, device: torch.device,
                      amp: bool = False) -> Iterable[List[Tensor]]:
    """Features extracted batch by batch from the images ``loader`` yields."""
    for batch in loader:
        images = images_from_batch(batch).to(device, non_blocking=True)
        with autocast(device, amp):
            feats = model.extract_features(images)
        yield feats
