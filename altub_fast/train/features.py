"""The feature source: what the flows train and are measured on, as batches of per-scale backbone
features: the training images (one epoch's batches at a time), the held-out images, and the
fixed subset of training images the training NLL is measured on. Each comes from a cache built
once (the backbone is frozen and nothing is augmented) or is extracted batch by batch; both give
the same features. Every loader is made in one place (:meth:`FeatureSource.loader`).

The tensor-level pieces (building and checking a cache, reading it, extracting) are in cache.py.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, List, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .batches import make_loader
from .cache import build_feature_cache, cached_batches, check_feature_cache, extracted_batches
from .validation import fixed_subset

Batches = Iterable[List[Tensor]]


def index_batches(n: int, batch_size: int) -> List[Tensor]:
    """``range(n)`` in consecutive batches of ``batch_size`` indices (the last one shorter)."""
    return list(torch.arange(n).split(int(batch_size)))


class FeatureSource:
    """Batches of backbone features for the trainer (see the module docstring).

    ``model``: what ``extract_features(images)`` and ``num_scales`` come from. ``batch_size``: the
    batch of extraction and of the held-out/NLL batches (the trainer's ``extract_batch_size``,
    else its batch size). ``seed`` and ``rank`` seed the loaders' generators (worker seeds only;
    the global RNG is untouched). ``progress(iterable=..., total=..., desc=...)`` wraps a cache's
    extraction loop (a tqdm factory). Call :meth:`use` before asking for batches.
    """

    def __init__(self, model, *, device: torch.device, batch_size: int, seed: int, rank: int = 0,
                 num_workers: int = 0, collate_fn=None, amp: bool = False, check_finite: bool = True,
                 cache_device: Optional[torch.device] = None, progress: Callable = lambda iterable, **kw: iterable):
        self.model = model
        self.device = device
        self.batch_size = int(batch_size)
        self.seed, self.rank = int(seed), int(rank)
        self.num_workers, self.collate_fn = num_workers, collate_fn
        self.amp, self.check_finite = amp, check_finite
        self.cache_device = cache_device if cache_device is not None else device
        self.progress = progress
        self.train_set: Optional[Dataset] = None
        self.heldout_set: Optional[Dataset] = None
        self.train_cache: Optional[List[Tensor]] = None
        self.heldout_cache: Optional[List[Tensor]] = None
        self.cache_seconds: Optional[float] = None

    def use(self, train_set: Dataset, heldout_set: Optional[Dataset]) -> None:
        """Read from these images from now on (forgetting caches built for others)."""
        if len(train_set) == 0:
            raise ValueError("the training set is empty")
        self.train_set, self.heldout_set = train_set, heldout_set
        self.train_cache = self.heldout_cache = None

    # ------------------------------------------------------------------ the one loader factory
    def loader(self, dataset: Dataset, batches: Sequence[Tensor], seed: int) -> DataLoader:
        """A DataLoader over ``dataset`` reading ``batches`` (tensors of indices) in order."""
        return make_loader(dataset, [b.tolist() for b in batches], seed, num_workers=self.num_workers,
                           pin_memory=self.device.type == "cuda", collate_fn=self.collate_fn)

    def _batches(self, dataset: Dataset, cache: Optional[List[Tensor]], batches: Sequence[Tensor],
                 seed: int) -> Batches:
        if cache is not None:
            return cached_batches(cache, batches, self.device)
        return extracted_batches(self.model, self.loader(dataset, batches, seed), self.device, self.amp)

    def _build(self, dataset: Dataset, what: str) -> List[Tensor]:
        batches = index_batches(len(dataset), self.batch_size)
        return build_feature_cache(
            self.model, self.loader(dataset, batches, self.seed), len(dataset), device=self.device,
            cache_device=self.cache_device, amp=self.amp, check=self.check_finite, what=what,
            progress=lambda it, **kw: self.progress(iterable=it, total=len(batches), **kw))

    def _require_heldout(self) -> Dataset:
        if self.heldout_set is None:
            raise ValueError("no held-out images (give heldout= or heldout_fraction > 0)")
        return self.heldout_set

    # ------------------------------------------------------------------ caches
    def build_train_cache(self) -> List[Tensor]:
        """Every training image through the frozen backbone once: per-scale (N, C, h, w) in dataset
        order, on ``cache_device`` (bfloat16 under ``amp`` on CUDA)."""
        t0 = time.perf_counter()
        self.train_cache = self._build(self.train_set, "training images")
        self.cache_seconds = time.perf_counter() - t0
        return self.train_cache

    def set_train_cache(self, features: Sequence[Tensor]) -> None:
        """Use precomputed features of the whole training set (checked against its length and the
        model's scales)."""
        feats = check_feature_cache(features, len(self.train_set), self.model.num_scales)
        self.train_cache = [f.to(self.cache_device) for f in feats]

    def build_heldout_cache(self) -> List[Tensor]:
        """The held-out images' features, extracted once."""
        self.heldout_cache = self._build(self._require_heldout(), "held-out images")
        return self.heldout_cache

    # ------------------------------------------------------------------ batches
    def train_batches(self, batches: Sequence[Tensor], epoch: int) -> Batches:
        """The features of the training images in ``batches`` (indices into the training set) of
        epoch ``epoch`` (0-based; it seeds the loader with the rank)."""
        seed = (self.seed * 100_003 + epoch) * 1009 + self.rank
        return self._batches(self.train_set, self.train_cache, batches, seed)

    def heldout_batches(self) -> Batches:
        """The held-out images' features, batch by batch, in order."""
        held = self._require_heldout()
        return self._batches(held, self.heldout_cache, index_batches(len(held), self.batch_size), self.seed)

    def train_nll_batches(self, n_images: int) -> Batches:
        """The fixed subset of ``n_images`` training images the training NLL is measured on
        (validation.fixed_subset), batch by batch."""
        idx = torch.tensor(fixed_subset(len(self.train_set), int(n_images), self.seed))
        return self._batches(self.train_set, self.train_cache, list(idx.split(self.batch_size)), self.seed)
