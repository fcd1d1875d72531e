"""Image AUROC, pixel AUROC and AUPRO (SPEC section 5), streaming over the maps in chunks.

Memory. A full MVTec AD test set at 256 px holds ~1e8 pixels; sorting them (as
``sklearn.metrics.roc_auc_score`` does) needs several copies of that. The pixel metrics here stream over
the maps in chunks and work on histograms instead:

- Scores are compared in float32 (SPEC 6 stores per-pixel results in float32), through an order-preserving
  map of each float32 to a uint32 key. Pixels are counted per key bin, with at most ``num_bins`` bins
  spanning the keys present; each bin covers ``2**shift`` consecutive float32 values.
- Pixel AUROC is exact when ``shift == 0`` (every bin is one float32 value). Otherwise pairs in different
  bins are still ordered exactly, and only positive/negative pairs inside one bin are uncertain. Bins that
  hold both classes are then re-counted in ``2**k`` sub-bins within the same memory, one extra pass per
  round (up to ``refine_rounds``), ``k`` growing as fewer, heavier bins are chosen; ``k == shift`` resolves
  a bin exactly. What is left is a proven bound on the error, ``0.5 * sum(pos * neg) / (P * N)`` over the
  sub-bins still holding both classes. :func:`pixel_auroc_with_bound` returns it and :func:`pixel_auroc`
  warns if it exceeds 1e-6. It is 0 for small inputs and ~1e-7 for 2e7 overlapping Gaussian scores.
- AUPRO evaluates the PRO curve at every bin edge of a histogram with at most ``num_thresholds`` bins over
  the scores that matter (those above the threshold where the false-positive rate reaches ``fpr_limit``).
  The result equals MVTec's reference (a vertex at every distinct score) whenever no bin holds two
  distinct scores of which one is a normal pixel's and the other an anomalous pixel's, which holds when
  that score range spans at most ``num_thresholds`` float32 values; otherwise scores closer than one bin
  (relative width about ``2**-23 * 2**shift``) share a vertex.

Peak extra memory is about ``chunk_pixels * 50`` bytes plus ``num_bins * 80`` bytes (~130 MB with the
defaults), independent of the number of images; time is ~0.1 s per million pixels per pass.

Inputs: ``maps`` and ``masks`` are arrays or tensors of shape (N, H, W) or (N, 1, H, W), or sequences of
per-image (H, W) / (1, H, W) arrays of one size. Masks are binarised at 0.5.
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional, Tuple

import numpy as np
from scipy import ndimage

from .inputs import ArrayLike, _chunks, _ImageStack, _stacks, _to_numpy

__all__ = ["aupro", "compute_all", "image_auroc", "pixel_auroc", "pixel_auroc_with_bound"]

_CHUNK_PIXELS = 1 << 20
_NUM_BINS = 1 << 20
_TARGET_BOUND = 1e-9
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _keys(x: np.ndarray) -> np.ndarray:
    """Order-preserving uint32 keys of float32 values (-0.0 and +0.0 share a key)."""
    bits = (x.astype(np.float32, copy=False) + np.float32(0.0)).view(np.uint32)
    return np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000))


class _Binning:
    """Bins of ``2**shift`` consecutive keys starting at ``lo``; keys below ``lo`` go to bin -1."""

    def __init__(self, lo: int, hi: int, num_bins: int) -> None:
        if num_bins < 2:
            raise ValueError(f"num_bins must be at least 2, got {num_bins}")
        span = hi - lo
        self.shift = max(0, span.bit_length() - num_bins.bit_length())
        while (span >> self.shift) >= num_bins:
            self.shift += 1
        self.lo = lo
        self.n = (span >> self.shift) + 1

    def index(self, keys: np.ndarray) -> np.ndarray:
        """Bin index (int64) of each key; -1 below ``lo``."""
        k = keys.astype(np.int64) - self.lo
        return np.where(k >= 0, k >> self.shift, -1)


# ---------------------------------------------------------------------------------------------------
# AUROC

def _auroc_sorted(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC AUC (ties count one half) by sorting; for arrays that fit in memory."""
    order = np.argsort(scores, kind="mergesort")
    s, y = scores[order], labels[order]
    # group equal scores: per distinct value, counts of positives and negatives
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    pos = np.add.reduceat(y.astype(np.int64), starts)
    tot = np.diff(np.r_[starts, len(s)])
    neg = tot - pos
    return _auroc_from_counts(pos, neg)


def _auroc_from_counts(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC from per-value (ascending) positive and negative counts."""
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    below = np.cumsum(neg) - neg
    twice = 2 * int(np.dot(pos, below)) + int(np.dot(pos, neg))
    return twice / (2.0 * n_pos * n_neg)


def _check_both_classes(n_pos: int, n_neg: int, what: str) -> None:
    if n_pos == 0 or n_neg == 0:
        present = "positive" if n_pos else "negative"
        raise ValueError(f"{what}: only {present} examples present; AUROC needs both classes")


def image_auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """ROC AUC of per-image anomaly scores against image labels (1 anomalous, 0 good), exact.

    Raises ValueError on length mismatch, non-finite scores, labels other than 0/1, or one class only.
    """
    s = _to_numpy(scores).astype(np.float64).reshape(-1)
    y = _to_numpy(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores has {s.size} entries but labels has {y.size}")
    if not np.isfinite(s).all():
        i = int(np.flatnonzero(~np.isfinite(s))[0])
        raise ValueError(f"scores[{i}] is {s[i]}; anomaly scores must be finite")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got values {np.unique(y)[:10]}")
    y = y.astype(bool)
    _check_both_classes(int(y.sum()), int((~y).sum()), "image_auroc")
    return _auroc_sorted(s, y)


def pixel_auroc_with_bound(
    maps: ArrayLike,
    masks: ArrayLike,
    *,
    num_bins: int = _NUM_BINS,
    refine_rounds: int = 4,
    chunk_pixels: int = _CHUNK_PIXELS,
) -> Tuple[float, float]:
    """Pixel ROC AUC over all pixels of all images and a bound on its error; see the module docstring.

    Returns ``(auroc, max_error)``: the true float32 AUROC lies within ``max_error`` of ``auroc``
    (``max_error == 0.0`` means exact).
    """
    m_stack, g_stack, per_chunk = _stacks(maps, masks, chunk_pixels)

    # pass 1: validate, class counts, key range
    n_pos = n_neg = 0
    lo, hi = 0xFFFFFFFF, 0
    for _, m, g in _chunks(m_stack, g_stack, per_chunk):
        k = _keys(m)
        lo, hi = min(lo, int(k.min())), max(hi, int(k.max()))
        p = int(g.sum())
        n_pos, n_neg = n_pos + p, n_neg + g.size - p
    _check_both_classes(n_pos, n_neg, "pixel_auroc")
    binning = _Binning(lo, hi, num_bins)

    # pass 2: per-bin counts
    pos = np.zeros(binning.n, dtype=np.int64)
    neg = np.zeros(binning.n, dtype=np.int64)
    for _, m, g in _chunks(m_stack, g_stack, per_chunk):
        idx = binning.index(_keys(m))
        pos += np.bincount(idx[g], minlength=binning.n)
        neg += np.bincount(idx[~g], minlength=binning.n)

    below = np.cumsum(neg) - neg
    twice_between = 2 * int(np.dot(pos, below))  # pairs in different bins: ordered exactly
    twice_within = pos * neg  # pairs inside one bin count one half (twice: 1) until refined
    remaining = twice_within.copy() if binning.shift else np.zeros_like(twice_within)
    pairs = float(n_pos) * float(n_neg)

    # passes 3+: split the bins that still hold ties into 2**k sub-bins, k growing each round while
    # fewer, heavier bins are chosen; k == shift resolves a bin exactly
    k = 0
    for _ in range(refine_rounds):
        unresolved = np.flatnonzero(remaining)
        if len(unresolved) == 0 or 0.5 * float(remaining.sum()) / pairs <= _TARGET_BOUND:
            break
        k = min(binning.shift, max(k + 2, (num_bins // len(unresolved)).bit_length() - 1))
        chosen = unresolved[np.argsort(remaining[unresolved], kind="stable")[::-1][: num_bins >> k]]
        slot = np.full(binning.n, -1, dtype=np.int64)
        slot[chosen] = np.arange(len(chosen))
        n_sub = len(chosen) << k
        sub_pos = np.zeros(n_sub, dtype=np.int64)
        sub_neg = np.zeros(n_sub, dtype=np.int64)
        low_bits = (1 << binning.shift) - 1
        for _, m, g in _chunks(m_stack, g_stack, per_chunk):
            offset = _keys(m).astype(np.int64) - binning.lo
            s = slot[offset >> binning.shift]
            sel = s >= 0
            sub = (s[sel] << k) + ((offset[sel] & low_bits) >> (binning.shift - k))
            gs = g[sel]
            sub_pos += np.bincount(sub[gs], minlength=n_sub)
            sub_neg += np.bincount(sub[~gs], minlength=n_sub)
        sp, sn = sub_pos.reshape(-1, 1 << k), sub_neg.reshape(-1, 1 << k)
        ties = (sp * sn).sum(axis=1)
        twice_within[chosen] = 2 * (sp * (np.cumsum(sn, axis=1) - sn)).sum(axis=1) + ties
        remaining[chosen] = ties if k < binning.shift else 0

    auc = (twice_between + int(twice_within.sum())) / (2.0 * pairs)
    return auc, 0.5 * float(remaining.sum()) / pairs


def pixel_auroc(
    maps: ArrayLike,
    masks: ArrayLike,
    *,
    num_bins: int = _NUM_BINS,
    chunk_pixels: int = _CHUNK_PIXELS,
) -> float:
    """ROC AUC over all pixels of all test images (good images included); masks binarised at 0.5.

    Scores are compared in float32; the result equals ``sklearn.metrics.roc_auc_score`` on the flattened
    float32 maps whenever :func:`pixel_auroc_with_bound` reports a zero bound, and a warning is issued if
    the bound exceeds 1e-6. Raises ValueError on shape mismatch, NaN/Inf, or a single class.
    """
    auc, bound = pixel_auroc_with_bound(maps, masks, num_bins=num_bins, chunk_pixels=chunk_pixels)
    if bound > 1e-6:
        warnings.warn(f"pixel_auroc is approximate: error at most {bound:.2e} (raise num_bins)",
                      RuntimeWarning, stacklevel=2)
    return auc


# ---------------------------------------------------------------------------------------------------
# AUPRO

def _pro_curve(maps: ArrayLike, masks: ArrayLike, fpr_limit: float, num_thresholds: int,
               chunk_pixels: int) -> Tuple[np.ndarray, np.ndarray]:
    """(fpr, pro) vertices of the PRO curve in order of decreasing threshold, starting at (0, 0)."""
    m_stack, g_stack, per_chunk = _stacks(maps, masks, chunk_pixels)

    # pass 1: validate, count negatives and regions, key range
    n_neg = n_regions = 0
    lo, hi = 0xFFFFFFFF, 0
    for _, m, g in _chunks(m_stack, g_stack, per_chunk):
        k = _keys(m)
        lo, hi = min(lo, int(k.min())), max(hi, int(k.max()))
        n_neg += int((~g).sum())
        for gi in g:
            if gi.any():
                n_regions += ndimage.label(gi, structure=_EIGHT_CONNECTED)[1]
    if n_regions == 0 or n_neg == 0:
        raise ValueError("aupro: needs at least one anomalous region and one normal pixel; "
                         f"got {n_regions} regions and {n_neg} normal pixels")

    def histograms(binning: _Binning, with_regions: bool) -> Tuple[np.ndarray, np.ndarray]:
        """Negative counts and region-overlap weights per bin (index 0 holds keys below ``lo``)."""
        negs = np.zeros(binning.n + 1, dtype=np.int64)
        overlap = np.zeros(binning.n + 1, dtype=np.float64)
        for _, m, g in _chunks(m_stack, g_stack, per_chunk):
            idx = binning.index(_keys(m)) + 1
            negs += np.bincount(idx[~g], minlength=binning.n + 1)
            if not with_regions:
                continue
            for mi, gi, ii in zip(m, g, idx):
                if not gi.any():
                    continue
                labels, count = ndimage.label(gi, structure=_EIGHT_CONNECTED)
                sizes = np.bincount(labels.ravel(), minlength=count + 1).astype(np.float64)
                inside = labels > 0
                # each region pixel weighs 1/|region|: summed above a threshold, that is the overlap
                overlap += np.bincount(ii[inside], weights=1.0 / sizes[labels[inside]],
                                       minlength=binning.n + 1)
        return negs, overlap

    # pass 2: a coarse histogram of the negatives finds where the FPR passes fpr_limit
    coarse = _Binning(lo, hi, num_thresholds)
    negs, _ = histograms(coarse, with_regions=False)
    above = np.cumsum(negs[::-1])[::-1]  # negatives in bin b or higher
    start = int(np.flatnonzero(above >= fpr_limit * n_neg).max())  # highest such bin (>= 1)
    fine_lo = coarse.lo + ((start - 1) << coarse.shift)

    # pass 3: the curve at every edge of a fine histogram of [fine_lo, hi]
    fine = _Binning(fine_lo, hi, num_thresholds)
    negs, overlap = histograms(fine, with_regions=True)
    fpr = np.cumsum(negs[::-1]) / n_neg
    pro = np.minimum(np.cumsum(overlap[::-1]) / n_regions, 1.0)
    return np.r_[0.0, fpr], np.r_[0.0, pro]


def aupro(
    maps: ArrayLike,
    masks: ArrayLike,
    fpr_limit: float = 0.3,
    num_thresholds: int = 1 << 20,
    *,
    chunk_pixels: int = _CHUNK_PIXELS,
) -> float:
    """Area under the per-region-overlap curve for FPR in [0, fpr_limit], divided by ``fpr_limit``.

    Regions are the 8-connected components of each binarised mask. PRO(t) is the mean over all regions
    of all images of the fraction of the region scoring >= t; FPR(t) is the fraction of all normal pixels
    (every pixel outside the masks, good images included) scoring >= t. Images with empty masks only
    add normal pixels. The curve (piecewise linear between thresholds, interpolated at ``fpr_limit``) is
    integrated with the trapezoid rule; the result lies in [0, 1].

    Raises ValueError on shape mismatch, NaN/Inf, no region or no normal pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = _pro_curve(maps, masks, fpr_limit, num_thresholds, chunk_pixels)
    cut = int(np.searchsorted(fpr, fpr_limit, side="left"))  # first vertex with fpr >= limit
    x0, x1, y0, y1 = fpr[cut - 1], fpr[cut], pro[cut - 1], pro[cut]
    y_at = y0 if x1 == x0 else y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
    xs = np.r_[fpr[:cut], fpr_limit]
    ys = np.r_[pro[:cut], y_at]
    area = float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))
    return min(1.0, area / fpr_limit)


