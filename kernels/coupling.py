"""Triton kernels of AllInOneBlock's post-subnet step (SPEC 1 steps 2, 4-8 and SPEC 2).

Data layout. Every data tensor is viewed as (B, C, N) contiguous, N = product of the spatial sizes
(N = 1 for (B, C) data). A "pixel" is one (b, n) pair, flattened to p = b * N + n, P = B * N; the
element (b, c, n) of a tensor with Ct channels sits at b * Ct * N + c * N + n. Each program owns a
tile of BLOCK_P consecutive pixels (which may straddle samples) and one *channel group* of CPG
consecutive output channels, which it walks in chunks of BLOCK_C: grid = (cdiv(P, BLOCK_P), G),
G = cdiv(C, CPG). A chunk is a [BLOCK_C, BLOCK_P] register tile: contiguous along pixels for
spatial data, along channels for N = 1 (CFLOW-AD's (B*H*W, C) fibers).

Channels. The kernels walk *output* channels i (z's channel order) and gather the source channel
j = perm[i] (z[:, i] = v[:, perm[i]]): z, mu and log_sigma are indexed by i, x, a, Psi(g) and beta
by j. j < C1 is passive (v = x * Psi + beta); j >= C1 is the transformed channel k = j - C1 with
log-scale a[:, k] and shift a[:, C2 + k] (s = clamp(0.1 a_s), t = 0.1 a_t, v = (x e^s + t) Psi + beta).

Reductions, all float32 and deterministic (no atomics): per-pixel quantities (log-det, base
log-likelihood, the GIN statistics) are written as (G, P) partial buffers, one row per channel group,
and summed afterwards by the launcher (the log-det's row sums are the per-pixel log-det, returned as
such; the per-sample log-det is their sum over the sample's pixels); per-channel parameter gradients
are written as (R, C) partial buffers, R = the number of programs along the pixels (one row per
program; each (row, channel) is written by exactly one program), and summed afterwards. For fiber data the backward lets each
program loop over PIX_ITERS pixel sub-tiles (one channel chunk per program) so that R stays small.

GIN (volume-preserving coupling) subtracts the per-sample mean of s over (C2, N). That couples all
elements of a sample, so it runs as two phases: ``_coupling_gin_stats_kernel`` first writes per-pixel
partial sums of the clamped log-scale (summed by the launcher into the (B,) mean), then the forward
kernel reads the mean. The backward likewise needs the per-sample mean of dL/ds:
``_coupling_bwd_gin_stats_kernel`` writes its per-pixel partial sums (summed by the launcher into
the (B,) mean), then ``_coupling_bwd_kernel`` subtracts the mean and writes the gradients.

Triton 3.0-3.8 APIs only (tl.program_id, tl.arange, masked tl.load/tl.store, tl.sum, tl.where,
tl.exp, tl.log); every special function comes from ``kernels/math.py`` (no libdevice).
"""
import triton
import triton.language as tl

from .math import global_scale, soft_clamp


@triton.jit
def _pixel_offsets(pid_p, N, BLOCK_P: tl.constexpr, P):
    """Pixel indices p of this tile (int64), their mask, and (b, n)."""
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    pmask = p < P
    b = p // N
    n = p - b * N
    return p, pmask, b, n


@triton.jit
def _channel_chunk(pid_g, CPG, c0, C, C1, perm_ptr, HAS_PERM: tl.constexpr, BLOCK_C: tl.constexpr):
    """One chunk of output channels i of group pid_g: (i, its mask, the source channel j = perm[i],
    whether j is a transformed channel, and k = j - C1, its index among the transformed ones)."""
    i = pid_g * CPG + c0 + tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = i < C
    if HAS_PERM:
        j = tl.load(perm_ptr + i, mask=cmask, other=0)
    else:
        j = i
    active = cmask & (j >= C1)
    k = tl.where(active, j - C1, 0)
    return i, cmask, j, active, k


