"""The report of the AltUB study (``study_altub.py``): the plots (curves, z statistics, the base,
the sweep), the markdown tables and summary.md, and study.json with its aggregates, from the runs
alone (also what ``--from-json`` redoes without training)."""
from __future__ import annotations

import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from study_altub_stats import METRICS, aggregate  # noqa: E402
from study_harness import md_table, save_json  # noqa: E402


# ----------------------------------------------------------------------------- plots
def _save(fig, path: str, title: str) -> None:
    """Title ``fig``, write it to ``path`` and close it."""
    import matplotlib.pyplot as plt
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(runs: List[Dict[str, Any]], ds: str, path: str, backbone: str) -> None:
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
    _save(fig, path, f"FastFlow ({backbone}) on {ds}: thin lines = seeds, dotted = end of AltUB warm-up")


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
    _save(fig, path, f"{ds}, seed {seed}, end of training: where the flow maps normal features")


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
    _save(fig, path, f"{ds}: z statistics of the training batches (epoch averages), the base, the LayerNorm scale")


def sweep_runs(runs: List[Dict[str, Any]], ds: str, seeds: Sequence[int], default_variant: str) -> List[Dict[str, Any]]:
    """The sweep's runs on ``ds`` for ``seeds``: the baseline, the main AltUB runs (labelled
    ``default_variant``) and the sweep's own variants, each labelled by its variant name."""
    out = []
    for r in runs:
        if r["dataset"] != ds or r["seed"] not in seeds:
            continue
        if r["variant"] is None:
            out.append(dict(r, variant="baseline" if r["arm"] == "baseline" else default_variant))
        else:
            out.append(r)
    return out


