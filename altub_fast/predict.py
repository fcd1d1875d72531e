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

EXIT_OK, EXIT_SKIPPED, EXIT_USAGE = 0, 1, 2
GOOD, DEFECT, NO_DECISION, ERROR = "good", "defect", "n/a", "error"
_GLOB_CHARS = set("*?[")

__all__ = ["CheckpointError", "Threshold", "Prediction", "open_checkpoint", "collect_inputs", "resolve_threshold",
           "decide", "load_images", "score_files", "main"]


class CheckpointError(ValueError):
    """A checkpoint cannot be used for inference (missing, truncated, an older format, ...). The
    message names the file and the problem."""


# ----------------------------------------------------------------------------- checkpoint
def open_checkpoint(path: str, device: Optional[str] = None):
    """(model in eval mode on ``device``, the checkpoint dict) from a trainer checkpoint, or a
    :class:`CheckpointError` that says what is wrong with the file."""
    import pickle
    import zipfile

    from .models import BackboneWeightsError
    from .train import load_checkpoint_file, load_model

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist" if not p.exists() else
                              f"checkpoint {path} is not a file")
    try:
        ck = load_checkpoint_file(str(p))
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"cannot read checkpoint {path} ({p.stat().st_size} bytes): the file is truncated, "
                              f"corrupt or not a torch checkpoint ({type(e).__name__}: {_first_line(e)})") from e
    except ValueError as e:   # the trainer's "not an altub_fast training checkpoint (format ...)"
        raise CheckpointError(f"{e}; it may come from an older altub_fast or another program: "
                              f"re-train, or re-save it with the current altub_fast.train.AltUBTrainer") from e
    try:
        model = load_model(str(p), device=device)
    except BackboneWeightsError as e:
        raise CheckpointError(f"checkpoint {path} needs its backbone's pretrained weights, which cannot be "
                              f"loaded here: {e}") from e
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} does not describe a model this altub_fast can rebuild "
                              f"(an older checkpoint format?): {type(e).__name__}: {_first_line(e)}") from e
    return model, ck


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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


def load_images(files: Sequence[str], size_hw: Tuple[int, int]):
    """(stacked ImageNet-normalised images (n, 3, H, W) of the files that loaded, their positions
    in ``files``, [(position, error message)] for the others)."""
    import torch

    from .data.mvtec import IMAGENET_MEAN, IMAGENET_STD, DatasetError, load_image

    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    images, ok, bad = [], [], []
    for i, f in enumerate(files):
        try:
            images.append((torch.from_numpy(load_image(f, size_hw)) - mean) / std)
            ok.append(i)
        except (DatasetError, OSError, ValueError) as e:
            msg = str(e)
            if "cannot identify image file" in msg:
                msg = f"not an image file (PIL cannot identify it): {f}"
            bad.append((i, msg))
    stacked = torch.stack(images) if images else torch.empty(0, 3, *size_hw)
    return stacked, ok, bad


