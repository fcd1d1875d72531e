"""The trainer: loss goes down, the AltUB schedule, resume equality, non-finite losses, predict."""
import copy
import json
import logging
import math
import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from altub_fast.models import NonFiniteError, build_model
from altub_fast.train import (AltUBSchedule, AltUBTrainer, NonFiniteLossError, load_checkpoint_file, load_model,
                              predict, train)
from _train_helpers import OPTS, DictSet, cflow, fastflow, make_images, params


# ----------------------------------------------------------------------------- training works
def test_fastflow_training_lowers_loss_and_logs(tmp_path):
    data = DictSet(make_images())
    m = fastflow()
    jsonl = str(tmp_path / "log.jsonl")
    hist = train(m, data, epochs=4, k=3, warmup=0, log_jsonl=jsonl, **OPTS)
    assert len(hist) == 4 and hist[-1]["loss"] < hist[0]["loss"]
    rec = hist[-1]
    assert rec["updates"] == 3 and rec["cached_features"] and rec["skipped_updates"] == 0
    assert sum(r["base_only_updates"] for r in hist) == 4  # updates 3, 6, 9, 12
    for sc in rec["scales"]:
        for key in ("mu_mean", "mu_min", "mu_max", "sigma_mean", "sigma_min", "sigma_max", "z_mean_abs", "z_std_mean"):
            assert math.isfinite(sc[key])
    # the base has moved away from N(0, I)
    assert any(abs(sc["mu_max"]) > 0 or sc["sigma_min"] != 1.0 for sc in rec["scales"])
    lines = [json.loads(line) for line in open(jsonl)]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]


def test_cflow_training_lowers_loss():
    data = TensorDataset(make_images(16))
    m = cflow()
    hist = train(m, data, epochs=3, k=4, warmup=2, **OPTS)
    # 2 batches/epoch, per batch 8*64/32 + 8*16/32 = 20 fiber updates
    assert hist[0]["updates"] == 40
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert hist[0]["base_only_updates"] == 10   # 4, 8, ..., 40


def test_cached_equals_uncached():
    data = TensorDataset(make_images(16))
    a, b = fastflow(), fastflow()
    AltUBTrainer(a, data, epochs=2, cache_features=True, **OPTS).fit()
    AltUBTrainer(b, data, epochs=2, cache_features=False, **OPTS).fit()
    pa, pb = params(a), params(b)
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=1e-5)


def test_handed_in_feature_cache_equals_built_cache():
    data = TensorDataset(make_images())
    a, b = fastflow(seed=3), fastflow(seed=3)
    ta = AltUBTrainer(a, data, epochs=2, **OPTS)
    feats = [f.clone() for f in ta.build_cache()]
    ta.fit()
    tb = AltUBTrainer(b, data, epochs=2, **OPTS)
    tb.set_feature_cache(feats)
    tb.fit()
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    with pytest.raises(ValueError, match="N = 24"):
        tb.set_feature_cache([f[:5] for f in feats])
    with pytest.raises(ValueError, match="scales"):
        tb.set_feature_cache(feats[:1])


def test_dataloader_input_uses_its_batch_size():
    loader = DataLoader(TensorDataset(make_images(12)), batch_size=4, shuffle=True)
    tr = AltUBTrainer(fastflow(), loader, epochs=1, progress=False)
    assert tr.batch_size == 4 and len(tr.epoch_batches(0)) == 3


# ----------------------------------------------------------------------------- the schedule
def test_schedule_rule():
    s = AltUBSchedule(k=5, warmup=20)
    assert [u for u in range(1, 41) if s.is_base_only(u)] == [25, 30, 35, 40]
    assert not any(AltUBSchedule(k=0).is_base_only(u) for u in range(1, 50))
    with pytest.raises(ValueError):
        AltUBSchedule(unit="batch")


def _unit(trainer, data):
    feats = trainer.model.extract_features(data.tensors[0][:8])
    return next(iter(trainer.model.training_units(feats)))


