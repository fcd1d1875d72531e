"""The fused coupling kernels (altub_fast.ops.coupling) against the reference (altub_fast.reference).

Layers (ARCHITECTURE.md "Tests"): 2. the launchers against the reference; 3. the autograd custom op
against the reference's autograd, every input and parameter gradient, random upstream gradients
(some outputs without one); 4. functional API, op and Module (AllInOneBlock impl="triton" vs
impl="torch") agree, forward and backward of every parameter. Plus: the launch counter behind
ALTUB_FAST_IMPL=triton, errors, determinism, torch.compile, autocast, and CUDA-only cases.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set below before torch and
triton are imported, unless the environment says otherwise). With a CUDA device and
TRITON_INTERPRET unset or 0 the same tests run natively on the GPU (benchmarks/gpu_check.sh).
"""
import glob
import os

# Triton's interpreter must be on before triton decorates the kernels. Without a GPU, turn it on
# (unless the environment says otherwise); with one (a /dev/nvidia<N> device node), leave it off so
# these tests run the compiled kernels on the GPU. Checked without importing torch first.
if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import copy  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from typing import Optional, Tuple  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import altub_fast  # noqa: E402
from altub_fast import functional, reference  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if (HAS_CUDA and not INTERPRET) else "cpu"
if DEVICE == "cpu" and not INTERPRET:
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1: the Triton kernels cannot run here",
                allow_module_level=True)

from altub_fast.ops import coupling as oc  # noqa: E402
from _helpers import make_subnet  # noqa: E402

if DEVICE == "cpu" and not oc.interpreter_active():
    pytest.skip("altub_fast.kernels was imported before TRITON_INTERPRET=1 was set, so its kernels "
                "are compiled, not interpreted, and cannot run on CPU tensors (set TRITON_INTERPRET=1 "
                "in the environment before starting pytest)", allow_module_level=True)

cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

# ----------------------------------------------------------------------------- tolerances
# One table keyed by the storage dtype. Both implementations compute in float32 from the same
# stored inputs; they differ by float32 rounding and, for float16, by where the reference rounds
# to float16 on the way (its z-gradient is accumulated in float16 when the log-likelihood is used).
#   elem: |a - e| <= rtol |e| + atol * max(1, max|e|)                 (elementwise outputs)
#   sum:  |a - e| <= rtol |e| + atol * sqrt(n) * max(1, max|e|)       (reductions over n terms)
TOL = {
    torch.float32: dict(elem=(2e-5, 2e-6), sum=(2e-5, 2e-6)),
    torch.float16: dict(elem=(2e-3, 1e-3), sum=(2e-3, 2e-4)),
    torch.bfloat16: dict(elem=(1.6e-2, 8e-3), sum=(1.6e-2, 1.6e-3)),
}


def assert_close(actual, expected, dtype, n: int = 1, what: str = ""):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    rtol, atol = TOL[dtype]["elem" if n == 1 else "sum"]
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
    torch.testing.assert_close(a, e, rtol=rtol, atol=atol * math.sqrt(n) * scale,
                               msg=lambda m: f"{what} (n={n}): {m}")


# ----------------------------------------------------------------------------- cases
@dataclasses.dataclass(frozen=True)
class Case:
    B: int
    C: int
    sp: Tuple[int, ...]
    dtype: torch.dtype = torch.float32
    adtype: Optional[torch.dtype] = None  # subnet output dtype (autocast); None = dtype
    clamp_mode: str = "legacy"
    gin: bool = False
    affine: str = "SOFTPLUS"
    perm: bool = True
    loglik: bool = True
    clamp: float = 2.0
    noncontig: bool = False
    bcast_params: bool = False  # parameters in FrEIA's (1, C, 1, ...) layout
    ups: str = "all"  # upstream gradients: all | z | ld | lp | ldpix (the others are None)
    cfg: Optional[Tuple[int, ...]] = None  # forced (block_c, block_p, cpg[, pix_iters])

    def __str__(self):
        f = [f"B{self.B}C{self.C}sp{'x'.join(map(str, self.sp)) or '-'}", str(self.dtype)[6:],
             self.clamp_mode, self.affine]
        if self.adtype:
            f.append("a" + str(self.adtype)[6:])
        for flag in ("gin", "loglik", "noncontig", "bcast_params"):
            if getattr(self, flag):
                f.append(flag)
        if not self.perm:
            f.append("noperm")
        if self.ups != "all":
            f.append("ups-" + self.ups)
        if self.cfg:
            f.append("cfg" + "-".join(map(str, self.cfg)))
        return ",".join(f)


