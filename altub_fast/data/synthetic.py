"""A small synthetic, carpet-like anomaly-detection dataset in MVTec AD layout.

Every image is generated from ``(seed, split, defect, index)`` with numpy only, so the same seed gives
the same pixels, and a set of any size shares its first images with larger sets. The texture imitates
MVTec AD's ``carpet``: two interleaved thread systems (a 2/2 twill, so the weave shows diagonal ribs)
with per-thread colour jitter, per-crossing brightness jitter, fibre noise stretched along each
thread, slightly wavy threads and slow illumination changes. The defects imitate carpet's five defect
types and each comes with an exact binary mask (the pixels the defect changed, and only those):

- ``color``: a stain of irregular outline that tints the texture;
- ``cut``: a slit along a slightly curved line, dark inside with frayed light edges;
- ``hole``: a dark, roughly round gap with a ragged rim;
- ``metal_contamination``: a small shiny grey fragment with a highlight;
- ``thread``: a loose thread of another colour lying across the weave.

:func:`make_synthetic_carpet` writes the set to ``<root>/<category>`` atomically (temporary folder,
completion marker, ``os.replace``) and reuses an existing complete set made with the same settings.
:class:`SyntheticCarpet` is an :class:`~altub_fast.data.MVTecAD` over that folder.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
from PIL import Image
from scipy import ndimage

from .download import install_atomically, is_complete, read_marker
from .mvtec import DatasetError, MVTecAD

__all__ = [
    "SYNTHETIC_DEFECTS",
    "SyntheticCarpet",
    "add_defect",
    "carpet_texture",
    "make_synthetic_carpet",
    "synthesize_image",
]

SYNTHETIC_DEFECTS: Tuple[str, ...] = ("color", "cut", "hole", "metal_contamination", "thread")
GENERATOR_VERSION = 1
_SPLITS = {"train": 0, "test": 1}

PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------------------------------------------
# texture

def _smooth_noise(rng: np.random.Generator, shape: Tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-blurred white noise rescaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return field / (field.std() + 1e-12)


def carpet_texture(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A defect-free woven texture, float32 (size, size, 3) in [0, 1].

    The thread period is about ``size / 32`` pixels (8 px at 256), so the weave keeps the same look
    at every size; phase, waviness, colours and noise vary from image to image.
    """
    scale = size / 256.0
    period = 8.0 * scale * rng.uniform(0.97, 1.03)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    # wavy, slightly irregular threads
    warp = 2.5 * scale
    xs = xx + warp * _smooth_noise(rng, (size, size), 24 * scale) * 0.4
    ys = yy + warp * _smooth_noise(rng, (size, size), 24 * scale) * 0.4
    u = xs / period + rng.uniform(0, 4)
    v = ys / period + rng.uniform(0, 4)
    col = np.floor(u).astype(np.int64)
    row = np.floor(v).astype(np.int64)
    fu, fv = u - col, v - row
    col -= col.min()
    row -= row.min()

    # 2/2 twill: which thread system lies on top at each crossing
    horizontal_on_top = ((row + col) % 4) < 2

    base_h = np.array([0.58, 0.50, 0.42]) * rng.uniform(0.95, 1.05)
    base_v = np.array([0.47, 0.43, 0.39]) * rng.uniform(0.95, 1.05)

    def thread_colours(base: np.ndarray, n: int) -> np.ndarray:
        # mostly brightness variation between threads, a little hue variation
        return base * rng.normal(1.0, 0.06, (n, 1)) + rng.normal(0.0, 0.012, (n, 3))

    colour = np.where(horizontal_on_top[..., None], thread_colours(base_h, row.max() + 1)[row],
                      thread_colours(base_v, col.max() + 1)[col])

    # thread profile: bright along the middle of the visible thread, shadowed between threads;
    # a float passes over two crossings, so the profile along it spans two cells
    phase = (row + col) % 4
    across = np.where(horizontal_on_top, np.sin(np.pi * fv), np.sin(np.pi * fu)) ** 0.7
    along = np.where(horizontal_on_top, (phase + fu) / 2, (phase - 2 + fv) / 2)
    shade = 0.30 + 0.70 * across * (0.7 + 0.3 * np.sin(np.pi * along) ** 0.5)

    # per-crossing brightness jitter
    cell = rng.normal(0.0, 0.05, (row.max() + 1, col.max() + 1))
    shade = shade * (1.0 + cell[row, col])

    # fibre noise stretched along each thread direction
    white = rng.standard_normal((size, size))
    length = max(3, int(round(5 * scale)))
    fibre_h = ndimage.uniform_filter1d(white, length, axis=1, mode="wrap")
    fibre_v = ndimage.uniform_filter1d(white, length, axis=0, mode="wrap")
    fibre = np.where(horizontal_on_top, fibre_h, fibre_v) * np.sqrt(length)
    shade = shade * (1.0 + 0.08 * fibre)

    light = 1.0 + 0.05 * _smooth_noise(rng, (size, size), 48 * scale)
    image = colour * (shade * light)[..., None]
    image += rng.normal(0.0, 0.008, image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# defect shapes

def _blob(rng: np.random.Generator, size: int, radius: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An irregular star-shaped region at a random place inside the image:
    (mask, normalised radius r / R(theta), angle theta) for every pixel."""
    margin = radius * 1.5 + 2
    centre = (rng.uniform(margin, size - margin), rng.uniform(margin, size - margin))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dy, dx = yy - centre[0], xx - centre[1]
    theta = np.arctan2(dy, dx)
    boundary = np.ones_like(theta)
    for k in range(2, 6):
        boundary += rng.uniform(0.0, 0.18 / (k - 1)) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    rel = np.hypot(dy, dx) / (radius * boundary)
    return rel <= 1.0, rel, theta


def _curve(rng: np.random.Generator, size: int, length: float, bend: float) -> np.ndarray:
    """Points (n, 2) in (y, x) along a smooth random curve of about ``length`` pixels inside the image."""
    margin = 0.5 * length + 6
    start = rng.uniform(margin, size - margin, 2)
    angle = rng.uniform(0, 2 * np.pi)
    n = max(8, int(length))
    turn = np.cumsum(rng.normal(0.0, bend, n))
    turn = ndimage.gaussian_filter1d(turn, 4)
    heading = angle + turn
    steps = np.stack([np.sin(heading), np.cos(heading)], axis=1) * (length / n)
    points = np.cumsum(steps, axis=0)
    points -= points.mean(axis=0)
    return np.clip(points + start, 2, size - 3)


def _distance_to_curve(points: np.ndarray, size: int) -> np.ndarray:
    """Euclidean distance of every pixel centre to a polyline given by dense ``points`` (y, x)."""
    raster = np.ones((size, size), dtype=bool)
    fine = np.linspace(0, len(points) - 1, 4 * len(points))
    ys = np.interp(fine, np.arange(len(points)), points[:, 0])
    xs = np.interp(fine, np.arange(len(points)), points[:, 1])
    raster[np.round(ys).astype(int), np.round(xs).astype(int)] = False
    return ndimage.distance_transform_edt(raster)


def _luma(image: np.ndarray) -> np.ndarray:
    """Rec. 601 luma of an (..., 3) image."""
    return image @ np.array([0.299, 0.587, 0.114], dtype=image.dtype)


def _colour_stain(rng: np.random.Generator, image: np.ndarray, size: int,
                  scale: float) -> Tuple[np.ndarray, np.ndarray]:
    """A tinted stain of irregular outline; the weave shows through."""
    mask, rel, _ = _blob(rng, size, rng.uniform(11, 20) * scale)
    palette = np.array([[0.55, 0.12, 0.10], [0.25, 0.16, 0.08], [0.15, 0.25, 0.55], [0.70, 0.60, 0.15]])
    stain = palette[rng.integers(len(palette))] * rng.uniform(0.85, 1.15)
    alpha = rng.uniform(0.65, 0.8) * (1.0 - 0.3 * rel ** 4)
    tinted = stain * (0.5 + 1.2 * _luma(image))[..., None]
    out = image * (1 - alpha[..., None]) + tinted * alpha[..., None]
    return np.where(mask[..., None], out, image), mask


def _cut(rng: np.random.Generator, image: np.ndarray, size: int,
         scale: float) -> Tuple[np.ndarray, np.ndarray]:
    """A slit: dark gap with frayed, lighter fibre ends along its rim."""
    points = _curve(rng, size, rng.uniform(35, 70) * scale, bend=0.02)
    half_width = rng.uniform(1.5, 2.5) * scale
    dist = _distance_to_curve(points, size)
    mask = dist <= half_width
    rim = (dist > half_width - 1.0 * scale) & mask
    noise = rng.uniform(0.0, 1.0, (size, size))
    gap = image * rng.uniform(0.2, 0.3) * (0.7 + 0.6 * noise[..., None])
    frayed = np.clip(image * 1.35 + 0.08, 0, 1)
    out = np.where(rim[..., None] & (noise[..., None] > 0.4), frayed, gap)
    return np.where(mask[..., None], out, image), mask


def _hole(rng: np.random.Generator, image: np.ndarray, size: int,
          scale: float) -> Tuple[np.ndarray, np.ndarray]:
    """A dark gap (the backing) with a ragged rim of lifted fibres."""
    radius = rng.uniform(8, 13) * scale
    mask, rel, _ = _blob(rng, size, radius)
    # a ragged rim: random fibres reaching into the gap
    fibres = ndimage.uniform_filter1d(rng.uniform(0, 1, (size, size)), 3, axis=int(rng.integers(2)))
    backing = np.array([0.10, 0.09, 0.08]) * (0.7 + 0.6 * rng.uniform(0, 1, (size, size, 1)))
    rim = (rel > 0.7) & (fibres > 0.5)
    lifted = np.clip(image * 1.25, 0, 1)
    out = np.where(rim[..., None], lifted, backing)
    return np.where(mask[..., None], out, image), mask


def _metal(rng: np.random.Generator, image: np.ndarray, size: int,
           scale: float) -> Tuple[np.ndarray, np.ndarray]:
    """A small shiny grey fragment, shaded by one light direction, with a highlight."""
    radius = rng.uniform(7, 11) * scale
    mask, rel, theta = _blob(rng, size, radius)
    mask = mask & (rel * (1 + 0.35 * np.cos(3 * theta + rng.uniform(0, 6.3))) <= 1.0)
    light_dir = rng.uniform(0, 2 * np.pi)
    facet = 0.55 + 0.3 * np.cos(theta - light_dir) * rel
    highlight = np.exp(-((rel * np.cos(theta - light_dir) - 0.3) ** 2 + (rel * np.sin(theta - light_dir)) ** 2) / 0.05)
    grey = np.clip(facet + 0.45 * highlight, 0, 1)
    metal = grey[..., None] * np.array([0.78, 0.80, 0.85]) * rng.uniform(0.9, 1.1)
    return np.where(mask[..., None], np.clip(metal, 0, 1), image), mask


def _loose_thread(rng: np.random.Generator, image: np.ndarray, size: int,
                  scale: float) -> Tuple[np.ndarray, np.ndarray]:
    """A loose thread of another colour lying across the weave."""
    points = _curve(rng, size, rng.uniform(50, 100) * scale, bend=0.12)
    half_width = rng.uniform(1.4, 2.2) * scale
    dist = _distance_to_curve(points, size)
    mask = dist <= half_width
    colours = np.array([[0.92, 0.86, 0.72], [0.22, 0.16, 0.12], [0.72, 0.28, 0.18], [0.25, 0.30, 0.50]])
    colour = colours[rng.integers(len(colours))] * rng.uniform(0.9, 1.1)
    profile = 0.65 + 0.35 * np.cos(np.clip(dist / (half_width + 0.5), 0, 1) * np.pi / 2)
    fibre = 1.0 + 0.1 * rng.standard_normal((size, size))
    thread = colour * (profile * fibre)[..., None]
    return np.where(mask[..., None], np.clip(thread, 0, 1), image), mask


_DEFECT_FUNCS = {
    "color": _colour_stain,
    "cut": _cut,
    "hole": _hole,
    "metal_contamination": _metal,
    "thread": _loose_thread,
}


def add_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Paint one defect of ``kind`` (one of :data:`SYNTHETIC_DEFECTS`) onto a float (S, S, 3) image.

    Returns ``(image, mask)``: the new float32 image and a boolean (S, S) mask that is True exactly on
    the pixels the defect changed. Defect sizes scale with ``S / 256``.
    """
    if kind not in _DEFECT_FUNCS:
        raise ValueError(f"unknown defect {kind!r}; expected one of {SYNTHETIC_DEFECTS}")
    size = image.shape[0]
    out, mask = _DEFECT_FUNCS[kind](rng, image.astype(np.float64), size, size / 256.0)
    return out.astype(np.float32), mask


def synthesize_image(seed: int, split: str, defect: str, index: int,
                     size: int = 256) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """One image of the set, uint8 (size, size, 3), and its uint8 0/255 mask (``None`` for ``good``).

    Deterministic in ``(seed, split, defect, index, size)`` and independent of how many images the set
    holds.
    """
    defect_id = 0 if defect == "good" else 1 + SYNTHETIC_DEFECTS.index(defect)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLITS[split], defect_id, index]))
    image = carpet_texture(rng, size)
    mask = None
    if defect != "good":
        image, mask_bool = add_defect(image, defect, rng)
        mask = mask_bool.astype(np.uint8) * 255
    return np.round(image * 255).astype(np.uint8), mask


