"""Checkpoint files: atomic writes, the format check, the RNG states they carry, and rebuilding a
trained model from one (for inference or to resume)."""
from __future__ import annotations

import os
import random
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn as nn

CHECKPOINT_FORMAT = "altub_fast.checkpoint/1"


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
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


def build_model_from_checkpoint(ck: Union[str, dict]) -> nn.Module:
    """The model described by a checkpoint, with its trained parameters (on the CPU). A backbone
    with random weights comes from the checkpoint; a pretrained one is rebuilt from its name and
    weights source."""
    from ..models import build_model

    if isinstance(ck, str):
        ck = load_checkpoint_file(ck)
    cfg = dict(ck["model_config"])
    name = cfg.pop("name")
    if ck.get("backbone_saved"):
        cfg["pretrained"], cfg["weights"] = False, None
    model = build_model(name, **cfg)
    load_trainable_state(model, ck["model"], "checkpoint does not fit the rebuilt model")
    return model


def load_trainable_state(model: nn.Module, state: dict, problem: str) -> None:
    """``model.load_state_dict(state)`` where ``state`` may leave out the backbone (a checkpoint's
    ``"model"``); raises ``ValueError(problem: the keys missing and unexpected)`` otherwise."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("backbone.")]
    if missing or result.unexpected_keys:
        raise ValueError(f"{problem}: missing {missing[:10]}, unexpected {list(result.unexpected_keys)[:10]}")


def load_model(path: str, device: Optional[Union[str, torch.device]] = None) -> nn.Module:
    """A trained model from a checkpoint, in eval mode (for inference)."""
    model = build_model_from_checkpoint(path)
    if device is not None:
        model = model.to(device)
    return model.eval()


