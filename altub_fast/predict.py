"""Score new, unlabelled images with a trained checkpoint.

    python -m altub_fast.predict --checkpoint runs/carpet-fastflow/checkpoints/altub_fast/last.pt photos/
    python -m altub_fast.predict --checkpoint last.pt 'line3/**/*.png' part_0001.bmp --threshold 1.8
    altub-fast predict ...                                      # the same, as an installed command

PATH arguments are image files, folders (their files, sorted, hidden ones left out; ``--recursive``
walks sub-folders) or glob patterns (``**`` matches any depth). Every image is read as in training
(:func:`altub_fast.data.load_image`: any size, greyscale or RGB, resized to the model's input size,
ImageNet-normalised) and scored by ``model.anomaly_map``. Prints one line per image (decision,
score, path) and writes ``predictions.csv``, ``predictions.json`` and one overlay PNG per image
(the image, its anomaly map and the decision) to ``--out``.

The decision is ``defect`` when the score is above the threshold, else ``good``. The threshold is
``--threshold`` if given, else the one the trainer stored in the checkpoint (chosen on held-out
normal images at a false-alarm rate, ``max_fpr``); a checkpoint without one gives the decision
``n/a`` and says so. A file that cannot be read as an image is reported and skipped.

Exit status: 0 all images scored; 1 some files were skipped (listed at the end and in the outputs);
2 nothing to do (no input, a bad checkpoint, a bad argument).
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .inference import CheckpointError, Scorer, open_checkpoint   # opening, reading, scoring: altub_fast/inference/

EXIT_OK, EXIT_SKIPPED, EXIT_USAGE = 0, 1, 2
GOOD, DEFECT, NO_DECISION, ERROR = "good", "defect", "n/a", "error"
_GLOB_CHARS = set("*?[")

__all__ = ["CheckpointError", "Threshold", "Prediction", "ScoreResult", "open_checkpoint", "collect_inputs",
           "resolve_threshold", "decide", "score_files", "main"]


# ----------------------------------------------------------------------------- inputs
def collect_inputs(paths: Sequence[str], recursive: bool = False) -> Tuple[List[str], List[Tuple[str, str]]]:
    """Files to score, in argument order without repeats, and (argument, reason) for every
    argument that names nothing. Folders give their non-hidden files sorted by name (every file:
    one that is not an image is reported when it fails to load, never dropped silently)."""
    files: List[str] = []
    problems: List[Tuple[str, str]] = []
    seen = set()

    def add(f: Path) -> None:
        key = os.path.abspath(f)
        if key not in seen:
            seen.add(key)
            files.append(str(f))

    for arg in paths:
        p = Path(arg)
        if p.is_file():
            add(p)
        elif p.is_dir():
            found = sorted(f for f in (p.rglob("*") if recursive else p.iterdir())
                           if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                problems.append((arg, "folder holds no files"))
            for f in found:
                add(f)
        elif _GLOB_CHARS & set(arg):
            matches = sorted(Path(m) for m in glob.glob(arg, recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                problems.append((arg, "pattern matches no file"))
            for m in matches:
                add(m)
        else:
            problems.append((arg, "no such file or folder"))
    return files, problems


# ----------------------------------------------------------------------------- threshold
@dataclass
class Threshold:
    """The decision threshold in use (``value`` None: no decision) and where it came from."""
    value: Optional[float]
    source: str                 # "--threshold", "checkpoint" or "none"
    note: str                   # one human sentence
    max_fpr: Optional[float] = None
    n_heldout: Optional[int] = None
    score_mode: Optional[str] = None

    def to_dict(self) -> dict:
        return dict(value=self.value, source=self.source, note=self.note, max_fpr=self.max_fpr,
                    n_heldout=self.n_heldout, score_mode=self.score_mode)


def resolve_threshold(ck: dict, override: Optional[float] = None, score_mode: Optional[str] = None) -> Threshold:
    """``override`` (``--threshold``) if given, else the checkpoint's ``threshold`` entry
    ({"value", "max_fpr", "n_heldout", "score_mode"}), else no threshold. ``score_mode``: the
    model's; a stored threshold chosen for another score mode is refused."""
    stored = ck.get("threshold")
    if override is not None:
        if not math.isfinite(override):
            raise ValueError(f"--threshold must be a finite number, got {override}")
        note = f"threshold {override:.6g} from --threshold"
        if isinstance(stored, dict) and "value" in stored:
            note += f" (the checkpoint's own is {float(stored['value']):.6g})"
        return Threshold(float(override), "--threshold", note)
    if stored is None:
        return Threshold(None, "none", "the checkpoint stores no threshold (written before thresholds were "
                         "stored, or trained without held-out normal images): decisions are n/a; pass --threshold T")
    try:
        value = float(stored["value"])
    except (TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"the checkpoint's threshold entry is malformed ({stored!r}); pass --threshold T") from e
    if not math.isfinite(value):
        raise CheckpointError(f"the checkpoint's threshold is not finite ({value}); pass --threshold T")
    max_fpr = stored.get("max_fpr")
    n = stored.get("n_heldout")
    mode = stored.get("score_mode")
    if mode and score_mode and str(mode).split(":")[0] != score_mode:
        raise CheckpointError(f"the checkpoint's threshold was chosen for score mode {mode!r} but the model scores "
                              f"in mode {score_mode!r}; pass --threshold T")
    note = f"threshold {value:.6g} from the checkpoint"
    if max_fpr is not None:
        note += f": false-alarm rate {float(max_fpr):.3g} on {n if n is not None else '?'} held-out normal images"
    if mode:
        note += f" (score mode {mode})"
    return Threshold(value, "checkpoint", note, float(max_fpr) if max_fpr is not None else None,
                     int(n) if n is not None else None, str(mode) if mode else None)


