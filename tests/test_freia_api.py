"""altub_fast as a drop-in for FrEIA's current API (issue 13).

Two kinds of checks:
- against FrEIA 0.2's framework as installed from PyPI (its InvertibleModule, SequenceINN, GraphINN);
- for what only FrEIA master has (index-form ``w_perm`` checkpoints with clamp_mode="freia",
  ``SequenceINN.output_dims()`` without an argument, built instances in ``append`` / ``Node``, item
  assignment, slicing, ``FrEIA.distributions``), master's documented behaviour written as our own
  checks: master is not on PyPI and its source is not vendored here.
"""
import io
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import altub_fast
from altub_fast.nn import _freia_compat
from altub_fast.nn import Inverse, InputShapeError, set_state_dict_layout

from _helpers import make_subnet

needs_freia = pytest.mark.skipif(not _freia_compat.FREIA_AVAILABLE,
                                 reason="FrEIA==0.2 is a dev dependency (pip install -e '.[dev]')")


def block(dims_in, rank, seed=0, **kw):
    torch.manual_seed(seed)
    np.random.seed(seed)
    return altub_fast.AllInOneBlock(dims_in, subnet_constructor=make_subnet(rank), **kw)


def perturb(module, seed):
    """Move every parameter (global affine, subnets) off its initial value, leaving w_perm alone."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def flow_of(n, C=4, cond_of=None, seed=0, **kw):
    """A 1-D (B, C) SequenceINN of n altub_fast blocks; cond_of[i] is block i's condition index."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    flow = altub_fast.SequenceINN(C)
    for i in range(n):
        cond = None if cond_of is None else cond_of[i]
        extra = {} if cond is None else dict(cond=cond, cond_shape=(3,))
        flow.append(altub_fast.AllInOneBlock, subnet_constructor=make_subnet(0), **extra, **kw)
    perturb(flow, seed + 1)
    return flow


# ----------------------------------------------------------------------------- FrEIA 0.2, installed
@needs_freia
def test_blocks_and_flows_are_freias_invertible_modules():
    import FrEIA.modules
    assert altub_fast.InvertibleModule is FrEIA.modules.InvertibleModule
    b = block([(4, 3, 3)], 2)
    assert isinstance(b, FrEIA.modules.InvertibleModule)
    assert isinstance(altub_fast.SequenceINN(4, 3, 3), FrEIA.modules.InvertibleModule)
    assert b.dims_in == [(4, 3, 3)] and b.dims_c == []
    assert b.output_dims(b.dims_in) == [(4, 3, 3)]