@triton.jit
def _coupling_tile(x_ptr, a_ptr, x_off, a_off, shift_off, mask, amask, active, m, alpha,
                   CLAMP_MODE: tl.constexpr, GIN: tl.constexpr):
    """The coupling on one [BLOCK_C, BLOCK_P] tile, shared by the forward and the backward (which
    recomputes it): loads x at ``x_off`` and the raw log-scale / shift at ``a_off`` /
    ``a_off + shift_off``, applies the 0.1 pre-scale, the soft clamp and (GIN) the centring by the
    per-pixel mean ``m``. Returns (x, s, ds/da_s of the clamp, exp(s), u) in float32; s is 0 and
    u = x on passive channels and masked elements."""
    xv = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    a_s = tl.load(a_ptr + a_off, mask=amask, other=0.0).to(tl.float32) * 0.1
    a_t = tl.load(a_ptr + a_off + shift_off, mask=amask, other=0.0).to(tl.float32) * 0.1
    s, ds = soft_clamp(a_s, alpha, CLAMP_MODE)
    if GIN:
        s = s - m[None, :]
    s = tl.where(amask, s, 0.0)
    es = tl.exp(s)
    u = tl.where(active[:, None], xv * es + a_t, xv)
    return xv, s, ds, es, u


@triton.jit
def _coupling_gin_stats_kernel(
    part_ptr,
    a_ptr,
    C2, N, P, CPG, alpha,
    CLAMP_MODE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """GIN statistics of the forward: per-pixel partial sums of the clamped log-scale.

    part_ptr: (G, P) float32 out; row g = sum over log-scale channels k in group g of
        soft_clamp(0.1 * a[b, k, n]) at pixel p = b * N + n.
    a_ptr: (B, 2 * C2, N) subnet output, any float dtype (only the first C2 channels are read).
    Grid (cdiv(P, BLOCK_P), G); group g covers log-scale channels [g * CPG, (g + 1) * CPG).
    """
    pid_p = tl.program_id(0).to(tl.int64)
    pid_g = tl.program_id(1).to(tl.int64)
    p, pmask, b, n = _pixel_offsets(pid_p, N, BLOCK_P, P)
    a_pix = b * (2 * C2) * N + n
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, CPG, BLOCK_C):
        k = pid_g * CPG + c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        kmask = k < C2
        mask = kmask[:, None] & pmask[None, :]
        a_s = tl.load(a_ptr + a_pix[None, :] + k[:, None] * N, mask=mask, other=0.0).to(tl.float32) * 0.1
        s, _ = soft_clamp(a_s, alpha, CLAMP_MODE)
        acc += tl.sum(tl.where(mask, s, 0.0), axis=0)
    tl.store(part_ptr + pid_g * P + p, acc, mask=pmask)


