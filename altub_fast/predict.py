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

``--runtime`` (default ``auto``: ONNX Runtime, else OpenVINO, else PyTorch, whichever is installed
first; see :mod:`altub_fast.inference.runtime`) scores with the model exported once into
``<checkpoint>.exports/`` (keyed by the checkpoint's SHA-256, the input size and the runtime's
version; a corrupt entry is rebuilt) and checked against PyTorch on the first batch: a mismatch
warns and moves on (``auto``: to the next installed runtime, checked the same way), in the end to
PyTorch. The header and ``predictions.json`` (``runtime``) say which ran.
``--workers`` threads decode and resize the next batches while the model runs; memory does not
grow with the number of files (the maps kept for overlays go to a temporary file). The last lines
give the end-to-end images/s (files in -> CSV out); a progress line runs on stderr when it is a
terminal, or with ``--progress``.

The decision is ``defect`` when the score is above the threshold, else ``good``. The threshold is
``--threshold`` if given, else the one the trainer stored in the checkpoint (chosen on held-out
normal images at a false-alarm rate, ``max_fpr``); a checkpoint without one gives the decision
``n/a`` and says so. A file that cannot be read as an image is reported and skipped.

Exit status: 0 all images scored; 1 some files were skipped (listed at the end and in the outputs);
2 nothing to do (no input, a bad checkpoint, a bad argument, a --runtime that is not installed).

Where things are: this file reads the command line and prints; ``predict_scoring.py`` runs the
read-ahead scoring loop, ``predict_outputs.py`` writes the CSV, JSON and overlays.
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

# opening, reading, scoring: altub_fast/inference/
from .inference import CheckpointError, Scorer, describe_runtime, open_checkpoint
from .inference.pipeline import DEFAULT_WORKERS
from .inference.runtime import RUNTIMES, RuntimeUnavailable
from .predict_outputs import write_outputs, write_overlays
from .predict_scoring import (DEFECT, ERROR, GOOD, NO_DECISION, MapSpill, Prediction, ScoreResult,  # noqa: F401
                              decide, score_files)

EXIT_OK, EXIT_SKIPPED, EXIT_USAGE = 0, 1, 2
#: --batch-size when not given: 8 on the CPU, the fastest of batch 1 / 8 / 32 measured end to end
#: and per size (docs/deployment_speed.md), with a smaller peak than 32; 16 on CUDA (not measured).
CPU_BATCH, CUDA_BATCH = 8, 16
_GLOB_CHARS = set("*?[")

__all__ = ["CheckpointError", "Threshold", "Prediction", "ScoreResult", "open_checkpoint", "collect_inputs",
           "resolve_threshold", "decide", "score_files", "write_outputs", "write_overlays", "main"]


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
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"images per model call (default: {CPU_BATCH} on the CPU, {CUDA_BATCH} on CUDA)")
    p.add_argument("--max-overlays", type=int, default=None,
                   help="write overlay PNGs for the first N scored images (default: all; 0: none)")
    p.add_argument("--recursive", action="store_true", help="also score files in sub-folders of folder arguments")
    p.add_argument("--runtime", choices=RUNTIMES, default="auto",
                   help="what runs the model: auto (default: the fastest installed of onnxruntime, openvino; else "
                        "torch), torch (eager PyTorch), onnxruntime, openvino (both on the CPU, from an export "
                        "cached beside the checkpoint and checked against PyTorch on the first batch)")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                   help=f"threads reading and resizing images ahead of the model (default {DEFAULT_WORKERS}; "
                        "0: read in the main thread)")
    p.add_argument("--progress", action="store_true",
                   help="show the progress line on stderr even when it is not a terminal")
    p.add_argument("--quiet", action="store_true", help="no progress line (unless --progress) and no per-image table")
    return p


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def _row(decision: str, score: Optional[float], path: str) -> str:
    return f"{decision:7s} {'-' if score is None else format(score, '.6g'):>12s}  {path}"


def _argument_problem(args) -> Optional[str]:
    """What is wrong with the options, or None."""
    if args.batch_size is not None and args.batch_size < 1:
        return f"--batch-size must be at least 1, got {args.batch_size}"
    if args.workers < 0:
        return f"--workers must be 0 or more, got {args.workers}"
    if args.max_overlays is not None and args.max_overlays < 0:
        return f"--max-overlays must be 0 or more, got {args.max_overlays}"
    if args.threshold is not None and not math.isfinite(args.threshold):
        return f"--threshold must be a finite number, got {args.threshold}"
    if not args.paths:
        return "no input: give image files, folders or glob patterns after the options"
    return None


