"""The issue-19 defaults study (benchmarks/study_defaults.py and its _paint, _report modules): its smallest configuration on a tiny
synthetic carpet (JSON, tables, the --from-json rebuild), the worst-case ranking on a hand-made
table, the label-free auto rule and the synthetic-defect painter."""
import json
import math
import re

import pytest
import torch

from _helpers import load_benchmark_script


@pytest.fixture(scope="module")
def study():
    return load_benchmark_script("study_defaults")


@pytest.fixture(scope="module")
def report():
    return load_benchmark_script("study_defaults_report")


@pytest.fixture(scope="module")
def paint():
    return load_benchmark_script("study_defaults_paint")


def test_worst_case_ranks_measured_on_ab_first_then_minimum_then_mean(report):
    values = {"r1": {"x": [0.9, 0.8], "y": [0.95]}, "r2": {"x": [0.9], "y": [0.9]},
              "r3": {"x": [0.99], "y": [0.99]}, "r4": {"x": [0.85], "y": [0.99]}}
    ab = {"r1": {"A": 0.86, "B": 0.9}, "r2": {"A": 0.95, "B": 0.96}, "r4": {"A": 0.9, "B": 0.9}}
    rows = report.worst_case(values, ab)
    # r2: min 0.90; r4 and r1 tie on min 0.85, r4 has the higher mean; r3 is best but has no A/B number
    assert [r["rule"] for r in rows] == ["r2", "r4", "r1", "r3"]
    r1 = rows[2]
    assert r1["per"] == pytest.approx({"x": 0.85, "y": 0.95, "A": 0.86, "B": 0.9})
    assert r1["min"] == pytest.approx(0.85) and r1["mean"] == pytest.approx(0.89)
    assert r1["spread"]["x"][1] == 2 and r1["spread"]["x"][0] == pytest.approx(math.sqrt(0.005))
    md = report.worst_case_md(rows, ["x", "y"])
    assert md[2].startswith("| 1 | r2 | 0.900 | 0.927 | 0.900 | 0.900 | 0.900 | 0.950 | 0.960 |")
    assert "0.850 ± 0.071 (2)" in md[4]
    assert md[-1].endswith("| not measured on A/B |") and "not measured" not in md[2]


def test_auto_rule_is_the_trainers(study):
    curve = [5, 4, 3, 3.5, 3.6, 3.7, 3.8, 3.9, 4.0, 1.0]
    assert study.auto_choice(curve) == {"stop": 8, "chosen": 3, "stopped": True}
    assert study.auto_choice([5, 4, 3, 2, 1]) == {"stop": 5, "chosen": 5, "stopped": False}
    # never before min_epochs (5), even when the best is epoch 1
    assert study.auto_choice([1, 2, 3, 4, 5]) == {"stop": 5, "chosen": 1, "stopped": False}
    assert study.auto_choice([1, 2, 3, 4, 5, 6]) == {"stop": 6, "chosen": 1, "stopped": True}


def test_object_mask_and_painting_stay_on_the_object(paint):
    img = torch.zeros(3, 64, 64)
    img[:, 16:48, 20:44] = 0.8
    mask, found = paint.object_mask(img)
    assert found and mask[20:44, 24:40].all() and not mask[:8].any() and not mask[:, :8].any()
    texture, found_t = paint.object_mask(torch.rand(3, 64, 64))
    assert not found_t and texture.all()
    images = img.expand(4, -1, -1, -1).clone()
    painted, masks, meta = paint.paint_defects(images, on_object=True, per_image=2, seed=0)
    assert painted.shape == (8, 3, 64, 64) and masks.shape == (8, 64, 64)
    assert [m["kind"] for m in meta] == list(paint.DEFECT_KINDS) * 2
    changed = (painted - images.repeat(2, 1, 1, 1)).abs().sum(1) > 0
    assert bool((changed <= masks).all())                    # nothing changes outside the defect mask
    assert bool((masks <= mask).all())                       # every defect lies on the object
    assert all(int(m.sum()) > 0 for m in masks)


def test_tiny_study_writes_json_and_tables_and_rebuilds_them(study, tmp_path):
    out = tmp_path / "s"
    study.main(["--out", str(out), "--size", "tiny", "--datasets", "carpet_synthetic", "--phases", "s0,knn"])
    res = json.loads((out / "study.json").read_text())
    assert res["config"]["snapshot"]["commit"] and not res.get("errors")
    (run,) = res["runs"]
    assert not run["partial"] and [p["epoch"] for p in run["curve"]] == [1, 2, 3]
    assert all(math.isfinite(p["heldout_nll"]) for p in run["curve"])
    assert set(run["evals"]) == {"1", "2", "3"} and run["auto"]["chosen"] in (1, 2, 3)
    ev = run["evals"]["3"]
    assert set(ev) == {"test", "syn_object", "syn_anywhere"}
    assert set(ev["test"]["pixel"]) == set(study.MAPS)
    assert {"fastflow/top1%", "loglik/top0.5%", "cflow/max", "nll", "nll+loglik/top10%"} <= set(ev["test"]["image"])
    values = [v for e in ev.values() for v in e["image"].values()]
    values += [m for e in ev.values() for rec in e["pixel"].values() for m in rec.values()]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert "aupro" in ev["test"]["pixel"]["loglik"] and "aupro" not in ev["syn_object"]["pixel"]["loglik"]
    assert 0.0 <= res["knn"]["carpet_synthetic"]["test"]["pixel"]["knn"]["pixel_auroc"] <= 1.0
    md = (out / "summary.md").read_text()
    for text in ("## Worst case at the label-free auto epoch: pixel maps", "| carpet_synthetic | A | B | note |",
                 "test-chosen", "not measured on A/B", "## Stability", "Spearman",
                 "--from-json docs/study_defaults/study.json"):
        assert text in md
    assert re.search(r"\| \d+ \| fastflow \| 0\.\d{3} \| 0\.\d{3} \| 0\.\d{3} \| 0\.\d{3} \| 0\.681 \| 0\.930 \|  \|", md)
    again = tmp_path / "again"
    study.main(["--from-json", str(out / "study.json"), "--out", str(again)])
    assert (again / "summary.md").read_text() == md
