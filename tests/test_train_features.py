"""The trainer's feature source (altub_fast/train/features.py) on a fake flow: cached and extracted
batches agree, each image is read as asked, caches are checked and forgotten with their images."""
import pytest
import torch
from torch.utils.data import Subset

from altub_fast.models.protocol import TrainableFlow
from altub_fast.train.features import FeatureSource, index_batches
from _fake_flow import FakeFlow, Images


def _source(model, train, held=None, batch_size=4):
    src = FeatureSource(model, device=torch.device("cpu"), batch_size=batch_size, seed=3)
    src.use(train, held)
    return src


def _cat(batches):
    return torch.cat([b[0] for b in batches])


def test_the_fake_flow_is_a_trainable_flow():
    assert isinstance(FakeFlow(), TrainableFlow)


def test_index_batches():
    assert [b.tolist() for b in index_batches(7, 3)] == [[0, 1, 2], [3, 4, 5], [6]]


def test_cached_and_extracted_batches_agree_and_read_what_is_asked():
    data, held = Images(10), Images(5, seed=1, prefix="val")
    model = FakeFlow()
    src = _source(model, data, held)
    batches = [torch.tensor([7, 2, 5]), torch.tensor([0, 9])]
    extracted = _cat(src.train_batches(batches, epoch=0))
    assert data.reads == [7, 2, 5, 0, 9]
    held_extracted, nll_extracted = _cat(src.heldout_batches()), _cat(src.train_nll_batches(4))
    assert held.reads == [0, 1, 2, 3, 4]

    cache = src.build_train_cache()
    assert cache[0].shape == (10, 3, 4, 4) and src.cache_seconds is not None
    src.build_heldout_cache()
    data.reads.clear()
    held.reads.clear()
    n_before = model.extracted
    assert torch.equal(_cat(src.train_batches(batches, epoch=1)), extracted)
    assert torch.equal(_cat(src.heldout_batches()), held_extracted)
    assert torch.equal(_cat(src.train_nll_batches(4)), nll_extracted)
    assert data.reads == [] and held.reads == [] and model.extracted == n_before   # all from the caches
    assert torch.equal(extracted, torch.nn.functional.avg_pool2d(data.images[[7, 2, 5, 0, 9]], 2))


def test_train_nll_batches_are_a_fixed_subset():
    data = Images(10)
    src = _source(FakeFlow(), data, batch_size=2)
    sizes = [b[0].shape[0] for b in src.train_nll_batches(5)]
    assert sizes == [2, 2, 1] and sorted(data.reads) == data.reads and len(set(data.reads)) == 5
    first = list(data.reads)
    data.reads.clear()
    list(src.train_nll_batches(5))
    assert data.reads == first
    data.reads.clear()
    list(src.train_nll_batches(50))                   # more than there are: all of them
    assert data.reads == list(range(10))


def test_handed_in_cache_is_checked():
    src = _source(FakeFlow(), Images(6))
    good = [torch.zeros(6, 3, 4, 4)]
    src.set_train_cache(good)
    assert src.train_cache[0].shape == (6, 3, 4, 4)
    with pytest.raises(ValueError, match="N = 6"):
        src.set_train_cache([torch.zeros(5, 3, 4, 4)])
    with pytest.raises(ValueError, match="1 scales, got features for 2"):
        src.set_train_cache(good * 2)


def test_use_forgets_the_caches_and_refuses_an_empty_training_set():
    data = Images(6)
    src = _source(FakeFlow(), data, Images(2, seed=4))
    src.build_train_cache()
    src.build_heldout_cache()
    src.use(Subset(data, [0, 1, 2]), None)
    assert src.train_cache is None and src.heldout_cache is None and len(src.train_set) == 3
    with pytest.raises(ValueError, match="no held-out images"):
        src.heldout_batches()
    with pytest.raises(ValueError, match="no held-out images"):
        src.build_heldout_cache()
    with pytest.raises(ValueError, match="training set is empty"):
        src.use(Subset(data, []), None)


def test_nonfinite_features_name_the_images():
    held = Images(4, seed=2)
    held.images[2, 0, 0, 0] = float("nan")
    src = _source(FakeFlow(), Images(4), held, batch_size=2)
    with pytest.raises(FloatingPointError, match="held-out images 2..3"):
        src.build_heldout_cache()
