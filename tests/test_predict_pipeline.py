"""predict's pipeline: files read ahead on worker threads, in order, a bounded number at a time;
the same scores with any number of workers; maps for overlays spilled to disk; a progress line
only when asked (or on a terminal); and a folder of 1 000 small images scored in bounded memory
(peak RSS of a 1 000-image run against a 100-image run, each in a fresh process)."""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from altub_fast import predict as P
from altub_fast.inference import pipeline
from altub_fast.inference.pipeline import read_ahead
from altub_fast.predict_scoring import ScoreResult, Prediction
from test_predict import make_checkpoint, read_csv, save_png, stripes

SIZE = 64


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("pipe_ckpt"))


def small_folder(folder: Path, n: int, side: int = 24) -> Path:
    """``n`` small PNGs (``side`` px, resized up to the model's size when read), a few distinct ones repeated."""
    folder.mkdir(parents=True, exist_ok=True)
    base = [torch.nn.functional.interpolate(x[None], size=(side, side), mode="bilinear", align_corners=False)[0]
            for x in stripes(4, seed=2)]
    blobs = []
    for k, img in enumerate(base):
        save_png(folder / "seed.png", img)
        blobs.append((folder / "seed.png").read_bytes())
    (folder / "seed.png").unlink()
    for i in range(n):
        (folder / f"img_{i:05d}.png").write_bytes(blobs[i % len(blobs)])
    return folder


# ----------------------------------------------------------------------------- read_ahead
def test_read_ahead_keeps_order_and_bounds_what_is_in_flight(tmp_path, monkeypatch):
    files = [str(p) for p in sorted(small_folder(tmp_path / "f", 23).iterdir())]
    files.insert(5, str(tmp_path / "missing.png"))
    serial = [(s, b.ok, b.bad, b.images) for s, b in read_ahead(files, (SIZE, SIZE), batch_size=4, workers=0)]
    state = {"started": 0, "consumed": 0, "most_ahead": 0}
    lock = threading.Lock()
    real = pipeline.try_read_image

    def counting(path, size, normalise):
        with lock:
            state["started"] += 1
            state["most_ahead"] = max(state["most_ahead"], state["started"] - state["consumed"])
        return real(path, size, normalise)
    monkeypatch.setattr(pipeline, "try_read_image", counting)
    threaded = []
    for s, b in read_ahead(files, (SIZE, SIZE), batch_size=4, workers=3):
        time.sleep(0.02)                              # a slow model: the readers run ahead, but only so far
        with lock:
            state["consumed"] += 4
        threaded.append((s, b.ok, b.bad, b.images))
    assert [t[:3] for t in threaded] == [t[:3] for t in serial]
    assert all(torch.equal(a[3], b[3]) for a, b in zip(threaded, serial))
    assert serial[1][2][0][0] == 1 and "missing.png" in serial[1][2][0][1]    # position 5 = batch 1, slot 1
    assert state["started"] == len(files) and state["most_ahead"] <= (3 + 1) * 4 + 4


def test_bad_pipeline_arguments(tmp_path, ckpt, capsys):
    with pytest.raises(ValueError, match="workers"):
        next(read_ahead(["x"], (SIZE, SIZE), batch_size=1, workers=-1))
    assert P.main(["--checkpoint", str(ckpt), "x.png", "--workers", "-1"]) == P.EXIT_USAGE
    assert "--workers" in capsys.readouterr().err


