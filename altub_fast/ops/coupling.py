"""The fused post-subnet step of AllInOneBlock on Triton: the custom ops, their autograd, and the
entries ``altub_fast.functional`` calls.

Three layers, top to bottom:

- ``coupling_forward_triton`` / ``coupling_forward_loglik_triton`` (here): what
  ``altub_fast.functional`` calls; the signatures, semantics, shapes and dtypes of
  ``reference.coupling_forward`` / ``reference.coupling_forward_loglik`` (z in x's dtype; log-det
  and log-likelihoods float32), returned as a :class:`~altub_fast.ops.CouplingOutput` (absent
  outputs None).
- Two ``torch.library`` custom ops (here), ``altub_fast::coupling_fwd`` and
  ``altub_fast::coupling_bwd``, with fake (meta) implementations and ``register_autograd``:
  differentiable, opaque to ``torch.compile`` (no graph break, no tracing into Triton), and
  autocast-safe (inputs are taken in whatever dtypes they come, e.g. a float32 ``x`` with a
  bfloat16 subnet output ``a``; every gradient is returned in its own input's dtype). Their
  outputs are tensors (empty (0,) ones for absent outputs): custom ops cannot return None.
- The launchers ``coupling_forward`` and ``coupling_backward`` (``coupling_launch``), with their
  launch configuration (``coupling_config``); both are re-exported here, with ``LAUNCHES``,
  ``interpreter_active``, ``LaunchConfig``, ``launch_config`` and ``forced_config``.

Supported: float32 and float16 (and bfloat16 on CUDA), any C >= 1, zero to three spatial axes, any
batch size; on CPU only under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is
first imported). Nothing here imports Triton until the first launch.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import CouplingOutput

if not hasattr(torch.library, "custom_op"):  # pragma: no cover - old torch
    raise ImportError("altub_fast.ops.coupling needs torch >= 2.4 (torch.library.custom_op, "
                      f"register_fake, register_autograd); this is torch {torch.__version__}")

from .coupling_config import LaunchConfig, forced_config, launch_config  # noqa: E402
from .coupling_launch import LAUNCHES, coupling_backward, coupling_forward, interpreter_active  # noqa: E402

__all__ = ["CouplingOutput", "coupling_forward_triton", "coupling_forward_loglik_triton", "coupling_forward",
           "coupling_backward", "LAUNCHES", "LaunchConfig", "launch_config", "forced_config",
           "interpreter_active", "coupling_fwd_op", "coupling_bwd_op"]


# ----------------------------------------------------------------------------- custom ops + autograd
@torch.library.custom_op("altub_fast::coupling_fwd", mutates_args=())
def coupling_fwd_op(x: Tensor, a: Tensor, global_scale: Tensor, global_offset: Tensor,
                    perm: Optional[Tensor], mu: Optional[Tensor], log_sigma: Optional[Tensor],
                    clamp: float, clamp_mode: str, gin: bool, affine_type: str
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Custom op around :func:`coupling_forward` (same inputs and outputs)."""
    with _no_autocast(x):
        return coupling_forward(x, a, global_scale, global_offset, perm, mu, log_sigma, clamp=clamp,
                                clamp_mode=clamp_mode, gin=gin, affine_type=affine_type)


@coupling_fwd_op.register_fake
def _coupling_fwd_fake(x, a, global_scale, global_offset, perm, mu, log_sigma, clamp, clamp_mode, gin,
                       affine_type):
    B = x.shape[0]
    f32 = torch.float32
    z = x.new_empty(x.shape)
    ld = x.new_empty((B,), dtype=f32)
    if mu is not None:
        lp_pix, lp_smp = x.new_empty((B, *x.shape[2:]), dtype=f32), x.new_empty((B,), dtype=f32)
    else:
        lp_pix, lp_smp = x.new_empty((0,), dtype=f32), x.new_empty((0,), dtype=f32)
    gm = x.new_empty((B,) if gin else (0,), dtype=f32)
    ld_pix = x.new_empty((B, *x.shape[2:]), dtype=f32)
    return z, ld, lp_pix, lp_smp, gm, ld_pix


