"""Which images each update sees: the training data's dataset and loader settings, the seeded
per-epoch permutation (sharded over DDP ranks), and the DataLoader that reads those batches."""
from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset


def dataset_of(data) -> Tuple[Dataset, Optional[int], int, Any]:
    """(dataset, batch size or None, workers, collate_fn or None) of a Dataset or DataLoader."""
    if isinstance(data, DataLoader):
        return data.dataset, data.batch_size, data.num_workers, data.collate_fn
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        return data, None, 0, None
    raise TypeError(f"training data must be a Dataset or a DataLoader, got {type(data).__name__}")


def epoch_batches(n: int, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True, rank: int = 0,
                  world_size: int = 1, drop_last: bool = False) -> List[Tensor]:
    """This rank's batches of dataset indices for ``epoch`` (0-based): a permutation seeded by
    (seed, epoch), padded and strided over ranks like DistributedSampler."""
    if shuffle:
        g = torch.Generator().manual_seed(int(seed) * 100_003 + epoch)
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    if world_size > 1:
        total = math.ceil(n / world_size) * world_size
        if total > n:
            reps = math.ceil((total - n) / n)
            order = torch.cat([order, order.repeat(reps)[: total - n]])
        order = order[rank::world_size]
    batches = list(order.split(batch_size))
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches = batches[:-1]
    return batches


def make_loader(dataset, batch_sampler, seed: int, *, num_workers: int = 0, pin_memory: bool = False,
                collate_fn=None) -> DataLoader:
    """A DataLoader over ``batch_sampler`` (lists of indices). It has its own generator: worker
    seeds depend on ``seed`` only, and the global RNG is untouched."""
    kw = dict(num_workers=num_workers, pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed))
    if collate_fn is not None:
        kw["collate_fn"] = collate_fn
    return DataLoader(dataset, batch_sampler=batch_sampler, **kw)
