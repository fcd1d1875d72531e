"""Synthetic carpet set: layout, determinism, exact masks, atomic and idempotent writing."""
from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from altub_fast.data import (
    SYNTHETIC_DEFECTS,
    DatasetError,
    MVTecAD,
    SyntheticCarpet,
    is_complete,
    make_synthetic_carpet,
    synthesize_image,
)
from altub_fast.data import synthetic
from altub_fast.data.synthetic import carpet_texture

SMALL = dict(n_train=3, n_test_good=2, n_test_defect=1, size=64)


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.png")):
        h.update(str(p.relative_to(folder)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_layout_and_loader(tmp_path: Path) -> None:
    out = make_synthetic_carpet(tmp_path, seed=1, **SMALL)
    assert out == tmp_path / "carpet_synthetic" and is_complete(out)
    assert SYNTHETIC_DEFECTS == ("color", "cut", "hole", "metal_contamination", "thread")
    assert sorted(p.name for p in (out / "test").iterdir()) == sorted(("good",) + SYNTHETIC_DEFECTS)
    assert sorted(p.name for p in (out / "ground_truth").iterdir()) == sorted(SYNTHETIC_DEFECTS)
    assert (out / "ground_truth/cut/000_mask.png").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["carpet_synthetic"]  # no temporary folder left

    train = MVTecAD(tmp_path, "carpet_synthetic", "train", image_size=32)
    test = MVTecAD(tmp_path, "carpet_synthetic", "test", image_size=64, normalize=False)
    assert len(train) == 3 and len(test) == 2 + len(SYNTHETIC_DEFECTS)
    assert test.defects == sorted(SYNTHETIC_DEFECTS) and test.labels == [0, 0] + [1] * 5
    with Image.open(test.samples[0].path) as im:
        assert im.mode == "RGB" and im.size == (64, 64)
    for i in range(2, len(test)):
        item = test[i]
        area = float(item["mask"].mean())
        assert 0.001 < area < 0.10, (item["defect"], area)  # visible, not trivially large


def test_default_sizes_are_small() -> None:
    defaults = {k: v.default for k, v in inspect.signature(make_synthetic_carpet).parameters.items()}
    assert defaults["n_train"] == 60 and defaults["n_test_good"] == 20 and defaults["n_test_defect"] == 4
    assert defaults["size"] == 256 and defaults["category"] == "carpet_synthetic"


def test_deterministic_across_roots_and_seeds(tmp_path: Path) -> None:
    a = make_synthetic_carpet(tmp_path / "a", seed=3, **SMALL)
    b = make_synthetic_carpet(tmp_path / "b", seed=3, **SMALL)
    c = make_synthetic_carpet(tmp_path / "c", seed=4, **SMALL)
    assert _digest(a) == _digest(b) != _digest(c)


def test_images_independent_of_set_size() -> None:
    img, mask = synthesize_image(0, "test", "hole", 2, size=64)
    again, mask_again = synthesize_image(0, "test", "hole", 2, size=64)
    assert np.array_equal(img, again) and np.array_equal(mask, mask_again)
    other, _ = synthesize_image(0, "test", "hole", 3, size=64)
    assert not np.array_equal(img, other)
    assert synthesize_image(0, "train", "good", 0, size=64)[1] is None


@pytest.mark.parametrize("defect", SYNTHETIC_DEFECTS)
def test_mask_is_exactly_the_changed_pixels(defect: str) -> None:
    size = 128
    img, mask = synthesize_image(5, "test", defect, 0, size=size)
    # rebuild the clean texture from the same random stream
    rng = np.random.default_rng(np.random.SeedSequence([5, 1, 1 + SYNTHETIC_DEFECTS.index(defect), 0]))
    clean = np.round(carpet_texture(rng, size) * 255).astype(np.uint8)
    inside = mask > 0
    assert set(np.unique(mask)) == {0, 255}
    assert np.array_equal(img[~inside], clean[~inside])  # nothing changed outside the mask
    changed = np.abs(img.astype(int) - clean.astype(int)).max(axis=-1) > 0
    assert changed[inside].mean() > 0.9  # and (nearly) everything inside it changed
    diff = np.abs(img.astype(float) - clean.astype(float)).mean(axis=-1)[inside].mean() / 255
    assert diff > 0.08, diff  # visibly


def test_texture_looks_woven() -> None:
    tex = carpet_texture(np.random.default_rng(0), 128)
    assert tex.shape == (128, 128, 3) and tex.dtype == np.float32
    assert 0.2 < tex.mean() < 0.6 and tex.std() > 0.05
    # periodic structure at the thread period (8 px at 256 -> 4 px at 128)
    grey = tex.mean(axis=-1) - tex.mean()
    spectrum = np.abs(np.fft.rfft(grey, axis=1)).mean(axis=0)
    peak = int(np.argmax(spectrum[4:])) + 4
    assert 128 / peak == pytest.approx(4, rel=0.25)


def test_reused_when_complete(tmp_path: Path, monkeypatch) -> None:
    out = make_synthetic_carpet(tmp_path, **SMALL)
    stamp = (out / "train/good/000.png").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("regenerated an existing complete set")

    monkeypatch.setattr(synthetic, "synthesize_image", fail)
    assert make_synthetic_carpet(tmp_path, **SMALL) == out
    assert (out / "train/good/000.png").stat().st_mtime_ns == stamp


def test_other_settings_need_overwrite(tmp_path: Path) -> None:
    make_synthetic_carpet(tmp_path, **SMALL)
    with pytest.raises(DatasetError, match="other settings"):
        make_synthetic_carpet(tmp_path, seed=9, **SMALL)
    out = make_synthetic_carpet(tmp_path, seed=9, overwrite=True, **SMALL)
    assert is_complete(out) and [p.name for p in tmp_path.iterdir()] == ["carpet_synthetic"]


def test_interrupted_write_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    calls = {"n": 0}
    real = synthetic.synthesize_image

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "synthesize_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_carpet(tmp_path, **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_synthetic_carpet_dataset(tmp_path: Path) -> None:
    ds = SyntheticCarpet(tmp_path, "test", image_size=32, **SMALL)
    assert isinstance(ds, MVTecAD) and len(ds) == 7
    item = ds[6]
    assert item["label"] == 1 and item["defect"] == "thread" and item["image"].shape == (3, 32, 32)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_train"):
        make_synthetic_carpet(tmp_path, n_train=0)
    with pytest.raises(ValueError, match="unknown defect"):
        synthetic.add_defect(np.zeros((64, 64, 3), np.float32), "scratch", np.random.default_rng(0))
