"""MVTecAD loader: layout, transforms, errors, and the real magnetic_tile set."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from altub_fast.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MVTEC_CATEGORIES,
    DatasetError,
    DatasetNotFoundError,
    MVTecAD,
    denormalize,
)

def _save(path: Path, array: np.ndarray, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A tiny category 'widget': mixed formats and sizes, a greyscale image, an empty defect mask."""
    cat = tmp_path / "widget"
    _save(cat / "train/good/000.png", _rgb(40, 60, 0))
    _save(cat / "train/good/001.png", _rgb(50, 50, 1)[..., 0])  # greyscale
    _save(cat / "train/good/002.jpg", _rgb(30, 20, 2), quality=95)
    _save(cat / "train/good/003.bmp", _rgb(32, 32, 3))
    (cat / "train/good/notes.txt").write_text("not an image")
    _save(cat / "test/good/000.png", _rgb(32, 32, 4))
    _save(cat / "test/crack/000.png", _rgb(64, 64, 5))
    half = np.zeros((64, 64), np.uint8)
    half[:, :32] = 255
    _save(cat / "ground_truth/crack/000_mask.png", half)
    _save(cat / "test/crack/001.png", _rgb(64, 64, 6))
    levels = np.zeros((64, 64), np.uint8)
    levels[:32] = 127  # just below half scale: background
    levels[32:] = 128  # just above: defect
    _save(cat / "ground_truth/crack/001_mask.png", levels)
    _save(cat / "test/smudge/000.png", _rgb(32, 32, 7))
    _save(cat / "ground_truth/smudge/000_mask.png", np.zeros((32, 32), np.uint8))  # empty mask
    return tmp_path


def test_categories_and_constants(root: Path) -> None:
    assert MVTecAD.categories(root) == ["widget"]
    assert len(MVTEC_CATEGORIES) == 15 and "carpet" in MVTEC_CATEGORIES and "zipper" in MVTEC_CATEGORIES


def test_train_items(root: Path) -> None:
    ds = MVTecAD(root, "widget", "train", image_size=32)
    assert len(ds) == 4  # the .txt file is ignored
    assert [Path(s.path).name for s in ds.samples] == ["000.png", "001.png", "002.jpg", "003.bmp"]
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {"image", "mask", "label", "defect", "path"}
        assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (1, 32, 32) and item["mask"].dtype == torch.float32
        assert item["mask"].sum() == 0 and item["label"] == 0 and item["defect"] == "good"


def test_greyscale_becomes_three_equal_channels(root: Path) -> None:
    img = MVTecAD(root, "widget", "train", image_size=50, normalize=False)[1]["image"]
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])


def test_normalisation_switch(root: Path) -> None:
    raw = MVTecAD(root, "widget", "train", image_size=24, normalize=False)[0]["image"]
    norm = MVTecAD(root, "widget", "train", image_size=24)[0]["image"]
    assert 0.0 <= raw.min() and raw.max() <= 1.0
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(norm, (raw - mean) / std)
    torch.testing.assert_close(denormalize(norm), raw, atol=1e-6, rtol=0)


def test_resize_non_square_and_no_resize_identity(root: Path) -> None:
    ds = MVTecAD(root, "widget", "train", image_size=(20, 36), normalize=False)
    assert ds[0]["image"].shape == (3, 20, 36)
    same = MVTecAD(root, "widget", "train", image_size=(40, 60), normalize=False)[0]["image"]
    expected = torch.from_numpy(_rgb(40, 60, 0).astype(np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(same, expected)


def test_test_split_labels_masks(root: Path) -> None:
    ds = MVTecAD(root, "widget", "test", image_size=32)
    assert [(s.defect, s.label) for s in ds.samples] == [
        ("good", 0), ("crack", 1), ("crack", 1), ("smudge", 1)]
    assert ds.labels == [0, 1, 1, 1] and ds.defects == ["crack", "smudge"]
    assert ds.samples[0].mask_path is None
    half = ds[1]["mask"][0]
    assert torch.all(half[:, :16] == 1) and torch.all(half[:, 16:] == 0)  # nearest, no blur at the edge
    levels = ds[2]["mask"][0]
    assert torch.all(levels[:16] == 0) and torch.all(levels[16:] == 1)  # 127 -> 0, 128 -> 1
    empty = ds[3]
    assert empty["label"] == 1 and empty["mask"].sum() == 0  # defective with empty mask is allowed
    assert set(torch.unique(ds[1]["mask"]).tolist()) <= {0.0, 1.0}


def test_dataloader_collates(root: Path) -> None:
    batch = next(iter(torch.utils.data.DataLoader(MVTecAD(root, "widget", "test", 16), batch_size=4)))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["mask"].shape == (4, 1, 16, 16)
    assert batch["label"].tolist() == [0, 1, 1, 1] and len(batch["path"]) == 4


def test_sixteen_bit_greyscale(tmp_path: Path) -> None:
    arr = np.full((8, 8), 65535, np.uint16)
    arr[:4] = 0
    _save(tmp_path / "c/train/good/0.png", arr)
    img = MVTecAD(tmp_path, "c", "train", image_size=8, normalize=False)[0]["image"]
    assert img.shape == (3, 8, 8) and img[:, :4].max() == 0 and img[:, 4:].min() == 1


def test_root_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError, match="nowhere") as info:
        MVTecAD(missing, "widget")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)


def test_category_missing_lists_found(root: Path) -> None:
    with pytest.raises(DatasetError, match=r"'carpet' not found.*widget"):
        MVTecAD(root, "carpet")


