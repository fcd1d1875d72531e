"""Shared pieces of the benchmarks: shapes, device, synchronised timing, result bookkeeping.

Ratios are only ever computed between providers measured in the same run (machines are noisy):
each benchmark stores its mean in ``RESULTS`` and the providers measured after the reference of
the same (level, shape, mode) record ``speedup_vs_reference`` in ``extra_info``; the report
script recomputes every ratio from the JSON.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn as nn

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"

#: FastFlow feature shapes (C, H, W) per backbone at input 256 (SPEC 3).
FASTFLOW_SHAPES = {
    "resnet18": [(64, 64, 64), (128, 32, 32), (256, 16, 16)],
    "wide_resnet50_2": [(256, 64, 64), (512, 32, 32), (1024, 16, 16)],
}
CONV3X3_ONLY = {"resnet18": True, "wide_resnet50_2": False}
TINY_SHAPE = (8, 8, 8)
BATCH = 32 if ON_GPU else 4
TINY_BATCH = 2
#: The reduced run (``pytest --benchmark-only`` without ``--full-sweep``) on the CPU: the same
#: channel counts at half the side (a quarter of the pixels) and half the batch. What separates the
#: providers (the permutation's O(C) or O(C^2) per pixel against the subnet's) depends on the
#: channels, so the ratios stay representative at an eighth of the work.
REDUCED_BATCH = 32 if ON_GPU else 2

#: (level, shape, mode) -> reference mean seconds, filled as the reference benchmarks run.
RESULTS: dict = {}


def sized(shape, bench_scale: str):
    """A full-size (C, H, W) as the given benchmark scale runs it ("tiny" gives TINY_SHAPE)."""
    if bench_scale == "tiny":
        return TINY_SHAPE
    if bench_scale == "reduced" and not ON_GPU:
        C, H, W = shape
        return (C, max(1, H // 2), max(1, W // 2))
    return tuple(shape)


def batch_for(bench_scale: str) -> int:
    return {"tiny": TINY_BATCH, "reduced": REDUCED_BATCH, "full": BATCH}[bench_scale]


@contextlib.contextmanager
def user_default_env():
    """The environment of a user who set nothing: ALTUB_FAST_IMPL unset (auto) and, on the CPU,
    no Triton interpreter (conftest turns it on for the kernel tests)."""
    saved = {k: os.environ.get(k) for k in ("ALTUB_FAST_IMPL", "TRITON_INTERPRET")}
    os.environ.pop("ALTUB_FAST_IMPL", None)
    if not ON_GPU:
        os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def as_installed(fn):
    """``fn`` run in :func:`user_default_env`: the provider that stands for altub_fast as a user
    gets it (the reference asks for impl="torch" explicitly and FrEIA ignores the switch)."""
    def call(*args, **kwargs):
        with user_default_env():
            return fn(*args, **kwargs)
    return call


def allow_many_compiles(limit: int = 256) -> None:
    """Let dynamo keep one compiled version per benchmark case: every case builds new modules,
    which fail the guards of the last one, and past dynamo's default limit (8) it would silently
    run the rest in eager mode."""
    try:
        import torch._dynamo
    except Exception:  # pragma: no cover - torch without dynamo
        return
    for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(limit, getattr(torch._dynamo.config, knob)))


def sync():
    if ON_GPU:
        torch.cuda.synchronize()


def fastflow_subnet(kernel_size: int, hidden_ratio: float = 1.0):
    """SPEC 3's subnet: Conv2d(k) -> ReLU -> Conv2d(k) with explicit 'same' padding."""
    def ctor(c_in, c_out):
        hidden = int(c_in * hidden_ratio)
        pad = kernel_size // 2
        return nn.Sequential(nn.Conv2d(c_in, hidden, kernel_size, padding=pad), nn.ReLU(),
                             nn.Conv2d(hidden, c_out, kernel_size, padding=pad))
    return ctor


def run_timed(benchmark, fn, rounds: int, warmup: int = 1):
    """pedantic timing with a device sync inside each timed call."""
    def call():
        out = fn()
        sync()
        return out
    if benchmark.disabled:
        return benchmark(call)
    return benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=warmup)