F16 = torch.float16
CASES = [
    Case(2, 2, ()),
    Case(1, 3, (7,), clamp_mode="freia", affine="SIGMOID", loglik=False, clamp=1.9),
    Case(2, 5, (3, 4), clamp_mode="atan", affine="EXP", perm=False, bcast_params=True),
    Case(2, 8, (2, 3, 5), gin=True, ups="z"),
    Case(3, 33, (), clamp_mode="freia", gin=True, affine="SIGMOID", clamp=1.0),
    Case(1, 5, (4, 5), dtype=F16),
    Case(2, 8, (6,), dtype=F16, clamp_mode="atan", gin=True, affine="EXP", perm=False, loglik=False),
    Case(2, 3, (3, 3), dtype=F16, clamp_mode="freia", affine="SIGMOID", ups="lp"),
    Case(2, 6, (4, 4), adtype=F16, bcast_params=True),
    Case(2, 7, (5,), dtype=F16, adtype=torch.float32, clamp_mode="atan", gin=True),
    Case(2, 6, (4, 5), noncontig=True, ups="ld"),
    Case(1, 9, (3, 4), dtype=F16, clamp_mode="freia", gin=True, affine="EXP", noncontig=True),
    Case(3, 1024, ()),  # CFLOW-AD-like fibers, large C
    Case(1, 256, (2, 3), clamp_mode="atan", gin=True, affine="SIGMOID"),
    Case(2, 4, (40, 50), clamp=1.9),  # 2000 pixels: long sums
    Case(2, 11, (5, 7), cfg=(2, 8, 4)),  # many channel groups and pixel tiles
    Case(3, 13, (), dtype=F16, clamp_mode="freia", gin=True, cfg=(4, 2, 8)),
    # backward programs looping over pixel sub-tiles (fibers; and N = 3, sub-tiles straddling samples)
    Case(37, 10, (), cfg=(4, 2, 4, 4)),
    Case(21, 7, (), clamp_mode="atan", gin=True, affine="SIGMOID", cfg=(2, 4, 2, 2)),
    Case(5, 5, (3,), dtype=F16, cfg=(2, 2, 2, 4), ups="lp"),
    Case(2, 1, (3,), perm=False),  # C = 1: nothing to couple, only the global affine
    # only the per-pixel log-det has an upstream gradient (a loss on the per-pixel log-likelihood)
    Case(2, 6, (3, 4), ups="ldpix", clamp_mode="freia", affine="EXP"),
    Case(2, 7, (2, 5), dtype=F16, gin=True, ups="ldpix", cfg=(2, 4, 4)),
    Case(5, 10, (3,), clamp_mode="atan", gin=True, loglik=False, ups="ldpix", cfg=(4, 2, 4, 2)),
    Case(7, 6, (), dtype=F16, affine="SIGMOID", ups="ldpix", cfg=(2, 2, 2, 4)),
]
CASE_IDS = [str(c) for c in CASES]


def make_inputs(case: Case, seed: int = 0, device: str = DEVICE):
    """x, a, global_scale, global_offset, perm, mu, log_sigma (leaves requiring grad where float)."""
    gen = torch.Generator().manual_seed(seed)
    B, C, sp = case.B, case.C, case.sp
    C2 = C // 2
    adt = case.adtype or case.dtype

    def rnd(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=gen) * scale + shift

    if case.noncontig:  # channels-last x; a with its last two axes transposed (needs 2+ spatial axes)
        x = rnd(B, *sp, C).to(device, case.dtype).movedim(-1, 1)
        a = rnd(B, 2 * C2, *sp[:-2], sp[-1], sp[-2], scale=8.0).to(device, adt).transpose(-1, -2)
    else:
        x = rnd(B, C, *sp).to(device, case.dtype)
        a = rnd(B, 2 * C2, *sp, scale=8.0).to(device, adt)  # 0.1 * a reaches the clamp's non-linear range
    pshape = (1, C, *([1] * len(sp))) if case.bcast_params else (C,)
    init = reference.global_scale_init(0.8, case.affine)
    g = rnd(C, scale=0.3, shift=init).reshape(pshape)
    beta = rnd(C, scale=0.5).reshape(pshape)
    mu = rnd(C, scale=0.3).reshape(pshape)
    ls = rnd(C, scale=0.3).reshape(pshape)
    params = [t.to(device).requires_grad_() for t in (g, beta, mu, ls)]
    if case.noncontig:
        assert not x.is_contiguous() and not a.is_contiguous()
    x.requires_grad_()
    a.requires_grad_()
    perm = torch.randperm(C, generator=gen).to(device) if case.perm else None
    return x, a, params[0], params[1], perm, params[2], params[3]


def kwargs(case):
    return dict(clamp=case.clamp, clamp_mode=case.clamp_mode, gin=case.gin, affine_type=case.affine)


