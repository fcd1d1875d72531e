"""Reading image files for a model: resized to its input size, ImageNet-normalised or not.

Every file is read as in training (:func:`altub_fast.data.mvtec.load_image`: any size, greyscale
or RGB, 16-bit scaled, resized bilinearly with antialiasing) into RGB in [0, 1]. Normalisation is
the caller's explicit choice: ``normalise=True`` gives what ``model.anomaly_map`` takes,
``normalise=False`` what an exported graph (normalisation inside) and the overlays take. Nothing
downstream has to undo it.
"""
from __future__ import annotations

from typing import List, NamedTuple, Sequence, Tuple

import torch

from ..data.mvtec import DatasetError, load_image
from ..imagenet import normalise as imagenet_normalise

__all__ = ["ImageBatch", "read_image", "read_images"]


class ImageBatch(NamedTuple):
    """What :func:`read_images` gives: it unpacks as ``images, ok, bad``."""
    images: torch.Tensor                 # (n, 3, H, W) float32 of the files that loaded
    ok: List[int]                        # their positions in the list of files
    bad: List[Tuple[int, str]]           # (position, error message) of the others


def read_image(path: str, size_hw: Tuple[int, int], normalise: bool = True) -> torch.Tensor:
    """One image file as float32 (3, H, W): RGB in [0, 1], ImageNet-normalised when ``normalise``.
    Unreadable files raise :class:`~altub_fast.data.DatasetError` (or ``OSError`` / ``ValueError``)."""
    image = torch.from_numpy(load_image(path, size_hw))
    return imagenet_normalise(image) if normalise else image


def read_images(files: Sequence[str], size_hw: Tuple[int, int], normalise: bool = True) -> ImageBatch:
    """The files that load, stacked (n, 3, H, W) (see :func:`read_image`), with the positions of the
    others and why each failed (a file PIL cannot identify is reported as not an image file)."""
    size_hw = (int(size_hw[0]), int(size_hw[1]))
    images, ok, bad = [], [], []
    for i, f in enumerate(files):
        try:
            images.append(read_image(f, size_hw, normalise))
            ok.append(i)
        except (DatasetError, OSError, ValueError) as e:
            msg = str(e)
            if "cannot identify image file" in msg:
                msg = f"not an image file (PIL cannot identify it): {f}"
            bad.append((i, msg))
    stacked = torch.stack(images) if images else torch.empty(0, 3, *size_hw)
    return ImageBatch(stacked, ok, bad)
