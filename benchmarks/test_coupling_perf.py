"""Benchmarks of AllInOneBlock's post-subnet step (``coupling_forward``), pytest-benchmark.

Providers side by side: ``triton`` (the fused kernels, altub_fast.ops.coupling), ``eager`` (the
reference, altub_fast.reference, in eager PyTorch) and ``compile`` (the reference under
``torch.compile``, inductor, static shapes). Modes: ``fwd`` (training forward: inputs require
grad), ``bwd`` (backward only, through a retained graph), ``fwdbwd``. Shapes: FastFlow's feature
maps at batch 32 (wide_resnet50_2: 256@64x64, 512@32x32, 1024@16x16; resnet18: 64@64x64,
128@32x32, 256@16x16) and one CFLOW-AD-like fiber batch (16384 x 512). float32.

Every benchmark first checks its result against the reference, then times. ``extra_info``: bytes
moved (counted below), GB/s, speedup over the eager reference measured earlier in the same run
(the table in gpu_check.sh recomputes speedups from the JSON), peak memory. Also: device copy
bandwidth (a clone of 1 GiB), and the training step of an 8-block flow (peak memory and time,
fused vs eager).

Real sizes run only with ``--benchmark-only`` on CUDA (resnet18's shapes with ``--full-sweep``).
Otherwise (plain ``pytest``, CPU, or ``--benchmark-disable``) every benchmark runs once on a tiny
version of its shape as a smoke test; on CPU the ``triton`` provider (Triton's interpreter is no
performance path) and the ``compile`` provider (minutes of C++ compilation for nothing) skip with
a reason.
"""
import math
import os

import pytest
import torch

import altub_fast
from altub_fast import reference

HAS_CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEVICE = "cuda" if HAS_CUDA else "cpu"

SHAPES = {  # name: (B, C, *spatial)
    "wrn50-s1": (32, 256, 64, 64),
    "wrn50-s2": (32, 512, 32, 32),
    "wrn50-s3": (32, 1024, 16, 16),
    "r18-s1": (32, 64, 64, 64),
    "r18-s2": (32, 128, 32, 32),
    "r18-s3": (32, 256, 16, 16),
    "cflow-fibers": (16384, 512),
}
TINY = {name: (2, min(s[1], 6), *([4] * (len(s) - 2))) for name, s in SHAPES.items()}
PROVIDERS = ["eager", "compile", "triton"]  # eager first: the others' speedups refer to it
MODES = ["fwd", "bwd", "fwdbwd"]
_EAGER_MS = {}  # (shape, mode) -> ms of the eager reference in this run

try:  # one static specialisation per shape: let dynamo keep them all
    import torch._dynamo

    for _knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, _knob):
            setattr(torch._dynamo.config, _knob, max(64, getattr(torch._dynamo.config, _knob)))
except Exception:  # pragma: no cover
    pass


def real_mode(request, benchmark) -> bool:
    return HAS_CUDA and request.config.getoption("benchmark_only", False) and not benchmark.disabled


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def run_bench(benchmark, real, fn):
    if real:
        return benchmark(fn)
    return benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)


def bytes_moved(shape, mode, elt=4):
    """HBM bytes a perfectly fused implementation moves (per-channel parameters, per-sample sums and
    the partial buffers are negligible): fwd reads x (C) and a (2*C2) and writes z (C); bwd reads gz,
    x, a and writes gx, ga."""
    B, C = shape[0], shape[1]
    n = B * math.prod(shape[2:])
    C2 = C // 2
    fwd = (C + 2 * C2 + C) * n * elt
    bwd = (C + C + 2 * C2 + C + 2 * C2) * n * elt
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[mode]


