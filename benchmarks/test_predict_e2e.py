"""End-to-end ``predict`` on the CPU: a folder of PNG files in, ``predictions.csv`` out, per runtime.

    pytest benchmarks/test_predict_e2e.py --benchmark-only               # reduced: 32 files of 512 px, batch 1, 8
    pytest benchmarks/test_predict_e2e.py --benchmark-only --full-sweep  # 64 files of 1024 px, batch 1, 8, 32

(anomalib, a dev dependency, adds its two providers where it imports.)

The model is FastFlow on resnet18 with random weights (the same architecture as anomalib 2.7's
``FastflowModel(backbone="resnet18", conv3x3_only=True, hidden_ratio=1.0, flow_steps=8)``: equal
parameter counts but for AltUB's 896 base parameters) at 256 px, in a checkpoint written by the
trainer (1 epoch on 8 images, calibrated). Each provider is ``python -m altub_fast.predict`` as a
user runs it (``--max-overlays 0 --quiet``; batch 1, 8 and 32; 2 reader threads), and its images/s
is the command's own end-to-end figure (``predictions.json``: files in -> CSV out, after opening
the checkpoint and the cached export; reading, resizing, the first-batch check against PyTorch,
scoring and the CSV included; the check is two extra PyTorch images per run, so few files favour
eager torch):

- ``torch``: eager PyTorch (``--runtime torch``; the kernels' choice left to ``auto``, as a user
  gets it: the CPU fast path where it applies, not the session's ``ALTUB_FAST_IMPL=torch``);
- ``onnxruntime`` / ``openvino``: the exported graph (``--runtime``; exported once, cached);
- ``auto``: the default, what a user gets without the option;
- ``anomalib`` (only where anomalib is importable): anomalib 2.7's eager ``FastflowModel`` of the same
  architecture, random weights, fed by the same threaded reader (``read_ahead``, the same decode and
  resize) and writing the same CSV: the model is the only difference;
- ``anomalib_openvino`` (where anomalib and OpenVINO import): the same anomalib model (its Lightning
  ``Fastflow``) exported by anomalib's own ``to_openvino`` and run by anomalib's
  ``OpenVINOInferencer`` (its graph holds anomalib's pre- and post-processing), behind the same
  reader (images in [0, 1] at the model's size) and CSV.

Every provider of a batch size runs in the same test, the providers interleaved round by round
(rotated each round, so background load hits all alike); ``vs_torch`` is the ratio of median
end-to-end images/s to eager torch's from those rounds. The pytest-benchmark timing is of the
default (``auto``) call as a whole (its setup included). A plain ``pytest`` runs a tiny case once
(64 px model, 64 px files) as a smoke test. No timing threshold is asserted.
"""
from __future__ import annotations

import csv
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _common import predict_checkpoint, user_default_env, write_png_folder
from altub_fast import predict
from altub_fast.inference import read_ahead
from altub_fast.inference.runtime import installed_runtimes

SCALES = {   # model px, file px, files, rounds
    "tiny": dict(model=64, files_px=64, n=8, rounds=1),
    "reduced": dict(model=256, files_px=512, n=32, rounds=3),
    "full": dict(model=256, files_px=1024, n=64, rounds=3),
}
BATCHES = (1, 8, 32)      # the batch 1 and 32, and its target's batch 8
FULL_ONLY_BATCHES = (32,)  # the reduced run (minutes) times batch 1 and 8


def _anomalib_available() -> bool:
    try:
        import anomalib  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 - any failure to import means: not here
        return False


def providers():
    out = ["torch", *installed_runtimes(), "auto"]
    if _anomalib_available():
        out.append("anomalib")
        if "openvino" in installed_runtimes():
            out.append("anomalib_openvino")
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, bench_scale):
    """(checkpoint, folder of PNGs, scale settings)."""
    s = SCALES[bench_scale]
    d = tmp_path_factory.mktemp("predict_e2e")
    _, ckpt = predict_checkpoint(d, "resnet18", s["model"], flow_steps=2 if bench_scale == "tiny" else None)
    return ckpt, write_png_folder(d / "images", s["n"], s["files_px"]), s


def run_predict(ckpt, folder, out, runtime, batch):
    """One ``python -m altub_fast.predict`` in the environment of a user who set nothing (the
    kernels' choice ``auto``, no Triton interpreter): (end-to-end images/s, the runtime that ran)."""
    with user_default_env():
        code = predict.main(["--checkpoint", str(ckpt), str(folder), "--out", str(out), "--runtime", runtime,
                             "--batch-size", str(batch), "--max-overlays", "0", "--quiet", "--workers", "2"])
    assert code == predict.EXIT_OK
    doc = json.loads((out / "predictions.json").read_text())
    return doc["throughput"]["images_per_s_end_to_end"], doc["runtime"]["runtime"]


