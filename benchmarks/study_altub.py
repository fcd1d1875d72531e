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
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from altub_fast.data import MVTecAD, make_synthetic_carpet
from altub_fast.metrics import compute_all
from altub_fast.models import build_model
from altub_fast.train import AltUBTrainer

METRICS = ("image_auroc", "pixel_auroc", "aupro")
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
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


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


def load_stack(dataset, batch_size: int = 32):
    """Load a whole (small) dataset into memory: images, masks, labels, defect names."""
    images, masks, labels, defects = [], [], [], []
    for b in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        images.append(b["image"])
        masks.append(b["mask"])
        labels.append(torch.as_tensor(b["label"]).reshape(-1))
        defects.extend(b["defect"])
    return torch.cat(images), torch.cat(masks), torch.cat(labels), defects


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
    train_images = load_stack(Subset(train, train_idx))[0]
    test_images, test_masks, test_labels, test_defects = load_stack(Subset(test, test_idx))
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


@torch.no_grad()
def channel_stats(model, feats: List[torch.Tensor], batch_size: int = 64) -> List[Dict[str, Any]]:
    """Per scale, per channel: mean, std, skewness and excess kurtosis of z over all training pixels
    (the flow in eval mode), and the base's mu and sigma; plus summaries (claim a)."""
    model.eval()
    out = []
    for s, (norm, flow, base) in enumerate(zip(model.norms, model.flows, model.bases)):
        C = base.num_channels
        m1 = torch.zeros(C, dtype=torch.float64)
        m2, m3, m4 = m1.clone(), m1.clone(), m1.clone()
        n = 0
        mu = base.mu.detach().double().cpu()
        sg = base.log_sigma.detach().double().exp().cpu()
        um1, um2 = m1.clone(), m1.clone()
        for i in range(0, feats[s].shape[0], batch_size):
            z, _ = flow(norm(feats[s][i:i + batch_size]))
            z = z.double().cpu().transpose(0, 1).reshape(C, -1)
            m1 += z.sum(1)
            m2 += (z ** 2).sum(1)
            m3 += (z ** 3).sum(1)
            m4 += (z ** 4).sum(1)
            u = (z - mu[:, None]) / sg[:, None]
            um1 += u.sum(1)
            um2 += (u ** 2).sum(1)
            n += z.shape[1]
        mean = m1 / n
        var = (m2 / n - mean ** 2).clamp_min(1e-12)
        std = var.sqrt()
        c3 = m3 / n - 3 * mean * m2 / n + 2 * mean ** 3
        c4 = m4 / n - 4 * mean * m3 / n + 6 * mean ** 2 * m2 / n - 3 * mean ** 4
        skew = c3 / var ** 1.5
        kurt = c4 / var ** 2 - 3
        u_mean = um1 / n
        u_std = (um2 / n - u_mean ** 2).clamp_min(0).sqrt()
        # KL(N(mean, std^2) || N(0, 1)) and KL(N(mean, std^2) || N(mu, sigma^2)) per channel
        kl0 = 0.5 * (var + mean ** 2 - 1) - std.log()
        klb = (sg / std).log() + (var + (mean - mu) ** 2) / (2 * sg ** 2) - 0.5
        off = ((mean.abs() > 0.1) | ((std - 1).abs() > 0.1)).double()
        out.append({
            "channels": C, "pixels": n,
            "z_mean": mean.tolist(), "z_std": std.tolist(), "z_skew": skew.tolist(), "z_excess_kurtosis": kurt.tolist(),
            "mu": mu.tolist(), "sigma": sg.tolist(),
            "summary": {"mean_abs_z_mean": float(mean.abs().mean()), "mean_z_std": float(std.mean()),
                        "min_z_std": float(std.min()), "max_z_std": float(std.max()),
                        "frac_channels_off_N01": float(off.mean()),
                        "mean_kl_to_N01": float(kl0.mean()), "mean_kl_to_base": float(klb.mean()),
                        "mean_abs_skew": float(skew.abs().mean()), "mean_excess_kurtosis": float(kurt.mean()),
                        "mean_abs_mu": float(mu.abs().mean()), "mean_sigma": float(sg.mean()),
                        "standardised_mean_abs": float(u_mean.abs().mean()), "standardised_std_mean": float(u_std.mean())},
        })
    return out


