"""Does AltUB's learnable base help FastFlow? A paired study of the paper's three claims.

AltUB (arXiv 2210.14913) claims that (a) trained flows map normal features to a normal distribution
that is not N(0, I); (b) a learnable base N(mu, sigma^2) updated in alternation with the flow makes
the AUROC more stable across training and (c) higher. This script tests all three with FastFlow on
efficientnet_lite0 (the one pretrained backbone that works offline) on the real ``magnetic_tile`` set
and on the synthetic carpet:

- FastFlow with and without AltUB, over several seeds. For one seed both arms start from the same
  flow weights and see the same batches (the seed fixes the initialisation and the shuffling), and
  every arm and seed uses the same data (train and test subsets are drawn once, from ``--data-seed``),
  so every comparison is paired.
- Image AUROC, pixel AUROC and AUPRO every ``--eval-every`` epochs on the (cached) test features.
  Per run: the final epoch, the best epoch (CHOSEN ON THE TEST SET, an optimistic number, reported as
  such), and the std across evaluations after the warm-up and over the second half of training.
  Across seeds: mean and std of all of these, and the paired AltUB - baseline differences.
- Claim (a): per-channel mean, std, skewness and excess kurtosis of z on the training data at the end
  of training (the flow run in eval mode on all training features), the learned mu and sigma, and a
  scatter plot of channel mean vs std per scale with N(0, I) marked.
- An optional sweep of the alternation constants (k, r, SGD vs the third-party port's Adam at lr 0.05)
  on one dataset with fewer seeds.

Outputs under ``--out``: ``study.json`` (everything, per-run curves included), ``summary.md`` (tables),
``curves_<dataset>.png``, ``zstats_<dataset>.png``, ``base_<dataset>.png`` and ``sweep_<dataset>.png``.

    python benchmarks/study_altub.py --out docs/study                 # reduced size, CPU, ~30 min
    python benchmarks/study_altub.py --out docs/study_full --size full  # 256 px, all data (GPU)

Every size option can be overridden on the command line (see ``--help``).

The study's parts: this file (data, the arms, the runs, the command line), ``study_altub_stats.py``
(z statistics, run summaries, aggregation over seeds), ``study_altub_report.py`` (plots, tables,
summary.md) and ``study_harness.py`` (log, JSON, the runner; shared by the studies).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from functools import partial
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import TensorDataset

from altub_fast.data import MVTecAD, make_synthetic_carpet
from altub_fast.metrics import compute_all
from altub_fast.models import build_model
from altub_fast.train import AltUBTrainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from study_altub_report import report  # noqa: E402
from study_altub_stats import METRICS, channel_stats, run_summary  # noqa: E402
from study_harness import load_stack, run_jobs, save_json  # noqa: E402
from study_harness import log as _log  # noqa: E402

BACKBONE = "efficientnet_lite0"
#: This study's model, pinned as it ran (the package defaults changed after it: docs/results.md):
#: blocks 2/4/10, the published loss (no LayerNorm log-det), FastFlow's map and the max image score.
STUDY_MODEL = dict(feature_blocks=(2, 4, 10), norm_logdet=False, score="fastflow", image_score="max")
DATASETS = ("magnetic_tile", "carpet_synthetic")

#: Size presets. ``reduced`` fits ~30 min on 2 shared CPU cores (features cached, so an epoch costs
#: only the flows; batch 16 rather than SPEC's 32 doubles the number of updates at the same cost per
#: epoch on a CPU); ``full`` is 256 px, all data, batch 32, many epochs, for a GPU; ``tiny`` is the
#: smoke test's.
PRESETS: Dict[str, Dict[str, Any]] = {
    "reduced": dict(image_size=160, epochs=24, eval_every=3, seeds=[0, 1, 2], batch_size=16,
                    mt_train=200, mt_test_fraction=0.5,
                    syn_train=100, syn_test_good=30, syn_test_defect=8, syn_size=160,
                    sweep_dataset="magnetic_tile", sweep_seeds=2),
    "full": dict(image_size=256, epochs=200, eval_every=10, seeds=[0, 1, 2, 3, 4], batch_size=32,
                 mt_train=0, mt_test_fraction=1.0,
                 syn_train=280, syn_test_good=40, syn_test_defect=20, syn_size=256,
                 sweep_dataset="magnetic_tile", sweep_seeds=3),
    "tiny": dict(image_size=64, epochs=2, eval_every=1, seeds=[0], batch_size=4,
                 mt_train=8, mt_test_fraction=0.05,
                 syn_train=8, syn_test_good=3, syn_test_defect=1, syn_size=64,
                 sweep_dataset="carpet_synthetic", sweep_seeds=1),
}

#: The alternation variants swept (SPEC 2). "default" is the first author's code: SGD, lr = r * flow lr,
#: every k = 5 updates after the warm-up, gradients clipped at 100.
SWEEP_VARIANTS: Dict[str, Dict[str, Any]] = {
    "k5_r5_sgd (default)": dict(k=5, r=5.0, base_optimizer="sgd"),
    "k2_r5_sgd": dict(k=2, r=5.0, base_optimizer="sgd"),
    "k10_r5_sgd": dict(k=10, r=5.0, base_optimizer="sgd"),
    "k5_r1_sgd": dict(k=5, r=1.0, base_optimizer="sgd"),
    "k5_r20_sgd": dict(k=5, r=20.0, base_optimizer="sgd"),
    "k5_adam_lr0.05 (port)": dict(k=5, base_optimizer="adam", base_lr=0.05),
}
DEFAULT_VARIANT = "k5_r5_sgd (default)"


def log(msg: str) -> None:
    _log(msg, stamp="[%H:%M:%S]")


# ----------------------------------------------------------------------------- data
def stratified_subset(labels_by_group: Sequence[str], fraction: float, seed: int) -> List[int]:
    """Indices keeping ``fraction`` of every group (at least one each), drawn with ``seed``."""
    if fraction >= 1.0:
        return list(range(len(labels_by_group)))
    rng = np.random.default_rng(seed)
    keep: List[int] = []
    groups = sorted(set(labels_by_group))
    for g in groups:
        idx = np.array([i for i, x in enumerate(labels_by_group) if x == g])
        n = max(1, int(round(fraction * len(idx))))
        keep.extend(int(i) for i in rng.permutation(idx)[:n])
    return sorted(keep)


def prepare_dataset(name: str, cfg: Dict[str, Any], data_root: str, synthetic_root: str,
                    data_seed: int) -> Dict[str, Any]:
    """The train images and the test set of one dataset, loaded once and shared by all runs."""
    t0 = time.perf_counter()
    size = cfg["image_size"]
    if name == "magnetic_tile":
        train = MVTecAD(data_root, "magnetic_tile", "train", size)
        test = MVTecAD(data_root, "magnetic_tile", "test", size)
        n_train = cfg["mt_train"] or len(train)
        rng = np.random.default_rng(data_seed)
        train_idx = sorted(int(i) for i in rng.choice(len(train), size=min(n_train, len(train)), replace=False))
        test_idx = stratified_subset([s.defect for s in test.samples], cfg["mt_test_fraction"], data_seed)
        source = {"root": data_root, "category": "magnetic_tile"}
    elif name == "carpet_synthetic":
        root = make_synthetic_carpet(synthetic_root, seed=data_seed, n_train=cfg["syn_train"],
                                     n_test_good=cfg["syn_test_good"], n_test_defect=cfg["syn_test_defect"],
                                     size=cfg["syn_size"])
        train = MVTecAD(root.parent, root.name, "train", size)
        test = MVTecAD(root.parent, root.name, "test", size)
        train_idx, test_idx = list(range(len(train))), list(range(len(test)))
        source = {"root": str(root), "generator_seed": data_seed, "n_train": cfg["syn_train"],
                  "n_test_good": cfg["syn_test_good"], "n_test_defect_per_type": cfg["syn_test_defect"],
                  "generated_size": cfg["syn_size"]}
    else:
        raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")
    train_images = load_stack(train, train_idx).images
    test_images, test_masks, test_labels, test_defects = load_stack(test, test_idx)
    counts: Dict[str, int] = {}
    for d in test_defects:
        counts[d] = counts.get(d, 0) + 1
    log(f"{name}: {len(train_idx)} train / {len(test_idx)} test images at {size}px "
        f"({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}) loaded in {time.perf_counter() - t0:.1f}s")
    return {"name": name, "train_images": train_images, "test_images": test_images, "test_masks": test_masks,
            "test_labels": test_labels, "info": {"source": source, "image_size": size, "n_train": len(train_idx),
                                                 "n_test": len(test_idx), "test_counts": counts,
                                                 "train_indices": train_idx, "test_indices": test_idx}}


@torch.no_grad()
def extract(model, images: torch.Tensor, device, batch_size: int = 64) -> List[torch.Tensor]:
    """Backbone features of ``images`` (per scale, on ``device``)."""
    parts = []
    for i in range(0, len(images), batch_size):
        parts.append([f.to(device) for f in model.extract_features(images[i:i + batch_size].to(device))])
    return [torch.cat([p[s] for p in parts]) for s in range(len(parts[0]))]


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def anomaly_maps(model, feats: List[torch.Tensor], batch_size: int = 64) -> torch.Tensor:
    model.eval()
    n = feats[0].shape[0]
    return torch.cat([model.anomaly_map([f[i:i + batch_size] for f in feats])[0].cpu() for i in range(0, n, batch_size)])


def evaluate(model, data: Dict[str, Any]) -> Dict[str, float]:
    maps = anomaly_maps(model, data["test_feats"])
    return compute_all(maps.numpy(), data["test_masks"].numpy(), data["test_labels"].numpy())


# ----------------------------------------------------------------------------- one run
def n01_ablation(model, data: Dict[str, Any], label: str) -> Dict[str, Any]:
    """The same trained flow with its anomaly map computed with the base reset to N(0, I) (the
    learned base restored after): separates what the learned base does to the map (per-scale
    weights exp(-mean log sigma), shifted centre) from what the alternating training did to the flow."""
    saved = [(b.mu.detach().clone(), b.log_sigma.detach().clone()) for b in model.bases]
    with torch.no_grad():
        for b in model.bases:
            b.mu.zero_()
            b.log_sigma.zero_()
    m0 = evaluate(model, data)
    with torch.no_grad():
        for b, (mu, ls) in zip(model.bases, saved):
            b.mu.copy_(mu)
            b.log_sigma.copy_(ls)
    log(f"{label}: final epoch, same flow scored with N(0, I) instead of the learned base: "
        f"img {m0['image_auroc']:.4f} pix {m0['pixel_auroc']:.4f} aupro {m0['aupro']:.4f}")
    return {"final_map_with_N01_base": {k: float(m0[k]) for k in METRICS}}


def run_one(data: Dict[str, Any], arm: str, seed: int, cfg: Dict[str, Any], device,
            schedule: Optional[Dict[str, Any]] = None, variant: Optional[str] = None,
            tag: str = "") -> Dict[str, Any]:
    """Train one FastFlow (arm "baseline" or "altub"), evaluating every ``eval_every`` epochs."""
    altub = arm == "altub"
    schedule = dict(schedule or {})
    torch.manual_seed(seed)          # same flow initialisation for both arms of one seed
    np.random.seed(seed)
    model = build_model("fastflow", backbone=BACKBONE, pretrained=True, altub=altub,
                        image_size=cfg["image_size"], **STUDY_MODEL).to(device)
    trainer = AltUBTrainer(model, TensorDataset(data["train_images"]), epochs=cfg["epochs"],
                           batch_size=cfg["batch_size"], seed=seed, progress=False, device=str(device),
                           z_stats=True, **schedule)
    # The trainer would run the frozen backbone over the training images once per run (build_cache);
    # the study already holds exactly those features (same backbone, same images, dataset order), so it
    # hands them over instead.
    trainer.set_feature_cache(data["train_feats"])
    updates_per_epoch = math.ceil(len(data["train_images"]) / cfg["batch_size"])
    warmup_epochs = math.ceil(trainer.schedule.warmup / updates_per_epoch) if trainer.schedule.unit == "step" \
        else trainer.schedule.warmup
    evals = sorted(set(list(range(cfg["eval_every"], cfg["epochs"] + 1, cfg["eval_every"])) + [cfg["epochs"]]))
    curve = []
    t_train = t_eval = 0.0
    t_start = time.perf_counter()
    label = f"{data['name']} {arm}{' ' + variant if variant else ''} seed {seed}{tag}"
    for e in evals:
        t0 = time.perf_counter()
        trainer.fit(e)
        t1 = time.perf_counter()
        metrics = evaluate(model, data)
        t2 = time.perf_counter()
        t_train += t1 - t0
        t_eval += t2 - t1
        rec = trainer.history[-1]
        point = {"epoch": e, **{k: float(metrics[k]) for k in METRICS}, "loss": rec["loss"],
                 "mu_abs_mean": float(np.mean([b.mu.detach().abs().mean().item() for b in model.bases])),
                 "sigma_mean": float(np.mean([s["sigma_mean"] for s in rec["scales"]])),
                 # FastFlow's LayerNorm affine is trainable but not in the log-det (as in the reference code)
                 "layernorm_weight_mean": [float(n.weight.detach().mean()) for n in model.norms
                                           if getattr(n, "weight", None) is not None]}
        curve.append(point)
        log(f"{label}: epoch {e}/{cfg['epochs']} img {point['image_auroc']:.4f} pix {point['pixel_auroc']:.4f} "
            f"aupro {point['aupro']:.4f} loss {point['loss']:.4g} (train {t1 - t0:.1f}s, eval {t2 - t1:.1f}s)")
    ablation = None
    if altub:
        ablation = n01_ablation(model, data, label)
    zstats = channel_stats(model, data["train_feats"])
    history = [{k: r[k] for k in ("epoch", "loss", "loss_flow_updates", "loss_base_only_updates", "updates",
                                  "flow_updates", "base_only_updates", "lr", "base_lr", "time_s", "scales")}
               for r in trainer.history]
    return {"dataset": data["name"], "arm": arm, "variant": variant, "seed": seed,
            "schedule": dataclasses.asdict(trainer.schedule) if altub else None,
            "updates_per_epoch": updates_per_epoch, "warmup_epochs": warmup_epochs,
            "total_updates": trainer.global_step, "base_only_updates": trainer.base_updates,
            "curve": curve, "history": history, "z_stats": zstats, "ablation": ablation,
            "summary": run_summary(curve, warmup_epochs, cfg["epochs"]),
            "train_s": t_train, "eval_s": t_eval, "wall_s": time.perf_counter() - t_start}


# ----------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (study.json, summary.md, plots)")
    p.add_argument("--size", choices=sorted(PRESETS), default="reduced")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--data-root", default="/work/shared/data", help="folder holding magnetic_tile/")
    p.add_argument("--synthetic-root", default=os.path.join(tempfile.gettempdir(), "altub_fast_study_data"),
                   help="where the synthetic carpet is generated (reused if complete)")
    p.add_argument("--data-seed", type=int, default=0, help="fixes the train/test subsets (the same for every run)")
    for key, typ in (("image_size", int), ("epochs", int), ("eval_every", int), ("batch_size", int), ("mt_train", int),
                     ("mt_test_fraction", float), ("syn_train", int), ("syn_test_good", int), ("syn_test_defect", int),
                     ("syn_size", int), ("sweep_seeds", int)):
        p.add_argument("--" + key.replace("_", "-"), type=typ, default=None, help="override the preset")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="override the preset's seeds")
    p.add_argument("--sweep", dest="sweep", action="store_true", default=None, help="run the k/r/optimiser sweep")
    p.add_argument("--no-sweep", dest="sweep", action="store_false")
    p.add_argument("--sweep-dataset", default=None, choices=DATASETS)
    p.add_argument("--sweep-variants", nargs="+", default=None, help=f"subset of {list(SWEEP_VARIANTS)}")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--from-json", default=None, help="no training: redo the tables and plots from a study.json")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default on the CPU: 1; on a shared machine more threads than free "
                        "cores made an epoch 10x slower here)")
    return p.parse_args(argv)


#: What the numbers mean, stored with them.
NOTES = {"best_on_test": "the best evaluation of a run is chosen on the test set: optimistic, not a "
                         "valid model-selection result; 'final' is the honest number",
         "pairing": "for one seed both arms start from identical flow weights and see identical batches; "
                    "all runs share the same train and test subsets",
         "std_after_warmup": "std over the evaluations after the AltUB warm-up (same epochs for both arms)",
         "std_second_half": "std over the evaluations in the second half of training"}


def study_config(args: argparse.Namespace):
    """(the preset with the command line's overrides, the sweep variants to run)."""
    cfg = dict(PRESETS[args.size])
    for key in ("image_size", "epochs", "eval_every", "batch_size", "mt_train", "mt_test_fraction", "syn_train",
                "syn_test_good", "syn_test_defect", "syn_size", "sweep_seeds", "seeds", "sweep_dataset"):
        v = getattr(args, key)
        if v is not None:
            cfg[key] = v
    cfg["sweep"] = args.sweep if args.sweep is not None else args.size != "tiny"
    variants = args.sweep_variants or [v for v in SWEEP_VARIANTS if v != DEFAULT_VARIANT]
    for v in variants:
        if v not in SWEEP_VARIANTS:
            raise SystemExit(f"unknown sweep variant {v!r}; choose from {list(SWEEP_VARIANTS)}")
    return cfg, variants


def prepare_all(args, cfg: Dict[str, Any], device, results: Dict[str, Any]):
    """(every data set loaded once with its backbone features, shared by all runs; the seconds
    that took). Each data set's description goes to ``results["datasets"]``."""
    setup_s = 0.0
    feat_model = build_model("fastflow", backbone=BACKBONE, pretrained=True, altub=False,
                             image_size=cfg["image_size"], **STUDY_MODEL).to(device)
    prepared: Dict[str, Dict[str, Any]] = {}
    for ds in args.datasets:
        t0 = time.perf_counter()
        data = prepare_dataset(ds, cfg, args.data_root, args.synthetic_root, args.data_seed)
        data["test_feats"] = extract(feat_model, data["test_images"], device)
        data["train_feats"] = extract(feat_model, data["train_images"], device)
        del data["test_images"]
        prepared[ds] = data
        results["datasets"][ds] = data["info"]
        setup_s += time.perf_counter() - t0
    return prepared, setup_s


def plan_runs(args, cfg: Dict[str, Any], variants: Sequence[str], prepared, device, results: Dict[str, Any]) -> list:
    """The runs as (label, job) for :func:`study_harness.run_jobs`: both arms per data set and seed,
    then the sweep's variants."""
    plan = []
    for ds in args.datasets:
        for seed in cfg["seeds"]:
            for arm in ("baseline", "altub"):
                plan.append((ds, arm, seed, None, None))
    if cfg["sweep"] and cfg["sweep_dataset"] in prepared:
        for seed in cfg["seeds"][:cfg["sweep_seeds"]]:
            for v in variants:
                plan.append((cfg["sweep_dataset"], "altub", seed, SWEEP_VARIANTS[v], v))

    def job(i, ds, arm, seed, sched, variant):
        results["runs"].append(run_one(prepared[ds], arm, seed, cfg, device, schedule=sched, variant=variant,
                                       tag=f" [{i + 1}/{len(plan)}]"))

    jobs = []
    for i, (ds, arm, seed, sched, variant) in enumerate(plan):
        jobs.append((f"{ds} {arm} {variant or ''} seed {seed}", partial(job, i, ds, arm, seed, sched, variant)))
    return jobs


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            results = json.load(f)
        os.makedirs(args.out, exist_ok=True)
        report(results, args.out, list(SWEEP_VARIANTS))
        log(f"re-made {', '.join(results['plots'])} and summary.md in {args.out} from {args.from_json}")
        return results
    cfg, variants = study_config(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    os.makedirs(args.out, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in ([sys.argv[0]] + list(argv if argv is not None else sys.argv[1:])))
    if argv is not None:
        command = "main(" + repr(list(argv)) + ")"
    t_all = time.perf_counter()
    log(f"study: size {args.size}, datasets {args.datasets}, seeds {cfg['seeds']}, {cfg['epochs']} epochs, eval every "
        f"{cfg['eval_every']}, image {cfg['image_size']}px, batch {cfg['batch_size']}, device {device}, "
        f"{torch.get_num_threads()} threads, sweep {cfg['sweep']}")
    results: Dict[str, Any] = {
        "command": command, "size": args.size, "config": {**cfg, "datasets": args.datasets, "data_seed": args.data_seed,
                                                           "backbone": BACKBONE, "sweep_variants": variants},
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
                        "threads": torch.get_num_threads(), "impl": os.environ.get("ALTUB_FAST_IMPL", "auto"),
                        "host_cpus": os.cpu_count()},
        "notes": NOTES, "datasets": {}, "runs": [],
    }
    prepared, setup_s = prepare_all(args, cfg, device, results)
    jobs = plan_runs(args, cfg, variants, prepared, device, results)
    json_path = os.path.join(args.out, "study.json")
    run_jobs(jobs, results, lambda: save_json(results, json_path, indent=1, default=float),   # partial results survive
             before=lambda i, label: log(f"run {i + 1}/{len(jobs)}: {label} "
                                         f"(elapsed {(time.perf_counter() - t_all) / 60:.1f} min)"))
    results["timing"] = {"total_s": time.perf_counter() - t_all, "setup_s": setup_s,
                         "train_s": sum(r["train_s"] for r in results["runs"]),
                         "eval_s": sum(r["eval_s"] for r in results["runs"])}
    report(results, args.out, list(SWEEP_VARIANTS))
    log(f"done in {results['timing']['total_s'] / 60:.1f} min: {json_path}, summary.md, {', '.join(results['plots'])}")
    return results


if __name__ == "__main__":
    main()