def score_files(model, files: Sequence[str], *, batch_size: int = 16, device: Optional[str] = None,
                threshold: Optional[float] = None, keep_maps: int = 0, progress: bool = True,
                on_result: Optional[Callable[[Prediction], None]] = None) -> ScoreResult:
    """Score ``files`` in batches with ``model.anomaly_map``. Unreadable files (and images whose
    map is not finite) become predictions with decision ``error``. The maps of the first
    ``keep_maps`` scored images are kept (float16, on the CPU) for overlays."""
    import torch
    from tqdm import tqdm

    from .models import NonFiniteError

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    size_hw = tuple(int(v) for v in model.image_size)
    result = ScoreResult([Prediction(str(f)) for f in files])
    lo, hi = math.inf, -math.inf
    n_scored = 0
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress, dynamic_ncols=True,
               file=sys.stderr)

    def run(batch):
        with torch.no_grad():
            return model.anomaly_map(batch.to(dev))

    for start in range(0, len(files), batch_size):
        chunk = list(files[start:start + batch_size])
        images, ok, bad = load_images(chunk, size_hw)
        for j, msg in bad:
            result.predictions[start + j].error = msg
        outputs = []   # (position in chunk, map, score)
        if ok:
            try:
                maps, scores = run(images)
                outputs = [(j, maps[k], scores[k]) for k, j in enumerate(ok)]
            except NonFiniteError:
                # find the image(s) responsible: score one by one
                for k, j in enumerate(ok):
                    try:
                        m, s = run(images[k:k + 1])
                        outputs.append((j, m[0], s[0]))
                    except NonFiniteError as e:
                        result.predictions[start + j].error = f"the model's anomaly map is not finite: {e}"
        for j, amap, score in outputs:
            pred = result.predictions[start + j]
            pred.score = float(score)
            pred.decision = decide(pred.score, threshold)
            pred.index = n_scored
            amap = amap.float()
            lo, hi = min(lo, float(amap.min())), max(hi, float(amap.max()))
            if n_scored < keep_maps:
                result.maps[start + j] = amap.to("cpu", torch.float16)
            n_scored += 1
        for j in range(len(chunk)):
            if on_result is not None:
                on_result(result.predictions[start + j])
        bar.update(len(chunk))
    bar.close()
    result.map_range = (lo, hi)
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

    from .viz import save_overlays

    size_hw = tuple(int(v) for v in model.image_size)
    lo, hi = result.map_range
    keep = sorted(result.maps)
    written: List[Path] = []
    for s in range(0, len(keep), chunk):
        pos = keep[s:s + chunk]
        preds = [result.predictions[i] for i in pos]
        images, ok, _ = load_images([p.path for p in preds], size_hw)
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
        written += save_overlays(images, maps, None, [p.path for p in preds], out_dir, vmin=lo, vmax=hi,
                                 titles=titles, start_index=preds[0].index)
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


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        return _fail(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_overlays is not None and args.max_overlays < 0:
        return _fail(f"--max-overlays must be 0 or more, got {args.max_overlays}")
    if args.threshold is not None and not math.isfinite(args.threshold):
        return _fail(f"--threshold must be a finite number, got {args.threshold}")
    if not args.paths:
        return _fail("no input: give image files, folders or glob patterns after the options")
    files, problems = collect_inputs(args.paths, recursive=args.recursive)
    if not files:
        return _fail("no input images: " + "; ".join(f"{a}: {why}" for a, why in problems))

    import torch

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
    h, w = model.image_size
    print(f"altub_fast predict: {len(files)} files, {model.config.get('name', type(model).__name__)} "
          f"({model.config.get('backbone', '?')}, {h}x{w}) from {args.checkpoint}, device {device}")
    print(thr.note)
    if not getattr(model, "calibrated", True):
        print(f"warning: the model's score normalisation was never calibrated on held-out normal images (a checkpoint "
              f"from before calibration?): score mode {model.score_mode!r} runs with default constants",
              file=sys.stderr)
    if not args.quiet:
        print(f"{'decision':7s} {'score':>12s}  path")

    from tqdm import tqdm

    def show(p: Prediction) -> None:
        if args.quiet:
            return
        line = _row(p.decision, p.score, p.path) + (f"   ({p.error})" if p.error else "")
        tqdm.write(line, file=sys.stdout)

    result = score_files(model, files, batch_size=args.batch_size, device=device, threshold=thr.value,
                         keep_maps=keep, progress=not args.quiet, on_result=show)
    for arg, why in problems:
        result.predictions.append(Prediction(arg, error=why))
    extra = {"model": dict(model.config), "image_size": [h, w], "device": device, "torch": torch.__version__}
    written = write_outputs(result, thr, out_dir, args.checkpoint, extra)
    if keep > 0 and result.maps:
        written += write_overlays(result, model, thr, out_dir / "overlays")

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
          + (f" and {len(written) - 2} overlays under {out_dir / 'overlays'}" if len(written) > 2 else ""))
    if skipped:
        print(f"{len(skipped)} file(s) skipped:", file=sys.stderr)
        for p in skipped:
            print(f"  {p.path}: {p.error}", file=sys.stderr)
        return EXIT_SKIPPED
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