def test_workers_do_not_change_scores_and_progress_only_when_asked(ckpt, tmp_path, capsys):
    folder = small_folder(tmp_path / "in", 9)
    common = ["--checkpoint", str(ckpt), str(folder), "--runtime", "torch", "--max-overlays", "3", "--batch-size", "4"]
    assert P.main([*common, "--out", str(tmp_path / "w0"), "--workers", "0", "--quiet"]) == P.EXIT_OK
    assert "img/s" not in capsys.readouterr().err                 # not a terminal, no --progress: no progress line
    assert P.main([*common, "--out", str(tmp_path / "w3"), "--workers", "3", "--quiet", "--progress"]) == P.EXIT_OK
    captured = capsys.readouterr()
    assert "predict" in captured.err and "img" in captured.err    # the progress line, on stderr
    assert "images/s end to end" in captured.out
    s0 = [r["score"] for r in read_csv(tmp_path / "w0" / "predictions.csv")]
    s3 = [r["score"] for r in read_csv(tmp_path / "w3" / "predictions.csv")]
    assert s0 == s3 and len(s0) == 9
    assert len(list((tmp_path / "w3" / "overlays").glob("*.png"))) == 3
    t = json.loads((tmp_path / "w3" / "predictions.json").read_text())["throughput"]
    assert t["files"] == 9 and t["images_per_s_end_to_end"] > 0 and t["seconds_end_to_end"] >= t["seconds_scoring"]


def test_kept_maps_go_to_disk_and_come_back(tmp_path):
    result = ScoreResult([Prediction(str(i)) for i in range(50)])
    maps = torch.rand(50, 8, 12) * 10 - 3
    for i in range(50):
        result.record(i, maps[i], float(i), None, keep_maps=30)
    assert len(result.maps) == 30 and result.maps.positions == list(range(30)) and 45 not in result.maps
    assert result.maps._file.seek(0, 2) == 30 * 8 * 12 * 2                       # float16, on disk
    assert torch.equal(result.maps.read([29, 3]), maps[[29, 3]].to(torch.float16))
    assert result.map_range == (float(maps.min()), float(maps.max()))             # over every map, kept or not
    result.maps.close()
    assert len(result.maps) == 0


# ----------------------------------------------------------------------------- bounded memory
_PEAK = """
import resource, sys
from altub_fast import predict
rc = predict.main(sys.argv[1:])
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "RC", rc)
"""


def _peak_rss_kb(ckpt, folder: Path, out: Path) -> int:
    env = dict(os.environ, ALTUB_FAST_IMPL="torch", OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", _PEAK, "--checkpoint", str(ckpt), str(folder), "--out", str(out),
                           "--quiet", "--max-overlays", "0", "--batch-size", "16", "--workers", "2"],
                          capture_output=True, text=True, timeout=600, env=env)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert last.startswith("PEAK_KB") and last.endswith("RC 0"), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(read_csv(out / "predictions.csv")) == len(list(folder.iterdir()))
    return int(last.split()[1])


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in kilobytes is Linux's")
def test_a_folder_of_1000_small_images_runs_in_bounded_memory(tmp_path_factory):
    """Each image becomes a (3, 128, 128) float32 tensor (196 KB) and a (128, 128) map: holding 900
    more images would add about 180 MB, their maps 30-60 MB. The 1 000-image run may use at most
    25 MB more at its peak than the 100-image one."""
    d = tmp_path_factory.mktemp("mem")
    ckpt = make_checkpoint(d / "ckpt", size=128)
    from altub_fast.inference import make_scorer, open_checkpoint
    model, _ = open_checkpoint(str(ckpt), device="cpu")
    make_scorer(model, "auto", checkpoint=ckpt).prepare()       # the export is cached before either run
    small = _peak_rss_kb(ckpt, small_folder(d / "n100", 100), d / "o100")
    large = _peak_rss_kb(ckpt, small_folder(d / "n1000", 1000), d / "o1000")
    growth_mb = (large - small) / 1024
    print(f"peak RSS: 100 images {small / 1024:.0f} MB, 1000 images {large / 1024:.0f} MB, growth {growth_mb:.1f} MB")
    assert growth_mb < 25, growth_mb
    doc = json.loads((d / "o1000" / "predictions.json").read_text())
    assert doc["counts"]["scored"] == 1000 and np.isfinite([p["score"] for p in doc["predictions"]]).all()