# ----------------------------------------------------------------------------- one run
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
        # Same trained flow, anomaly map computed with the base reset to N(0, I): separates what the
        # learned base does to the map (per-scale weights exp(-mean log sigma), shifted centre) from
        # what the alternating training did to the flow.
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
        ablation = {"final_map_with_N01_base": {k: float(m0[k]) for k in METRICS}}
        log(f"{label}: final epoch, same flow scored with N(0, I) instead of the learned base: "
            f"img {m0['image_auroc']:.4f} pix {m0['pixel_auroc']:.4f} aupro {m0['aupro']:.4f}")
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


def run_summary(curve: List[Dict[str, Any]], warmup_epochs: int, epochs: int) -> Dict[str, Any]:
    """Final, best-on-test, and within-run variability (after warm-up; second half of training)."""
    out: Dict[str, Any] = {}
    for m in METRICS:
        vals = np.array([p[m] for p in curve])
        eps = np.array([p["epoch"] for p in curve])
        after = vals[eps > warmup_epochs]
        half = vals[eps > epochs / 2]
        b = int(np.argmax(vals))
        out[m] = {"final": float(vals[-1]), "best_on_test": float(vals[b]), "best_epoch": int(eps[b]),
                  "std_after_warmup": float(after.std()) if len(after) > 1 else float("nan"),
                  "range_after_warmup": float(after.max() - after.min()) if len(after) > 1 else float("nan"),
                  "std_second_half": float(half.std()) if len(half) > 1 else float("nan"),
                  "n_evals_after_warmup": int(len(after)), "n_evals_second_half": int(len(half))}
    return out


# ----------------------------------------------------------------------------- aggregation
def _ms(xs: Sequence[float]) -> Dict[str, float]:
    a = np.array([x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))], dtype=float)
    if len(a) == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": int(len(a))}


