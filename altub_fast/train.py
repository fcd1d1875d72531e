"""Training with AltUB's alternating schedule (SPEC section 2), checkpoints, DDP, inference.

    from altub_fast.models import build_model
    from altub_fast.train import AltUBTrainer, predict

    model = build_model("fastflow", "wide_resnet50_2", image_size=256, altub=True)
    trainer = AltUBTrainer(model, train_dataset, epochs=500, batch_size=32, checkpoint_dir="runs/carpet")
    history = trainer.fit()                  # list of per-epoch dicts (also logged, optionally JSONL)
    result = predict(model, test_dataset)    # {"maps": (N, H, W), "scores": (N,), "labels", "masks", ...}

The schedule. Updates are numbered u = 1, 2, ... (one per image batch for FastFlow, one per fiber
batch for CFLOW-AD). With ``altub=True``, update u is *base-only* when u > warmup and u % k == 0
(``unit="step"``; with ``unit="epoch"`` the same rule applies to the 1-based epoch number and every
update of such an epoch is base-only). Ordinary updates step the flow optimiser (Adam; FastFlow lr
1e-3, weight decay 1e-5; CFLOW-AD lr 2e-4) on theta_flow and on theta_base, the latter in its own
parameter group with weight decay 0. Base-only updates run the flow without a graph, leave the flow
optimiser (and its state) untouched, clip the base gradients by value (100) and step a separate
base optimiser (SGD; or Adam) with lr = r * the flow optimiser's current lr (r = 5). These follow
the code of the AltUB paper's first author (``(epoch+1) % ALTUB_EPOCH == 0 and (epoch+1) >
SCHEDULER_T_0``); every constant is a knob. ``altub=False`` models train as the plain baselines.

The feature cache. The backbone is frozen and nothing is augmented, so by default
(``cache_features=True``) every training image goes through the backbone once and the flows train
on the cached features.

Data: a Dataset or DataLoader yielding image tensors, tuples whose first item is the image tensor,
or dicts with an ``"image"`` key (``altub_fast.data.MVTecAD``). A DataLoader's dataset, batch size,
workers and collate function are used; its sampler is replaced by the trainer's seeded sampler
(the permutation of epoch e depends only on (seed, e)), which makes resuming exact and shards the
data under DDP like DistributedSampler.

DDP: run under ``torchrun``; the trainer initialises torch.distributed from the environment (NCCL on
CUDA, gloo on CPU), wraps the trainable parts in DistributedDataParallel and shards the data. The
base is all-reduced like every other parameter on ordinary updates, and explicitly on base-only
updates; the schedule is the same on every rank.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .models.backbones import NonFiniteError, check_finite, images_from_batch

logger = logging.getLogger("altub_fast.train")

CHECKPOINT_FORMAT = "altub_fast.checkpoint/1"
NONFINITE_POLICIES = ("raise", "skip")


class NonFiniteLossError(NonFiniteError):
    """A training loss was NaN or Inf (the message names the epoch and step)."""


# ----------------------------------------------------------------------------- configuration
@dataclass
class AltUBSchedule:
    """When and how the base-only updates happen (SPEC 2). Every constant is a knob.

    k: every k-th update (after the warm-up) is base-only; 0 disables base-only updates.
    r: base lr = r * the flow optimiser's current lr (unless ``lr`` is given).
    warmup: no base-only update while the counter is <= warmup.
    unit: "step" (count updates) or "epoch" (count epochs; a base-only epoch is base-only throughout).
    optimizer: "sgd" (the author's) or "adam".
    lr: absolute base lr (overrides r).
    clip_value: clip the base gradients by value (None: no clipping).
    """
    k: int = 5
    r: float = 5.0
    warmup: int = 20
    unit: str = "step"
    optimizer: str = "sgd"
    lr: Optional[float] = None
    clip_value: Optional[float] = 100.0

    def __post_init__(self):
        if self.k < 0:
            raise ValueError(f"k must be >= 0, got {self.k}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.unit not in ("step", "epoch"):
            raise ValueError(f"unit must be 'step' or 'epoch', got {self.unit!r}")
        if self.optimizer.lower() not in ("sgd", "adam"):
            raise ValueError(f"base optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")

    def is_base_only(self, counter: int) -> bool:
        """Is update (or epoch) number ``counter`` (1-based) base-only?"""
        return self.k > 0 and counter > self.warmup and counter % self.k == 0


_SCHEDULE_ALIASES = {"k": "k", "r": "r", "warmup": "warmup", "unit": "unit", "base_optimizer": "optimizer",
                     "base_lr": "lr", "base_clip_value": "clip_value", "altub_k": "k", "altub_r": "r",
                     "altub_warmup": "warmup", "altub_unit": "unit"}


@dataclass
class TrainConfig:
    """Trainer options (all can also be given to :class:`AltUBTrainer` as keywords; the schedule's
    as k, r, warmup, unit, base_optimizer, base_lr, base_clip_value)."""
    epochs: int = 500
    batch_size: Optional[int] = None          # None: the DataLoader's, or 32
    lr: Optional[float] = None                # None: the model's (FastFlow 1e-3, CFlow 2e-4)
    weight_decay: Optional[float] = None      # None: the model's (FastFlow 1e-5, CFlow 0)
    schedule: AltUBSchedule = field(default_factory=AltUBSchedule)
    cache_features: bool = True
    cache_device: Optional[str] = None        # None: the training device
    extract_batch_size: Optional[int] = None  # None: batch_size
    amp: bool = False                         # bfloat16 autocast on CUDA
    on_nonfinite: str = "raise"               # or "skip"
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 1                 # epochs
    keep_all_checkpoints: bool = False        # also keep epoch_NNNN.pt next to last.pt
    save_backbone: Union[bool, str] = "auto"  # "auto": only when the backbone has random weights
    log_jsonl: Optional[str] = None
    progress: bool = True
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = False
    num_workers: int = 0
    z_stats: bool = True
    check_finite: bool = True
    device: Optional[str] = None

    def __post_init__(self):
        if isinstance(self.schedule, dict):
            self.schedule = AltUBSchedule(**self.schedule)
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {self.on_nonfinite!r}")
        if self.checkpoint_every < 1:
            raise ValueError("checkpoint_every must be >= 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def make_config(config: Optional[TrainConfig] = None, **overrides) -> TrainConfig:
    """A TrainConfig from ``config`` (or the defaults) with keyword overrides applied."""
    cfg = dataclasses.replace(config) if config is not None else TrainConfig()
    sched = dataclasses.asdict(cfg.schedule)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = {}
    for key, value in overrides.items():
        if key in _SCHEDULE_ALIASES:
            sched[_SCHEDULE_ALIASES[key]] = value
        elif key in fields:
            kw[key] = value
        else:
            raise TypeError(f"unknown training option {key!r}")
    if "schedule" in kw:
        s = kw.pop("schedule")
        sched.update(dataclasses.asdict(s) if isinstance(s, AltUBSchedule) else dict(s))
    return dataclasses.replace(cfg, schedule=AltUBSchedule(**sched), **kw)


# ----------------------------------------------------------------------------- distributed
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


class _StepModule(nn.Module):
    """What DistributedDataParallel wraps: one ordinary update's forward (loss and z)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, unit):
        return self.model.step_loss(unit)


# ----------------------------------------------------------------------------- helpers
def _dataset_of(data) -> Tuple[Dataset, Optional[int], int, Any]:
    if isinstance(data, DataLoader):
        return data.dataset, data.batch_size, data.num_workers, data.collate_fn
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        return data, None, 0, None
    raise TypeError(f"training data must be a Dataset or a DataLoader, got {type(data).__name__}")


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, os.replace: the file at ``path``
    is always either the old complete one or the new complete one."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load_checkpoint_file(path: str) -> dict:
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path!r} is not an altub_fast training checkpoint (format {CHECKPOINT_FORMAT})")
    return ck