def test_base_only_update_touches_only_the_base():
    data = TensorDataset(make_images(8))
    tr = AltUBTrainer(fastflow(), data, epochs=1, lr=1e-3, r=5.0, base_clip_value=1e-3, **OPTS)
    # the base never gets weight decay: its own group (wd 0) in Adam, and a wd-0 base optimiser
    groups = {g["name"]: g for g in tr.optimizer.param_groups}
    assert groups["flow"]["weight_decay"] == 1e-5 and groups["base"]["weight_decay"] == 0.0
    base_ids = {id(p) for p in tr.model.base_parameters()}
    assert base_ids == {id(p) for p in groups["base"]["params"]}
    assert not base_ids & {id(p) for p in groups["flow"]["params"]}
    assert isinstance(tr.base_optimizer, torch.optim.SGD)
    assert all(g["weight_decay"] == 0.0 for g in tr.base_optimizer.param_groups)

    unit = _unit(tr, data)
    tr.update(unit, base_only=False)
    tr.update(unit, base_only=False)          # Adam has state now
    flow_before = [p.detach().clone() for p in tr.model.flow_parameters()]
    base_before = [p.detach().clone() for p in tr.model.base_parameters()]
    opt_before = copy.deepcopy(tr.optimizer.state_dict())
    out = tr.update(unit, base_only=True)
    assert out["base_only"] and not out["skipped"]
    assert all(torch.equal(a, b) for a, b in zip(flow_before, tr.model.flow_parameters()))
    opt_after = tr.optimizer.state_dict()
    for k, st in opt_before["state"].items():
        for name, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(opt_after["state"][k][name]))
    deltas = [(p.detach() - b) for p, b in zip(tr.model.base_parameters(), base_before)]
    assert any(d.abs().max() > 0 for d in deltas)
    # SGD with lr = r * flow lr on gradients clipped by value
    assert tr.base_optimizer.param_groups[0]["lr"] == pytest.approx(5e-3)
    assert max(float(d.abs().max()) for d in deltas) <= 5e-3 * 1e-3 * (1 + 1e-5)
    assert all(p.grad is None for p in tr.model.flow_parameters())
    # an ordinary update moves the flow (and the base, through Adam)
    tr.update(unit, base_only=False)
    assert any(not torch.equal(a, b) for a, b in zip(flow_before, tr.model.flow_parameters()))


def test_schedule_counts_in_training():
    data = TensorDataset(make_images(24))  # 3 updates per epoch
    tr = AltUBTrainer(fastflow(), data, epochs=3, k=2, warmup=1, **OPTS)
    hist = tr.fit()
    assert [r["base_only_updates"] for r in hist] == [1, 2, 1]   # updates 2 | 4, 6 | 8
    assert tr.base_updates == 4 and tr.global_step == 9
    tr = AltUBTrainer(fastflow(), data, epochs=2, k=2, warmup=0, unit="epoch", base_optimizer="adam", **OPTS)
    hist = tr.fit()
    assert isinstance(tr.base_optimizer, torch.optim.Adam)
    assert [(r["flow_updates"], r["base_only_updates"]) for r in hist] == [(3, 0), (0, 3)]


def test_baseline_keeps_fixed_base():
    data = TensorDataset(make_images(16))
    m = fastflow(altub=False)
    tr = AltUBTrainer(m, data, epochs=2, k=1, warmup=0, **OPTS)
    hist = tr.fit()
    assert tr.base_optimizer is None and len(tr.optimizer.param_groups) == 1
    assert all(r["base_only_updates"] == 0 for r in hist)
    for b in m.bases:
        assert torch.equal(b.mu, torch.zeros_like(b.mu)) and torch.equal(b.log_sigma, torch.zeros_like(b.log_sigma))


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("kind,cache", [("fastflow", True), ("cflow", False)])
def test_resume_equals_uninterrupted(tmp_path, kind, cache):
    make = fastflow if kind == "fastflow" else cflow
    data = TensorDataset(make_images(16))
    opts = dict(OPTS, epochs=3, k=2, warmup=1, cache_features=cache)
    a = make()
    tra = AltUBTrainer(a, data, checkpoint_dir=str(tmp_path / "a"), **opts)
    tra.fit()
    rng_a = (torch.get_rng_state(), np.random.get_state()[1].copy())
    b = make()
    AltUBTrainer(b, data, checkpoint_dir=str(tmp_path / "b"), **opts).fit(2)   # ... and "crash"
    torch.manual_seed(1234)   # the resumed process starts from other RNG states and another init
    np.random.seed(1234)
    c = make(seed=77)
    trc = AltUBTrainer(c, data, checkpoint_dir=str(tmp_path / "b"), **opts)
    ck = trc.load_checkpoint(str(tmp_path / "b" / "last.pt"))
    assert ck["epoch"] == 2 and trc.epoch == 2 and trc.global_step > 0
    trc.fit()
    pa, pc = params(a), params(c)
    assert pa.keys() == pc.keys()
    for k in pa:
        assert torch.equal(pa[k], pc[k]), k
    sa, sc = tra.optimizer.state_dict()["state"], trc.optimizer.state_dict()["state"]
    for k in sa:
        for n in sa[k]:
            assert torch.equal(torch.as_tensor(sa[k][n]), torch.as_tensor(sc[k][n]))
    assert (tra.global_step, tra.base_updates) == (trc.global_step, trc.base_updates)
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("time_s", "images_per_s", "nll_time_s")} for r in h]  # noqa: E731
    assert strip(tra.history) == strip(trc.history)
    # the global RNG states were restored too: both processes end in the same state
    assert torch.equal(torch.get_rng_state(), rng_a[0]) and np.array_equal(np.random.get_state()[1], rng_a[1])