def aggregate(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Mean and std over seeds of every per-run summary number, per (dataset, arm/variant); plus the
    paired AltUB - baseline differences per seed."""
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["variant"] or r["arm"]), []).append(r)
    agg: Dict[str, Any] = {}
    for (ds, key), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        entry = {"seeds": [r["seed"] for r in rs]}
        for m in METRICS:
            entry[m] = {f: _ms([r["summary"][m][f] for r in rs])
                        for f in ("final", "best_on_test", "best_epoch", "std_after_warmup", "range_after_warmup",
                                  "std_second_half")}
        if all(r.get("ablation") for r in rs):
            entry["final_map_with_N01_base"] = {m: _ms([r["ablation"]["final_map_with_N01_base"][m] for r in rs])
                                                for m in METRICS}
        zs = [r["z_stats"] for r in rs]
        entry["z_stats"] = [{k: _ms([z[s]["summary"][k] for z in zs]) for k in zs[0][s]["summary"]}
                            for s in range(len(zs[0]))]
        agg.setdefault(ds, {})[key] = entry
    paired: Dict[str, Any] = {}
    for ds in agg:
        for key in agg[ds]:
            if key == "baseline":
                continue
            base = {r["seed"]: r for r in groups.get((ds, "baseline"), [])}
            other = {r["seed"]: r for r in groups[(ds, key)]}
            seeds = sorted(set(base) & set(other))
            if not seeds:
                continue
            d: Dict[str, Any] = {"seeds": seeds}
            for m in METRICS:
                d[m] = {}
                for f in ("final", "best_on_test", "std_after_warmup", "std_second_half"):
                    diffs = [other[s]["summary"][m][f] - base[s]["summary"][m][f] for s in seeds]
                    d[m][f] = {**_ms(diffs), "per_seed": diffs, "wins": int(sum(x > 0 for x in diffs))}
            paired.setdefault(ds, {})[key] = d
    return {"groups": agg, "paired_vs_baseline": paired}


# ----------------------------------------------------------------------------- plots
def plot_curves(runs: List[Dict[str, Any]], ds: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sel = [r for r in runs if r["dataset"] == ds and r["variant"] is None]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4))
    colors = {"baseline": "tab:blue", "altub": "tab:orange"}
    for arm in ("baseline", "altub"):
        rs = [r for r in sel if r["arm"] == arm]
        if not rs:
            continue
        for ax, m in zip(axes[:3], METRICS):
            for r in rs:
                ax.plot([p["epoch"] for p in r["curve"]], [p[m] for p in r["curve"]], color=colors[arm], alpha=0.3, lw=1)
            eps = [p["epoch"] for p in rs[0]["curve"]]
            mean = np.mean([[p[m] for p in r["curve"]] for r in rs], axis=0)
            ax.plot(eps, mean, color=colors[arm], lw=2.5, label=f"{arm} (mean of {len(rs)} seeds)")
            ax.set_title(m)
            ax.set_xlabel("epoch")
        ax = axes[3]
        for r in rs:
            ax.plot([h["epoch"] for h in r["history"]], [h["loss"] for h in r["history"]], color=colors[arm], alpha=0.5)
        ax.set_title("training loss (NLL, no constant)")
        ax.set_xlabel("epoch")
    w = sel[0]["warmup_epochs"] if sel else 0
    for ax in axes[:3]:
        ax.axvline(w, color="grey", ls=":", lw=1)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"FastFlow ({BACKBONE}) on {ds}: thin lines = seeds, dotted = end of AltUB warm-up")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_zstats(runs: List[Dict[str, Any]], ds: str, path: str, seed: int) -> None:
    """Per scale: channel mean vs channel std of z on the training data (baseline and AltUB) and the
    learned (mu, sigma) of AltUB; N(0, I) is the black star at (0, 1)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    by = {r["arm"]: r for r in runs if r["dataset"] == ds and r["seed"] == seed and r["variant"] is None}
    if not by:
        return
    n_scales = len(next(iter(by.values()))["z_stats"])
    fig, axes = plt.subplots(1, n_scales, figsize=(5.2 * n_scales, 4.6))
    axes = np.atleast_1d(axes)
    for s, ax in enumerate(axes):
        if "baseline" in by:
            z = by["baseline"]["z_stats"][s]
            ax.scatter(z["z_mean"], z["z_std"], s=12, color="tab:blue", alpha=0.7, label="baseline: z mean/std per channel")
        if "altub" in by:
            z = by["altub"]["z_stats"][s]
            ax.scatter(z["z_mean"], z["z_std"], s=12, color="tab:orange", alpha=0.5, label="AltUB: z mean/std per channel")
            ax.scatter(z["mu"], z["sigma"], s=18, marker="x", color="tab:green", label="AltUB: learned (mu, sigma)")
        ax.scatter([0], [1], s=220, marker="*", color="black", zorder=5, label="N(0, I)")
        ax.axhline(1, color="black", lw=0.5, ls=":")
        ax.axvline(0, color="black", lw=0.5, ls=":")
        C = next(iter(by.values()))["z_stats"][s]["channels"]
        ax.set_title(f"scale {s} ({C} channels)")
        ax.set_xlabel("channel mean of z (training data)")
        ax.set_ylabel("channel std of z")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{ds}, seed {seed}, end of training: where the flow maps normal features")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_base(runs: List[Dict[str, Any]], ds: str, path: str) -> None:
    """Over training, per scale: the mean |channel mean| and mean channel std of z on the training
    batches (both arms; the trainer's epoch statistics) and AltUB's mean sigma; and the mean
    LayerNorm weight at every evaluation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sel = [r for r in runs if r["dataset"] == ds and r["variant"] is None]
    if not sel:
        return
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.2))
    styles = ["-", "--", ":"]
    first = {}
    for r in sel:
        c = "tab:blue" if r["arm"] == "baseline" else "tab:orange"
        ep = [h["epoch"] for h in r["history"]]
        for s in range(len(r["history"][0]["scales"])):
            lab = first.setdefault((r["arm"], s), r["seed"]) == r["seed"]
            axes[0].plot(ep, [h["scales"][s].get("z_mean_abs", float("nan")) for h in r["history"]], color=c,
                         ls=styles[s % 3], alpha=0.6, label=f"{r['arm']} scale {s}" if lab else None)
            axes[1].plot(ep, [h["scales"][s].get("z_std_mean", float("nan")) for h in r["history"]], color=c,
                         ls=styles[s % 3], alpha=0.6, label=f"{r['arm']} z, scale {s}" if lab else None)
            if r["arm"] == "altub":
                axes[1].plot(ep, [h["scales"][s]["sigma_mean"] for h in r["history"]], color="tab:green",
                             ls=styles[s % 3], alpha=0.6, label=f"AltUB learned sigma, scale {s}" if lab else None)
        if r["curve"] and r["curve"][0].get("layernorm_weight_mean"):
            for s in range(len(r["curve"][0]["layernorm_weight_mean"])):
                lab = first.setdefault((r["arm"], "ln", s), r["seed"]) == r["seed"]
                axes[2].plot([p["epoch"] for p in r["curve"]], [p["layernorm_weight_mean"][s] for p in r["curve"]],
                             color=c, ls=styles[s % 3], alpha=0.6, label=f"{r['arm']} scale {s}" if lab else None)
    axes[0].set_title("mean over channels of |channel mean of z|")
    axes[1].set_title("mean channel std of z; AltUB's mean sigma")
    axes[2].set_title("mean LayerNorm weight (trainable, not in the log-det)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=6)
    fig.suptitle(f"{ds}: z statistics of the training batches (epoch averages), the base, the LayerNorm scale")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_runs(runs: List[Dict[str, Any]], ds: str, seeds: Sequence[int]) -> List[Dict[str, Any]]:
    """The sweep's runs on ``ds`` for ``seeds``: the baseline, the main AltUB runs (the default
    variant) and the sweep's own variants, each labelled by its variant name."""
    out = []
    for r in runs:
        if r["dataset"] != ds or r["seed"] not in seeds:
            continue
        if r["variant"] is None:
            out.append(dict(r, variant="baseline" if r["arm"] == "baseline" else DEFAULT_VARIANT))
        else:
            out.append(r)
    return out


