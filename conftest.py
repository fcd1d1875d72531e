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


#: Benchmark sizes: "tiny" (a plain `pytest`: each benchmark once, untimed, as a smoke test),
#: "reduced" (`pytest --benchmark-only`, the default: representative sizes, every provider, minutes)
#: and "full" (`--full-sweep` or ALTUB_FAST_BENCH=full: the whole sweep at wide_resnet50_2 shapes).
BENCH_SCALES = ("tiny", "reduced", "full")


def pytest_addoption(parser):
    parser.addoption("--full-sweep", action="store_true", default=False,
                     help="with --benchmark-only: time the full benchmark sweep (every case, wide_resnet50_2 "
                          "shapes; well over half an hour on a small CPU) instead of the reduced default. "
                          "Same as ALTUB_FAST_BENCH=full.")


def benchmark_scale(config) -> str:
    """The benchmark size of this session (see BENCH_SCALES)."""
    if getattr(config.option, "benchmark_disable", True):
        return "tiny"
    env = os.environ.get("ALTUB_FAST_BENCH", "").strip().lower()
    if env not in ("", "reduced", "full"):
        raise pytest.UsageError(f"ALTUB_FAST_BENCH must be 'reduced' or 'full' (or unset), got {env!r}")
    return "full" if (config.getoption("full_sweep") or env == "full") else "reduced"


@pytest.fixture(scope="session")
def bench_scale(request) -> str:
    return benchmark_scale(request.config)


@pytest.hookimpl(optionalhook=True)  # a pytest-benchmark hook
def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["bench_scale"] = benchmark_scale(config)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device (none here)")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)
    # Benchmark cases by size (reported as deselected, not passed): `full_benchmark` cases run only
    # in the full sweep; `timed_benchmark` cases (another shape, a provider whose compilation alone
    # takes tens of seconds) run whenever benchmarks are timed but not in a plain `pytest`, which
    # keeps one tiny smoke case per benchmark.
    scale = benchmark_scale(config)
    dropped = {"tiny": ("full_benchmark", "timed_benchmark"), "reduced": ("full_benchmark",), "full": ()}[scale]
    if dropped:
        keep, drop = [], []
        for item in items:
            (drop if any(m in item.keywords for m in dropped) else keep).append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep


def _interpreter_problem():
    """Why Triton's interpreter cannot run the kernels here, or None. Triton 3.6's interpreter
    breaks on numpy >= 2.4 (a loop bound that is a kernel argument: triton-lang/triton#9171);
    a probe kernel with such a loop finds it out in milliseconds."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import triton
        import triton.language as tl
    except Exception:
        return None   # no triton: the kernel tests skip with their own reason

    @triton.jit
    def _probe(out_ptr, n):
        acc = tl.zeros([1], dtype=tl.float32)
        for _ in range(0, n, 1):
            acc += 1.0
        tl.store(out_ptr + tl.arange(0, 1), acc)

    out = torch.zeros(1)
    try:
        _probe[(1,)](out, 2)
    except Exception as e:
        import numpy
        return (f"Triton {triton.__version__}'s interpreter cannot run a loop over a kernel argument with "
                f"numpy {numpy.__version__} ({type(e).__name__}: {e}); this is triton-lang/triton#9171. "
                "Install numpy<2.4 beside this Triton, or the Triton that torch pins (3.8 with torch 2.14)")
    return None if float(out[0]) == 2.0 else "Triton's interpreter gave a wrong result on a probe kernel"


def pytest_configure(config):
    problem = _interpreter_problem()
    if problem:
        raise pytest.UsageError(problem)
    # A plain `pytest` must not spend benchmark time: unless benchmarks were asked for
    # (--benchmark-only / --benchmark-enable / --benchmark-json ...), they run once, untimed, as
    # smoke tests at the tiny sizes the benchmark files pick when `benchmark.disabled` is set.
    # pytest-benchmark reads this option in its own trylast pytest_configure, after this one.
    opt = config.option
    if not hasattr(opt, "benchmark_disable"):
        return
    asked = (getattr(opt, "benchmark_only", False) or getattr(opt, "benchmark_enable", False)
             or getattr(opt, "benchmark_json", None) or getattr(opt, "benchmark_autosave", False)
             or getattr(opt, "benchmark_save", None) or getattr(opt, "full_sweep", False))
    if not asked:
        opt.benchmark_disable = True