def reference_outputs(case, x, a, g, beta, perm, mu, ls):
    """The reference's outputs with the per-pixel log-det (names: :func:`output_names`)."""
    if case.loglik:
        return reference.coupling_forward_loglik(x, a, g, beta, perm, mu, ls, pixel_logdet=True, **kwargs(case))
    return reference.coupling_forward(x, a, g, beta, perm, pixel_logdet=True, **kwargs(case))


def present(out):
    """The outputs of a CouplingOutput that are not None, in order (as the reference returns them)."""
    return tuple(t for t in out if t is not None)


def output_names(case):
    return ["z", "ld"] + (["lp_pix", "lp_smp"] if case.loglik else []) + ["ld_pix"]


def upstream(case, outs, seed=1):
    """Random upstream gradients (some None, per case.ups), each in its output's dtype."""
    gen = torch.Generator().manual_seed(seed)
    keep = {"all": ("z", "ld", "lp_pix", "lp_smp", "ld_pix"), "z": ("z",), "ld": ("ld",),
            "lp": ("lp_pix", "lp_smp"), "ldpix": ("ld_pix",)}[case.ups]
    res = []
    for name, o in zip(output_names(case), outs):
        if name in keep:
            # a non-contiguous upstream for the log-det: an expanded scalar
            u = (torch.randn(1, generator=gen).expand(o.shape) if name == "ld" else
                 torch.randn(o.shape, generator=gen))
            res.append(u.to(o.device, o.dtype))
        else:
            res.append(None)
    return res


def sum_lengths(case):
    """Number of summed terms behind each output and gradient (for the sum tolerances)."""
    N = math.prod(case.sp)
    return dict(z=1, ld=case.C * N, lp_pix=case.C, lp_smp=case.C * N, ld_pix=case.C, param=case.B * N)


def check_forward(case, outs, refs):
    n = sum_lengths(case)
    names = output_names(case)
    assert len(outs) == len(refs) == len(names)
    for name, o, r in zip(names, outs, refs):
        assert_close(o, r, case.dtype, n[name], f"{case}: {name}")
    # the per-sample log-det is the sum of the per-pixel ones
    ld, ld_pix = outs[1], outs[-1]
    assert ld_pix.shape == (case.B, *case.sp) and ld_pix.dtype == torch.float32
    assert_close(ld_pix.reshape(case.B, -1).sum(1), ld, case.dtype, n["ld"], f"{case}: sum of ld_pix")


def check_grads(case, got, want, names):
    n = sum_lengths(case)
    for name, gt, wt in zip(names, got, want):
        if wt is None:
            assert gt is None or torch.count_nonzero(gt) == 0, f"{case}: d{name} should be None/zero"
            continue
        assert gt is not None, f"{case}: d{name} is None, the reference has a gradient"
        ln = 1 if name in ("x", "a") else n["param"]
        # a's gradient goes through the clamp's derivative and the upstream of the log-det:
        # compare it in the looser of the two dtypes involved
        dt = case.dtype
        if name == "a" and case.adtype is not None:
            dt = max(case.dtype, case.adtype, key=lambda d: TOL[d]["elem"][0])
        assert_close(gt, wt, dt, ln, f"{case}: d{name}")


def forced(case):
    return oc.forced_config(*case.cfg) if case.cfg else _nullcontext()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ----------------------------------------------------------------------------- layer 2: launchers
@pytest.mark.interpreter
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_launchers_match_reference(case):
    x, a, g, beta, perm, mu, ls = make_inputs(case)
    refs = reference_outputs(case, x, a, g, beta, perm, mu, ls)
    with forced(case), torch.no_grad():
        z, ld, lp_pix, lp_smp, gin_mean, ld_pix = oc.coupling_forward(
            x, a, g, beta, perm, mu if case.loglik else None, ls if case.loglik else None, **kwargs(case))
    outs = (z, ld, lp_pix, lp_smp, ld_pix) if case.loglik else (z, ld, ld_pix)
    check_forward(case, outs, refs)
    assert torch.equal(ld, ld_pix.reshape(case.B, -1).sum(1))  # exactly: ld is computed from ld_pix
    assert z.dtype == x.dtype and ld.dtype == torch.float32
    assert gin_mean.shape == ((case.B,) if case.gin else (0,))
    if not case.loglik:
        assert lp_pix.numel() == 0 and lp_smp.numel() == 0

    ups = upstream(case, refs)
    inputs = [x, a, g, beta] + ([mu, ls] if case.loglik else [])
    used = [(r, u) for r, u in zip(refs, ups) if u is not None]
    want = torch.autograd.grad([r for r, _ in used], inputs, [u for _, u in used], allow_unused=True)
    by_name = dict(zip(output_names(case), ups))
    ups5 = [by_name.get(k) for k in ("z", "ld", "lp_pix", "lp_smp", "ld_pix")]
    with forced(case), torch.no_grad():
        got = oc.coupling_backward(*ups5, x, a, g, beta, perm, mu if case.loglik else None,
                                   ls if case.loglik else None, gin_mean, **kwargs(case))
    got = list(got[:len(inputs)])
    if case.gin:
        assert torch.count_nonzero(got[2]) == 0  # the scale is unused with GIN
        got[2] = None
    check_grads(case, got, want, ["x", "a", "global_scale", "global_offset", "mu", "log_sigma"])


