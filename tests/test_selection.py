"""Label-free training choices: per-epoch NLL (nats/dim), best.pt, epochs='auto', calibration and
the threshold stored in the checkpoint."""
import json
import os

import pytest
import torch

from altub_fast.train import AltUBTrainer
from altub_fast.train.validation import fixed_subset
from _train_helpers import OPTS, PathSet, fastflow, make_images


def _features(model, dataset, indices):
    images = torch.stack([dataset[i]["image"] for i in indices])
    return model.extract_features(images)


def test_epoch_records_heldout_and_train_nll(tmp_path):
    data = PathSet(make_images(20))
    jsonl = tmp_path / "log.jsonl"
    m = fastflow()
    tr = AltUBTrainer(m, data, epochs=3, heldout_fraction=0.25, train_nll_images=6, log_jsonl=str(jsonl), **OPTS)
    hist = tr.fit()
    for r in hist:
        assert isinstance(r["heldout_nll"], float) and isinstance(r["train_nll"], float)
    # the flow learns the training images: their NLL falls
    assert hist[-1]["train_nll"] < hist[0]["train_nll"]
    # the numbers are the model's per-image NLL, averaged over the held-out images / the fixed subset
    held = m.nll_per_dim(_features(m, data, tr.split.heldout_indices)).double()
    assert hist[-1]["heldout_nll"] == pytest.approx(float(held.mean()), rel=1e-6)
    subset = [tr.split.train_indices[i] for i in fixed_subset(len(tr.dataset), 6, OPTS["seed"])]
    assert len(subset) == 6
    train = m.nll_per_dim(_features(m, data, subset)).double()
    assert hist[-1]["train_nll"] == pytest.approx(float(train.mean()), rel=1e-6)
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["heldout_nll"] for r in lines] == [r["heldout_nll"] for r in hist]
    assert "NLL nats/dim: train" in tr.format_record(hist[-1])


def test_nll_the_same_with_and_without_the_feature_cache():
    data = PathSet(make_images(16))
    a = AltUBTrainer(fastflow(), data, epochs=2, heldout_fraction=0.25, cache_features=True, **OPTS).fit()
    b = AltUBTrainer(fastflow(), data, epochs=2, heldout_fraction=0.25, cache_features=False, **OPTS).fit()
    for ra, rb in zip(a, b):
        assert ra["heldout_nll"] == pytest.approx(rb["heldout_nll"], rel=1e-4)
        assert ra["train_nll"] == pytest.approx(rb["train_nll"], rel=1e-4)


def test_heldout_needs_a_model_with_nll_per_dim():
    m = fastflow()
    m.nll_per_dim = None
    with pytest.raises(TypeError, match="nll_per_dim"):
        AltUBTrainer(m, PathSet(make_images(8)), epochs=1, heldout_fraction=0.25, **OPTS)
    # without a held-out split the model is not asked for it
    tr = AltUBTrainer(m, PathSet(make_images(8)), epochs=1, **OPTS)
    assert tr.fit()[0]["heldout_nll"] is None and tr.history[0]["train_nll"] is None


# ----------------------------------------------------------------------------- best.pt and epochs="auto"
from altub_fast.train import load_checkpoint_file  # noqa: E402
from _train_helpers import ScriptedNLL  # noqa: E402

AUTO = dict(OPTS, epochs="auto", heldout_fraction=0.25, min_epochs=2, patience=3, max_epochs=20)


def _scripted(script):
    return ScriptedNLL(script, updates_per_epoch=2)   # 12 training images, batch 8


