"""The fused post-subnet step of AllInOneBlock on Triton: launchers and autograd.

Three layers, top to bottom:

- ``coupling_forward_triton`` / ``coupling_forward_loglik_triton``: what ``altub_fast.functional``
  calls; the signatures, semantics, shapes and dtypes of ``reference.coupling_forward`` /
  ``reference.coupling_forward_loglik`` (z in x's dtype; log-det and log-likelihoods float32),
  returned as a :class:`~altub_fast.ops.CouplingOutput` (absent outputs None).
- Two ``torch.library`` custom ops, ``altub_fast::coupling_fwd`` and ``altub_fast::coupling_bwd``,
  with fake (meta) implementations and ``register_autograd``: differentiable, opaque to
  ``torch.compile`` (no graph break, no tracing into Triton), and autocast-safe (inputs are taken in
  whatever dtypes they come, e.g. a float32 ``x`` with a bfloat16 subnet output ``a``; every
  gradient is returned in its own input's dtype).
- The launchers ``coupling_forward`` and ``coupling_backward``: validate, make the data contiguous
  (once, deliberately), allocate, pick the launch configuration, launch the kernels of
  ``altub_fast.kernels.coupling`` and sum their float32 partial buffers (deterministic: no atomics).

Supported: float32 and float16 (and bfloat16 on CUDA), any C >= 1, zero to three spatial axes, any
batch size; on CPU only under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is
first imported). Nothing here imports Triton until the first launch.

``LAUNCHES`` counts kernel launches by kernel name (tests use it to prove the kernels ran).
"""
import contextlib
import math
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .. import backend, reference
from . import CouplingOutput

if not hasattr(torch.library, "custom_op"):  # pragma: no cover - old torch
    raise ImportError("altub_fast.ops.coupling needs torch >= 2.4 (torch.library.custom_op, "
                      f"register_fake, register_autograd); this is torch {torch.__version__}")

__all__ = ["CouplingOutput", "coupling_forward_triton", "coupling_forward_loglik_triton", "coupling_forward",
           "coupling_backward", "LAUNCHES", "LaunchConfig", "launch_config", "forced_config",
           "interpreter_active"]

#: Kernel launches by kernel name, e.g. LAUNCHES["_coupling_fwd_kernel"].
LAUNCHES: Counter = Counter()

CLAMP_CODES = {"legacy": 0, "freia": 1, "atan": 2}
AFFINE_CODES = {"SOFTPLUS": 0, "SIGMOID": 1, "EXP": 2}

_TILE = 1024            # elements per [BLOCK_C, BLOCK_P] register tile
_PROGRAMS_PER_SM = 4    # split channels into groups until the grid has this many programs per SM


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


