"""FastFlow and CFlow: structure, shapes, gradients, losses and maps against the formulas."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from altub_fast.models import (CFlow, FastFlow, FeatureExtractor, NonFiniteError, build_model,
                               positionalencoding2d)

from _helpers import randomise_base

LOG_2PI = math.log(2 * math.pi)


def seed(s=0):
    torch.manual_seed(s)
    np.random.seed(s)


def tiny_fastflow(altub=True, **kw):
    seed(0)
    kw.setdefault("flow_steps", 2)
    kw.setdefault("hidden_ratio", 0.25)
    return build_model("fastflow", "resnet18", pretrained=False, image_size=32, altub=altub,
                       out_indices=(1, 2), **kw)


def tiny_cflow(altub=True, **kw):
    seed(0)
    kw.setdefault("coupling_blocks", 2)
    kw.setdefault("fiber_batch_size", 16)
    kw.setdefault("condition_dim", 16)
    return build_model("cflow", "resnet18", pretrained=False, image_size=64, altub=altub, out_indices=(1, 2), **kw)


# ----------------------------------------------------------------------------- FastFlow
def test_fastflow_resnet18_defaults_structure():
    seed(0)
    m = FastFlow("resnet18", pretrained=False, image_size=64)
    assert m.flow_steps == 8 and m.conv3x3_only and m.hidden_ratio == 1.0
    assert m.feature_shapes == [(64, 16, 16), (128, 8, 8), (256, 4, 4)]
    assert [tuple(n.normalized_shape) for n in m.norms] == m.feature_shapes
    for flow, (c, _, _) in zip(m.flows, m.feature_shapes):
        assert len(flow) == 8
        for blk in flow:
            assert blk.clamp == 2.0 and blk.hard_permutation and blk.global_affine_type == "SOFTPLUS"
            conv1, relu, conv2 = blk.subnet
            assert conv1.kernel_size == (3, 3) and conv1.padding == (1, 1)
            assert conv1.out_channels == int((c - c // 2) * 1.0) and conv2.out_channels == 2 * (c // 2)
    assert all(b.learnable for b in m.bases)
    assert not any(p.requires_grad for p in m.backbone.parameters())
    assert all(not k.startswith("backbone.") for k in m.trainable_state_dict())


def test_fastflow_kernel_alternation_and_vit_defaults():
    seed(0)
    m = FastFlow("resnet18", pretrained=False, image_size=32, out_indices=(1,), flow_steps=4, conv3x3_only=False)
    ks = [blk.subnet[0].kernel_size[0] for blk in m.flows[0]]
    pads = [blk.subnet[2].padding[0] for blk in m.flows[0]]
    assert ks == [3, 1, 3, 1] and pads == [1, 0, 1, 0]
    v = FastFlow("deit_tiny_distilled_patch16_224", pretrained=False, image_size=64, vit_block_index=1, altub=False)
    assert v.flow_steps == 20 and v.hidden_ratio == 0.16 and not v.conv3x3_only
    assert isinstance(v.norms[0], nn.Identity) and v.feature_shapes == [(192, 4, 4)]
    assert v.flows[0][0].subnet[0].out_channels == int(96 * 0.16)
    maps, scores = v.anomaly_map(torch.randn(1, 3, 64, 64))
    assert maps.shape == (1, 64, 64) and scores.shape == (1,)


def test_fastflow_shapes_gradients_and_feature_input():
    m = tiny_fastflow()
    x = torch.randn(2, 3, 32, 32)
    out = m(x)
    assert [tuple(z.shape) for z in out.z] == [(2, 64, 8, 8), (2, 128, 4, 4)]
    assert [tuple(t.shape) for t in out.logp_pixel] == [(2, 8, 8), (2, 4, 4)]
    assert all(t.dtype == torch.float32 for t in out.log_jac_det + out.logp_sample)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.flow_parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.base_parameters())
    assert all(p.grad is None for p in m.backbone.parameters())
    # images and precomputed features give the same numbers
    feats = m.extract_features(x)
    assert torch.equal(m(feats).loss, out.loss)
    with pytest.raises(ValueError, match="built for 32x32"):
        m(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="feature map 1"):
        m([feats[0], feats[0]])


def test_fastflow_baseline_loss_and_altub_nll():
    m0 = tiny_fastflow(altub=False)
    assert m0.base_parameters() == []
    feats = m0.extract_features(torch.randn(3, 3, 32, 32))
    out = m0(feats)
    # the baseline: sum over scales of mean over batch of [0.5 * sum z^2 - log|det J|]
    baseline = sum((0.5 * z.pow(2).sum((1, 2, 3)) - j).mean() for z, j in zip(out.z, out.log_jac_det))
    torch.testing.assert_close(out.loss, baseline, rtol=1e-6, atol=0)
    # AltUB: sum over (C, H, W) of [0.5 u^2 + log sigma] - log|det J|, u = (z - mu) / sigma
    m1 = tiny_fastflow(altub=True)
    randomise_base(m1)
    out = m1(feats)
    nll = 0
    for z, j, b in zip(out.z, out.log_jac_det, m1.bases):
        mu, ls = b.mu.view(1, -1, 1, 1), b.log_sigma.view(1, -1, 1, 1)
        u = (z - mu) * torch.exp(-ls)
        nll = nll + ((0.5 * u.pow(2) + ls).sum((1, 2, 3)) - j).mean()
    torch.testing.assert_close(out.loss, nll, rtol=1e-6, atol=0)
    # base-only loss has the same value, and gradients only for the base
    loss_b, _ = m1.base_only_loss(feats)
    torch.testing.assert_close(loss_b, out.loss, rtol=1e-6, atol=0)
    loss_b.backward()
    assert all(p.grad is None for p in m1.flow_parameters())
    assert all(p.grad is not None for p in m1.base_parameters())


def test_fastflow_anomaly_map_formula():
    """score="fastflow", image_score="max": the paper's map and image score (the defaults are tested in
    tests/test_scoring.py)."""
    m = tiny_fastflow(score="fastflow", image_score="max")
    randomise_base(m)
    x = torch.randn(2, 3, 32, 32)
    maps, scores = m.anomaly_map(x)
    assert maps.shape == (2, 32, 32) and maps.dtype == torch.float32 and scores.shape == (2,)
    assert torch.equal(scores, maps.flatten(1).amax(1))
    out = m(x)
    ref = []
    for z, b in zip(out.z, m.bases):
        mu, ls = b.mu.view(1, -1, 1, 1), b.log_sigma.view(1, -1, 1, 1)
        logp = (-0.5 * ((z - mu) * torch.exp(-ls)) ** 2 - ls).mean(1, keepdim=True)  # no constant
        ref.append(F.interpolate(-torch.exp(logp), size=(32, 32), mode="bilinear", align_corners=False))
    ref = torch.stack(ref, -1).mean(-1).squeeze(1)
    torch.testing.assert_close(maps, ref, rtol=1e-5, atol=1e-6)
    # baseline map: -exp(-0.5 mean_c z^2)
    m0 = tiny_fastflow(altub=False, score="fastflow")
    maps0, _ = m0.anomaly_map(x)
    out0 = m0(x)
    ref0 = torch.stack([F.interpolate(-torch.exp(-0.5 * z.pow(2).mean(1, keepdim=True)), size=(32, 32),
                                      mode="bilinear", align_corners=False) for z in out0.z], -1).mean(-1).squeeze(1)
    torch.testing.assert_close(maps0, ref0, rtol=1e-5, atol=1e-6)


def test_fastflow_nonfinite_is_an_error():
    m = tiny_fastflow()
    feats = m.extract_features(torch.randn(1, 3, 32, 32))
    feats[1][0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="scale 1"):
        m.anomaly_map(feats)
    with torch.no_grad():
        m.bases[0].log_sigma[3] = float("inf")
    assert "base of scale 0" in m.diagnose_nonfinite(m.extract_features(torch.randn(1, 3, 32, 32)))


# ----------------------------------------------------------------------------- CFlow
def test_positional_encoding_matches_cflow_ad():
    D, H, W = 16, 3, 5
    P = positionalencoding2d(D, H, W)
    assert P.shape == (D, H, W)
    half = D // 2
    for i in range(0, half, 2):
        freq = math.exp(-i * math.log(1e4) / half)
        for y in range(H):
            for x in range(W):
                assert P[i, y, x] == pytest.approx(math.sin(x * freq), abs=1e-6)       # column first
                assert P[i + 1, y, x] == pytest.approx(math.cos(x * freq), abs=1e-6)
                assert P[half + i, y, x] == pytest.approx(math.sin(y * freq), abs=1e-6)  # then row
                assert P[half + i + 1, y, x] == pytest.approx(math.cos(y * freq), abs=1e-6)
    with pytest.raises(ValueError):
        positionalencoding2d(6, 2, 2)


def test_cflow_structure_default():
    seed(0)
    m = CFlow("resnet18", pretrained=False, image_size=64)
    assert m.channels == [128, 256, 512] and m.backbone.strides == [8, 16, 32]
    blk = m.decoders[2][0]
    assert len(m.decoders[2]) == 8 and blk.clamp == 1.9 and blk.conditional
    lin1, _, lin2 = blk.subnet
    assert (lin1.in_features, lin1.out_features) == (256 + 128, 2 * (256 + 128))
    assert lin2.out_features == 2 * 256
    assert m.fiber_batch_size == 256


def test_cflow_units_loss_and_gradients():
    m = tiny_cflow(altub=False)
    feats = m.extract_features(torch.randn(2, 3, 64, 64))
    shapes = [tuple(f.shape) for f in feats]
    assert shapes == [(2, 64, 16, 16), (2, 128, 8, 8)]
    units = list(m.training_units(feats, torch.Generator().manual_seed(0)))
    assert len(units) == (2 * 256) // 16 + (2 * 64) // 16
    layer, e, c = units[-1]
    assert layer == 1 and e.shape == (16, 128) and c.shape == (16, 16)
    # every fiber of a layer appears once per pass (full batches here)
    allfib = torch.cat([u[1] for u in units if u[0] == 1])
    ref = feats[1].permute(0, 2, 3, 1).reshape(-1, 128)
    assert allfib.shape == ref.shape
    assert torch.equal(torch.unique(allfib, dim=0), torch.unique(ref, dim=0))
    loss, zs = m.step_loss(units[-1])
    z, ljd = m.decoders[1](e, [c])
    logp = -128 / 2 * LOG_2PI - 0.5 * z.pow(2).sum(1) + ljd
    torch.testing.assert_close(loss, -F.logsigmoid(logp / 128).mean(), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in m.decoders[1].parameters() if p.requires_grad)
    assert all(p.grad is None for p in m.decoders[0].parameters())
    with pytest.raises(ValueError, match="fiber_batch_size"):
        list(m.training_units([f[:, :, :1, :1] for f in feats]))


def test_cflow_altub_loss_and_base_only():
    m = tiny_cflow(altub=True)
    randomise_base(m)
    feats = m.extract_features(torch.randn(1, 3, 64, 64))
    unit = next(iter(m.training_units(feats, torch.Generator().manual_seed(1))))
    layer, e, c = unit
    loss, _ = m.step_loss(unit)
    z, ljd = m.decoders[layer](e, [c])
    b = m.bases[layer]
    lp = (-0.5 * ((z - b.mu) * torch.exp(-b.log_sigma)) ** 2 - b.log_sigma - 0.5 * LOG_2PI).sum(1) + ljd
    C = e.shape[1]
    torch.testing.assert_close(loss, -F.logsigmoid(lp / C).mean(), rtol=1e-5, atol=1e-6)
    lb, _ = m.base_only_loss(unit)
    torch.testing.assert_close(lb, loss, rtol=1e-5, atol=1e-6)
    lb.backward()
    assert all(p.grad is None for p in m.flow_parameters())
    assert b.mu.grad is not None and b.log_sigma.grad is not None


def test_cflow_log_likelihoods_are_full_per_dimension():
    """CFlow's per-position log-likelihood is the fiber's full log p / C (base + log-det); its
    "cflow" map (constants from held-out images) is tested in tests/test_scoring.py."""
    m = tiny_cflow()
    randomise_base(m, 0.1)
    x = torch.randn(2, 3, 64, 64)
    lls = m.log_likelihoods(x)
    assert [tuple(t.shape) for t in lls] == [(2, 16, 16), (2, 8, 8)]
    feats = m.extract_features(x)
    for layer, (ll, f) in enumerate(zip(lls, feats)):
        e, c = m.fibers(f)
        out = m.fiber_loglik(layer, e, c)
        torch.testing.assert_close(ll, (out.log_prob / f.shape[1]).reshape(ll.shape))


def test_build_model_factory():
    m = build_model("cflow", "efficientnet_lite0", image_size=64, coupling_blocks=1, condition_dim=8)
    assert m.channels == [40, 112, 320] and m.backbone.weights_origin.startswith("package:")
    assert m.config["name"] == "cflow" and m.config["backbone"] == "efficientnet_lite0"
    with pytest.raises(ValueError, match="unknown model"):
        build_model("padim")
    with pytest.raises(ValueError, match="transformers"):
        CFlow("deit_tiny_distilled_patch16_224", pretrained=False, image_size=64)


class _Identity3(FeatureExtractor):
    def __init__(self):
        super().__init__("identity", [3], [1], "random")

    def forward(self, images):
        return [images]


def test_custom_feature_extractor():
    seed(0)
    m = FastFlow(_Identity3(), image_size=8, flow_steps=2, hidden_ratio=2.0)
    out = m(torch.randn(2, 3, 8, 8))
    assert out.z[0].shape == (2, 3, 8, 8) and torch.isfinite(out.loss)


def test_fastflow_with_freias_block_matches_ours():
    """block="freia" builds the same model from FrEIA 0.2's blocks: same seed, same numbers."""
    pytest.importorskip("FrEIA")
    import numpy as np
    from altub_fast.models import FastFlow
    outs = []
    for block in ("altub", "freia"):
        np.random.seed(0)
        torch.manual_seed(0)
        m = FastFlow("resnet18", pretrained=False, image_size=64, flow_steps=2, block=block,
                     score="fastflow").eval()
        if block == "altub":
            sd = m.state_dict()
        else:
            m.load_state_dict(sd)
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            out = m(x)
            outs.append((out.loss, m.anomaly_map(x)[0]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="block must be one of"):
        FastFlow("resnet18", pretrained=False, image_size=64, block="nope")