def test_auto_stops_when_heldout_nll_rises(tmp_path):
    script = [5.0, 4.0, 3.0, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0]
    tr = AltUBTrainer(_scripted(script), PathSet(make_images(16)), checkpoint_dir=str(tmp_path),
                      keep_all_checkpoints=True, **AUTO)
    hist = tr.fit()
    assert [r["heldout_nll"] for r in hist] == script[:7]          # epochs 5, 6, 7 do not improve on 4
    assert "patience 3" in tr.stop_reason and "epoch 4" in tr.stop_reason
    best, last = load_checkpoint_file(str(tmp_path / "best.pt")), load_checkpoint_file(str(tmp_path / "last.pt"))
    assert (best["kind"], best["epoch"], last["kind"], last["epoch"]) == ("best", 4, "last", 7)
    # best.pt holds the model of epoch 4 exactly (and, calibrated at the end, its score normalisation)
    at4 = load_checkpoint_file(str(tmp_path / "epoch_0004.pt"))
    assert at4["model"].keys() == best["model"].keys()
    for k, v in at4["model"].items():
        assert k.startswith("scorer.") or torch.equal(v, best["model"][k]), k
    sel = last["selection"]
    assert sel["best"]["epoch"] == 4 and sel["best"]["heldout_nll"] == 2.0 and "lowest held-out NLL" in sel["best"]["why"]
    assert sel["last"]["epoch"] == 7 and sel["stopped"] == tr.stop_reason


def test_auto_keeps_going_while_heldout_nll_falls(tmp_path):
    script = [10.0 - i for i in range(10)]
    tr = AltUBTrainer(_scripted(script), PathSet(make_images(16)), checkpoint_dir=str(tmp_path),
                      **dict(AUTO, max_epochs=8))
    assert len(tr.fit()) == 8 and tr.stop_reason == "reached max_epochs=8"
    assert load_checkpoint_file(str(tmp_path / "best.pt"))["epoch"] == 8


def test_auto_trains_at_least_min_epochs():
    tr = AltUBTrainer(_scripted([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]), PathSet(make_images(16)),
                      **dict(AUTO, min_epochs=6, patience=2))
    assert len(tr.fit()) == 6 and tr.history[-1]["best_epoch"] == 1


def test_auto_resumes_to_the_same_decision(tmp_path):
    script = [5.0, 4.0, 3.0, 3.5, 2.0, 2.5, 2.6, 2.7, 2.8, 2.9]
    a = AltUBTrainer(_scripted(script), PathSet(make_images(16)), checkpoint_dir=str(tmp_path / "a"), **AUTO)
    a.fit()
    b = AltUBTrainer(_scripted(script), PathSet(make_images(16)), checkpoint_dir=str(tmp_path / "b"), **AUTO)
    b.fit(3)                                                          # ... and "crash"
    c = AltUBTrainer(_scripted(script), PathSet(make_images(16)), checkpoint_dir=str(tmp_path / "b"), **AUTO)
    c.load_checkpoint(str(tmp_path / "b" / "last.pt"))
    c.fit()
    assert len(c.history) == len(a.history) == 8 and c.stop_reason == a.stop_reason
    assert load_checkpoint_file(str(tmp_path / "b" / "best.pt"))["epoch"] == 5


def test_auto_needs_heldout_images():
    tr = AltUBTrainer(fastflow(), PathSet(make_images(8)), **dict(AUTO, heldout_fraction=0.0))
    with pytest.raises(ValueError, match="held-out"):
        tr.fit()
    with pytest.raises(ValueError, match="'auto'"):
        AltUBTrainer(fastflow(), PathSet(make_images(8)), epochs="forever", **OPTS)


def test_best_pt_is_the_lowest_heldout_nll_of_a_real_run(tmp_path):
    data = PathSet(make_images(20))
    tr = AltUBTrainer(fastflow(), data, epochs=4, heldout_fraction=0.25, checkpoint_dir=str(tmp_path), lr=3e-3,
                      **OPTS)
    hist = tr.fit()
    nll = [r["heldout_nll"] for r in hist]
    best = load_checkpoint_file(str(tmp_path / "best.pt"))
    assert best["epoch"] == 1 + nll.index(min(nll)) and best["kind"] == "best"
    model = fastflow(seed=9)                      # the tiny backbone is fixed; the rest comes from best.pt
    model.load_state_dict(best["model"], strict=False)
    again = model.nll_per_dim(_features(model, data, tr.split.heldout_indices)).double().mean()
    assert float(again) == pytest.approx(min(nll), rel=1e-6)


