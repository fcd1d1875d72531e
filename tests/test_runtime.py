"""predict / eval's --runtime: ``auto`` picks an exported runtime that matches PyTorch (1e-4
relative) on the synthetic carpet; the export cache beside the checkpoint is rebuilt when the
checkpoint or the input size changes and when an entry is corrupt; a graph that disagrees with
PyTorch warns and scores with PyTorch; a runtime that is not installed exits 2 naming the extra."""
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from altub_fast import eval as eval_cli
from altub_fast import predict as P
from altub_fast.data import MVTecAD, make_synthetic_carpet
from altub_fast.inference import ExportedModel, Scorer, make_scorer, open_checkpoint, read_images, score_dataset
from altub_fast.inference.export_cache import MANIFEST
from altub_fast.inference.graph import rel_err
from altub_fast.inference.runtime import installed_runtimes, resolve_runtime
from test_predict import SIZE, make_checkpoint, read_csv

pytest.importorskip("onnx", reason="onnx is a dev dependency")
pytest.importorskip("onnxruntime", reason="onnxruntime is a dev dependency")
pytest.importorskip("openvino", reason="openvino is a dev dependency")

RTOL = 1e-4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("rt_ckpt"))


@pytest.fixture(scope="module")
def carpet(tmp_path_factory):
    """The synthetic carpet at the model's size: its test images (good and defective) and the folder."""
    root = tmp_path_factory.mktemp("rt_carpet")
    folder = make_synthetic_carpet(root, seed=0, n_train=1, n_test_good=3, n_test_defect=1, size=SIZE)
    return root, sorted(str(p) for p in (folder / "test").rglob("*.png"))


def torch_outputs(model, files):
    images, ok, bad = Scorer(model).read(files)
    assert not bad
    return Scorer(model).score(images)


def entries(ckpt):
    return sorted(p.name for p in Path(str(ckpt) + ".exports").iterdir() if not p.name.startswith("."))


# ----------------------------------------------------------------------------- auto against torch
def test_auto_picks_a_runtime_that_matches_torch_on_the_synthetic_carpet(ckpt, carpet, tmp_path):
    root, files = carpet
    picked = resolve_runtime("auto", "cpu")
    assert picked == installed_runtimes()[0] and picked in ("onnxruntime", "openvino")
    model, _ = open_checkpoint(str(ckpt), device="cpu")
    ref_maps, ref_scores = torch_outputs(model, files)
    for runtime in ("auto", "openvino"):        # auto's pick (onnxruntime here) and the other one
        scorer = make_scorer(model, runtime, checkpoint=ckpt)
        images, ok, _ = scorer.read(files)
        assert not scorer.input_normalised and float(images.min()) >= 0.0   # RGB in [0, 1]: normalised in the graph
        maps, scores = scorer.score(images)
        assert scorer.info["runtime"] == (picked if runtime == "auto" else runtime) and scorer.info["check"]["passed"]
        assert maps.shape == ref_maps.shape and scores.shape == ref_scores.shape
        assert rel_err(maps.numpy(), ref_maps.numpy()) <= RTOL and rel_err(scores.numpy(), ref_scores.numpy()) <= RTOL

    # eval's path: the dataset's normalised images, the whole test set, labels and masks kept
    ds = MVTecAD(root, "carpet_synthetic", split="test", image_size=SIZE)
    ref = score_dataset(model, ds, batch_size=4, progress=False)
    fast = score_dataset(model, ds, batch_size=4, progress=False,
                         scorer=make_scorer(model, "auto", checkpoint=ckpt, feeds_normalised=True))
    assert rel_err(fast["maps"].numpy(), ref["maps"].numpy()) <= RTOL
    assert rel_err(fast["scores"].numpy(), ref["scores"].numpy()) <= RTOL
    assert torch.equal(fast["labels"], ref["labels"]) and torch.equal(fast["masks"], ref["masks"])

    # the command line: the same scores; the header, the last line and predictions.json name the runtime
    out = {}
    for runtime in ("auto", "torch"):
        assert P.main(["--checkpoint", str(ckpt), *files, "--out", str(tmp_path / runtime), "--quiet",
                       "--max-overlays", "0", "--runtime", runtime, "--batch-size", "3"]) == P.EXIT_OK
        out[runtime] = np.array([float(r["score"]) for r in read_csv(tmp_path / runtime / "predictions.csv")])
    assert rel_err(out["auto"], out["torch"]) <= RTOL
    doc = json.loads((tmp_path / "auto" / "predictions.json").read_text())
    assert doc["runtime"]["runtime"] == picked and doc["runtime"]["requested"] == "auto"
    assert doc["runtime"]["check"]["passed"] and doc["throughput"]["images_per_s_end_to_end"] > 0
    assert json.loads((tmp_path / "torch" / "predictions.json").read_text())["runtime"]["runtime"] == "torch"


