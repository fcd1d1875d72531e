"""What an epoch reports: per-channel statistics of z, the base's mu and sigma per scale, and the
one-line summary logged after each epoch."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from .validation import format_nll


def channel_dims(z: Tensor) -> Tuple[int, ...]:
    return tuple(d for d in range(z.dim()) if d != 1)


class ZStats:
    """Per-channel running sums of z (float64) over an epoch, per scale."""

    def __init__(self, channels: Sequence[int], device):
        self.n = torch.zeros(len(channels), dtype=torch.float64, device=device)
        self.s = [torch.zeros(c, dtype=torch.float64, device=device) for c in channels]
        self.ss = [torch.zeros(c, dtype=torch.float64, device=device) for c in channels]

    @torch.no_grad()
    def update(self, zs: Sequence[Optional[Tensor]]) -> None:
        for i, z in enumerate(zs):
            if z is None:
                continue
            z = z.detach().double()
            dims = channel_dims(z)
            self.s[i] += z.sum(dims)
            self.ss[i] += (z * z).sum(dims)
            self.n[i] += z.numel() // z.shape[1]

    def all_reduce(self) -> None:
        flat = torch.cat([self.n, *self.s, *self.ss])
        dist.all_reduce(flat)
        k = len(self.s)
        self.n = flat[:k]
        off = k
        for i in range(k):
            c = self.s[i].numel()
            self.s[i] = flat[off:off + c]
            off += c
        for i in range(k):
            c = self.ss[i].numel()
            self.ss[i] = flat[off:off + c]
            off += c

    def summary(self, i: int) -> dict:
        n = float(self.n[i])
        if n == 0:
            return {}
        mean = self.s[i] / n
        std = (self.ss[i] / n - mean * mean).clamp_min(0).sqrt()
        return {"z_mean_abs": float(mean.abs().mean()), "z_mean_min": float(mean.min()),
                "z_mean_max": float(mean.max()), "z_std_mean": float(std.mean()),
                "z_std_min": float(std.min()), "z_std_max": float(std.max())}



@torch.no_grad()
def scale_stats(model: nn.Module, zstats: Optional[ZStats] = None) -> List[dict]:
    """Per scale: mu and sigma (mean/min/max) of the base, and the per-channel mean and std of
    z over the epoch's training data (mean |mean_c|, mean std_c, ...)."""
    out = []
    for i, base in enumerate(model.bases):
        mu = base.mu.detach().float()
        sigma = base.log_sigma.detach().float().exp()
        rec = {"mu_mean": float(mu.mean()), "mu_min": float(mu.min()), "mu_max": float(mu.max()),
               "sigma_mean": float(sigma.mean()), "sigma_min": float(sigma.min()), "sigma_max": float(sigma.max())}
        if zstats is not None:
            rec.update(zstats.summary(i))
        out.append(rec)
    return out


def format_record(r: dict) -> str:
    """One epoch's record as the line the trainer logs."""
    s = (f"epoch {r['epoch']}: loss {r['loss']:.5g} ({r['updates']} updates, {r['base_only_updates']} base-only, "
         f"{r['skipped_updates']} skipped) lr {r['lr']:.3g} {r['time_s']:.1f}s {r['images_per_s']:.1f} img/s")
    for i, sc in enumerate(r["scales"]):
        s += (f" | scale {i}: mu [{sc['mu_min']:.3g}, {sc['mu_mean']:.3g}, {sc['mu_max']:.3g}]"
              f" sigma [{sc['sigma_min']:.3g}, {sc['sigma_mean']:.3g}, {sc['sigma_max']:.3g}]")
        if "z_mean_abs" in sc:
            s += f" z: mean|mean_c| {sc['z_mean_abs']:.3g} mean std_c {sc['z_std_mean']:.3g}"
    if r.get("train_nll") is not None or r.get("heldout_nll") is not None:
        s += (f" | NLL nats/dim: train {format_nll(r.get('train_nll'))}"
              f" held-out {format_nll(r.get('heldout_nll'))}")
    return s


def progress_text(r: dict) -> str:
    """What the epochs' progress bar shows after an epoch: loss and NLLs (nats per dimension)."""
    parts = [f"loss {r['loss']:.4g}"]
    if r.get("train_nll") is not None:
        parts.append(f"train NLL {format_nll(r['train_nll'])}")
    if r.get("heldout_nll") is not None:
        parts.append(f"held-out NLL {format_nll(r['heldout_nll'])}")
    return ", ".join(parts) + (" nats/dim" if len(parts) > 1 else "")
