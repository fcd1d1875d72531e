"""The launchers of the coupling kernels (no autograd): :func:`coupling_forward` and
:func:`coupling_backward` validate (shapes here, devices/dtypes/interpreter through
``altub_fast.backend.check_kernel_tensors``), make the data contiguous (once, deliberately),
allocate, pick the launch configuration (``coupling_config``), launch the kernels of
``altub_fast.kernels.coupling`` and sum their float32 partial buffers (deterministic: no atomics).
The custom ops of ``altub_fast.ops.coupling`` call them. Nothing here imports Triton until the
first launch.

``LAUNCHES`` counts kernel launches by kernel name (tests use it to prove the kernels ran).
"""
import functools
import math
from collections import Counter
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backend, reference
from .coupling_config import launch_config

__all__ = ["coupling_forward", "coupling_backward", "LAUNCHES", "interpreter_active", "CLAMP_CODES",
           "AFFINE_CODES"]

#: Kernel launches by kernel name, e.g. LAUNCHES["_coupling_fwd_kernel"].
LAUNCHES: Counter = Counter()

CLAMP_CODES = {"legacy": 0, "freia": 1, "atan": 2}
AFFINE_CODES = {"SOFTPLUS": 0, "SIGMOID": 1, "EXP": 2}


# ----------------------------------------------------------------------------- kernels, lazily
_KERNELS = None


def _kernels():
    """``altub_fast.kernels.coupling``, imported on first use (this is where Triton is imported)."""
    global _KERNELS
    if _KERNELS is None:
        from altub_fast.kernels import coupling as k
        _KERNELS = k
    return _KERNELS