# ---------------------------------------------------------------------------------------------------
# on disk

def _settings(seed: int, n_train: int, n_test_good: int, n_test_defect: int, size: int) -> Dict[str, int]:
    return {"generator": "carpet_synthetic", "version": GENERATOR_VERSION, "seed": seed,
            "n_train": n_train, "n_test_good": n_test_good, "n_test_defect": n_test_defect, "size": size}


def make_synthetic_carpet(
    root: PathLike,
    seed: int = 0,
    n_train: int = 60,
    n_test_good: int = 20,
    n_test_defect: int = 4,
    size: int = 256,
    category: str = "carpet_synthetic",
    overwrite: bool = False,
) -> Path:
    """Write the synthetic carpet set to ``<root>/<category>`` in MVTec AD layout; return that folder.

    Layout: ``train/good/NNN.png`` (``n_train``), ``test/good/NNN.png`` (``n_test_good``),
    ``test/<defect>/NNN.png`` and ``ground_truth/<defect>/NNN_mask.png`` (``n_test_defect`` per
    defect in :data:`SYNTHETIC_DEFECTS`), RGB PNGs of ``size`` x ``size`` and 0/255 greyscale masks.

    The set is generated in a temporary folder inside ``root``, marked complete (marker holds the
    settings) and moved into place with ``os.replace``. A complete set with the same settings is reused
    as is; one with other settings raises :class:`DatasetError` unless ``overwrite``.
    """
    for name, value in (("n_train", n_train), ("n_test_good", n_test_good), ("n_test_defect", n_test_defect)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if size < 32:
        raise ValueError(f"size must be at least 32, got {size}")
    root = Path(root)
    dest = root / category
    settings = _settings(seed, n_train, n_test_good, n_test_defect, size)
    if is_complete(dest):
        existing = read_marker(dest)
        if existing == settings:
            return dest
        if not overwrite:
            raise DatasetError(
                f"{dest} holds a synthetic set made with other settings ({existing}); "
                f"pass overwrite=True or choose another root or category (wanted {settings})"
            )
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-synthetic-", dir=root))
    try:
        out = staging / category
        jobs = [("train", "good", n_train), ("test", "good", n_test_good)]
        jobs += [("test", d, n_test_defect) for d in SYNTHETIC_DEFECTS]
        for split, defect, count in jobs:
            folder = out / split / defect
            folder.mkdir(parents=True)
            if defect != "good":
                (out / "ground_truth" / defect).mkdir(parents=True)
            for i in range(count):
                image, mask = synthesize_image(seed, split, defect, i, size)
                Image.fromarray(image, mode="RGB").save(folder / f"{i:03d}.png")
                if mask is not None:
                    Image.fromarray(mask, mode="L").save(out / "ground_truth" / defect / f"{i:03d}_mask.png")
        install_atomically(out, dest, settings, overwrite=overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


class SyntheticCarpet(MVTecAD):
    """:class:`MVTecAD` over the synthetic carpet set, generating it first if needed.

    Args:
        root: folder that holds (or will hold) ``<category>``.
        split, image_size, normalize: as for :class:`MVTecAD`.
        seed, n_train, n_test_good, n_test_defect, size, category: as for :func:`make_synthetic_carpet`.
    """

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        image_size: Union[int, Tuple[int, int]] = 256,
        normalize: bool = True,
        seed: int = 0,
        n_train: int = 60,
        n_test_good: int = 20,
        n_test_defect: int = 4,
        size: int = 256,
        category: str = "carpet_synthetic",
    ) -> None:
        make_synthetic_carpet(root, seed=seed, n_train=n_train, n_test_good=n_test_good,
                              n_test_defect=n_test_defect, size=size, category=category)
        super().__init__(root, category, split=split, image_size=image_size, normalize=normalize)