# ----------------------------------------------------------------------------- layer 3: autograd
@pytest.mark.interpreter
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_autograd_matches_reference(case):
    x, a, g, beta, perm, mu, ls = make_inputs(case, seed=3)
    refs = reference_outputs(case, x, a, g, beta, perm, mu, ls)
    with forced(case):
        if case.loglik:
            outs = oc.coupling_forward_loglik_triton(x, a, g, beta, perm, mu, ls, pixel_logdet=True,
                                                     **kwargs(case))
        else:
            outs = oc.coupling_forward_triton(x, a, g, beta, perm, pixel_logdet=True, **kwargs(case))
    assert isinstance(outs, oc.CouplingOutput) and outs.log_jac_det_pixel is not None
    assert (outs.logp_pixel is None and outs.logp_sample is None) == (not case.loglik)
    outs = present(outs)
    assert len(outs) == len(refs)
    check_forward(case, outs, refs)

    ups = upstream(case, refs, seed=4)
    inputs = [x, a, g, beta] + ([mu, ls] if case.loglik else [])
    used = [k for k, u in enumerate(ups) if u is not None]
    want = torch.autograd.grad([refs[k] for k in used], inputs, [ups[k] for k in used], allow_unused=True)
    with forced(case):
        got = torch.autograd.grad([outs[k] for k in used], inputs, [ups[k] for k in used], allow_unused=True)
    for t, gt in zip(inputs, got):
        if gt is not None:
            assert gt.dtype == t.dtype and gt.shape == t.shape
    check_grads(case, got, want, ["x", "a", "global_scale", "global_offset", "mu", "log_sigma"])


@pytest.mark.interpreter
def test_some_inputs_without_grad():
    """Only the subnet output needs a gradient (frozen flow parameters, data without grad)."""
    case = Case(2, 6, (3, 4))
    x, a, g, beta, perm, mu, ls = make_inputs(case)
    for t in (x, g, beta, mu, ls):
        t.requires_grad_(False)
    z, ld, lp, lps, ldp = oc.coupling_forward_loglik_triton(x, a, g, beta, perm, mu, ls)
    assert ldp is None  # not asked for
    (ga,) = torch.autograd.grad(z.sum() + ld.sum() + lps.sum(), [a])
    zr, ldr, _, lpsr = reference.coupling_forward_loglik(x, a, g, beta, perm, mu, ls)
    (gar,) = torch.autograd.grad(zr.sum() + ldr.sum() + lpsr.sum(), [a])
    assert_close(ga, gar, torch.float32, 1, "da")


@pytest.mark.interpreter
@pytest.mark.parametrize("gin", [False, True])
def test_base_only_update(gin):
    """AltUB's base-only step: only mu and log_sigma need gradients (gx and ga are not written)."""
    case = Case(2, 7, (3, 5), gin=gin)
    x, a, g, beta, perm, mu, ls = make_inputs(case)
    for t in (x, a, g, beta):
        t.requires_grad_(False)
    out = oc.coupling_forward_loglik_triton(x, a, g, beta, perm, mu, ls, **kwargs(case))
    ref = reference.coupling_forward_loglik(x, a, g, beta, perm, mu, ls, **kwargs(case))
    got = torch.autograd.grad(-(out[3] + out[1]).mean() + out[2].square().mean(), [mu, ls])
    want = torch.autograd.grad(-(ref[3] + ref[1]).mean() + ref[2].square().mean(), [mu, ls])
    check_grads(case, got, want, ["mu", "log_sigma"])


