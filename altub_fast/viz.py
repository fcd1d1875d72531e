"""PNG figures for evaluation: anomaly-map overlays and ROC curves.

Matplotlib is imported inside the functions and drawn through its Agg canvas directly (no pyplot, no
global backend switch), so importing this module is cheap and works on machines without a display.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np

from .imagenet import IMAGENET_MEAN, IMAGENET_STD
from .metrics import image_auroc, pixel_auroc
from .metrics.inputs import ArrayLike, _chunks, _ImageStack, _stacks, _to_numpy

__all__ = ["save_overlays", "save_roc_curves"]

PathLike = Union[str, os.PathLike]


def _new_figure(width: float, height: float):
    """A matplotlib Figure bound to an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _output_name(index: int, path: str) -> str:
    """``NNNN_<defect>_<stem>.png`` from an MVTec-style image path (``.../test/<defect>/<stem>.png``)."""
    p = Path(path)
    parts = [f"{index:04d}", p.parent.name, p.stem]
    safe = "_".join(x for x in parts if x)
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in safe) + ".png"


def _draw_overlay(rgb: np.ndarray, amap: np.ndarray, mask: np.ndarray, has_truth: bool, vrange, alpha: float,
                  title: str, target: Path) -> None:
    """One overlay PNG: the image (with the mask contour), the map over it, the map alone with a colour bar."""
    lo, hi = vrange
    fig = _new_figure(12, 4.3)
    axes = fig.subplots(1, 3)
    axes[0].imshow(rgb)
    axes[0].set_title("image + ground truth" if has_truth else "image")
    axes[1].imshow(rgb)
    axes[1].imshow(amap, cmap="jet", alpha=alpha, vmin=lo, vmax=hi)
    axes[1].set_title(f"anomaly map (max {amap.max():.3g})")
    heat = axes[2].imshow(amap, cmap="jet", vmin=lo, vmax=hi)
    axes[2].set_title("anomaly map")
    fig.colorbar(heat, ax=axes[2], fraction=0.046, pad=0.04)
    if mask.any():
        for ax in axes[:2]:
            ax.contour(mask, levels=[0.5], colors="white", linewidths=1.0)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=8)
    fig.savefig(target, format="png", bbox_inches="tight")


def _overlay_inputs(images: ArrayLike, maps: ArrayLike, masks: Optional[ArrayLike], paths: Sequence[str],
                    titles: Optional[Sequence[str]]):
    """(images as numpy, map stack, mask stack, whether there are masks), checked against each other."""
    imgs = _to_numpy(images)
    if imgs.ndim != 4 or imgs.shape[1] != 3:
        raise ValueError(f"images must have shape (N, 3, H, W), got {imgs.shape}")
    if masks is None:
        masks = np.zeros(np.shape(maps), dtype=np.float32)
        has_truth = False
    else:
        has_truth = True
    map_stack, mask_stack = _ImageStack(maps, "maps"), _ImageStack(masks, "masks")
    count = imgs.shape[0]
    if titles is not None and len(titles) != count:
        raise ValueError(f"got {count} images but {len(titles)} titles")
    if not (map_stack.n == mask_stack.n == len(paths) == count):
        raise ValueError(f"got {count} images, {map_stack.n} maps, {mask_stack.n} masks, {len(paths)} paths")
    if tuple(map_stack.shape) != tuple(imgs.shape[2:]) or tuple(mask_stack.shape) != tuple(imgs.shape[2:]):
        raise ValueError(f"maps {tuple(map_stack.shape)} and masks {tuple(mask_stack.shape)} must match "
                         f"the images' size {tuple(imgs.shape[2:])}")
    return imgs, map_stack, mask_stack, has_truth


