"""The statistics of the AltUB study (``study_altub.py``): per-channel statistics of z on the
training data (claim a), a run's summary (final, best-on-test, within-run variability) and the
aggregation over seeds with the paired AltUB - baseline differences."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

METRICS = ("image_auroc", "pixel_auroc", "aupro")


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
