"""benchmarks/scaling_report.py: the scaling benchmark's JSON files as a markdown table and a PNG;
a configuration measured in two runs shows the last run's row, or with --fastest the faster one."""
import json

import pytest

from _helpers import load_benchmark_script


@pytest.fixture(scope="module")
def report():
    return load_benchmark_script("scaling_report")


def row(mode, size, batch, rate, peak):
    return dict(mode=mode, backbone="resnet18", size=size, batch=batch, threads=2, images_per_s=rate,
                median_s=batch / rate, peak_rss_mib=peak, peak_minus_baseline_mib=peak - 800, rounds=3)


def run_json(path, rows, skipped=()):
    benchmarks = [dict(extra_info=dict(level="scaling", backbone="resnet18", rows=[r], skipped_configs=list(skipped)))
                  for r in rows]
    benchmarks.append(dict(extra_info=dict(level="predict_e2e")))        # another benchmark: ignored
    path.write_text(json.dumps(dict(machine_info=dict(cpu=dict(brand_raw="Test CPU"), bench_scale="full"),
                                    benchmarks=benchmarks)))
    return str(path)


def table_rows(md):
    return [line for line in md.splitlines() if line.startswith("| infer") or line.startswith("| train")]


def test_two_runs_last_or_fastest(report, tmp_path):
    skipped = [dict(mode="train_torch", size=768, batch=32, reason="estimated peak 29.1 GiB > 16 GiB")]
    first = run_json(tmp_path / "a.json", [row("infer_torch", 256, 1, 9.3, 870), row("train_torch", 256, 8, 6.0, 2100)],
                     skipped)
    second = run_json(tmp_path / "b.json",
                      [row("infer_torch", 256, 1, 0.2, 880), row("infer_torch", 512, 8, 2.1, 1400)])

    assert report.main([first, second, "--out", str(tmp_path / "last")]) == 0
    md = (tmp_path / "last" / "scaling.md").read_text()
    rows = table_rows(md)
    assert len(rows) == 3 and "| infer_torch | 256 | 1 | 0.20 |" in md       # the last run's row
    assert (tmp_path / "last" / "scaling.png").stat().st_size > 1000
    assert "train_torch 768 px batch 32" in md and "29.1 GiB" in md       # what was not run, and why

    assert report.main([first, second, "--out", str(tmp_path / "fast"), "--fastest"]) == 0
    md = (tmp_path / "fast" / "scaling.md").read_text()
    assert len(table_rows(md)) == 3 and "| infer_torch | 256 | 1 | 9.30 |" in md and "faster run" in md
    assert "| infer_torch | 512 | 8 | 2.10 |" in md and "| train_torch | 256 | 8 | 6.00 |" in md


def test_no_scaling_rows_is_an_error(report, tmp_path, capsys):
    empty = tmp_path / "e.json"
    empty.write_text(json.dumps(dict(machine_info={}, benchmarks=[dict(extra_info=dict(level="other"))])))
    assert report.main([str(empty), "--out", str(tmp_path / "o")]) == 1
    assert "no scaling rows" in capsys.readouterr().err