def _channel_dims(z: Tensor) -> Tuple[int, ...]:
    return tuple(d for d in range(z.dim()) if d != 1)


class _ZStats:
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
            dims = _channel_dims(z)
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


# ----------------------------------------------------------------------------- the trainer
class AltUBTrainer:
    """Trains a FastFlow or CFlow model (any model with the protocol ``flow_parameters()``,
    ``base_parameters()``, ``extract_features()``, ``training_units()``, ``step_loss()``,
    ``base_only_loss()``, ``trainable_state_dict()``, ``config``, ``altub``).

    ``AltUBTrainer(model, data, config=None, **options)``; options are :class:`TrainConfig` fields
    and the schedule's knobs (k, r, warmup, unit, base_optimizer, base_lr, base_clip_value).
    ``fit(epochs)`` trains up to that many epochs in total (continuing after ``load_checkpoint``)
    and returns the history (one dict per epoch).
    """

    def __init__(self, model: nn.Module, data, config: Optional[TrainConfig] = None, **options):
        self.config = cfg = make_config(config, **options)
        self.rank, self.world_size, self.local_rank = setup_distributed()
        if cfg.device is not None:
            self.device = torch.device(cfg.device)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank if self.world_size > 1 else torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        if cfg.amp and self.device.type != "cuda":
            warnings.warn("amp=True: bfloat16 autocast runs on CUDA only; training on the CPU in float32")
        self.model = model.to(self.device)
        self.dataset, loader_bs, loader_workers, self.collate_fn = _dataset_of(data)
        self.batch_size = int(cfg.batch_size or loader_bs or 32)
        self.num_workers = cfg.num_workers or loader_workers
        self.altub = bool(getattr(model, "altub", False))
        self.schedule = cfg.schedule

        lr = cfg.lr if cfg.lr is not None else getattr(model, "default_lr", 1e-3)
        wd = cfg.weight_decay if cfg.weight_decay is not None else getattr(model, "default_weight_decay", 0.0)
        self.flow_params = list(model.flow_parameters())
        self.base_params = list(model.base_parameters())
        groups = [{"params": self.flow_params, "weight_decay": wd, "name": "flow"}]
        if self.base_params:
            # weight decay would pull the base back to N(0, I)
            groups.append({"params": self.base_params, "weight_decay": 0.0, "name": "base"})
        self.optimizer = torch.optim.Adam(groups, lr=lr)
        self.base_optimizer: Optional[torch.optim.Optimizer] = None
        if self.altub and self.base_params:
            base_lr = self.schedule.lr if self.schedule.lr is not None else self.schedule.r * lr
            if self.schedule.optimizer.lower() == "sgd":
                self.base_optimizer = torch.optim.SGD(self.base_params, lr=base_lr, momentum=0.0, weight_decay=0.0)
            else:
                self.base_optimizer = torch.optim.Adam(self.base_params, lr=base_lr, weight_decay=0.0)

        self._step_module = _StepModule(model)
        self._ddp = None
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            # CFLOW-AD's fiber batches use one decoder at a time: the others are unused.
            self._ddp = DDP(self._step_module, device_ids=ids, broadcast_buffers=False,
                            find_unused_parameters=getattr(model, "model_name", "") == "cflow")

        self.epoch = 0            # completed epochs
        self.global_step = 0      # updates attempted (ordinary + base-only + skipped)
        self.base_updates = 0     # base-only updates done (the alternation counter)
        self.skipped_updates = 0
        self.history: List[dict] = []
        self.last_checkpoint: Optional[str] = None
        self._cache: Optional[List[Tensor]] = None
        self.cache_seconds: Optional[float] = None

    # ------------------------------------------------------------------ small helpers
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _autocast(self):
        if self.config.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _all_true(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item() > 0.5)

    def _progress(self, **kw):
        return tqdm(disable=not (self.config.progress and self.is_main), dynamic_ncols=True, **kw)

    def flow_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def base_lr(self) -> Optional[float]:
        if self.base_optimizer is None:
            return None
        return self.schedule.lr if self.schedule.lr is not None else self.schedule.r * self.flow_lr()

    # ------------------------------------------------------------------ data
    def epoch_batches(self, epoch: int) -> List[Tensor]:
        """This rank's batches of dataset indices for ``epoch`` (0-based): a permutation seeded by
        (seed, epoch), padded and strided over ranks like DistributedSampler."""
        n = len(self.dataset)
        if self.config.shuffle:
            g = torch.Generator().manual_seed(int(self.config.seed) * 100_003 + epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            total = math.ceil(n / self.world_size) * self.world_size
            if total > n:
                reps = math.ceil((total - n) / n)
                order = torch.cat([order, order.repeat(reps)[: total - n]])
            order = order[self.rank::self.world_size]
        batches = list(order.split(self.batch_size))
        if self.config.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches = batches[:-1]
        return batches

    def _loader(self, batch_sampler, seed: int) -> DataLoader:
        # An own generator: worker seeds depend on (seed, epoch) only, and the global RNG is untouched.
        kw = dict(num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
                  generator=torch.Generator().manual_seed(seed))
        if self.collate_fn is not None:
            kw["collate_fn"] = self.collate_fn
        return DataLoader(self.dataset, batch_sampler=batch_sampler, **kw)

    @torch.no_grad()
    def build_cache(self) -> List[Tensor]:
        """Run every training image through the frozen backbone once; returns per-scale tensors
        (N, C, h, w) in dataset order (on ``cache_device``; bfloat16 under ``amp`` on CUDA).
        Under DDP every rank caches the whole set (each epoch's shard differs), which costs one
        pass of backbone forwards per rank and the cache's memory on every rank."""
        cfg = self.config
        n = len(self.dataset)
        bs = int(cfg.extract_batch_size or self.batch_size)
        cache_device = torch.device(cfg.cache_device) if cfg.cache_device else self.device
        batches = [list(range(s, min(s + bs, n))) for s in range(0, n, bs)]
        cache: Optional[List[Tensor]] = None
        t0 = time.perf_counter()
        self.model.eval()
        pos = 0
        for b, batch in enumerate(self._progress(iterable=self._loader(batches, int(cfg.seed)), total=len(batches),
                                                 desc="extracting features")):
            images = images_from_batch(batch).to(self.device, non_blocking=True)
            with self._autocast():
                feats = self.model.extract_features(images)
            if cfg.check_finite:
                for i, f in enumerate(feats):
                    check_finite(f, f"backbone features of scale {i} for training images {pos}..{pos + len(images) - 1}")
            if cache is None:
                cache = [torch.empty((n, *f.shape[1:]), dtype=f.dtype, device=cache_device) for f in feats]
            for c, f in zip(cache, feats):
                c[pos:pos + f.shape[0]] = f.to(cache_device)
            pos += images.shape[0]
        if cache is None:
            raise ValueError("the training set is empty")
        self.cache_seconds = time.perf_counter() - t0
        nbytes = sum(c.numel() * c.element_size() for c in cache)
        logger.info("cached backbone features of %d images (%.1f MiB on %s) in %.1f s",
                    n, nbytes / 2**20, cache_device, self.cache_seconds)
        self._cache = cache
        return cache

    def set_feature_cache(self, features: Sequence[Tensor]) -> None:
        """Use precomputed backbone features of the whole training set, in dataset order (per
        scale, (N, C, h, w), as :meth:`build_cache` makes them): runs that share a training set can
        extract it once. Checked against the dataset's length and the model's scales."""
        feats = list(features)
        n = len(self.dataset)
        if not feats or any(f.dim() < 2 or f.shape[0] != n for f in feats):
            raise ValueError(f"features must be one (N, ...) tensor per scale with N = {n} (the training set), "
                             f"got shapes {[tuple(f.shape) for f in feats]}")
        expected = getattr(self.model, "num_scales", len(feats))
        if len(feats) != expected:
            raise ValueError(f"the model has {expected} scales, got features for {len(feats)}")
        cache_device = torch.device(self.config.cache_device) if self.config.cache_device else self.device
        self._cache = [f.to(cache_device) for f in feats]

    def _feature_batches(self, batches: List[Tensor], epoch: int) -> Iterable[List[Tensor]]:
        if self._cache is not None:
            for idx in batches:
                yield [c[idx.to(c.device)].to(self.device, non_blocking=True) for c in self._cache]
        else:
            seed = (int(self.config.seed) * 100_003 + epoch) * 1009 + self.rank
            for batch in self._loader([b.tolist() for b in batches], seed):
                images = images_from_batch(batch).to(self.device, non_blocking=True)
                with self._autocast():
                    feats = self.model.extract_features(images)
                yield feats

    # ------------------------------------------------------------------ one update
    def is_base_only(self, step: int, epoch: int) -> bool:
        """Schedule decision for update number ``step`` (1-based) in epoch ``epoch`` (0-based)."""
        if not (self.altub and self.base_optimizer is not None):
            return False
        return self.schedule.is_base_only(epoch + 1 if self.schedule.unit == "epoch" else step)

    def update(self, unit, base_only: Optional[bool] = None, epoch: Optional[int] = None) -> dict:
        """One update on ``unit`` (an item of ``model.training_units``); returns
        {"loss": float or nan, "base_only": bool, "skipped": bool, "z": [...]}. ``base_only=None``
        follows the schedule."""
        epoch = self.epoch if epoch is None else epoch
        self.global_step += 1
        if base_only is None:
            base_only = self.is_base_only(self.global_step, epoch)
        if base_only and self.base_optimizer is None:
            raise RuntimeError("a base-only update needs a learnable base (altub=True)")
        if base_only:
            self.base_optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                loss, zs = self.model.base_only_loss(unit)
            grads = torch.autograd.grad(loss, self.base_params, allow_unused=True)
            finite = self._all_true(bool(torch.isfinite(loss.detach())))
            if finite:
                grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.base_params, grads)]
                if self.world_size > 1:
                    flat = torch.cat([g.reshape(-1) for g in grads])
                    dist.all_reduce(flat)
                    flat /= self.world_size
                    grads = list(flat.split([g.numel() for g in grads]))
                for p, g in zip(self.base_params, grads):
                    p.grad = g.reshape(p.shape).to(p.dtype)
                if self.schedule.clip_value is not None:
                    torch.nn.utils.clip_grad_value_(self.base_params, self.schedule.clip_value)
                for group in self.base_optimizer.param_groups:
                    group["lr"] = self.base_lr()
                self.base_optimizer.step()
                self.base_updates += 1
            self.base_optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                step = self._ddp if self._ddp is not None else self._step_module
                loss, zs = step(unit)
            loss.backward()   # always, so that DDP's reducer sees every forward matched
            finite = self._all_true(bool(torch.isfinite(loss.detach())))
            if finite:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if not finite:
            self._nonfinite(unit, value, epoch)
        return {"loss": value if finite else float("nan"), "base_only": bool(base_only), "skipped": not finite,
                "z": zs}

    def _nonfinite(self, unit, value: float, epoch: int) -> None:
        where = f"epoch {epoch + 1}, step {self.global_step}"
        if self.config.on_nonfinite == "skip":
            self.skipped_updates += 1
            logger.warning("non-finite training loss (%s) at %s: update skipped (on_nonfinite='skip')", value, where)
            return
        try:
            diag = self.model.diagnose_nonfinite(unit)
        except Exception as e:  # pragma: no cover - diagnosis must not hide the error
            diag = f"(diagnosis failed: {e})"
        kept = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                else "no checkpoint had been written")
        raise NonFiniteLossError(f"non-finite training loss ({value}) at {where}: {diag}. Nothing was "
                                 f"updated; {kept}. on_nonfinite='skip' skips such updates instead.")

    # ------------------------------------------------------------------ epochs
    def fit(self, epochs: Optional[int] = None) -> List[dict]:
        """Train until ``epochs`` epochs are complete (default: config.epochs); returns the history."""
        target = int(epochs if epochs is not None else self.config.epochs)
        if self.config.cache_features and self._cache is None and self.epoch < target:
            self.build_cache()
        jsonl = self.config.log_jsonl
        if jsonl and self.is_main:
            os.makedirs(os.path.dirname(os.path.abspath(jsonl)), exist_ok=True)
        for epoch in range(self.epoch, target):
            record = self.train_epoch(epoch, target)
            self.epoch = epoch + 1
            self.history.append(record)
            if self.is_main:
                logger.info(self.format_record(record))
                if jsonl:
                    with open(jsonl, "a") as f:
                        f.write(json.dumps(record) + "\n")
            if self.config.checkpoint_dir and (self.epoch % self.config.checkpoint_every == 0 or self.epoch == target):
                self.save_checkpoint()
        return self.history

    def train_epoch(self, epoch: int, total_epochs: Optional[int] = None) -> dict:
        cfg = self.config
        self.model.train()
        batches = self.epoch_batches(epoch)
        gen = torch.Generator().manual_seed((int(cfg.seed) * 1_000_003 + epoch) * 1009 + self.rank)
        zstats = _ZStats(self.model_channels(), self.device) if cfg.z_stats else None
        sums = {"all": 0.0, "flow": 0.0, "base": 0.0}
        counts = {"all": 0, "flow": 0, "base": 0, "skipped": 0}
        t0 = time.perf_counter()
        n_images = 0
        bar = self._progress(total=len(batches), desc=f"epoch {epoch + 1}/{total_epochs or cfg.epochs}", leave=False)
        for feats in self._feature_batches(batches, epoch):
            n_images += feats[0].shape[0]
            for unit in self.model.training_units(feats, generator=gen):
                out = self.update(unit, epoch=epoch)
                if out["skipped"]:
                    counts["skipped"] += 1
                    continue
                kind = "base" if out["base_only"] else "flow"
                sums["all"] += out["loss"]
                sums[kind] += out["loss"]
                counts["all"] += 1
                counts[kind] += 1
                if zstats is not None:
                    zstats.update(out["z"])
            bar.update(1)
            if counts["all"]:
                bar.set_postfix(loss=f"{sums['all'] / counts['all']:.4g}")
        bar.close()
        elapsed = time.perf_counter() - t0
        if self.world_size > 1:
            t = torch.tensor([sums["all"], sums["flow"], sums["base"], counts["all"], counts["flow"], counts["base"],
                              counts["skipped"], n_images], dtype=torch.float64,
                             device=self.device if self.device.type == "cuda" else "cpu")
            dist.all_reduce(t)
            # losses: means over all ranks' updates; counts: updates (the same on every rank)
            w = self.world_size
            sums = {"all": float(t[0]) / w, "flow": float(t[1]) / w, "base": float(t[2]) / w}
            n_images = int(t[7])
            if zstats is not None:
                zstats.all_reduce()
        mean = lambda k: sums[k] / counts[k] if counts[k] else float("nan")  # noqa: E731
        record = {"epoch": epoch + 1, "loss": mean("all"), "loss_flow_updates": mean("flow"),
                  "loss_base_only_updates": mean("base"), "updates": counts["all"], "flow_updates": counts["flow"],
                  "base_only_updates": counts["base"], "skipped_updates": counts["skipped"],
                  "global_step": self.global_step, "lr": self.flow_lr(), "base_lr": self.base_lr(),
                  "time_s": elapsed, "images_per_s": n_images / elapsed if elapsed > 0 else float("nan"),
                  "cached_features": self._cache is not None, "scales": self.scale_stats(zstats)}
        return record

    def model_channels(self) -> List[int]:
        return [b.num_channels for b in self.model.bases]

    @torch.no_grad()
    def scale_stats(self, zstats: Optional[_ZStats] = None) -> List[dict]:
        """Per scale: mu and sigma (mean/min/max) of the base, and the per-channel mean and std of
        z over the epoch's training data (mean |mean_c|, mean std_c, ...)."""
        out = []
        for i, base in enumerate(self.model.bases):
            mu = base.mu.detach().float()
            sigma = base.log_sigma.detach().float().exp()
            rec = {"mu_mean": float(mu.mean()), "mu_min": float(mu.min()), "mu_max": float(mu.max()),
                   "sigma_mean": float(sigma.mean()), "sigma_min": float(sigma.min()), "sigma_max": float(sigma.max())}
            if zstats is not None:
                rec.update(zstats.summary(i))
            out.append(rec)
        return out

    @staticmethod
    def format_record(r: dict) -> str:
        s = (f"epoch {r['epoch']}: loss {r['loss']:.5g} ({r['updates']} updates, {r['base_only_updates']} base-only, "
             f"{r['skipped_updates']} skipped) lr {r['lr']:.3g} {r['time_s']:.1f}s {r['images_per_s']:.1f} img/s")
        for i, sc in enumerate(r["scales"]):
            s += (f" | scale {i}: mu [{sc['mu_min']:.3g}, {sc['mu_mean']:.3g}, {sc['mu_max']:.3g}]"
                  f" sigma [{sc['sigma_min']:.3g}, {sc['sigma_mean']:.3g}, {sc['sigma_max']:.3g}]")
            if "z_mean_abs" in sc:
                s += f" z: mean|mean_c| {sc['z_mean_abs']:.3g} mean std_c {sc['z_std_mean']:.3g}"
        return s

    # ------------------------------------------------------------------ checkpoints
    def _save_backbone(self) -> bool:
        sb = self.config.save_backbone
        if sb == "auto":
            return bool(getattr(self.model.backbone, "random_weights", False))
        return bool(sb)

    def state_dict(self) -> dict:
        model = self.model
        return {
            "format": CHECKPOINT_FORMAT,
            "model_class": type(model).__name__,
            "model_config": dict(getattr(model, "config", {})),
            "backbone": model.backbone.describe() if hasattr(model.backbone, "describe") else {},
            "backbone_saved": self._save_backbone(),
            "model": model.trainable_state_dict(include_backbone=self._save_backbone()),
            "optimizer": self.optimizer.state_dict(),
            "base_optimizer": self.base_optimizer.state_dict() if self.base_optimizer is not None else None,
            "epoch": self.epoch, "global_step": self.global_step, "base_updates": self.base_updates,
            "skipped_updates": self.skipped_updates,
            "schedule": dataclasses.asdict(self.schedule),
            "train_config": self.config.to_dict(),
            "history": self.history,
            "rng": _rng_state(),
            "world_size": self.world_size,
        }

    def save_checkpoint(self, path: Optional[str] = None) -> Optional[str]:
        """Write a checkpoint atomically (rank 0 only): ``<checkpoint_dir>/last.pt`` by default.
        Refuses (keeping the previous file) if any trainable parameter is non-finite."""
        if path is None:
            if not self.config.checkpoint_dir:
                raise ValueError("no path given and no checkpoint_dir configured")
            path = os.path.join(self.config.checkpoint_dir, "last.pt")
        if not self.is_main:
            return None
        bad = [n for n, p in self.model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
        if bad:
            logger.error("not writing checkpoint %s: non-finite parameters %s; the last good checkpoint (%s) is kept",
                         path, bad[:5], self.last_checkpoint)
            return None
        state = self.state_dict()
        atomic_save(state, path)
        if self.config.keep_all_checkpoints:
            atomic_save(state, os.path.join(os.path.dirname(path), f"epoch_{self.epoch:04d}.pt"))
        self.last_checkpoint = os.path.abspath(path)
        return self.last_checkpoint

    def load_checkpoint(self, path: str, restore_rng: bool = True) -> dict:
        """Restore model (trainable parts), optimisers, schedule position, history and RNG states."""
        ck = load_checkpoint_file(path)
        cfg = dict(getattr(self.model, "config", {}))
        for key in ("name", "backbone", "altub", "image_size"):
            if key in cfg and key in ck["model_config"] and cfg[key] != ck["model_config"][key]:
                raise ValueError(f"checkpoint {path!r} is for {key}={ck['model_config'][key]!r}, "
                                 f"the model has {key}={cfg[key]!r}")
        result = self.model.load_state_dict(ck["model"], strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("backbone.")]
        if missing or result.unexpected_keys:
            raise ValueError(f"checkpoint {path!r} does not fit the model: missing {missing[:10]}, "
                             f"unexpected {list(result.unexpected_keys)[:10]}")
        self.optimizer.load_state_dict(ck["optimizer"])
        if self.base_optimizer is not None and ck.get("base_optimizer") is not None:
            self.base_optimizer.load_state_dict(ck["base_optimizer"])
        self.epoch = int(ck["epoch"])
        self.global_step = int(ck["global_step"])
        self.base_updates = int(ck["base_updates"])
        self.skipped_updates = int(ck.get("skipped_updates", 0))
        self.history = list(ck.get("history", []))
        if restore_rng:
            _set_rng_state(ck["rng"])
        self.last_checkpoint = os.path.abspath(path)
        return ck

    @classmethod
    def from_checkpoint(cls, path: str, data, model: Optional[nn.Module] = None, **options) -> "AltUBTrainer":
        """Rebuild the model from the checkpoint's config (unless given) and resume from it."""
        ck = load_checkpoint_file(path)
        if model is None:
            model = build_model_from_checkpoint(ck)
        config = make_config(TrainConfig(**{k: v for k, v in ck["train_config"].items()}), **options)
        trainer = cls(model, data, config)
        trainer.load_checkpoint(path)
        return trainer


def build_model_from_checkpoint(ck: Union[str, dict]) -> nn.Module:
    """The model described by a checkpoint, with its trained parameters (on the CPU). A backbone
    with random weights comes from the checkpoint; a pretrained one is rebuilt from its name and
    weights source."""
    from .models import build_model

    if isinstance(ck, str):
        ck = load_checkpoint_file(ck)
    cfg = dict(ck["model_config"])
    name = cfg.pop("name")
    if ck.get("backbone_saved"):
        cfg["pretrained"], cfg["weights"] = False, None
    model = build_model(name, **cfg)
    result = model.load_state_dict(ck["model"], strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("backbone.")]
    if missing or result.unexpected_keys:
        raise ValueError(f"checkpoint does not fit the rebuilt model: missing {missing[:10]}, "
                         f"unexpected {list(result.unexpected_keys)[:10]}")
    return model


def load_model(path: str, device: Optional[Union[str, torch.device]] = None) -> nn.Module:
    """A trained model from a checkpoint, in eval mode (for inference)."""
    model = build_model_from_checkpoint(path)
    if device is not None:
        model = model.to(device)
    return model.eval()


def train(model: nn.Module, data, config: Optional[TrainConfig] = None, resume: Optional[str] = None,
          **options) -> List[dict]:
    """Functional form: ``AltUBTrainer(model, data, config, **options)``, optionally resumed from
    a checkpoint, then ``fit()``; returns the history."""
    trainer = AltUBTrainer(model, data, config, **options)
    if resume:
        trainer.load_checkpoint(resume)
    return trainer.fit()


# ----------------------------------------------------------------------------- inference
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
