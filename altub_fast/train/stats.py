"""What an epoch reports: its updates' losses and counts (EpochTally), per-channel statistics of z,
the base's mu and sigma per scale, the one-line summary logged after each epoch, and the JSONL
log's line."""
from __future__ import annotations

import json
import os
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


class EpochTally:
    """What one epoch's updates add up to: the summed losses of all, ordinary (flow) and base-only
    updates, their counts, the skipped updates, the images seen and the z statistics (``zstats``,
    None for none). Under DDP, :meth:`all_reduce` makes the losses means over all ranks' updates
    and the images the total; the counts stay this rank's (the same on every rank)."""

    def __init__(self, zstats: Optional[ZStats] = None):
        self.sums = {"all": 0.0, "flow": 0.0, "base": 0.0}
        self.counts = {"all": 0, "flow": 0, "base": 0, "skipped": 0}
        self.images = 0
        self.zstats = zstats

    def add(self, out: dict) -> None:
        """One update's result (``AltUBTrainer.update``'s dict)."""
        if out["skipped"]:
            self.counts["skipped"] += 1
            return
        kind = "base" if out["base_only"] else "flow"
        for key in ("all", kind):
            self.sums[key] += out["loss"]
            self.counts[key] += 1
        if self.zstats is not None:
            self.zstats.update(out["z"])

    def mean(self, kind: str) -> float:
        """The mean loss of ``kind`` ("all", "flow" or "base") updates; NaN where there were none."""
        return self.sums[kind] / self.counts[kind] if self.counts[kind] else float("nan")

    def all_reduce(self, world_size: int, device: torch.device) -> None:
        c = self.counts
        t = torch.tensor([self.sums["all"], self.sums["flow"], self.sums["base"], c["all"], c["flow"], c["base"],
                          c["skipped"], self.images], dtype=torch.float64,
                         device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        self.sums = {"all": float(t[0]) / world_size, "flow": float(t[1]) / world_size,
                     "base": float(t[2]) / world_size}
        self.images = int(t[7])
        if self.zstats is not None:
            self.zstats.all_reduce()

    def losses(self) -> dict:
        """The epoch record's losses and counts."""
        c = self.counts
        return {"loss": self.mean("all"), "loss_flow_updates": self.mean("flow"),
                "loss_base_only_updates": self.mean("base"), "updates": c["all"], "flow_updates": c["flow"],
                "base_only_updates": c["base"], "skipped_updates": c["skipped"]}


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


def append_jsonl(path: str, record: dict) -> None:
    """Append ``record`` as one JSON line to ``path`` (creating its folder)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