@triton.jit
def _coupling_fwd_kernel(
    z_ptr, ld_part_ptr, lp_part_ptr,
    x_ptr, a_ptr, g_ptr, beta_ptr, perm_ptr, mu_ptr, ls_ptr, gin_mean_ptr,
    C, C1, C2, N, P, CPG, alpha,
    CLAMP_MODE: tl.constexpr, AFFINE: tl.constexpr, GIN: tl.constexpr, HAS_PERM: tl.constexpr,
    LOGLIK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Forward of the fused step: coupling, soft clamp, GIN, global affine, permutation, log-det
    and (LOGLIK) the learnable-Gaussian log-likelihood.

    Outputs:
      z_ptr: (B, C, N) in x's dtype; z[:, i] = v[:, perm[i]].
      ld_part_ptr: (G, P) float32; row g, pixel p: sum over the group's output channels of
        s (transformed channels, after GIN centring) + log Psi(g_j) (all channels; not with GIN).
        Summed over rows and the sample's pixels this is the log-det.
      lp_part_ptr: (G, P) float32 (LOGLIK only): sum over the group's output channels i of
        -0.5 ((z - mu_i) exp(-log_sigma_i))^2 - log_sigma_i - 0.5 log(2 pi), z rounded to its dtype.
    Inputs:
      x_ptr: (B, C, N) float32/float16/bfloat16.
      a_ptr: (B, 2 * C2, N) raw subnet output [log-scale | shift], any of those dtypes.
      g_ptr, beta_ptr: (C,) float32 global scale pre-activation and offset, by source channel.
      perm_ptr: (C,) int64 (HAS_PERM): source channel of each output channel.
      mu_ptr, ls_ptr: (C,) float32 (LOGLIK): base mean and log standard deviation, by output channel.
      gin_mean_ptr: (B,) float32 (GIN): per-sample mean of the clamped log-scale.
    Sizes: C = C1 + C2 channels, N pixels per sample, P = B * N, CPG output channels per group
    (a multiple of BLOCK_C), alpha the clamp. Grid (cdiv(P, BLOCK_P), cdiv(C, CPG)).
    """
    pid_p = tl.program_id(0).to(tl.int64)
    pid_g = tl.program_id(1).to(tl.int64)
    p, pmask, b, n = _pixel_offsets(pid_p, N, BLOCK_P, P)
    x_pix = b * C * N + n
    a_pix = b * (2 * C2) * N + n
    m = tl.zeros([BLOCK_P], dtype=tl.float32)
    if GIN:
        m = tl.load(gin_mean_ptr + b, mask=pmask, other=0.0)
    ld = tl.zeros([BLOCK_P], dtype=tl.float32)
    lp_acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, CPG, BLOCK_C):
        i, cmask, j, active, k = _channel_chunk(pid_g, CPG, c0, C, C1, perm_ptr, HAS_PERM, BLOCK_C)
        mask = cmask[:, None] & pmask[None, :]
        amask = active[:, None] & pmask[None, :]
        _, s, _, _, u = _coupling_tile(x_ptr, a_ptr, x_pix[None, :] + j[:, None] * N,
                                       a_pix[None, :] + k[:, None] * N, C2 * N, mask, amask, active, m, alpha,
                                       CLAMP_MODE, GIN)
        beta = tl.load(beta_ptr + j, mask=cmask, other=0.0)
        if GIN:
            v = u + beta[:, None]
            ld += tl.sum(s, axis=0)
        else:
            g = tl.load(g_ptr + j, mask=cmask, other=0.0)
            psi, _ = global_scale(g, AFFINE)
            v = u * psi[:, None] + beta[:, None]
            log_psi = tl.sum(tl.where(cmask, tl.log(tl.where(cmask, psi, 1.0)), 0.0), axis=0)
            ld += tl.sum(s, axis=0) + log_psi
        zq = v.to(z_ptr.dtype.element_ty)
        tl.store(z_ptr + x_pix[None, :] + i[:, None] * N, zq, mask=mask)
        if LOGLIK:
            mu = tl.load(mu_ptr + i, mask=cmask, other=0.0)
            ls = tl.load(ls_ptr + i, mask=cmask, other=0.0)
            w = (zq.to(tl.float32) - mu[:, None]) * tl.exp(-ls)[:, None]
            lp = -0.5 * w * w - ls[:, None] - 0.9189385332046727  # 0.5 * log(2 pi)
            lp_acc += tl.sum(tl.where(mask, lp, 0.0), axis=0)
    tl.store(ld_part_ptr + pid_g * P + p, ld, mask=pmask)
    if LOGLIK:
        tl.store(lp_part_ptr + pid_g * P + p, lp_acc, mask=pmask)


@triton.jit
def _bwd_pixel_state(tile, N, P, gld_ptr, gld_pix_ptr, glp_pix_ptr, glp_smp_ptr, gin_mean_ptr,
                     GIN: tl.constexpr, LOGLIK: tl.constexpr, HAS_GLD_PIX: tl.constexpr, BLOCK_P: tl.constexpr):
    """Per-pixel state of one pixel tile of the backward: p, mask, (b, n), the upstream log-det
    gradient at the pixel, gld = dL/dlog_det[b] + dL/dlog_det_pixel[p] (HAS_GLD_PIX; with GIN only
    the per-pixel term: the per-sample one cancels in the centring), the log-likelihood weight
    glp_pixel[p] + glp_sample[b] (LOGLIK), and the forward's GIN mean of s (GIN). Unused ones are
    zeros."""
    p, pmask, b, n = _pixel_offsets(tile, N, BLOCK_P, P)
    gld = tl.zeros([BLOCK_P], dtype=tl.float32)
    if not GIN:
        gld = tl.load(gld_ptr + b, mask=pmask, other=0.0)
    if HAS_GLD_PIX:
        gld += tl.load(gld_pix_ptr + p, mask=pmask, other=0.0)
    wpix = tl.zeros([BLOCK_P], dtype=tl.float32)
    m = tl.zeros([BLOCK_P], dtype=tl.float32)
    if LOGLIK:
        wpix = tl.load(glp_pix_ptr + p, mask=pmask, other=0.0) + tl.load(glp_smp_ptr + b, mask=pmask, other=0.0)
    if GIN:
        m = tl.load(gin_mean_ptr + b, mask=pmask, other=0.0)
    return p, pmask, b, n, gld, wpix, m


@triton.jit
def _gs_mean(gs_mean_ptr, b, pmask, GIN: tl.constexpr, BLOCK_P: tl.constexpr):
    """The per-sample mean of dL/ds at each pixel (GIN; zeros otherwise)."""
    gs_mean = tl.zeros([BLOCK_P], dtype=tl.float32)
    if GIN:
        gs_mean = tl.load(gs_mean_ptr + b, mask=pmask, other=0.0)
    return gs_mean


@triton.jit
def _grad_v(gz_ptr, z_off, mask, u, psi, beta, mu, e, wpix, x_ptr,
            HAS_GZ: tl.constexpr, LOGLIK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """dL/dv on one [BLOCK_C, BLOCK_P] tile (v = u * Psi + beta, by output channel): the upstream
    gz (HAS_GZ) plus, with LOGLIK, the base log-likelihood's term wpix * dlogp/dz, z recomputed as
    stored (x's dtype); zero on masked elements. Also returns, for the base's parameter gradients,
    w = (z - mu) exp(-log_sigma), the masked weight wp and dlogp/dz (zeros without LOGLIK)."""
    if HAS_GZ:
        gv = tl.load(gz_ptr + z_off, mask=mask, other=0.0).to(tl.float32)
    else:
        gv = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    w = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    wp = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    dlp_dz = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    if LOGLIK:
        v = u * psi[:, None] + beta[:, None]
        zq = v.to(x_ptr.dtype.element_ty).to(tl.float32)  # z as stored (x's dtype)
        w = (zq - mu[:, None]) * e[:, None]
        wp = tl.where(mask, wpix[None, :], 0.0)
        dlp_dz = -w * e[:, None]
        gv += wp * dlp_dz
    gv = tl.where(mask, gv, 0.0)
    return gv, w, wp, dlp_dz


@triton.jit
def _base_params(j, i, cmask, beta_ptr, mu_ptr, ls_ptr, LOGLIK: tl.constexpr, BLOCK_C: tl.constexpr):
    """beta (by source channel j), mu and exp(-log_sigma) (by output channel i) of one channel
    chunk, loaded for the base log-likelihood's term (LOGLIK; zeros otherwise)."""
    beta = tl.zeros([BLOCK_C], dtype=tl.float32)
    mu = tl.zeros([BLOCK_C], dtype=tl.float32)
    ls = tl.zeros([BLOCK_C], dtype=tl.float32)
    if LOGLIK:
        beta = tl.load(beta_ptr + j, mask=cmask, other=0.0)
        mu = tl.load(mu_ptr + i, mask=cmask, other=0.0)
        ls = tl.load(ls_ptr + i, mask=cmask, other=0.0)
    return beta, mu, ls, tl.exp(-ls)


@triton.jit
def _coupling_bwd_gin_stats_kernel(
    gs_part_ptr,
    gz_ptr, gld_pix_ptr, glp_pix_ptr, glp_smp_ptr,
    x_ptr, a_ptr, beta_ptr, perm_ptr, mu_ptr, ls_ptr, gin_mean_ptr,
    C, C1, C2, N, P, CPG, alpha,
    CLAMP_MODE: tl.constexpr, HAS_PERM: tl.constexpr, LOGLIK: tl.constexpr, HAS_GZ: tl.constexpr,
    HAS_GLD_PIX: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """GIN statistics of the backward: per-pixel partial sums of dL/ds before the GIN centring.

    gs_part_ptr: (G, P) float32 out; row g, pixel p: sum over the group's output channels whose
        source is a transformed channel of dL/ds (the coupling's share through z and the base
        log-likelihood, plus the per-pixel log-det's upstream; the per-sample log-det term,
        constant per sample, cancels in the centring and is left out). The launcher sums it into
        the (B,) mean that ``_coupling_bwd_kernel`` (GIN) subtracts.
    Inputs as ``_coupling_bwd_kernel`` (gz HAS_GZ, gld_pix HAS_GLD_PIX, glp_* and mu/log_sigma
    LOGLIK), GIN implied (Psi = 1). Grid (cdiv(P, BLOCK_P), G), the backward's channel groups.
    """
    pid_p = tl.program_id(0).to(tl.int64)
    pid_g = tl.program_id(1).to(tl.int64)
    # with GIN the per-sample log-det gradient is not read: gin_mean_ptr stands in for gld_ptr
    p, pmask, b, n, gld, wpix, m = _bwd_pixel_state(pid_p, N, P, gin_mean_ptr, gld_pix_ptr, glp_pix_ptr,
                                                    glp_smp_ptr, gin_mean_ptr, True, LOGLIK, HAS_GLD_PIX, BLOCK_P)
    x_pix = b * C * N + n
    a_pix = b * (2 * C2) * N + n
    psi = tl.full([BLOCK_C], 1.0, dtype=tl.float32)
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, CPG, BLOCK_C):
        i, cmask, j, active, k = _channel_chunk(pid_g, CPG, c0, C, C1, perm_ptr, HAS_PERM, BLOCK_C)
        beta, mu, _, e = _base_params(j, i, cmask, beta_ptr, mu_ptr, ls_ptr, LOGLIK, BLOCK_C)
        mask = cmask[:, None] & pmask[None, :]
        amask = active[:, None] & pmask[None, :]
        xv, _, _, es, u = _coupling_tile(x_ptr, a_ptr, x_pix[None, :] + j[:, None] * N,
                                         a_pix[None, :] + k[:, None] * N, C2 * N, mask, amask, active, m, alpha,
                                         CLAMP_MODE, True)
        gv, _, _, _ = _grad_v(gz_ptr, x_pix[None, :] + i[:, None] * N, mask, u, psi, beta, mu, e, wpix, x_ptr,
                              HAS_GZ, LOGLIK, BLOCK_C, BLOCK_P)
        gu = gv * psi[:, None]
        acc += tl.sum(tl.where(amask, gu * xv * es + gld[None, :], 0.0), axis=0)
    tl.store(gs_part_ptr + pid_g * P + p, acc, mask=pmask)


@triton.jit
def _coupling_bwd_kernel(
    gx_ptr, ga_ptr, gg_part_ptr, gbeta_part_ptr, gmu_part_ptr, gls_part_ptr,
    gz_ptr, gld_ptr, gld_pix_ptr, glp_pix_ptr, glp_smp_ptr,
    x_ptr, a_ptr, g_ptr, beta_ptr, perm_ptr, mu_ptr, ls_ptr, gin_mean_ptr, gs_mean_ptr,
    C, C1, C2, N, P, CPG, alpha,
    CLAMP_MODE: tl.constexpr, AFFINE: tl.constexpr, GIN: tl.constexpr, HAS_PERM: tl.constexpr,
    LOGLIK: tl.constexpr, HAS_GZ: tl.constexpr, HAS_GLD_PIX: tl.constexpr,
    STORE_DX: tl.constexpr, STORE_DA: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    PIX_ITERS: tl.constexpr,
):
    """Backward of ``_coupling_fwd_kernel``: recomputes the forward (exp, tanh/atan, z) from the
    saved inputs and writes every gradient in one pass (after ``_coupling_bwd_gin_stats_kernel``
    with GIN).

    A program owns PIX_ITERS consecutive pixel sub-tiles of BLOCK_P pixels and one channel group:
    grid (cdiv(P, PIX_ITERS * BLOCK_P), G). For each channel chunk it walks its sub-tiles,
    accumulating the per-channel parameter gradients in registers, and writes them once: with
    fiber data (N = 1, pixel sub-tiles of only a few rows) PIX_ITERS > 1 keeps the (R, C) partial
    buffers small. PIX_ITERS > 1 requires CPG == BLOCK_C (one chunk per group).

    Outputs:
      gx_ptr: (B, C, N) in x's dtype, by source channel (STORE_DX; else unused).
      ga_ptr: (B, 2 * C2, N) in a's dtype (gradient of the raw subnet output, 0.1 pre-scale
        included) (STORE_DA; else unused). AltUB's base-only update needs neither.
      gg_part_ptr: (R, C) float32, R = cdiv(P, PIX_ITERS * BLOCK_P), by source channel: this
        program's dL/dg (not written with GIN, where g is unused).
      gbeta_part_ptr: (R, C) float32 by source channel: this program's dL/dbeta.
      gmu_part_ptr, gls_part_ptr: (R, C) float32 by output channel (LOGLIK): dL/dmu, dL/dlog_sigma.
    Upstream gradients:
      gz_ptr: (B, C, N) any float dtype (HAS_GZ; else zero). gld_ptr: (B,) float32 (dL/dlog_det).
      gld_pix_ptr: (P,) float32 (HAS_GLD_PIX): dL/dlog_det_pixel, the per-pixel log-det's upstream.
      glp_pix_ptr: (P,) float32, glp_smp_ptr: (B,) float32 (LOGLIK): dL/dlogp_pixel, dL/dlogp_sample.
    Saved inputs: x_ptr, a_ptr, g_ptr, beta_ptr, perm_ptr, mu_ptr, ls_ptr, gin_mean_ptr as in the
    forward; gs_mean_ptr: (B,) float32 (GIN): per-sample mean of dL/ds, from the GIN statistics
    kernel (zeros when a's gradient is not needed: the centring only changes that one).
    Sizes as the forward.
    """
    pid_p = tl.program_id(0).to(tl.int64)
    pid_g = tl.program_id(1).to(tl.int64)
    if PIX_ITERS == 1:  # one sub-tile: its pixel state is loop-invariant, hoist it
        p1, pmask1, b1, n1, gld1, wpix1, m1 = _bwd_pixel_state(
            pid_p, N, P, gld_ptr, gld_pix_ptr, glp_pix_ptr, glp_smp_ptr, gin_mean_ptr, GIN, LOGLIK, HAS_GLD_PIX,
            BLOCK_P)
        gs_mean1 = _gs_mean(gs_mean_ptr, b1, pmask1, GIN, BLOCK_P)
    for c0 in range(0, CPG, BLOCK_C):
        i, cmask, j, active, k = _channel_chunk(pid_g, CPG, c0, C, C1, perm_ptr, HAS_PERM, BLOCK_C)
        if GIN:
            psi = tl.full([BLOCK_C], 1.0, dtype=tl.float32)
        else:
            g = tl.load(g_ptr + j, mask=cmask, other=0.0)
            psi, dpsi = global_scale(g, AFFINE)
        beta, mu, ls, e = _base_params(j, i, cmask, beta_ptr, mu_ptr, ls_ptr, LOGLIK, BLOCK_C)
        acc_beta = tl.zeros([BLOCK_C], dtype=tl.float32)
        acc_gu = tl.zeros([BLOCK_C], dtype=tl.float32)  # sum of dL/dv * u
        acc_gld = tl.zeros([BLOCK_P], dtype=tl.float32)  # dL/dlog_det summed over sub-tiles
        acc_mu = tl.zeros([BLOCK_C], dtype=tl.float32)
        acc_ls = tl.zeros([BLOCK_C], dtype=tl.float32)
        for t in range(PIX_ITERS):
            if PIX_ITERS == 1:
                p, pmask, b, n, gld, wpix, m, gs_mean = p1, pmask1, b1, n1, gld1, wpix1, m1, gs_mean1
            else:
                p, pmask, b, n, gld, wpix, m = _bwd_pixel_state(
                    pid_p * PIX_ITERS + t, N, P, gld_ptr, gld_pix_ptr, glp_pix_ptr, glp_smp_ptr, gin_mean_ptr,
                    GIN, LOGLIK, HAS_GLD_PIX, BLOCK_P)
                gs_mean = _gs_mean(gs_mean_ptr, b, pmask, GIN, BLOCK_P)
            x_pix = b * C * N + n
            a_pix = b * (2 * C2) * N + n
            mask = cmask[:, None] & pmask[None, :]
            amask = active[:, None] & pmask[None, :]
            x_off = x_pix[None, :] + j[:, None] * N
            a_off = a_pix[None, :] + k[:, None] * N
            xv, s, ds, es, u = _coupling_tile(x_ptr, a_ptr, x_off, a_off, C2 * N, mask, amask, active, m, alpha,
                                              CLAMP_MODE, GIN)
            gv, w, wp, dlp_dz = _grad_v(gz_ptr, x_pix[None, :] + i[:, None] * N, mask, u, psi, beta, mu, e, wpix,
                                        x_ptr, HAS_GZ, LOGLIK, BLOCK_C, BLOCK_P)
            if LOGLIK:
                acc_mu += tl.sum(-wp * dlp_dz, axis=1)
                acc_ls += tl.sum(wp * (w * w - 1.0), axis=1)
            gu = gv * psi[:, None]
            gs = tl.where(amask, gu * xv * es + gld[None, :], 0.0)  # dL/ds before the GIN centring
            if GIN:
                gs = tl.where(amask, gs - gs_mean[None, :], 0.0)
            acc_beta += tl.sum(gv, axis=1)
            if not GIN:
                acc_gu += tl.sum(gv * u, axis=1)
                acc_gld += gld  # masked pixels loaded 0
            if STORE_DX:
                gx = tl.where(active[:, None], gu * es, gu)
                tl.store(gx_ptr + x_off, gx.to(gx_ptr.dtype.element_ty), mask=mask)
            if STORE_DA:
                tl.store(ga_ptr + a_off, (gs * ds * 0.1).to(ga_ptr.dtype.element_ty), mask=amask)
                tl.store(ga_ptr + a_off + C2 * N, (gu * 0.1).to(ga_ptr.dtype.element_ty), mask=amask)
        tl.store(gbeta_part_ptr + pid_p * C + j, acc_beta, mask=cmask)
        if not GIN:
            gld_sum = tl.sum(acc_gld, axis=0)
            tl.store(gg_part_ptr + pid_p * C + j, dpsi * (acc_gu + gld_sum / psi), mask=cmask)
        if LOGLIK:
            tl.store(gmu_part_ptr + pid_p * C + i, acc_mu, mask=cmask)
            tl.store(gls_part_ptr + pid_p * C + i, acc_ls, mask=cmask)
