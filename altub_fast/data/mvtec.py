"""MVTec AD style datasets (SPEC section 5).

Layout read by :class:`MVTecAD`::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect>/*.png
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png
    <root>/<category>/validation/good/*.png          (optional: held-out normal images, MVTec 3D-AD)

Any folder in this layout loads unchanged, MVTec AD itself as well as look-alikes such as the
greyscale, variable-size ``magnetic_tile`` set: greyscale images become three channels, every image
is resized to one size, and a defective image whose mask is empty is accepted (it is labelled 1 and
contributes no positive pixel).

Categories without masks. A category with no ``ground_truth/`` folder at all (a user with
good/defective labels but no pixel masks, like ``shared/data/bottle``) loads with its masks marked
absent: ``has_masks`` is False and test items carry no ``"mask"``, so image metrics can be computed
and pixel metrics cannot. In a category that has ``ground_truth/``, a defective image without its
mask stays an error naming the file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..imagenet import IMAGENET_MEAN, IMAGENET_STD, denormalise, normalise

__all__ = [
    "DatasetError",
    "DatasetNotFoundError",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "MVTEC_CATEGORIES",
    "MVTecAD",
    "SPLITS",
    "Sample",
    "denormalize",
    "load_image",
    "load_mask",
]

MVTEC_CATEGORIES: Tuple[str, ...] = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)
IMAGE_EXTENSIONS: Tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

_GOOD = "good"
SPLITS: Tuple[str, ...] = ("train", "test", "validation")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class DatasetError(ValueError):
    """A dataset on disk is malformed (bad layout, unreadable file, ...). The message names the path."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A path the dataset needs (root, category folder, mask) does not exist."""


@dataclass(frozen=True)
class Sample:
    """One item of a dataset, listed without loading it.

    Attributes:
        path: the image file.
        label: 0 for ``good``, 1 for any defect.
        defect: the defect folder name (``"good"`` for defect-free images).
        mask_path: the ground-truth mask file, ``None`` for good images and in a category without masks.
    """

    path: str
    label: int
    defect: str
    mask_path: Optional[str]