def decide(score: float, threshold: Optional[float]) -> str:
    """``defect`` if ``score > threshold``, ``good`` otherwise, ``n/a`` without a threshold."""
    if threshold is None:
        return NO_DECISION
    return DEFECT if score > threshold else GOOD


# ----------------------------------------------------------------------------- scoring
@dataclass
class Prediction:
    path: str
    score: Optional[float] = None
    decision: str = ERROR
    error: Optional[str] = None
    index: int = -1             # position among the scored images (overlay numbering); -1 for errors


@dataclass
class ScoreResult:
    predictions: List[Prediction]            # every file, in input order
    maps: Dict[int, "object"] = field(default_factory=dict)   # file position -> (H, W) float16 map
    map_range: Tuple[float, float] = (math.inf, -math.inf)
    n_scored: int = 0

    def record(self, position: int, amap, score, threshold: Optional[float], keep_maps: int) -> None:
        """File ``position`` scored: its score, decision and overlay number; its map kept (float16,
        on the CPU) while fewer than ``keep_maps`` are; the maps' range widened."""
        import torch

        pred = self.predictions[position]
        pred.score = float(score)
        pred.decision = decide(pred.score, threshold)
        pred.index = self.n_scored
        amap = amap.float()
        lo, hi = self.map_range
        self.map_range = (min(lo, float(amap.min())), max(hi, float(amap.max())))
        if self.n_scored < keep_maps:
            self.maps[position] = amap.to("cpu", torch.float16)
        self.n_scored += 1


def _score_batch(scorer: Scorer, images, ok: List[int]):
    """([(position in chunk, map, score)], [(position in chunk, error)]) for the loaded images of a
    chunk: one scorer call, or, where its map is not finite, one call per image to find the culprits."""
    from .models import NonFiniteError

    if not ok:
        return [], []
    try:
        maps, scores = scorer.score(images)
        return [(j, maps[k], scores[k]) for k, j in enumerate(ok)], []
    except NonFiniteError:
        outputs, errors = [], []
        for k, j in enumerate(ok):
            try:
                m, s = scorer.score(images[k:k + 1])
                outputs.append((j, m[0], s[0]))
            except NonFiniteError as e:
                errors.append((j, f"the model's anomaly map is not finite: {e}"))
        return outputs, errors


