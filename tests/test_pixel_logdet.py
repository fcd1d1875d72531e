"""The per-pixel log-determinant (issue 10, item 1) on the torch path: reference, functional,
AllInOneBlock.forward_pixel / forward_loglik and SequenceINN.forward_loglik's log_jac_det_pixel.

The Triton path of the same output (launcher, custom op, gradients) is tested in test_coupling.py.
Every test here runs the reference (impl="torch"), so nothing needs Triton.
"""
import itertools

import numpy as np
import pytest
import torch

import altub_fast
from altub_fast import functional, reference
from altub_fast.nn import FlowOutput

from _helpers import make_subnet

SPATIAL = {0: (), 1: (5,), 2: (3, 4), 3: (2, 3, 2)}
DTYPES = (torch.float32, torch.float16)


def _inputs(B, C, sp, dtype, seed=0, perm=True):
    g = torch.Generator().manual_seed(seed)
    C2 = C // 2
    x = torch.randn(B, C, *sp, generator=g).to(dtype)
    a = (3.0 * torch.randn(B, 2 * C2, *sp, generator=g)).to(dtype)  # large enough to reach the clamp
    gs = 0.5 * torch.randn(C, generator=g)
    beta = 0.3 * torch.randn(C, generator=g)
    p = torch.randperm(C, generator=g) if perm else None
    mu = 0.3 * torch.randn(C, generator=g)
    ls = 0.2 * torch.randn(C, generator=g)
    return x, a, gs, beta, p, mu, ls


def _sum_pixels(ld_pixel):
    return ld_pixel.reshape(ld_pixel.shape[0], -1).sum(1)


def _close(actual, expected, dtype, n=1, what=""):
    # log-dets are float32 sums of float32 terms; n terms per sum
    tol = 2e-5 * max(1.0, n ** 0.5)
    atol = tol * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=atol,
                               msg=lambda m: f"{what} ({dtype}): {m}")


# ----------------------------------------------------------------------------- reference
REF_CASES = list(itertools.product(reference.CLAMP_MODES, reference.AFFINE_TYPES, (False, True), (0, 1, 2, 3),
                                   DTYPES))


REF_IDS = [f"{m}-{a}-{'gin' if g else 'nogin'}-{r}d-{str(d)[6:]}" for m, a, g, r, d in REF_CASES]


@pytest.mark.parametrize("clamp_mode,affine,gin,rank,dtype", REF_CASES, ids=REF_IDS)
def test_reference_pixel_logdet_sums_to_logdet(clamp_mode, affine, gin, rank, dtype):
    sp = SPATIAL[rank]
    C = 5
    x, a, gs, beta, perm, mu, ls = _inputs(2, C, sp, dtype, seed=rank)
    kw = dict(clamp=1.7, clamp_mode=clamp_mode, gin=gin, affine_type=affine)
    z0, ld0 = reference.coupling_forward(x, a, gs, beta, perm, **kw)
    z, ld, ldp = reference.coupling_forward(x, a, gs, beta, perm, pixel_logdet=True, **kw)
    # the flag only adds an output
    assert torch.equal(z, z0) and torch.equal(ld, ld0)
    assert ldp.shape == (2, *sp) and ldp.dtype == torch.float32
    n_terms = C * max(1, int(np.prod(sp)))
    _close(_sum_pixels(ldp), ld, dtype, n_terms, "sum of per-pixel log-dets")
    # the last-block variant appends the same tensor
    out = reference.coupling_forward_loglik(x, a, gs, beta, perm, mu, ls, pixel_logdet=True, **kw)
    ref4 = reference.coupling_forward_loglik(x, a, gs, beta, perm, mu, ls, **kw)
    assert len(out) == 5 and len(ref4) == 4
    for u, v in zip(out[:4], ref4):
        assert torch.equal(u, v)
    assert torch.equal(out[4], ldp)


