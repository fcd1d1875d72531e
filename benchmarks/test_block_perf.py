"""One AllInOneBlock and an 8-block flow at FastFlow shapes, four providers side by side:

- ``altub``: altub_fast.AllInOneBlock with the default implementation (fused Triton kernels on
  CUDA; on the CPU the best CPU path);
- ``reference``: altub_fast.AllInOneBlock forced to the plain PyTorch reference (impl="torch");
- ``compiled``: the reference block under torch.compile;
- ``freia``: FrEIA 0.2's AllInOneBlock (dense 1x1-convolution permutation) with the same weights.

Modes: ``inference`` (forward under no_grad) and ``fwd_bwd`` (forward + backward of the FastFlow
loss). Each benchmark checks its output against the reference before timing. With benchmarks
disabled (a plain ``pytest``) one case per provider runs once at a tiny shape; the other cases and
the compiled provider (compilation alone takes tens of seconds) are deselected.
"""
import numpy as np
import pytest
import torch

import altub_fast
from _common import (BATCH, CONV3X3_ONLY, DEVICE, FASTFLOW_SHAPES, TINY_BATCH, TINY_SHAPE, fastflow_subnet,
                     interleaved_ratio, peak_memory, record, run_timed)

FrEIA = pytest.importorskip("FrEIA", reason="FrEIA==0.2 is a dev dependency")
from FrEIA.framework import SequenceINN as FrEIASequenceINN  # noqa: E402
from FrEIA.modules import AllInOneBlock as FrEIABlock  # noqa: E402

FULL = pytest.mark.full_benchmark
PROVIDERS = ["reference", "altub", pytest.param("compiled", marks=FULL), "freia"]
CASES = [(bb, i) for bb in FASTFLOW_SHAPES for i in range(3)]
CASE_PARAMS = [pytest.param(bb, i, id=f"{bb}-s{i}", marks=() if (bb, i) == CASES[0] else FULL) for bb, i in CASES]


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
        flow = torch.compile(flow)
    return flow


def loss_of(flow, x):
    z, jac = flow(x)
    return (0.5 * (z.float() ** 2).sum(dim=(1, 2, 3)) - jac).mean()


@pytest.mark.parametrize("level", ["block", "flow8"])
@pytest.mark.parametrize("mode", ["inference", "fwd_bwd"])
@pytest.mark.parametrize("backbone,scale", CASE_PARAMS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_block_perf(benchmark, provider, backbone, scale, mode, level):
    tiny = benchmark.disabled
    shape = TINY_SHAPE if tiny else FASTFLOW_SHAPES[backbone][scale]
    batch = TINY_BATCH if tiny else BATCH
    n_blocks = 1 if level == "block" else 8
    conv3 = CONV3X3_ONLY[backbone]
    flow = build_flow(provider, shape, n_blocks, conv3)
    ref = build_flow("reference", shape, n_blocks, conv3)
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)

    # correctness first, against the reference with the same weights
    with torch.no_grad():
        z, j = flow(x)
        z_ref, j_ref = ref(x)
    tol = 1e-3 if DEVICE.type == "cuda" else 1e-4
    torch.testing.assert_close(z.float(), z_ref.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(j.float(), j_ref.float(), atol=tol * max(1.0, j_ref.abs().max().item()), rtol=tol)

    def make_fn(net):
        if mode == "inference":
            def fn():
                with torch.no_grad():
                    return net(x)
            return fn
        params = [p for p in net.parameters() if p.requires_grad]

        def fn():
            return torch.autograd.grad(loss_of(net, x), params)
        return fn
    fn = make_fn(flow)
    C, H, W = shape
    elems = batch * C * H * W
    rounds = 5 if (DEVICE.type == "cpu" and level == "flow8") else 10
    run_timed(benchmark, fn, rounds=rounds)
    mem = peak_memory(fn) if mode == "fwd_bwd" else 0
    extra = {}
    if not tiny and provider != "reference":
        # interleaved A/B against the reference (and, for ours, against FrEIA) in this same run
        extra["vs_reference_interleaved"] = interleaved_ratio(make_fn(ref), fn, rounds=rounds)
        if provider == "altub":
            extra["vs_freia_interleaved"] = interleaved_ratio(make_fn(build_flow("freia", shape, n_blocks, conv3)),
                                                              fn, rounds=rounds)
    record(benchmark, (level, backbone, scale, mode), provider, bytes_moved=0,
           level=level, backbone=backbone, shape=[batch, C, H, W], mode=mode, elements=elems,
           peak_memory_bytes=mem, **extra)