def score_files(model, files: Sequence[str], *, batch_size: int = 16, device: Optional[str] = None,
                threshold: Optional[float] = None, keep_maps: int = 0, progress: bool = True,
                on_result: Optional[Callable[[Prediction], None]] = None) -> ScoreResult:
    """Score ``files`` in batches with ``model.anomaly_map`` (``model``: a trained model, or a
    :class:`~altub_fast.inference.Scorer`, which reads and scores the images). Unreadable files (and
    images whose map is not finite) become predictions with decision ``error``. The maps of the
    first ``keep_maps`` scored images are kept (float16, on the CPU) for overlays."""
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    scorer = model if isinstance(model, Scorer) else Scorer(model, device)
    result = ScoreResult([Prediction(str(f)) for f in files])
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress, dynamic_ncols=True,
               file=sys.stderr)
    for start in range(0, len(files), batch_size):
        chunk = list(files[start:start + batch_size])
        images, ok, bad = scorer.read(chunk)
        outputs, not_finite = _score_batch(scorer, images, ok)
        for j, msg in bad + not_finite:
            result.predictions[start + j].error = msg
        for j, amap, score in outputs:
            result.record(start + j, amap, score, threshold, keep_maps)
        for j in range(len(chunk)):
            if on_result is not None:
                on_result(result.predictions[start + j])
        bar.update(len(chunk))
    bar.close()
    return result


