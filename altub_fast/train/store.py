"""The checkpoint store: what a training checkpoint holds, writing it atomically (``last.pt``,
``best.pt``, ``epoch_NNNN.pt``), reading it back into a model and its optimisers, the held-out split
a resumed run must use, and the calibration of ``last.pt`` and ``best.pt`` on the held-out images
(each file's false-alarm threshold is stored in it).

The file format (``CHECKPOINT_FORMAT``; its keys: :meth:`CheckpointStore.state`) is unchanged
from the trainer that wrote all landed checkpoints; checkpoint.py has the file-level pieces
(atomic_save, load_checkpoint_file, RNG states, rebuilding a model from a file).
"""
from __future__ import annotations

import copy
import logging
import math
import os
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..metrics import threshold_at_fpr
from ..models.protocol import config_dict
from .checkpoint import CHECKPOINT_FORMAT, atomic_save, load_checkpoint_file, load_trainable_state, rng_state
from .heldout import HeldoutSplit, check_same_data

logger = logging.getLogger(__name__)

KINDS = ("last", "best")
#: the model configuration a checkpoint must agree with to be resumed into a model
MATCHING_CONFIG = ("name", "backbone", "altub", "image_size")


class CheckpointStore:
    """Checkpoints of one run in ``directory`` (None: only explicit paths). Only the main rank
    (``is_main``) writes. ``save_backbone``: True, False or "auto" (only a backbone with random
    weights, which cannot be rebuilt from its name). ``keep_all``: also keep ``epoch_NNNN.pt``
    beside ``last.pt``. ``last`` / ``best``: the files written (or resumed from) last."""

    def __init__(self, directory: Optional[str], *, keep_all: bool = False, save_backbone: Union[bool, str] = "auto",
                 is_main: bool = True):
        self.directory, self.keep_all, self.save_backbone, self.is_main = directory, keep_all, save_backbone, is_main
        self.last: Optional[str] = None
        self.best: Optional[str] = None

    def path(self, kind: str) -> str:
        if kind not in KINDS:
            raise ValueError(f"kind must be 'last' or 'best', got {kind!r}")
        if not self.directory:
            raise ValueError("no path given and no checkpoint_dir configured")
        return os.path.join(self.directory, f"{kind}.pt")

    def saves_backbone(self, model) -> bool:
        if self.save_backbone == "auto":
            return bool(model.backbone.random_weights)
        return bool(self.save_backbone)

    def state(self, model, optimizer: torch.optim.Optimizer, base_optimizer: Optional[torch.optim.Optimizer],
              run: dict) -> dict:
        """A checkpoint of ``model`` (its trainable parts; the backbone too where it is saved) and
        its optimisers, with ``run``: the trainer's counters and records (epoch, global_step,
        base_updates, skipped_updates, schedule, train_config, history, world_size, heldout,
        selection, threshold), and the RNG states."""
        saved = self.saves_backbone(model)
        state = {
            "format": CHECKPOINT_FORMAT,
            "model_class": type(model).__name__,
            "model_config": config_dict(model.config),
            "backbone": model.backbone.describe(),
            "backbone_saved": saved,
            "model": model.trainable_state_dict(include_backbone=saved),
            "optimizer": optimizer.state_dict(),
            "base_optimizer": base_optimizer.state_dict() if base_optimizer is not None else None,
        }
        state.update(run)
        state["rng"] = rng_state()
        return state

    def save(self, model, state: Callable[[], dict], path: Optional[str] = None, kind: str = "last") -> Optional[str]:
        """Write ``state()`` atomically to ``path`` (default ``<directory>/<kind>.pt``; ``kind``
        "last" or "best" is recorded in the file); returns the file's absolute path. Writes
        nothing, keeping the previous file, off the main rank or if a trainable parameter of
        ``model`` is non-finite (None then)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be 'last' or 'best', got {kind!r}")
        path = self.path(kind) if path is None else path
        if not self.is_main:
            return None
        bad = [n for n, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
        if bad:
            logger.error("not writing checkpoint %s: non-finite parameters %s; the last good checkpoint (%s) is kept",
                         path, bad[:5], self.last)
            return None
        ck = state()
        ck["kind"] = kind
        atomic_save(ck, path)
        if kind == "best":
            self.best = os.path.abspath(path)
            return self.best
        if self.keep_all:
            atomic_save(ck, os.path.join(os.path.dirname(path), f"epoch_{int(ck['epoch']):04d}.pt"))
        self.last = os.path.abspath(path)
        return self.last

    @staticmethod
    def load(path: str, model, optimizer: torch.optim.Optimizer,
             base_optimizer: Optional[torch.optim.Optimizer]) -> dict:
        """Read ``path`` into ``model`` (its trainable parts; the checkpoint must be for the same
        model configuration) and the optimisers; returns the checkpoint."""
        ck = load_checkpoint_file(path)
        cfg = config_dict(model.config)
        for key in MATCHING_CONFIG:
            if key in cfg and key in ck["model_config"] and cfg[key] != ck["model_config"][key]:
                raise ValueError(f"checkpoint {path!r} is for {key}={ck['model_config'][key]!r}, "
                                 f"the model has {key}={cfg[key]!r}")
        load_trainable_state(model, ck["model"], f"checkpoint {path!r} does not fit the model")
        optimizer.load_state_dict(ck["optimizer"])
        if base_optimizer is not None and ck.get("base_optimizer") is not None:
            base_optimizer.load_state_dict(ck["base_optimizer"])
        return ck

    def recalibrate(self, model, kind: str, features: List[List[Tensor]], max_fpr: float,
                    selection: dict) -> Optional[dict]:
        """Calibrate the model stored in ``<kind>.pt`` (a copy of ``model`` with its weights) on
        the held-out ``features``; store its threshold and ``selection`` in the file (atomically).
        Returns the threshold (None off the main rank)."""
        if not self.is_main:
            return None
        path = self.path(kind)
        ck = load_checkpoint_file(path)
        stored = copy.deepcopy(model)
        stored.load_state_dict(ck["model"], strict=False)
        threshold = calibration(stored, features, max_fpr, warn=False)
        ck["model"] = stored.trainable_state_dict(include_backbone=bool(ck.get("backbone_saved")))
        ck["threshold"], ck["selection"] = threshold, selection
        atomic_save(ck, path)
        return threshold


def restored_split(ck: dict, path: str, current: HeldoutSplit, data: Dataset, heldout: Optional[Dataset],
                   seed: int) -> HeldoutSplit:
    """The held-out split the checkpoint's run used (checked against ``data`` and ``heldout``),
    warning where it replaces ``current``, the one the resumed run's options asked for."""
    if "heldout" in ck:
        split = HeldoutSplit.from_dict(ck["heldout"])
    else:   # written before held-out splits existed: that run trained on every image
        split = HeldoutSplit("none", 0.0, int(seed), len(data), None, None, None, None)
    check_same_data(split, data, heldout, f"checkpoint {path!r}")
    if split != current and (current.source != "none" or split.source != "none"):
        warnings.warn(f"resuming from {path}: its held-out split ({split.describe()}) replaces the one "
                      f"these options asked for ({current.describe()})")
    return split


def calibration(model, features: Sequence[Sequence[Tensor]], max_fpr: float, warn: bool = True) -> Dict:
    """``model.calibrate`` on the held-out images' ``features`` (a list of batches), then the
    threshold at ``max_fpr``: {"value", "max_fpr", "n_heldout", "score_mode", "image_score",
    "decision", "heldout_scores"}."""
    n_expected = sum(len(b[0]) for b in features)
    scores = model.calibrate(features).detach().double().cpu().reshape(-1)
    if len(scores) != n_expected:
        raise RuntimeError(f"calibrate() returned {len(scores)} scores for {n_expected} held-out images")
    n = len(scores)
    if warn and max_fpr > 0 and n * max_fpr < 1:
        logger.warning("%d held-out images: the threshold for max_fpr=%g is their maximum score (a rate of "
                       "%g needs at least %d images)", n, max_fpr, max_fpr, math.ceil(1 / max_fpr))
    rules = model.scoring_rules()
    return {"value": threshold_at_fpr(scores, max_fpr), "max_fpr": float(max_fpr), "n_heldout": n,
            "score_mode": str(rules["score"]), "image_score": str(rules["image_score"]),
            "decision": "score > value is a defect", "heldout_scores": scores.tolist()}
