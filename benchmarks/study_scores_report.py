"""The report of the score-mode study (``study_scores.py``): the tables (last, label-free auto and
test-chosen best epoch per model, arm, block set and score) and the curves, from study.json files
alone (``--from-json``); runs a stopped study left unfinished are rebuilt from its log."""
from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import Any, Callable, Dict, Iterator, List, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from study_harness import md_table, merge_results, write_summary  # noqa: E402

METRICS = ("image_auroc", "pixel_auroc", "aupro")
DEFAULT_BLOCKS = (2, 4, 10)
_DATASET_LINE = (r"^\S+ (\S+): (\d+) train / (\d+) held-out normal / (\d+) test images at (\d+)px "
                 r"\((\d+) defective; pixel masks: (\w+)\)")
_LOG_LINE = (r"^\S+ (?P<ds>\S+) (?P<model>\S+) (?P<arm>\S+) blocks (?P<blocks>\S+) seed (?P<seed>\d+): epoch "
             r"(?P<epoch>\d+)/(?P<epochs>\d+) heldout NLL (?P<ho>\S+) train NLL (?P<tr>\S+) loglik img (?P<img>\S+) "
             r"pix (?P<pix>\S+) aupro (?P<aupro>\S+); fastflow pix (?P<ffpix>\S+)$")