def test_best_pt_is_written_atomically(tmp_path, monkeypatch):
    import altub_fast.train.checkpoint as checkpoint

    script = [3.0, 2.0, 1.0]
    tr = AltUBTrainer(_scripted(script), PathSet(make_images(16)), checkpoint_dir=str(tmp_path), **AUTO)
    tr.fit(1)
    before = (tmp_path / "best.pt").read_bytes()
    real_save = torch.save

    def crash_midway(obj, f, *a, **k):          # best.pt: half a file, then the process "dies"
        real_save(obj, f, *a, **k)
        if os.path.basename(str(getattr(f, "name", ""))).startswith(".best.pt"):
            f.truncate(100)
            raise OSError("disk full (simulated)")
    monkeypatch.setattr(checkpoint.torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        tr.fit(2)
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert (tmp_path / "best.pt").read_bytes() == before          # the old complete file
    assert load_checkpoint_file(str(tmp_path / "best.pt"))["epoch"] == 1
    assert load_checkpoint_file(str(tmp_path / "last.pt"))["epoch"] == 2     # written before best.pt was due
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]   # no temporary file left


# ----------------------------------------------------------------------------- calibration and threshold
from altub_fast.metrics import threshold_at_fpr  # noqa: E402


def _heldout_scores(model, data, indices):
    model.eval()
    return model.anomaly_map(torch.stack([data[i]["image"] for i in indices]))[1].double()


def test_threshold_stored_and_correct(tmp_path):
    data = PathSet(make_images(20))
    tr = AltUBTrainer(fastflow(), data, epochs=2, heldout_fraction=0.25, max_fpr=0.2, checkpoint_dir=str(tmp_path),
                      **OPTS)
    tr.fit()
    held = tr.split.heldout_indices
    for name in ("last", "best"):
        ck = load_checkpoint_file(str(tmp_path / f"{name}.pt"))
        thr = ck["threshold"]
        assert set(thr) >= {"value", "max_fpr", "n_heldout", "score_mode"}
        assert thr["max_fpr"] == 0.2 and thr["n_heldout"] == 5 and thr["score_mode"] == tr.model.score_mode
        # the checkpoint's model, calibrated, gives the held-out scores the threshold came from
        model = fastflow(seed=5)
        model.load_state_dict(ck["model"], strict=False)
        assert model.calibrated
        scores = _heldout_scores(model, data, held)
        torch.testing.assert_close(scores, torch.tensor(thr["heldout_scores"], dtype=torch.float64), rtol=1e-5,
                                   atol=1e-6)
        assert thr["value"] == threshold_at_fpr(thr["heldout_scores"], 0.2)
        assert int((scores > thr["value"] + 1e-6).sum()) <= 1          # at most floor(0.2 * 5) false alarms


def test_best_and_last_calibrated_each_on_its_own_model(tmp_path):
    script = [3.0, 1.0, 2.0, 2.5]
    data = PathSet(make_images(16))
    tr = AltUBTrainer(_scripted(script), data, checkpoint_dir=str(tmp_path), **dict(AUTO, patience=2, max_fpr=0.25))
    tr.fit()
    best, last = load_checkpoint_file(str(tmp_path / "best.pt")), load_checkpoint_file(str(tmp_path / "last.pt"))
    assert (best["epoch"], last["epoch"]) == (2, 4)
    assert best["threshold"]["heldout_scores"] != last["threshold"]["heldout_scores"]
    assert best["selection"]["stopped"] == tr.stop_reason and best["selection"]["best"]["epoch"] == 2
    model = _scripted(script)
    model.load_state_dict(best["model"], strict=False)
    scores = _heldout_scores(model, data, tr.split.heldout_indices)
    torch.testing.assert_close(scores, torch.tensor(best["threshold"]["heldout_scores"], dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)


def test_no_threshold_without_heldout_images_or_before_the_end(tmp_path):
    tr = AltUBTrainer(fastflow(), PathSet(make_images(8)), epochs=1, checkpoint_dir=str(tmp_path), **OPTS)
    tr.fit()
    assert tr.threshold is None and load_checkpoint_file(str(tmp_path / "last.pt"))["threshold"] is None
    tr = AltUBTrainer(fastflow(), PathSet(make_images(12)), epochs=2, heldout_fraction=0.25, **OPTS)
    tr.fit()
    first = tr.threshold
    assert first is not None
    tr.fit(3)                                   # training on: calibrated again for the new state
    assert tr.threshold is not None and tr.threshold["heldout_scores"] != first["heldout_scores"]
