"""The trainer's checkpoint store (altub_fast/train/store.py) on a fake flow: what a checkpoint
holds, atomic and refused writes, reading back, the restored held-out split, calibration of
last/best; and the whole trainer on the fake flow (any TrainableFlow trains and resumes)."""
import logging
import os

import pytest
import torch
from torch.utils.data import Subset

from altub_fast.metrics import threshold_at_fpr
from altub_fast.train import AltUBTrainer, CHECKPOINT_FORMAT, HeldoutSplit, load_checkpoint_file, make_split
from altub_fast.train.store import CheckpointStore, calibration, restored_split
from _fake_flow import FakeFlow, Images

RUN = {"epoch": 3, "global_step": 12, "history": [{"epoch": 1}], "threshold": None}


def _trained(seed=0):
    model = FakeFlow()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    with torch.no_grad():
        model.shift.add_(torch.randn(3, generator=torch.Generator().manual_seed(seed)))
    model.shift.sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def test_state_holds_model_optimisers_run_and_rng():
    model, opt = _trained()
    ck = CheckpointStore(None).state(model, opt, None, RUN)
    assert ck["format"] == CHECKPOINT_FORMAT and ck["model_class"] == "FakeFlow"
    assert ck["model_config"] == model.config and ck["backbone"] == {"name": "fake", "weights_origin": "none"}
    assert ck["backbone_saved"] is False and ck["base_optimizer"] is None and ck["optimizer"]["state"]
    assert {k: ck[k] for k in RUN} == RUN and set(ck["rng"]) >= {"torch", "numpy", "python"}
    assert torch.equal(ck["model"]["shift"], model.shift)
    model.backbone.random_weights = True
    assert CheckpointStore(None).saves_backbone(model)
    assert not CheckpointStore(None, save_backbone=False).saves_backbone(model)


def test_save_writes_last_best_and_epoch_files_atomically(tmp_path):
    model, opt = _trained()
    store = CheckpointStore(str(tmp_path), keep_all=True)
    state = lambda: store.state(model, opt, None, RUN)  # noqa: E731
    assert store.save(model, state) == str(tmp_path / "last.pt") == store.last
    assert store.save(model, state, kind="best") == str(tmp_path / "best.pt") == store.best
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "epoch_0003.pt", "last.pt"]
    assert load_checkpoint_file(str(tmp_path / "best.pt"))["kind"] == "best"
    assert load_checkpoint_file(str(tmp_path / "epoch_0003.pt"))["kind"] == "last"
    other = str(tmp_path / "sub" / "mine.pt")
    assert store.save(model, state, path=other) == other and os.path.exists(other)
    with pytest.raises(ValueError, match="kind must be"):
        store.save(model, state, kind="first")
    with pytest.raises(ValueError, match="no checkpoint_dir"):
        CheckpointStore(None).save(model, state)


def test_save_refuses_nonfinite_parameters_and_other_ranks_write_nothing(tmp_path, caplog):
    model, opt = _trained()
    store = CheckpointStore(str(tmp_path))
    store.save(model, lambda: store.state(model, opt, None, RUN))
    before = (tmp_path / "last.pt").read_bytes()
    with torch.no_grad():
        model.log_scale[1] = float("inf")
    asked = []
    with caplog.at_level(logging.ERROR, logger="altub_fast.train"):
        assert store.save(model, lambda: asked.append(1)) is None
    assert "non-finite parameters ['log_scale']" in caplog.text and str(tmp_path / "last.pt") in caplog.text
    assert (tmp_path / "last.pt").read_bytes() == before and not asked
    assert CheckpointStore(str(tmp_path / "r1"), is_main=False).save(model, lambda: asked.append(1)) is None
    assert not (tmp_path / "r1").exists() and not asked


def test_load_restores_model_and_optimisers_and_checks_the_model(tmp_path):
    model, opt = _trained(seed=1)
    store = CheckpointStore(str(tmp_path))
    store.save(model, lambda: store.state(model, opt, None, RUN))
    fresh = FakeFlow()
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.1)
    ck = store.load(str(tmp_path / "last.pt"), fresh, fresh_opt, None)
    assert ck["epoch"] == 3 and torch.equal(fresh.shift, model.shift)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    baseline = FakeFlow(altub=False)
    with pytest.raises(ValueError, match="is for altub=True, the model has altub=False"):
        store.load(str(tmp_path / "last.pt"), baseline, torch.optim.Adam(baseline.parameters()), None)
    extra = FakeFlow()
    extra.register_parameter("gain", torch.nn.Parameter(torch.ones(3)))
    with pytest.raises(ValueError, match=r"does not fit the model: missing \['gain'\]"):
        store.load(str(tmp_path / "last.pt"), extra, torch.optim.Adam(extra.parameters()), None)


