"""The held-out normal split: disjoint from training, deterministic, recorded, restored on resume."""
import pytest
import torch
from torch.utils.data import TensorDataset

from altub_fast.train import AltUBTrainer, HeldoutSplit, load_checkpoint_file, split_indices
from _train_helpers import OPTS, DictSet, PathSet, fastflow, make_images, params


def test_split_indices_disjoint_deterministic_and_sized():
    train, held = split_indices(40, 0.1, seed=5)
    assert len(held) == 4 and len(train) == 36
    assert not set(train) & set(held) and sorted(train + held) == list(range(40))
    assert (train, held) == split_indices(40, 0.1, seed=5)          # deterministic for a seed
    assert held != split_indices(40, 0.1, seed=6)[1]                  # and depends on it
    assert len(split_indices(3, 0.01, seed=0)[1]) == 1                # at least one held out ...
    assert len(split_indices(3, 0.9, seed=0)[0]) == 1                 # ... and one left to train on
    with pytest.raises(ValueError, match="heldout_fraction must be in"):
        split_indices(10, 1.0, seed=0)
    with pytest.raises(ValueError, match="at least 2"):
        split_indices(1, 0.5, seed=0)


def test_trainer_never_trains_on_the_heldout_images():
    data = PathSet(make_images(20))
    tr = AltUBTrainer(fastflow(), data, epochs=1, heldout_fraction=0.25, cache_features=False, **OPTS)
    held = set(tr.split.heldout_indices)
    assert len(held) == 5 and tr.split.source == "fraction"
    assert len(tr.dataset) == 15 and len(tr.heldout_dataset) == 5
    assert tr.split.heldout_files == [data.paths[i] for i in sorted(held)]
    assert not set(tr.split.train_files) & set(tr.split.heldout_files)
    data.reads.clear()
    tr.train_epoch(0)            # one epoch of training, features extracted batch by batch
    assert sorted(data.reads) == tr.split.train_indices
    data.reads.clear()
    tr.build_cache()
    assert sorted(data.reads) == tr.split.train_indices and tr.features.train_cache[0].shape[0] == 15


def test_split_recorded_in_checkpoint_and_restored_on_resume(tmp_path):
    data = PathSet(make_images(16))
    opts = dict(OPTS, epochs=3, k=2, warmup=1, heldout_fraction=0.25, heldout_seed=11)
    a = fastflow()
    AltUBTrainer(a, data, checkpoint_dir=str(tmp_path / "a"), **opts).fit()
    b = fastflow()
    trb = AltUBTrainer(b, data, checkpoint_dir=str(tmp_path / "b"), **opts)
    trb.fit(2)
    ck = load_checkpoint_file(str(tmp_path / "b" / "last.pt"))
    rec = ck["heldout"]
    assert rec["source"] == "fraction" and rec["fraction"] == 0.25 and rec["seed"] == 11
    assert rec["heldout_indices"] == trb.split.heldout_indices and rec["n_heldout"] == 4 and rec["n_train"] == 12
    assert rec["heldout_files"] == [data.paths[i] for i in rec["heldout_indices"]]
    # a resumed process asked for another split: the checkpoint's is restored, exactly
    c = fastflow(seed=77)
    trc = AltUBTrainer(c, data, checkpoint_dir=str(tmp_path / "b"), **dict(opts, heldout_fraction=0.5, heldout_seed=1))
    assert trc.split.heldout_indices != rec["heldout_indices"]
    with pytest.warns(UserWarning, match="held-out split"):
        trc.load_checkpoint(str(tmp_path / "b" / "last.pt"))
    assert trc.split == HeldoutSplit.from_dict(rec) and trc.split.heldout_indices == rec["heldout_indices"]
    assert list(trc.dataset.indices) == rec["train_indices"]
    trc.fit()
    pa, pc = params(a), params(c)
    for k in pa:
        assert torch.equal(pa[k], pc[k]), k


def test_resume_with_changed_data_names_the_file(tmp_path):
    data = PathSet(make_images(12))
    AltUBTrainer(fastflow(), data, epochs=1, heldout_fraction=0.25, checkpoint_dir=str(tmp_path), **OPTS).fit()
    other = PathSet(make_images(12))
    other.paths[3] = "/data/replaced.png"
    tr = AltUBTrainer(fastflow(), other, epochs=2, heldout_fraction=0.25, **OPTS)
    with pytest.raises(ValueError, match="replaced.png"):
        tr.load_checkpoint(str(tmp_path / "last.pt"))
    tr = AltUBTrainer(fastflow(), PathSet(make_images(10)), epochs=2, heldout_fraction=0.25, **OPTS)
    with pytest.raises(ValueError, match="12 training images"):
        tr.load_checkpoint(str(tmp_path / "last.pt"))


def test_separate_validation_set(tmp_path):
    data, val = PathSet(make_images(8)), PathSet(make_images(4, seed=9), prefix="val")
    tr = AltUBTrainer(fastflow(), data, epochs=1, heldout=val, heldout_fraction=0.25, checkpoint_dir=str(tmp_path),
                      **OPTS)
    assert tr.split.source == "validation" and len(tr.dataset) == 8 and tr.heldout_dataset is val
    tr.fit()
    rec = load_checkpoint_file(str(tmp_path / "last.pt"))["heldout"]
    assert rec["source"] == "validation" and rec["heldout_files"] == val.paths and rec["n_train"] == 8
    with pytest.raises(ValueError, match="separate validation set"):
        AltUBTrainer(fastflow(), data, epochs=2, **OPTS).load_checkpoint(str(tmp_path / "last.pt"))
    resumed = AltUBTrainer.from_checkpoint(str(tmp_path / "last.pt"), data, model=fastflow(), heldout=val)
    assert resumed.split.source == "validation" and resumed.epoch == 1


def test_no_split_by_default_and_bad_fraction():
    tr = AltUBTrainer(fastflow(), TensorDataset(make_images(8)), epochs=1, **OPTS)
    assert tr.split.source == "none" and tr.heldout_dataset is None and len(tr.dataset) == 8
    with pytest.raises(ValueError, match="heldout_fraction"):
        AltUBTrainer(fastflow(), DictSet(make_images(8)), epochs=1, heldout_fraction=1.5, **OPTS)