def interpreter_active() -> bool:
    """True if the kernels were built for Triton's interpreter. That is decided once, when Triton's
    ``@triton.jit`` decorates them, by ``TRITON_INTERPRET`` at that moment: setting the variable
    after the kernels were imported has no effect."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_kernels()._coupling_fwd_kernel, InterpretedFunction)


def _launch(kernel, grid, *args, **kwargs):
    LAUNCHES[getattr(kernel, "__name__", None) or kernel.fn.__name__] += 1
    kernel[grid](*args, **kwargs)


# ----------------------------------------------------------------------------- validation
def _check(x: Tensor, a: Tensor, global_scale: Tensor, global_offset: Tensor, perm: Optional[Tensor],
           mu: Optional[Tensor], log_sigma: Optional[Tensor], clamp_mode: str, affine_type: str):
    C, C1, C2 = reference.check_pair(x, a)
    if clamp_mode not in CLAMP_CODES:
        raise ValueError(f"clamp_mode must be one of {tuple(CLAMP_CODES)}, got {clamp_mode!r}")
    if affine_type not in AFFINE_CODES:
        raise ValueError(f"global_affine_type must be one of {tuple(AFFINE_CODES)}, got {affine_type!r}")
    named = [("global_scale", global_scale), ("global_offset", global_offset), ("mu", mu),
             ("log_sigma", log_sigma)]
    for name, t in named:
        if t is None:
            continue
        if t.numel() != C:
            raise ValueError(f"{name} must have {C} elements (one per channel), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if (mu is None) != (log_sigma is None):
        raise ValueError("mu and log_sigma come together (both or neither)")
    if perm is not None:
        if perm.dim() != 1 or perm.numel() != C or perm.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"perm must be a ({C},) int64 index tensor, got shape {tuple(perm.shape)}, "
                             f"dtype {perm.dtype}")
    tensors = [("x", x), ("a", a)] + [(n, t) for n, t in named if t is not None]
    if perm is not None:
        tensors.append(("perm", perm))
    # devices, dtypes and the interpreter: the backend's checks (looked up here at call time)
    backend.check_kernel_tensors(tensors, [("x", x), ("a", a)], lambda: interpreter_active(), "coupling")
    return C, C1, C2


def _per_channel(t: Tensor, C: int) -> Tensor:
    return t.detach().reshape(C).to(torch.float32).contiguous()


def _dims(x: Tensor):
    B, C = int(x.shape[0]), int(x.shape[1])
    N = int(math.prod(x.shape[2:]))
    return B, C, N, B * N


def _saved_inputs(x: Tensor, a: Tensor, global_scale: Tensor, global_offset: Tensor, perm: Optional[Tensor],
                  C: int) -> Tuple[Tensor, ...]:
    """What both launchers hand the kernels of the forward's inputs: (dummy, x, a, Psi's g, beta,
    perm) contiguous, the parameters float32; ``dummy`` (one float32) stands in for every absent
    pointer (never a null pointer: C = 1 has no subnet output, no perm)."""
    dev = x.device
    dummy = torch.empty(1, dtype=torch.float32, device=dev)
    ac = a.contiguous() if a.numel() else dummy
    permc = perm.to(torch.int64).contiguous() if perm is not None else torch.empty(1, dtype=torch.int64, device=dev)
    return (dummy, x.contiguous(), ac, _per_channel(global_scale, C), _per_channel(global_offset, C), permc)


# ----------------------------------------------------------------------------- launchers
def coupling_forward(x: Tensor, a: Tensor, global_scale: Tensor, global_offset: Tensor,
                     perm: Optional[Tensor] = None, mu: Optional[Tensor] = None,
                     log_sigma: Optional[Tensor] = None, *, clamp: float = 2.0,
                     clamp_mode: str = "legacy", gin: bool = False, affine_type: str = "SOFTPLUS"
                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Launch the forward kernels (no autograd).

    x: (B, C, *sp) float32/float16/bfloat16; a: (B, 2*C2, *sp) raw subnet output (any of those
    dtypes); global_scale/global_offset: C elements; perm: (C,) int64 or None; mu/log_sigma: C
    elements each, or both None (no log-likelihood).
    Returns (z (B, C, *sp) in x's dtype, log_jac_det (B,) float32, logp_pixel (B, *sp) float32,
    logp_sample (B,) float32, gin_mean (B,) float32, log_jac_det_pixel (B, *sp) float32), where
    logp_* are empty (0,) tensors without mu/log_sigma and gin_mean (the per-sample mean of the
    clamped log-scale, saved for the backward) is empty (0,) without GIN. log_jac_det_pixel is the
    forward kernel's per-pixel log-det partials summed over the channel groups (no extra pass);
    log_jac_det is its sum over each sample's pixels.
    """
    C, C1, C2 = _check(x, a, global_scale, global_offset, perm, mu, log_sigma, clamp_mode, affine_type)
    B, _, N, P = _dims(x)
    dev, f32 = x.device, torch.float32
    loglik = mu is not None
    z = torch.empty(x.shape, dtype=x.dtype, device=dev)
    empty = torch.empty(0, dtype=f32, device=dev)
    if P == 0:
        ld = torch.zeros(B, dtype=f32, device=dev)
        lp_pix = torch.zeros((B, *x.shape[2:]), dtype=f32, device=dev) if loglik else empty
        return z, ld, lp_pix, ld.clone() if loglik else empty.clone(), \
            torch.zeros(B, dtype=f32, device=dev) if gin else empty.clone(), \
            torch.zeros((B, *x.shape[2:]), dtype=f32, device=dev)
    k = _kernels()
    dummy, xc, ac, g, beta, permc = _saved_inputs(x, a, global_scale, global_offset, perm, C)
    mu_c = _per_channel(mu, C) if loglik else dummy
    ls_c = _per_channel(log_sigma, C) if loglik else dummy
    clamp_code = CLAMP_CODES[clamp_mode]
    gin_mean = _forward_gin_mean(k, ac, B, C2, N, P, float(clamp), clamp_code, dev) if gin else empty

    cfg = launch_config(C, N, P, dev)
    G = cfg.groups(C)
    ld_part = torch.empty((G, P), dtype=f32, device=dev)
    lp_part = torch.empty((G, P), dtype=f32, device=dev) if loglik else dummy
    _launch(k._coupling_fwd_kernel, (cfg.tiles(P), G),
            z, ld_part, lp_part,
            xc, ac, g, beta, permc, mu_c, ls_c, gin_mean if gin else dummy,
            C, C1, C2, N, P, cfg.cpg, float(clamp),
            CLAMP_MODE=clamp_code, AFFINE=AFFINE_CODES[affine_type], GIN=bool(gin),
            HAS_PERM=perm is not None, LOGLIK=loglik, BLOCK_C=cfg.block_c, BLOCK_P=cfg.block_p,
            num_warps=cfg.num_warps)
    ld_pix = (ld_part.sum(dim=0) if G > 1 else ld_part[0]).view(B, *x.shape[2:])
    ld = ld_pix.reshape(B, N).sum(dim=1)
    if loglik:
        lp_pix = (lp_part.sum(dim=0) if G > 1 else lp_part[0]).view(B, *x.shape[2:])
        lp_smp = lp_pix.reshape(B, N).sum(dim=1)
    else:
        lp_pix, lp_smp = empty, empty.clone()
    return z, ld, lp_pix, lp_smp, gin_mean if gin else empty.clone(), ld_pix