def record(benchmark, key, provider: str, bytes_moved: int = 0, **extra):
    """Store the mean, GB/s and the speed-up over the reference measured earlier in this run."""
    info = benchmark.extra_info
    info.update(extra)
    info["provider"] = provider
    info["device"] = torch.cuda.get_device_name() if ON_GPU else "cpu"
    if benchmark.disabled or benchmark.stats is None:
        return
    mean = benchmark.stats.stats.mean
    if bytes_moved:
        info["bytes_moved"] = int(bytes_moved)
        info["GB_per_s"] = bytes_moved / mean / 1e9
    if provider == "reference":
        RESULTS[key] = mean
    elif key in RESULTS:
        info["speedup_vs_reference"] = RESULTS[key] / mean


def peak_memory(fn) -> int:
    """Peak device memory of one call in bytes (CUDA only; 0 elsewhere)."""
    if not ON_GPU:
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def interleaved_ratio(fn_base, fn_new, rounds: int = 7, warmup: int = 1) -> dict:
    """Speed-up of ``fn_new`` over ``fn_base`` from calls that alternate A, B, B, A, A, B, ...

    Alternating the two puts both under the same background load at nearly the same moments,
    which is what makes a ratio from a shared, noisy machine worth reporting. Returns the ratio of
    median wall times (``ratio_median``, the number to quote) and of minimums, the medians
    themselves (seconds), and on the CPU the ratio of median process CPU times
    (``cpu_ratio_median``: the work done, less sensitive to how much of the machine others take).
    """
    import statistics
    import time

    for _ in range(warmup):
        fn_base(); fn_new(); sync()
    t_base, t_new, c_base, c_new = [], [], [], []
    for i in range(rounds):
        order = ((fn_base, t_base, c_base), (fn_new, t_new, c_new))
        for fn, acc, cacc in (order if i % 2 == 0 else order[::-1]):
            sync()
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            sync()
            acc.append(time.perf_counter() - t0)
            cacc.append(time.process_time() - c0)
    mb, mn = statistics.median(t_base), statistics.median(t_new)
    out = {"ratio_median": mb / mn, "ratio_min": min(t_base) / min(t_new),
           "base_median_s": mb, "new_median_s": mn, "rounds": rounds}
    if not ON_GPU and statistics.median(c_new) > 0:
        out["cpu_ratio_median"] = statistics.median(c_base) / statistics.median(c_new)
    return out


def predict_checkpoint(folder, backbone: str = "resnet18", size: int = 256, flow_steps=None):
    """The model and checkpoint the predict benchmarks score: FastFlow on ``backbone`` with random
    weights, trained one epoch of AltUB on 8 random images and calibrated on 4 of them, saved by the
    trainer under ``folder/ckpt``. Returns (model in eval mode, checkpoint path)."""
    import numpy as np
    from pathlib import Path
    from torch.utils.data import TensorDataset

    from altub_fast.models import build_model
    from altub_fast.train import AltUBTrainer

    torch.manual_seed(0)
    np.random.seed(0)
    kw = dict(flow_steps=flow_steps) if flow_steps else {}
    model = build_model("fastflow", backbone, pretrained=False, image_size=size, **kw)
    x = torch.randn(8, 3, size, size)
    trainer = AltUBTrainer(model, TensorDataset(x), epochs=1, batch_size=4, progress=False,
                           checkpoint_dir=str(Path(folder) / "ckpt"))
    trainer.fit()
    model.calibrate([x[:4]])
    return model.eval(), Path(trainer.save_checkpoint())


def write_png_folder(folder, n: int, px: int):
    """``n`` RGB PNG files of ``px`` x ``px`` (smooth seeded colour waves with pixel noise) in a new
    ``folder``, which is returned."""
    import numpy as np
    from pathlib import Path
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True)
    g = np.random.default_rng(0)
    yy, xx = np.mgrid[0:px, 0:px] / px
    for i in range(n):
        base = 0.5 + 0.4 * np.sin(12 * xx + 3 * yy + 2 * np.pi * g.random())
        rgb = np.stack([base, 0.8 * base, 1 - base], -1) + 0.05 * g.random((px, px, 3))
        Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8)).save(folder / f"{i:04d}.png")
    return folder
