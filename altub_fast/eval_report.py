"""What eval writes and prints: results.json, the PNGs, the table and the per-checkpoint lines."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

__all__ = ["format_checkpoints", "format_table", "write_pngs", "write_results"]


def write_pngs(record: dict, res: dict, test_ds, out_dir: Path, n: int) -> List[str]:
    """ROC curves (where the test set has masks) and ``n`` overlays of run ``record``; ``res``: its
    chosen checkpoint's scores (:func:`altub_fast.inference.score_dataset`). Returns the files."""
    import torch

    from .viz import save_overlays, save_roc_curves

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
        ("pixel map (--score)", *[r.get("rules", {}).get("score", "-") for r in records]),
        ("image score (--image-score)", *[r.get("rules", {}).get("image_score_text", "-") for r in records]),
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


def write_results(results: dict, records: List[dict], out_dir: Path) -> Path:
    """``results`` with the runs and (two runs) their metrics' difference, written atomically to
    ``<out_dir>/results.json``."""
    results["runs"] = records
    if len(records) == 2:
        results["difference"] = {k: (None if records[0]["metrics"][k] is None or records[1]["metrics"][k] is None
                                     else records[0]["metrics"][k] - records[1]["metrics"][k])
                                 for k in records[0]["metrics"]}
    path = out_dir / "results.json"
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, path)
    return path