def _forward_gin_mean(k, ac: Tensor, B: int, C2: int, N: int, P: int, clamp: float, clamp_code: int,
                      dev: torch.device) -> Tensor:
    """GIN: the per-sample mean (B,) float32 of the clamped log-scale, from the statistics kernel."""
    cfg = launch_config(C2, N, P, dev)
    G = cfg.groups(C2)
    part = torch.empty((G, P), dtype=torch.float32, device=dev)
    _launch(k._coupling_gin_stats_kernel, (cfg.tiles(P), G), part, ac, C2, N, P, cfg.cpg,
            clamp, CLAMP_MODE=clamp_code, BLOCK_C=cfg.block_c, BLOCK_P=cfg.block_p,
            num_warps=cfg.num_warps)
    return part.view(G, B, N).sum(dim=(0, 2)) / float(C2 * N)


def coupling_backward(gz: Optional[Tensor], gld: Optional[Tensor], glp_pixel: Optional[Tensor],
                      glp_sample: Optional[Tensor], gld_pixel: Optional[Tensor], x: Tensor, a: Tensor,
                      global_scale: Tensor, global_offset: Tensor, perm: Optional[Tensor], mu: Optional[Tensor],
                      log_sigma: Optional[Tensor], gin_mean: Optional[Tensor], *, clamp: float = 2.0,
                      clamp_mode: str = "legacy", gin: bool = False, affine_type: str = "SOFTPLUS",
                      need_x: bool = True, need_a: bool = True
                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Launch the backward kernels (no autograd): recompute the forward from the saved inputs.

    Upstream gradients (each may be None = zero): gz (B, C, *sp) any float dtype, gld (B,),
    glp_pixel (B, *sp), glp_sample (B,), gld_pixel (B, *sp) (of the per-pixel log-det). Saved
    inputs as :func:`coupling_forward`, plus gin_mean (B,) float32 from the forward (GIN only).
    need_x / need_a False skips writing gx / ga (returned as empty (0,) tensors), e.g. in AltUB's
    base-only update where only mu and log_sigma need gradients.
    Returns (gx like x, ga like a, g_global_scale and g_global_offset shaped and typed like the
    parameters (g_global_scale is zero with GIN, where the scale is unused), g_mu and g_log_sigma
    like mu/log_sigma (empty (0,) without them)).
    """
    C, C1, C2 = _check(x, a, global_scale, global_offset, perm, mu, log_sigma, clamp_mode, affine_type)
    B, _, N, P = _dims(x)
    dev, f32 = x.device, torch.float32
    loglik = mu is not None and (glp_pixel is not None or glp_sample is not None)
    gx = torch.empty(x.shape if need_x else (0,), dtype=x.dtype, device=dev)
    ga = torch.empty(a.shape if need_a else (0,), dtype=a.dtype, device=dev)
    finish = functools.partial(_finish, device=dev)
    if P == 0:
        return (gx, ga, finish(None, global_scale), finish(None, global_offset),
                finish(None, mu), finish(None, log_sigma))
    k = _kernels()
    dummy, xc, ac, g, beta, permc = _saved_inputs(x, a, global_scale, global_offset, perm, C)
    gz_c, gld_c, gld_pix_c, glp_pix_c, glp_smp_c, mu_c, ls_c = _backward_upstream(
        gz, gld, gld_pixel, glp_pixel, glp_sample, mu, log_sigma, loglik, B, C, P, dummy)
    cfg = launch_config(C, N, P, dev, backward=True)
    G, R = cfg.groups(C), cfg.tiles(P)
    gg_part = torch.empty((R, C), dtype=f32, device=dev) if not gin else dummy
    gbeta_part = torch.empty((R, C), dtype=f32, device=dev)
    gmu_part = torch.empty((R, C), dtype=f32, device=dev) if loglik else dummy
    gls_part = torch.empty((R, C), dtype=f32, device=dev) if loglik else dummy
    gin_mean_c = gin_mean.to(f32).contiguous() if gin else dummy
    flags = dict(CLAMP_MODE=CLAMP_CODES[clamp_mode], HAS_PERM=perm is not None, LOGLIK=loglik,
                 HAS_GZ=gz is not None, HAS_GLD_PIX=gld_pixel is not None, BLOCK_C=cfg.block_c,
                 BLOCK_P=cfg.block_p, num_warps=cfg.num_warps)
    sizes = (C, C1, C2, N, P, cfg.cpg, float(clamp))
    gs_mean = torch.zeros(B, dtype=f32, device=dev) if gin else dummy
    if gin and need_a and C2 > 0:  # the mean of dL/ds only matters for a's gradient
        gs_part = torch.empty((G, P), dtype=f32, device=dev)
        _launch(k._coupling_bwd_gin_stats_kernel, (-(-P // cfg.block_p), G), gs_part,
                gz_c, gld_pix_c, glp_pix_c, glp_smp_c, xc, ac, beta, permc, mu_c, ls_c, gin_mean_c, *sizes, **flags)
        gs_mean = gs_part.view(G, B, N).sum(dim=(0, 2)) / float(C2 * N)
    _launch(k._coupling_bwd_kernel, (R, G), gx if need_x else dummy, ga if (need_a and ga.numel()) else dummy,
            gg_part, gbeta_part, gmu_part, gls_part,
            gz_c, gld_c, gld_pix_c, glp_pix_c, glp_smp_c, xc, ac, g, beta, permc, mu_c, ls_c, gin_mean_c,
            gs_mean, *sizes, AFFINE=AFFINE_CODES[affine_type], GIN=bool(gin), STORE_DX=bool(need_x),
            STORE_DA=bool(need_a) and C2 > 0, PIX_ITERS=cfg.pix_iters, **flags)
    return (gx, ga, finish(None if gin else gg_part, global_scale), finish(gbeta_part, global_offset),
            finish(gmu_part if loglik else None, mu), finish(gls_part if loglik else None, log_sigma))


def _finish(part: Optional[Tensor], like: Optional[Tensor], device: torch.device) -> Tensor:
    """A parameter's gradient: its (R, C) partial buffer summed and shaped and typed like the
    parameter; zeros without a buffer; empty (0,) float32 without the parameter."""
    if like is None:
        return torch.empty(0, dtype=torch.float32, device=device)
    if part is None:
        return torch.zeros(like.shape, dtype=like.dtype, device=device)
    return part.sum(dim=0).reshape(like.shape).to(like.dtype)


def _backward_upstream(gz, gld, gld_pixel, glp_pixel, glp_sample, mu, log_sigma, loglik: bool, B: int,
                       C: int, P: int, dummy: Tensor) -> Tuple[Tensor, ...]:
    """The backward kernels' upstream gradients and base parameters, float32 and contiguous:
    (gz, gld (B,), gld_pixel (P,), glp_pixel (P,), glp_sample (B,), mu, log_sigma). An absent gz or
    gld_pixel is ``dummy`` (the kernels' HAS_GZ / HAS_GLD_PIX flags say so), an absent gld zeros;
    without the log-likelihood (``loglik`` False) the last four are ``dummy``, else an absent one
    of glp_pixel / glp_sample is zeros."""
    dev, f32 = dummy.device, torch.float32
    gz_c = gz.contiguous() if gz is not None else dummy
    gld_c = (gld.detach().reshape(B).to(f32).contiguous() if gld is not None
             else torch.zeros(B, dtype=f32, device=dev))
    gld_pix_c = gld_pixel.reshape(P).to(f32).contiguous() if gld_pixel is not None else dummy
    if not loglik:
        return gz_c, gld_c, gld_pix_c, dummy, dummy, dummy, dummy
    glp_pix_c = (glp_pixel.reshape(P).to(f32).contiguous() if glp_pixel is not None
                 else torch.zeros(P, dtype=f32, device=dev))
    glp_smp_c = (glp_sample.reshape(B).to(f32).contiguous() if glp_sample is not None
                 else torch.zeros(B, dtype=f32, device=dev))
    return gz_c, gld_c, gld_pix_c, glp_pix_c, glp_smp_c, _per_channel(mu, C), _per_channel(log_sigma, C)
