"""Metrics against sklearn and hand-worked cases; PNG writers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from altub_fast.metrics import (aupro, compute_all, f1_optimal_threshold, image_auroc, pixel_auroc,
                                pixel_auroc_with_bound, precision_recall_f1, threshold_at_fpr)
from altub_fast.viz import save_overlays, save_roc_curves


def _blobs(seed: int, n: int = 6, size: int = 48, empty_last: bool = True):
    """Noisy maps with brighter rectangles under the masks; the last image's mask is empty."""
    rng = np.random.default_rng(seed)
    maps = rng.standard_normal((n, size, size)).astype(np.float32)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n - 1 if empty_last else n):
        for _ in range(rng.integers(1, 3)):
            y, x = rng.integers(2, size - 12, 2)
            h, w = rng.integers(2, 10, 2)
            masks[i, y:y + h, x:x + w] = True
    maps[masks] += 1.0
    return maps, masks


def _reference_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """MVTec's definition computed naively: a vertex at every distinct score."""
    maps = maps.astype(np.float32)
    regions = []
    for i, g in enumerate(masks):
        labels, n = ndimage.label(g, structure=np.ones((3, 3)))
        regions += [(i, labels == r) for r in range(1, n + 1)]
    normal = maps[~masks]
    fpr, pro = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fpr.append(float((normal >= t).mean()))
        pro.append(float(np.mean([(maps[i][r] >= t).mean() for i, r in regions])))
    fpr, pro = np.array(fpr), np.array(pro)
    cut = int(np.searchsorted(fpr, limit))
    y = pro[cut - 1] + (pro[cut] - pro[cut - 1]) * (limit - fpr[cut - 1]) / (fpr[cut] - fpr[cut - 1])
    return float(np.trapezoid(np.r_[pro[:cut], y], np.r_[fpr[:cut], limit]) / limit)


# ---------------------------------------------------------------------------------------------------
# AUROC

