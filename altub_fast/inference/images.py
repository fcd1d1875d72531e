"""Reading image files for a model: resized to its input size, ImageNet-normalised or not.

Every file is read as in training (:func:`altub_fast.data.mvtec.load_image`: any size, greyscale
or RGB, 16-bit scaled, resized bilinearly with antialiasing) into RGB in [0, 1]. Normalisation is
the caller's explicit choice: ``normalise=True`` gives what ``model.anomaly_map`` takes,
``normalise=False`` what an exported graph (normalisation inside) and the overlays take. Nothing
downstream has to undo it.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from ..data.mvtec import DatasetError, load_image
from ..imagenet import normalise as imagenet_normalise

__all__ = ["ImageBatch", "read_image", "read_images", "try_read_image", "stack_batch"]


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


def try_read_image(path: str, size_hw: Tuple[int, int], normalise: bool = True) -> Tuple[Optional[torch.Tensor], str]:
    """(image, "") as :func:`read_image` gives it, or (None, why it cannot be read) (a file PIL
    cannot identify is reported as not an image file). Safe to call from worker threads."""
    try:
        return read_image(path, size_hw, normalise), ""
    except (DatasetError, OSError, ValueError) as e:
        msg = str(e)
        if "cannot identify image file" in msg:
            msg = f"not an image file (PIL cannot identify it): {path}"
        return None, msg


def stack_batch(results: Sequence[Tuple[Optional[torch.Tensor], str]], size_hw: Tuple[int, int]) -> ImageBatch:
    """An :class:`ImageBatch` from :func:`try_read_image` results, in order."""
    images = [im for im, _ in results if im is not None]
    ok = [i for i, (im, _) in enumerate(results) if im is not None]
    bad = [(i, msg) for i, (im, msg) in enumerate(results) if im is None]
    stacked = torch.stack(images) if images else torch.empty(0, 3, int(size_hw[0]), int(size_hw[1]))
    return ImageBatch(stacked, ok, bad)


def read_images(files: Sequence[str], size_hw: Tuple[int, int], normalise: bool = True) -> ImageBatch:
    """The files that load, stacked (n, 3, H, W) (see :func:`read_image`), with the positions of the
    others and why each failed (see :func:`try_read_image`)."""
    size_hw = (int(size_hw[0]), int(size_hw[1]))
    return stack_batch([try_read_image(f, size_hw, normalise) for f in files], size_hw)
