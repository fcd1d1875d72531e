"""The functional API: one entry per fused op, choosing the implementation per call
(:func:`altub_fast.backend.resolve_impl`; ``resolve_impl``, ``triton_unavailable_reason``,
``default_impl``, ``IMPLS`` and ``KERNEL_DTYPES`` are re-exported from there). The coupling's
entries return a :class:`CouplingOutput` (``altub_fast.ops.CouplingOutput``; absent outputs None),
whichever implementation served them.

``ALTUB_FAST_IMPL`` (auto | triton | torch), overridable per call with ``impl=``:
- auto: Triton when the tensors are on CUDA (or on CPU with ``TRITON_INTERPRET=1``), Triton
  imports and the dtype is one the kernels take; otherwise the reference. Falls back silently.
- triton: the Triton kernels, or a RuntimeError saying why they cannot run.
- torch: the reference (``altub_fast.reference``), always.

Nothing here imports Triton at module import time: the kernels are imported lazily inside
``altub_fast.ops`` the first time they are needed.
"""
from __future__ import annotations

from collections import Counter
from typing import Optional

import torch
from torch import Tensor

from . import backend, reference
from .ops import CouplingOutput

#: How many calls each implementation served, per op ("coupling_forward:triton", ...). Tests use
#: it to prove which path ran; it costs one dict update per call.
CALLS: Counter = Counter()

# The backend decision lives in altub_fast.backend; these names stay importable from here.
IMPLS = backend.IMPLS
KERNEL_DTYPES = backend.KERNEL_DTYPES
default_impl = backend.default_impl
triton_unavailable_reason = backend.unavailable_reason
resolve_impl = backend.resolve_impl


def _count(key: str) -> None:
    # Not under torch.compile: dynamo would guard on the counter's value and recompile every call.
    if not torch.compiler.is_compiling():
        CALLS[key] += 1


def coupling_forward(x: Tensor, a: Tensor, global_scale: Tensor, global_offset: Tensor,
                     perm: Optional[Tensor] = None, *, clamp: float = 2.0, clamp_mode: str = "legacy",
                     gin: bool = False, affine_type: str = "SOFTPLUS", pixel_logdet: bool = False,
                     impl: Optional[str] = None) -> CouplingOutput:
    """AllInOneBlock's post-subnet step; see :func:`altub_fast.reference.coupling_forward`.
    Returns a :class:`CouplingOutput`: z, log_jac_det, no log-likelihoods (None), and the
    per-pixel log-det (B, *sp) float32 with ``pixel_logdet=True`` (else None)."""
    which = resolve_impl(impl, x, a, global_scale, global_offset)
    _count(f"coupling_forward:{which}")
    opts = dict(clamp=clamp, clamp_mode=clamp_mode, gin=gin, affine_type=affine_type, pixel_logdet=pixel_logdet)
    if which == "triton":
        from .ops.coupling import coupling_forward_triton
        return coupling_forward_triton(x, a, global_scale, global_offset, perm, **opts)
    out = reference.coupling_forward(x, a, global_scale, global_offset, perm, **opts)
    return CouplingOutput(out[0], out[1], log_jac_det_pixel=out[2] if pixel_logdet else None)


def coupling_forward_loglik(x: Tensor, a: Tensor, global_scale: Tensor, global_offset: Tensor,
                            perm: Optional[Tensor], mu: Tensor, log_sigma: Tensor, *,
                            clamp: float = 2.0, clamp_mode: str = "legacy", gin: bool = False,
                            affine_type: str = "SOFTPLUS", pixel_logdet: bool = False,
                            impl: Optional[str] = None) -> CouplingOutput:
    """The last-block variant; see :func:`altub_fast.reference.coupling_forward_loglik`. Returns a
    :class:`CouplingOutput`: z, log-det, per-pixel and per-sample base log-likelihood, and with
    ``pixel_logdet=True`` the per-pixel log-det (else None)."""
    which = resolve_impl(impl, x, a, global_scale, global_offset, mu, log_sigma)
    _count(f"coupling_forward_loglik:{which}")
    opts = dict(clamp=clamp, clamp_mode=clamp_mode, gin=gin, affine_type=affine_type, pixel_logdet=pixel_logdet)
    if which == "triton":
        from .ops.coupling import coupling_forward_loglik_triton
        return coupling_forward_loglik_triton(x, a, global_scale, global_offset, perm, mu, log_sigma, **opts)
    out = reference.coupling_forward_loglik(x, a, global_scale, global_offset, perm, mu, log_sigma, **opts)
    return CouplingOutput(*out[:4], log_jac_det_pixel=out[4] if pixel_logdet else None)


def gaussian_log_prob(z: Tensor, mu: Optional[Tensor] = None, log_sigma: Optional[Tensor] = None,
                      reduction: str = "none", include_const: bool = True,
                      impl: Optional[str] = None) -> Tensor:
    """The learnable-Gaussian log-likelihood; see :func:`altub_fast.reference.gaussian_log_prob`.

    The standalone base log-likelihood is one cheap elementwise pass that autograd fuses well
    enough; the fused kernel serves it inside :func:`coupling_forward_loglik`. This entry stays on
    the reference.
    """
    _count("gaussian_log_prob:torch")
    return reference.gaussian_log_prob(z, mu, log_sigma, reduction=reduction, include_const=include_const)