def test_checkpoint_contents_and_rebuild(tmp_path):
    torch.manual_seed(0)
    np.random.seed(0)
    m = build_model("fastflow", "resnet18", pretrained=False, image_size=32, out_indices=(1, 2), flow_steps=2,
                    hidden_ratio=0.25)
    data = DictSet(make_images(8))
    tr = AltUBTrainer(m, data, epochs=1, checkpoint_dir=str(tmp_path), **OPTS)
    tr.fit()
    path = str(tmp_path / "last.pt")
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]   # no temp files left
    ck = load_checkpoint_file(path)
    for key in ("model", "optimizer", "base_optimizer", "epoch", "global_step", "base_updates", "rng", "schedule",
                "model_config", "backbone", "history"):
        assert key in ck
    assert ck["backbone"]["weights_origin"] == "random" and ck["backbone_saved"]
    assert set(ck["rng"]) >= {"torch", "numpy", "python"}
    m2 = load_model(path)
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    x = make_images(2)
    torch.testing.assert_close(m.eval().anomaly_map(x)[0], m2.anomaly_map(x)[0])
    tr2 = AltUBTrainer.from_checkpoint(path, data, epochs=2)
    assert tr2.epoch == 1 and len(tr2.fit()) == 2


# ----------------------------------------------------------------------------- non-finite losses
def _poison(model):
    with torch.no_grad():
        model.flows[0][0].global_offset[0, 0] = float("nan")


def test_nonfinite_raises_and_keeps_last_good_checkpoint(tmp_path):
    data = TensorDataset(make_images(16))
    m = fastflow()
    tr = AltUBTrainer(m, data, epochs=1, checkpoint_dir=str(tmp_path), **OPTS)
    tr.fit()
    _poison(m)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 3") as info:
        tr.fit(2)
    assert "flow output z of scale 0" in str(info.value) and "last.pt" in str(info.value)
    ck = load_checkpoint_file(str(tmp_path / "last.pt"))
    assert ck["epoch"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_nonfinite_skip_policy(tmp_path, caplog):
    data = TensorDataset(make_images(16))
    m = fastflow()
    tr = AltUBTrainer(m, data, epochs=1, checkpoint_dir=str(tmp_path), on_nonfinite="skip", **OPTS)
    tr.fit()
    _poison(m)
    with caplog.at_level(logging.WARNING, logger="altub_fast.train"):
        hist = tr.fit(2)
    assert hist[-1]["skipped_updates"] == 2 and hist[-1]["updates"] == 0
    assert "skipped" in caplog.text and "not writing checkpoint" in caplog.text
    assert load_checkpoint_file(str(tmp_path / "last.pt"))["epoch"] == 1


def test_nonfinite_features_named():
    imgs = make_images(8)
    imgs[5, 0, 3, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="training images 0..7"):
        AltUBTrainer(fastflow(), TensorDataset(imgs), epochs=1, **OPTS).fit()


def test_amp_on_cpu_warns():
    with pytest.warns(UserWarning, match="CUDA only"):
        AltUBTrainer(fastflow(), TensorDataset(make_images(8)), epochs=1, amp=True, **OPTS)


# ----------------------------------------------------------------------------- inference
def test_predict_fastflow_and_cflow():
    imgs = make_images(6, seed=1)
    data = DictSet(imgs, labels=torch.tensor([0, 0, 0, 1, 1, 1]))
    m = fastflow()
    res = predict(m, data, batch_size=4, progress=False)
    assert res["maps"].shape == (6, 32, 32) and res["scores"].shape == (6,)
    assert res["labels"].tolist() == [0, 0, 0, 1, 1, 1] and res["masks"].shape == (6, 1, 32, 32)
    assert res["paths"][0] == "img_0.png"
    torch.testing.assert_close(res["maps"][:2], m.anomaly_map(imgs[:2])[0])
    c = cflow()
    res = predict(c, TensorDataset(imgs), batch_size=4, progress=False)
    maps, scores = c.anomaly_map(imgs)   # per image: the batch split does not matter
    torch.testing.assert_close(res["maps"], maps, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res["scores"], scores, rtol=1e-5, atol=1e-6)
