"""The AUROC side of the comparison: train altub_fast and the reference implementation (FrEIA
0.2's AllInOneBlock, dense permutation) on the same data and seed, score both, and require the
image and pixel AUROC to agree within 0.002.

FastFlow on the offline efficientnet_lite0 backbone. ``pytest --benchmark-only --full-sweep``: the
synthetic carpet and the real ``shared/data/magnetic_tile`` (the whole category), at 256 px for 10
epochs; ``pytest --benchmark-only`` (reduced): the synthetic carpet at 128 px for 5 epochs; a plain
``pytest`` runs the synthetic case at 64 px for 1 epoch as a smoke test. Both run as a user gets
them (ALTUB_FAST_IMPL unset): on the CPU both models' backbones take the CPU fast path, so they see
the same features and the comparison is of the flow blocks (with the reference on the plain
backbone, the full sweep's magnetic_tile case failed once the fast path folded the BatchNorms; on
the same features the two agree to 4 decimals). The metrics go to ``extra_info``;
the time is one whole train-and-score run of the altub_fast model.
"""
from types import SimpleNamespace

import pytest

from _common import DEVICE, as_installed

from altub_fast import eval as cli
from altub_fast.data import MVTecAD, make_synthetic_carpet

pytest.importorskip("FrEIA", reason="FrEIA==0.2 is a dev dependency")

FULL = pytest.mark.full_benchmark
TOLERANCE = 0.002


def _args(**kw):
    """The eval command's own defaults (so new options are covered), with the comparison's settings:
    both runs score with the FastFlow paper's map, the one FrEIA's block (no per-pixel log-det) gives."""
    base = vars(cli.build_parser().parse_args([]))
    base.update(model="fastflow", backbone="efficientnet_lite0", quiet=True, compare_reference=True,
                score="fastflow", image_size=256, max_epochs=100)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize("dataset", ["synthetic", pytest.param("magnetic_tile", marks=FULL)])
def test_auroc_agrees_with_reference(benchmark, bench_scale, dataset, tmp_path, request):
    tiny = bench_scale == "tiny"
    if dataset == "synthetic":
        root = tmp_path / "data"
        if tiny:
            make_synthetic_carpet(root, seed=0, n_train=12, n_test_good=6, n_test_defect=2, size=64)
        else:
            make_synthetic_carpet(root, seed=0)
        category = "carpet_synthetic"
        size, epochs = {"tiny": (64, 1), "reduced": (128, 5), "full": (256, 10)}[bench_scale]
        args = _args(image_size=size, epochs=epochs, flow_steps=2 if tiny else None)
    else:
        root = request.getfixturevalue("shared_data")
        category = "magnetic_tile"
        args = _args(image_size=256, epochs=10)
    train_ds = MVTecAD(root, category, split="train", image_size=args.image_size)
    test_ds = MVTecAD(root, category, split="test", image_size=args.image_size)
    records = {}

    def run(label, block):
        records[label] = cli.run_one(args, label, train_ds=train_ds, test_ds=test_ds, device=str(DEVICE),
                                     impl=None, block=block, out_dir=tmp_path / "out").record
    ours_run = as_installed(lambda: run("altub_fast", "altub"))
    if tiny:
        benchmark(ours_run)
    else:
        benchmark.pedantic(ours_run, rounds=1, iterations=1)
    as_installed(lambda: run("reference", "freia"))()
    ours, ref = records["altub_fast"]["metrics"], records["reference"]["metrics"]
    benchmark.extra_info.update(
        provider="altub", level="auroc", dataset=dataset, epochs=args.epochs, image_size=args.image_size,
        device=str(DEVICE), altub_fast=ours, reference=ref, bench_scale=bench_scale,
        train_images_per_s={k: r["train_images_per_s"] for k, r in records.items()},
        inference_images_per_s={k: r["inference_images_per_s"] for k, r in records.items()})
    for k in ("image_auroc", "pixel_auroc"):
        assert abs(ours[k] - ref[k]) <= TOLERANCE, (k, ours[k], ref[k])
    if not tiny:
        assert ours["pixel_auroc"] > 0.6, "a real backbone should be clearly above chance"
