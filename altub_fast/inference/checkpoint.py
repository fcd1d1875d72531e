"""Opening a trained checkpoint for inference, with errors that say what is wrong with the file.

:func:`open_checkpoint` wraps the trainer's ``load_checkpoint_file`` and ``load_model``
(``altub_fast/train/checkpoint.py``) and turns each way a file can fail into one
:class:`CheckpointError` whose message names the file and the problem:

- missing path: ``checkpoint X does not exist``; a folder: ``checkpoint X is not a file``;
- truncated, corrupt or not a torch file (``RuntimeError``, ``EOFError``, ``UnpicklingError``,
  ``BadZipFile``, ``OSError`` from ``torch.load``): ``cannot read checkpoint X (N bytes): the file is
  truncated, corrupt or not a torch checkpoint (<error>)``;
- a torch file without the ``altub_fast.checkpoint/1`` format tag (an older altub_fast, another
  program): the trainer's ``is not an altub_fast training checkpoint`` plus how to get a new one;
- a backbone whose pretrained weights cannot be loaded here (``BackboneWeightsError``): ``needs its
  backbone's pretrained weights ...``;
- a model description this version cannot rebuild (``KeyError``, ``TypeError``, ``ValueError`` while
  building or loading the state dict): ``does not describe a model this altub_fast can rebuild``.

The command-line tools (predict, export) print the message after ``error:`` and exit with status 2.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Optional, Tuple

import torch.nn as nn

from ..models import BackboneWeightsError
from ..train.checkpoint import load_checkpoint_file, load_model

__all__ = ["CheckpointError", "open_checkpoint", "load_model"]


class CheckpointError(ValueError):
    """A checkpoint cannot be used for inference (missing, truncated, an older format, ...). The
    message names the file and the problem."""


def open_checkpoint(path: str, device: Optional[str] = None) -> Tuple[nn.Module, dict]:
    """(model in eval mode on ``device``, the checkpoint dict) from a trainer checkpoint, or a
    :class:`CheckpointError` that says what is wrong with the file (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist" if not p.exists() else
                              f"checkpoint {path} is not a file")
    try:
        ck = load_checkpoint_file(str(p))
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"cannot read checkpoint {path} ({p.stat().st_size} bytes): the file is truncated, "
                              f"corrupt or not a torch checkpoint ({type(e).__name__}: {_first_line(e)})") from e
    except ValueError as e:   # the trainer's "not an altub_fast training checkpoint (format ...)"
        raise CheckpointError(f"{e}; it may come from an older altub_fast or another program: "
                              f"re-train, or re-save it with the current altub_fast.train.AltUBTrainer") from e
    try:
        model = load_model(str(p), device=device)
    except BackboneWeightsError as e:
        raise CheckpointError(f"checkpoint {path} needs its backbone's pretrained weights, which cannot be "
                              f"loaded here: {e}") from e
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} does not describe a model this altub_fast can rebuild "
                              f"(an older checkpoint format?): {type(e).__name__}: {_first_line(e)}") from e
    return model, ck


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
