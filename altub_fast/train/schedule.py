"""When and how the base-only updates happen (AltUBSchedule) and the trainer's options (TrainConfig)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Union

NONFINITE_POLICIES = ("raise", "skip")


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
    epochs: Union[int, str] = 500             # or "auto": early stopping on the held-out NLL (stopping.py)
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
    # the held-out normal split (heldout.py): a seeded fraction of the training images, unless the
    # trainer is handed a separate held-out set (heldout=); never trained on
    heldout_fraction: float = 0.0
    heldout_seed: Optional[int] = None        # None: seed
    # per epoch: held-out NLL and training NLL (on this many training images), nats per dimension,
    # from model.nll_per_dim (validation.py)
    evaluate_nll: bool = True
    train_nll_images: int = 16
    # epochs="auto": at least min_epochs, at most max_epochs; stop when the held-out NLL has not
    # improved by more than min_delta (nats/dim) for patience epochs. best.pt is written either way.
    min_epochs: int = 5
    max_epochs: int = 200
    patience: int = 5
    min_delta: float = 0.0
    # at the end of training, for last.pt and best.pt: model.calibrate(held-out features) sets the
    # score normalisation and gives the held-out scores; threshold = their (1 - max_fpr) quantile
    calibrate: bool = True
    max_fpr: float = 0.01

    def __post_init__(self):
        if isinstance(self.schedule, dict):
            self.schedule = AltUBSchedule(**self.schedule)
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {self.on_nonfinite!r}")
        if self.checkpoint_every < 1:
            raise ValueError("checkpoint_every must be >= 1")
        if isinstance(self.epochs, str):
            if self.epochs != "auto":
                raise ValueError(f"epochs must be a number or 'auto', got {self.epochs!r}")
        elif int(self.epochs) < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if not 0 <= self.min_epochs <= self.max_epochs or self.max_epochs < 1:
            raise ValueError(f"need 0 <= min_epochs <= max_epochs and max_epochs >= 1, got min_epochs="
                             f"{self.min_epochs}, max_epochs={self.max_epochs}")
        if self.min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {self.min_delta}")
        if not 0.0 <= self.max_fpr < 1.0:
            raise ValueError(f"max_fpr must be in [0, 1), got {self.max_fpr}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")

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

