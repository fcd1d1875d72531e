"""Score modes, held-out calibration, image scores and the exact NLL (altub_fast.models.scoring)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from altub_fast.models import build_model
from altub_fast.models.backbones import build_backbone
from altub_fast.models.scoring import (SCORE_MODES, MapScorer, ScaleLogLik, image_scores_from_maps,
                                       parse_image_rule, parse_image_score)

from _helpers import randomise_base

LOG_2PI = math.log(2 * math.pi)


def seed(s=0):
    torch.manual_seed(s)
    np.random.seed(s)


def tiny_fastflow(**kw):
    seed(0)
    kw.setdefault("flow_steps", 2)
    kw.setdefault("hidden_ratio", 0.25)
    return build_model("fastflow", "resnet18", pretrained=False, image_size=32, out_indices=(1, 2), **kw)


def tiny_cflow(**kw):
    seed(0)
    return build_model("cflow", "resnet18", pretrained=False, image_size=32, out_indices=(1, 2),
                       coupling_blocks=2, fiber_batch_size=16, condition_dim=16, **kw)


def perturb(model, scale=0.3):
    """Random base, random LayerNorm weights and non-trivial flow weights (not the init's identity)."""
    g = randomise_base(model, scale)
    with torch.no_grad():
        for n in getattr(model, "norms", []):
            if getattr(n, "weight", None) is not None:
                n.weight.mul_(torch.exp(scale * torch.randn(n.weight.shape, generator=g)))
        for name, p in model.named_parameters():
            if "subnet" in name and p.dim() > 1:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


MODELS = {"fastflow": tiny_fastflow, "cflow": tiny_cflow}


# ----------------------------------------------------------------------------- the exact log-likelihood
def test_fastflow_full_loglik_is_the_exact_density_per_pixel():
    m = tiny_fastflow()
    perturb(m)
    feats = m.extract_features(torch.randn(2, 3, 32, 32))
    parts = m.score_parts(feats)
    out = m(feats)
    for i, (p, z, lps, ljd) in enumerate(zip(parts, out.z, out.logp_sample, out.log_jac_det)):
        C = z.shape[1]
        ln = torch.log(m.norms[i].weight.abs()).sum(0)
        # summed over pixels, the per-pixel full log-likelihood is the per-sample log p(x)
        torch.testing.assert_close((p.ll_full * C).flatten(1).sum(1), lps + ljd + ln.sum(), rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(p.ll_base * C, out.logp_pixel[i])
    # nll_per_dim: every log-det and the constant, per dimension
    dims = sum(z[0].numel() for z in out.z)
    expect = -sum(lps + ljd + torch.log(n.weight.abs()).sum() for lps, ljd, n in
                  zip(out.logp_sample, out.log_jac_det, m.norms)) / dims
    torch.testing.assert_close(m.nll_per_dim(feats), expect, rtol=1e-5, atol=1e-5)


def test_fastflow_loss_counts_the_layernorm_logdet_unless_published_loss():
    feats = tiny_fastflow().extract_features(torch.randn(2, 3, 32, 32))
    m1, m0 = tiny_fastflow(), tiny_fastflow(norm_logdet=False)
    for m in (m1, m0):
        with torch.no_grad():
            for n in m.norms:
                n.weight.mul_(0.5)
    ln = sum(torch.log(n.weight.abs()).sum() for n in m1.norms)
    assert float(ln.detach()) < 0
    torch.testing.assert_close(m1(feats).loss, m0(feats).loss - ln, rtol=1e-5, atol=1e-3)
    # shrinking the LayerNorm no longer pays: the exact loss rises with the weights halved once more
    base = float(m1(feats).loss)
    with torch.no_grad():
        for n in m1.norms:
            n.weight.mul_(0.01)
    assert float(m1(feats).loss) > base
    assert m1.config["norm_logdet"] is True and m0.config["norm_logdet"] is False


def test_cflow_nll_per_dim():
    m = tiny_cflow()
    perturb(m, 0.1)
    x = torch.randn(2, 3, 32, 32)
    feats = m.extract_features(x)
    total, dims = 0, 0
    for layer, f in enumerate(feats):
        e, c = m.fibers(f)
        total = total - m.fiber_loglik(layer, e, c).log_prob.reshape(2, -1).sum(1)
        dims += f[0].numel()
    torch.testing.assert_close(m.nll_per_dim(feats), total / dims, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the modes by hand
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_mode_matches_its_formula_after_calibration(name):
    m = MODELS[name]()
    perturb(m, 0.1)
    held = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    test = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert not m.calibrated
    scores_ho = m.calibrate([held[:4], held[4:]])
    assert m.calibrated and scores_ho.shape == (6,)
    ho = m.score_parts(held)
    te = m.score_parts(test)
    # loglik: per scale (mean - ll) / std over held-out pixels, upsampled, mean over scales
    ref = []
    for h, t in zip(ho, te):
        mu, sd = h.ll_full.double().mean(), h.ll_full.double().std(unbiased=False)
        ref.append(F.interpolate(((mu - t.ll_full.double()) / sd).unsqueeze(1), size=(32, 32), mode="bilinear",
                                 align_corners=False))
    ref = torch.stack(ref, -1).mean(-1).squeeze(1).float()
    torch.testing.assert_close(m.scorer.maps(te, mode="loglik"), ref, rtol=1e-4, atol=1e-4)
    # cflow: exp(ll - held-out max) per layer, align_corners=True, summed; T - sum, T = held-out max of the sum
    def summed(parts):
        return sum(F.interpolate(torch.exp(p.ll_full.double() - h.ll_full.double().max()).unsqueeze(1),
                                 size=(32, 32), mode="bilinear", align_corners=True).squeeze(1)
                   for p, h in zip(parts, ho))
    T = summed(ho).max()
    torch.testing.assert_close(m.scorer.maps(te, mode="cflow"), (T - summed(te)).float(), rtol=1e-4, atol=1e-4)
    # fastflow: -exp(mean over channels of log p(z) without the constant), no calibration involved
    ff = torch.stack([F.interpolate(-torch.exp(t.ll_base + 0.5 * LOG_2PI).unsqueeze(1), size=(32, 32),
                                    mode="bilinear", align_corners=False) for t in te], -1).mean(-1).squeeze(1)
    torch.testing.assert_close(m.scorer.maps(te, mode="fastflow"), ff, rtol=1e-5, atol=1e-6)
    # the held-out scores returned are those of the model's mode on those images
    torch.testing.assert_close(scores_ho, m.anomaly_map(held)[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("mode", SCORE_MODES)
def test_an_images_score_does_not_depend_on_its_batch_or_test_set(name, mode):
    m = MODELS[name](score=mode, image_score="topk")
    perturb(m, 0.1)
    m.calibrate([torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))])
    g = torch.Generator().manual_seed(3)
    a, others = torch.randn(1, 3, 32, 32, generator=g), torch.randn(5, 3, 32, 32, generator=g) * 3
    alone_map, alone = m.anomaly_map(a)
    in_batch_map, in_batch = m.anomaly_map(torch.cat([others[:2], a, others[2:]]))
    torch.testing.assert_close(in_batch_map[2:3], alone_map, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(in_batch[2:3], alone, rtol=1e-5, atol=1e-5)
    # through predict() over two different "test sets" holding the image
    from torch.utils.data import TensorDataset
    from altub_fast.train import predict
    r1 = predict(m, TensorDataset(torch.cat([a, others[:2]])), batch_size=2, progress=False)
    r2 = predict(m, TensorDataset(torch.cat([others[2:] * 10, a])), batch_size=3, progress=False)
    torch.testing.assert_close(r1["scores"][0], r2["scores"][-1], rtol=1e-5, atol=1e-5)


def test_scoring_never_changes_the_calibration_constants():
    """No normalisation constant comes from test data: only calibrate() (held-out images) sets them."""
    m = tiny_fastflow()
    perturb(m)
    m.calibrate([torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))])
    before = {k: v.clone() for k, v in m.scorer.state_dict().items()}
    g = torch.Generator().manual_seed(4)
    set_a = torch.randn(4, 3, 32, 32, generator=g)
    s_a = m.anomaly_map(set_a)[1]
    m.anomaly_map(torch.randn(8, 3, 32, 32, generator=g) * 5)        # another test set
    assert all(torch.equal(before[k], v) for k, v in m.scorer.state_dict().items())
    torch.testing.assert_close(m.anomaly_map(set_a)[1], s_a)


def test_train_then_change_the_test_set_gives_the_same_scores(tmp_path):
    """End to end through the trainer: train, calibrate on held-out normals, score two test sets."""
    from torch.utils.data import TensorDataset
    from altub_fast.train import AltUBTrainer, predict
    m = tiny_fastflow()
    g = torch.Generator().manual_seed(0)
    train = torch.randn(8, 3, 32, 32, generator=g)
    AltUBTrainer(m, TensorDataset(train), epochs=2, batch_size=4, progress=False, seed=0).fit()
    m.calibrate([torch.randn(4, 3, 32, 32, generator=g)])
    test_a = torch.randn(6, 3, 32, 32, generator=g)
    test_b = torch.cat([test_a[3:], torch.randn(5, 3, 32, 32, generator=g) + 2])
    ra = predict(m, TensorDataset(test_a), batch_size=4, progress=False)
    rb = predict(m, TensorDataset(test_b), batch_size=4, progress=False)
    torch.testing.assert_close(ra["scores"][3:], rb["scores"][:3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ra["maps"][3:], rb["maps"][:3], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- image scores, state, errors
def test_image_score_rules():
    maps = torch.arange(2 * 10 * 10, dtype=torch.float32).reshape(2, 10, 10)
    torch.testing.assert_close(image_scores_from_maps(maps, "max"), maps.flatten(1).amax(1))
    # top 5 % of 100 pixels = the top 5
    torch.testing.assert_close(image_scores_from_maps(maps, "topk", 0.05), maps.flatten(1)[:, -5:].mean(1))
    assert parse_image_score("topk:0.02") == ("topk", 0.02)
    assert parse_image_score("topk") == ("topk", 0.01)     # a bare "topk": the top 1 %
    assert parse_image_rule(None) == ("fastflow", "topk", 0.2)   # the default (issue 19, docs/results.md)
    assert parse_image_rule("loglik/max") == ("loglik", "max", 0.01)
    assert parse_image_rule("topk:0.05").map is None            # no map named: the pixel map's
    with pytest.raises(ValueError, match="map of image_score"):
        parse_image_rule("padim/topk")
    assert parse_image_score("max") == ("max", 0.01)
    for bad in ("mean", "topk:x", "topk:0"):
        with pytest.raises(ValueError, match="image_score|fraction"):
            parse_image_score(bad)
    with pytest.raises(ValueError, match="score must be one of"):
        tiny_fastflow(score="padim")


def test_calibration_is_in_the_state_dict_and_old_checkpoints_load():
    m = tiny_fastflow()
    perturb(m)
    m.calibrate([torch.randn(3, 3, 32, 32)])
    sd = m.state_dict()
    assert {"scorer.loc", "scorer.scale", "scorer.cflow_max", "scorer.cflow_total", "scorer.calibrated"} <= set(sd)
    m2 = tiny_fastflow()
    m2.load_state_dict(sd)
    assert m2.calibrated
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(m2.anomaly_map(x)[0], m.anomaly_map(x)[0])
    # a checkpoint written before the scorer existed: loads, uncalibrated (defaults)
    old = {k: v for k, v in sd.items() if not k.startswith("scorer.")}
    m3 = tiny_fastflow()
    m3.load_state_dict(old)
    assert not m3.calibrated and torch.equal(m3.scorer.scale, torch.ones(2))


def test_freia_blocks_give_no_pixel_logdet_and_say_so():
    pytest.importorskip("FrEIA")
    m = tiny_fastflow(block="freia", score="loglik")
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="per-pixel log-determinant.*score='fastflow'"):
        m.anomaly_map(x)
    assert m.scorer.maps(m.score_parts(x), mode="fastflow").shape == (1, 32, 32)


def test_scorer_checks_its_inputs():
    s = MapScorer(2, (8, 8))
    with pytest.raises(ValueError, match="expected 2 scales"):
        s.maps([ScaleLogLik(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4))])
    with pytest.raises(ValueError, match="NaN"):
        s.fit([ScaleLogLik(torch.full((1, 4, 4), float("nan")), torch.zeros(1, 4, 4))] * 2)


def test_efficientnet_lite0_feature_blocks():
    bb = build_backbone("efficientnet_lite0", pretrained=False, feature_blocks=(4, 10, 15))
    assert bb.channels == [40, 112, 320] and bb.strides == [8, 16, 32]
    feats = bb(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(40, 8, 8), (112, 4, 4), (320, 2, 2)]
    assert bb.feature_shapes(64) == [(40, 8, 8), (112, 4, 4), (320, 2, 2)]
    every = build_backbone("efficientnet_lite0", pretrained=False, feature_blocks=range(16))
    shapes = [tuple(f.shape[1:]) for f in every(torch.randn(1, 3, 64, 64))]
    assert shapes == every.feature_shapes(64)
    m = build_model("fastflow", "efficientnet_lite0", pretrained=False, image_size=64, flow_steps=1,
                    feature_blocks=(4, 10))
    assert m.feature_shapes == [(40, 8, 8), (112, 4, 4)] and m.config["feature_blocks"] == [4, 10]
    with pytest.raises(ValueError, match="block indices in 0..15"):
        build_backbone("efficientnet_lite0", pretrained=False, feature_blocks=(4, 16))
    with pytest.raises(ValueError, match="feature_blocks is for efficientnet_lite0"):
        build_backbone("resnet18", pretrained=False, feature_blocks=(1,))