@needs_freia
def test_in_freias_graph_inn_with_a_condition():
    """FrEIA 0.2's GraphINN builds and runs our blocks (one conditional) next to its own modules,
    with the numbers of the same graph built from FrEIA's blocks."""
    from FrEIA.framework import ConditionNode, GraphINN, InputNode, Node, OutputNode
    from FrEIA.modules import AllInOneBlock as FrEIABlock
    from FrEIA.modules import PermuteRandom

    def graph(block_cls):
        np.random.seed(3)
        torch.manual_seed(3)
        inp, cond = InputNode(4, 3, 3, name="x"), ConditionNode(2, 3, 3, name="c")
        n1 = Node(inp, block_cls, dict(subnet_constructor=make_subnet(2)), conditions=cond, name="b1")
        n2 = Node(n1, PermuteRandom, dict(seed=1), name="perm")
        n3 = Node(n2, block_cls, dict(subnet_constructor=make_subnet(2), gin_block=True), name="b2")
        return GraphINN([inp, cond, n1, n2, n3, OutputNode(n3, name="z")])

    theirs, ours = graph(FrEIABlock), graph(altub_fast.AllInOneBlock)
    perturb(theirs, 4)
    ours.load_state_dict(theirs.state_dict())
    assert isinstance(ours.get_module_by_name("b1"), altub_fast.AllInOneBlock)
    x, c = torch.randn(2, 4, 3, 3), torch.randn(2, 2, 3, 3)
    z_t, j_t = theirs(x, c=[c])
    z, j = ours(x, c=[c])
    torch.testing.assert_close(z, z_t, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(j, j_t, atol=2e-5, rtol=2e-5)
    xr, jr = ours(z, c=[c], rev=True)
    torch.testing.assert_close(xr, x, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(jr, -j, atol=1e-4, rtol=1e-4)


@needs_freia
def test_our_sequence_inn_holds_freias_modules_built_or_not():
    """Built FrEIA 0.2 blocks and FrEIA module classes go into our SequenceINN, with the numbers of
    FrEIA's SequenceINN holding the same modules."""
    from FrEIA.framework import SequenceINN as FrEIASequenceINN
    from FrEIA.modules import AllInOneBlock as FrEIABlock
    from FrEIA.modules import PermuteRandom

    np.random.seed(0)
    torch.manual_seed(0)
    theirs = FrEIASequenceINN(4, 3)
    for cls, kw in [(FrEIABlock, dict(subnet_constructor=make_subnet(1))), (PermuteRandom, dict(seed=2)),
                    (altub_fast.AllInOneBlock, dict(subnet_constructor=make_subnet(1)))]:
        theirs.append(cls, **kw)
    perturb(theirs, 1)
    ours = altub_fast.SequenceINN(4, 3)
    ours.append(FrEIABlock(ours.output_dims(), subnet_constructor=make_subnet(1)))  # built
    ours.append(PermuteRandom, seed=5)                                             # class
    ours.append(block(ours.output_dims(), 1))                                      # built, ours
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 4, 3)
    z_t, j_t = theirs(x)
    z, j = ours(x)
    torch.testing.assert_close(z, z_t, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(j, j_t, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ours(z, rev=True)[0], x, atol=1e-4, rtol=1e-4)


@needs_freia
def test_freia_block_replaces_ours_in_place():
    from FrEIA.modules import AllInOneBlock as FrEIABlock
    flow = flow_of(3)
    theirs = FrEIABlock([(4,)], subnet_constructor=make_subnet(0))
    theirs.load_state_dict(flow[1].state_dict())
    x = torch.randn(5, 4)
    z_before, j_before = flow(x)
    flow[1] = theirs
    assert flow[1] is theirs
    z, j = flow(x)
    torch.testing.assert_close(z, z_before, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(j, j_before, atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------- SequenceINN, master's API
def test_append_built_blocks_and_output_dims():
    """Master: ``inn.append(AllInOneBlock(inn.output_dims(), ...))`` and ``output_dims()`` without
    an argument; with one, both FrEIA versions need force_tuple_output=True."""
    flow = altub_fast.SequenceINN(2)
    assert flow.output_dims() == [(2,)] == flow.output_dims(None)
    for _ in range(3):
        flow.append(altub_fast.AllInOneBlock(flow.output_dims(), subnet_constructor=make_subnet(0)))
    assert len(flow) == 3 and flow.shapes == [(2,)] * 4
    assert flow.output_dims() == [(2,)]
    with pytest.raises(ValueError, match="force_tuple_output=True"):
        flow.output_dims([(2,)])
    tupled = altub_fast.SequenceINN(4, 3, force_tuple_output=True)
    tupled.append(block(tupled.output_dims(), 1))
    assert tupled.output_dims([(4, 3)]) == [(4, 3)]
    with pytest.raises(ValueError, match="takes"):
        tupled.output_dims([(5, 3)])
    (z,), _ = tupled(torch.randn(2, 4, 3))
    assert z.shape == (2, 4, 3)


def test_append_built_block_checks():
    flow = flow_of(1)
    before = (len(flow), list(flow.conditions), list(flow.shapes))
    with pytest.raises(ValueError, match=r"takes input shape\(s\) \[\(5,\)\].*outputs \[\(4,\)\]"):
        flow.append(block([(5,)], 0))
    with pytest.raises(ValueError, match="constructor arguments"):
        flow.append(block([(4,)], 0), affine_clamping=1.0)
    with pytest.raises(TypeError, match="not an InvertibleModule"):
        flow.append(nn.Linear(4, 4))
    conditional = block([(4,)], 0, dims_c=[(3,)])
    with pytest.raises(ValueError, match="is conditional"):
        flow.append(conditional)
    with pytest.raises(ValueError, match="feeds one condition"):
        flow.append(block([(4,)], 0), cond=0)
    with pytest.raises(ValueError, match="cond_shape"):
        flow.append(conditional, cond=0, cond_shape=(2,))
    assert (len(flow), flow.conditions, flow.shapes) == before  # a refused block leaves no trace
    flow.append(conditional, cond=0)
    x, c = torch.randn(3, 4), torch.randn(3, 3)
    z, j = flow(x, c=[c])
    torch.testing.assert_close(flow(z, c=[c], rev=True)[0], x, atol=1e-5, rtol=1e-5)


def test_item_assignment_checks():
    """Master's checks: wrong dims, and a block that suddenly has a condition, are refused."""
    flow = flow_of(3)
    new = block([(4,)], 0, seed=9)
    flow[1] = new
    assert flow[1] is new
    flow[-1] = block([(4,)], 0, seed=10)
    with pytest.raises(ValueError, match=r"input shape\(s\) \[\(4,\)\].*\[\(5,\)\]"):
        flow[1] = block([(5,)], 0)
    with pytest.raises(ValueError, match="condition shape"):
        flow[1] = block([(4,)], 0, dims_c=[(4,)])
    with pytest.raises(TypeError, match="one index"):
        flow[0:2] = new
    with pytest.raises(TypeError, match="InvertibleModule"):
        flow[0] = nn.Linear(4, 4)
    with pytest.raises(IndexError):
        flow[3] = new
    assert flow[1] is new


def test_slices_share_blocks_and_compose():
    flow = flow_of(4, cond_of=[None, 1, 0, 1])
    x, c0, c1 = torch.randn(5, 4), torch.randn(5, 3), torch.randn(5, 3)
    z, j = flow(x, c=[c0, c1])
    head, tail = flow[:2], flow[2:]
    assert isinstance(tail, altub_fast.SequenceINN) and len(head) == 2 and len(tail) == 2
    assert all(a is b for a, b in zip(list(head) + list(tail), flow))  # the same objects, not copies
    assert head.conditions == [None, 0] and tail.conditions == [0, 1]  # renumbered by first use
    h, jh = head(x, c=[c1])
    zt, jt = tail(h, c=[c0, c1])
    torch.testing.assert_close(zt, z)
    torch.testing.assert_close(jh + jt, j)
    assert flow[1:3].conditions == [0, 1] and len(flow[2:2]) == 0 and len(flow[::2]) == 2

    backwards = flow[::-1]  # inverted blocks in reverse order: the inverse flow
    assert all(isinstance(b, Inverse) for b in backwards) and backwards.conditions == [0, 1, 0, None]
    xr, jr = backwards(z, c=[c1, c0])
    torch.testing.assert_close(xr, x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(jr, -j, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(backwards(xr, c=[c1, c0], rev=True)[0], z, atol=1e-5, rtol=1e-5)


def test_input_shape_error_is_also_freia_masters_runtime_error():
    flow = flow_of(2)
    for exc in (ValueError, RuntimeError):
        with pytest.raises(exc, match="expected 4 channels"):
            flow(torch.randn(16, 3))
    with pytest.raises(InputShapeError, match="condition"):
        flow_of(1, cond_of=[0])(torch.randn(2, 4), c=[torch.randn(2, 5)])


def test_dims_are_normalised_and_checked():
    b = altub_fast.AllInOneBlock(((np.int64(4), 3),), subnet_constructor=make_subnet(1))
    assert b.dims_in == [(4, 3)] and type(b.dims_in[0][0]) is int
    with pytest.raises(TypeError, match="inside a list"):
        altub_fast.AllInOneBlock((4,), subnet_constructor=make_subnet(0))
    with pytest.raises(TypeError, match="of integers"):
        altub_fast.AllInOneBlock([(4.0,)], subnet_constructor=make_subnet(0))
    with pytest.raises(TypeError, match=r"SequenceINN\(C, H, W\)"):
        altub_fast.SequenceINN((4, 3))


# ----------------------------------------------------------------------------- FrEIA master's checkpoints
def master_forward(x, subnet, sd, clamp, reverse_permutation, rev=False):
    """FrEIA master's AllInOneBlock as it documents itself, for a hard permutation, SOFTPLUS and no
    GIN: a = 0.1 subnet(x1); s = clamp tanh(a_s / clamp); y2 = x2 exp(s) + a_t; then the global
    affine 0.1 softplus_{beta=0.5}(g) and the index gather z = v[:, w_perm] (w_perm_inv undoes it)."""
    w_perm, w_perm_inv = sd["w_perm"], sd["w_perm_inv"]
    scale = 0.1 * F.softplus(sd["global_scale"], beta=0.5)
    sum_dims = tuple(range(1, x.dim()))
    c1 = x.shape[1] - x.shape[1] // 2

    def coupling(u, inverse):
        u1, u2 = u[:, :c1], u[:, c1:]
        a = 0.1 * subnet(u1)
        s = clamp * torch.tanh(a[:, :u2.shape[1]] / clamp)
        t = a[:, u2.shape[1]:]
        if inverse:
            return torch.cat([u1, (u2 - t) * torch.exp(-s)], 1), -s.sum(sum_dims)
        return torch.cat([u1, u2 * torch.exp(s) + t], 1), s.sum(sum_dims)

    ld_global = x[0, :1].numel() * torch.log(scale).sum()
    if not rev:
        u, j = coupling(x[:, w_perm_inv] if reverse_permutation else x, False)
        return (u * scale + sd["global_offset"])[:, w_perm], j + ld_global
    u, j = coupling((x[:, w_perm_inv] - sd["global_offset"]) / scale, True)
    return (u[:, w_perm] if reverse_permutation else u), j - ld_global


def master_state_dict(channels, rank, seed):
    """A state_dict in FrEIA master's layout: w_perm a (C,) index from torch.randperm (as master
    draws it), w_perm_inv its argsort; the other entries as any AllInOneBlock has them."""
    donor = block([(channels, *[3] * rank)], rank, seed=seed, clamp_mode="freia")
    perturb(donor, seed)
    sd = donor.state_dict()
    perm = torch.randperm(channels, generator=torch.Generator().manual_seed(seed))
    sd["w_perm"], sd["w_perm_inv"] = perm, torch.argsort(perm)
    return sd


@pytest.mark.parametrize("rank,reverse_permutation", [(0, False), (2, False), (1, True)])
def test_master_checkpoint_loads_and_gives_masters_numbers(rank, reverse_permutation):
    C = 5
    sd = master_state_dict(C, rank, seed=11 + rank)
    ours = block([(C, *[3] * rank)], rank, seed=99, clamp_mode="freia", reverse_permutation=reverse_permutation)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # clamp_mode="freia" is what master needs: no warning
        ours.load_state_dict(sd)
    assert torch.equal(ours.perm, sd["w_perm"]) and torch.equal(ours.perm_inv, sd["w_perm_inv"])
    x = torch.randn(4, C, *[3] * rank)
    with torch.no_grad():
        z_m, j_m = master_forward(x, ours.subnet, sd, 2.0, reverse_permutation)
        (z,), j = ours([x])
        torch.testing.assert_close(z, z_m, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(j, j_m, atol=1e-5, rtol=1e-5)
        x_m, jr_m = master_forward(z_m, ours.subnet, sd, 2.0, reverse_permutation, rev=True)
        (xr,), jr = ours([z], rev=True)
        torch.testing.assert_close(xr, x_m, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(jr, jr_m, atol=1e-5, rtol=1e-5)


def test_save_in_either_layout_round_trips():
    """layout "index" writes master's shapes under the same keys; both layouts load back into any
    of our blocks (through a real checkpoint file) and give the same numbers."""
    flow = flow_of(3, clamp_mode="freia")
    dense = flow.state_dict()
    assert set_state_dict_layout(flow, "index") is flow
    index = flow.state_dict()
    assert list(index) == list(dense)  # same keys, same order
    for i, b in enumerate(flow):
        w, w_inv = index[f"module_list.{i}.w_perm"], index[f"module_list.{i}.w_perm_inv"]
        assert w.shape == (4,) and w.dtype == torch.int64 and torch.equal(w, b.perm)
        assert torch.equal(w_inv, torch.argsort(w))
        assert dense[f"module_list.{i}.w_perm"].shape == (4, 4)
    x = torch.randn(6, 4)
    z, j = flow(x)
    for sd in (dense, index):
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        other = flow_of(3, seed=7, clamp_mode="freia")
        other.load_state_dict(torch.load(buf))
        z2, j2 = other(x)
        assert torch.equal(z2, z) and torch.equal(j2, j)
    set_state_dict_layout(flow, "dense")
    assert flow.state_dict()["module_list.0.w_perm"].shape == (4, 4)


@needs_freia
def test_freia_02_checkpoint_goes_to_masters_layout_and_back():
    from FrEIA.modules import AllInOneBlock as FrEIABlock
    np.random.seed(2)
    theirs = FrEIABlock([(6, 3, 3)], subnet_constructor=make_subnet(2))
    perturb(theirs, 2)
    ours = block([(6, 3, 3)], 2, seed=5)
    ours.load_state_dict(theirs.state_dict())
    with pytest.warns(UserWarning, match="clamp_mode='freia'"):  # master would clamp differently
        ours.state_dict_layout = "index"
    as_master = ours.state_dict()
    assert as_master["w_perm"].shape == (6,)
    again = block([(6, 3, 3)], 2, seed=8)
    with pytest.warns(UserWarning, match="clamp_mode='freia'"):
        again.load_state_dict(as_master)
    theirs_again = FrEIABlock([(6, 3, 3)], subnet_constructor=make_subnet(2))
    theirs_again.load_state_dict(again.state_dict())  # dense again: FrEIA 0.2 takes it
    x = torch.randn(2, 6, 3, 3)
    (z_t,), j_t = theirs([x])
    for net in (again, theirs_again):
        (z,), j = net([x])
        torch.testing.assert_close(z, z_t, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(j, j_t, atol=2e-5, rtol=2e-5)


def test_layout_warnings_and_errors():
    with pytest.warns(UserWarning, match="clamp_mode='freia'"):
        block([(4,)], 0, state_dict_layout="index")  # legacy clamp saved for master
    with pytest.raises(ValueError, match="state_dict_layout must be one of"):
        block([(4,)], 0, state_dict_layout="master")
    with pytest.raises(ValueError, match="no altub_fast AllInOneBlock"):
        set_state_dict_layout(nn.Linear(2, 2), "index")
    good = master_state_dict(4, 0, seed=1)
    target = block([(4,)], 0, clamp_mode="freia")
    cases = [
        (dict(w_perm=torch.tensor([0, 1, 1, 3])), "not a permutation"),
        (dict(w_perm=torch.tensor([0, 1, 2])), "3 entries"),
        (dict(w_perm=torch.tensor([0., 1., 2., 3.])), "integer"),
        (dict(w_perm_inv=torch.roll(good["w_perm_inv"], 1)), "not the inverse"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            target.load_state_dict({**good, **change})
    soft = block([(4,)], 0, permute_soft=True, clamp_mode="freia")
    with pytest.raises(ValueError, match="permute_soft=True"):
        soft.load_state_dict(good)


# ----------------------------------------------------------------------------- FrEIA master's distributions
def test_distribution_contract():
    """What master's PushForward / PullBackDistribution ask of a transform, checked on our flow:
    it reports ``force_tuple_output`` and ``output_dims(None)``; it returns the true log-det even
    with ``jac=False`` (the distributions call it so); a PullBack's log_prob, base.log_prob(flow(x))
    plus that log-det, is our own log_prob; and sampling runs it reversed."""
    torch.manual_seed(0)
    flow = altub_fast.SequenceINN(2)
    flow.append(altub_fast.AllInOneBlock((flow.shapes[-1],), subnet_constructor=make_subnet(0)))
    flow.append(altub_fast.AllInOneBlock, subnet_constructor=make_subnet(0))
    perturb(flow, 0)
    assert flow.force_tuple_output is False and flow.output_dims(None) == [(2,)]
    latent = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(2), torch.ones(2)), 1)
    x = torch.randn(16, 2)
    z, ld = flow(x, jac=False)
    assert torch.is_tensor(ld) and ld.shape == (16,)
    torch.testing.assert_close(ld, flow(x)[1])
    torch.testing.assert_close(latent.log_prob(z) + ld, flow.log_prob(x), atol=1e-5, rtol=1e-5)
    inverse = Inverse(flow)  # PullBack wraps the flow so; its forward is the flow's reverse
    assert inverse.dims_in == [(2,)] and inverse.output_dims(inverse.dims_in) == [(2,)]
    with torch.no_grad():
        sample, _ = inverse(latent.sample((16,)), jac=False)
    assert sample.shape == (16, 2) and not sample.requires_grad
    z_again, ld_again = inverse(x, rev=True)  # the inverse's reverse is the flow itself
    torch.testing.assert_close(z_again, z)
    torch.testing.assert_close(ld_again, ld)
    x_again, ld_inv = inverse(z)
    torch.testing.assert_close(x_again, x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ld_inv, -ld, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError):  # master's test_log_prob_shape_mismatch
        flow(torch.randn(16, 3))


# ----------------------------------------------------------------------------- no FrEIA
def test_works_and_imports_without_freia():
    """With FrEIA unimportable, `import altub_fast` works, the stand-in base has FrEIA's API, and
    the master-style API (built blocks, assignment, slices, both checkpoint layouts) still works."""
    code = r"""
import sys
sys.modules["FrEIA"] = None  # any `import FrEIA...` now raises ModuleNotFoundError
import warnings
warnings.simplefilter("error")  # a missing FrEIA must not even warn
import torch, altub_fast
from altub_fast.nn import _freia_compat
assert not _freia_compat.FREIA_AVAILABLE
assert altub_fast.InvertibleModule is _freia_compat.LocalInvertibleModule
sub = lambda i, o: torch.nn.Linear(i, o)
flow = altub_fast.SequenceINN(4)
flow.append(altub_fast.AllInOneBlock, subnet_constructor=sub, clamp_mode="freia")
flow.append(altub_fast.AllInOneBlock(flow.output_dims(), subnet_constructor=sub, clamp_mode="freia"))
flow[0] = altub_fast.AllInOneBlock([(4,)], subnet_constructor=sub, clamp_mode="freia")
try:
    flow[0] = altub_fast.AllInOneBlock([(5,)], subnet_constructor=sub)
    raise AssertionError("wrong dims accepted")
except ValueError:
    pass
x = torch.randn(3, 4)
z, j = flow(x)
assert torch.allclose(flow[::-1](z)[0], x, atol=1e-5)
altub_fast.nn.set_state_dict_layout(flow, "index")
sd = flow.state_dict()
assert sd["module_list.0.w_perm"].shape == (4,)
other = altub_fast.SequenceINN(4)
for _ in range(2):
    other.append(altub_fast.AllInOneBlock, subnet_constructor=sub, clamp_mode="freia")
other.load_state_dict(sd)
assert torch.equal(other(x)[0], z)
print("ok", "FrEIA" in sys.modules and sys.modules["FrEIA"] is not None)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.split() == ["ok", "False"], out.stdout + out.stderr


@needs_freia
def test_a_broken_freia_install_warns_and_does_not_stop_the_import():
    code = r"""
import sys, warnings
sys.modules["scipy"] = None  # FrEIA is installed but its dependency is not: FrEIA's import fails
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import altub_fast
from altub_fast.nn import _freia_compat
assert not _freia_compat.FREIA_AVAILABLE, "FrEIA imported although scipy is blocked"
assert any("FrEIA is installed but could not be imported" in str(w.message) for w in caught), caught
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split() == ["ok"], out.stdout + out.stderr
