"""python -m altub_fast.predict: a folder of new images (good, defective, corrupt, not an image),
thresholds from the checkpoint or --threshold, per-image scores, clear errors for bad input."""
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from altub_fast import predict as P
from altub_fast.cli import main as altub_fast_main
from altub_fast.data.mvtec import load_image
from altub_fast.imagenet import IMAGENET_MEAN, IMAGENET_STD
from altub_fast.models import build_model
from altub_fast.train import AltUBTrainer, load_model

SIZE = 64


def stripes(n, size=SIZE, seed=0):
    """'Normal' images in [0, 1]: oriented sinusoid stripes with a random phase."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        base = 0.5 + 0.4 * torch.sin(12 * xx + 3 * yy + 2 * math.pi * float(torch.rand(1, generator=g)))
        out.append(torch.stack([base, 0.8 * base, 1 - base]))
    return torch.stack(out)


def make_checkpoint(folder, kind="fastflow", size=SIZE):
    """A tiny trained checkpoint (random resnet18 backbone saved in it, ``size`` px (64), 2 blocks,
    1 epoch), its score normalisation calibrated on other normal images."""
    torch.manual_seed(0)
    np.random.seed(0)
    if kind == "fastflow":
        m = build_model("fastflow", "resnet18", pretrained=False, image_size=size, out_indices=(1, 2),
                        flow_steps=2, hidden_ratio=0.25)
    else:
        m = build_model("cflow", "resnet18", pretrained=False, image_size=size, out_indices=(1, 2),
                        coupling_blocks=2, condition_dim=16, fiber_batch_size=64)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    data = TensorDataset((stripes(8, size=size) - mean) / std)
    tr = AltUBTrainer(m, data, epochs=1, batch_size=4, progress=False, checkpoint_dir=str(folder))
    tr.fit()
    m.calibrate([(stripes(4, size=size, seed=9) - mean) / std])
    assert m.calibrated and not torch.equal(m.scorer.scale, torch.ones_like(m.scorer.scale))
    return Path(tr.save_checkpoint())


def save_png(path, arr01, mode="RGB"):
    a = (np.clip(np.asarray(arr01), 0, 1) * 255).round().astype(np.uint8)
    if mode == "RGB":
        a = a.transpose(1, 2, 0)
    Image.fromarray(a, mode=mode).save(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """good RGB at the model size, good greyscale of another size, a defective image (a bright
    square), a truncated PNG, a text file, and a hidden file (ignored)."""
    d = tmp_path_factory.mktemp("incoming")
    imgs = stripes(3, seed=5)
    save_png(d / "a_good.png", imgs[0])
    big = torch.nn.functional.interpolate(imgs[1:2], size=(90, 120), mode="bilinear", align_corners=False)[0]
    save_png(d / "b_good_grey.png", big.mean(0), mode="L")
    bad = imgs[2].clone()
    bad[:, 20:40, 24:44] = 1.0
    save_png(d / "c_defect.png", bad)
    full = (d / "a_good.png").read_bytes()
    (d / "d_corrupt.png").write_bytes(full[: len(full) // 3])
    (d / "e_notes.txt").write_text("not an image\n")
    (d / ".hidden.png").write_bytes(b"ignored")
    return d


def reference_scores(ckpt, paths):
    """Scores computed independently: load_image + ImageNet normalisation + model.anomaly_map, one image at a time."""
    model = load_model(str(ckpt))
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = {}
    for p in paths:
        x = (torch.from_numpy(load_image(str(p), (SIZE, SIZE))) - mean) / std
        out[str(p)] = float(model.anomaly_map(x[None])[1][0])
    return out


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def with_threshold(ckpt, tmp_path, value, score_mode=None):
    """The checkpoint with a stored threshold, set in ``score_mode`` (default: the checkpoint's own)."""
    ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    score_mode = score_mode or ck["model_config"]["score"]
    ck["threshold"] = {"value": float(value), "max_fpr": 0.01, "n_heldout": 7, "score_mode": score_mode}
    path = tmp_path / "with_threshold.pt"
    torch.save(ck, path)
    return path


# ----------------------------------------------------------------------------- the folder
def test_folder_with_good_defect_corrupt_and_non_image(ckpt, folder, tmp_path, capsys):
    out = tmp_path / "out"
    rc = P.main(["--checkpoint", str(ckpt), str(folder), "--out", str(out), "--quiet", "--threshold", "0.5"])
    assert rc == P.EXIT_SKIPPED                                  # files were skipped: non-zero at the end
    err = capsys.readouterr().err
    assert "2 file(s) skipped" in err and "d_corrupt.png" in err and "e_notes.txt" in err and "not an image" in err

    rows = {Path(r["path"]).name: r for r in read_csv(out / "predictions.csv")}
    assert sorted(rows) == ["a_good.png", "b_good_grey.png", "c_defect.png", "d_corrupt.png", "e_notes.txt"]
    assert rows["d_corrupt.png"]["decision"] == "error" and "truncated" in rows["d_corrupt.png"]["error"]
    assert rows["e_notes.txt"]["decision"] == "error" and rows["e_notes.txt"]["score"] == ""
    scored = [folder / n for n in ("a_good.png", "b_good_grey.png", "c_defect.png")]
    ref = reference_scores(ckpt, scored)
    for p in scored:
        r = rows[p.name]
        assert float(r["score"]) == pytest.approx(ref[str(p)], rel=1e-5, abs=1e-6)
        assert r["decision"] == ("defect" if float(r["score"]) > 0.5 else "good")
        assert float(r["threshold"]) == 0.5

    doc = json.loads((out / "predictions.json").read_text())
    assert doc["counts"]["files"] == 5 and doc["counts"]["scored"] == 3 and doc["counts"]["skipped"] == 2
    assert doc["threshold"]["source"] == "--threshold" and doc["threshold"]["value"] == 0.5
    assert {Path(s["path"]).name for s in doc["skipped"]} == {"d_corrupt.png", "e_notes.txt"}
    pngs = sorted((out / "overlays").glob("*.png"))
    assert len(pngs) == 3 and all(Image.open(f).size[0] > 200 for f in pngs)


def test_table_printed_and_scores_do_not_depend_on_the_batch(ckpt, folder, tmp_path, capsys):
    good = [str(folder / "a_good.png"), str(folder / "b_good_grey.png"), str(folder / "c_defect.png")]
    assert P.main(["--checkpoint", str(ckpt), *good, "--out", str(tmp_path / "b1"), "--batch-size", "1",
                   "--max-overlays", "0"]) == P.EXIT_OK
    out = capsys.readouterr().out
    assert "decision" in out and all(Path(g).name in out for g in good) and "n/a" in out
    assert P.main(["--checkpoint", str(ckpt), *good, "--out", str(tmp_path / "b3"), "--batch-size", "3",
                   "--max-overlays", "0", "--quiet"]) == P.EXIT_OK
    s1 = [float(r["score"]) for r in read_csv(tmp_path / "b1" / "predictions.csv")]
    s3 = [float(r["score"]) for r in read_csv(tmp_path / "b3" / "predictions.csv")]
    np.testing.assert_allclose(s1, s3, rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "b1" / "overlays").exists()


def test_default_batch_size_is_the_measured_cpu_one(ckpt, folder, tmp_path):
    """Without --batch-size, predict on the CPU scores batches of CPU_BATCH (8: the fastest of 1 / 8 / 32
    measured, docs/deployment_speed.md) and records it; --batch-size still wins."""
    img = str(folder / "a_good.png")
    for extra, expected in (([], P.CPU_BATCH), (["--batch-size", "3"], 3)):
        out = tmp_path / f"b{expected}"
        assert P.main(["--checkpoint", str(ckpt), img, "--out", str(out), "--device", "cpu", "--runtime", "torch",
                       "--max-overlays", "0", "--quiet", *extra]) == P.EXIT_OK
        assert json.loads((out / "predictions.json").read_text())["batch_size"] == expected
    assert P.CPU_BATCH == 8 and P.build_parser().parse_args(["--checkpoint", "x", img]).batch_size is None


def test_glob_and_recursive_inputs(ckpt, folder, tmp_path):
    sub = tmp_path / "tree" / "line3"
    sub.mkdir(parents=True)
    (sub / "x.png").write_bytes((folder / "a_good.png").read_bytes())
    files, problems = P.collect_inputs([str(tmp_path / "tree" / "**" / "*.png"), str(folder / "a_good.png")])
    assert files == [str(sub / "x.png"), str(folder / "a_good.png")] and problems == []
    files, problems = P.collect_inputs([str(tmp_path / "tree")])
    assert files == [] and problems == [(str(tmp_path / "tree"), "folder holds no files")]
    files, _ = P.collect_inputs([str(tmp_path / "tree")], recursive=True)
    assert files == [str(sub / "x.png")]
    files, problems = P.collect_inputs([str(folder), str(folder / "a_good.png"), "nope/*.png"])
    assert len(files) == 5 and problems == [("nope/*.png", "pattern matches no file")]   # no repeats, no hidden


# ----------------------------------------------------------------------------- thresholds
def test_threshold_stored_in_checkpoint_is_used_and_can_be_overridden(ckpt, folder, tmp_path, capsys):
    good = [folder / "a_good.png", folder / "b_good_grey.png", folder / "c_defect.png"]
    ref = reference_scores(ckpt, good)
    # between the two highest scores, not on one: an image scored exactly at the threshold would be
    # decided by the last bits its runtime (ONNX Runtime under auto) computes differently from eager
    top2 = sorted(ref.values())[-2:]
    middle = float(np.mean(top2))
    assert top2[1] - top2[0] > 1e-3 * abs(middle)
    stored = with_threshold(ckpt, tmp_path, middle)
    args = ["--checkpoint", str(stored), *map(str, good), "--max-overlays", "0", "--quiet"]

    assert P.main([*args, "--out", str(tmp_path / "stored")]) == P.EXIT_OK
    out = capsys.readouterr().out
    assert f"threshold {middle:.6g} from the checkpoint" in out and "0.01 on 7 held-out normal images" in out
    rows = read_csv(tmp_path / "stored" / "predictions.csv")
    want = ["defect" if ref[r["path"]] > middle else "good" for r in rows]
    assert [r["decision"] for r in rows] == want and want.count("defect") == 1 and want.count("good") == 2
    doc = json.loads((tmp_path / "stored" / "predictions.json").read_text())
    assert doc["threshold"]["source"] == "checkpoint" and doc["threshold"]["value"] == pytest.approx(middle)
    assert doc["threshold"]["max_fpr"] == 0.01 and doc["threshold"]["n_heldout"] == 7

    low = min(ref.values()) - 1.0
    assert P.main([*args, "--out", str(tmp_path / "override"), "--threshold", str(low)]) == P.EXIT_OK
    rows = read_csv(tmp_path / "override" / "predictions.csv")
    assert [r["decision"] for r in rows] == ["defect"] * 3 and float(rows[0]["threshold"]) == low
    doc = json.loads((tmp_path / "override" / "predictions.json").read_text())
    assert doc["threshold"]["source"] == "--threshold" and "checkpoint's own" in doc["threshold"]["note"]


def test_no_threshold_gives_n_a_and_says_why(ckpt, folder, tmp_path, capsys):
    assert P.main(["--checkpoint", str(ckpt), str(folder / "a_good.png"), "--out", str(tmp_path),
                   "--max-overlays", "0", "--quiet"]) == P.EXIT_OK
    assert "stores no threshold" in capsys.readouterr().out
    rows = read_csv(tmp_path / "predictions.csv")
    assert rows[0]["decision"] == "n/a" and rows[0]["threshold"] == "" and math.isfinite(float(rows[0]["score"]))
    assert json.loads((tmp_path / "predictions.json").read_text())["threshold"]["source"] == "none"


def test_threshold_rules():
    assert P.decide(1.0, 0.5) == "defect" and P.decide(0.5, 0.5) == "good" and P.decide(3.0, None) == "n/a"
    t = P.resolve_threshold({"threshold": {"value": 2.0, "max_fpr": 0.05, "n_heldout": 20, "score_mode": "loglik"}},
                            None, "loglik")
    assert t.value == 2.0 and t.source == "checkpoint" and "0.05" in t.note and "20" in t.note
    with pytest.raises(P.CheckpointError, match="score mode 'fastflow'"):
        P.resolve_threshold({"threshold": {"value": 2.0, "score_mode": "fastflow"}}, None, "loglik")
    with pytest.raises(P.CheckpointError, match="malformed"):
        P.resolve_threshold({"threshold": {"max_fpr": 0.01}})
    assert P.resolve_threshold({"threshold": {"value": 2.0, "score_mode": "fastflow"}}, 1.5, "loglik").value == 1.5
    with pytest.raises(ValueError, match="finite"):
        P.resolve_threshold({}, float("nan"))


# ----------------------------------------------------------------------------- bad input
def test_empty_input_is_a_clear_error(ckpt, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert P.main(["--checkpoint", str(ckpt), str(empty)]) == P.EXIT_USAGE
    err = capsys.readouterr().err
    assert "no input images" in err and "folder holds no files" in err
    assert P.main(["--checkpoint", str(ckpt)]) == P.EXIT_USAGE
    assert "no input" in capsys.readouterr().err
    assert P.main(["--checkpoint", str(ckpt), str(tmp_path / "missing.png")]) == P.EXIT_USAGE
    assert "no such file or folder" in capsys.readouterr().err


def test_truncated_and_older_checkpoints_give_clear_errors(ckpt, folder, tmp_path, capsys):
    img = str(folder / "a_good.png")
    data = ckpt.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    assert P.main(["--checkpoint", str(tmp_path / "truncated.pt"), img]) == P.EXIT_USAGE
    err = capsys.readouterr().err
    assert "truncated" in err and "truncated.pt" in err and "Traceback" not in err

    ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    torch.save({**ck, "format": "altub_fast.checkpoint/0"}, tmp_path / "old_format.pt")
    torch.save(ck["model"], tmp_path / "bare_state_dict.pt")
    for name in ("old_format.pt", "bare_state_dict.pt"):
        assert P.main(["--checkpoint", str(tmp_path / name), img]) == P.EXIT_USAGE
        err = capsys.readouterr().err
        assert "not an altub_fast training checkpoint" in err and "older altub_fast" in err and name in err

    flow_key = next(k for k in ck["model"] if k.startswith("flows."))
    torch.save({**ck, "model": {k: v for k, v in ck["model"].items() if k != flow_key}}, tmp_path / "missing.pt")
    assert P.main(["--checkpoint", str(tmp_path / "missing.pt"), img]) == P.EXIT_USAGE
    err = capsys.readouterr().err
    assert "does not describe a model" in err and flow_key in err

    assert P.main(["--checkpoint", str(tmp_path / "nowhere.pt"), img]) == P.EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err


def test_bad_arguments(ckpt, folder, capsys):
    img = str(folder / "a_good.png")
    assert P.main(["--checkpoint", str(ckpt), img, "--batch-size", "0"]) == P.EXIT_USAGE
    assert "--batch-size" in capsys.readouterr().err
    assert P.main(["--checkpoint", str(ckpt), img, "--threshold", "inf"]) == P.EXIT_USAGE
    assert "finite" in capsys.readouterr().err


def test_altub_fast_predict_entry_point(ckpt, folder, tmp_path, capsys):
    assert altub_fast_main(["--help"]) == 0
    assert "predict" in capsys.readouterr().out
    assert altub_fast_main(["predict", "--checkpoint", str(ckpt), str(folder / "c_defect.png"), "--out",
                            str(tmp_path), "--quiet"]) == P.EXIT_OK
    assert len(read_csv(tmp_path / "predictions.csv")) == 1 and len(list((tmp_path / "overlays").glob("*.png"))) == 1


# ----------------------------------------------------------------------------- the inference layer underneath
def test_imagenet_constants_are_one_set():
    from altub_fast.data import mvtec
    from altub_fast.imagenet import denormalise, normalise

    assert mvtec.IMAGENET_MEAN is IMAGENET_MEAN and mvtec.IMAGENET_STD is IMAGENET_STD
    x = stripes(2)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.equal(normalise(x), (x - mean) / std)
    torch.testing.assert_close(denormalise(normalise(x)), x, atol=1e-6, rtol=0)


def test_read_images_normalises_only_when_asked(folder):
    from altub_fast.inference import read_images

    files = [str(folder / "a_good.png"), str(folder / "e_notes.txt"), str(folder / "b_good_grey.png")]
    raw = read_images(files, (SIZE, SIZE), normalise=False)
    norm = read_images(files, (SIZE, SIZE))
    assert raw.ok == norm.ok == [0, 2] and [j for j, _ in raw.bad] == [1] and "not an image" in raw.bad[0][1]
    assert raw.images.shape == (2, 3, SIZE, SIZE) and 0.0 <= float(raw.images.min()) <= float(raw.images.max()) <= 1.0
    assert torch.equal(raw.images[0], torch.from_numpy(load_image(files[0], (SIZE, SIZE))))
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.equal(norm.images, (raw.images - mean) / std)


def test_scorer_and_score_dataset_give_the_models_own_scores(ckpt, folder):
    from altub_fast import train
    from altub_fast.inference import Scorer, open_checkpoint, score_dataset

    model, ck = open_checkpoint(str(ckpt), device="cpu")
    assert ck["format"] and not model.training
    scorer = Scorer(model)
    assert scorer.input_normalised and scorer.image_size == (SIZE, SIZE)
    paths = [folder / "a_good.png", folder / "c_defect.png"]
    images, ok, bad = scorer.read([str(p) for p in paths])
    maps, scores = scorer.score(images)
    ref = reference_scores(ckpt, paths)
    assert maps.shape == (2, SIZE, SIZE) and not bad
    assert [float(s) for s in scores] == pytest.approx([ref[str(p)] for p in paths], rel=1e-5, abs=1e-6)
    result = score_dataset(model, TensorDataset(images, torch.tensor([0, 1])), batch_size=1, progress=False)
    torch.testing.assert_close(result["scores"], scores.float(), rtol=1e-5, atol=1e-6)
    assert result["labels"].tolist() == [0, 1] and result["masks"] is None
    assert train.predict is score_dataset     # the old name still works


def test_open_checkpoint_names_what_is_wrong(ckpt, tmp_path):
    from altub_fast.inference import CheckpointError, open_checkpoint

    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(str(tmp_path / "missing.pt"))
    with pytest.raises(CheckpointError, match="is not a file"):
        open_checkpoint(str(tmp_path))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(Path(ckpt).read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated, corrupt or not a torch checkpoint"):
        open_checkpoint(str(truncated))
    old = tmp_path / "old.pt"
    torch.save({"model": {}}, old)
    with pytest.raises(CheckpointError, match="not an altub_fast training checkpoint.*older altub_fast"):
        open_checkpoint(str(old))
    ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    ck["model_config"] = {"name": "fastflow", "no_such_option": 1}
    odd = tmp_path / "odd.pt"
    torch.save(ck, odd)
    with pytest.raises(CheckpointError, match="does not describe a model this altub_fast can rebuild"):
        open_checkpoint(str(odd))
