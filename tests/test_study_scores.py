"""Smoke test of the score-mode study (benchmarks/study_scores.py) on a tiny synthetic carpet."""
import json

from _helpers import load_benchmark_script


def load_study():
    return load_benchmark_script("study_scores")


def test_auto_rule_stops_after_patience_and_keeps_the_best():
    study = load_study()
    rule = dict(patience=2, min_epochs=3, min_delta=0.0)
    assert study.auto_choice([5, 4, 3, 3.5, 3.6, 2.0], rule) == {"stop": 5, "chosen": 3}
    assert study.auto_choice([5, 4, 3, 2, 1], rule) == {"stop": 5, "chosen": 5}
    # never before min_epochs
    assert study.auto_choice([1, 2, 3, 4], dict(rule, min_epochs=4)) == {"stop": 4, "chosen": 1}


def test_study_tiny_run_writes_json_and_tables(tmp_path):
    study = load_study()
    out = tmp_path / "s"
    study.main(["--out", str(out), "--size", "tiny", "--datasets", "carpet_synthetic", "--parts", "arms,knn",
                "--synthetic-root", str(tmp_path / "data")])
    with open(out / "study.json") as f:
        res = json.load(f)
    assert {r["arm"] for r in res["runs"]} == {"altub", "baseline"}
    for r in res["runs"]:
        assert len(r["curve"]) == 2 and all("heldout_nll" in p for p in r["curve"])
        keys = set(r["curve"][-1]["metrics"])
        assert {"loglik/max", "fastflow/max", "cflow/top1%"} <= keys
        for m in r["curve"][-1]["metrics"].values():
            assert 0.0 <= m["image_auroc"] <= 1.0 and 0.0 <= m["aupro"] <= 1.0
    assert 0.0 <= res["knn"]["carpet_synthetic"]["pixel_auroc"] <= 1.0
    md = (out / "summary.md").read_text()
    assert "test-chosen" in md and "kNN baseline" in md