def test_missing_mask_names_image(root: Path) -> None:
    (root / "widget/ground_truth/crack/001_mask.png").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"crack/001\.png has no mask.*001_mask\.png"):
        MVTecAD(root, "widget", "test")
    MVTecAD(root, "widget", "train")  # the train split does not need masks


def test_missing_mask_folder_in_a_masked_category_names_the_image(root: Path) -> None:
    # ground_truth/ exists but holds no folder for this defect: still an error, naming the file
    _save(root / "widget/test/dent/000.png", _rgb(32, 32, 9))
    with pytest.raises(DatasetNotFoundError, match=r"dent/000\.png has no mask.*ground_truth/dent/000_mask\.png"):
        MVTecAD(root, "widget", "test")


def test_category_without_masks_loads_with_masks_absent(root: Path) -> None:
    import shutil

    shutil.rmtree(root / "widget/ground_truth")
    ds = MVTecAD(root, "widget", "test", image_size=16)
    assert not ds.has_masks and ds.labels == [0, 1, 1, 1]
    assert all(s.mask_path is None for s in ds.samples)
    for i in range(len(ds)):
        assert set(ds[i]) == {"image", "label", "defect", "path"}
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert "mask" not in batch and batch["label"].tolist() == [0, 1, 1, 1]
    assert MVTecAD(root, "widget", "train").has_masks   # good images: their masks are known to be empty
    assert MVTecAD(root, "widget", "test").has_masks is False


def test_validation_split(root: Path) -> None:
    assert not MVTecAD.has_validation(root, "widget")
    with pytest.raises(DatasetNotFoundError, match=r"validation folder not found: .*validation/good"):
        MVTecAD(root, "widget", "validation")
    _save(root / "widget/validation/good/000.png", _rgb(32, 32, 10))
    _save(root / "widget/validation/good/001.png", _rgb(32, 32, 11))
    assert MVTecAD.has_validation(root, "widget")
    ds = MVTecAD(root, "widget", "validation", image_size=16)
    assert len(ds) == 2 and ds.labels == [0, 0] and ds.has_masks
    assert [Path(p).name for p in ds.paths] == ["000.png", "001.png"]
    assert "validation" in ds.paths[0] and ds[1]["mask"].sum() == 0


def test_corrupt_image_named_at_getitem(root: Path) -> None:
    bad = root / "widget/train/good/002.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    ds = MVTecAD(root, "widget", "train")
    ds[0]
    with pytest.raises(DatasetError, match="002.jpg"):
        ds[2]


def test_truncated_png_named(root: Path) -> None:
    good = root / "widget/train/good/000.png"
    good.write_bytes(good.read_bytes()[:200])
    with pytest.raises(DatasetError, match="000.png"):
        MVTecAD(root, "widget", "train")[0]


def test_empty_train_folder(root: Path) -> None:
    for p in (root / "widget/train/good").iterdir():
        p.unlink()
    with pytest.raises(DatasetError, match=r"no images in training folder .*train/good"):
        MVTecAD(root, "widget", "train")


def test_mask_size_mismatch(root: Path) -> None:
    _save(root / "widget/ground_truth/crack/000_mask.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(DatasetError, match="000_mask.png is 10x10"):
        MVTecAD(root, "widget", "test")[1]


def test_bad_arguments(root: Path) -> None:
    with pytest.raises(ValueError, match="split"):
        MVTecAD(root, "widget", "val")
    with pytest.raises(ValueError, match="image_size"):
        MVTecAD(root, "widget", image_size=0)


def test_magnetic_tile_loads_unchanged(shared_data) -> None:
    MAGNETIC_ROOT = shared_data
    assert "magnetic_tile" in MVTecAD.categories(MAGNETIC_ROOT)
    train = MVTecAD(MAGNETIC_ROOT, "magnetic_tile", "train", image_size=64)
    test = MVTecAD(MAGNETIC_ROOT, "magnetic_tile", "test", image_size=64)
    assert len(train) == 800 and len(test) == 544
    assert test.labels.count(0) == 152 and test.labels.count(1) == 392
    per_defect = {d: sum(s.defect == d for s in test.samples) for d in test.defects}
    assert per_defect == {"blowhole": 115, "break": 85, "crack": 57, "fray": 32, "uneven": 103}

    # greyscale, varying sizes: a handful of items only
    sizes = {Image.open(s.path).size for s in train.samples[:20]}
    assert len(sizes) > 1
    raw = MVTecAD(MAGNETIC_ROOT, "magnetic_tile", "train", image_size=64, normalize=False)[0]["image"]
    assert raw.shape == (3, 64, 64) and torch.equal(raw[0], raw[1])
    blowhole = test[test.labels.index(1)]
    assert blowhole["defect"] == "blowhole" and blowhole["mask"].sum() > 0

    # the four empty 'uneven' masks: found from the files' bounding boxes, one loaded
    empty = [i for i, s in enumerate(test.samples)
             if s.mask_path is not None and Image.open(s.mask_path).getbbox() is None]
    assert len(empty) == 4 and {test.samples[i].defect for i in empty} == {"uneven"}
    item = test[empty[0]]
    assert item["label"] == 1 and item["mask"].sum() == 0


def test_bottle_has_no_masks(shared_data) -> None:
    if not (shared_data / "bottle").is_dir():
        pytest.skip("shared/data/bottle not found")
    test = MVTecAD(shared_data, "bottle", "test", image_size=32)
    assert not test.has_masks and len(test) == 83
    assert test.labels.count(0) == 20 and test.defects == ["broken_large", "broken_small", "contamination"]
    item = test[test.labels.index(1)]
    assert "mask" not in item and item["label"] == 1 and item["image"].shape == (3, 32, 32)
    assert len(MVTecAD(shared_data, "bottle", "train", image_size=32)) == 209