def test_the_command_line_names_the_runtime(ckpt, carpet, tmp_path, capsys):
    _, files = carpet
    assert P.main(["--checkpoint", str(ckpt), files[0], "--out", str(tmp_path), "--max-overlays", "0"]) == P.EXIT_OK
    out = capsys.readouterr().out
    first, last = out.splitlines()[0], out.strip().splitlines()[-1]
    assert f"runtime {installed_runtimes()[0]}" in first and "(auto; " in first
    assert "images/s end to end (files in -> CSV out" in last and f"runtime {installed_runtimes()[0]}" in last


# ----------------------------------------------------------------------------- the cache
def _rewrite(path, change):
    ck = torch.load(path, map_location="cpu", weights_only=True)
    change(ck)
    torch.save(ck, path)


def test_cache_is_reused_and_rebuilt_when_the_checkpoint_changes(ckpt, carpet, tmp_path):
    _, files = carpet
    mine = tmp_path / "model.pt"
    mine.write_bytes(Path(ckpt).read_bytes())

    def run():
        model, _ = open_checkpoint(str(mine), device="cpu")
        scorer = make_scorer(model, "onnxruntime", checkpoint=mine)
        maps, scores = scorer.score(scorer.read(files).images)
        ref_maps, ref_scores = torch_outputs(model, files)
        assert rel_err(scores.numpy(), ref_scores.numpy()) <= RTOL and scorer.info["check"]["passed"]
        return next(iter(scorer.info["exports"].values()))["cached"], scores

    assert run()[0] is False and run()[0] is True           # exported once, then found in the cache
    before = entries(mine)
    _, old_scores = run()
    flow_key = next(k for k in torch.load(mine, weights_only=True)["model"] if k.startswith("flows.") and
                    k.endswith("weight"))
    _rewrite(mine, lambda ck: ck["model"][flow_key].mul_(1.5))   # other weights under the same file name
    cached, new_scores = run()
    assert cached is False and entries(mine) != before and len(entries(mine)) == 1   # the stale entry is gone
    assert rel_err(new_scores.numpy(), old_scores.numpy()) > RTOL                    # and the scores follow


def test_cache_is_rebuilt_when_the_input_size_changes(tmp_path):
    ck = make_checkpoint(tmp_path / "cflow", "cflow")          # CFLOW-AD scores any input size
    model, _ = open_checkpoint(str(ck), device="cpu")
    scorer = make_scorer(model, "onnxruntime", checkpoint=ck, feeds_normalised=True)
    for size in (SIZE, SIZE + 32):
        x = torch.randn(2, 3, size, size)
        maps, scores = scorer.score(x)
        ref_maps, ref_scores = model.anomaly_map(x)
        assert maps.shape == (2, size, size) and scorer.info["check"]["passed"]
        assert rel_err(maps.numpy(), ref_maps.numpy()) <= RTOL and rel_err(scores.numpy(), ref_scores.numpy()) <= RTOL
    sizes = sorted([f"{SIZE}x{SIZE}", f"{SIZE + 32}x{SIZE + 32}"])
    assert sorted(scorer.info["exports"]) == sizes and sorted(e.split("-")[2] for e in entries(ck)) == sizes
    assert make_scorer(model, "onnxruntime", checkpoint=ck).prepare() and \
        all(not e["cached"] for e in scorer.info["exports"].values())      # both were built; a third scorer finds 64


