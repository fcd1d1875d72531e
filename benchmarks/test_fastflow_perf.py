"""FastFlow end to end: a training step (on cached backbone features, as the trainer runs it) and
inference (images -> anomaly maps), in images/s, with peak memory of the training step.

Providers side by side in one run, all with the same weights and the same score mode
("fastflow", the published map, which FrEIA's block can also give):
- ``altub``: altub_fast as a user gets it (ALTUB_FAST_IMPL unset: the fused Triton kernels on
  CUDA; on the CPU the CPU fast path of :mod:`altub_fast.nn.cpu_fast`: channels_last backbone
  with its BatchNorms folded, subnets' convolutions prepacked in inference);
- ``reference``: the plain PyTorch path everywhere (impl="torch");
- ``compiled``: the ``altub`` model after ``model.compile()`` (inductor);
- ``freia``: the same model built from FrEIA 0.2's AllInOneBlock (dense permutation), the peer, with
  a plain backbone (impl="torch").
``altub`` and ``compiled`` record interleaved A/B ratios against the reference and FrEIA.

Backbones with random weights (timing does not depend on them): efficientnet_lite0 (24/40/112
channels), resnet18, wide_resnet50_2. Sizes (conftest's ``bench_scale``): a plain ``pytest`` runs
one tiny case per provider but ``compiled`` (64 px, 2 flow steps); ``--benchmark-only`` runs
efficientnet_lite0 at 256 px and resnet18 at 128 px, batch 4; ``--full-sweep`` adds
efficientnet_lite0 and resnet18 at 256 px with batch 1 and 8 (``compiled`` here, inference; and a
training step at batch 8) and wide_resnet50_2 at 256 px.
"""
import numpy as np
import pytest
import torch

from _common import (DEVICE, ON_GPU, allow_many_compiles, as_installed, interleaved_ratio, peak_memory, record,
                     run_timed)

from altub_fast.models import FastFlow

FULL = pytest.mark.full_benchmark
TIMED = pytest.mark.timed_benchmark
PROVIDERS = ["reference", "altub", "compiled", "freia"]
GPU_BATCH = 32
#: (backbone, image size, batch on the CPU, marks for the plain providers)
CASES = [
    ("efficientnet_lite0", 256, 4, ()),
    ("resnet18", 128, 4, TIMED),
    ("efficientnet_lite0", 256, 1, FULL),
    ("efficientnet_lite0", 256, 8, FULL),
    ("resnet18", 256, 1, FULL),
    ("resnet18", 256, 8, FULL),
    ("wide_resnet50_2", 256, 4, FULL),
]
#: compiled runs only here (its compilation costs minutes on a small CPU): (case index, mode)
COMPILED = {(2, "inference"), (3, "inference"), (4, "inference"), (5, "inference"), (3, "train_step"),
            (5, "train_step")}


def _params():
    out = []
    for provider in PROVIDERS:
        for k, (bb, size, batch, marks) in enumerate(CASES):
            for mode in ("train_step", "inference"):
                if provider == "compiled":
                    if (k, mode) not in COMPILED:
                        continue
                    marks = FULL
                out.append(pytest.param(provider, bb, size, batch, mode, marks=marks,
                                        id=f"{provider}-{bb}-{size}-b{batch}-{mode}"))
    return out


def build(provider, backbone, image_size, flow_steps=None):
    np.random.seed(0)
    torch.manual_seed(0)
    impl = None if provider in ("altub", "compiled") else "torch"
    kw = dict(block="freia") if provider == "freia" else {}
    m = FastFlow(backbone, image_size=image_size, pretrained=False, altub=True, flow_steps=flow_steps,
                 score="fastflow", impl=impl, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained-looking base, so the AltUB terms are exercised
        for b in m.bases:
            b.mu.copy_(0.1 * torch.randn(b.mu.shape, generator=g))
            b.log_sigma.copy_(0.1 * torch.randn(b.log_sigma.shape, generator=g))
    m = m.to(DEVICE)
    if provider == "compiled":
        allow_many_compiles()
        m.compile()
    return m


def make_fn(m, provider, mode, images, feats):
    if mode == "inference":
        def fn():
            with torch.no_grad():
                return m.anomaly_map(images)
    else:
        opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-6)

        def fn():
            opt.zero_grad(set_to_none=True)
            loss = m(feats).loss
            loss.backward()
            opt.step()
            return loss
    return as_installed(fn) if provider in ("altub", "compiled") else fn


@pytest.mark.parametrize("provider,backbone,image_size,cpu_batch,mode", _params())
def test_fastflow_perf(benchmark, bench_scale, provider, backbone, image_size, cpu_batch, mode):
    pytest.importorskip("timm" if backbone != "efficientnet_lite0" else "efficientnet_lite_pytorch",
                        reason="the backbone's package is a dependency of the models")
    freia_ok = True
    try:
        import FrEIA  # noqa: F401
    except ImportError:
        freia_ok = False
    if provider == "freia" and not freia_ok:
        pytest.skip("FrEIA==0.2 (a dev dependency) is not installed")
    tiny = bench_scale == "tiny"
    size = 64 if tiny else image_size
    batch = 2 if tiny else (GPU_BATCH if ON_GPU and cpu_batch == 4 else cpu_batch)
    steps = 2 if tiny else None
    model = build(provider, backbone, size, steps)
    ref = build("reference", backbone, size, steps)
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    feats = ref.extract_features(images)   # the trainer caches plain features
    with torch.no_grad():
        as_installed(model.anomaly_map)(images)   # the CPU path folds and packs on a first call
        maps, _ = as_installed(model.anomaly_map)(images)
        maps_ref, _ = ref.anomaly_map(images)
    torch.testing.assert_close(maps, maps_ref, atol=1e-4, rtol=1e-3)

    fn = make_fn(model, provider, mode, images, feats)
    run_timed(benchmark, fn, rounds={"tiny": 1, "reduced": 3}.get(bench_scale, 5) if not ON_GPU else 20)
    extra = {}
    if not tiny:
        extra["images_per_s"] = batch / benchmark.stats.stats.mean
        if provider in ("altub", "compiled"):
            ab = 5
            extra["vs_reference_interleaved"] = interleaved_ratio(make_fn(ref, "reference", mode, images, feats), fn,
                                                                  rounds=ab)
            if freia_ok:
                freia = build("freia", backbone, size, steps)
                extra["vs_freia_interleaved"] = interleaved_ratio(make_fn(freia, "freia", mode, images, feats), fn,
                                                                  rounds=ab)
    record(benchmark, ("fastflow", backbone, size, batch, mode), provider, level=f"fastflow_{mode}",
           backbone=backbone, shape=[batch, 3, size, size], mode=mode, bench_scale=bench_scale,
           peak_memory_bytes=peak_memory(fn) if mode == "train_step" else 0, **extra)
