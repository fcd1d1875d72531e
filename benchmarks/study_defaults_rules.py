"""The rules the issue-19 defaults study (``study_defaults.py``) compares: every pixel map and
image score computed from one pass of ``model.score_parts``, every constant calibrated on the
held-out normal images alone, and their AUROCs on a labelled set."""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)
TOPK = (0.005, 0.01, 0.05, 0.10, 0.20)
COMBO_K = (0.01, 0.10)               # image NLL + a map's top-k mean at these k
BASE_MAPS = ("fastflow", "loglik", "cflow", "loglik_pos")
COMBOS = {"fastflow+loglik": ("fastflow", "loglik")}
MAPS = BASE_MAPS + tuple(COMBOS)


def topname(k: float) -> str:
    return f"top{100 * k:g}%"


def upsample(x: torch.Tensor, size, align_corners: bool = False) -> torch.Tensor:
    """(N, h, w) maps bilinearly resized to ``size`` (N, H, W)."""
    return F.interpolate(x.unsqueeze(1), size=size, mode="bilinear", align_corners=align_corners).squeeze(1)


def base_maps(parts, cal: Dict[str, Any], size) -> Dict[str, torch.Tensor]:
    """Per scale (ll_full, ll_base) -> maps (N, H, W), higher = more anomalous:
    fastflow: -exp(ll_base + log(2 pi)/2) per scale, upsampled, mean (the FastFlow paper's map);
    loglik: (loc - ll_full) / scale per scale with held-out pixel mean/std, upsampled, mean;
    cflow: -(sum over scales of exp(ll_full - held-out max), upsampled with align_corners);
    loglik_pos: as loglik but standardised per position (PaDiM-like; std floored at 0.1 x the scale's)."""
    ff, ll, cf, lp = [], [], 0.0, []
    for i, (full, base) in enumerate(parts):
        ff.append(upsample(-torch.exp(base + 0.5 * LOG_2PI), size))
        ll.append(upsample((cal["loc"][i] - full) / cal["scale"][i], size))
        cf = cf + upsample(torch.exp(full - cal["cmax"][i]), size, align_corners=True)
        lp.append(upsample((cal["ploc"][i] - full) / cal["pscale"][i], size))
    mean = lambda xs: torch.stack(xs).mean(0)  # noqa: E731
    return {"fastflow": mean(ff), "loglik": mean(ll), "cflow": -cf, "loglik_pos": mean(lp)}


def all_maps(parts, cal: Dict[str, Any], size) -> Dict[str, torch.Tensor]:
    maps = base_maps(parts, cal, size)
    for name, members in COMBOS.items():   # each member standardised on held-out pixels, averaged
        maps[name] = torch.stack([(maps[m] - cal["map_mean"][m]) / cal["map_std"][m] for m in members]).mean(0)
    return maps


def image_rules(maps: Dict[str, torch.Tensor], nll: Optional[torch.Tensor],
                cal: Optional[Dict[str, Any]] = None) -> Dict[str, torch.Tensor]:
    """Every image score: per map max and top-k means; the image NLL per dimension; and, once ``cal``
    holds held-out score statistics, z(NLL) + z(map top-k) at COMBO_K."""
    out: Dict[str, torch.Tensor] = {}
    for name, m in maps.items():
        flat = m.flatten(1)
        out[f"{name}/max"] = flat.amax(1)
        n = [max(1, int(math.ceil(k * flat.shape[1]))) for k in TOPK]
        top = flat.topk(max(n), dim=1).values.cumsum(1)
        for k, nk in zip(TOPK, n):
            out[f"{name}/{topname(k)}"] = top[:, nk - 1] / nk
    if nll is not None:
        out["nll"] = nll
        if cal is not None and "score_mean" in cal:
            z = lambda key: (out[key] - cal["score_mean"][key]) / cal["score_std"][key]  # noqa: E731
            for name in maps:
                for k in COMBO_K:
                    out[f"nll+{name}/{topname(k)}"] = z("nll") + z(f"{name}/{topname(k)}")
    return out


def fit_calibration(parts_ho, nll_ho: torch.Tensor, size) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """Every constant of every rule from the held-out normal images alone; returns (cal, their maps)."""
    cal: Dict[str, Any] = {"loc": [], "scale": [], "ploc": [], "pscale": [], "cmax": []}
    for full, _ in parts_ho:
        d = full.double()
        sd = float(d.std(unbiased=False).clamp_min(1e-6))
        cal["loc"].append(float(d.mean()))
        cal["scale"].append(sd)
        cal["ploc"].append(d.mean(0).float())
        cal["pscale"].append(d.std(0, unbiased=False).clamp_min(0.1 * sd).float())
        cal["cmax"].append(float(d.max()))
    base = base_maps(parts_ho, cal, size)
    cal["map_mean"] = {k: float(v.double().mean()) for k, v in base.items()}
    cal["map_std"] = {k: float(v.double().std().clamp_min(1e-12)) for k, v in base.items()}
    maps = all_maps(parts_ho, cal, size)
    s = image_rules(maps, nll_ho)
    cal["score_mean"] = {k: float(v.double().mean()) for k, v in s.items()}
    cal["score_std"] = {k: float(v.double().std().clamp_min(1e-12)) if len(v) > 1 else 1.0 for k, v in s.items()}
    return cal, maps


def score_set(maps, scores, labels, masks, with_aupro: bool = True) -> Dict[str, Any]:
    """{"image": {rule: image AUROC}, "pixel": {map: {pixel_auroc[, aupro]}}} (pixel only with masks)."""
    from altub_fast.metrics import aupro, image_auroc, pixel_auroc
    labels = np.asarray(labels).astype(int)
    out: Dict[str, Any] = {"image": {r: float(image_auroc(s.double().numpy(), labels)) for r, s in scores.items()},
                           "pixel": {}}
    if masks is not None:
        mk = masks.numpy().astype(np.uint8) if torch.is_tensor(masks) else masks
        for name, m in maps.items():
            arr = m.float().numpy()
            rec = {"pixel_auroc": float(pixel_auroc(arr, mk))}
            if with_aupro:
                rec["aupro"] = float(aupro(arr, mk))
            out["pixel"][name] = rec
    return out