def _list_images(folder: Path) -> List[Path]:
    """Image files directly inside ``folder``, sorted by name; hidden files are skipped."""
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _find_mask(gt_dir: Path, stem: str) -> Optional[Path]:
    """The mask ``<stem>_mask.<ext>`` in ``gt_dir`` (PNG preferred), or ``None``."""
    for ext in IMAGE_EXTENSIONS:
        for candidate in (gt_dir / f"{stem}_mask{ext}", gt_dir / f"{stem}_mask{ext.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def _open(path: str) -> Image.Image:
    """Open and fully decode an image, turning any decoder failure into a :class:`DatasetError`."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError as exc:
        raise DatasetNotFoundError(f"image file not found: {path}") from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc


def _to_unit_float(im: Image.Image, path: str) -> np.ndarray:
    """Pixel values of a single-band 16-bit or integer image scaled to [0, 1], float32 (H, W)."""
    arr = np.asarray(im, dtype=np.float32)
    if arr.ndim != 2:
        raise DatasetError(f"unsupported image mode {im.mode!r} in {path}")
    return np.clip(arr / 65535.0, 0.0, 1.0)


def _resize_float(arr: np.ndarray, size_hw: Tuple[int, int], resample: int) -> np.ndarray:
    """Resize a float32 (H, W) array with PIL's 'F' mode (bilinear is antialiased on downscaling)."""
    if arr.shape == size_hw:
        return arr
    out = Image.fromarray(arr, mode="F").resize((size_hw[1], size_hw[0]), resample=resample)
    return np.asarray(out, dtype=np.float32)


def _image_to_array(im: Image.Image, path: str, size_hw: Tuple[int, int]) -> np.ndarray:
    """A decoded image as float32 (3, H, W) in [0, 1], resized bilinearly (antialiased)."""
    if im.mode in _SIXTEEN_BIT_MODES:
        grey = _resize_float(_to_unit_float(im, path), size_hw, Image.BILINEAR)
        return np.repeat(grey[None], 3, axis=0)
    if im.mode not in ("L", "RGB"):
        im = im.convert("RGB")
    if im.size != (size_hw[1], size_hw[0]):
        im = im.resize((size_hw[1], size_hw[0]), resample=Image.BILINEAR)
    arr = np.asarray(im, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        return np.repeat(arr[None], 3, axis=0)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _mask_to_array(im: Image.Image, path: str, size_hw: Tuple[int, int]) -> np.ndarray:
    """A decoded mask as float32 (1, H, W) of 0/1: nearest-neighbour resize, then ``>= 0.5`` of full scale."""
    if im.mode in _SIXTEEN_BIT_MODES:
        arr = _resize_float(_to_unit_float(im, path), size_hw, Image.NEAREST)
    else:
        if im.mode not in ("1", "L"):
            im = im.convert("L")
        if im.size != (size_hw[1], size_hw[0]):
            im = im.resize((size_hw[1], size_hw[0]), resample=Image.NEAREST)
        arr = np.asarray(im, dtype=np.float32)
        if im.mode == "L":
            arr = arr / 255.0
    return (arr >= 0.5).astype(np.float32)[None]


def load_image(path: str, size_hw: Tuple[int, int]) -> np.ndarray:
    """Read an image as float32 (3, H, W) in [0, 1], resized bilinearly (with antialiasing).

    Greyscale images are repeated to three channels; palette and alpha images are converted to RGB;
    16-bit greyscale is scaled by 1/65535. Unreadable files raise :class:`DatasetError`.
    """
    return _image_to_array(_open(path), path, size_hw)


def load_mask(path: str, size_hw: Tuple[int, int]) -> np.ndarray:
    """Read a mask as float32 (1, H, W) of 0/1: nearest-neighbour resize, then ``>= 0.5`` of full scale."""
    return _mask_to_array(_open(path), path, size_hw)


class MVTecAD(Dataset):
    """One category of an MVTec AD style dataset.

    Args:
        root: the folder holding category folders (``<root>/<category>/...``).
        category: the category folder name, e.g. ``"carpet"``.
        split: ``"train"`` (``train/good`` only), ``"test"`` (``test/good`` and every defect folder) or
            ``"validation"`` (``validation/good``: held-out normal images, where the category has them;
            see :meth:`has_validation`).
        image_size: output size, an int for square images or ``(height, width)``.
        normalize: apply ImageNet normalisation (:func:`altub_fast.imagenet.normalise`: mean 0.485, 0.456,
            0.406; std 0.229, 0.224, 0.225).
            With ``False`` images stay in [0, 1].

    Each item is a dict: ``image`` float32 (3, H, W); ``mask`` float32 (1, H, W) of 0/1 (zeros for good
    images; absent from every item when ``has_masks`` is False); ``label`` int (good 0, defect 1);
    ``defect`` str; ``path`` str.

    ``has_masks``: False for the test split of a category without a ``ground_truth/`` folder (its
    pixel metrics are not available); True otherwise.

    The file list is built and checked at construction (``self.samples``); images are decoded in
    ``__getitem__``. Problems raise :class:`DatasetError` (or :class:`DatasetNotFoundError`) naming the
    path: a missing root or category (listing the categories found), an empty ``train/good`` folder or
    test split, a defective image without a mask in a category that has ``ground_truth/``, an
    unreadable image or mask.
    """

    def __init__(
        self,
        root: Union[str, os.PathLike],
        category: str,
        split: str = "train",
        image_size: Union[int, Tuple[int, int]] = 256,
        normalize: bool = True,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        if len(image_size) != 2 or min(image_size) <= 0:
            raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}")
        self.root = Path(root)
        self.category = category
        self.split = split
        self.image_size: Tuple[int, int] = (int(image_size[0]), int(image_size[1]))
        self.normalize = normalize
        self.category_dir = self._category_dir(self.root, category)
        self.has_masks = split != "test" or (self.category_dir / "ground_truth").is_dir()
        if split == "test":
            self.samples: List[Sample] = self._scan_test()
        else:
            self.samples = self._scan_good(split)

    @classmethod
    def has_validation(cls, root: Union[str, os.PathLike], category: str) -> bool:
        """Does ``<root>/<category>/validation/good`` exist and hold images?"""
        folder = Path(root) / category / "validation" / _GOOD
        return folder.is_dir() and bool(_list_images(folder))

    @staticmethod
    def categories(root: Union[str, os.PathLike]) -> List[str]:
        """Sorted names of the folders under ``root`` that hold a ``train`` or ``test`` folder."""
        root = Path(root)
        if not root.is_dir():
            raise DatasetNotFoundError(f"dataset root not found: {root}")
        return sorted(
            p.name for p in root.iterdir()
            if p.is_dir() and not p.name.startswith(".")
            and ((p / "train").is_dir() or (p / "test").is_dir())
        )

    @classmethod
    def _category_dir(cls, root: Path, category: str) -> Path:
        found = cls.categories(root)
        path = root / category
        if not path.is_dir():
            raise DatasetNotFoundError(
                f"category {category!r} not found: {path} does not exist "
                f"(categories under {root}: {', '.join(found) if found else 'none'})"
            )
        return path

    def _scan_good(self, split: str) -> List[Sample]:
        good = self.category_dir / split / _GOOD
        what = "training" if split == "train" else split
        if not good.is_dir():
            raise DatasetNotFoundError(f"{what} folder not found: {good}")
        files = _list_images(good)
        if not files:
            raise DatasetError(f"no images in {what} folder {good} (extensions {IMAGE_EXTENSIONS})")
        return [Sample(str(p), 0, _GOOD, None) for p in files]

    def _scan_test(self) -> List[Sample]:
        test = self.category_dir / "test"
        if not test.is_dir():
            raise DatasetNotFoundError(f"test folder not found: {test}")
        defects = sorted(p.name for p in test.iterdir() if p.is_dir() and not p.name.startswith("."))
        # good first, then the defect folders in name order
        defects.sort(key=lambda d: d != _GOOD)
        samples: List[Sample] = []
        for defect in defects:
            for img in _list_images(test / defect):
                if defect == _GOOD:
                    samples.append(Sample(str(img), 0, _GOOD, None))
                    continue
                if not self.has_masks:
                    samples.append(Sample(str(img), 1, defect, None))
                    continue
                gt_dir = self.category_dir / "ground_truth" / defect
                mask = _find_mask(gt_dir, img.stem)
                if mask is None:
                    raise DatasetNotFoundError(
                        f"defective image {img} has no mask: expected {gt_dir / (img.stem + '_mask.png')} "
                        f"(the category has {self.category_dir / 'ground_truth'}, so every defective image "
                        f"needs its mask; a category without any ground_truth/ folder loads without masks)"
                    )
                samples.append(Sample(str(img), 1, defect, str(mask)))
        if not samples:
            raise DatasetError(f"no test images under {test}")
        return samples

    @property
    def labels(self) -> List[int]:
        """Image labels in item order (0 good, 1 defect), without loading anything."""
        return [s.label for s in self.samples]

    @property
    def paths(self) -> List[str]:
        """Image files in item order, without loading anything."""
        return [s.path for s in self.samples]

    @property
    def defects(self) -> List[str]:
        """Sorted defect folder names present in this split (``good`` excluded)."""
        return sorted({s.defect for s in self.samples if s.defect != _GOOD})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Dict[str, object]:
        sample = self.samples[index]
        im = _open(sample.path)
        image = torch.from_numpy(_image_to_array(im, sample.path, self.image_size))
        if self.normalize:
            image = normalise(image)
        item: Dict[str, object] = {"image": image}
        if self.has_masks:
            item["mask"] = self._mask(sample, im.size)
        item.update(label=sample.label, defect=sample.defect, path=sample.path)
        return item

    def _mask(self, sample: Sample, image_wh: Tuple[int, int]) -> torch.Tensor:
        """The sample's mask (1, H, W) of 0/1: zeros for a good image, else read and size-checked."""
        if sample.mask_path is None:
            return torch.zeros((1, *self.image_size), dtype=torch.float32)
        mask_im = _open(sample.mask_path)
        if mask_im.size != image_wh:
            raise DatasetError(
                f"mask {sample.mask_path} is {mask_im.size[0]}x{mask_im.size[1]} but its image "
                f"{sample.path} is {image_wh[0]}x{image_wh[1]} (width x height)"
            )
        return torch.from_numpy(_mask_to_array(mask_im, sample.mask_path, self.image_size))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, category={self.category!r}, "
            f"split={self.split!r}, n={len(self)}, image_size={self.image_size}, normalize={self.normalize})"
        )


denormalize = denormalise   # the older spelling, kept for callers of altub_fast.data.denormalize