@pytest.mark.parametrize("gin", (False, True))
@pytest.mark.parametrize("rank", (0, 2))
def test_reference_pixel_logdet_is_the_pixel_jacobian(gin, rank):
    """Independent oracle: with the subnet output held fixed, the per-pixel log-det is
    log|det| of the (C x C) Jacobian of z at that pixel with respect to x at that pixel, by autograd."""
    sp = SPATIAL[rank]
    B, C = 2, 5
    x, a, gs, beta, perm, _, _ = _inputs(B, C, sp, torch.float64, seed=3)
    kw = dict(clamp=1.5, clamp_mode="freia", gin=gin, affine_type="SIGMOID")
    _, _, ldp = reference.coupling_forward(x, a, gs, beta, perm, pixel_logdet=True, **kw)
    def z_of(t):
        return reference.coupling_forward(t, a, gs, beta, perm, **kw)[0]

    jac = torch.autograd.functional.jacobian(z_of, x)
    N = max(1, int(np.prod(sp)))
    jac = jac.reshape(B, C, N, B, C, N)
    for b in range(B):
        for n in range(N):
            _, logabsdet = torch.linalg.slogdet(jac[b, :, n, b, :, n])
            assert abs(logabsdet.item() - ldp.reshape(B, N)[b, n].item()) < 1e-9, (b, n)


def test_reference_pixel_logdet_one_channel_and_gradient():
    # C = 1: no transformed channel, only the global affine's log Psi per pixel
    x, a, gs, beta, perm, _, _ = _inputs(2, 1, (3, 2), torch.float32)
    gs = gs.clone().requires_grad_()
    _, ld, ldp = reference.coupling_forward(x, a, gs, beta, perm, pixel_logdet=True)
    expect = torch.log(reference.global_scale_activation(gs.detach())).sum()
    assert torch.allclose(ldp, expect.expand(2, 3, 2))
    # differentiable: d(sum of per-pixel)/dg equals d(log_jac_det)/dg
    g1, = torch.autograd.grad(ldp.sum(), gs)
    g2, = torch.autograd.grad(reference.coupling_forward(x, a, gs, beta, perm)[1].sum(), gs)
    torch.testing.assert_close(g1, g2)


def test_functional_passes_pixel_logdet_to_the_reference():
    x, a, gs, beta, perm, mu, ls = _inputs(2, 4, (3, 3), torch.float32)
    before = functional.CALLS["coupling_forward:torch"]
    out = functional.coupling_forward(x, a, gs, beta, perm, gin=True, pixel_logdet=True, impl="torch")
    assert functional.CALLS["coupling_forward:torch"] == before + 1
    ref = reference.coupling_forward(x, a, gs, beta, perm, gin=True, pixel_logdet=True)
    # a CouplingOutput: z, log-det and the per-pixel log-det; no log-likelihoods
    assert out.logp_pixel is None and out.logp_sample is None
    assert all(torch.equal(u, v) for u, v in zip((out.z, out.log_jac_det, out.log_jac_det_pixel), ref))
    without = functional.coupling_forward(x, a, gs, beta, perm, impl="torch")
    assert without.log_jac_det_pixel is None and without.logp_pixel is None  # z and log-det only
    out = functional.coupling_forward_loglik(x, a, gs, beta, perm, mu, ls, pixel_logdet=True, impl="torch")
    ref = reference.coupling_forward_loglik(x, a, gs, beta, perm, mu, ls, pixel_logdet=True)
    assert len(out) == 5 and all(torch.equal(u, v) for u, v in zip(out, ref))
    assert functional.coupling_forward_loglik(x, a, gs, beta, perm, mu, ls, impl="torch").log_jac_det_pixel is None


# ----------------------------------------------------------------------------- AllInOneBlock
BLOCK_OPTIONS = [
    dict(),
    dict(gin_block=True),
    dict(global_affine_type="SIGMOID", global_affine_init=1.3),
    dict(global_affine_type="EXP", global_affine_init=0.7, clamp_mode="atan"),
    dict(clamp_mode="freia", affine_clamping=1.0),
    dict(permute_soft=True),
    dict(learned_householder_permutation=2),
    dict(reverse_permutation=True, permute_soft=True),
    dict(reverse_permutation=True, learned_householder_permutation=1, gin_block=True),
]
BLOCK_CASES = [(i, rank, cond) for i in range(len(BLOCK_OPTIONS)) for rank, cond in ((0, False), (1, True),
                                                                                        (2, False), (3, True))]


