"""Label-free training choices: per-epoch NLL (nats/dim), best.pt, epochs='auto', calibration and
the threshold stored in the checkpoint."""
import json

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
