"""Issue 19: the defaults chosen by the worst data set (pixel map ``loglik``, image score the top 20 %
of FastFlow's map) are what build_model, eval, predict and export use; an old checkpoint keeps its own
rules; the new rule scores an image the same alone, in a batch and in another set, and its constants
come from held-out normal images only."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from altub_fast import eval as eval_cli
from altub_fast import export as E
from altub_fast import predict as P
from altub_fast.imagenet import IMAGENET_MEAN, IMAGENET_STD
from altub_fast.inference import score_dataset
from altub_fast.models import build_model
from altub_fast.models.config import CFlowConfig, FastFlowConfig
from altub_fast.models.scoring import DEFAULT_IMAGE_SCORE, DEFAULT_SCORE, image_scores_from_maps
from altub_fast.train import load_model

from _helpers import randomise_base
from test_predict import make_checkpoint, save_png, stripes

LANDED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "landed_fastflow.pt")


def tiny(kind="fastflow", **kw):
    torch.manual_seed(0)
    if kind == "fastflow":
        return build_model("fastflow", "resnet18", pretrained=False, image_size=32, out_indices=(1, 2),
                           flow_steps=2, hidden_ratio=0.25, **kw)
    return build_model("cflow", "resnet18", pretrained=False, image_size=32, out_indices=(1, 2),
                       coupling_blocks=2, condition_dim=16, fiber_batch_size=64, **kw)


def calibrated(kind="fastflow"):
    m = tiny(kind).eval()
    randomise_base(m)
    m.calibrate([torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))])
    return m


PIXEL_DEFAULT = {"fastflow": "loglik", "cflow": "cflow"}


def test_the_defaults_are_the_worst_case_winners():
    assert (DEFAULT_SCORE, DEFAULT_IMAGE_SCORE) == ("loglik", "fastflow/topk:0.2")
    assert (FastFlowConfig.default_score, CFlowConfig.default_score) == ("loglik", "cflow")


@pytest.mark.parametrize("kind", ["fastflow", "cflow"])
def test_build_model_uses_the_defaults_and_stores_them(kind):
    m = tiny(kind)
    px = PIXEL_DEFAULT[kind]
    assert (m.scorer.mode, m.scorer.image_map, m.scorer.image_rule, m.scorer.topk_fraction) == (
        px, "fastflow", "topk", 0.2)
    assert (m.config["score"], m.config["image_score"], m.config["topk_fraction"]) == (px, "fastflow/topk", 0.2)
    assert m.scoring_rules() == {"score": px, "image_score": "fastflow/topk"}
    # what a checkpoint stores rebuilds the same rules
    m2 = build_model(**{k: v for k, v in m.config.items() if k != "backbone_weights_origin"})
    assert m2.scorer.image_score_rule == m.scorer.image_score_rule and m2.scorer.mode == px


@pytest.mark.parametrize("kind", ["fastflow", "cflow"])
def test_default_image_score_is_the_top_20_percent_of_the_fastflow_map(kind):
    m = calibrated(kind)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    maps, scores = m.anomaly_map(x)
    parts = m.score_parts(x)
    torch.testing.assert_close(maps, m.scorer.maps(parts, mode=PIXEL_DEFAULT[kind], size=(32, 32)))
    ff = m.scorer.maps(parts, mode="fastflow", size=(32, 32))
    torch.testing.assert_close(scores, image_scores_from_maps(ff, "topk", 0.2))
    assert not torch.allclose(scores, image_scores_from_maps(maps, "topk", 0.2))   # not the pixel map's


@pytest.mark.parametrize("kind", ["fastflow", "cflow"])
def test_default_rules_score_an_image_the_same_alone_in_a_batch_and_in_another_set(kind):
    m = calibrated(kind)
    g = torch.Generator().manual_seed(3)
    a = torch.randn(5, 3, 32, 32, generator=g)
    b = torch.cat([a[2:4], torch.randn(4, 3, 32, 32, generator=g) + 1.5])
    alone = [m.anomaly_map(a[i:i + 1]) for i in range(5)]
    batch_maps, batch_scores = m.anomaly_map(a)
    for i, (mp, sc) in enumerate(alone):
        torch.testing.assert_close(mp[0], batch_maps[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sc[0], batch_scores[i], rtol=1e-5, atol=1e-5)
    ra = score_dataset(m, TensorDataset(a), batch_size=2, progress=False)
    rb = score_dataset(m, TensorDataset(b), batch_size=4, progress=False)
    torch.testing.assert_close(ra["scores"][2:4], rb["scores"][:2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ra["maps"][2:4], rb["maps"][:2], rtol=1e-5, atol=1e-5)


def test_default_rules_constants_come_from_the_heldout_images_only():
    m = calibrated("fastflow")
    before = {k: v.clone() for k, v in m.scorer.state_dict().items()}
    m.anomaly_map(torch.randn(4, 3, 32, 32) + 3.0)   # scoring test images sets nothing
    score_dataset(m, TensorDataset(torch.randn(4, 3, 32, 32)), batch_size=2, progress=False)
    for k, v in m.scorer.state_dict().items():
        assert torch.equal(v, before[k]), k
    # and the constants are the held-out images': other held-out images give other constants
    m.calibrate([torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(9)) * 2])
    assert not torch.equal(m.scorer.loc, before["loc"])


def test_an_old_checkpoint_keeps_its_own_rules():
    m = load_model(LANDED)
    assert (m.scorer.mode, m.scorer.image_map, m.scorer.image_rule, m.scorer.topk_fraction) == (
        "fastflow", None, "topk", 0.01)
    x = torch.randn(2, 3, 64, 64)
    maps, scores = m.anomaly_map(x)
    torch.testing.assert_close(scores, image_scores_from_maps(maps, "topk", 0.01))


def test_eval_trains_and_reports_with_the_defaults(tmp_path, capsys):
    out = tmp_path / "o"
    code = eval_cli.main(["--synthetic", "--data-root", str(tmp_path / "d"), "--image-size", "64", "--epochs", "1",
                          "--backbone", "resnet18", "--no-pretrained", "--flow-steps", "1", "--out", str(out),
                          "--quiet", "--num-overlays", "0"])
    assert code == 0
    run = json.loads((out / "results.json").read_text())["runs"][0]
    assert run["rules"]["score"] == "loglik" and run["rules"]["image_score"] == "fastflow/topk"
    assert run["rules"]["image_score_text"] == "mean of the top 20 % of the fastflow map"
    assert "mean of the top 20 % of the fastflow map" in capsys.readouterr().out
    assert load_model(run["checkpoint"]).scorer.image_score_spec == "fastflow/topk"


def test_predict_and_export_use_the_checkpoints_rules(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ck")              # built with the defaults
    model = load_model(str(ckpt))
    assert (model.scorer.mode, model.scorer.image_score_spec) == ("loglik", "fastflow/topk")
    imgs = stripes(3, seed=4)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(imgs):
        save_png(folder / f"{i}.png", im.numpy())
    assert P.main(["--checkpoint", str(ckpt), str(folder), "--out", str(tmp_path / "p"), "--quiet",
                   "--max-overlays", "0"]) == 0
    got = {os.path.basename(r["path"]): r["score"] for r in
           json.loads((tmp_path / "p" / "predictions.json").read_text())["predictions"]}
    rc = E.main(["--checkpoint", str(ckpt), "--format", "torchscript", "--out", str(tmp_path / "model")])
    assert rc == E.EXIT_OK
    runner = E.ExportedModel(tmp_path / ("model" + E.SUFFIXES["torchscript"]))
    x01 = np.stack([np.asarray(Image.open(folder / f"{i}.png").convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
                    / 255 for i in range(3)])
    _, ex_scores = runner(x01)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    _, ref_scores = model.anomaly_map((torch.from_numpy(x01) - mean) / std)
    np.testing.assert_allclose(ex_scores, ref_scores.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose([got[f"{i}.png"] for i in range(3)], ref_scores.numpy(), rtol=1e-4, atol=1e-6)
