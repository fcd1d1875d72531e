"""altub_fast.AllInOneBlock / SequenceINN / LearnableGaussian against FrEIA 0.2 and closed forms."""
import itertools
import math
import random

import numpy as np
import pytest
import torch

import altub_fast
from altub_fast import reference

FrEIA = pytest.importorskip("FrEIA", reason="FrEIA==0.2 is a dev dependency (pip install -e '.[dev]')")
from FrEIA.framework import SequenceINN as FrEIASequenceINN  # noqa: E402
from FrEIA.modules import AllInOneBlock as FrEIABlock  # noqa: E402

from _helpers import make_subnet  # noqa: E402


SPATIAL = {0: (), 1: (7,), 2: (5, 6), 3: (3, 4, 5)}
OPTIONS = [
    dict(),
    dict(gin_block=True),
    dict(global_affine_type="SIGMOID", global_affine_init=1.3),
    dict(global_affine_type="EXP", global_affine_init=0.7),
    dict(global_affine_type="SOFTPLUS", global_affine_init=0.5),
    dict(permute_soft=True),
    dict(learned_householder_permutation=2),
    dict(reverse_permutation=True),
    dict(reverse_permutation=True, permute_soft=True),
    dict(reverse_permutation=True, learned_householder_permutation=1, gin_block=True),
    dict(affine_clamping=1.0),
]


def random_configs(n=40, seed=1234):
    """A reproducible spread over options x channels x rank x conditions."""
    rng = random.Random(seed)
    grid = list(itertools.product(range(len(OPTIONS)), (2, 3, 4, 7), (0, 1, 2, 3), (False, True)))
    rng.shuffle(grid)
    # every option at least once, then the rest of the shuffled grid
    chosen, seen = [], set()
    for cfg in grid:
        if cfg[0] not in seen:
            chosen.append(cfg)
            seen.add(cfg[0])
    for cfg in grid:
        if len(chosen) >= n:
            break
        if cfg not in chosen:
            chosen.append(cfg)
    return chosen


def build_pair(opt, C, rank, cond, seed):
    dims_in = [(C, *SPATIAL[rank])]
    dims_c = [(3, *SPATIAL[rank])] if cond else []
    kw = dict(OPTIONS[opt], subnet_constructor=make_subnet(rank), dims_c=dims_c)
    np.random.seed(seed)
    torch.manual_seed(seed)
    theirs = FrEIABlock(dims_in, **kw)
    np.random.seed(seed + 1)
    torch.manual_seed(seed + 1)
    ours = altub_fast.AllInOneBlock(dims_in, **kw)
    return theirs, ours, dims_in, dims_c


