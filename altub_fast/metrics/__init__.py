"""Anomaly-detection metrics (SPEC section 5) and image-level decisions.

    from altub_fast.metrics import compute_all, threshold_at_fpr, precision_recall_f1

``auroc.py``: image AUROC, pixel AUROC (with its error bound) and AUPRO, computed on histograms
while streaming over the maps, so a whole MVTec AD test set fits in ~130 MB (its docstring gives
the method and its exactness); ``decisions.py``: thresholds on the image score and the precision /
recall / F1 of the decisions they give; ``inputs.py``: how maps and masks are read, chunk by chunk.
"""
from .auroc import aupro, compute_all, image_auroc, pixel_auroc, pixel_auroc_with_bound
from .decisions import f1_optimal_threshold, precision_recall_f1, threshold_at_fpr
from .inputs import ArrayLike

__all__ = [
    "ArrayLike",
    "aupro",
    "compute_all",
    "f1_optimal_threshold",
    "image_auroc",
    "pixel_auroc",
    "pixel_auroc_with_bound",
    "precision_recall_f1",
    "threshold_at_fpr",
]
