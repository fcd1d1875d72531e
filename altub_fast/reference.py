"""The mathematics of SPEC sections 1 and 2 in plain PyTorch.

Three jobs: the correctness oracle for the Triton kernels, the CPU / no-Triton path, and the
benchmark baseline. Every function here is differentiable by autograd and works in any dtype:
inputs are loaded in their storage dtype, everything is computed in float32 (float64 stays
float64, for gradcheck), outputs are stored in the input dtype and every reduction (log-dets,
log-likelihoods) is returned in float32 (SPEC section 6).

Shapes: data ``x`` is (B, C, *spatial) with zero to three spatial axes. ``C1 = C - C // 2`` is
the passive half, ``C2 = C // 2`` the transformed half. The subnet output ``a`` is
(B, 2 * C2, *spatial), laid out as [log-scale | shift], *before* the 0.1 pre-scale (which, as in
FrEIA, applies to both halves: s = clamp(0.1 * a_s), t = 0.1 * a_t).
Per-channel parameters (``global_scale``, ``global_offset``, ``mu``, ``log_sigma``) may be given
as (C,) or in FrEIA's (1, C, 1, ...) layout.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)
CLAMP_MODES = ("legacy", "freia", "atan")
AFFINE_TYPES = ("SOFTPLUS", "SIGMOID", "EXP")
ATAN_SCALE = 0.636
SUBNET_PRESCALE = 0.1


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _channels(p: Tensor, C: int, name: str) -> Tensor:
    if p.numel() != C:
        raise ValueError(f"{name} must have {C} elements (one per channel), got shape {tuple(p.shape)}")
    return p.reshape(C)


def _bcast(p: Tensor, ndim: int) -> Tensor:
    """(C,) -> (1, C, 1, ...) for data of ``ndim`` dims."""
    return p.reshape(1, -1, *([1] * (ndim - 2)))


def check_pair(x: Tensor, a: Tensor) -> Tuple[int, int, int]:
    """Validate data and subnet output shapes; return (C, C1, C2)."""
    if x.dim() < 2 or x.dim() > 5:
        raise ValueError(f"data must be (B, C) to (B, C, D, H, W); got {x.dim()} dims, shape {tuple(x.shape)}")
    C = x.shape[1]
    C2 = C // 2
    C1 = C - C2
    expected = (x.shape[0], 2 * C2, *x.shape[2:])
    if tuple(a.shape) != expected:
        raise ValueError(f"subnet output must have shape {expected} (2 * C2 = {2 * C2} channels for "
                         f"C = {C}), got {tuple(a.shape)}")
    return C, C1, C2


# ----------------------------------------------------------------------------- elementwise pieces
def soft_clamp(a_s: Tensor, alpha: float, mode: str = "legacy") -> Tensor:
    """The soft clamp of the (already 0.1-pre-scaled) log-scale: |s| < alpha."""
    if mode == "legacy":
        return alpha * torch.tanh(a_s)
    if mode == "freia":
        return alpha * torch.tanh(a_s / alpha)
    if mode == "atan":
        return alpha * ATAN_SCALE * torch.atan(a_s)
    raise ValueError(f"clamp_mode must be one of {CLAMP_MODES}, got {mode!r}")


def global_scale_activation(g: Tensor, affine_type: str = "SOFTPLUS") -> Tensor:
    """Psi(g): SOFTPLUS 0.2*log(1+exp(g/2)) (torch's softplus with beta 0.5, as FrEIA), SIGMOID
    10*sigmoid(g-2), EXP exp(g)."""
    if affine_type == "SOFTPLUS":
        return 0.1 * F.softplus(g, beta=0.5)
    if affine_type == "SIGMOID":
        return 10.0 * torch.sigmoid(g - 2.0)
    if affine_type == "EXP":
        return torch.exp(g)
    raise ValueError(f"global_affine_type must be one of {AFFINE_TYPES}, got {affine_type!r}")


def global_scale_init(init: float, affine_type: str = "SOFTPLUS") -> float:
    """The pre-activation g0 with Psi(g0) = init (FrEIA's formulas)."""
    if affine_type == "SOFTPLUS":
        return float(2.0 * math.log(math.exp(0.5 * 10.0 * init) - 1.0))
    if affine_type == "SIGMOID":
        return float(2.0 - math.log(10.0 / init - 1.0))
    if affine_type == "EXP":
        return float(math.log(init))
    raise ValueError(f"global_affine_type must be one of {AFFINE_TYPES}, got {affine_type!r}")


def coupling_scale(a_s: Tensor, clamp: float, clamp_mode: str, gin: bool) -> Tensor:
    """s from the (0.1-pre-scaled) subnet log-scale: soft clamp, then GIN centring."""
    s = soft_clamp(a_s, clamp, clamp_mode)
    if gin:
        s = s - s.mean(dim=tuple(range(1, s.dim())), keepdim=True)
    return s


def perm_from_matrix(w_perm: Tensor) -> Tensor:
    """Index form of a hard permutation matrix (C, C, 1, ...): z[:, i] = v[:, perm[i]]."""
    w = w_perm.reshape(w_perm.shape[0], w_perm.shape[1])
    return w.argmax(dim=1).to(torch.long)


def invert_perm(perm: Tensor) -> Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return inv


# ----------------------------------------------------------------------------- the fused step
def coupling_forward(x: Tensor, a: Tensor, global_scale: Tensor, global_offset: Tensor,
                     perm: Optional[Tensor] = None, *, clamp: float = 2.0, clamp_mode: str = "legacy",
                     gin: bool = False, affine_type: str = "SOFTPLUS",
                     pixel_logdet: bool = False) -> Tuple[Tensor, ...]:
    """Everything of an AllInOneBlock forward after the subnet (SPEC 1, steps 2 and 4-8).

    x: (B, C, *sp) the block input (after the optional pre-permutation); a: (B, 2*C2, *sp) raw
    subnet output; perm: (C,) int64 hard permutation (z[:, i] = v[:, perm[i]]) or None for no
    permutation (soft and Householder permutations are applied by the caller afterwards).
    Returns z (B, C, *sp) in x's dtype and log_jac_det (B,) in float32 (float64 for float64).

    pixel_logdet=True also returns, last, the per-pixel log-det (B, *sp) (float32; (B,) for
    (B, C) data): at each pixel the sum over the transformed channels of s (GIN-centred with GIN)
    plus sum_c log Psi(g_c) (the global affine's share, 0 with GIN). The Jacobian is diagonal in
    the channels at each pixel, so this split is exact; summed over the pixels it is log_jac_det
    (up to float rounding: log_jac_det itself is computed as without the flag).
    """
    C, C1, C2 = check_pair(x, a)
    cd = _compute_dtype(x)
    sum_dims = tuple(range(1, x.dim()))
    xf = x.to(cd)
    af = a.to(cd) * SUBNET_PRESCALE
    x1, x2 = xf[:, :C1], xf[:, C1:]
    s = coupling_scale(af[:, :C2], clamp, clamp_mode, gin)
    y2 = x2 * torch.exp(s) + af[:, C2:]
    logdet = torch.sum(s, dim=sum_dims)
    logdet_pixel = torch.sum(s, dim=1) if pixel_logdet else None
    u = torch.cat([x1, y2], dim=1)
    g = _channels(global_scale, C, "global_scale").to(cd)
    beta = _bcast(_channels(global_offset, C, "global_offset").to(cd), x.dim())
    if gin:
        v = u + beta
    else:
        scale = global_scale_activation(g, affine_type)
        v = u * _bcast(scale, x.dim()) + beta
        n_pix = x[0, :1].numel()
        log_scale_sum = torch.sum(torch.log(scale))
        logdet = logdet + n_pix * log_scale_sum
        if pixel_logdet:
            logdet_pixel = logdet_pixel + log_scale_sum
    if perm is not None:
        v = v.index_select(1, perm)
    if pixel_logdet:
        return v.to(x.dtype), logdet, logdet_pixel
    return v.to(x.dtype), logdet


def gaussian_log_prob(z: Tensor, mu: Optional[Tensor] = None, log_sigma: Optional[Tensor] = None,
                      reduction: str = "none", include_const: bool = True) -> Tensor:
    """AltUB's learnable-Gaussian log-likelihood (SPEC 2), computed in float32.

    Per element: -0.5 * ((z - mu_c) * exp(-log_sigma_c))**2 - log_sigma_c - 0.5 * log(2 pi).
    mu / log_sigma None means the fixed N(0, I).
    reduction: "none" (B, C, *sp); "pixel" sum over channels (B, *sp); "sample" sum over all
    non-batch axes (B,). include_const=False drops the -0.5*log(2 pi) term.
    """
    if z.dim() < 2:
        raise ValueError(f"z must be (B, C, ...), got shape {tuple(z.shape)}")
    C = z.shape[1]
    cd = _compute_dtype(z)
    zf = z.to(cd)
    if mu is None and log_sigma is None:
        lp = -0.5 * zf * zf
    else:
        m = _bcast(_channels(mu, C, "mu").to(cd), z.dim())
        ls = _bcast(_channels(log_sigma, C, "log_sigma").to(cd), z.dim())
        u = (zf - m) * torch.exp(-ls)
        lp = -0.5 * u * u - ls
    if include_const:
        lp = lp - 0.5 * LOG_2PI
    if reduction == "none":
        return lp
    if reduction == "pixel":
        return lp.sum(dim=1)
    if reduction == "sample":
        return lp.sum(dim=tuple(range(1, z.dim())))
    raise ValueError(f"reduction must be 'none', 'pixel' or 'sample', got {reduction!r}")


def coupling_forward_loglik(x: Tensor, a: Tensor, global_scale: Tensor, global_offset: Tensor,
                            perm: Optional[Tensor], mu: Tensor, log_sigma: Tensor, *,
                            clamp: float = 2.0, clamp_mode: str = "legacy", gin: bool = False,
                            affine_type: str = "SOFTPLUS", pixel_logdet: bool = False
                            ) -> Tuple[Tensor, ...]:
    """The last-block variant: coupling_forward plus the base log-likelihood of z.

    Returns z, log_jac_det (B,), logp_pixel (B, *sp) = sum over channels of log p(z) with the
    constant, and logp_sample (B,) = sum of logp_pixel (the base term only; add log-dets for the
    flow's log-likelihood). All reductions in float32. pixel_logdet=True appends the per-pixel
    log-det (B, *sp) of :func:`coupling_forward` as a fifth element.
    """
    out = coupling_forward(x, a, global_scale, global_offset, perm, clamp=clamp, clamp_mode=clamp_mode,
                           gin=gin, affine_type=affine_type, pixel_logdet=pixel_logdet)
    z, logdet = out[0], out[1]
    logp_pixel = gaussian_log_prob(z, mu, log_sigma, reduction="pixel")
    logp_sample = logp_pixel.reshape(logp_pixel.shape[0], -1).sum(dim=1)
    if pixel_logdet:
        return z, logdet, logp_pixel, logp_sample, out[2]
    return z, logdet, logp_pixel, logp_sample


# ----------------------------------------------------------------------------- reverse pieces
def global_affine_reverse(z: Tensor, global_scale: Tensor, global_offset: Tensor,
                          perm: Optional[Tensor] = None, *, gin: bool = False,
                          affine_type: str = "SOFTPLUS") -> Tuple[Tensor, Tensor]:
    """u = (P^-1 z - beta) / Psi(g); returns u and its log-det (B,) (the negative of forward's).

    ``perm`` is the forward permutation; None means z is already un-permuted.
    """
    C = z.shape[1]
    cd = _compute_dtype(z)
    v = z.to(cd)
    if perm is not None:
        v = v.index_select(1, invert_perm(perm))
    beta = _bcast(_channels(global_offset, C, "global_offset").to(cd), z.dim())
    if gin:
        return (v - beta).to(z.dtype), torch.zeros(z.shape[0], dtype=cd, device=z.device)
    scale = global_scale_activation(_channels(global_scale, C, "global_scale").to(cd), affine_type)
    u = (v - beta) / _bcast(scale, z.dim())
    n_pix = z[0, :1].numel()
    logdet = -n_pix * torch.sum(torch.log(scale)) * torch.ones(z.shape[0], dtype=cd, device=z.device)
    return u.to(z.dtype), logdet


def coupling_reverse(y2: Tensor, a: Tensor, *, clamp: float = 2.0, clamp_mode: str = "legacy",
                     gin: bool = False) -> Tuple[Tensor, Tensor]:
    """x2 = (y2 - a_t) * exp(-s); returns x2 and the coupling log-det (B,) (negative of forward's)."""
    C2 = y2.shape[1]
    cd = _compute_dtype(y2)
    af = a.to(cd) * SUBNET_PRESCALE
    s = coupling_scale(af[:, :C2], clamp, clamp_mode, gin)
    x2 = (y2.to(cd) - af[:, C2:]) * torch.exp(-s)
    return x2.to(y2.dtype), -torch.sum(s, dim=tuple(range(1, y2.dim())))
