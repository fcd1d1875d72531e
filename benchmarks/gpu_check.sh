#!/usr/bin/env bash
# GPU check of the fused coupling kernels: install, CUDA tests, kernel benchmarks, the reduced
# block / flow / FastFlow benchmarks, and the tables last.
#
# Needs: a CUDA device; python with torch, triton, pytest and pytest-benchmark already installed
# (written for the GPU image's torch 2.11 / triton 3.6; FrEIA, timm and the efficientnet_lite0
# package are optional: the benchmarks that need them skip); no network (the package is installed
# with --no-deps --no-build-isolation).
# Budget: under 6 minutes on an H200: every stage runs under a timeout cut from what is left of
# TOTAL_BUDGET seconds (default 340), keeping BENCH_RESERVE seconds (default 170) for the benchmarks,
# FLOWS_RESERVE (default 80) of them for the flow benchmarks.
#
# Usage: bash benchmarks/gpu_check.sh [name]
#   name        results file stem (default coupling_<gpu>_<date>); JSON goes to
#               benchmarks/results/<name>.json (kernels) and <name>_flows.json (blocks, flows,
#               FastFlow), and to $OUT/ when $OUT is set.
# Environment knobs:
#   BENCH_K         pytest -k expression to restrict the kernel benchmarks (default: all)
#   FLOWS_K         pytest -k expression for the flow benchmarks (default: "not compiled": the
#                   compiled provider's compilation would not fit the budget; FLOWS_K= runs all)
#   SKIP_FLOWS=1    kernel benchmarks only
#   BENCH_MAX_TIME  --benchmark-max-time seconds per benchmark (default 0.05)
#   BENCH_ROUNDS    --benchmark-min-rounds (default 5)
#   SKIP_TESTS=1    benchmarks only
#   DRY_RUN=1       no GPU needed: skip the install, accept a CPU-only torch, and run every stage
#                   (the tests and benchmarks then skip or shrink themselves); checks the plumbing
# Exit status: 0 when every stage passed, 1 when a test stage failed (the benchmarks still run),
# 2 when the environment is unusable.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
PY=${PYTHON:-python}
START=$(date +%s)
status=0

TOTAL_BUDGET=${TOTAL_BUDGET:-340}
BENCH_RESERVE=${BENCH_RESERVE:-170}
# stage_timeout CAP RESERVE: min(CAP, time left - RESERVE), at least 10 s
stage_timeout() {
    local left=$(( TOTAL_BUDGET - ($(date +%s) - START) - $2 ))
    (( left > $1 )) && left=$1
    (( left < 10 )) && left=10
    echo "$left"
}
say() { printf '\n==> [%ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }
die() { printf '\nERROR: %s\n' "$*" >&2; exit 2; }

say "environment"
command -v "$PY" >/dev/null || die "no python ($PY) on PATH"
"$PY" - <<'EOF' || die "needs torch with a CUDA device, triton, pytest and pytest-benchmark"
import os, sys
import torch, triton, pytest, pytest_benchmark  # noqa: F401
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton.__version__}, pytest {pytest.__version__}")
if not torch.cuda.is_available():
    if os.environ.get("DRY_RUN") == "1":
        print("DRY_RUN=1: no CUDA device, carrying on")
        sys.exit(0)
    sys.exit("torch.cuda.is_available() is False")
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
      f"sm_{p.major}{p.minor}")
EOF

GPU=$("$PY" -c "import torch, re; print(re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name(0)).strip('-').lower() if torch.cuda.is_available() else 'cpu')")
NAME=${1:-coupling_${GPU}_$(date +%Y%m%d_%H%M%S)}
[[ "$NAME" =~ ^[A-Za-z0-9._-]+$ ]] || die "results name may use letters, digits, '.', '_' and '-' only: $NAME"
mkdir -p benchmarks/results
JSON="benchmarks/results/$NAME.json"
FLOWS_JSON="benchmarks/results/${NAME}_flows.json"
FLOWS_RESERVE=${FLOWS_RESERVE:-80}

if [[ "${DRY_RUN:-0}" == "1" ]]; then
    say "install skipped (DRY_RUN=1)"
else
    say "install (pip install --no-deps --no-build-isolation -e .)"
    "$PY" -m pip install --no-deps --no-build-isolation -q -e . || die "editable install failed"
fi

# The compiled kernels, not the interpreter.
export TRITON_INTERPRET=0
export ALTUB_FAST_IMPL=auto

if [[ "${SKIP_TESTS:-0}" != "1" ]]; then
    say "CUDA-marked tests (pytest tests -m cuda)"
    rc=0
    timeout "$(stage_timeout 100 $(( BENCH_RESERVE + 60 )))" "$PY" -m pytest tests -m cuda -q -p no:cacheprovider --no-header -rs || rc=$?
    # 5: nothing collected (no cuda-marked tests in some checkout) is not a failure
    if [[ $rc -eq 124 ]]; then echo "!! CUDA tests timed out"; status=1
    elif [[ $rc -ne 0 && $rc -ne 5 ]]; then echo "!! CUDA tests failed (exit $rc)"; status=1; fi

    say "kernel tests on the GPU (tests/test_coupling.py, tests/test_kernel_math.py, compiled kernels)"
    rc=0
    timeout "$(stage_timeout 150 "$BENCH_RESERVE")" "$PY" -m pytest tests/test_coupling.py tests/test_kernel_math.py -m "not cuda and not slow" \
        -q -p no:cacheprovider --no-header -rs || rc=$?
    # 5 = nothing ran: the modules skipped themselves (no GPU), expected only in a dry run
    if [[ $rc -ne 0 && ! ( $rc -eq 5 && "${DRY_RUN:-0}" == "1" ) ]]; then
        echo "!! kernel tests failed (exit $rc)"; status=1
    fi