@pytest.mark.parametrize("damage", ["truncate", "manifest"])
def test_corrupt_cached_export_is_rebuilt(ckpt, carpet, tmp_path, damage):
    _, files = carpet
    mine = tmp_path / "model.pt"
    mine.write_bytes(Path(ckpt).read_bytes())
    model, _ = open_checkpoint(str(mine), device="cpu")
    first = make_scorer(model, "onnxruntime", checkpoint=mine)
    assert first.prepare()
    entry = Path(first.info["exports"][f"{SIZE}x{SIZE}"]["path"]).parent
    if damage == "truncate":
        onnx = entry / "model.onnx"
        onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])
    else:
        (entry / MANIFEST).write_text("{not json")
    again = make_scorer(model, "onnxruntime", checkpoint=mine)
    maps, scores = again.score(again.read(files).images)
    assert again.info["exports"][f"{SIZE}x{SIZE}"]["cached"] is False and again.info["check"]["passed"]
    assert rel_err(scores.numpy(), torch_outputs(model, files)[1].numpy()) <= RTOL
    assert json.loads((entry / MANIFEST).read_text())["files"]["model.onnx"]


def test_cache_falls_back_to_the_user_cache_where_the_checkpoint_folder_is_read_only(tmp_path, monkeypatch):
    from altub_fast.inference import export_cache

    ck = tmp_path / "ro" / "model.pt"
    ck.parent.mkdir()
    ck.write_bytes(b"x")
    assert export_cache.cache_dir_for(ck) == Path(str(ck) + ".exports")
    monkeypatch.setenv("ALTUB_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(export_cache.os, "access", lambda path, mode: False)
    root = export_cache.cache_dir_for(ck)
    assert root.is_dir() and root.parent == tmp_path / "cache" / "exports"
    assert root.name.startswith("model.pt-") and root.name.endswith(".exports")
    other = tmp_path / "elsewhere" / "model.pt"             # another run's checkpoint of the same name
    other.parent.mkdir()
    other.write_bytes(b"y")
    assert export_cache.cache_dir_for(other) != root


def test_a_graph_that_disagrees_warns_and_scores_with_torch(ckpt, carpet, tmp_path, monkeypatch, capsys):
    _, files = carpet
    real_call = ExportedModel.__call__

    def off_by_a_bit(self, images):
        maps, scores = real_call(self, images)
        return maps * 1.001, scores
    monkeypatch.setattr(ExportedModel, "__call__", off_by_a_bit)
    assert P.main(["--checkpoint", str(ckpt), *files, "--out", str(tmp_path), "--quiet", "--max-overlays", "0",
                   "--batch-size", "2"]) == P.EXIT_OK
    err = capsys.readouterr().err
    assert "warning:" in err and "does not reproduce PyTorch" in err and "runtime torch" in err
    doc = json.loads((tmp_path / "predictions.json").read_text())
    assert doc["runtime"]["runtime"] == "torch" and doc["runtime"]["check"]["passed"] is False
    model, _ = open_checkpoint(str(ckpt), device="cpu")
    ref = torch_outputs(model, files)[1].numpy()
    np.testing.assert_allclose([p["score"] for p in doc["predictions"]], ref, rtol=1e-6, atol=1e-7)


def test_the_check_recomputes_the_first_images_of_the_batch_the_graph_ran_whole(ckpt, carpet, monkeypatch):
    """PyTorch recomputes CHECK_IMAGES images of the first batch, compared with the graph's outputs
    for them from its run on the whole batch; a graph wrong on them is caught."""
    from altub_fast.inference import runtime_scorer as RS

    _, files = carpet
    model, _ = open_checkpoint(str(ckpt), device="cpu")
    seen = []
    real_reference, real_call = RS.RuntimeScorer._reference, ExportedModel.__call__
    monkeypatch.setattr(RS.RuntimeScorer, "_reference",
                        lambda self, size, x: seen.append(len(x)) or real_reference(self, size, x))
    monkeypatch.setattr(ExportedModel, "__call__", lambda self, x: seen.append(("graph", len(x))) or real_call(self, x))
    scorer = make_scorer(model, "onnxruntime", checkpoint=ckpt)
    images = scorer.read(files)[0]
    maps, scores = scorer.score(images)
    assert len(files) > RS.CHECK_IMAGES and seen == [("graph", len(files)), RS.CHECK_IMAGES]
    assert scorer.info["check"] == dict(scorer.info["check"], passed=True, batch=len(files),
                                        images_checked=RS.CHECK_IMAGES)
    ref_maps, ref_scores = torch_outputs(model, files)
    assert rel_err(maps.numpy(), ref_maps.numpy()) <= RTOL and rel_err(scores.numpy(), ref_scores.numpy()) <= RTOL

    def first_image_off(self, x):       # wrong on the first image only
        maps, scores = real_call(self, x)
        maps = maps.copy()
        maps[0] *= 1.001
        return maps, scores
    monkeypatch.setattr(ExportedModel, "__call__", first_image_off)
    wrong = make_scorer(model, "onnxruntime", checkpoint=ckpt, warn=lambda msg: None)
    maps, _ = wrong.score(images)
    assert wrong.info["runtime"] == "torch" and wrong.info["check"]["passed"] is False
    assert rel_err(maps.numpy(), ref_maps.numpy()) <= 1e-5


def test_auto_moves_on_to_the_next_runtime_when_one_disagrees(ckpt, carpet, tmp_path, monkeypatch, capsys):
    _, files = carpet
    real_call = ExportedModel.__call__

    def onnx_off(self, images):
        maps, scores = real_call(self, images)
        return (maps * 1.001 if self.format == "onnx" else maps), scores
    monkeypatch.setattr(ExportedModel, "__call__", onnx_off)
    assert P.main(["--checkpoint", str(ckpt), *files, "--out", str(tmp_path), "--quiet", "--max-overlays", "0"]) == 0
    err = capsys.readouterr().err
    assert "onnxruntime graph does not reproduce PyTorch" in err and "trying openvino instead" in err
    doc = json.loads((tmp_path / "predictions.json").read_text())
    assert doc["runtime"]["runtime"] == "openvino" and doc["runtime"]["check"]["passed"]
    assert "onnxruntime graph does not reproduce" in doc["runtime"]["note"]
    model, _ = open_checkpoint(str(ckpt), device="cpu")
    assert rel_err(np.array([p["score"] for p in doc["predictions"]]), torch_outputs(model, files)[1].numpy()) <= RTOL


# ----------------------------------------------------------------------------- missing packages
def _hide(monkeypatch, *names):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in names else real(n, *a))