def _block(opt, C, rank, cond, seed):
    np.random.seed(seed)
    torch.manual_seed(seed)
    dims_c = [(3, *SPATIAL[rank])] if cond else []
    blk = altub_fast.AllInOneBlock([(C, *SPATIAL[rank])], dims_c=dims_c, subnet_constructor=make_subnet(rank),
                                   impl="torch", **BLOCK_OPTIONS[opt])
    with torch.no_grad():  # off the initial values, so log Psi and the subnet are not trivial
        blk.global_scale.add_(0.3 * torch.randn(blk.global_scale.shape))
        for p in blk.subnet.parameters():
            p.mul_(3.0)
    return blk


@pytest.mark.parametrize("opt,rank,cond", BLOCK_CASES)
def test_block_forward_pixel(opt, rank, cond):
    C, B = 5, 3
    blk = _block(opt, C, rank, cond, seed=opt + 10 * rank)
    x = torch.randn(B, C, *SPATIAL[rank])
    c = [torch.randn(B, 3, *SPATIAL[rank])] if cond else []
    (z0,), ld0 = blk([x], c=c)
    (z,), ld, ldp = blk.forward_pixel([x], c=c)
    torch.testing.assert_close(z, z0, rtol=0, atol=0)
    torch.testing.assert_close(ld, ld0, rtol=0, atol=0)
    assert ldp.shape == (B, *SPATIAL[rank]) and ldp.dtype == torch.float32
    _close(_sum_pixels(ldp), ld, torch.float32, C * max(1, int(np.prod(SPATIAL[rank]))), "block sum")
    assert ldp.std() > 0 or rank == 0  # a real per-pixel map, not a constant spread
    # forward_loglik: 5 values, the same z, log-dets and per-pixel log-det
    out = blk.forward_loglik([x], c=c)
    assert len(out) == 5
    torch.testing.assert_close(out[0], z, rtol=0, atol=0)
    torch.testing.assert_close(out[1], ld, rtol=0, atol=0)
    torch.testing.assert_close(out[4], ldp, rtol=0, atol=0)
    lp = reference.gaussian_log_prob(z, reduction="pixel")
    torch.testing.assert_close(out[2], lp)


def test_block_soft_and_householder_permutations_add_zero_per_pixel():
    """The dense permutation is orthogonal: the block's per-pixel log-det is the fused step's alone."""
    for opt in (5, 6, 7):
        blk = _block(opt, 6, 2, False, seed=opt)
        x = torch.randn(2, 6, *SPATIAL[2])
        (_,), _, ldp = blk.forward_pixel(x)
        xin = x
        if blk.reverse_pre_permute:
            xin = blk._apply_dense(x, blk._dense_weights()[1])
        a = blk.subnet(xin[:, :3])
        _, _, expect = reference.coupling_forward(xin, a, blk.global_scale, blk.global_offset, None,
                                                  clamp=blk.clamp, clamp_mode=blk.clamp_mode, gin=blk.GIN,
                                                  affine_type=blk.global_affine_type, pixel_logdet=True)
        torch.testing.assert_close(ldp, expect)


def test_block_forward_pixel_gradient_flows():
    blk = _block(0, 4, 2, False, seed=1)
    x = torch.randn(2, 4, *SPATIAL[2], requires_grad=True)
    (_,), _, ldp = blk.forward_pixel(x)
    ldp.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert blk.global_scale.grad.abs().sum() > 0
    assert all(p.grad is not None for p in blk.subnet.parameters())


# ----------------------------------------------------------------------------- SequenceINN
def _flow(C, rank, cond, opts=(0, 1, 5, 3, 6), seed=0):
    np.random.seed(seed)
    torch.manual_seed(seed)
    flow = altub_fast.SequenceINN(C, *SPATIAL[rank])
    for opt in opts:
        kw = dict(BLOCK_OPTIONS[opt], subnet_constructor=make_subnet(rank), impl="torch")
        if cond:
            flow.append(altub_fast.AllInOneBlock, cond=0, cond_shape=(3, *SPATIAL[rank]), **kw)
        else:
            flow.append(altub_fast.AllInOneBlock, **kw)
    with torch.no_grad():
        for blk in flow:
            blk.global_scale.add_(0.3 * torch.randn(blk.global_scale.shape))
    return flow


