"""The studies' shared harness (benchmarks/study_harness.py): the runner goes on past a failed job
and records it, the JSON save is atomic, results split over processes merge, tables are written
as markdown."""
import json

import pytest

from _helpers import load_benchmark_script


@pytest.fixture(scope="module")
def harness():
    return load_benchmark_script("study_harness")


def test_runner_records_a_failed_job_and_goes_on(harness, capsys):
    results, done, saves, seen = {}, [], [], []

    def boom():
        raise RuntimeError("no data")

    jobs = [("a", lambda: done.append("a")), ("b", boom), ("c", lambda: done.append("c"))]
    harness.run_jobs(jobs, results, lambda: saves.append(len(done)), before=lambda i, label: seen.append((i, label)))
    assert done == ["a", "c"] and saves == [1, 1, 2]                 # saved after every job, failed or not
    assert results["errors"] == ["b: RuntimeError('no data')"]
    assert seen == [(0, "a"), (1, "b"), (2, "c")]
    assert "RuntimeError: no data" in capsys.readouterr().err         # the traceback is logged


def test_save_json_replaces_the_file_whole(harness, tmp_path):
    path = tmp_path / "study.json"
    path.write_text("old")
    harness.save_json({"runs": [1.5]}, str(path), indent=1)
    assert json.loads(path.read_text()) == {"runs": [1.5]} and not (tmp_path / "study.json.tmp").exists()
    with pytest.raises(TypeError):
        harness.save_json({"x": object()}, str(path))
    assert json.loads(path.read_text()) == {"runs": [1.5]}             # a failed write leaves the old file


def _study(command, runs, datasets, knn=None, errors=None):
    r = dict(config=dict(image_size=64, command=command), datasets=datasets, runs=runs, knn=knn or {})
    if errors is not None:
        r["errors"] = errors
    return r


def test_merge_keeps_first_config_lists_commands_and_prefers_finished_runs(harness):
    a = _study("p1", [dict(id=1, partial=True, v=0), dict(id=2, v=1)], {"x": 1}, knn={"x": 0.5}, errors=["e1"])
    b = _study(["p2", "p3"], [dict(id=1, partial=False, v=2), dict(id=3, v=3)], {"x": 9, "y": 2}, knn={"y": 0.7})
    merged = harness.merge_results([a, b], run_key=lambda r: r["id"])
    assert merged["config"] == dict(image_size=64, command=["p1", "p2", "p3"])
    assert merged["datasets"] == {"x": 1, "y": 2} and merged["knn"] == {"x": 0.5, "y": 0.7}
    assert merged["errors"] == ["e1"]
    assert [(r["id"], r["v"]) for r in merged["runs"]] == [(1, 2), (2, 1), (3, 3)]
    assert a["runs"][0]["v"] == 0 and a["config"]["command"] == "p1"   # the inputs are left as they were
    # without a key every run is kept
    assert len(harness.merge_results([a, b])["runs"]) == 4


def test_markdown_table(harness):
    assert harness.md_table(["a", "b"], [[1, ""], ["x", 2.5]]) == ["| a | b |", "|---|---|", "| 1 |  |", "| x | 2.5 |"]
    assert harness.md_table(["a", "b"], align=["---", "---:"]) == ["| a | b |", "|---|---:|"]


def test_auto_rule(harness):
    rule = dict(patience=2, min_epochs=3, min_delta=0.0)
    assert harness.auto_choice([5, 4, 3, 3.5, 3.6, 2.0], rule) == {"stop": 5, "chosen": 3, "stopped": True}
    assert harness.auto_choice([5, 4, 3], rule) == {"stop": 3, "chosen": 3, "stopped": False}
