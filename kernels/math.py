"""In-kernel maths shared by the Triton kernels (``@triton.jit`` device functions).

Triton's interpreter (``TRITON_INTERPRET=1``) does not implement libdevice, so ``libdevice.tanh``,
``libdevice.atan`` and ``libdevice.log1p`` are unavailable there. Everything below is written from
``tl.exp``, ``tl.log``, ``tl.abs``, ``tl.where`` and arithmetic only, and the *same* helpers run on
the GPU, so the interpreter tests cover the code that runs there. Only APIs present in Triton 3.0+
are used.

All helpers take and return float32 tensors (callers upcast first). Each is accurate to a few
float32 ulps against torch over the whole real line (see tests/test_kernel_math.py).
"""
import triton
import triton.language as tl

# Constants are written as literals inside the jit functions: Triton >= 3.2 refuses plain Python
# globals in kernels (only tl.constexpr globals), and literals work on every version.


@triton.jit
def tanh(x):
    """tanh(x) for float32 x.

    |x| < 0.2: odd Taylor polynomial to x^9 (truncation < 5e-10); else (1 - e)/(1 + e) with
    e = exp(-2|x|) in (0, 0.67], which cannot overflow and loses at most two bits to cancellation.
    (2*sigmoid(2x) - 1 would lose all relative precision near 0.)
    """
    ax = tl.abs(x)
    xs = tl.where(ax < 0.2, x, 0.0)  # keeps x*x finite on lanes that take the other branch
    x2 = xs * xs
    small = xs * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333
                 + x2 * (-0.05396825396825397 + x2 * 0.021869488536155203))))
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(x < 0.0, -big, big)
    return tl.where(ax < 0.2, small, big)


@triton.jit
def atan(x):
    """atan(x) for float32 x: Cephes ``atanf`` (range reduction to |r| <= tan(pi/8), then a
    degree-9 odd minimax polynomial), about 2 ulp. Denominators are guarded so no lane divides by
    zero (the interpreter evaluates both sides of every tl.where)."""
    ax = tl.abs(x)
    big = ax > 2.414213562373095  # tan(3 pi / 8)
    mid = ax > 0.4142135623730950  # tan(pi / 8)
    safe_ax = tl.where(big, ax, 1.0)
    r_big = -1.0 / safe_ax
    r_mid = (ax - 1.0) / (ax + 1.0)
    r = tl.where(big, r_big, tl.where(mid, r_mid, ax))
    y0 = tl.where(big, 1.5707963267948966, tl.where(mid, 0.7853981633974483, 0.0))  # pi/2, pi/4
    z = r * r
    p = (((8.05374449538e-2 * z - 1.38776856032e-1) * z + 1.99777106478e-1) * z
         - 3.33329491539e-1) * z * r + r
    y = y0 + p
    return tl.where(x < 0.0, -y, y)


@triton.jit
def log1p(x):
    """log(1 + x) for float32 x > -1, accurate for tiny x (Kahan's trick: the rounding error of
    1 + x is divided back out). Exact 0 for x = 0."""
    u = 1.0 + x
    d = u - 1.0
    safe_d = tl.where(d == 0.0, 1.0, d)
    return tl.where(d == 0.0, x, tl.log(u) * (x / safe_d))


@triton.jit
def softplus(x):
    """log(1 + exp(x)) for float32 x, overflow-free: max(x, 0) + log1p(exp(-|x|)). (torch's
    beta/threshold handling is the caller's: see ``global_scale``.)"""
    return tl.maximum(x, 0.0) + log1p(tl.exp(-tl.abs(x)))


@triton.jit
def sigmoid(x):
    """1 / (1 + exp(-x)) for float32 x, overflow-free on both sides."""
    e = tl.exp(-tl.abs(x))
    pos = 1.0 / (1.0 + e)
    return tl.where(x >= 0.0, pos, e * pos)


@triton.jit
def soft_clamp(a, alpha, CLAMP_MODE: tl.constexpr):
    """The coupling's soft clamp s(a) and its derivative ds/da, both float32, for the already
    0.1-pre-scaled log-scale ``a``. CLAMP_MODE 0: legacy alpha*tanh(a); 1: freia
    alpha*tanh(a/alpha); 2: atan alpha*0.636*atan(a). Returns (s, ds_da)."""
    if CLAMP_MODE == 0:
        th = tanh(a)
        s = alpha * th
        ds = alpha * (1.0 - th * th)
    elif CLAMP_MODE == 1:
        th = tanh(a / alpha)
        s = alpha * th
        ds = 1.0 - th * th
    else:
        s = (alpha * 0.636) * atan(a)
        ds = (alpha * 0.636) / (1.0 + a * a)
    return s, ds


@triton.jit
def global_scale(g, AFFINE: tl.constexpr):
    """Psi(g) and dPsi/dg, float32, as torch computes them. AFFINE 0: SOFTPLUS
    0.1*softplus(g, beta=0.5) (torch switches to the identity where g/2 > 20, and so do we);
    1: SIGMOID 10*sigmoid(g - 2); 2: EXP exp(g). Returns (psi, dpsi_dg)."""
    if AFFINE == 0:
        h = 0.5 * g
        lin = h > 20.0
        psi = tl.where(lin, 0.1 * g, 0.2 * softplus(h))
        dpsi = tl.where(lin, 0.1, 0.1 * sigmoid(h))
    elif AFFINE == 1:
        psi = 10.0 * sigmoid(g - 2.0)
        dpsi = psi * sigmoid(2.0 - g)  # 1 - sigmoid(g - 2), without the cancellation
    else:
        psi = tl.exp(g)
        dpsi = psi
    return psi, dpsi
