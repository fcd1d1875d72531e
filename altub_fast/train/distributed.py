"""DistributedDataParallel: process-group set-up from torchrun's environment, what DDP wraps, and
the collective decisions every rank must take alike."""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn


def setup_distributed(backend: Optional[str] = None) -> Tuple[int, int, int]:
    """(rank, world_size, local_rank); initialises the default process group from torchrun's
    environment (WORLD_SIZE > 1) if nothing has yet. NCCL on CUDA, gloo otherwise."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local_rank
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available")
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
        return dist.get_rank(), dist.get_world_size(), local_rank
    return 0, 1, local_rank


def pick_device(requested: Optional[str], world_size: int, local_rank: int) -> torch.device:
    """``requested``, else this process's GPU (its LOCAL_RANK under DDP), else the CPU."""
    if requested is not None:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
    return torch.device("cpu")


class StepModule(nn.Module):
    """What DistributedDataParallel wraps: one ordinary update's forward (loss and z)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, unit):
        return self.model.step_loss(unit)


def all_true(flag: bool, world_size: int, device: torch.device) -> bool:
    """``flag`` on every rank (a MIN all-reduce; just ``flag`` without DDP)."""
    if world_size == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def broadcast_floats(values: List[float], world_size: int, device: torch.device) -> List[float]:
    """Rank 0's ``values`` on every rank (so that decisions taken from them agree)."""
    if world_size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.broadcast(t, src=0)
    return [float(v) for v in t.tolist()]


def mean_over_ranks(tensors: List[torch.Tensor], world_size: int) -> List[torch.Tensor]:
    """The mean of each tensor over the ranks (one flat all-reduce; ``tensors`` themselves without DDP)."""
    if world_size == 1:
        return list(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size
    return [piece.view(t.shape) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