def plot_sweep(runs: List[Dict[str, Any]], ds: str, path: str, variants: Sequence[str]) -> None:
    """``runs``: as :func:`sweep_runs` returns them; ``variants``: the variant names in plot order."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = ["baseline"] + [v for v in variants if any(r["variant"] == v for r in runs)]
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
    _save(fig, path, f"Sweep of the alternation constants on {ds}")


# ----------------------------------------------------------------------------- tables
def _fmt(ms: Dict[str, float], digits: int = 4) -> str:
    if ms["n"] == 0 or math.isnan(ms["mean"]):
        return "n/a"
    return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


def _arm_rows(groups: Dict[str, Any], order: Sequence[str]) -> List[List[str]]:
    rows = []
    for key in order:
        g = groups[key]
        for m in METRICS:
            rows.append([f"{key} (n={len(g['seeds'])})", m, _fmt(g[m]["final"]), _fmt(g[m]["best_on_test"]),
                         _fmt(g[m]["best_epoch"], 1), _fmt(g[m]["std_after_warmup"]), _fmt(g[m]["std_second_half"]),
                         f"{g[m]['final']['std']:.4f}"])
    return rows


def _paired_rows(paired: Dict[str, Any]) -> List[List[str]]:
    rows = []
    for key, d in paired.items():
        n = len(d["seeds"])
        for m in METRICS:
            rows.append([key, m, *(f"{_fmt(d[m][f])} [{d[m][f]['wins']}/{n}]"
                                   for f in ("final", "best_on_test", "std_after_warmup", "std_second_half"))])
    return rows


def _z_rows(groups: Dict[str, Any]) -> List[List[str]]:
    rows = []
    for key in ("baseline", "altub"):
        if key not in groups:
            continue
        for s, z in enumerate(groups[key]["z_stats"]):
            rows.append([key, s, _fmt(z["mean_abs_z_mean"], 3), _fmt(z["mean_z_std"], 3),
                         f"{z['min_z_std']['mean']:.3f} / {z['max_z_std']['mean']:.3f}",
                         _fmt(z["frac_channels_off_N01"], 2), _fmt(z["mean_kl_to_N01"], 3), _fmt(z["mean_kl_to_base"], 3),
                         _fmt(z["mean_abs_skew"], 2), _fmt(z["mean_excess_kurtosis"], 2), _fmt(z["mean_abs_mu"], 3),
                         _fmt(z["mean_sigma"], 3)])
    return rows


def _tables(groups: Dict[str, Any], paired: Optional[Dict[str, Any]], with_z: bool) -> List[str]:
    """The tables of one data set (or of the sweep): per arm, the ablation with N(0, I), the paired
    differences and (``with_z``) the z statistics of claim (a)."""
    order = [k for k in ("baseline", "altub") if k in groups] + [k for k in groups if k not in ("baseline", "altub")]
    lines = md_table(["arm", "metric", "final", "best (on test)", "best epoch", "std within run after warm-up",
                      "std within run, 2nd half", "std of final across seeds"], _arm_rows(groups, order)) + [""]
    abl = [k for k in order if "final_map_with_N01_base" in groups[k]]
    if abl:
        lines += ["Ablation at the final epoch: the same AltUB-trained flow, anomaly map computed with N(0, I) "
                  "instead of the learned base:", "",
                  *md_table(["arm", *METRICS], ([f"{k}, map with N(0, I)",
                                                  *(_fmt(groups[k]["final_map_with_N01_base"][m]) for m in METRICS)]
                                                 for k in abl)), ""]
    if paired:
        lines += ["Paired difference (variant - baseline, same seed), mean ± std over seeds, [seeds with a positive "
                  "difference / seeds] (for the std columns, negative = AltUB more stable):", "",
                  *md_table(["variant", "metric", "Δ final", "Δ best (on test)", "Δ within-run std after warm-up",
                             "Δ within-run std 2nd half"], _paired_rows(paired)), ""]
    if with_z:
        lines += ["Claim (a), end of training, z on all training pixels, per scale (mean ± std over seeds):", "",
                  *md_table(["arm", "scale", "mean abs channel mean", "mean channel std", "min / max channel std",
                             "fraction of channels off N(0,1) (abs mean > 0.1 or abs(std - 1) > 0.1)",
                             "mean KL to N(0,1)", "mean KL to learned base", "mean abs skew", "mean excess kurtosis",
                             "mean abs mu", "mean sigma"], _z_rows(groups)), ""]
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


def report(results: Dict[str, Any], out: str, variants: Sequence[str]) -> Dict[str, Any]:
    """Aggregates, plots, summary.md and study.json from the runs in ``results`` (also used by
    ``--from-json`` to redo them without training). ``variants``: every sweep variant's name, the
    default one (the main AltUB runs) first."""
    cfg = results["config"]
    results["aggregate"] = aggregate([r for r in results["runs"] if r["variant"] is None])
    sweep_list: List[Dict[str, Any]] = []
    results.pop("sweep", None)
    if cfg["sweep"] and any(r["variant"] is not None for r in results["runs"]):
        sweep_seeds = cfg["seeds"][:cfg["sweep_seeds"]]
        sweep_list = sweep_runs(results["runs"], cfg["sweep_dataset"], sweep_seeds, variants[0])
        # the sweep's table: the default AltUB runs (of the sweep's seeds) serve as its default variant
        sw = aggregate([dict(r, arm="baseline" if r["variant"] == "baseline" else "altub",
                             variant=None if r["variant"] == "baseline" else r["variant"]) for r in sweep_list])
        results["sweep"] = {"dataset": cfg["sweep_dataset"], "seeds": sweep_seeds, **sw}
    results["plots"] = _plots(results, out, sweep_list, variants)
    save_json(results, os.path.join(out, "study.json"), indent=1, default=float)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary_markdown(results))
    return results


def _plots(results: Dict[str, Any], out: str, sweep_list: List[Dict[str, Any]], variants: Sequence[str]) -> List[str]:
    """Every plot of every data set made anew in ``out`` (an old one is removed first); the names
    of those written."""
    cfg, runs = results["config"], results["runs"]
    plots = []
    for ds in cfg["datasets"]:
        for name, fn in (("curves", lambda p: plot_curves(runs, ds, p, cfg["backbone"])),
                         ("zstats", lambda p: plot_zstats(runs, ds, p, cfg["seeds"][0])),
                         ("base", lambda p: plot_base(runs, ds, p)),
                         ("sweep", lambda p: plot_sweep(sweep_list, ds, p, variants)
                          if sweep_list and ds == cfg["sweep_dataset"] else None)):
            path = os.path.join(out, f"{name}_{ds}.png")
            if os.path.exists(path):
                os.remove(path)
            fn(path)
            if os.path.exists(path):
                plots.append(os.path.basename(path))
    return plots
