"""What predict writes: ``predictions.csv``, ``predictions.json`` and the overlay PNGs.

:func:`write_outputs` writes the CSV, then (the end-to-end clock stopped: files in -> CSV out) the
JSON, both atomically; the JSON's ``throughput`` entry holds that time and its images/s.
:func:`write_overlays` renders the kept maps chunk by chunk from the spill file, re-reading their
images, with one colour range for the whole run.
"""
from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

from .predict_scoring import DEFECT, GOOD, ScoreResult

__all__ = ["write_outputs", "write_overlays", "throughput"]


def throughput(result: ScoreResult, started: float, stopped: float, setup_seconds: float) -> dict:
    """The run's speed: files in -> CSV out, the scoring loop alone, and what came before
    (opening the checkpoint, the export or its cache)."""
    seconds = max(stopped - started, 1e-9)
    n = len(result.predictions)
    return {"files": n, "seconds_end_to_end": seconds, "images_per_s_end_to_end": n / seconds,
            "seconds_scoring": result.seconds, "setup_seconds": setup_seconds,
            "measured": "files in -> predictions.csv written (reading, resizing, scoring, CSV), after setup"}


def _write_csv(result: ScoreResult, thr, csv_path: Path) -> None:
    tmp = csv_path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "score", "decision", "threshold", "error"])
        w.writeheader()
        for p in result.predictions:
            w.writerow(dict(path=p.path, score="" if p.score is None else repr(p.score), decision=p.decision,
                            threshold="" if thr.value is None else repr(thr.value), error=p.error or ""))
    os.replace(tmp, csv_path)


def write_outputs(result: ScoreResult, thr, out_dir: Path, checkpoint: str, extra: dict,
                  started: Optional[float] = None, setup_seconds: float = 0.0) -> List[Path]:
    """predictions.csv and predictions.json (written atomically). ``started``: the
    ``time.perf_counter()`` at which reading the files began; the JSON then says how long files in
    -> CSV out took (``throughput``), also left in ``extra["throughput"]``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / "predictions.csv", out_dir / "predictions.json"
    _write_csv(result, thr, csv_path)
    if started is not None:
        extra["throughput"] = throughput(result, started, time.perf_counter(), setup_seconds)
    preds = result.predictions
    doc = {
        "checkpoint": checkpoint,
        "threshold": thr.to_dict(),
        "decision_rule": "defect if score > threshold",
        "counts": {"files": len(preds), "scored": sum(p.score is not None for p in preds),
                   DEFECT: sum(p.decision == DEFECT for p in preds), GOOD: sum(p.decision == GOOD for p in preds),
                   "skipped": sum(p.error is not None for p in preds)},
        **extra,
        "predictions": [dict(path=p.path, score=p.score, decision=p.decision, threshold=thr.value)
                        for p in preds if p.error is None],
        "skipped": [dict(path=p.path, error=p.error) for p in preds if p.error is not None],
    }
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, json_path)
    return [csv_path, json_path]


def _title(p, thr) -> str:
    if thr.value is None:
        verdict = "no threshold"
    else:
        verdict = f"{'>' if p.decision == DEFECT else '<='} threshold {thr.value:.4g}: {p.decision.upper()}"
    return f"{p.path}\nscore {p.score:.4g}, {verdict}"


def write_overlays(result: ScoreResult, model, thr, out_dir: Path, chunk: int = 16) -> List[Path]:
    """One PNG per kept map: the image, the map over it and alone, titled with score and decision.
    The colour range is the range of every map of the run, so colours compare across files. Reads
    ``chunk`` maps and images at a time; closes the spill file at the end."""
    from .inference import read_images
    from .viz import save_overlays

    size_hw = tuple(int(v) for v in model.image_size)
    lo, hi = result.map_range
    keep = sorted(result.maps.positions)
    written: List[Path] = []
    try:
        for s in range(0, len(keep), chunk):
            pos = keep[s:s + chunk]
            preds = [result.predictions[i] for i in pos]
            images, ok, _ = read_images([p.path for p in preds], size_hw, normalise=False)
            if len(ok) != len(pos):
                print(f"warning: no overlays for {len(pos)} images: a file changed on disk since it was scored",
                      file=sys.stderr)
                continue
            maps = result.maps.read(pos).float()
            written += save_overlays(images, maps, None, [p.path for p in preds], out_dir, normalized=False,
                                     vmin=lo, vmax=hi, titles=[_title(p, thr) for p in preds],
                                     start_index=preds[0].index)
    finally:
        result.maps.close()
    return written
