"""The in-kernel special functions of ``altub_fast.kernels.math`` against torch (float64 truth).

They replace libdevice (which Triton's interpreter lacks) on the GPU too, so these tests cover the
code that runs there. Runs under TRITON_INTERPRET=1 on CPU, natively on CUDA.
"""
import glob
import os

# Triton's interpreter must be on before triton decorates the kernels. Without a GPU, turn it on
# (unless the environment says otherwise); with one (a /dev/nvidia<N> device node), leave it off so
# these tests run the compiled kernels on the GPU. Checked without importing torch first.
if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from altub_fast import reference  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed")
import triton.language as tl  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if (torch.cuda.is_available() and not INTERPRET) else "cpu"
if DEVICE == "cpu" and not INTERPRET:
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1: the kernels cannot run here",
                allow_module_level=True)

from altub_fast.kernels import math as km  # noqa: E402

if DEVICE == "cpu":
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(km.tanh, InterpretedFunction):
        pytest.skip("altub_fast.kernels was imported before TRITON_INTERPRET=1 was set, so its "
                    "kernels are compiled, not interpreted, and cannot run on CPU tensors "
                    "(set TRITON_INTERPRET=1 in the environment before starting pytest)",
                    allow_module_level=True)


@triton.jit
def _unary_kernel(y_ptr, d_ptr, x_ptr, n, alpha, WHICH: tl.constexpr, MODE: tl.constexpr,
                  BLOCK: tl.constexpr):
    """y_ptr, d_ptr: (n,) float32 out (value, derivative where defined); x_ptr: (n,) float32."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    d = tl.zeros([BLOCK], dtype=tl.float32)
    if WHICH == 0:
        y = km.tanh(x)
    elif WHICH == 1:
        y = km.atan(x)
    elif WHICH == 2:
        y = km.sigmoid(x)
    elif WHICH == 3:
        y = km.log1p(x)
    elif WHICH == 4:
        y, d = km.soft_clamp(x, alpha, MODE)
    else:
        y, d = km.global_scale(x, MODE)
    tl.store(y_ptr + offs, y, mask=m)
    tl.store(d_ptr + offs, d, mask=m)


def _run(x, which, mode=0, alpha=1.0):
    x = x.to(DEVICE, torch.float32).contiguous()
    y, d = torch.empty_like(x), torch.empty_like(x)
    block = 1024
    _unary_kernel[(triton.cdiv(x.numel(), block),)](y, d, x, x.numel(), alpha, WHICH=which, MODE=mode,
                                                   BLOCK=block)
    return y.cpu().double(), d.cpu().double()


def _grid():
    lin = torch.linspace(-25, 25, 5001)
    logs = torch.logspace(-12, 1.5, 600)
    return torch.cat([lin, logs, -logs, torch.tensor([0.0, 0.2, -0.2, 0.19999, 2.414213562373095,
                                                      0.414213562373095, 1e4, -1e4])]).float()


def _assert_rel(y, ref, rel=1e-6, abs_=1e-30):
    err = (y - ref).abs() / ref.abs().clamp_min(abs_)
    worst = int(err.argmax())
    assert err.max() <= rel, f"max rel err {err.max():.3g} at x index {worst}: {y[worst]} vs {ref[worst]}"


@pytest.mark.interpreter
@pytest.mark.parametrize("which,fn", [(0, torch.tanh), (1, torch.atan), (2, torch.sigmoid)],
                         ids=["tanh", "atan", "sigmoid"])
def test_unary_matches_torch(which, fn):
    x = _grid()
    y, _ = _run(x, which)
    ref = fn(x.double())
    # a few float32 ulps relative (torch's own float32 versions are within 1.4e-7 of float64)
    _assert_rel(y, ref, rel=6e-7, abs_=1e-38)


@pytest.mark.interpreter
def test_log1p_tiny_and_large():
    x = torch.cat([torch.logspace(-30, 3, 800), -torch.logspace(-9, -0.01, 200), torch.zeros(1)]).float()
    y, _ = _run(x, 3)
    ref = torch.log1p(x.double())
    _assert_rel(y, ref, rel=6e-7)


@pytest.mark.interpreter
@pytest.mark.parametrize("mode", reference.CLAMP_MODES)
def test_soft_clamp_value_and_derivative(mode):
    alpha = 1.9
    x = torch.cat([torch.linspace(-6, 6, 2001), torch.tensor([1e-8, -1e-8, 50.0, -50.0])]).float()
    y, d = _run(x, 4, mode=reference.CLAMP_MODES.index(mode), alpha=alpha)
    xd = x.double().requires_grad_()
    ref = reference.soft_clamp(xd, alpha, mode)
    (dref,) = torch.autograd.grad(ref.sum(), xd)
    torch.testing.assert_close(y, ref.detach(), rtol=1e-6, atol=1e-7)
    # ds/da = alpha (1 - tanh^2) cancels in float32 where tanh -> 1, exactly as torch's own float32
    # tanh backward does: compare absolutely there
    torch.testing.assert_close(d, dref, rtol=1e-5, atol=1e-6)


@pytest.mark.interpreter
@pytest.mark.parametrize("affine", reference.AFFINE_TYPES)
def test_global_scale_value_and_derivative(affine):
    hi = {"SOFTPLUS": 60.0, "SIGMOID": 30.0, "EXP": 20.0}[affine]
    g = torch.cat([torch.linspace(-30, hi, 3001), torch.tensor([39.99, 40.0, 40.01])]).float()
    if affine != "SOFTPLUS":
        g = g[g <= hi]
    psi, d = _run(g, 5, mode=reference.AFFINE_TYPES.index(affine))
    # truth: torch's own float32 formula (it has the softplus threshold at g/2 > 20), in float64
    gd = g.double().requires_grad_()
    ref = reference.global_scale_activation(gd, affine)
    (dref,) = torch.autograd.grad(ref.sum(), gd)
    if affine == "SIGMOID":  # autograd's s * (1 - s) cancels even in float64 for large g
        dref = 10.0 * torch.sigmoid(gd.detach() - 2.0) * torch.sigmoid(2.0 - gd.detach())
    # float64 truth takes g - 2 and g / 2 exactly; float32 rounds them (as torch's float32 does),
    # which exp turns into up to |g| * 2**-24 relative error
    _assert_rel(psi, ref.detach(), rel=3e-6, abs_=1e-38)
    _assert_rel(d, dref, rel=3e-6, abs_=1e-38)
    if affine == "SOFTPLUS":  # the tiny values whose log enters the log-det keep full precision
        small = g < -20
        assert (psi[small] > 0).all()
        torch.testing.assert_close(psi[small].log(), ref.detach()[small].log(), rtol=1e-6, atol=1e-6)
        assert torch.equal(F.softplus(torch.tensor([100.0]), beta=0.5), torch.tensor([100.0]))