def plot_sweep(runs: List[Dict[str, Any]], ds: str, path: str) -> None:
    """``runs``: as :func:`sweep_runs` returns them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = ["baseline"] + [v for v in SWEEP_VARIANTS if any(r["variant"] == v for r in runs)]
    seeds = sorted({r["seed"] for r in runs})
    fig, axes = plt.subplots(1, 3, figsize=(19, 4.5))
    for i, name in enumerate(names):
        rs = [r for r in runs if r["variant"] == name]
        for ax, m in zip(axes, METRICS):
            for j, r in enumerate(rs):
                ax.plot([p["epoch"] for p in r["curve"]], [p[m] for p in r["curve"]], color=f"C{i}",
                        ls="--" if name == "baseline" else "-", alpha=0.8, lw=2 if name == "baseline" else 1.2,
                        label=name if j == 0 else None)
    for ax, m in zip(axes, METRICS):
        ax.set_title(f"{m} (seeds {seeds})")
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Sweep of the alternation constants on {ds}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- tables
def _fmt(ms: Dict[str, float], digits: int = 4) -> str:
    if ms["n"] == 0 or math.isnan(ms["mean"]):
        return "n/a"
    return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


def _tables(groups: Dict[str, Any], paired: Optional[Dict[str, Any]], with_z: bool) -> List[str]:
    lines = ["| arm | metric | final | best (on test) | best epoch | std within run after warm-up "
             "| std within run, 2nd half | std of final across seeds |", "|---|---|---|---|---|---|---|---|"]
    order = [k for k in ("baseline", "altub") if k in groups] + [k for k in groups if k not in ("baseline", "altub")]
    for key in order:
        g = groups[key]
        for m in METRICS:
            lines.append(f"| {key} (n={len(g['seeds'])}) | {m} | {_fmt(g[m]['final'])} | {_fmt(g[m]['best_on_test'])} | "
                         f"{_fmt(g[m]['best_epoch'], 1)} | {_fmt(g[m]['std_after_warmup'])} | "
                         f"{_fmt(g[m]['std_second_half'])} | {g[m]['final']['std']:.4f} |")
    lines.append("")
    abl = [k for k in order if "final_map_with_N01_base" in groups[k]]
    if abl:
        lines += ["Ablation at the final epoch: the same AltUB-trained flow, anomaly map computed with N(0, I) "
                  "instead of the learned base:", "", "| arm | " + " | ".join(METRICS) + " |", "|---|---|---|---|"]
        for k in abl:
            a = groups[k]["final_map_with_N01_base"]
            lines.append(f"| {k}, map with N(0, I) | " + " | ".join(_fmt(a[m]) for m in METRICS) + " |")
        lines.append("")
    if paired:
        lines += ["Paired difference (variant - baseline, same seed), mean ± std over seeds, [seeds with a positive "
                  "difference / seeds] (for the std columns, negative = AltUB more stable):", "",
                  "| variant | metric | Δ final | Δ best (on test) | Δ within-run std after warm-up | Δ within-run std 2nd half |",
                  "|---|---|---|---|---|---|"]
        for key, d in paired.items():
            n = len(d["seeds"])
            for m in METRICS:
                lines.append(f"| {key} | {m} | {_fmt(d[m]['final'])} [{d[m]['final']['wins']}/{n}] | "
                             f"{_fmt(d[m]['best_on_test'])} [{d[m]['best_on_test']['wins']}/{n}] | "
                             f"{_fmt(d[m]['std_after_warmup'])} [{d[m]['std_after_warmup']['wins']}/{n}] | "
                             f"{_fmt(d[m]['std_second_half'])} [{d[m]['std_second_half']['wins']}/{n}] |")
        lines.append("")
    if with_z:
        lines += ["Claim (a), end of training, z on all training pixels, per scale (mean ± std over seeds):", "",
                  "| arm | scale | mean abs channel mean | mean channel std | min / max channel std | fraction of channels off "
                  "N(0,1) (abs mean > 0.1 or abs(std - 1) > 0.1) | mean KL to N(0,1) | mean KL to learned base | mean abs skew "
                  "| mean excess kurtosis | mean abs mu | mean sigma |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for key in ("baseline", "altub"):
            if key not in groups:
                continue
            for s, z in enumerate(groups[key]["z_stats"]):
                lines.append(f"| {key} | {s} | {_fmt(z['mean_abs_z_mean'], 3)} | {_fmt(z['mean_z_std'], 3)} | "
                             f"{z['min_z_std']['mean']:.3f} / {z['max_z_std']['mean']:.3f} | {_fmt(z['frac_channels_off_N01'], 2)} | "
                             f"{_fmt(z['mean_kl_to_N01'], 3)} | {_fmt(z['mean_kl_to_base'], 3)} | {_fmt(z['mean_abs_skew'], 2)} | "
                             f"{_fmt(z['mean_excess_kurtosis'], 2)} | {_fmt(z['mean_abs_mu'], 3)} | {_fmt(z['mean_sigma'], 3)} |")
        lines.append("")
    return lines


def summary_markdown(results: Dict[str, Any]) -> str:
    agg = results["aggregate"]["groups"]
    paired = results["aggregate"]["paired_vs_baseline"]
    lines = [f"Command: `{results['command']}`", "",
             f"Seeds {results['config']['seeds']}; mean ± std over seeds (sample std). "
             "'best' = best evaluation CHOSEN ON THE TEST SET (optimistic); 'final' = last epoch.", ""]
    for ds, groups in agg.items():
        info = results["datasets"][ds]
        lines += [f"### {ds} ({info['n_train']} train / {info['n_test']} test images at {info['image_size']} px)", ""]
        lines += _tables(groups, paired.get(ds), with_z=True)
    if "sweep" in results:
        sw = results["sweep"]
        lines += [f"### Sweep of the alternation constants on {sw['dataset']} (seeds {sw['seeds']})", ""]
        lines += _tables(sw["groups"][sw["dataset"]], sw["paired_vs_baseline"].get(sw["dataset"]), with_z=False)
    t = results["timing"]
    lines += [f"Wall time {t['total_s'] / 60:.1f} min ({t['train_s'] / 60:.1f} min training, {t['eval_s'] / 60:.1f} min "
              f"evaluation, {t['setup_s'] / 60:.1f} min data and features).", ""]
    return "\n".join(lines)


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


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            results = json.load(f)
        os.makedirs(args.out, exist_ok=True)
        report(results, args.out)
        log(f"re-made {', '.join(results['plots'])} and summary.md in {args.out} from {args.from_json}")
        return results
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
        "notes": {"best_on_test": "the best evaluation of a run is chosen on the test set: optimistic, not a "
                                  "valid model-selection result; 'final' is the honest number",
                  "pairing": "for one seed both arms start from identical flow weights and see identical batches; "
                             "all runs share the same train and test subsets",
                  "std_after_warmup": "std over the evaluations after the AltUB warm-up (same epochs for both arms)",
                  "std_second_half": "std over the evaluations in the second half of training"},
        "datasets": {}, "runs": [],
    }
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
    del feat_model

    plan = []
    for ds in args.datasets:
        for seed in cfg["seeds"]:
            for arm in ("baseline", "altub"):
                plan.append((ds, arm, seed, None, None))
    if cfg["sweep"] and cfg["sweep_dataset"] in prepared:
        for seed in cfg["seeds"][:cfg["sweep_seeds"]]:
            for v in variants:
                plan.append((cfg["sweep_dataset"], "altub", seed, SWEEP_VARIANTS[v], v))
    json_path = os.path.join(args.out, "study.json")

    def write_json():
        with open(json_path + ".tmp", "w") as f:
            json.dump(results, f, indent=1, default=float)
        os.replace(json_path + ".tmp", json_path)

    for i, (ds, arm, seed, sched, variant) in enumerate(plan):
        log(f"run {i + 1}/{len(plan)}: {ds} {arm} {variant or ''} seed {seed} "
            f"(elapsed {(time.perf_counter() - t_all) / 60:.1f} min)")
        r = run_one(prepared[ds], arm, seed, cfg, device, schedule=sched, variant=variant, tag=f" [{i + 1}/{len(plan)}]")
        results["runs"].append(r)
        write_json()   # partial results survive an interrupted study

    results["timing"] = {"total_s": time.perf_counter() - t_all, "setup_s": setup_s,
                         "train_s": sum(r["train_s"] for r in results["runs"]),
                         "eval_s": sum(r["eval_s"] for r in results["runs"])}
    report(results, args.out)
    log(f"done in {results['timing']['total_s'] / 60:.1f} min: {json_path}, summary.md, {', '.join(results['plots'])}")
    return results


def report(results: Dict[str, Any], out: str) -> Dict[str, Any]:
    """Aggregates, plots, summary.md and study.json from the runs in ``results`` (also used by
    ``--from-json`` to redo them without training)."""
    cfg = results["config"]
    datasets = cfg["datasets"]
    results["aggregate"] = aggregate([r for r in results["runs"] if r["variant"] is None])
    sweep_list: List[Dict[str, Any]] = []
    results.pop("sweep", None)
    if cfg["sweep"] and any(r["variant"] is not None for r in results["runs"]):
        sweep_seeds = cfg["seeds"][:cfg["sweep_seeds"]]
        sweep_list = sweep_runs(results["runs"], cfg["sweep_dataset"], sweep_seeds)
        # the sweep's table: the default AltUB runs (of the sweep's seeds) serve as its default variant
        sw = aggregate([dict(r, arm="baseline" if r["variant"] == "baseline" else "altub",
                             variant=None if r["variant"] == "baseline" else r["variant"]) for r in sweep_list])
        results["sweep"] = {"dataset": cfg["sweep_dataset"], "seeds": sweep_seeds, **sw}
    plots = []
    for ds in datasets:
        for name, fn in (("curves", lambda p: plot_curves(results["runs"], ds, p)),
                         ("zstats", lambda p: plot_zstats(results["runs"], ds, p, cfg["seeds"][0])),
                         ("base", lambda p: plot_base(results["runs"], ds, p)),
                         ("sweep", lambda p: plot_sweep(sweep_list, ds, p) if sweep_list and ds == cfg["sweep_dataset"]
                          else None)):
            path = os.path.join(out, f"{name}_{ds}.png")
            if os.path.exists(path):
                os.remove(path)
            fn(path)
            if os.path.exists(path):
                plots.append(os.path.basename(path))
    results["plots"] = plots
    json_path = os.path.join(out, "study.json")
    with open(json_path + ".tmp", "w") as f:
        json.dump(results, f, indent=1, default=float)
    os.replace(json_path + ".tmp", json_path)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary_markdown(results))
    return results


if __name__ == "__main__":
    main()