@pytest.mark.interpreter
def test_opcheck():
    """torch.library.opcheck: schema, fake (meta) kernels, autograd registration, AOT dispatch."""
    case = Case(2, 5, (3,))
    x, a, g, beta, perm, mu, ls = make_inputs(case)
    for args in [(x, a, g, beta, perm, mu, ls, 2.0, "legacy", False, "SOFTPLUS"),
                 (x, a, g, beta, None, None, None, 1.5, "atan", True, "EXP")]:
        res = torch.library.opcheck(oc.coupling_fwd_op, args)
        assert all(v == "SUCCESS" for v in res.values()), res
    d = [t.detach() for t in (x, a, g, beta, mu, ls)]
    z, ld, lpp, lps, gm, ldp = oc.coupling_fwd_op(d[0], d[1], d[2], d[3], perm, d[4], d[5], 2.0, "freia",
                                                   True, "SIGMOID")
    for gin in (True, False):
        gin_mean = gm if gin else torch.empty(0)
        bargs = (torch.randn_like(z), torch.randn_like(ld), torch.randn_like(lpp), None, torch.randn_like(ldp),
                 d[0], d[1], d[2], d[3], perm, d[4], d[5], gin_mean, 2.0, "freia", gin, "SIGMOID", True, True)
        res = torch.library.opcheck(oc.coupling_bwd_op, bargs)
        assert all(v == "SUCCESS" for v in res.values()), res


@pytest.mark.interpreter
def test_deterministic():
    """Partial buffers, no atomics: two runs give bitwise-identical outputs and gradients."""
    case = Case(2, 11, (5, 7), gin=True, cfg=(2, 8, 4))
    res = []
    for _ in range(2):
        x, a, g, beta, perm, mu, ls = make_inputs(case)
        with forced(case):
            outs = present(oc.coupling_forward_loglik_triton(x, a, g, beta, perm, mu, ls, **kwargs(case)))
            loss = (outs[0].float() ** 2).sum() + outs[1].sum() + outs[2].sum() + outs[3].sum()
            grads = torch.autograd.grad(loss, [x, a, beta, mu, ls])
        res.append([o.detach() for o in outs] + list(grads))
    for u, v in zip(*res):
        assert torch.equal(u, v)
    import inspect

    from altub_fast.kernels import coupling as kc
    assert "tl.atomic" not in inspect.getsource(kc)