def test_restored_split_is_the_checkpoints_checked_and_announced():
    data = Images(10)
    theirs, ours = make_split(data, None, 0.3, seed=1), make_split(data, None, 0.2, seed=2)
    ck = {"heldout": theirs.to_dict()}
    with pytest.warns(UserWarning, match="replaces the one these options asked for"):
        assert restored_split(ck, "last.pt", ours, data, None, seed=0) == theirs
    assert restored_split(ck, "last.pt", theirs, data, None, seed=0) == theirs
    old = restored_split({}, "old.pt", make_split(data, None, 0.0, 0), data, None, seed=4)   # before splits
    assert old == HeldoutSplit("none", 0.0, 4, 10, None, None, None, None)
    with pytest.raises(ValueError, match="10 training images"):
        restored_split(ck, "last.pt", ours, Subset(data, range(8)), None, seed=0)


def _heldout_features(model, n=5):
    feats = model.extract_features(Images(n, seed=7).images)
    return [[feats[0][:3]], [feats[0][3:]]]


def test_calibration_threshold(caplog):
    model, _ = _trained()
    with caplog.at_level(logging.WARNING, logger="altub_fast.train"):
        thr = calibration(model, _heldout_features(model), max_fpr=0.1)
    assert "5 held-out images" in caplog.text and "at least 10 images" in caplog.text
    assert thr["n_heldout"] == 5 and thr["max_fpr"] == 0.1 and len(thr["heldout_scores"]) == 5
    assert (thr["score_mode"], thr["image_score"]) == ("fake_nll", "mean")
    assert thr["value"] == threshold_at_fpr(thr["heldout_scores"], 0.1)
    model.calibrate = lambda batches: torch.zeros(4)
    with pytest.raises(RuntimeError, match="4 scores for 5 held-out images"):
        calibration(model, _heldout_features(model), max_fpr=0.1)


def test_recalibrate_calibrates_the_stored_model(tmp_path):
    best, opt = _trained(seed=2)
    store = CheckpointStore(str(tmp_path))
    store.save(best, lambda: store.state(best, opt, None, RUN), kind="best")
    current, _ = _trained(seed=3)
    features = _heldout_features(current)
    thr = store.recalibrate(current, "best", features, 0.2, {"best": {"epoch": 3}})
    assert thr == calibration(best, features, 0.2, warn=False)
    assert thr != calibration(current, features, 0.2, warn=False) and float(current.loc) != float(best.loc)
    ck = load_checkpoint_file(str(tmp_path / "best.pt"))
    assert ck["threshold"] == thr and ck["selection"] == {"best": {"epoch": 3}} and ck["kind"] == "best"
    assert float(ck["model"]["loc"]) == float(best.loc)          # the stored model's calibration
    assert CheckpointStore(str(tmp_path), is_main=False).recalibrate(current, "best", features, 0.2, {}) is None


def test_the_trainer_trains_and_resumes_a_fake_flow(tmp_path):
    opts = dict(epochs=4, batch_size=4, k=2, warmup=1, heldout_fraction=0.25, progress=False, seed=1, max_fpr=0.25)
    a = AltUBTrainer(FakeFlow(), Images(12), checkpoint_dir=str(tmp_path / "a"), **opts)
    hist = a.fit()
    assert hist[-1]["heldout_nll"] < hist[0]["heldout_nll"] and a.base_updates > 0
    assert a.threshold["score_mode"] == "fake_nll" and load_checkpoint_file(a.last_checkpoint)["threshold"]
    b = AltUBTrainer(FakeFlow(), Images(12), checkpoint_dir=str(tmp_path / "b"), **opts)
    b.fit(2)
    c = AltUBTrainer(FakeFlow(), Images(12), checkpoint_dir=str(tmp_path / "b"), **opts)
    c.load_checkpoint(b.last_checkpoint)
    c.fit()
    for (k, va), vc in zip(a.model.state_dict().items(), c.model.state_dict().values()):
        assert torch.equal(va, vc), k
    assert [r["heldout_nll"] for r in a.history] == [r["heldout_nll"] for r in c.history]


def test_the_trainer_names_what_a_model_lacks():
    class NoBase(FakeFlow):
        base_only_loss = property()       # reading it fails: as if the method were missing

    model = NoBase()
    del model.bases
    with pytest.raises(TypeError, match="NoBase cannot be trained: it lacks base_only_loss, bases"):
        AltUBTrainer(model, Images(4), epochs=1, progress=False)
