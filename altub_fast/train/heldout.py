"""The held-out normal split: normal images the flows never train on, for the per-epoch held-out NLL,
the choice of ``best.pt``, early stopping, score calibration and the false-alarm threshold.

Two sources, in this order:

- ``"validation"``: a separate set of normal images handed to the trainer (``heldout=``), e.g. a
  category's ``validation/good`` (MVTec 3D-AD's layout; :meth:`altub_fast.data.MVTecAD.has_validation`);
  every training image is trained on.
- ``"fraction"``: a seeded fraction of the training images (``heldout_fraction``; the eval command's
  default is 0.1). ``n_heldout = round(fraction * n)``, at least 1 and leaving at least 1 to train on;
  which images are held out depends only on (seed, n).

The split is recorded in every checkpoint (indices and, where the dataset knows them, file paths)
and restored from it on resume, so a resumed run holds out exactly the images the first run held
out, whatever the options of the resumed process say.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

import torch
from torch.utils.data import Dataset, Subset

SOURCES = ("none", "fraction", "validation")


def dataset_files(ds) -> Optional[List[str]]:
    """The image files of a dataset in item order, without loading anything, or None if unknown
    (MVTecAD and anything with a ``paths`` list; Subsets of those)."""
    if isinstance(ds, Subset):
        inner = dataset_files(ds.dataset)
        return None if inner is None else [inner[int(i)] for i in ds.indices]
    paths = getattr(ds, "paths", None)
    if isinstance(paths, (list, tuple)) and len(paths) == len(ds):
        return [str(p) for p in paths]
    return None


def split_indices(n: int, fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """(train indices, held-out indices), both sorted: a seeded random ``fraction`` of ``range(n)``
    held out (at least one image, and at least one left to train on)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1) to split the training images, got {fraction}")
    if n < 2:
        raise ValueError(f"cannot hold out a fraction of {n} training image(s): need at least 2")
    k = min(n - 1, max(1, int(round(fraction * n))))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) * 7919 + 17))
    held = sorted(order[:k].tolist())
    held_set = set(held)
    return [i for i in range(n) if i not in held_set], held


@dataclass
class HeldoutSplit:
    """Which images train and which are held out (see the module docstring). Indices of the
    ``"fraction"`` source index the training data; those of ``"validation"`` the held-out set."""
    source: str = "none"
    fraction: float = 0.0
    seed: int = 0
    n_data: int = 0                              # images in the training data handed to the trainer
    train_indices: Optional[List[int]] = None    # None: all of them
    heldout_indices: Optional[List[int]] = None
    train_files: Optional[List[str]] = None
    heldout_files: Optional[List[str]] = None

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"held-out source must be one of {SOURCES}, got {self.source!r}")

    @property
    def n_train(self) -> int:
        return self.n_data if self.train_indices is None else len(self.train_indices)

    @property
    def n_heldout(self) -> int:
        return 0 if self.heldout_indices is None else len(self.heldout_indices)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(n_train=self.n_train, n_heldout=self.n_heldout)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HeldoutSplit":
        fields = {k: d[k] for k in ("source", "fraction", "seed", "n_data", "train_indices", "heldout_indices",
                                    "train_files", "heldout_files") if k in d}
        return cls(**fields)

    def describe(self) -> str:
        if self.source == "none":
            return "no held-out images"
        where = (f"a seeded {self.fraction:.3g} of the training images (seed {self.seed})" if self.source == "fraction"
                 else "a separate validation set")
        return f"{self.n_heldout} held-out normal images ({where}), {self.n_train} training images"


def make_split(data: Dataset, heldout: Optional[Dataset], fraction: float, seed: int) -> HeldoutSplit:
    """The split for training data ``data``: ``heldout`` (a separate set) if given, else a seeded
    ``fraction`` of ``data`` (none when ``fraction`` is 0)."""
    n = len(data)
    if heldout is not None:
        if len(heldout) == 0:
            raise ValueError("the held-out (validation) set is empty")
        return HeldoutSplit("validation", 0.0, int(seed), n, None, list(range(len(heldout))), dataset_files(data),
                            dataset_files(heldout))
    if not fraction:
        return HeldoutSplit("none", 0.0, int(seed), n, None, None, dataset_files(data), None)
    train_idx, held_idx = split_indices(n, float(fraction), int(seed))
    files = dataset_files(data)
    return HeldoutSplit("fraction", float(fraction), int(seed), n, train_idx, held_idx,
                        None if files is None else [files[i] for i in train_idx],
                        None if files is None else [files[i] for i in held_idx])


def split_datasets(split: HeldoutSplit, data: Dataset, heldout: Optional[Dataset]) -> Tuple[Dataset, Optional[Dataset]]:
    """(the images ``split`` trains on, the images it holds out or None) of training data ``data``
    and the separate held-out set ``heldout``."""
    train = data if split.train_indices is None else Subset(data, split.train_indices)
    if split.source == "fraction":
        return train, Subset(data, split.heldout_indices)
    return train, heldout if split.source == "validation" else None


def check_same_data(split: HeldoutSplit, data: Dataset, heldout: Optional[Dataset], where: str) -> None:
    """Raise if ``data`` (and ``heldout``) are not the images ``split`` was made from (its length
    and, where both sides know them, its files), naming the first difference."""
    if len(data) != split.n_data:
        raise ValueError(f"{where} was made from {split.n_data} training images; the training data now has "
                         f"{len(data)}: resume with the same data")
    files = dataset_files(data)
    if files is not None:
        want_train = split.train_files
        have_train = files if split.train_indices is None else [files[i] for i in split.train_indices]
        want_held = split.heldout_files if split.source == "fraction" else None
        have_held = [files[i] for i in split.heldout_indices] if split.source == "fraction" else None
        for what, want, have in (("training", want_train, have_train), ("held-out", want_held, have_held)):
            if want is not None and want != have:
                i = next((k for k, (a, b) in enumerate(zip(want, have)) if a != b), min(len(want), len(have)))
                raise ValueError(f"{where}: the {what} images differ from the checkpoint's (item {i}: "
                                 f"{want[i] if i < len(want) else 'none'} there, {have[i] if i < len(have) else 'none'} "
                                 f"now): resume with the same data")
    if split.source == "validation":
        if heldout is None:
            raise ValueError(f"{where} held out a separate validation set of {split.n_heldout} images; "
                             f"hand the same set to the trainer (heldout=) to resume")
        if len(heldout) != split.n_heldout:
            raise ValueError(f"{where} held out {split.n_heldout} validation images; the set handed in has "
                             f"{len(heldout)}")
        files = dataset_files(heldout)
        if files is not None and split.heldout_files is not None and files != split.heldout_files:
            raise ValueError(f"{where}: the validation images differ from the checkpoint's: resume with the same set")