fi

say "benchmarks -> $JSON"
bench_args=(benchmarks/test_coupling_perf.py --benchmark-only --benchmark-json "$JSON"
            --benchmark-min-rounds "${BENCH_ROUNDS:-5}" --benchmark-max-time "${BENCH_MAX_TIME:-0.05}"
            --benchmark-warmup on --benchmark-warmup-iterations 2
            --benchmark-columns median,iqr,rounds --benchmark-sort name
            -q -p no:cacheprovider --no-header -rs)
if [[ -n "${BENCH_K:-}" ]]; then bench_args+=(-k "$BENCH_K"); fi
rc=0
flows_reserve=$FLOWS_RESERVE
[[ "${SKIP_FLOWS:-0}" == "1" ]] && flows_reserve=10
timeout "$(stage_timeout 300 "$flows_reserve")" "$PY" -m pytest "${bench_args[@]}" || rc=$?
if [[ $rc -ne 0 ]]; then echo "!! benchmarks failed or timed out (exit $rc)"; status=1; fi

if [[ "${SKIP_FLOWS:-0}" != "1" ]]; then
    say "block, 8-block flow and FastFlow benchmarks, reduced size -> $FLOWS_JSON"
    flows_args=(benchmarks/test_block_perf.py benchmarks/test_fastflow_perf.py --benchmark-only
                --benchmark-json "$FLOWS_JSON" -q -p no:cacheprovider --no-header -rs)
    flows_k=${FLOWS_K-not compiled}
    if [[ -n "$flows_k" ]]; then flows_args+=(-k "$flows_k"); fi
    rc=0
    # ALTUB_FAST_BENCH=reduced: the reduced sizes even if the caller's environment asks for the full sweep
    ALTUB_FAST_BENCH=reduced timeout "$(stage_timeout 300 10)" "$PY" -m pytest "${flows_args[@]}" || rc=$?
    if [[ $rc -ne 0 ]]; then echo "!! flow benchmarks failed or timed out (exit $rc)"; status=1; fi
fi

for f in "$JSON" "$FLOWS_JSON"; do
    if [[ -f "$f" && -n "${OUT:-}" ]]; then
        mkdir -p "$OUT" && cp "$f" "$OUT/" && echo "copied $f to $OUT/"
    fi
done
[[ -f "$JSON" ]] || { echo "!! no kernel benchmark JSON was written"; status=1; }
say "done (exit $status); the tables follow"
if [[ -f "$FLOWS_JSON" ]]; then
    echo
    echo "Blocks, flows and FastFlow (reduced size; speed-ups from interleaved A/B medians where measured):"
    "$PY" benchmarks/report.py "$FLOWS_JSON" || echo "!! report.py failed on $FLOWS_JSON"
fi
if [[ -f "$JSON" ]]; then
    echo
    echo "Kernels (median times; GB/s counts the bytes a fused step must move; copy = clone bandwidth):"
    "$PY" - "$JSON" <<'EOF'
import json, sys
data = json.load(open(sys.argv[1]))
rows, eager, copy_bw = [], {}, None
for b in data["benchmarks"]:
    info = b.get("extra_info", {})
    ms = b["stats"]["median"] * 1e3
    row = dict(provider=info.get("provider", "?"), shape=str(info.get("shape", b["name"])),
               mode=info.get("mode", "?"), ms=ms, gbs=info.get("GB/s"), mem=info.get("peak_mem_MB"))
    rows.append(row)
    if row["provider"] == "eager":
        eager[(row["shape"], row["mode"])] = ms
    if row["provider"] == "copy":
        copy_bw = row["gbs"]
print(f"{'provider':9s} {'shape':26s} {'mode':7s} {'ms':>9s} {'GB/s':>8s} {'x eager':>8s} "
      f"{'of copy':>8s} {'peak MB':>9s}")
for r in sorted(rows, key=lambda r: (r["shape"], r["mode"], r["provider"])):
    ref = eager.get((r["shape"], r["mode"]))
    sp = f"{ref / r['ms']:.2f}" if ref and r["provider"] != "eager" else ""
    gbs = f"{r['gbs']:.0f}" if r["gbs"] else ""
    frac = f"{r['gbs'] / copy_bw:.0%}" if (r["gbs"] and copy_bw and r["provider"] != "copy") else ""
    mem = f"{r['mem']:.0f}" if r["mem"] else ""
    print(f"{r['provider']:9s} {r['shape']:26s} {r['mode']:7s} {r['ms']:9.3f} {gbs:>8s} {sp:>8s} {frac:>8s} {mem:>9s}")
EOF
fi
exit $status