def make_problem(shape, seed=0):
    """Inputs (x, a, global_scale, global_offset, perm) and upstream gradients (gz, gld), drawn on
    the device (drawing 100+ MB on the CPU would cost more than the benchmark)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    B, C = shape[0], shape[1]
    sp = shape[2:]
    C2 = C // 2

    def rnd(*s, scale=1.0):
        return torch.randn(*s, generator=gen, device=DEVICE) * scale

    x = rnd(B, C, *sp).requires_grad_()
    a = rnd(B, 2 * C2, *sp, scale=3.0).requires_grad_()
    pshape = (1, C, *([1] * len(sp)))
    g = (reference.global_scale_init(1.0, "SOFTPLUS") + rnd(*pshape, scale=0.1)).requires_grad_()
    beta = rnd(*pshape, scale=0.1).requires_grad_()
    perm = torch.randperm(C, generator=gen, device=DEVICE)
    gz = rnd(B, C, *sp)
    gld = rnd(B)
    return (x, a, g, beta, perm), (gz, gld)


_COMPILED = None


def provider_fn(provider):
    global _COMPILED
    if provider == "eager":
        return reference.coupling_forward
    if provider == "compile":
        if _COMPILED is None:
            _COMPILED = torch.compile(reference.coupling_forward, dynamic=False)
        return _COMPILED
    from altub_fast.ops.coupling import coupling_forward_triton

    def triton_step(*inputs):  # (z, log_jac_det), as the reference returns them
        return tuple(coupling_forward_triton(*inputs)[:2])
    return triton_step


def skip_unrunnable(provider, real):
    if provider == "triton" and DEVICE == "cpu":
        pytest.skip("no CUDA device: Triton's interpreter is a correctness tool, not a performance path")
    if provider == "compile" and DEVICE == "cpu":
        pytest.skip("no CUDA device: torch.compile's CPU build costs minutes and times nothing of interest")


def assert_matches(out, ref, what):
    for o, r in zip(out, ref):
        scale = max(1.0, r.detach().abs().max().item())
        torch.testing.assert_close(o.detach().float(), r.detach().float(), rtol=1e-4, atol=1e-4 * scale,
                                   msg=lambda m: f"{what}: {m}")


#: resnet18's shapes run in the full sweep only (``--full-sweep``); the reduced default keeps
#: wide_resnet50_2's and the CFLOW-AD fibers (the tiny versions of all of them are the same shape).
SHAPE_PARAMS = [pytest.param(n, marks=pytest.mark.full_benchmark if n.startswith("r18") else ()) for n in SHAPES]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape_name", SHAPE_PARAMS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_coupling_step(benchmark, request, provider, shape_name, mode):
    real = real_mode(request, benchmark)
    skip_unrunnable(provider, real)
    shape = SHAPES[shape_name] if real else TINY[shape_name]
    inputs, (gz, gld) = make_problem(shape)
    x, a, g, beta, perm = inputs
    fn = provider_fn(provider)
    benchmark.group = f"coupling-{shape_name}-{mode}"

    # correctness first, against the eager reference (forward and every gradient)
    out = fn(*inputs)
    ref = reference.coupling_forward(*inputs)
    assert_matches(out, ref, f"{provider} {shape_name} forward")
    grads = torch.autograd.grad(out, [x, a, g, beta], [gz, gld], retain_graph=True)
    rgrads = torch.autograd.grad(ref, [x, a, g, beta], [gz, gld])
    assert_matches(grads, rgrads, f"{provider} {shape_name} backward")
    del ref, rgrads, grads
    sync()

    if mode == "fwd":
        def step():
            o = fn(*inputs)
            sync()
            return o
    elif mode == "bwd":
        def step():
            r = torch.autograd.grad(out, [x, a, g, beta], [gz, gld], retain_graph=True)
            sync()
            return r
    else:
        def step():
            o = fn(*inputs)
            r = torch.autograd.grad(o, [x, a, g, beta], [gz, gld])
            sync()
            return r

    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run_bench(benchmark, real, step)
    stats = benchmark.stats.stats if benchmark.stats is not None else None
    info = benchmark.extra_info
    info.update(provider=provider, shape=shape_name, mode=mode, dims=list(shape), dtype="float32",
                real=real, device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu")
    nbytes = bytes_moved(shape, mode)
    info["bytes"] = nbytes
    if stats is not None and stats.median > 0:
        ms = stats.median * 1e3
        info["ms"] = ms
        info["GB/s"] = nbytes / stats.median / 1e9
        if provider == "eager":
            _EAGER_MS[(shape_name, mode)] = ms
        elif (shape_name, mode) in _EAGER_MS:
            info["speedup_vs_eager"] = _EAGER_MS[(shape_name, mode)] / ms
    if DEVICE == "cuda":
        info["peak_mem_MB"] = torch.cuda.max_memory_allocated() / 2**20


def test_copy_bandwidth(benchmark, request):
    """Device copy bandwidth (clone of 1 GiB: read + write), the yardstick for the GB/s above."""
    real = real_mode(request, benchmark)
    n = (2**30 // 4) if real else 1024
    src = torch.empty(n, dtype=torch.float32, device=DEVICE).uniform_()
    benchmark.group = "copy"

    def step():
        y = src.clone()
        sync()
        return y

    assert torch.equal(step(), src)
    run_bench(benchmark, real, step)
    info = benchmark.extra_info
    info.update(provider="copy", shape=f"{n * 4 / 2**30:.3g}GiB", mode="clone", bytes=2 * n * 4, real=real)
    if benchmark.stats is not None and benchmark.stats.stats.median > 0:
        info["ms"] = benchmark.stats.stats.median * 1e3
        info["GB/s"] = 2 * n * 4 / benchmark.stats.stats.median / 1e9


def _flow(C, sp, n_blocks, impl):
    rank = len(sp)

    def subnet(k):
        def ctor(c_in, c_out):
            if rank == 0:
                return torch.nn.Sequential(torch.nn.Linear(c_in, c_in), torch.nn.ReLU(), torch.nn.Linear(c_in, c_out))
            return torch.nn.Sequential(torch.nn.Conv2d(c_in, c_in, k, padding=k // 2), torch.nn.ReLU(),
                                       torch.nn.Conv2d(c_in, c_out, k, padding=k // 2))
        return ctor

    flow = altub_fast.SequenceINN(C, *sp)
    for i in range(n_blocks):
        flow.append(altub_fast.AllInOneBlock, subnet_constructor=subnet(3 if i % 2 == 0 else 1),
                    affine_clamping=2.0, permute_soft=False, impl=impl)
    return flow.to(DEVICE)


_FLOW_PEAK = {}


@pytest.mark.parametrize("provider", ["eager", "triton"])
def test_flow8_training_step(benchmark, request, provider):
    """One training step (forward with the AltUB base, backward) of an 8-block FastFlow flow at
    wide_resnet50_2's first scale, batch 32: peak memory and time, fused vs eager."""
    real = real_mode(request, benchmark)
    skip_unrunnable(provider, real)
    B, C, sp = (32, 256, (64, 64)) if real else (2, 4, (4, 4))
    torch.manual_seed(0)
    impl = "torch" if provider == "eager" else "triton"
    flow = _flow(C, sp, 8, impl)
    base = altub_fast.LearnableGaussian(C).to(DEVICE)
    x = torch.randn(B, C, *sp, device=DEVICE)
    benchmark.group = "flow8-train"

    def step():
        flow.zero_grad(set_to_none=True)
        base.zero_grad(set_to_none=True)
        out = flow.forward_loglik(x, base=base)
        loss = -out.log_prob.mean() / (C * math.prod(sp))
        loss.backward()
        sync()
        return loss.detach()

    # correctness: same loss and gradients as the eager reference flow with the same weights
    loss = step()
    grads = [p.grad.clone() for p in flow.parameters() if p.grad is not None]
    if provider != "eager":
        ref_flow = _flow(C, sp, 8, "torch")
        ref_flow.load_state_dict(flow.state_dict())
        ref_flow.zero_grad(set_to_none=True)
        base.zero_grad(set_to_none=True)
        ref_out = ref_flow.forward_loglik(x, base=base)
        ref_loss = -ref_out.log_prob.mean() / (C * math.prod(sp))
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-4, atol=1e-4)
        for gt, gr in zip(grads, [p.grad for p in ref_flow.parameters() if p.grad is not None]):
            torch.testing.assert_close(gt, gr, rtol=5e-3, atol=5e-3 * max(1.0, gr.abs().max().item()))
        del ref_flow, ref_out, ref_loss
    del grads
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
        step()
        peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
        _FLOW_PEAK[provider] = peak
        benchmark.extra_info["peak_mem_MB"] = peak
        if provider != "eager" and "eager" in _FLOW_PEAK:
            benchmark.extra_info["peak_mem_vs_eager"] = peak / _FLOW_PEAK["eager"]
    run_bench(benchmark, real, step)
    info = benchmark.extra_info
    info.update(provider=provider, shape=f"flow8-{C}@{'x'.join(map(str, sp))}-b{B}", mode="train", real=real)
    if benchmark.stats is not None and benchmark.stats.stats.median > 0:
        info["ms"] = benchmark.stats.stats.median * 1e3
