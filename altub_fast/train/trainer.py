"""The trainer: AltUB's loop (SPEC 2). Each epoch runs this rank's batches of training features
through the model's training units, one update per unit: a base-only update where the schedule
says so, an ordinary (flow) update otherwise; then measures the held-out and training NLL, records
the epoch, decides whether to stop, and writes ``last.pt`` / ``best.pt``. At the end it calibrates
the checkpoints on the held-out images.

The parts it runs, each in its own file and testable alone: features.py (:class:`FeatureSource`,
the training, held-out and training-NLL batches of backbone features, cached or extracted),
updates.py (:class:`FlowUpdate` and :class:`BaseOnlyUpdate`, each with its optimiser, all-reduce
and non-finite handling) and store.py (:class:`CheckpointStore`: the checkpoint's state, atomic
save/load, the restored held-out split, calibration of last/best); the smaller pieces are listed
in the package docstring. The model is anything validation.check_model accepts: the
``altub_fast.models.protocol.TrainableFlow`` protocol.

At about 410 lines this file is a little over the house's ~400: it is the one object users call
(``fit``, ``train_epoch``, ``update``, ``evaluate_nll``, ``state_dict``, ``save_checkpoint`` /
``load_checkpoint`` / ``from_checkpoint``, ``selection``), and each of those delegates to the parts.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor
from tqdm.auto import tqdm

from .batches import dataset_of, epoch_batches
from .checkpoint import build_model_from_checkpoint, load_checkpoint_file, set_rng_state
from .distributed import pick_device, setup_distributed
from .features import FeatureSource
from .heldout import HeldoutSplit, make_split, split_datasets
from .schedule import TrainConfig, make_config
from .stats import EpochTally, ZStats, append_jsonl, format_record, progress_text, scale_stats
from .stopping import best_epoch, selection, stop_reason
from .store import CheckpointStore, calibration, restored_split
from .updates import BaseOnlyUpdate, FlowUpdate, NonFiniteLossError, NonFinitePolicy  # noqa: F401 (re-exported)
from .validation import check_model, nll_record, offers_nll, require_nll

logger = logging.getLogger(__name__)

class AltUBTrainer:
    """Trains a flow model with AltUB's schedule (see the module docstring).

    ``AltUBTrainer(model, data, config=None, heldout=None, **options)``; options are
    :class:`TrainConfig` fields and the schedule's knobs (k, r, warmup, unit, base_optimizer,
    base_lr, base_clip_value). ``heldout``: a separate set of normal images never trained on (e.g.
    ``validation/good``); without it, ``heldout_fraction`` holds out a seeded fraction of ``data``
    (see heldout.py). ``fit(epochs)`` trains up to that many epochs in total (continuing after
    ``load_checkpoint``) and returns the history (one dict per epoch).
    """

    def __init__(self, model: nn.Module, data, config: Optional[TrainConfig] = None, heldout=None, **options):
        self.config = cfg = make_config(config, **options)
        check_model(model)
        self.rank, self.world_size, self.local_rank = setup_distributed()
        self.device = pick_device(cfg.device, self.world_size, self.local_rank)
        if cfg.amp and self.device.type != "cuda":
            warnings.warn("amp=True: bfloat16 autocast runs on CUDA only; training on the CPU in float32")
        self.model = model.to(self.device)
        self.altub = bool(model.altub)
        self.schedule = cfg.schedule
        self.data, loader_bs, loader_workers, collate_fn = dataset_of(data)
        self.heldout_data = dataset_of(heldout)[0] if heldout is not None else None
        self.batch_size = int(cfg.batch_size or loader_bs or 32)
        self.features = FeatureSource(
            model, device=self.device, batch_size=int(cfg.extract_batch_size or self.batch_size), seed=int(cfg.seed),
            rank=self.rank, num_workers=cfg.num_workers or loader_workers, collate_fn=collate_fn, amp=cfg.amp,
            check_finite=cfg.check_finite, cache_device=torch.device(cfg.cache_device) if cfg.cache_device else None,
            progress=self._progress)
        self._use_split(make_split(self.data, self.heldout_data, cfg.heldout_fraction,
                                   cfg.heldout_seed if cfg.heldout_seed is not None else cfg.seed))
        self.store = CheckpointStore(cfg.checkpoint_dir, keep_all=cfg.keep_all_checkpoints,
                                     save_backbone=cfg.save_backbone, is_main=self.is_main)
        self.flow_update, self.base_update = self._make_updates()
        self.epoch = 0            # completed epochs
        self.global_step = 0      # updates attempted (ordinary + base-only + skipped)
        self.base_updates = 0     # base-only updates done (the alternation counter)
        self.skipped_updates = 0
        self.history: List[dict] = []
        self.stop_reason: Optional[str] = None
        self.threshold: Optional[dict] = None   # set by calibrate_checkpoints() for the current model
        # the NLL in nats per dimension (validation.py): held-out every epoch, training on a fixed subset
        self.nll_enabled = offers_nll(model) and cfg.evaluate_nll
        if self.heldout_dataset is not None and cfg.evaluate_nll:
            require_nll(model)

    def _make_updates(self) -> Tuple[FlowUpdate, Optional[BaseOnlyUpdate]]:
        cfg, model = self.config, self.model
        lr = cfg.lr if cfg.lr is not None else model.default_lr
        wd = cfg.weight_decay if cfg.weight_decay is not None else model.default_weight_decay
        kw = dict(world_size=self.world_size, device=self.device, amp=cfg.amp,
                  nonfinite=NonFinitePolicy(cfg.on_nonfinite, model, lambda: self.store.last))
        flow = FlowUpdate(model, lr=lr, weight_decay=wd, **kw)
        if not (self.altub and model.base_parameters()):
            return flow, None
        return flow, BaseOnlyUpdate(model, self.schedule, lambda: flow.lr, **kw)

    def _use_split(self, split: HeldoutSplit) -> None:
        """Train on ``split``'s training images (``self.dataset``); hold out the rest (``self.heldout_dataset``)."""
        self.split = split
        self.features.use(*split_datasets(split, self.data, self.heldout_data))

    # ------------------------------------------------------------------ the loop
    def fit(self, epochs: Union[int, str, None] = None) -> List[dict]:
        """Train until ``epochs`` epochs are complete (default: config.epochs), or with ``"auto"``
        until the held-out NLL stops improving (see stopping.py; needs held-out images); returns the
        history. With a checkpoint_dir, ``last.pt`` is written every checkpoint_every epochs and at
        the end, and ``best.pt`` whenever the held-out NLL reaches a new lowest value."""
        auto, target = self._epochs(epochs)
        self.stop_reason = self._stop_reason(auto, target)
        if self.stop_reason is not None:
            return self.history
        self._build_caches()
        bar = self._progress(total=target, initial=self.epoch, desc="training", unit="epoch")
        for epoch in range(self.epoch, target):
            record = self.train_epoch(epoch, target)         # the updates, as the schedule says
            t0 = time.perf_counter()
            record.update(self.evaluate_nll())               # held-out and training NLL
            record["nll_time_s"] = time.perf_counter() - t0
            best = self._close_epoch(record, auto, target)   # history, best epoch, whether to stop
            bar.update(1)
            bar.set_postfix_str(progress_text(record))
            self._log(record)
            self._save_epoch(best)                           # last.pt, best.pt
            if self.stop_reason is not None:
                break
        bar.close()
        if self.is_main and self.stop_reason:
            logger.info("training stopped after epoch %d: %s", self.epoch, self.stop_reason)
        if self.stop_reason is not None and self.config.calibrate and self.heldout_dataset is not None:
            self.calibrate_checkpoints()
        return self.history

    def train_epoch(self, epoch: int, total_epochs: Optional[int] = None) -> dict:
        """Epoch ``epoch`` (0-based) of updates over this rank's batches; returns its record."""
        cfg = self.config
        self.model.train()
        batches = self.epoch_batches(epoch)
        gen = torch.Generator().manual_seed((int(cfg.seed) * 1_000_003 + epoch) * 1009 + self.rank)
        tally = EpochTally(ZStats(self.model_channels(), self.device) if cfg.z_stats else None)
        t0 = time.perf_counter()
        bar = self._progress(total=len(batches), desc=f"epoch {epoch + 1}/{total_epochs or cfg.epochs}", leave=False)
        for feats in self.features.train_batches(batches, epoch):
            tally.images += feats[0].shape[0]
            for unit in self.model.training_units(feats, generator=gen):
                tally.add(self.update(unit, epoch=epoch))
            bar.update(1)
            if tally.counts["all"]:
                bar.set_postfix(loss=f"{tally.mean('all'):.4g}")
        bar.close()
        elapsed = time.perf_counter() - t0
        if self.world_size > 1:
            tally.all_reduce(self.world_size, self.device)
        return {"epoch": epoch + 1, **tally.losses(), "global_step": self.global_step, "lr": self.flow_lr(),
                "base_lr": self.base_lr(), "time_s": elapsed,
                "images_per_s": tally.images / elapsed if elapsed > 0 else float("nan"),
                "cached_features": self.features.train_cache is not None, "scales": self.scale_stats(tally.zstats)}

    def is_base_only(self, step: int, epoch: int) -> bool:
        """Schedule decision for update number ``step`` (1-based) in epoch ``epoch`` (0-based)."""
        if not (self.altub and self.base_update is not None):
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
        if base_only and self.base_update is None:
            raise RuntimeError("a base-only update needs a learnable base (altub=True)")
        step = self.base_update if base_only else self.flow_update
        out = step(unit, where=f"epoch {epoch + 1}, step {self.global_step}")
        if out.skipped:
            self.skipped_updates += 1
        elif base_only:
            self.base_updates += 1
        return {"loss": out.loss, "base_only": bool(base_only), "skipped": out.skipped, "z": out.z}

    def evaluate_nll(self) -> dict:
        """{"heldout_nll", "train_nll"}: mean NLL in nats per dimension of the held-out images and
        of the fixed training subset, in the model's current state (None where not measured)."""
        n_train = self.config.train_nll_images
        held = self.features.heldout_batches() if self.nll_enabled and self.heldout_dataset is not None else None
        train = self.features.train_nll_batches(n_train) if self.nll_enabled and n_train > 0 else None
        return nll_record(self.model, held, train, self.world_size, self.device)

    # ------------------------------------------------------------------ the loop's steps
    def _epochs(self, epochs: Union[int, str, None]) -> Tuple[bool, int]:
        """(stop on the held-out NLL?, the last epoch to train at most)."""
        cfg = self.config
        spec = epochs if epochs is not None else cfg.epochs
        auto = spec == "auto"
        if auto and (self.heldout_dataset is None or not self.nll_enabled):
            raise ValueError("epochs='auto' stops on the held-out NLL: give held-out images (heldout= or "
                             "heldout_fraction > 0) and a model with nll_per_dim")
        return auto, cfg.max_epochs if auto else int(spec)

    def _build_caches(self) -> None:
        if not self.config.cache_features:
            return
        if self.features.train_cache is None:
            self.build_cache()
        if self.nll_enabled and self.heldout_dataset is not None and self.features.heldout_cache is None:
            self.build_heldout_cache()

    def _close_epoch(self, record: dict, auto: bool, target: int) -> Optional[Tuple[int, float]]:
        """Add the epoch's record to the history; returns the best epoch so far (stopping.best_epoch)."""
        self.epoch = record["epoch"]
        self.history.append(record)
        self.threshold = None     # calibrated for an earlier state
        best = best_epoch(self.history)
        record["best_epoch"] = best[0] if best else None
        self.stop_reason = self._stop_reason(auto, target)
        return best

    def _stop_reason(self, auto: bool, target: int) -> Optional[str]:
        if not auto:
            return f"reached epochs={target}" if self.epoch >= target else None
        cfg = self.config
        return stop_reason(self.history, patience=cfg.patience, min_epochs=cfg.min_epochs, max_epochs=target,
                           min_delta=cfg.min_delta)

    def _log(self, record: dict) -> None:
        if self.is_main:
            logger.info(self.format_record(record))
            if self.config.log_jsonl:
                append_jsonl(self.config.log_jsonl, record)

    def _save_epoch(self, best: Optional[Tuple[int, float]]) -> None:
        cfg = self.config
        if not cfg.checkpoint_dir:
            return
        if self.epoch % cfg.checkpoint_every == 0 or self.stop_reason is not None:
            self.save_checkpoint()
        if best is not None and best[0] == self.epoch:
            self.save_checkpoint(kind="best")

    def selection(self) -> dict:
        """Which epoch each checkpoint holds and why (stopping.selection)."""
        return selection(self.history, self.epoch, self.stop_reason)

    def calibrate_checkpoints(self) -> dict:
        """At the end of training: calibrate the current model (last.pt) and, where it is another
        epoch, best.pt's, on the held-out normal images; store each model's threshold at
        ``max_fpr`` in ``ck["threshold"]`` and rewrite the files (atomically). Returns
        {"last": threshold, "best": threshold or None}."""
        if self.heldout_dataset is None:
            raise ValueError("calibration needs held-out images (give heldout= or heldout_fraction > 0)")
        max_fpr = float(self.config.max_fpr)
        features = [list(f) for f in self.features.heldout_batches()]
        self.threshold = calibration(self.model, features, max_fpr)
        out = {"last": self.threshold, "best": None}
        best = best_epoch(self.history)
        if not self.config.checkpoint_dir:
            return out
        self.save_checkpoint()
        if best is not None and best[0] == self.epoch:
            self.save_checkpoint(kind="best")
            out["best"] = self.threshold
        elif best is not None:
            out["best"] = self.store.recalibrate(self.model, "best", features, max_fpr, self.selection())
        return out

    # ------------------------------------------------------------------ checkpoints (store.py)
    def state_dict(self) -> dict:
        """The checkpoint of the current state (store.py says what it holds)."""
        run = {"epoch": self.epoch, "global_step": self.global_step, "base_updates": self.base_updates,
               "skipped_updates": self.skipped_updates, "schedule": dataclasses.asdict(self.schedule),
               "train_config": self.config.to_dict(), "history": self.history, "world_size": self.world_size,
               "heldout": self.split.to_dict(), "selection": self.selection(),
               # {"value", "max_fpr", "n_heldout", "score_mode", ...}: set by calibrate_checkpoints()
               "threshold": self.threshold}
        return self.store.state(self.model, self.optimizer, self.base_optimizer, run)

    def save_checkpoint(self, path: Optional[str] = None, kind: str = "last") -> Optional[str]:
        """Write a checkpoint atomically (rank 0 only): ``<checkpoint_dir>/<kind>.pt`` by default
        (``kind`` "last" or "best", recorded in the file). Refuses (keeping the previous file) if
        any trainable parameter is non-finite."""
        return self.store.save(self.model, self.state_dict, path=path, kind=kind)

    def load_checkpoint(self, path: str, restore_rng: bool = True) -> dict:
        """Restore model (trainable parts), optimisers, schedule position, history, held-out split
        and RNG states."""
        ck = self.store.load(path, self.model, self.optimizer, self.base_optimizer)
        self.epoch = int(ck["epoch"])
        self.global_step = int(ck["global_step"])
        self.base_updates = int(ck["base_updates"])
        self.skipped_updates = int(ck.get("skipped_updates", 0))
        self.history = list(ck.get("history", []))
        split = restored_split(ck, path, self.split, self.data, self.heldout_data, int(self.config.seed))
        if split != self.split:
            self._use_split(split)    # (and forget the caches built for the other split)
        self.threshold = ck.get("threshold")
        if restore_rng:
            set_rng_state(ck["rng"])
        self.store.last = os.path.abspath(path)
        return ck

    @classmethod
    def from_checkpoint(cls, path: str, data, model: Optional[nn.Module] = None, heldout=None,
                        **options) -> "AltUBTrainer":
        """Rebuild the model from the checkpoint's config (unless given) and resume from it (with
        the same held-out set, if the checkpoint's run had a separate one)."""
        ck = load_checkpoint_file(path)
        if model is None:
            model = build_model_from_checkpoint(ck)
        config = make_config(TrainConfig(**{k: v for k, v in ck["train_config"].items()}), **options)
        trainer = cls(model, data, config, heldout=heldout)
        trainer.load_checkpoint(path)
        return trainer

    @property
    def last_checkpoint(self) -> Optional[str]:
        return self.store.last

    @property
    def best_checkpoint(self) -> Optional[str]:
        return self.store.best

    # ------------------------------------------------------------------ features (features.py)
    def epoch_batches(self, epoch: int) -> List[Tensor]:
        """This rank's batches of dataset indices for ``epoch`` (0-based): a permutation seeded by
        (seed, epoch), padded and strided over ranks like DistributedSampler."""
        cfg = self.config
        return epoch_batches(len(self.dataset), self.batch_size, seed=cfg.seed, epoch=epoch, shuffle=cfg.shuffle,
                             rank=self.rank, world_size=self.world_size, drop_last=cfg.drop_last)

    def build_cache(self) -> List[Tensor]:
        """Every training image through the frozen backbone once (FeatureSource.build_train_cache).
        Under DDP every rank caches the whole set (each epoch's shard differs)."""
        return self.features.build_train_cache()

    def set_feature_cache(self, features: Sequence[Tensor]) -> None:
        """Use precomputed features of the whole training set, as :meth:`build_cache` makes them
        (runs that share a training set can extract it once; FeatureSource.set_train_cache)."""
        self.features.set_train_cache(features)

    def build_heldout_cache(self) -> List[Tensor]:
        """The held-out images' backbone features, extracted once (like :meth:`build_cache`)."""
        return self.features.build_heldout_cache()

    def heldout_feature_batches(self) -> Iterable[List[Tensor]]:
        """The held-out images' features, batch by batch, in order (cached, or extracted now)."""
        return self.features.heldout_batches()

    @property
    def dataset(self):
        """The training images (those of the held-out split's training side)."""
        return self.features.train_set

    @property
    def heldout_dataset(self):
        """The held-out normal images, or None."""
        return self.features.heldout_set

    @property
    def cache_seconds(self) -> Optional[float]:
        """How long building the training feature cache took (None: not built here)."""
        return self.features.cache_seconds

    # ------------------------------------------------------------------ small helpers
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _progress(self, **kw):
        return tqdm(disable=not (self.config.progress and self.is_main), dynamic_ncols=True, **kw)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The flow optimiser (Adam on theta_flow and theta_base; updates.FlowUpdate)."""
        return self.flow_update.optimizer

    @property
    def base_optimizer(self) -> Optional[torch.optim.Optimizer]:
        """The base-only updates' optimiser (None without a learnable base; updates.BaseOnlyUpdate)."""
        return None if self.base_update is None else self.base_update.optimizer

    def flow_lr(self) -> float:
        return self.flow_update.lr

    def base_lr(self) -> Optional[float]:
        return None if self.base_update is None else self.base_update.lr

    def model_channels(self) -> List[int]:
        return [b.num_channels for b in self.model.bases]

    def scale_stats(self, zstats: Optional[ZStats] = None) -> List[dict]:
        """Per scale: the base's mu and sigma and the epoch's z statistics (see stats.scale_stats)."""
        return scale_stats(self.model, zstats)

    @staticmethod
    def format_record(r: dict) -> str:
        return format_record(r)


def train(model: nn.Module, data, config: Optional[TrainConfig] = None, resume: Optional[str] = None,
          heldout=None, **options) -> List[dict]:
    """Functional form: ``AltUBTrainer(model, data, config, **options)``, optionally resumed from
    a checkpoint, then ``fit()``; returns the history."""
    trainer = AltUBTrainer(model, data, config, heldout=heldout, **options)
    if resume:
        trainer.load_checkpoint(resume)
    return trainer.fit()