def perturb(block, seed):
    """Move the global affine and householder vectors off their initial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        block.global_scale.add_(0.3 * torch.randn(block.global_scale.shape, generator=g))
        block.global_offset.add_(0.3 * torch.randn(block.global_offset.shape, generator=g))
        if getattr(block, "vk_householder", None) is not None:
            block.vk_householder.add_(0.1 * torch.randn(block.vk_householder.shape, generator=g))


def assert_close32(a, b, what):
    # same operations in the same order as FrEIA: float32 rounding only
    torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("opt,C,rank,cond", random_configs())
def test_conformance_with_freia(opt, C, rank, cond):
    seed = 17 * opt + 3 * C + rank + 100 * cond
    theirs, ours, dims_in, dims_c = build_pair(opt, C, rank, cond, seed)
    perturb(theirs, seed)
    assert set(theirs.state_dict()) == set(ours.state_dict())
    for k, v in theirs.state_dict().items():
        assert ours.state_dict()[k].shape == v.shape, k
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, *dims_in[0], generator=g)
    c = [torch.randn(3, *dims_c[0], generator=g)] if cond else []

    # FrEIA -> ours
    ours.load_state_dict(theirs.state_dict())
    (z_t,), j_t = theirs([x], c=c)
    (z_o,), j_o = ours([x], c=c)
    assert_close32(z_o, z_t, "z")
    assert_close32(j_o, j_t, "log_jac_det")
    (x_t,), jr_t = theirs([z_t], c=c, rev=True)
    (x_o,), jr_o = ours([z_o], c=c, rev=True)
    assert_close32(x_o, x_t, "reverse x")
    assert_close32(jr_o, jr_t, "reverse log_jac_det")
    torch.testing.assert_close(x_o, x, atol=1e-4, rtol=1e-4)

    # ours -> FrEIA, after moving ours somewhere else
    perturb(ours, seed + 5)
    theirs.load_state_dict(ours.state_dict())
    (z_t,), j_t = theirs([x], c=c)
    (z_o,), j_o = ours([x], c=c)
    assert_close32(z_o, z_t, "z after exchange")
    assert_close32(j_o, j_t, "log_jac_det after exchange")


def test_same_seed_gives_freias_permutation():
    np.random.seed(5)
    theirs = FrEIABlock([(9, 4, 4)], subnet_constructor=make_subnet(2))
    np.random.seed(5)
    ours = altub_fast.AllInOneBlock([(9, 4, 4)], subnet_constructor=make_subnet(2))
    assert torch.equal(theirs.w_perm, ours.w_perm)
    assert torch.equal(ours.perm, reference.perm_from_matrix(theirs.w_perm))


def test_gradients_match_freia():
    theirs, ours, dims_in, _ = build_pair(0, 6, 2, False, 3)
    perturb(theirs, 3)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, *dims_in[0])
    xt, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    (z_t,), j_t = theirs([xt])
    (z_o,), j_o = ours([xo])
    w = torch.randn_like(z_t)
    ((z_t * w).sum() + j_t.sum()).backward()
    ((z_o * w).sum() + j_o.sum()).backward()
    torch.testing.assert_close(xo.grad, xt.grad, atol=1e-5, rtol=1e-5)
    for (n, p_t), (_, p_o) in zip(theirs.named_parameters(), ours.named_parameters()):
        if p_t.requires_grad:
            torch.testing.assert_close(p_o.grad, p_t.grad, atol=1e-5, rtol=1e-5, msg=n)


@pytest.mark.parametrize("mode,formula", [
    ("freia", lambda a, alpha: alpha * torch.tanh(a / alpha)),
    ("atan", lambda a, alpha: alpha * 0.636 * torch.atan(a)),
    ("legacy", lambda a, alpha: alpha * torch.tanh(a)),
])
def test_clamp_modes_against_formulas(mode, formula):
    torch.manual_seed(0)
    C, alpha = 5, 1.7
    block = altub_fast.AllInOneBlock([(C, 4, 3)], subnet_constructor=make_subnet(2), affine_clamping=alpha,
                                     clamp_mode=mode)
    perturb(block, 1)
    x = torch.randn(2, C, 4, 3)
    (z,), j = block([x])
    C1, C2 = C - C // 2, C // 2
    a = 0.1 * block.subnet(x[:, :C1])
    s = formula(a[:, :C2], alpha)
    y2 = x[:, C1:] * torch.exp(s) + a[:, C2:]
    scale = 0.2 * torch.log1p(torch.exp(block.global_scale / 2))
    v = torch.cat([x[:, :C1], y2], 1) * scale + block.global_offset
    z_expected = v[:, block.perm]
    j_expected = s.sum((1, 2, 3)) + 12 * torch.log(scale).sum()
    torch.testing.assert_close(z, z_expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(j, j_expected, atol=1e-4, rtol=1e-5)
    assert s.abs().max() < alpha
    (xr,), jr = block([z], rev=True)
    torch.testing.assert_close(xr, x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(jr, -j)


def test_global_affine_init_gives_init_value():
    for kind, init in [("SOFTPLUS", 1.0), ("SOFTPLUS", 0.3), ("SIGMOID", 2.5), ("EXP", 0.4)]:
        g0 = torch.tensor(reference.global_scale_init(init, kind))
        assert abs(reference.global_scale_activation(g0, kind).item() - init) < 1e-6


def test_in_freias_sequence_inn():
    np.random.seed(0)
    torch.manual_seed(0)
    theirs = FrEIASequenceINN(6, 5, 5)
    for _ in range(3):
        theirs.append(FrEIABlock, subnet_constructor=make_subnet(2))
    ours_in_freia = FrEIASequenceINN(6, 5, 5)
    ours = altub_fast.SequenceINN(6, 5, 5)
    for _ in range(3):
        ours_in_freia.append(altub_fast.AllInOneBlock, subnet_constructor=make_subnet(2))
        ours.append(altub_fast.AllInOneBlock, subnet_constructor=make_subnet(2))
    ours_in_freia.load_state_dict(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 6, 5, 5)
    z_t, j_t = theirs(x)
    for net in (ours_in_freia, ours):
        z, j = net(x)
        assert_close32(z, z_t, "z")
        assert_close32(j, j_t, "log_jac_det")
        xr, jr = net(z, rev=True)
        torch.testing.assert_close(xr, x, atol=1e-4, rtol=1e-4)


def test_sequence_inn_conditions_indexing_and_loglik():
    torch.manual_seed(0)
    flow = altub_fast.SequenceINN(4)
    for i in range(3):
        flow.append(altub_fast.AllInOneBlock, cond=0, cond_shape=(5,), subnet_constructor=make_subnet(0))
    assert len(flow) == 3 and isinstance(flow[1], altub_fast.AllInOneBlock)
    assert [type(b) for b in flow] == [altub_fast.AllInOneBlock] * 3
    x, c = torch.randn(7, 4), torch.randn(7, 5)
    z, j = flow(x, c=[c])
    xr, jr = flow(z, c=[c], rev=True)
    torch.testing.assert_close(xr, x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(jr, -j, atol=1e-5, rtol=1e-5)
    base = altub_fast.LearnableGaussian(4)
    with torch.no_grad():
        base.mu.copy_(torch.randn(4))
        base.log_sigma.copy_(0.3 * torch.randn(4))
    out = flow.forward_loglik(x, c=[c], base=base)
    torch.testing.assert_close(out.z, z)
    torch.testing.assert_close(out.log_jac_det, j)
    expected = torch.distributions.Normal(base.mu, base.sigma).log_prob(z).sum(1)
    torch.testing.assert_close(out.logp_pixel, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flow.log_prob(x, c=[c], base=base), expected + j, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="conditional"):
        flow(x)


def test_gradcheck_reference_float64():
    torch.manual_seed(0)
    B, C, H, W = 2, 5, 3, 2
    C2 = C // 2
    x = torch.randn(B, C, H, W, dtype=torch.float64, requires_grad=True)
    a = torch.randn(B, 2 * C2, H, W, dtype=torch.float64, requires_grad=True)
    g = torch.randn(C, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(C, dtype=torch.float64, requires_grad=True)
    mu = torch.randn(C, dtype=torch.float64, requires_grad=True)
    ls = (0.3 * torch.randn(C, dtype=torch.float64)).requires_grad_()
    perm = torch.randperm(C)
    for mode, gin, kind in [("legacy", False, "SOFTPLUS"), ("freia", True, "SIGMOID"), ("atan", False, "EXP")]:
        def f(x, a, g, beta, mu, ls):
            return reference.coupling_forward_loglik(x, a, g, beta, perm, mu, ls, clamp=1.5, clamp_mode=mode,
                                                     gin=gin, affine_type=kind)
        assert torch.autograd.gradcheck(f, (x, a, g, beta, mu, ls))


def test_learnable_gaussian_against_torch_normal():
    torch.manual_seed(0)
    base = altub_fast.LearnableGaussian(6)
    assert base.mu.abs().sum() == 0 and base.log_sigma.abs().sum() == 0
    with torch.no_grad():
        base.mu.copy_(torch.randn(6))
        base.log_sigma.copy_(0.5 * torch.randn(6))
    z = torch.randn(3, 6, 4, 5)
    ref = torch.distributions.Normal(base.mu.view(1, 6, 1, 1), base.sigma.view(1, 6, 1, 1)).log_prob(z)
    torch.testing.assert_close(base.log_prob(z), ref)
    torch.testing.assert_close(base.log_prob(z, "pixel"), ref.sum(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base.log_prob(z, "sample"), ref.sum((1, 2, 3)), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(base.log_prob(z, include_const=False), ref + 0.5 * math.log(2 * math.pi))
    assert base.log_prob(z.half()).dtype == torch.float32
    with pytest.raises(ValueError, match=r"expected z of shape \(B, 6, \.\.\.\), got \(3, 5, 4, 5\)"):
        base.log_prob(torch.randn(3, 5, 4, 5))


def test_learnable_gaussian_freeze():
    fixed = altub_fast.LearnableGaussian(3, learnable=False)
    assert not fixed.learnable and not fixed.mu.requires_grad
    z = torch.randn(2, 3, 4)
    torch.testing.assert_close(fixed.log_prob(z), torch.distributions.Normal(0.0, 1.0).log_prob(z))
    base = altub_fast.LearnableGaussian(3)
    with torch.no_grad():
        base.mu.fill_(2.0)
    base.freeze()
    assert base.mu.abs().sum() == 0 and not base.log_sigma.requires_grad
    assert set(base.state_dict()) == {"mu", "log_sigma"}


def test_half_input_float32_reductions():
    torch.manual_seed(0)
    block = altub_fast.AllInOneBlock([(4, 3, 3)], subnet_constructor=make_subnet(2))
    x = torch.randn(2, 4, 3, 3)
    (z32,), j32 = block([x])
    a = block.subnet(x[:, :2])
    z16, j16 = reference.coupling_forward(x.half(), a.half(), block.global_scale, block.global_offset, block.perm)
    assert z16.dtype == torch.float16 and j16.dtype == torch.float32
    torch.testing.assert_close(z16.float(), z32, atol=1e-2, rtol=1e-2)


class TestBadInput:
    def block(self, **kw):
        return altub_fast.AllInOneBlock([(4, 5, 5)], subnet_constructor=make_subnet(2), **kw)

    def test_wrong_channels(self):
        with pytest.raises(ValueError, match=r"expected 4 channels .*got 3 channels .*\(2, 3, 5, 5\)"):
            self.block()([torch.randn(2, 3, 5, 5)])

    def test_wrong_number_of_dims(self):
        with pytest.raises(ValueError, match=r"expected 4-D input \(B, 4, 5, 5\), got 3-D input of shape \(2, 4, 5\)"):
            self.block()([torch.randn(2, 4, 5)])

    def test_condition_of_wrong_shape(self):
        b = altub_fast.AllInOneBlock([(4, 5, 5)], dims_c=[(2, 5, 5)], subnet_constructor=make_subnet(2))
        with pytest.raises(ValueError, match=r"condition 0 must have shape \(2, 2, 5, 5\).*got \(2, 3, 5, 5\)"):
            b([torch.randn(2, 4, 5, 5)], c=[torch.randn(2, 3, 5, 5)])
        with pytest.raises(ValueError, match=r"expected 1 condition tensor"):
            b([torch.randn(2, 4, 5, 5)])

    def test_bad_options(self):
        with pytest.raises(ValueError, match="clamp_mode"):
            self.block(clamp_mode="hard")
        with pytest.raises(ValueError, match="Global affine"):
            self.block(global_affine_type="RELU")
        with pytest.raises(ValueError, match="subnet_constructor"):
            altub_fast.AllInOneBlock([(4, 5, 5)])

    def test_subnet_output_shape_checked(self):
        with pytest.raises(ValueError, match=r"subnet output must have shape \(2, 4, 5, 5\)"):
            reference.coupling_forward(torch.randn(2, 4, 5, 5), torch.randn(2, 3, 5, 5), torch.zeros(4), torch.zeros(4))

    def test_non_permutation_state_dict_rejected(self):
        b = self.block()
        sd = b.state_dict()
        sd["w_perm"] = torch.randn_like(sd["w_perm"])
        with pytest.raises(ValueError, match="not a 0/1 permutation matrix"):
            b.load_state_dict(sd)

    def test_impl_switch_errors(self, monkeypatch):
        from altub_fast import functional
        monkeypatch.setenv("ALTUB_FAST_IMPL", "cuda")
        with pytest.raises(ValueError, match="ALTUB_FAST_IMPL must be one of"):
            functional.default_impl()
        monkeypatch.setenv("ALTUB_FAST_IMPL", "torch")
        assert functional.resolve_impl(None, torch.zeros(1, dtype=torch.float64)) == "torch"
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 is not set"):
            functional.resolve_impl("triton", torch.zeros(1))
        assert functional.resolve_impl("auto", torch.zeros(1)) == "torch"


def test_auto_falls_back_on_any_unsupported_dtype(monkeypatch):
    from altub_fast import functional
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x32, a64 = torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.float64)
    assert functional.resolve_impl("auto", x32, a64) == "torch"
    with pytest.raises(RuntimeError, match="not torch.float64"):
        functional.resolve_impl("triton", x32, a64)
    with pytest.raises(RuntimeError, match="bfloat16"):
        functional.resolve_impl("triton", x32, x32.bfloat16())


def test_import_never_touches_triton():
    """`import altub_fast` (and its models, trainer, data and CLI) must work on a machine without a
    GPU and never import Triton: the kernels are imported lazily, at their first launch."""
    import subprocess
    import sys
    code = ("import sys, altub_fast, altub_fast.models, altub_fast.train, altub_fast.data, altub_fast.eval, "
            "altub_fast.metrics; print('triton' in sys.modules, 'altub_fast.kernels.coupling' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr
