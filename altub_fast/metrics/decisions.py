"""Image-level decisions: a threshold on the image score, "score > threshold" is a defect.

:func:`threshold_at_fpr` sets a label-free threshold from normal images' scores at a false-alarm
rate (the trainer does this on held-out images); :func:`precision_recall_f1` scores the decisions
at a threshold against labels; :func:`f1_optimal_threshold` is the best threshold in hindsight.
"""
from __future__ import annotations

from typing import Dict

import numpy as np

from .inputs import ArrayLike, _to_numpy

__all__ = ["f1_optimal_threshold", "precision_recall_f1", "threshold_at_fpr"]


def _scores_array(scores: ArrayLike, name: str = "scores") -> np.ndarray:
    s = _to_numpy(scores).astype(np.float64).reshape(-1)
    if s.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(s).all():
        i = int(np.flatnonzero(~np.isfinite(s))[0])
        raise ValueError(f"{name}[{i}] is {s[i]}; anomaly scores must be finite")
    return s


def _labels_array(labels: ArrayLike, n: int) -> np.ndarray:
    y = _to_numpy(labels).reshape(-1)
    if y.size != n:
        raise ValueError(f"scores has {n} entries but labels has {y.size}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got values {np.unique(y)[:10]}")
    return y.astype(bool)


def threshold_at_fpr(normal_scores: ArrayLike, max_fpr: float) -> float:
    """The threshold at a false-alarm rate: the (1 - ``max_fpr``) quantile of normal images' scores.

    It is the empirical (inverted-CDF) quantile: the k-th smallest score with k = ceil((1 - max_fpr) N),
    so that with the rule "score > threshold is a defect" at most ``floor(max_fpr * N)`` of the N
    normal images raise an alarm (fewer on ties). With N < 1 / max_fpr this is their maximum score:
    no alarm on them, and the rate it stands for is only known to be below 1 / N.
    """
    if not 0.0 <= max_fpr < 1.0:
        raise ValueError(f"max_fpr must be in [0, 1), got {max_fpr}")
    s = np.sort(_scores_array(normal_scores, "normal_scores"))
    n = s.size
    k = int(np.ceil(round((1.0 - max_fpr) * n, 9)))
    return float(s[min(n, max(1, k)) - 1])


def precision_recall_f1(scores: ArrayLike, labels: ArrayLike, threshold: float) -> Dict[str, float]:
    """Image decisions "score > threshold" against labels (1 defective): precision, recall, F1, the
    false-positive rate and the counts. Precision (and F1) is 0 when nothing is flagged."""
    s = _scores_array(scores)
    y = _labels_array(labels, s.size)
    pred = s > threshold
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn, tn = int((~pred & y).sum()), int((~pred & ~y).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"threshold": float(threshold), "precision": precision, "recall": recall, "f1": f1,
            "fpr": fp / (fp + tn) if fp + tn else 0.0, "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def f1_optimal_threshold(scores: ArrayLike, labels: ArrayLike) -> Dict[str, float]:
    """The threshold with the highest F1 on these labelled scores (rule "score > threshold"), with
    its precision, recall, F1 and counts as :func:`precision_recall_f1` gives them; on ties the
    highest such threshold. It is chosen on the labels it is evaluated on: an optimistic bound."""
    s = _scores_array(scores)
    y = _labels_array(labels, s.size)
    if not y.any():
        raise ValueError("f1_optimal_threshold: no defective image; F1 needs at least one")
    values = np.unique(s)                                    # ascending
    candidates = np.r_[values[::-1], np.nextafter(values[0], -np.inf)]   # flag none ... flag all
    pos, neg = np.sort(s[y]), np.sort(s[~y])
    tp = pos.size - np.searchsorted(pos, candidates, side="right")
    fp = neg.size - np.searchsorted(neg, candidates, side="right")
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(tp > 0, 2 * tp / (2 * tp + fp + (pos.size - tp)), 0.0)
    best = int(np.argmax(f1))                               # first maximum: the highest threshold
    return precision_recall_f1(s, y.astype(int), float(candidates[best]))