def save_overlays(
    images: ArrayLike,
    maps: ArrayLike,
    masks: Optional[ArrayLike],
    paths: Sequence[str],
    out_dir: PathLike,
    n: Optional[int] = None,
    *,
    normalized: bool = True,
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    alpha: float = 0.5,
    titles: Optional[Sequence[str]] = None,
    start_index: int = 0,
) -> List[Path]:
    """Write one PNG per image: the image with its mask contour, the anomaly map as a heat overlay with
    the mask contour, and the map alone with a colour bar.

    Args:
        images: (N, 3, H, W) float images, ImageNet-normalised (``normalized=True``, as
            :class:`~altub_fast.data.MVTecAD` returns them) or in [0, 1].
        maps: (N, H, W) or (N, 1, H, W) anomaly maps at the images' resolution.
        masks: ground-truth masks, same shape as ``maps`` (binarised at 0.5), or ``None`` for images
            without ground truth (no contour is drawn).
        paths: the N source image paths; they name the output files ``NNNN_<defect>_<stem>.png``.
        titles: N figure titles (default: the paths), e.g. a score and a decision per image.
        start_index: the number NNNN of the first image, for writing a large set chunk by chunk.
        out_dir: folder for the PNGs (created if needed).
        n: write only ``n`` images, spread evenly over the set; ``None`` writes all.
        vmin, vmax: colour range of the maps; default the range over all given maps, so colours
            compare across files.
        alpha: opacity of the heat overlay.

    Returns the written paths.
    """
    imgs, map_stack, mask_stack, has_truth = _overlay_inputs(images, maps, masks, paths, titles)
    count = imgs.shape[0]
    lo, hi = np.inf, -np.inf
    for _, m, _ in _chunks(map_stack, mask_stack, max(1, (1 << 20) // map_stack.pixels_per_image)):
        lo, hi = min(lo, float(m.min())), max(hi, float(m.max()))
    lo = lo if vmin is None else vmin
    hi = hi if vmax is None else vmax
    if hi <= lo:
        hi = lo + 1e-6
    indices = range(count) if n is None or n >= count else np.unique(np.linspace(0, count - 1, n).round().astype(int))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mean, std = np.array(IMAGENET_MEAN).reshape(3, 1, 1), np.array(IMAGENET_STD).reshape(3, 1, 1)
    written: List[Path] = []
    for i in indices:
        i = int(i)
        rgb = imgs[i].astype(np.float64)
        if normalized:
            rgb = rgb * std + mean
        rgb = np.clip(rgb, 0.0, 1.0).transpose(1, 2, 0)
        amap, mask = map_stack.chunk(i, i + 1)[0], mask_stack.chunk(i, i + 1)[0] >= 0.5

        target = out / _output_name(start_index + i, str(paths[i]))
        _draw_overlay(rgb, amap, mask, has_truth, (lo, hi), alpha,
                      str(paths[i]) if titles is None else str(titles[i]), target)
        written.append(target)
    return written


def save_roc_curves(
    image_scores: ArrayLike,
    image_labels: ArrayLike,
    maps: ArrayLike,
    masks: ArrayLike,
    path: PathLike,
    *,
    max_pixels: int = 200_000,
    seed: int = 0,
) -> Path:
    """Write one PNG with the image-level and the pixel-level ROC curves.

    The legend's AUROC values are the exact metrics (:func:`~altub_fast.metrics.image_auroc`,
    :func:`~altub_fast.metrics.pixel_auroc`); the pixel curve itself is drawn from at most
    ``max_pixels`` pixels, half from each class (a ROC curve does not change when one class is
    subsampled, so the curve is unbiased).
    """
    scores = _to_numpy(image_scores).astype(np.float64).reshape(-1)
    labels = _to_numpy(image_labels).reshape(-1).astype(int)
    img_auc = image_auroc(scores, labels)
    pix_auc = pixel_auroc(maps, masks)

    map_stack, mask_stack, per_chunk = _stacks(maps, masks, 1 << 20)
    n_pos = n_neg = 0
    for _, _, g in _chunks(map_stack, mask_stack, per_chunk):
        n_pos += int(g.sum())
        n_neg += g.size - int(g.sum())
    rng = np.random.default_rng(seed)
    keep_pos, keep_neg = min(1.0, max_pixels / 2 / n_pos), min(1.0, max_pixels / 2 / n_neg)
    sampled, sampled_labels = [], []
    for _, m, g in _chunks(map_stack, mask_stack, per_chunk):
        m, g = m.reshape(-1), g.reshape(-1)
        take = rng.random(m.size) < np.where(g, keep_pos, keep_neg)
        sampled.append(m[take])
        sampled_labels.append(g[take])
    from sklearn.metrics import roc_curve

    pix_fpr, pix_tpr, _ = roc_curve(np.concatenate(sampled_labels), np.concatenate(sampled))
    img_fpr, img_tpr, _ = roc_curve(labels, scores)

    fig = _new_figure(10, 4.8)
    axes = fig.subplots(1, 2)
    for ax, fpr, tpr, auc, title in (
        (axes[0], img_fpr, img_tpr, img_auc, "image-level ROC"),
        (axes[1], pix_fpr, pix_tpr, pix_auc, "pixel-level ROC"),
    ):
        ax.plot(fpr, tpr, lw=1.5, label=f"AUROC = {auc:.4f}")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(title)
        ax.legend(loc="lower right")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, format="png")
    return target