def _print_header(model, thr: Threshold, n_files: int, args, device: str, scorer: Scorer) -> None:
    h, w = model.image_size
    print(f"altub_fast predict: {n_files} files, {model.config.get('name', type(model).__name__)} "
          f"({model.config.get('backbone', '?')}, {h}x{w}) from {args.checkpoint}, device {device}, "
          f"runtime {describe_runtime(scorer.info)}")
    print(thr.note)
    if not getattr(model, "calibrated", True):
        print(f"warning: the model's score normalisation was never calibrated on held-out normal images (a checkpoint "
              f"from before calibration?): score mode {model.score_mode!r} runs with default constants",
              file=sys.stderr)
    if not args.quiet:
        print(f"{'decision':7s} {'score':>12s}  path")


def _print_summary(result: ScoreResult, thr: Threshold, out_dir: Path, n_written: int, extra: dict) -> int:
    """The closing lines (counts, speed, files written, skipped files); returns the exit status."""
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
    t = extra.get("throughput")
    if t:
        print(f"{t['files']} files in {t['seconds_end_to_end']:.3g} s: {t['images_per_s_end_to_end']:.3g} images/s "
              f"end to end (files in -> CSV out; runtime {describe_runtime(extra['runtime'])}; "
              f"setup {t['setup_seconds']:.3g} s before)")
    if skipped:
        print(f"{len(skipped)} file(s) skipped:", file=sys.stderr)
        for p in skipped:
            print(f"  {p.path}: {p.error}", file=sys.stderr)
        return EXIT_SKIPPED
    return EXIT_OK


def _device(args) -> Tuple[Optional[str], Optional[str]]:
    """(the device, None) or (None, what is wrong with --device / --runtime)."""
    import torch

    from .inference.runtime import resolve_runtime

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        return None, f"--device {device} was asked for but torch sees no CUDA device"
    try:
        resolve_runtime(args.runtime, device)
    except RuntimeUnavailable as e:
        return None, str(e)
    return device, None


def _scorer(model, args, device: str) -> Scorer:
    """The scorer for --runtime, its export ready (built or found in the cache) before the clock starts."""
    from .inference.runtime_scorer import make_scorer

    scorer = make_scorer(model, args.runtime, checkpoint=args.checkpoint, device=device)
    scorer.prepare()
    return scorer


def main(argv: Optional[List[str]] = None) -> int:
    t_setup = time.perf_counter()
    args = build_parser().parse_args(argv)
    problem = _argument_problem(args)
    if problem:
        return _fail(problem)
    files, problems = collect_inputs(args.paths, recursive=args.recursive)
    if not files:
        return _fail("no input images: " + "; ".join(f"{a}: {why}" for a, why in problems))
    device, problem = _device(args)
    if problem:
        return _fail(problem)
    if args.batch_size is None:
        args.batch_size = CUDA_BATCH if device.startswith("cuda") else CPU_BATCH

    import torch
    from tqdm import tqdm

    try:
        model, ck = open_checkpoint(args.checkpoint, device=device)
        thr = resolve_threshold(ck, args.threshold, getattr(model, "score_mode", None))
    except CheckpointError as e:
        return _fail(str(e))
    out_dir = Path(args.out or Path("runs") / f"predict-{Path(args.checkpoint).stem}")
    keep = len(files) if args.max_overlays is None else args.max_overlays
    scorer = _scorer(model, args, device)
    _print_header(model, thr, len(files), args, device, scorer)

    def show(p: Prediction) -> None:
        if not args.quiet:
            tqdm.write(_row(p.decision, p.score, p.path) + (f"   ({p.error})" if p.error else ""), file=sys.stdout)

    started = time.perf_counter()
    result = score_files(scorer, files, batch_size=args.batch_size, threshold=thr.value, keep_maps=keep,
                         progress=args.progress or (not args.quiet and sys.stderr.isatty()), on_result=show,
                         workers=args.workers)
    for arg, why in problems:
        result.predictions.append(Prediction(arg, error=why))
    extra = {"model": dict(model.config), "image_size": list(model.image_size), "device": device,
             "torch": torch.__version__, "runtime": scorer.info, "batch_size": args.batch_size,
             "workers": args.workers}
    written = write_outputs(result, thr, out_dir, args.checkpoint, extra, started=started,
                            setup_seconds=started - t_setup)
    if keep > 0 and len(result.maps):
        written += write_overlays(result, model, thr, out_dir / "overlays")
    result.maps.close()
    return _print_summary(result, thr, out_dir, len(written), extra)


if __name__ == "__main__":
    raise SystemExit(main())