# ----------------------------------------------------------------------------- launch configuration
@dataclass(frozen=True)
class LaunchConfig:
    """Tile [block_c, block_p] (powers of two), cpg output channels per program (a multiple of
    block_c; groups = cdiv(C, cpg)), num_warps, and (backward only) pix_iters pixel sub-tiles per
    program (> 1 only with cpg == block_c)."""
    block_c: int
    block_p: int
    cpg: int
    num_warps: int = 4
    pix_iters: int = 1

    def groups(self, C: int) -> int:
        return max(1, -(-C // self.cpg))

    def tiles(self, P: int) -> int:
        """Programs along the pixels (= rows R of the per-channel partial buffers)."""
        return -(-P // (self.block_p * self.pix_iters))


_FORCED: Optional[Dict[str, int]] = None


@contextlib.contextmanager
def forced_config(block_c: int, block_p: int, cpg: Optional[int] = None, pix_iters: int = 1):
    """Force the launch configuration inside the block (tests and debugging): tile
    [block_c, block_p], ``cpg`` channels per program (default block_c, i.e. as many channel groups
    as chunks), ``pix_iters`` pixel sub-tiles per backward program (needs cpg == block_c)."""
    global _FORCED
    for v in (block_c, block_p):
        if v < 1 or v & (v - 1):
            raise ValueError(f"block sizes must be powers of two, got {block_c}, {block_p}")
    cpg = block_c if cpg is None else cpg
    if cpg % block_c:
        raise ValueError(f"cpg ({cpg}) must be a multiple of block_c ({block_c})")
    if pix_iters < 1 or (pix_iters > 1 and cpg != block_c):
        raise ValueError(f"pix_iters ({pix_iters}) > 1 needs cpg == block_c (got {cpg}, {block_c})")
    prev, _FORCED = _FORCED, dict(block_c=block_c, block_p=block_p, cpg=cpg, pix_iters=pix_iters)
    try:
        yield
    finally:
        _FORCED = prev


def _pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


_SM_COUNT: Dict[int, int] = {}


def _programs_target(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter: fewer, bigger programs are faster
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _PROGRAMS_PER_SM * _SM_COUNT[idx]


def launch_config(C: int, N: int, P: int, device: torch.device, backward: bool = False) -> LaunchConfig:
    """The heuristic. Tiles hold up to 1024 elements with one warp per 128 (4 elements per
    thread): ptxas (sm_90) then keeps the forward under 64 and the backward under about 115
    registers without spills (2048-element tiles on 4 warps spill in the backward). Spatial data
    (N >= 16) is contiguous along pixels: tiles of up to 256 pixels by 4 channels. Fiber data
    (N < 16, CFLOW-AD's (B*H*W, C)) is contiguous along channels: tiles of up to 256 channels by 4+
    pixels. Channels are then split into groups until the grid has about 4 programs per SM (no
    split under the interpreter, where fewer, bigger programs are faster).

    Backward with fiber data: a pixel tile of a few rows would make the (R, C) per-channel
    partial buffers a sizeable fraction of the data, so each program takes one channel chunk
    (cpg = block_c) and loops over up to 64 pixel sub-tiles while the grid keeps about 4 programs
    per SM."""
    if _FORCED is not None:
        f = dict(_FORCED)
        if not backward:
            f["pix_iters"] = 1
        return LaunchConfig(**f)
    C = max(int(C), 1)
    P = max(int(P), 1)
    if N >= 16:
        block_p = min(_pow2(P), 256)
        block_c = max(2, min(_pow2(C), _TILE // block_p))
    else:
        block_c = max(2, min(_pow2(C), 256))
        block_p = max(2, min(_pow2(P), _TILE // block_c))
    chunks = -(-C // block_c)
    tiles = -(-P // block_p)
    target = _programs_target(device)
    num_warps = max(1, min(8, (block_c * block_p) // 128))
    if backward and N < 16:
        pix_iters = 1
        while (pix_iters < 64 and block_p * pix_iters < P
               and -(-P // (block_p * pix_iters * 2)) * chunks >= target):
            pix_iters *= 2
        return LaunchConfig(block_c, block_p, block_c, num_warps, pix_iters)
    groups = min(chunks, max(1, -(-target // tiles)))
    cpg = -(-chunks // groups) * block_c
    return LaunchConfig(block_c, block_p, cpg, num_warps)


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
    dummy = torch.empty(1, dtype=f32, device=dev)
    xc = x.contiguous()
    ac = a.contiguous() if a.numel() else dummy  # C = 1: no subnet output; never a null pointer
    g, beta = _per_channel(global_scale, C), _per_channel(global_offset, C)
    permc = perm.to(torch.int64).contiguous() if perm is not None else torch.empty(1, dtype=torch.int64, device=dev)
    mu_c = _per_channel(mu, C) if loglik else dummy
    ls_c = _per_channel(log_sigma, C) if loglik else dummy
    clamp_code = CLAMP_CODES[clamp_mode]

    gin_mean = empty
    if gin:
        cfg2 = launch_config(C2, N, P, dev)
        g2 = cfg2.groups(C2)
        part = torch.empty((g2, P), dtype=f32, device=dev)
        _launch(k._coupling_gin_stats_kernel, (cfg2.tiles(P), g2), part, ac, C2, N, P, cfg2.cpg,
                float(clamp), CLAMP_MODE=clamp_code, BLOCK_C=cfg2.block_c, BLOCK_P=cfg2.block_p,
                num_warps=cfg2.num_warps)
        gin_mean = part.view(g2, B, N).sum(dim=(0, 2)) / float(C2 * N)

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

    def finish(part: Optional[Tensor], like: Optional[Tensor]) -> Tensor:
        if like is None:
            return torch.empty(0, dtype=f32, device=dev)
        if part is None:
            return torch.zeros(like.shape, dtype=like.dtype, device=dev)
        return part.sum(dim=0).reshape(like.shape).to(like.dtype)

    if P == 0:
        return (gx, ga, finish(None, global_scale), finish(None, global_offset),
                finish(None, mu), finish(None, log_sigma))
    k = _kernels()
    dummy = torch.empty(1, dtype=f32, device=dev)
    xc = x.contiguous()
    ac = a.contiguous() if a.numel() else dummy
    g, beta = _per_channel(global_scale, C), _per_channel(global_offset, C)
    permc = perm.to(torch.int64).contiguous() if perm is not None else torch.empty(1, dtype=torch.int64, device=dev)
    gx_arg = gx if need_x else dummy
    ga_arg = ga if (need_a and ga.numel()) else dummy
    gz_c = gz.contiguous() if gz is not None else dummy
    gld_c = (gld.detach().reshape(B).to(f32).contiguous() if gld is not None
             else torch.zeros(B, dtype=f32, device=dev))
    if loglik:
        mu_c, ls_c = _per_channel(mu, C), _per_channel(log_sigma, C)
        glp_pix_c = (glp_pixel.reshape(P).to(f32).contiguous() if glp_pixel is not None
                     else torch.zeros(P, dtype=f32, device=dev))
        glp_smp_c = (glp_sample.reshape(B).to(f32).contiguous() if glp_sample is not None
                     else torch.zeros(B, dtype=f32, device=dev))
    else:
        mu_c = ls_c = glp_pix_c = glp_smp_c = dummy
    gld_pix_c = gld_pixel.reshape(P).to(f32).contiguous() if gld_pixel is not None else dummy

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
    _launch(k._coupling_bwd_kernel, (R, G), gx_arg, ga_arg, gg_part, gbeta_part, gmu_part, gls_part,
            gz_c, gld_c, gld_pix_c, glp_pix_c, glp_smp_c, xc, ac, g, beta, permc, mu_c, ls_c, gin_mean_c,
            gs_mean, *sizes, AFFINE=AFFINE_CODES[affine_type], GIN=bool(gin), STORE_DX=bool(need_x),
            STORE_DA=bool(need_a) and C2 > 0, PIX_ITERS=cfg.pix_iters, **flags)
    return (gx, ga, finish(None if gin else gg_part, global_scale), finish(gbeta_part, global_offset),
            finish(gmu_part if loglik else None, mu), finish(gls_part if loglik else None, log_sigma))


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
