"""eval's scoring of the test set: the scorer for ``--runtime``, the metrics, the decisions.

:func:`score_test_set` scores one checkpoint's model on the test set through
:func:`altub_fast.inference.make_scorer` (an exported runtime, checked against PyTorch on the first
batch, or eager PyTorch; the export is built or found in its cache before the inference clock
starts) and computes the metrics; :func:`decisions_on_test_set` adds the threshold's decisions;
:func:`runtimes_line` is the line under eval's table naming each run's runtime.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .eval_checkpoints import threshold_for

__all__ = ["Scored", "scorer_for_test_set", "score_test_set", "decisions_on_test_set", "runtimes_line"]


@dataclass
class Scored:
    """One checkpoint scored on the test set."""
    predictions: dict                         # altub_fast.inference.score_dataset's result
    metrics: Dict[str, Optional[float]]
    seconds: float
    runtime: dict = field(default_factory=dict)   # the scorer's info: which runtime scored, its export


def scorer_for_test_set(args, model, checkpoint: Optional[str], device: str):
    """The scorer for --runtime (:func:`altub_fast.inference.make_scorer`, fed the dataset's
    normalised images), its export built or found in the cache beside ``checkpoint`` before the
    inference clock starts."""
    from .inference import make_scorer

    scorer = make_scorer(model, args.runtime, checkpoint=checkpoint, device=device, feeds_normalised=True,
                         amp=args.amp)
    scorer.prepare((args.image_size, args.image_size))
    return scorer


def score_test_set(args, model, test_ds, device: str, checkpoint: Optional[str] = None) -> Scored:
    """Maps, scores and metrics of ``model`` (loaded from, or saved as, ``checkpoint``) on the test
    set, scored by --runtime (pixel metrics None without masks)."""
    from .inference import score_dataset
    from .metrics import compute_all

    scorer = scorer_for_test_set(args, model, checkpoint, device)
    t0 = time.perf_counter()
    res = score_dataset(model, test_ds, batch_size=args.batch_size or 32, device=device, progress=not args.quiet,
                        amp=args.amp, scorer=scorer)
    infer_s = time.perf_counter() - t0
    if res["labels"] is None:
        raise RuntimeError("the test set gave no labels")
    metrics = compute_all(res["maps"], res["masks"], res["labels"], res["scores"])
    return Scored(res, {k: None if v is None else float(v) for k, v in metrics.items()}, infer_s, scorer.info)


def decisions_on_test_set(scored: Scored, stored: Optional[dict], max_fpr: float) -> dict:
    """A scored checkpoint's metrics, its threshold and the image decisions on the test set: at the
    label-free threshold, and at the best one in hindsight."""
    from .metrics import f1_optimal_threshold, precision_recall_f1

    res = scored.predictions
    threshold = threshold_for(stored, max_fpr)
    return {"metrics": scored.metrics, "threshold": threshold,
            "at_threshold": (precision_recall_f1(res["scores"], res["labels"], threshold["value"])
                             if threshold else None),
            "f1_optimal_chosen_on_the_test_set": (f1_optimal_threshold(res["scores"], res["labels"])
                                                  if bool((res["labels"] == 1).any()) else None)}


def runtimes_line(records: List[dict]) -> str:
    """Which runtime scored each run's test set, e.g. ``test set scored by: altub_fast onnxruntime
    1.20.1 (auto; exported now)``."""
    from .inference import describe_runtime

    return "test set scored by: " + "; ".join(f"{r['label']} {describe_runtime(r['runtime'])}"
                                              for r in records if r.get("runtime"))
