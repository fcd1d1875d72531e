"""One AllInOneBlock and an 8-block flow at FastFlow shapes, four providers side by side:

- ``altub``: altub_fast.AllInOneBlock as a user gets it (ALTUB_FAST_IMPL unset: the fused Triton
  kernels on CUDA; on the CPU the plain PyTorch path, with the subnets' convolutions prepacked in
  inference: :mod:`altub_fast.nn.cpu_fast`);
- ``reference``: altub_fast.AllInOneBlock forced to the plain PyTorch reference (impl="torch");
- ``compiled``: the reference flow under torch.compile (inductor);
- ``freia``: FrEIA 0.2's AllInOneBlock (dense 1x1-convolution permutation) with the same weights.

Modes: ``inference`` (forward under no_grad) and ``fwd_bwd`` (forward + backward of the FastFlow
loss). Each benchmark checks its output against the reference before timing, and ``altub`` and
``compiled`` also record an interleaved A/B ratio against FrEIA and against the reference (not for
``altub``'s training on the CPU, which is the reference itself).

Sizes (conftest's ``bench_scale``): a plain ``pytest`` runs each provider but ``compiled`` once at
a tiny shape; ``pytest --benchmark-only`` (reduced) runs wide_resnet50_2's first and last scale
(C = 256 and 1024) at half the side and batch 2 on the CPU, ``compiled`` at one block of C = 1024;
``--full-sweep`` runs wide_resnet50_2 and resnet18 shapes at batch 4 (CPU) / 32 (GPU), every provider
everywhere.
"""
import numpy as np
import pytest
import torch

import altub_fast
from _common import (CONV3X3_ONLY, DEVICE, FASTFLOW_SHAPES, allow_many_compiles, as_installed, batch_for,
                     fastflow_subnet, interleaved_ratio, peak_memory, record, run_timed, sized)

try:
    from FrEIA.framework import SequenceINN as FrEIASequenceINN
    from FrEIA.modules import AllInOneBlock as FrEIABlock
except ImportError:  # FrEIA==0.2 is a dev dependency; without it only the freia provider skips
    FrEIASequenceINN = FrEIABlock = None

FULL = pytest.mark.full_benchmark
TIMED = pytest.mark.timed_benchmark
PROVIDERS = ["reference", "altub", "compiled", "freia"]
LEVELS = ["block", "flow8"]


def _marks(provider, backbone, scale, level):
    if backbone != "wide_resnet50_2":
        return FULL
    if provider == "compiled":   # compilation alone takes tens of seconds on a small CPU
        return TIMED if (scale == 2 and level == "block") else FULL
    return {0: (), 1: FULL, 2: TIMED}[scale]   # reduced: the smallest and the largest channel count


CASES = [pytest.param(p, bb, i, lv, id=f"{p}-{bb}-s{i}-{lv}", marks=_marks(p, bb, i, lv))
         for p in PROVIDERS for bb in FASTFLOW_SHAPES for i in range(3) for lv in LEVELS]


def build_flow(provider, shape, n_blocks, conv3x3_only):
    np.random.seed(0)
    torch.manual_seed(0)
    C, H, W = shape
    seq_cls, block_cls = (FrEIASequenceINN, FrEIABlock) if provider == "freia" else \
        (altub_fast.SequenceINN, altub_fast.AllInOneBlock)
    flow = seq_cls(C, H, W)
    for i in range(n_blocks):
        k = 3 if (conv3x3_only or i % 2 == 0) else 1
        kw = dict(subnet_constructor=fastflow_subnet(k), affine_clamping=2.0, permute_soft=False)
        if provider != "freia":
            kw["impl"] = "torch" if provider in ("reference", "compiled") else None
        flow.append(block_cls, **kw)
    # move the global affine off its init so every term is exercised
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for b in flow:
            b.global_scale.add_(0.1 * torch.randn(b.global_scale.shape, generator=g))
            b.global_offset.add_(0.1 * torch.randn(b.global_offset.shape, generator=g))
    flow = flow.to(DEVICE)
    if provider == "compiled":
        allow_many_compiles()
        flow = torch.compile(flow)
    return flow


def loss_of(flow, x):
    z, jac = flow(x)
    return (0.5 * (z.float() ** 2).sum(dim=(1, 2, 3)) - jac).mean()


def make_fn(net, x, mode, provider):
    if mode == "inference":
        def fn():
            with torch.no_grad():
                return net(x)
    else:
        params = [p for p in net.parameters() if p.requires_grad]

        def fn():
            return torch.autograd.grad(loss_of(net, x), params)
    return as_installed(fn) if provider == "altub" else fn


@pytest.mark.parametrize("mode", ["inference", "fwd_bwd"])
@pytest.mark.parametrize("provider,backbone,scale,level", CASES)
def test_block_perf(benchmark, bench_scale, provider, backbone, scale, level, mode):
    if provider == "freia" and FrEIABlock is None:
        pytest.skip("FrEIA==0.2 (a dev dependency) is not installed")
    shape = sized(FASTFLOW_SHAPES[backbone][scale], bench_scale)
    batch = batch_for(bench_scale)
    n_blocks = 1 if level == "block" else 8
    conv3 = CONV3X3_ONLY[backbone]
    flow = build_flow(provider, shape, n_blocks, conv3)
    ref = build_flow("reference", shape, n_blocks, conv3)
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)

    # correctness first, against the reference with the same weights
    with torch.no_grad():
        if provider == "altub":
            as_installed(flow)(x)             # the CPU path packs its subnets on a first call ...
        z, j = as_installed(flow)(x) if provider == "altub" else flow(x)   # ... and runs them packed here
        z_ref, j_ref = ref(x)
    tol = 1e-3 if DEVICE.type == "cuda" else 1e-4
    torch.testing.assert_close(z.float(), z_ref.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(j.float(), j_ref.float(), atol=tol * max(1.0, j_ref.abs().max().item()), rtol=tol)

    fn = make_fn(flow, x, mode, provider)
    C, H, W = shape
    cpu = DEVICE.type == "cpu"
    rounds = {"tiny": 1, "reduced": 3 if (cpu and level == "flow8") else 5,
              "full": 5 if (cpu and level == "flow8") else 10}[bench_scale]
    run_timed(benchmark, fn, rounds=rounds)
    mem = peak_memory(fn) if mode == "fwd_bwd" else 0
    extra = {}
    if bench_scale != "tiny" and provider in ("altub", "compiled"):
        # interleaved A/B against the reference and against FrEIA in this same run
        ab_rounds = rounds if bench_scale == "reduced" else max(rounds, 5)
        if not (provider == "altub" and cpu and mode != "inference"):   # CPU training: the reference itself
            extra["vs_reference_interleaved"] = interleaved_ratio(make_fn(ref, x, mode, "reference"), fn,
                                                                  rounds=ab_rounds)
        if FrEIABlock is not None:
            freia = build_flow("freia", shape, n_blocks, conv3)
            extra["vs_freia_interleaved"] = interleaved_ratio(make_fn(freia, x, mode, "freia"), fn, rounds=ab_rounds)
    record(benchmark, (level, backbone, scale, mode), provider, bytes_moved=0,
           level=level, backbone=backbone, shape=[batch, C, H, W], mode=mode, elements=batch * C * H * W,
           peak_memory_bytes=mem, bench_scale=bench_scale, **extra)