@pytest.mark.parametrize("rank,cond", [(0, True), (1, False), (2, False), (3, True)])
def test_sequence_accumulates_pixel_logdets(rank, cond):
    C, B = 4, 2
    flow = _flow(C, rank, cond, seed=rank)
    base = altub_fast.LearnableGaussian(C)
    with torch.no_grad():
        base.mu.normal_(0, 0.3)
        base.log_sigma.normal_(0, 0.3)
    x = torch.randn(B, C, *SPATIAL[rank])
    c = [torch.randn(B, 3, *SPATIAL[rank])] if cond else None
    out = flow.forward_loglik(x, c=c, base=base)
    assert isinstance(out, FlowOutput) and len(out) == 5
    # hand sum over the blocks' forward_pixel
    h, ld, ldp = x, 0, 0
    for blk in flow:
        (h,), j, jp = blk.forward_pixel(h, c=c if cond else [])
        ld, ldp = ld + j, ldp + jp
    torch.testing.assert_close(out.z, h)
    torch.testing.assert_close(out.log_jac_det, ld)
    torch.testing.assert_close(out.log_jac_det_pixel, ldp)
    assert out.log_jac_det_pixel.shape == (B, *SPATIAL[rank])
    assert out.log_jac_det_pixel.dtype == torch.float32
    _close(_sum_pixels(out.log_jac_det_pixel), out.log_jac_det, torch.float32,
           len(flow) * C * max(1, int(np.prod(SPATIAL[rank]))), "flow sum")
    # the per-sample fields are the same as FrEIA's call gives
    z_f, ld_f = flow(x, c=c)
    torch.testing.assert_close(out.log_jac_det, ld_f)
    torch.testing.assert_close(out.logp_sample, _sum_pixels(out.logp_pixel))


@pytest.mark.parametrize("where", ("first", "middle", "last"))
def test_sequence_with_a_freia_block_gives_none(where):
    pytest.importorskip("FrEIA", reason="FrEIA==0.2 is a dev dependency")
    from FrEIA.modules import AllInOneBlock as FrEIABlock
    C, rank = 4, 2
    np.random.seed(0)
    torch.manual_seed(0)
    flow = altub_fast.SequenceINN(C, *SPATIAL[rank])
    kinds = {"first": (1, 0, 0), "middle": (0, 1, 0), "last": (0, 0, 1)}[where]
    for freia in kinds:
        flow.append(FrEIABlock if freia else altub_fast.AllInOneBlock, subnet_constructor=make_subnet(rank),
                    **({} if freia else dict(impl="torch")))
    x = torch.randn(2, C, *SPATIAL[rank])
    out = flow.forward_loglik(x)
    assert out.log_jac_det_pixel is None
    z_f, ld_f = flow(x)
    torch.testing.assert_close(out.z, z_f)
    torch.testing.assert_close(out.log_jac_det, ld_f)
    torch.testing.assert_close(out.logp_pixel, reference.gaussian_log_prob(z_f, reduction="pixel"))


def test_sequence_pixel_logdet_gradient_matches_block_sum():
    flow = _flow(4, 2, False, opts=(0, 2), seed=5)
    x = torch.randn(2, 4, *SPATIAL[2])
    w = torch.randn(2, *SPATIAL[2])
    (flow.forward_loglik(x).log_jac_det_pixel * w).sum().backward()
    g1 = [p.grad.clone() for p in flow.parameters() if p.grad is not None]
    flow.zero_grad()
    h, ldp = x, 0
    for blk in flow:
        (h,), _, jp = blk.forward_pixel(h)
        ldp = ldp + jp
    (ldp * w).sum().backward()
    g2 = [p.grad for p in flow.parameters() if p.grad is not None]
    assert len(g1) == len(g2) > 0
    for u, v in zip(g1, g2):
        torch.testing.assert_close(u, v)