# ----------------------------------------------------------------------------- outputs
def write_outputs(result: ScoreResult, thr: Threshold, out_dir: Path, checkpoint: str, extra: dict) -> List[Path]:
    """predictions.csv and predictions.json (written atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [dict(path=p.path, score="" if p.score is None else repr(p.score), decision=p.decision,
                 threshold="" if thr.value is None else repr(thr.value), error=p.error or "")
            for p in result.predictions]
    csv_path, json_path = out_dir / "predictions.csv", out_dir / "predictions.json"
    tmp = csv_path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "score", "decision", "threshold", "error"])
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, csv_path)
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


def write_overlays(result: ScoreResult, model, thr: Threshold, out_dir: Path, chunk: int = 16) -> List[Path]:
    """One PNG per kept map: the image, the map over it and alone, titled with score and decision.
    The colour range is the range of every map of the run, so colours compare across files."""
    import torch

    from .inference import read_images
    from .viz import save_overlays

    size_hw = tuple(int(v) for v in model.image_size)
    lo, hi = result.map_range
    keep = sorted(result.maps)
    written: List[Path] = []
    for s in range(0, len(keep), chunk):
        pos = keep[s:s + chunk]
        preds = [result.predictions[i] for i in pos]
        images, ok, _ = read_images([p.path for p in preds], size_hw, normalise=False)
        if len(ok) != len(pos):
            print(f"warning: no overlays for {len(pos)} images: a file changed on disk since it was scored",
                  file=sys.stderr)
            continue
        titles = []
        for p in preds:
            if thr.value is None:
                verdict = "no threshold"
            else:
                verdict = f"{'>' if p.decision == DEFECT else '<='} threshold {thr.value:.4g}: {p.decision.upper()}"
            titles.append(f"{p.path}\nscore {p.score:.4g}, {verdict}")
        maps = torch.stack([result.maps[i].float() for i in pos])
        written += save_overlays(images, maps, None, [p.path for p in preds], out_dir, normalized=False,
                                 vmin=lo, vmax=hi, titles=titles, start_index=preds[0].index)
    return written


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m altub_fast.predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("paths", nargs="*", metavar="PATH", help="image files, folders or glob patterns")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by altub_fast's trainer (last.pt)")
    p.add_argument("--threshold", type=float, default=None,
                   help="decide 'defect' above this score (default: the threshold stored in the checkpoint)")
    p.add_argument("--out", default=None, help="output folder (default: runs/predict-<checkpoint name>)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-overlays", type=int, default=None,
                   help="write overlay PNGs for the first N scored images (default: all; 0: none)")
    p.add_argument("--recursive", action="store_true", help="also score files in sub-folders of folder arguments")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no per-image table")
    return p


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def _row(decision: str, score: Optional[float], path: str) -> str:
    return f"{decision:7s} {'-' if score is None else format(score, '.6g'):>12s}  {path}"


def _argument_problem(args) -> Optional[str]:
    """What is wrong with the options, or None."""
    if args.batch_size < 1:
        return f"--batch-size must be at least 1, got {args.batch_size}"
    if args.max_overlays is not None and args.max_overlays < 0:
        return f"--max-overlays must be 0 or more, got {args.max_overlays}"
    if args.threshold is not None and not math.isfinite(args.threshold):
        return f"--threshold must be a finite number, got {args.threshold}"
    if not args.paths:
        return "no input: give image files, folders or glob patterns after the options"
    return None


def _print_header(model, thr: Threshold, n_files: int, args, device: str) -> None:
    h, w = model.image_size
    print(f"altub_fast predict: {n_files} files, {model.config.get('name', type(model).__name__)} "
          f"({model.config.get('backbone', '?')}, {h}x{w}) from {args.checkpoint}, device {device}")
    print(thr.note)
    if not getattr(model, "calibrated", True):
        print(f"warning: the model's score normalisation was never calibrated on held-out normal images (a checkpoint "
              f"from before calibration?): score mode {model.score_mode!r} runs with default constants",
              file=sys.stderr)
    if not args.quiet:
        print(f"{'decision':7s} {'score':>12s}  path")


def _print_summary(result: ScoreResult, thr: Threshold, out_dir: Path, n_written: int) -> int:
    """The closing lines (counts, files written, skipped files); returns the exit status."""
    preds = result.predictions
    skipped = [p for p in preds if p.error is not None]
    scored = [p for p in preds if p.error is None]
    summary = f"\n{len(scored)} scored"
    if thr.value is not None:
        summary += (f": {sum(p.decision == DEFECT for p in scored)} defect, "
                    f"{sum(p.decision == GOOD for p in scored)} good (threshold {thr.value:.6g})")
    else:
        summary += " (no decisions: no threshold)"
    print(summary + f"; wrote {out_dir / 'predictions.csv'}, predictions.json"
          + (f" and {n_written - 2} overlays under {out_dir / 'overlays'}" if n_written > 2 else ""))
    if skipped:
        print(f"{len(skipped)} file(s) skipped:", file=sys.stderr)
        for p in skipped:
            print(f"  {p.path}: {p.error}", file=sys.stderr)
        return EXIT_SKIPPED
    return EXIT_OK


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    problem = _argument_problem(args)
    if problem:
        return _fail(problem)
    files, problems = collect_inputs(args.paths, recursive=args.recursive)
    if not files:
        return _fail("no input images: " + "; ".join(f"{a}: {why}" for a, why in problems))

    import torch
    from tqdm import tqdm

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        return _fail(f"--device {device} was asked for but torch sees no CUDA device")
    try:
        model, ck = open_checkpoint(args.checkpoint, device=device)
        thr = resolve_threshold(ck, args.threshold, getattr(model, "score_mode", None))
    except CheckpointError as e:
        return _fail(str(e))
    out_dir = Path(args.out or Path("runs") / f"predict-{Path(args.checkpoint).stem}")
    keep = len(files) if args.max_overlays is None else args.max_overlays
    _print_header(model, thr, len(files), args, device)

    def show(p: Prediction) -> None:
        if not args.quiet:
            tqdm.write(_row(p.decision, p.score, p.path) + (f"   ({p.error})" if p.error else ""), file=sys.stdout)

    result = score_files(Scorer(model, device), files, batch_size=args.batch_size, threshold=thr.value,
                         keep_maps=keep, progress=not args.quiet, on_result=show)
    for arg, why in problems:
        result.predictions.append(Prediction(arg, error=why))
    extra = {"model": dict(model.config), "image_size": list(model.image_size), "device": device,
             "torch": torch.__version__}
    written = write_outputs(result, thr, out_dir, args.checkpoint, extra)
    if keep > 0 and result.maps:
        written += write_overlays(result, model, thr, out_dir / "overlays")
    return _print_summary(result, thr, out_dir, len(written))


if __name__ == "__main__":
    raise SystemExit(main())