class AnomalibRunner:
    """anomalib's eager FastflowModel (same architecture, random weights) behind the same reader and CSV."""

    normalise = True         # the torch model takes ImageNet-normalised images

    def __init__(self, size: int, tiny: bool):
        from anomalib.models.image.fastflow.torch_model import FastflowModel

        torch.manual_seed(0)
        self.size = size
        self.model = FastflowModel(input_size=(size, size), backbone="resnet18", pre_trained=False,
                                   flow_steps=2 if tiny else 8, conv3x3_only=True, hidden_ratio=1.0).eval()

    def scores(self, images: torch.Tensor):
        with torch.no_grad():
            return self.model(images).pred_score

    def __call__(self, folder, out, batch) -> float:
        files = sorted(str(p) for p in Path(folder).iterdir())
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(out / "predictions.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "score"])
            for start, b in read_ahead(files, (self.size, self.size), batch_size=batch, workers=2,
                                       normalise=self.normalise):
                scores = np.asarray(self.scores(b.images)).reshape(-1)
                for k, j in enumerate(b.ok):
                    w.writerow([files[start + j], float(scores[k])])
        return len(files) / (time.perf_counter() - t0)


class AnomalibOpenVINORunner(AnomalibRunner):
    """anomalib's own deployment path: its Lightning ``Fastflow`` (the same architecture, random
    weights) exported by ``to_openvino`` and run by ``OpenVINOInferencer`` on the CPU, at torch's
    thread count, fed images in [0, 1] (the exported graph normalises them itself)."""

    normalise = False

    def __init__(self, size: int, tiny: bool, folder: Path):
        import openvino as ov
        from anomalib.deploy import OpenVINOInferencer
        from anomalib.models import Fastflow

        torch.manual_seed(0)
        self.size = size
        model = Fastflow(backbone="resnet18", pre_trained=False, flow_steps=2 if tiny else 8, conv3x3_only=True,
                         hidden_ratio=1.0)
        xml = model.to_openvino(folder, input_size=(size, size))
        cwd = os.getcwd()
        os.chdir(folder)          # the inferencer writes its compile cache into ./openvino_cache
        try:
            self.inferencer = OpenVINOInferencer(path=xml, device="CPU",
                                                 config={ov.properties.inference_num_threads: torch.get_num_threads()})
        finally:
            os.chdir(cwd)

    def scores(self, images: torch.Tensor):
        return self.inferencer.predict(images.numpy()).pred_score


@pytest.mark.parametrize("batch", [pytest.param(b, marks=pytest.mark.full_benchmark) if b in FULL_ONLY_BATCHES else b
                                   for b in BATCHES])
def test_predict_e2e(benchmark, setup, tmp_path, bench_scale, batch):
    ckpt, folder, s = setup
    names = providers()
    others = {}                 # the anomalib providers: name -> runner
    if "anomalib" in names:
        others["anomalib"] = AnomalibRunner(s["model"], bench_scale == "tiny")
    if "anomalib_openvino" in names:
        others["anomalib_openvino"] = AnomalibOpenVINORunner(s["model"], bench_scale == "tiny",
                                                             tmp_path / "anomalib_ov")
    for name in names:          # exports built and cached, every runtime warm, before anything counts
        if name in others:
            others[name](folder, tmp_path / f"warm_{name}", batch)
        else:
            run_predict(ckpt, folder, tmp_path / f"warm_{name}", name, batch)
    rates = {n: [] for n in names}
    used = {}
    for r in range(s["rounds"]):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            out = tmp_path / f"{name}_{r}"
            if name in others:
                rates[name].append(others[name](folder, out, batch))
            else:
                rate, used[name] = run_predict(ckpt, folder, out, name, batch)
                rates[name].append(rate)
    benchmark.pedantic(lambda: run_predict(ckpt, folder, tmp_path / "timed", "auto", batch),
                       rounds=1 if bench_scale != "full" else s["rounds"], iterations=1)
    med = {n: statistics.median(v) for n, v in rates.items()}
    table = {n: {"images_per_s": med[n], "vs_torch": med[n] / med["torch"], "runtime_used": used.get(n, n),
                 "rounds": rates[n]} for n in names}
    for ref in ("anomalib", "anomalib_openvino"):
        if ref in med:
            for n in names:
                table[n][f"vs_{ref}"] = med[n] / med[ref]
    benchmark.extra_info.update(level="predict_e2e", batch=batch, threads=torch.get_num_threads(),
                                files=s["n"], file_px=s["files_px"], model_px=s["model"], providers=table,
                                cpu_count=os.cpu_count())
    lines = [f"predict end to end, batch {batch}, {s['n']} files of {s['files_px']} px, model {s['model']} px, "
             f"{torch.get_num_threads()} threads:"]
    lines += [f"  {n:17s} {t['images_per_s']:8.2f} images/s  {t['vs_torch']:5.2f}x torch"
              + (f"  {t['vs_anomalib']:5.2f}x anomalib" if "vs_anomalib" in t else "")
              + (f"  {t['vs_anomalib_openvino']:5.2f}x anomalib_openvino" if "vs_anomalib_openvino" in t else "")
              + (f"  (ran {t['runtime_used']})" if t["runtime_used"] != n else "") for n, t in table.items()]
    print("\n".join(lines))
    assert all(v > 0 for v in med.values())
    # every exported runtime passed its first-batch check against PyTorch (a failed one runs torch)
    assert all(used[n] == n for n in installed_runtimes()), used
    assert used["auto"] == (installed_runtimes() or ["torch"])[0], used