def test_image_auroc_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = rng.standard_normal(200) + labels
    scores[:50] = np.round(scores[:50])  # ties
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_auroc(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(
        roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_pixel_auroc_matches_sklearn(seed: int) -> None:
    maps, masks = _blobs(seed, n=8, size=64)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    auc, bound = pixel_auroc_with_bound(maps, masks)
    assert bound == 0.0 and auc == pytest.approx(expected, abs=1e-9)
    # ties, torch input with a channel dim, list input, small chunks: all the same
    coarse = np.round(maps * 4) / 4
    expected = roc_auc_score(masks.ravel(), coarse.ravel())
    assert pixel_auroc(torch.from_numpy(coarse)[:, None], torch.from_numpy(masks)[:, None]) == pytest.approx(
        expected, abs=1e-9)
    assert pixel_auroc(list(coarse), list(masks), chunk_pixels=1000) == pytest.approx(expected, abs=1e-9)


def test_pixel_auroc_binned_within_bound() -> None:
    maps, masks = _blobs(3, n=8, size=64)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    for num_bins in (64, 1024):
        bounds = []
        for rounds in (0, 1, 3):
            auc, bound = pixel_auroc_with_bound(maps, masks, num_bins=num_bins, refine_rounds=rounds)
            assert abs(auc - expected) <= bound + 1e-12
            bounds.append(bound)
        assert bounds[0] > bounds[1] > bounds[2] > 0  # each refinement round tightens the bound
    with pytest.warns(RuntimeWarning, match="approximate"):
        pixel_auroc(maps, masks, num_bins=64)


def test_auroc_perfect_and_inverted() -> None:
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 2:4, 2:5] = True
    maps = masks.astype(np.float32) * 3 - 1
    assert pixel_auroc(maps, masks) == 1.0 and pixel_auroc(-maps, masks) == 0.0
    assert pixel_auroc(np.zeros_like(maps), masks) == 0.5
    assert image_auroc([0.1, 0.9], [0, 1]) == 1.0 and image_auroc([0.9, 0.1], [0, 1]) == 0.0
    assert aupro(maps, masks) == pytest.approx(1.0) and aupro(-maps, masks) == 0.0


def test_negative_zero_equals_zero() -> None:
    masks = np.array([[[True, False]]])
    assert pixel_auroc(np.array([[[-0.0, 0.0]]], np.float32), masks) == 0.5


# ---------------------------------------------------------------------------------------------------
# AUPRO

def test_aupro_two_regions_by_hand() -> None:
    """3x5 image; region A = one pixel scoring 0.9; region B = two pixels scoring 0.8 and 0.3;
    12 normal pixels: one 0.85, one 0.5, ten 0.1. The curve (FPR, PRO) runs (0, 0) -> (0, 1/2) ->
    (1/12, 1/2) -> (1/12, 3/4) -> (1/6, 3/4) -> (1/6, 1) -> ...; the area up to 0.3 is
    1/24 + 1/16 + (0.3 - 1/6) = 0.2375, so AUPRO = 0.2375 / 0.3 = 19/24."""
    m = np.full((1, 3, 5), 0.1, np.float32)
    g = np.zeros((1, 3, 5), bool)
    g[0, 0, 0], m[0, 0, 0] = True, 0.9
    g[0, 2, 3:5], m[0, 2, 3], m[0, 2, 4] = True, 0.8, 0.3
    m[0, 1, 1], m[0, 1, 2] = 0.85, 0.5
    assert aupro(m, g) == pytest.approx(19 / 24, abs=1e-12)
    assert _reference_aupro(m, g) == pytest.approx(19 / 24, abs=1e-12)
    # with fpr_limit 1/12 only the first segment counts: (1/24) / (1/12) = 1/2
    assert aupro(m, g, fpr_limit=1 / 12) == pytest.approx(0.5, abs=1e-9)


def test_aupro_regions_are_eight_connected() -> None:
    """Mask pixels (1,1), (2,2), (2,3): one region with 8-connectivity (two with 4). Only (1,1) scores 1,
    all else 0, so the curve runs (0, 0) -> (0, p) -> (1, 1) with p = 1/3 (it would be 1/2 for two
    regions); AUPRO = (p + p + (1 - p) * 0.3) / 2 = 13/30."""
    g = np.zeros((1, 6, 6), bool)
    g[0, 1, 1] = g[0, 2, 2] = g[0, 2, 3] = True
    m = np.zeros((1, 6, 6), np.float32)
    m[0, 1, 1] = 1.0
    assert aupro(m, g) == pytest.approx(13 / 30, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_reference(seed: int) -> None:
    maps, masks = _blobs(seed, n=5, size=32)
    # scores on a grid of 1/64: distinct scores are far apart, so the histogram curve is exact
    grid = np.round(maps * 64) / 64
    assert aupro(grid, masks) == pytest.approx(_reference_aupro(grid, masks), abs=1e-12)
    # continuous scores: normal and anomalous scores closer than a bin (~4e-6 relative here) share a
    # curve vertex; the effect is tiny
    expected = _reference_aupro(maps, masks)
    assert aupro(maps, masks) == pytest.approx(expected, abs=1e-5)
    assert aupro(maps, masks, num_thresholds=256) == pytest.approx(expected, abs=5e-3)


def test_aupro_empty_mask_images_only_add_normal_pixels() -> None:
    maps, masks = _blobs(4, n=4, size=32, empty_last=False)
    base = aupro(maps, masks)
    # a defective image with an empty mask whose scores are all below everything else: the PRO curve
    # is unchanged and FPRs shrink, so AUPRO can only grow
    low = np.full((1, 32, 32), maps.min() - 1, np.float32)
    more_maps, more_masks = np.concatenate([maps, low]), np.concatenate([masks, np.zeros_like(low, bool)])
    assert aupro(more_maps, more_masks) >= base
    assert aupro(more_maps, more_masks) == pytest.approx(_reference_aupro(more_maps, more_masks), abs=1e-5)
    # compute_all takes image labels separately, so that image counts as defective but adds no region
    out = compute_all(np.concatenate([more_maps, maps[:1] * 0]), np.concatenate([more_masks, masks[:1] * 0]),
                      labels=[1, 1, 1, 1, 1, 0])
    assert out["image_auroc"] == pytest.approx(0.8)  # the empty-mask defective image scores lowest


@pytest.mark.parametrize("seed", range(5))
def test_aupro_never_above_one(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = rng.random((3, 16, 16)) < rng.uniform(0.05, 0.6)
    maps = np.where(masks, 5.0, 0.0).astype(np.float32) + rng.random((3, 16, 16)).astype(np.float32) * 0.1
    value = aupro(maps, masks, fpr_limit=rng.uniform(0.01, 1.0))
    assert 0.0 <= value <= 1.0


# ---------------------------------------------------------------------------------------------------
# validation and compute_all

def test_validation_errors() -> None:
    maps, masks = _blobs(0, n=3, size=16)
    with pytest.raises(ValueError, match="maps has 3 images but masks has 2"):
        pixel_auroc(maps, masks[:2])
    with pytest.raises(ValueError, match=r"\(16, 16\).*\(16, 8\)"):
        aupro(maps, masks[:, :, :8])
    bad = maps.copy()
    bad[1, 3, 3] = np.nan
    with pytest.raises(ValueError, match=r"maps\[1\] contains NaN"):
        pixel_auroc(bad, masks)
    bad[1, 3, 3] = np.inf
    with pytest.raises(ValueError, match=r"maps\[1\] contains Inf"):
        aupro(bad, masks)
    with pytest.raises(ValueError, match="only negative"):
        pixel_auroc(maps, np.zeros_like(masks))
    with pytest.raises(ValueError, match="only positive"):
        pixel_auroc(maps, np.ones_like(masks))
    with pytest.raises(ValueError, match="anomalous region"):
        aupro(maps, np.zeros_like(masks))
    with pytest.raises(ValueError, match="only positive"):
        image_auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match=r"scores\[1\] is nan"):
        image_auroc([0.1, np.nan], [0, 1])
    with pytest.raises(ValueError, match="entries"):
        image_auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="shape"):
        pixel_auroc(maps[0], masks[0])


def test_compute_all() -> None:
    maps, masks = _blobs(5, n=6, size=32)
    labels = [1, 1, 1, 1, 1, 0]
    out = compute_all(torch.from_numpy(maps), torch.from_numpy(masks).float(), labels)
    assert set(out) == {"image_auroc", "pixel_auroc", "aupro"}
    scores = maps.reshape(6, -1).max(axis=1)
    assert out["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)
    assert out["aupro"] == pytest.approx(_reference_aupro(maps, masks), abs=1e-5)


def test_compute_all_without_masks_gives_image_metrics_only() -> None:
    maps, _ = _blobs(5, n=6, size=32)
    labels = [1, 1, 1, 1, 1, 0]
    scores = maps.reshape(6, -1).mean(axis=1)
    out = compute_all(maps, None, labels, scores)
    assert out["pixel_auroc"] is None and out["aupro"] is None
    assert out["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


# ---------------------------------------------------------------------------------------------------
# thresholds and image decisions

def test_threshold_at_fpr_by_hand() -> None:
    scores = [0.3, 0.1, 0.9, 0.5, 0.7, 0.2, 0.4, 0.8, 0.6, 1.0]     # 0.1 ... 1.0
    assert threshold_at_fpr(scores, 0.1) == 0.9          # 9th smallest: one score (1.0) above it
    assert threshold_at_fpr(scores, 0.3) == 0.7          # three above
    assert threshold_at_fpr(scores, 0.25) == 0.8         # ceil(7.5) = 8th: two above (<= 2.5)
    assert threshold_at_fpr(scores, 0.01) == 1.0         # N < 1 / max_fpr: the maximum, no alarm
    assert threshold_at_fpr(scores, 0.0) == 1.0
    assert threshold_at_fpr([2.0], 0.5) == 2.0
    with pytest.raises(ValueError, match="max_fpr"):
        threshold_at_fpr(scores, 1.0)
    with pytest.raises(ValueError, match="empty"):
        threshold_at_fpr([], 0.1)
    with pytest.raises(ValueError, match="finite"):
        threshold_at_fpr([0.1, float("nan")], 0.1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_threshold_at_fpr_keeps_the_false_alarm_rate(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal(int(rng.integers(20, 400)))
    scores[:5] = scores[5]                                   # ties too
    for max_fpr in (0.01, 0.05, 0.1, 0.33):
        t = threshold_at_fpr(scores, max_fpr)
        assert (scores > t).sum() <= np.floor(max_fpr * scores.size)
        assert t in scores and (scores >= t).sum() > np.floor(max_fpr * scores.size)   # the lowest such score
        assert t == np.quantile(scores, 1 - max_fpr, method="inverted_cdf")


def test_precision_recall_f1_by_hand() -> None:
    scores, labels = [0.1, 0.4, 0.35, 0.8, 0.9], [0, 0, 1, 1, 1]
    r = precision_recall_f1(scores, labels, 0.38)             # flags 0.4, 0.8, 0.9
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (2, 1, 1, 1)
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(2 / 3) and r["fpr"] == pytest.approx(0.5)
    none = precision_recall_f1(scores, labels, 5.0)
    assert none["precision"] == 0.0 and none["recall"] == 0.0 and none["f1"] == 0.0
    assert precision_recall_f1(scores, labels, 0.8)["tp"] == 1      # strictly above the threshold
    with pytest.raises(ValueError, match="labels"):
        precision_recall_f1(scores, [0, 1], 0.5)


def test_f1_optimal_threshold_matches_brute_force() -> None:
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 60)
    scores = np.round(rng.standard_normal(60) + labels, 1)       # many ties
    best = f1_optimal_threshold(scores, labels)
    brute = max(f1_score(labels, scores > t) for t in np.r_[np.unique(scores), scores.min() - 1])
    assert best["f1"] == pytest.approx(brute)
    assert best["f1"] == pytest.approx(f1_score(labels, scores > best["threshold"]))
    # separable: the threshold lies between the classes
    sep = f1_optimal_threshold([0.1, 0.2, 0.7, 0.9], [0, 0, 1, 1])
    assert sep["f1"] == 1.0 and 0.2 <= sep["threshold"] < 0.7
    # flagging everything can be optimal
    assert f1_optimal_threshold([0.5, 0.1], [1, 1])["recall"] == 1.0
    with pytest.raises(ValueError, match="no defective"):
        f1_optimal_threshold([0.1, 0.2], [0, 0])


# ---------------------------------------------------------------------------------------------------
# PNG writers

def test_save_overlays_and_roc(tmp_path: Path) -> None:
    maps, masks = _blobs(6, n=4, size=32)
    images = torch.randn(4, 3, 32, 32)
    paths = [f"/data/cat/test/{d}/{i:03d}.png" for i, d in enumerate(["cut", "cut", "hole", "good"])]
    written = save_overlays(images, maps, masks, paths, tmp_path / "overlays", n=3)
    assert len(written) == 3 and written[0].name == "0000_cut_000.png"
    for p in written:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 100
            im.verify()
    roc = save_roc_curves(maps.reshape(4, -1).max(axis=1), [1, 1, 1, 0], maps, masks,
                          tmp_path / "plots/roc.png", max_pixels=500)
    with Image.open(roc) as im:
        assert im.format == "PNG"
        im.verify()
    with pytest.raises(ValueError, match="images must have shape"):
        save_overlays(images[:, :1], maps, masks, paths, tmp_path)