@torch.library.custom_op("altub_fast::coupling_bwd", mutates_args=())
def coupling_bwd_op(gz: Optional[Tensor], gld: Optional[Tensor], glp_pixel: Optional[Tensor],
                    glp_sample: Optional[Tensor], gld_pixel: Optional[Tensor], x: Tensor, a: Tensor,
                    global_scale: Tensor, global_offset: Tensor, perm: Optional[Tensor], mu: Optional[Tensor],
                    log_sigma: Optional[Tensor], gin_mean: Tensor, clamp: float, clamp_mode: str,
                    gin: bool, affine_type: str, need_x: bool, need_a: bool
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Custom op around :func:`coupling_backward` (same inputs and outputs)."""
    with _no_autocast(x):
        return coupling_backward(gz, gld, glp_pixel, glp_sample, gld_pixel, x, a, global_scale, global_offset,
                                 perm, mu, log_sigma, gin_mean, clamp=clamp, clamp_mode=clamp_mode, gin=gin,
                                 affine_type=affine_type, need_x=need_x, need_a=need_a)


@coupling_bwd_op.register_fake
def _coupling_bwd_fake(gz, gld, glp_pixel, glp_sample, gld_pixel, x, a, global_scale, global_offset, perm, mu,
                       log_sigma, gin_mean, clamp, clamp_mode, gin, affine_type, need_x, need_a):
    f32 = torch.float32
    return (x.new_empty(x.shape if need_x else (0,)), a.new_empty(a.shape if need_a else (0,)),
            global_scale.new_empty(global_scale.shape), global_offset.new_empty(global_offset.shape),
            mu.new_empty(mu.shape) if mu is not None else x.new_empty((0,), dtype=f32),
            log_sigma.new_empty(log_sigma.shape) if log_sigma is not None else x.new_empty((0,), dtype=f32))


def _no_autocast(x: Tensor):
    """The kernels take their inputs in whatever dtypes they come; keep autocast out of the few
    torch ops around them (buffer sums stay float32)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _setup_context(ctx, inputs, output):
    x, a, global_scale, global_offset, perm, mu, log_sigma, clamp, clamp_mode, gin, affine_type = inputs
    ctx.save_for_backward(x, a, global_scale, global_offset, perm, mu, log_sigma, output[4])
    ctx.opts = (float(clamp), clamp_mode, bool(gin), affine_type)
    ctx.set_materialize_grads(False)  # unused outputs' gradients stay None: no zero tensors to read


def _backward(ctx, gz, gld, glp_pixel, glp_sample, _g_gin_mean, gld_pixel):
    x, a, global_scale, global_offset, perm, mu, log_sigma, gin_mean = ctx.saved_tensors
    clamp, clamp_mode, gin, affine_type = ctx.opts
    if mu is None:
        glp_pixel = glp_sample = None
    need = ctx.needs_input_grad
    gx, ga, gg, gbeta, gmu, gls = coupling_bwd_op(gz, gld, glp_pixel, glp_sample, gld_pixel, x, a,
                                                  global_scale, global_offset, perm, mu, log_sigma, gin_mean,
                                                  clamp, clamp_mode, gin, affine_type, bool(need[0]),
                                                  bool(need[1]))
    return (gx if need[0] else None, ga if need[1] else None,
            gg if (need[2] and not gin) else None, gbeta if need[3] else None, None,
            gmu if (mu is not None and need[5]) else None,
            gls if (log_sigma is not None and need[6]) else None,
            None, None, None, None)


coupling_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- the public entries
def coupling_forward_triton(x: Tensor, a: Tensor, global_scale: Tensor, global_offset: Tensor,
                            perm: Optional[Tensor] = None, *, clamp: float = 2.0,
                            clamp_mode: str = "legacy", gin: bool = False,
                            affine_type: str = "SOFTPLUS", pixel_logdet: bool = False) -> CouplingOutput:
    """:func:`altub_fast.reference.coupling_forward` on the Triton kernels, differentiable.

    x: (B, C, *sp) float32/float16 (bfloat16 on CUDA); a: (B, 2*C2, *sp) raw subnet output, may
    differ in dtype from x (autocast); global_scale/global_offset: (C,) or (1, C, 1, ...); perm:
    (C,) int64 with z[:, i] = v[:, perm[i]], or None. Returns a :class:`CouplingOutput`: z in x's
    dtype, log_jac_det (B,) float32, no log-likelihoods, and with pixel_logdet=True the per-pixel
    log-det (B, *sp) float32 (the op always computes it, from the forward kernel's partial buffers;
    a loss may use it: the backward takes its gradient).
    """
    z, ld, _, _, _, ld_pix = coupling_fwd_op(x, a, global_scale, global_offset, perm, None, None,
                                             float(clamp), clamp_mode, bool(gin), affine_type)
    return CouplingOutput(z, ld, log_jac_det_pixel=ld_pix if pixel_logdet else None)


def coupling_forward_loglik_triton(x: Tensor, a: Tensor, global_scale: Tensor, global_offset: Tensor,
                                   perm: Optional[Tensor], mu: Tensor, log_sigma: Tensor, *,
                                   clamp: float = 2.0, clamp_mode: str = "legacy", gin: bool = False,
                                   affine_type: str = "SOFTPLUS", pixel_logdet: bool = False
                                   ) -> CouplingOutput:
    """:func:`altub_fast.reference.coupling_forward_loglik` on the Triton kernels, differentiable:
    the last-block variant, also evaluating the learnable Gaussian (mu, log_sigma: (C,) or
    (1, C, 1, ...), indexed by z's channel). Returns a :class:`CouplingOutput` with every field:
    z (x's dtype), log_jac_det (B,), logp_pixel (B, *sp) and logp_sample (B,), all float32, and
    the per-pixel log-det (B, *sp) float32 with pixel_logdet=True (else None)."""
    if mu is None or log_sigma is None:
        raise ValueError("coupling_forward_loglik_triton needs mu and log_sigma (zeros for N(0, I))")
    z, ld, lp_pix, lp_smp, _, ld_pix = coupling_fwd_op(x, a, global_scale, global_offset, perm, mu,
                                                       log_sigma, float(clamp), clamp_mode, bool(gin),
                                                       affine_type)
    return CouplingOutput(z, ld, lp_pix, lp_smp, ld_pix if pixel_logdet else None)