# ----------------------------------------------------------------------------- layer 4: functional & Module
BLOCKS = [
    (5, (4, 6), dict()),
    (8, (), dict(gin_block=True, global_affine_type="SIGMOID", clamp_mode="freia", affine_clamping=1.9)),
    (6, (7,), dict(global_affine_type="EXP", global_affine_init=0.7, clamp_mode="atan",
                   reverse_permutation=True)),
    (4, (3, 3), dict(permute_soft=True)),
    (7, (2, 3, 4), dict(learned_householder_permutation=1, gin_block=True)),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("C,sp,opts", BLOCKS, ids=[f"C{c}-{len(s)}d-{sorted(o)}" for c, s, o in BLOCKS])
def test_module_triton_matches_torch(C, sp, opts):
    torch.manual_seed(0)
    import numpy as np
    np.random.seed(0)
    blk_t = altub_fast.AllInOneBlock([(C, *sp)], subnet_constructor=make_subnet(len(sp)), impl="triton",
                                     **opts).to(DEVICE)
    with torch.no_grad():  # move the global affine off its init so every term is exercised
        blk_t.global_scale.add_(0.2 * torch.randn_like(blk_t.global_scale))
        blk_t.global_offset.add_(0.3 * torch.randn_like(blk_t.global_offset))
    blk_r = copy.deepcopy(blk_t)
    blk_r.impl = "torch"
    x = torch.randn(2, C, *sp, device=DEVICE)
    launches = sum(oc.LAUNCHES.values())
    outs = []
    for blk in (blk_t, blk_r):
        xi = x.clone().requires_grad_()
        (z,), ld, ldp = blk.forward_pixel(xi)
        with torch.no_grad():  # FrEIA's call gives the same z and log-det
            (z0,), ld0 = blk(xi)
        assert torch.equal(z0, z) and torch.equal(ld0, ld)
        gz = torch.linspace(-1, 1, z.numel(), device=DEVICE).view_as(z)
        gp = torch.linspace(1, -2, ldp.numel(), device=DEVICE).view_as(ldp)
        loss = (z * gz).sum() + (ld * torch.tensor([0.7, -1.3], device=DEVICE)).sum() + (ldp * gp).sum()
        blk.zero_grad()
        loss.backward()
        outs.append((z.detach(), ld.detach(), ldp.detach(), xi.grad,
                     {n: p.grad for n, p in blk.named_parameters()}))
    assert sum(oc.LAUNCHES.values()) > launches, "impl='triton' did not launch the kernels"
    (zt, ldt, ldpt, gxt, gpt), (zr, ldr, ldpr, gxr, gpr) = outs
    N = math.prod(sp)
    assert_close(zt, zr, torch.float32, 1, "z")
    assert_close(ldt, ldr, torch.float32, C * N, "log_jac_det")
    assert_close(ldpt, ldpr, torch.float32, C, "log_jac_det_pixel")
    assert_close(gxt, gxr, torch.float32, 1, "dx")
    assert gpt.keys() == gpr.keys()
    for name in gpt:
        if gpr[name] is None:
            assert gpt[name] is None, name
            continue
        assert_close(gpt[name], gpr[name], torch.float32, 2 * N * C, f"d{name}")


@pytest.mark.interpreter
def test_module_forward_loglik_and_functional():
    torch.manual_seed(1)
    C, sp = 6, (5, 4)
    blk_t = altub_fast.AllInOneBlock([(C, *sp)], subnet_constructor=make_subnet(2), impl="triton").to(DEVICE)
    blk_r = copy.deepcopy(blk_t)
    blk_r.impl = "torch"
    base = altub_fast.LearnableGaussian(C).to(DEVICE)
    with torch.no_grad():
        base.mu.normal_(0, 0.3)
        base.log_sigma.normal_(0, 0.3)
    x = torch.randn(2, C, *sp, device=DEVICE)
    res = []
    for blk in (blk_t, blk_r):
        base.zero_grad()
        blk.zero_grad()
        xi = x.clone().requires_grad_()
        z, ld, lpp, lps, ldp = blk.forward_loglik(xi, mu=base.mu, log_sigma=base.log_sigma)
        loss = (-(lps + ld).mean() + 0.1 * lpp.square().mean() + 0.01 * z.square().sum()
                + 0.1 * ldp.square().mean())
        loss.backward()
        res.append([z, ld, lpp, lps, ldp, xi.grad, base.mu.grad.clone(), base.log_sigma.grad.clone()] +
                   [p.grad for p in blk.parameters() if p.requires_grad])
    names = ["z", "ld", "lp_pix", "lp_smp", "ld_pix", "dx", "dmu", "dlog_sigma"] + [
        n for n, p in blk_t.named_parameters() if p.requires_grad]
    for name, u, v in zip(names, *res):
        assert_close(u, v, torch.float32, 1 if name in ("z", "dx") else 200, name)

    # the functional API dispatches to the same op, and counts it
    xr = x.clone()
    a = blk_t.subnet(xr[:, :C - C // 2]).detach()
    before = functional.CALLS["coupling_forward_loglik:triton"]
    f_out = functional.coupling_forward_loglik(xr, a, blk_t.global_scale, blk_t.global_offset, blk_t.perm,
                                               base.mu, base.log_sigma, impl="triton")
    o_out = oc.coupling_forward_loglik_triton(xr, a, blk_t.global_scale, blk_t.global_offset, blk_t.perm,
                                              base.mu, base.log_sigma)
    assert functional.CALLS["coupling_forward_loglik:triton"] == before + 1
    assert f_out._fields == o_out._fields and f_out.log_jac_det_pixel is None is o_out.log_jac_det_pixel
    for u, v in zip(present(f_out), present(o_out)):
        assert torch.equal(u, v)


@pytest.mark.interpreter
def test_env_triton_runs_the_kernels(monkeypatch):
    """ALTUB_FAST_IMPL=triton with no per-call impl really launches the kernels."""
    monkeypatch.setenv("ALTUB_FAST_IMPL", "triton")
    case = Case(2, 4, (3, 3))
    x, a, g, beta, perm, mu, ls = make_inputs(case)
    f0, b0 = oc.LAUNCHES["_coupling_fwd_kernel"], oc.LAUNCHES["_coupling_bwd_kernel"]
    c0 = functional.CALLS["coupling_forward:triton"]
    z, ld = functional.coupling_forward(x, a, g, beta, perm)[:2]
    (z.sum() + ld.sum()).backward()
    assert functional.CALLS["coupling_forward:triton"] == c0 + 1
    assert oc.LAUNCHES["_coupling_fwd_kernel"] == f0 + 1
    assert oc.LAUNCHES["_coupling_bwd_kernel"] == b0 + 1
    monkeypatch.setenv("ALTUB_FAST_IMPL", "torch")
    functional.coupling_forward(x, a, g, beta, perm)
    assert oc.LAUNCHES["_coupling_fwd_kernel"] == f0 + 1


# ----------------------------------------------------------------------------- errors
def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.zeros(2, 4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        functional.resolve_impl("triton", x)
    monkeypatch.setenv("ALTUB_FAST_IMPL", "triton")
    with pytest.raises(RuntimeError, match="impl='triton'"):
        functional.coupling_forward(x, torch.zeros(2, 4), torch.ones(4), torch.zeros(4))
    assert functional.resolve_impl("auto", x) == "torch"


@pytest.mark.interpreter
def test_launcher_errors(monkeypatch):
    case = Case(2, 4, (3,))
    x, a, g, beta, perm, mu, ls = make_inputs(case)
    with torch.no_grad():
        with pytest.raises(ValueError, match="subnet output"):
            oc.coupling_forward(x, a[:, :3], g, beta, perm)
        with pytest.raises(ValueError, match="clamp_mode"):
            oc.coupling_forward(x, a, g, beta, perm, clamp_mode="hard")
        with pytest.raises(ValueError, match="global_affine_type"):
            oc.coupling_forward(x, a, g, beta, perm, affine_type="RELU")
        with pytest.raises(ValueError, match="perm"):
            oc.coupling_forward(x, a, g, beta, perm[:3])
        with pytest.raises(ValueError, match="global_scale"):
            oc.coupling_forward(x, a, g[:3], beta, perm)
        with pytest.raises(ValueError, match="together"):
            oc.coupling_forward(x, a, g, beta, perm, mu, None)
        with pytest.raises(TypeError, match="float64"):
            oc.coupling_forward(x.double(), a, g, beta, perm)
        if DEVICE == "cpu":
            with pytest.raises(TypeError, match="bfloat16"):
                oc.coupling_forward(x.bfloat16(), a, g, beta, perm)
            from altub_fast.ops import coupling_launch  # where the launchers look it up
            monkeypatch.setattr(coupling_launch, "interpreter_active", lambda: False)
            with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
                oc.coupling_forward(x, a, g, beta, perm)
    with pytest.raises(ValueError, match="mu and log_sigma"):
        oc.coupling_forward_loglik_triton(x, a, g, beta, perm, None, None)


# ----------------------------------------------------------------------------- torch.compile, autocast
def _compile_case():
    case = Case(2, 6, (4, 5), gin=False)
    x, a, g, beta, perm, mu, ls = make_inputs(case)

    def fn(x, a, g, beta, mu, ls):
        z, ld, lpp, lps, _ = functional.coupling_forward_loglik(x, a, g, beta, perm, mu, ls, impl="triton")
        return (z.float() ** 2).sum() + ld.sum() + lpp.sum() + lps.sum()

    return fn, (x, a, g, beta, mu, ls)


def _check_compiled(backend, fullgraph):
    fn, args = _compile_case()
    y0 = fn(*args)
    g0 = torch.autograd.grad(y0, args)
    torch._dynamo.reset()
    cfn = torch.compile(fn, backend=backend, fullgraph=fullgraph)
    before = oc.LAUNCHES["_coupling_fwd_kernel"]
    y1 = cfn(*args)
    g1 = torch.autograd.grad(y1, args)
    assert oc.LAUNCHES["_coupling_fwd_kernel"] > before, "the compiled graph did not call the kernels"
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-5)
    for u, v in zip(g1, g0):
        torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-6)


@pytest.mark.interpreter
def test_torch_compile_fullgraph_aot_eager():
    """The custom ops trace into one graph (no graph break) with fake tensors, forward and backward."""
    _check_compiled("aot_eager", fullgraph=True)


@pytest.mark.slow
@pytest.mark.interpreter
def test_torch_compile_inductor():
    if DEVICE == "cpu" and not (shutil.which("g++") or shutil.which("clang++") or shutil.which("c++")):
        pytest.skip("inductor on CPU needs a C++ compiler (g++/clang++) for the code around the op")
    from torch._inductor import config as inductor_config
    # no on-disk FX graph cache: a graph cached before a change of the ops' schema would be reused
    with inductor_config.patch(fx_graph_cache=False):
        _check_compiled("inductor", fullgraph=False)


@pytest.mark.interpreter
def test_autocast_mixed_dtypes():
    """Under autocast the subnet output comes in float16 while x stays float32: the op takes both,
    returns z in x's dtype and each gradient in its own input's dtype."""
    torch.manual_seed(2)
    C = 6
    blk_t = altub_fast.AllInOneBlock([(C,)], subnet_constructor=make_subnet(0), impl="triton").to(DEVICE)
    blk_r = copy.deepcopy(blk_t)
    blk_r.impl = "torch"
    x = torch.randn(5, C, device=DEVICE)
    res = []
    for blk in (blk_t, blk_r):
        xi = x.clone().requires_grad_()
        with torch.autocast(device_type=DEVICE, dtype=torch.float16):
            (z,), ld = blk(xi)
            a = blk._subnet(xi[:, :3], [])
        assert a.dtype == torch.float16 and z.dtype == torch.float32 and ld.dtype == torch.float32
        (z.square().sum() + ld.sum()).backward()
        res.append([z, ld, xi.grad] + [p.grad for p in blk.parameters() if p.requires_grad])
    for u, v in zip(*res):
        assert u.dtype == v.dtype
        assert_close(u, v, torch.float16, 1)


# ----------------------------------------------------------------------------- CUDA only
def _gpu_compile_script():
    return r'''
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from altub_fast.kernels import coupling as K
target = GPUTarget("cuda", 90, 32)
def sig(fn, types, consts):
    return {n: "constexpr" if n in consts else types.get(n, "*fp32") if n.endswith("_ptr")
            else "fp32" if n == "alpha" else "i32" for n in fn.arg_names}
def build(fn, types, consts):
    k = triton.compile(ASTSource(fn, sig(fn, types, consts), constexprs=consts), target=target)
    assert k.asm.get("cubin"), "no cubin"
for mode, aff, gin, perm, ll, dt, bc, bp in [(0, 0, False, True, True, "fp32", 4, 256),
                                             (1, 1, True, False, True, "fp16", 256, 4),
                                             (2, 2, False, True, False, "bf16", 2, 2)]:
    t = {"z_ptr": "*" + dt, "x_ptr": "*" + dt, "a_ptr": "*bf16", "perm_ptr": "*i64",
         "gx_ptr": "*" + dt, "ga_ptr": "*bf16", "gz_ptr": "*" + dt}
    f = dict(CLAMP_MODE=mode, AFFINE=aff, GIN=gin, HAS_PERM=perm, LOGLIK=ll, BLOCK_C=bc, BLOCK_P=bp)
    build(K._coupling_fwd_kernel, t, f)
    build(K._coupling_gin_stats_kernel, t, dict(CLAMP_MODE=mode, BLOCK_C=bc, BLOCK_P=bp))
    for it in (1, 4):
        build(K._coupling_bwd_kernel, t, dict(f, HAS_GZ=True, HAS_GLD_PIX=it == 1, STORE_DX=True,
                                              STORE_DA=it == 1, PIX_ITERS=it))
    if gin:
        build(K._coupling_bwd_gin_stats_kernel, t, dict(CLAMP_MODE=mode, HAS_PERM=perm, LOGLIK=ll, HAS_GZ=True,
                                                         HAS_GLD_PIX=True, BLOCK_C=bc, BLOCK_P=bp))
print("ok")
'''


def test_kernels_compile_for_sm90():
    """Compile every kernel for sm_90 (H100/H200) ahead of time, without a GPU and without the
    interpreter: catches what the interpreter lets through (non-constexpr globals, typing)."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the triton build
        pytest.skip(f"this triton has no ahead-of-time compile API ({e})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _gpu_compile_script()], env=env, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0 and ("ptxas" in proc.stderr.lower() and "not found" in proc.stderr.lower()):
        pytest.skip("triton's CUDA backend (ptxas) is not available here")
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-4000:]


@cuda
@needs_cuda
@pytest.mark.skipif(INTERPRET, reason="bfloat16 needs the compiled kernels (TRITON_INTERPRET=1 is set)")
@pytest.mark.parametrize("case", [
    Case(2, 6, (8, 8), dtype=torch.bfloat16),
    Case(2, 7, (5, 3), dtype=torch.bfloat16, clamp_mode="atan", gin=True, affine="EXP"),
    Case(4, 64, (), dtype=torch.float32, adtype=torch.bfloat16, clamp_mode="freia"),
], ids=str)
def test_cuda_bfloat16(case):
    test_launchers_match_reference(case)
    test_autograd_matches_reference(case)


@cuda
@needs_cuda
@pytest.mark.skipif(INTERPRET, reason="real-size shapes need the compiled kernels")
@pytest.mark.parametrize("case", [
    Case(4, 256, (64, 64)),
    Case(2, 1024, (16, 16), clamp_mode="freia", dtype=F16),
    Case(512, 512, (), gin=True),
    Case(3, 2048, (), clamp_mode="atan", affine="SIGMOID"),
], ids=str)
def test_cuda_real_shapes(case):
    test_autograd_matches_reference(case)


@cuda
@needs_cuda
@pytest.mark.skipif(INTERPRET, reason="needs the compiled kernels")
def test_cuda_graph_capture_and_streams():
    """The launchers allocate only through torch (stream-ordered), so they capture in CUDA graphs."""
    case = Case(2, 8, (16, 16))
    x, a, g, beta, perm, mu, ls = make_inputs(case)
    with torch.no_grad():
        ref = oc.coupling_forward(x, a, g, beta, perm, mu, ls)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            oc.coupling_forward(x, a, g, beta, perm, mu, ls)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = oc.coupling_forward(x, a, g, beta, perm, mu, ls)
        graph.replay()
        torch.cuda.synchronize()
    for u, v in zip(out[:4], ref[:4]):
        assert torch.equal(u, v)