def test_missing_runtime_package_exits_2_naming_the_extra(ckpt, carpet, tmp_path, monkeypatch, capsys):
    _, files = carpet
    _hide(monkeypatch, "onnxruntime")
    assert P.main(["--checkpoint", str(ckpt), files[0], "--runtime", "onnxruntime"]) == P.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "onnxruntime" in err and 'pip install "altub_fast[export]"' in err
    _hide(monkeypatch, "onnxruntime", "openvino")
    assert eval_cli.main(["--synthetic", "--data-root", str(tmp_path / "d"), "--runtime", "openvino"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "openvino" in err and "altub_fast[export]" in err
    assert not (tmp_path / "d").exists()                       # refused before any data was made
    # auto without any exported runtime: PyTorch, said so
    assert resolve_runtime("auto", "cpu") == "torch"
    assert P.main(["--checkpoint", str(ckpt), files[0], "--out", str(tmp_path / "o"), "--quiet"]) == P.EXIT_OK
    assert json.loads((tmp_path / "o" / "predictions.json").read_text())["runtime"]["runtime"] == "torch"


def test_auto_is_torch_on_cuda_and_an_explicit_runtime_is_refused_there():
    from altub_fast.inference import RuntimeUnavailable

    assert resolve_runtime("auto", "cuda:0") == "torch"
    with pytest.raises(RuntimeUnavailable, match="runs on the CPU"):
        resolve_runtime("onnxruntime", "cuda")


def test_eval_scores_through_the_runtime_and_names_it(tmp_path, capsys):
    ck = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "landed_fastflow.pt")
    mine = tmp_path / "landed.pt"
    mine.write_bytes(Path(ck).read_bytes())
    args = ["--synthetic", "--data-root", str(tmp_path / "d"), "--image-size", "64", "--checkpoint", str(mine),
            "--quiet", "--num-overlays", "0"]
    runs = {}
    for runtime in ("auto", "torch"):
        assert eval_cli.main([*args, "--out", str(tmp_path / runtime), "--runtime", runtime]) == 0
        runs[runtime] = json.loads((tmp_path / runtime / "results.json").read_text())
    assert "test set scored by: altub_fast " + installed_runtimes()[0] in capsys.readouterr().out
    auto, plain = runs["auto"]["runs"][0], runs["torch"]["runs"][0]
    assert auto["runtime"]["runtime"] == installed_runtimes()[0] and auto["runtime"]["check"]["passed"]
    assert plain["runtime"]["runtime"] == "torch" and runs["auto"]["runtime"] == "auto"
    for k in ("image_auroc", "pixel_auroc", "aupro"):
        assert abs(auto["metrics"][k] - plain["metrics"][k]) < 1e-3, k
