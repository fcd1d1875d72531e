"""Test-session setup (shared by tests/ and benchmarks/).

Without a CUDA device the Triton kernels run under Triton's interpreter, which must be switched on
before triton is first imported: this file does it for the whole session. The interpreter is slow,
so everything that is not a kernel test runs the reference (ALTUB_FAST_IMPL=torch unless the
caller set it); the kernel tests ask for impl="triton" explicitly.
"""
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("ALTUB_FAST_IMPL", "torch")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

import pytest  # noqa: E402

#: atol/rtol for elementwise outputs by dtype; sums get atol scaled by sqrt(length) in the tests.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


@pytest.fixture
def tol():
    return TOLERANCES


def shared_data_root():
    """The shared data folder (holding magnetic_tile/): $ALTUB_FAST_SHARED_DATA, else shared/data
    beside the repository (where the developers' machines and CI put it)."""
    for cand in (os.environ.get("ALTUB_FAST_SHARED_DATA"), Path(__file__).resolve().parent.parent / "shared" / "data"):
        if cand and (Path(cand) / "magnetic_tile").is_dir():
            return Path(cand)
    return None


@pytest.fixture(scope="session")
def shared_data():
    root = shared_data_root()
    if root is None:
        pytest.skip("shared/data/magnetic_tile not found beside the repository (set ALTUB_FAST_SHARED_DATA)")
    return root


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device (none here)")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)
    # Full-size benchmark cases only run when benchmarks are timed; a plain `pytest` keeps one
    # tiny smoke case per benchmark and deselects the rest (reported as deselected, not passed).
    if getattr(config.option, "benchmark_disable", False):
        keep, drop = [], []
        for item in items:
            (drop if "full_benchmark" in item.keywords else keep).append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep


def pytest_configure(config):
    # A plain `pytest` must not spend benchmark time: unless benchmarks were asked for
    # (--benchmark-only / --benchmark-enable / --benchmark-json ...), they run once, untimed, as
    # smoke tests at the tiny sizes the benchmark files pick when `benchmark.disabled` is set.
    # pytest-benchmark reads this option in its own trylast pytest_configure, after this one.
    opt = config.option
    if not hasattr(opt, "benchmark_disable"):
        return
    asked = (getattr(opt, "benchmark_only", False) or getattr(opt, "benchmark_enable", False)
             or getattr(opt, "benchmark_json", None) or getattr(opt, "benchmark_autosave", False)
             or getattr(opt, "benchmark_save", None))
    if not asked:
        opt.benchmark_disable = True