def runs_from_log(path: str, done: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Runs still in progress when a study was stopped, rebuilt from its log lines (which carry the
    held-out NLL, the loglik/max metrics and the fastflow map's pixel AUROC of each evaluation);
    marked ``partial``. Runs already in ``done`` (the JSON) are skipped."""
    seen = {(r["dataset"], r["model"], r["arm"], "/".join(map(str, r["blocks"])), r["seed"]) for r in done}
    runs: Dict[tuple, Dict[str, Any]] = {}
    nan = float("nan")
    with open(path) as f:
        for line in f:
            m = re.match(_LOG_LINE, line.strip())
            if not m:
                continue
            key = (m["ds"], m["model"], m["arm"], m["blocks"], int(m["seed"]))
            if key in seen:
                continue
            r = runs.setdefault(key, dict(dataset=key[0], model=key[1], arm=key[2],
                                          blocks=[int(b) for b in key[3].split("/")], seed=key[4],
                                          epochs=int(m["epochs"]), curve=[], partial=True))
            num = lambda k: float(m[k]) if m[k] != "nan" else nan  # noqa: E731
            met = {"loglik/max": {"image_auroc": num("img"), "pixel_auroc": num("pix"), "aupro": num("aupro")},
                   "fastflow/max": {"pixel_auroc": num("ffpix")}}
            r["curve"].append({"epoch": int(m["epoch"]), "heldout_nll": num("ho"), "train_nll": num("tr"),
                               "metrics": met})
    out = []
    for r in runs.values():
        hist = [p["heldout_nll"] for p in r["curve"]]
        best = int(np.argmin(hist))
        r["auto"] = {"stop": r["curve"][-1]["epoch"], "chosen": r["curve"][best]["epoch"],
                     "note": "partial run: lowest held-out NLL among the logged evaluations"}
        out.append(r)
    return out



def read_study(path: str, log_only_config: Callable[[str], Dict[str, Any]]) -> Dict[str, Any]:
    """One study's results: ``path`` (a study.json or its folder) with the unfinished runs of the
    study.log beside it; where the study stopped before its first run finished, the log alone
    (data sets from its lines, config from ``log_only_config(log path)``)."""
    if os.path.isdir(path):
        path = os.path.join(path, "study.json")
    log_path = os.path.join(os.path.dirname(path), "study.log")
    if os.path.isfile(path):
        with open(path) as f:
            r = json.load(f)
    else:   # stopped before its first run finished: the log is all there is
        r = dict(config=log_only_config(log_path), datasets={}, runs=[], knn={})
        with open(log_path) as f:
            for line in f:
                m = re.match(_DATASET_LINE, line.strip())
                if m:
                    r["datasets"][m[1]] = dict(n_train=int(m[2]), n_heldout=int(m[3]), n_test=int(m[4]),
                                               image_size=int(m[5]), n_defective=int(m[6]),
                                               has_masks=m[7] == "True")
    if os.path.isfile(log_path):
        r["runs"] = list(r["runs"]) + runs_from_log(log_path, r["runs"])
    return r


def merge_json(paths: Sequence[str], log_only_config: Callable[[str], Dict[str, Any]]) -> Dict[str, Any]:
    """One results dict from study.json files of runs split by data set (run side by side)."""
    studies: Iterator[Dict[str, Any]] = (read_study(p, log_only_config) for p in paths)
    return merge_results(studies)


def _ms(xs: Sequence[float]) -> str:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{np.mean(xs):.3f} ± {np.std(xs, ddof=1):.3f}"


def _metric(rec, key, metric):
    return rec.get("metrics", {}).get(key, {}).get(metric)


def run_points(run) -> Dict[str, Dict[str, Any]]:
    """last, auto-chosen and best-on-test (hindsight) points of a run, per score key."""
    evals = [r for r in run["curve"] if "metrics" in r]
    last = run["curve"][-1]
    chosen = next(r for r in run["curve"] if r["epoch"] == run["auto"]["chosen"])
    return {"last": last, "auto": chosen, "evals": evals}


def _group_rows(rs: List[Dict[str, Any]], metrics: Sequence[str]) -> List[List[Any]]:
    """The table rows of one (model, arm, blocks) group of runs: one per score key."""
    model, arm = rs[0]["model"], rs[0]["arm"]
    blocks = "/".join(map(str, rs[0]["blocks"]))
    rows = []
    keys = sorted({k for r in rs for p in r["curve"] if "metrics" in p for k in p["metrics"]})
    for key in keys:
        cells = []
        for m in metrics:
            last = [_metric(run_points(r)["last"], key, m) for r in rs]
            auto = [_metric(run_points(r)["auto"], key, m) for r in rs]
            best = [max((v for v in (_metric(p, key, m) for p in run_points(r)["evals"]) if v is not None),
                        default=None) for r in rs]
            cells += [_ms(last), _ms(auto), _ms(best)]
        ae = [r["auto"]["chosen"] for r in rs]
        partial = any(r.get("partial") for r in rs)
        ends = ", ".join(str(r["curve"][-1]["epoch"]) for r in rs)
        rows.append([model, arm, blocks, len(rs), key, *cells, f"{', '.join(map(str, ae))} of {rs[0]['epochs']}"
                     + (f" (stopped at epoch {ends}: partial, from the log)" if partial else "")])
    return rows


def _dataset_md(results: Dict[str, Any], ds: str, info: Dict[str, Any]) -> List[str]:
    """One data set's section: the kNN line and the table of every run group and score."""
    lines = [f"## {ds} ({info['n_train']} train / {info['n_heldout']} held-out / {info['n_test']} test, "
             f"masks: {info['has_masks']})", ""]
    knn = results["knn"].get(ds)
    if knn:
        lines.append(f"kNN baseline (blocks 4+10): image AUROC {knn['image_auroc']:.3f}"
                     + (f", pixel AUROC {knn['pixel_auroc']:.3f}, AUPRO {knn['aupro']:.3f}" if "pixel_auroc" in knn else ""))
        lines.append("")
    groups: Dict[tuple, List[dict]] = {}
    for r in results["runs"]:
        if r["dataset"] == ds:
            groups.setdefault((r["model"], r["arm"], "/".join(map(str, r["blocks"]))), []).append(r)
    metrics = METRICS if info["has_masks"] else ("image_auroc",)
    header = ["model", "arm", "blocks", "seeds", "score",
              *(f"{m} {col}" for m in metrics for col in ("last", "auto", "best (test-chosen)")), "auto epoch"]
    return lines + md_table(header, [row for rs in groups.values() for row in _group_rows(rs, metrics)]) + [""]


def report(results: Dict[str, Any], out: str) -> Dict[str, Any]:
    """summary.md and the curves in ``out`` from ``results`` alone."""
    cfg = results["config"]
    lines = ["# Score-mode / loss / block-set study (generated by benchmarks/study_scores.py)", "",
             f"Preset {cfg['preset']}, {cfg['image_size']} px, batch {cfg['batch_size']}, backbone {cfg['backbone']}, "
             f"{cfg['threads']} thread(s), torch {cfg['torch']}. Label-free rule: {cfg['auto_rule']}. "
             "'best (test-chosen)' = the best evaluated epoch picked on the test set: hindsight, not a "
             "choice the software can make.", ""]
    if results.get("errors"):
        lines += ["Errors: " + "; ".join(results["errors"]), ""]
    for ds, info in results["datasets"].items():
        lines += _dataset_md(results, ds, info)
    write_summary(lines, os.path.join(out, "summary.md"), lambda: plot_curves(results, out))
    return results


def plot_curves(results: Dict[str, Any], out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for ds in results["datasets"]:
        runs = [r for r in results["runs"] if r["dataset"] == ds and r["model"] == "fastflow"
                and r["blocks"] == list(DEFAULT_BLOCKS)]
        if not runs:
            continue
        metric = "pixel_auroc" if results["datasets"][ds]["has_masks"] else "image_auroc"
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for r in runs:
            ep = [p["epoch"] for p in r["curve"]]
            axes[0].plot(ep, [p["heldout_nll"] for p in r["curve"]], label=f"{r['arm']} s{r['seed']}")
            for key, ls in (("loglik/max", "-"), ("fastflow/max", "--")):
                pts = [(p["epoch"], _metric(p, key, metric)) for p in r["curve"] if "metrics" in p]
                axes[1].plot([a for a, _ in pts], [b for _, b in pts], ls,
                             label=f"{r['arm']} s{r['seed']} {key.split('/')[0]}")
        axes[0].set_title(f"{ds}: held-out NLL (nats/dim)")
        axes[1].set_title(f"{ds}: {metric} (solid loglik, dashed fastflow map)")
        for a in axes:
            a.set_xlabel("epoch")
        axes[1].legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"curves_{ds}.png"), dpi=90)
        plt.close(fig)

