"""FastFlow and CFLOW-AD implement the trainer's protocol (altub_fast.models.protocol.TrainableFlow)
completely, and each member does what the protocol says."""
import numpy as np
import pytest
import torch

from altub_fast.models import TrainableFlow, build_model, config_dict

from _helpers import randomise_base


def tiny(name):
    torch.manual_seed(0)
    np.random.seed(0)
    if name == "fastflow":
        m = build_model("fastflow", "resnet18", pretrained=False, image_size=32, out_indices=(1, 2), flow_steps=2,
                        hidden_ratio=0.25)
    else:
        m = build_model("cflow", "resnet18", pretrained=False, image_size=32, out_indices=(1, 2), coupling_blocks=2,
                        condition_dim=8, fiber_batch_size=16)
    randomise_base(m, 0.1)
    return m


def images(n=2, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["fastflow", "cflow"])
def test_models_are_trainable_flows(name):
    m = tiny(name)
    assert isinstance(m, TrainableFlow)
    assert type(m).model_name == name == m.config["name"]
    assert m.altub is True and isinstance(m.default_lr, float) and isinstance(m.default_weight_decay, float)
    assert m.has_unused_parameters is (name == "cflow")
    assert config_dict(m.config) == m.config.to_dict() == dict(m.config)
    assert m.num_scales == 2 == len(m.bases)
    # the defaults (issue 19): FastFlow's pixel map loglik, CFLOW-AD's its own
    assert m.scoring_rules() == {"score": "loglik" if name == "fastflow" else "cflow", "image_score": "fastflow/topk"}
    # the two parameter groups are disjoint and together are every trainable parameter
    flow, base = m.flow_parameters(), m.base_parameters()
    assert flow and base and not {id(p) for p in flow} & {id(p) for p in base}
    assert {id(p) for p in flow + base} == {id(p) for p in m.parameters() if p.requires_grad}
    assert not any(p.requires_grad for p in m.backbone.parameters())
    baseline = build_model(name, "resnet18", pretrained=False, image_size=32, out_indices=(1, 2), altub=False)
    assert baseline.altub is False and baseline.base_parameters() == []


def test_fastflow_units_and_losses():
    m = tiny("fastflow")
    feats = m.extract_features(images())
    assert [tuple(f.shape) for f in feats] == [(2, *s) for s in m.feature_shapes]
    units = list(m.training_units(feats))
    assert len(units) == 1 and units[0] is feats          # one update per image batch
    loss, zs = m.step_loss(units[0])
    assert loss.dim() == 0 and [tuple(z.shape) for z in zs] == [tuple(f.shape) for f in feats]
    loss.backward()
    assert all(p.grad is not None for p in m.flow_parameters() + m.base_parameters())
    m.zero_grad(set_to_none=True)
    base_loss, base_zs = m.base_only_loss(units[0])
    assert base_loss.dim() == 0 and [tuple(z.shape) for z in base_zs] == [tuple(f.shape) for f in feats]
    base_loss.backward()
    assert all(p.grad is None for p in m.flow_parameters())
    assert all(p.grad is not None for p in m.base_parameters())
    # the base-only loss leaves out the LayerNorm's log-det (constant in mu, sigma), the ordinary one counts it
    ln = sum(m.norm_logdet_pixel(i).sum() for i in range(m.num_scales))
    torch.testing.assert_close(base_loss, loss.detach() + ln.detach(), rtol=1e-5, atol=1e-4)


def test_cflow_units_and_losses():
    m = tiny("cflow")
    feats = m.extract_features(images())
    units = list(m.training_units(feats, torch.Generator().manual_seed(0)))
    per_layer = [(2 * f.shape[2] * f.shape[3]) // 16 for f in feats]
    assert [sum(u[0] == k for u in units) for k in range(2)] == per_layer
    layer, e, c = units[-1]
    assert layer == 1 and e.shape == (16, feats[1].shape[1]) and c.shape == (16, 8)
    loss, zs = m.step_loss(units[-1])
    assert loss.dim() == 0 and zs[0] is None and tuple(zs[1].shape) == tuple(e.shape)
    base_loss, base_zs = m.base_only_loss(units[-1])
    assert base_loss.dim() == 0 and base_zs[0] is None and tuple(base_zs[1].shape) == tuple(e.shape)
    torch.testing.assert_close(base_loss, loss.detach(), rtol=1e-5, atol=1e-6)
    base_loss.backward()
    assert all(p.grad is None for p in m.flow_parameters())
    assert m.bases[1].mu.grad is not None and m.bases[0].mu.grad is None


@pytest.mark.parametrize("name", ["fastflow", "cflow"])
def test_nll_diagnosis_and_calibration(name):
    m = tiny(name)
    x = images(3)
    feats = m.extract_features(x)
    nll = m.nll_per_dim(feats)
    assert nll.shape == (3,) and nll.dtype == torch.float32 and torch.isfinite(nll).all()
    torch.testing.assert_close(m.nll_per_dim(x), nll)           # images or features, the same
    unit = next(iter(m.training_units(feats, torch.Generator().manual_seed(0))))
    assert "finite" in m.diagnose_nonfinite(unit)
    bad = [f.clone() for f in feats]
    bad[0][0, 0, 0, 0] = float("nan")
    bad_unit = next(iter(m.training_units(bad, torch.Generator().manual_seed(0))))
    if name == "fastflow":
        assert "backbone features of scale 0 hold NaN/Inf" in m.diagnose_nonfinite(bad_unit)
    assert not m.calibrated
    scores = m.calibrate([feats, m.extract_features(images(2, seed=2))])
    assert m.calibrated and scores.shape == (5,) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    torch.testing.assert_close(scores[:3], m.anomaly_map(x)[1])
    with pytest.raises(ValueError, match="at least one batch"):
        m.calibrate([])



def test_every_fastflow_nll_path_goes_through_scale_loglik(monkeypatch):
    m = tiny("fastflow")
    feats = m.extract_features(images())
    calls = []
    real = m.scale_loglik
    monkeypatch.setattr(m, "scale_loglik", lambda i, *a, **k: calls.append(i) or real(i, *a, **k))
    for path in (m.forward, m.base_only_loss, m.score_parts, m.nll_per_dim):
        calls.clear()
        path(feats)
        assert sorted(set(calls)) == [0, 1], path.__name__
    # the per-pixel and the per-image log-likelihoods agree: summed over pixels (times C), the full
    # per-pixel map gives each image's NLL
    parts = m.score_parts(feats)
    dims = sum(f[0].numel() for f in feats)
    total = sum((p.ll_full * f.shape[1]).flatten(1).sum(1) for p, f in zip(parts, feats))
    torch.testing.assert_close(-total / dims, m.nll_per_dim(feats), rtol=1e-4, atol=1e-4)