# ---------------------------------------------------------------------------------------------------

def compute_all(
    maps: ArrayLike,
    masks: Optional[ArrayLike],
    labels: ArrayLike,
    scores: Optional[ArrayLike] = None,
    *,
    fpr_limit: float = 0.3,
) -> Dict[str, Optional[float]]:
    """Image AUROC, pixel AUROC and AUPRO in one dict.

    Args:
        maps: anomaly maps (higher = more anomalous).
        masks: ground-truth masks at the maps' resolution, or ``None`` for a test set without masks
            (then ``pixel_auroc`` and ``aupro`` are ``None``: not available, not an error).
        labels: image labels (0 good, 1 defective); needed because a defective image may have an
            empty mask.
        scores: per-image scores; default the maximum of each map (SPEC 5).
        fpr_limit: AUPRO's integration limit.

    Returns ``{"image_auroc", "pixel_auroc", "aupro"}``; raises ValueError as the three metrics do.
    """
    if scores is None:
        stack = _ImageStack(maps, "maps")
        per_chunk = max(1, _CHUNK_PIXELS // stack.pixels_per_image)
        scores = np.concatenate([
            stack.chunk(i, min(stack.n, i + per_chunk)).reshape(-1, stack.pixels_per_image).max(axis=1)
            for i in range(0, stack.n, per_chunk)
        ])
    if masks is None:
        result: Dict[str, Optional[float]] = {"pixel_auroc": None, "aupro": None}
    else:
        result = {"pixel_auroc": pixel_auroc(maps, masks), "aupro": aupro(maps, masks, fpr_limit=fpr_limit)}
    result["image_auroc"] = image_auroc(scores, labels)
    return result
