"""Where predict's time goes on the CPU, and how close its model runs to the machine's GEMM limit.

    pytest benchmarks/test_predict_roofline.py --benchmark-only -s                # reduced: 512x512 files
    pytest benchmarks/test_predict_roofline.py --benchmark-only -s --full-sweep   # 1024x1024 files
    ALTUB_FAST_ROOFLINE_BACKBONE=efficientnet_lite0 pytest benchmarks/test_predict_roofline.py --benchmark-only -s

The model is the one predict's benchmark uses (``benchmarks/test_predict_e2e.py``): FastFlow on
resnet18 (or ``$ALTUB_FAST_ROOFLINE_BACKBONE``), random weights, 256 px, in a checkpoint written by
the trainer (1 epoch on 8 random images, calibrated). torch runs on 2 threads, ONNX Runtime on 2
intra-op threads (1 inter-op), idle threads not spinning: the options predict's
``RuntimeScorer`` opens ``ExportedModel`` with. Four measurements, every number into
``benchmark.extra_info`` (``level="roofline"``) and a printed report:

1. **GEMM limit**: dense float32 ``torch.mm`` (MKL), ONNX Runtime ``MatMul`` (a one-node graph)
   and numpy's ``matmul`` (OpenBLAS, limited to the same threads by threadpoolctl) on square
   matrices, GFLOP/s = 2 n^3 / t, best of several calls after a warm-up, same threads. The limit
   the ratios use is the highest of the three. It is a measured GEMM rate, not the chip's
   arithmetic peak: ONNX Runtime's direct NCHWc convolutions can run above it (the backbone did).
2. **FLOPs per image** of the exported function (``inference.graph.prepare_for_export(model)``: the
   plain PyTorch path the ONNX graph is), batch 1, by ``torch.utils.flop_counter.FlopCounterMode``,
   attributed by module: backbone (``model.backbone``), flows (``model.flows`` / ``norms`` /
   ``bases``), scoring (``model.scorer``). FlopCounterMode counts convolutions and matrix
   products only (2 per multiply-add); elementwise work, reductions, the LayerNorms, upsampling and
   top-k count zero, so the GFLOP/s below are of the GEMM-like work.
3. **Time per part**: predict's own cached ONNX export (written by ``inference.graph.export_onnx``;
   exported into a temporary folder only if predict's cache entry cannot be found) run with ONNX
   Runtime's profiler at batch 1 and 8. Each profiled node (``cat == "Node"``) is attributed to a
   part by its name in the ONNX file, whose nodes carry the exporter's module scopes
   (``pkg.torch.onnx.name_scopes``): exact name (node or output tensor), then the name with ONNX
   Runtime's suffixes dropped (``_nchwc``, ``/...Fusion``) or a name prefix, then (layout
   ``Reorder*`` nodes the optimiser inserts) the neighbouring node's part; the rest is shown as
   unattributed. Node times are scaled to the plain ``session.run`` wall time without the profiler
   (median of several runs). The same parts are timed in eager PyTorch as a user gets it (the CPU
   fast path, ``_common.user_default_env``): ``model.extract_features`` (backbone),
   ``model.score_parts`` on those features (flows: norms, flows, bases, per-pixel log-likelihoods)
   and ``model.scorer`` (scoring: normalisation, upsampling, image score), each separately.
   Achieved GFLOP/s = the part's FLOPs / its time, and its ratio to the GEMM limit.
4. **End-to-end stages per image** of predict's path, each timed serially in one thread on PNG files:
   decode (``data.mvtec._open``: PIL open + load), resize and convert to float (the rest of
   ``load_image``, ``_image_to_array``), batching, the model (ONNX Runtime at batch 8, the plain
   wall time of 3.), predict's per-image bookkeeping (``ScoreResult.record``), writing
   (``predict_outputs.write_outputs``: CSV + JSON, per file) and the first-batch check against
   PyTorch (once per run, spread over the files). Their sum is the serial cost per image; it is
   set against the pipelined rate ``python -m altub_fast.predict`` itself reports
   (``predictions.json``: ``--runtime onnxruntime --batch-size 8 --workers 2``), which shows how
   much of the serial work the reader threads overlap on 2 cores.

A plain ``pytest`` runs a tiny case once (64 px model with 2 flow steps, 64 px files, small
matrices; about 12 s here); the reduced case took 3 min 8 s on the 2-core CPU. Only what must hold
is asserted (positive times and FLOPs, profiled node times within the profiled run); no timing
threshold. ``extra_info["phase_seconds"]`` says where the benchmark's own time went (mostly the
first predict run's export, and eager torch).

Run it on an otherwise idle machine: with 2 threads on 2 cores, torch's OpenMP threads lose far
more than their share when another process takes a core (eager torch measured 10-100x slower
while another test ran, ONNX Runtime, whose idle threads sleep, much less).
"""
from __future__ import annotations

import ast
import contextlib
import csv
import io
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _common import predict_checkpoint, user_default_env, write_png_folder

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is a dev dependency ([export] extra)")
onnx = pytest.importorskip("onnx", reason="onnx is a dev dependency ([export] extra)")

from altub_fast import predict  # noqa: E402

THREADS = 2
BACKBONE_ENV = "ALTUB_FAST_ROOFLINE_BACKBONE"
SCALES = {   # model px, flow steps (None: the backbone's default), file px, files, GEMM sizes, repetitions
    "tiny": dict(model=64, flow_steps=2, files_px=64, n=8, gemm=(128, 256), reps_b1=1, reps_b8=1,
                 gemm_reps=1, predict_rounds=0),
    "reduced": dict(model=256, flow_steps=None, files_px=512, n=32, gemm=(1024, 2048, 3072), reps_b1=5,
                    reps_b8=3, gemm_reps=3, predict_rounds=2),
    "full": dict(model=256, flow_steps=None, files_px=1024, n=64, gemm=(1024, 2048, 3072, 4096), reps_b1=10,
                 reps_b8=5, gemm_reps=5, predict_rounds=3),
}
PARTS = ("backbone", "flows", "scoring", "other")
GEMM_OPS = {"Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm", "ConvTranspose"}


# ----------------------------------------------------------------------------- setup
@pytest.fixture(scope="module")
def setup(tmp_path_factory, bench_scale):
    """(model, checkpoint, folder of PNGs, scale settings), as test_predict_e2e.py's setup builds them."""
    s = dict(SCALES[bench_scale])
    s["backbone"] = os.environ.get(BACKBONE_ENV, "").strip() or "resnet18"
    d = tmp_path_factory.mktemp("predict_roofline")
    model, ckpt = predict_checkpoint(d, s["backbone"], s["model"], s["flow_steps"])
    return model, ckpt, write_png_folder(d / "images", s["n"], s["files_px"]), s


# ----------------------------------------------------------------------------- timing helpers
def _times(fn, reps: int, warmup: int = 1) -> list:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _ort_options(profile_prefix=None):
    """The session options predict's RuntimeScorer gives ExportedModel (threads=2, spinning=False:
    ``exported.ort_session_options``), plus the profiler when asked."""
    from altub_fast.inference.exported import ort_session_options

    opts = ort_session_options(THREADS, spinning=False)
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile_prefix)
    return opts


# ----------------------------------------------------------------------------- 1. GEMM limit
def _gemm_torch(n: int, reps: int) -> float:
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    t = min(_times(lambda: torch.mm(a, b, out=c), reps))
    return 2 * n ** 3 / t / 1e9


def _gemm_ort(n: int, reps: int) -> float:
    from onnx import TensorProto, helper

    io_ = [helper.make_tensor_value_info(k, TensorProto.FLOAT, [n, n]) for k in ("A", "B", "Y")]
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["Y"])], "gemm", io_[:2], io_[2:])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 9
    sess = ort.InferenceSession(proto.SerializeToString(), _ort_options(), providers=["CPUExecutionProvider"])
    feeds = {"A": np.random.randn(n, n).astype(np.float32), "B": np.random.randn(n, n).astype(np.float32)}
    t = min(_times(lambda: sess.run(None, feeds), reps))
    return 2 * n ** 3 / t / 1e9


def _gemm_numpy(n: int, reps: int) -> float:
    """numpy's matmul (OpenBLAS: on this AMD EPYC its AVX-512 kernels beat MKL's torch.mm) on THREADS threads."""
    from threadpoolctl import threadpool_limits

    a, b = np.random.randn(n, n).astype(np.float32), np.random.randn(n, n).astype(np.float32)
    c = np.empty((n, n), np.float32)
    with threadpool_limits(THREADS):
        t = min(_times(lambda: np.matmul(a, b, out=c), reps))
    return 2 * n ** 3 / t / 1e9


def gemm_limit(sizes, reps: int) -> dict:
    rows = {int(n): {"torch_mm_GFLOPs": _gemm_torch(n, reps), "ort_matmul_GFLOPs": _gemm_ort(n, reps),
                     "numpy_matmul_GFLOPs": _gemm_numpy(n, reps)} for n in sizes}
    best = max(((v, n, k) for n, r in rows.items() for k, v in r.items()))
    return {"sizes": rows, "peak_GFLOPs": best[0], "peak_from": f"{best[2].split('_GFLOPs')[0]} n={best[1]}",
            "repetitions": reps, "how": "best of the repetitions after one warm-up call, 2 n^3 / t"}


# ----------------------------------------------------------------------------- 2. FLOPs per part
def _flop_part(name: str, root: str):
    rest = name[len(root) + 1:] if name.startswith(root + ".") else None
    if rest is None:
        return None
    if rest == "model.backbone" or rest.startswith("model.backbone."):
        return "backbone"
    if rest.startswith(("model.flows", "model.norms", "model.bases")):
        return "flows"
    if rest == "model.scorer" or rest.startswith("model.scorer."):
        return "scoring"
    return None


def model_flops(module, size_hw) -> dict:
    """GFLOP per image (batch 1) of ``module`` (prepare_for_export's) by part (see the module docstring)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, 3, *size_hw)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        module(x)
    counts = {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}
    root = type(module).__name__
    # a module's count holds its children's: add up only the outermost names of each part
    parts = {p: 0 for p in PARTS}
    by_op: dict = {}
    for name, n in counts.items():
        part = _flop_part(name, root)
        if part is None:
            continue
        parent = name.rsplit(".", 1)[0]
        outermost = True
        while parent.count(".") >= 1:
            if parent in counts and _flop_part(parent, root) == part:
                outermost = False
                break
            parent = parent.rsplit(".", 1)[0]
        if outermost:
            parts[part] += n
    total = fc.get_total_flops()
    parts["other"] = total - parts["backbone"] - parts["flows"] - parts["scoring"]
    for name, ops in fc.get_flop_counts().items():
        if name == "Global":
            by_op = {str(op): n / 1e9 for op, n in ops.items()}
    return {"GFLOP_per_image": {p: n / 1e9 for p, n in parts.items()}, "total_GFLOP": total / 1e9,
            "by_op_GFLOP": by_op, "counted": "convolutions and matrix products (FlopCounterMode), 2 per MAC"}


# ----------------------------------------------------------------------------- 3. ONNX Runtime parts
def _node_part(node):
    md = {p.key: p.value for p in node.metadata_props}
    try:
        scopes = [str(s) for s in ast.literal_eval(md.get("pkg.torch.onnx.name_scopes", "[]"))]
    except (ValueError, SyntaxError):
        scopes = []
    trace = md.get("pkg.torch.onnx.stack_trace", "")
    if any(s == "model.backbone" or s.startswith("model.backbone.") for s in scopes):
        return "backbone", "backbone"
    if any(s == "model.scorer" or s.startswith("model.scorer.") for s in scopes):
        return "scoring", "scorer"
    if "model" in scopes or any(s.startswith(("model.flows", "model.norms", "model.bases")) for s in scopes):
        # FastFlow.forward after the backbone: LayerNorms, the blocks (subnets are called as
        # modules; the coupling arithmetic runs inside the block's method, so it is scoped "model"),
        # the base and the per-scale log-likelihood sums
        if any(s.startswith("model.norms") for s in scopes):
            return "flows", "norms"
        if any(".subnet" in s for s in scopes):
            return "flows", "subnets"
        return "flows", "coupling+base"
    if "score_parts" in trace or "scoring.py" in trace:
        return "scoring", "score_parts"
    if scopes:
        return "other", "input normalisation" if "graph.py" in trace else "other"
    return None


def onnx_part_table(path) -> dict:
    """ONNX node name and output tensor name -> (part, sub-part)."""
    proto = onnx.load(str(path), load_external_data=False)
    table: dict = {}
    nodes = [(n, _node_part(n)) for n in proto.graph.node]
    for n, part in nodes:
        if part is not None and n.name:
            table.setdefault(n.name, part)
    for n, part in nodes:
        if part is not None:
            for o in n.output:
                if o:
                    table.setdefault(o, part)
    return table


def _resolve(name: str, table: dict):
    """(part, how) of a profiled node name, or (None, None)."""
    base = name[:-len("_kernel_time")] if name.endswith("_kernel_time") else name
    heads = [base, base.split("/")[0]]
    cands = []
    for h in heads:
        for c in (h, h[:-len("_nchwc")] if h.endswith("_nchwc") else None):
            if c:
                cands += [c, "node_" + c]
    for i, c in enumerate(cands):
        if c in table:
            return table[c], "name" if i == 0 else "name (runtime suffix dropped)"
    best = None   # longest known name that is a prefix, ending where a separator starts a non-number
    for i, ch in enumerate(base):
        if ch in "_/" and base[:i] in table and not base[i + 1:i + 2].isdigit():
            best = base[:i]
    if best is not None:
        return table[best], "prefix"
    return None, None


def profile_parts(path, size_hw, batch: int, runs: int, prefix, table: dict) -> dict:
    """ONNX Runtime's profile of ``runs`` calls at ``batch`` (after one warm-up), by part."""
    from altub_fast.inference.graph import check_images

    sess = ort.InferenceSession(str(path), _ort_options(prefix), providers=["CPUExecutionProvider"])
    x = check_images(size_hw, batch, seed=2)
    sess.run(None, {"images": x})
    for _ in range(runs):
        sess.run(None, {"images": x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    model_runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                        key=lambda e: e["ts"])[1:]   # the warm-up dropped
    nodes = sorted((e for e in events if e.get("cat") == "Node"), key=lambda e: e["ts"])
    part_us = {p: 0.0 for p in (*PARTS, "unattributed")}
    sub_us: dict = {}
    op_us: dict = {}
    how_us: dict = {}
    unattributed: dict = {}
    node_sum_us, run_us = 0.0, 0.0
    for r in model_runs:
        lo, hi = r["ts"], r["ts"] + r["dur"]
        run_us += r["dur"]
        inside = [e for e in nodes if lo <= e["ts"] <= hi]
        resolved = [_resolve(e["name"], table) for e in inside]
        for k, (e, (part, how)) in enumerate(zip(inside, resolved)):
            if part is None and e["name"].startswith("Reorder"):   # layout conversions: a neighbour's part
                step = -1 if e["name"].startswith("ReorderOutput") else 1
                j = k + step
                while 0 <= j < len(inside) and resolved[j][0] is None:
                    j += step
                if 0 <= j < len(inside):
                    part, how = resolved[j][0], "neighbour (layout reorder)"
            dur = float(e["dur"])
            node_sum_us += dur
            op = e.get("args", {}).get("op_name", "?")
            if part is not None and part[0] == "flows" and op in GEMM_OPS:
                part = ("flows", "subnets")   # a subnet convolution named after an op fused into it
            if part is None:
                part_us["unattributed"] += dur
                unattributed[e["name"]] = unattributed.get(e["name"], 0.0) + dur
                how = "unattributed"
                top, sub = "unattributed", "unattributed"
            else:
                top, sub = part
                part_us[top] += dur
            sub_us[f"{top}/{sub}"] = sub_us.get(f"{top}/{sub}", 0.0) + dur
            op_us.setdefault(top, {})
            op_us[top][op] = op_us[top].get(op, 0.0) + dur
            how_us[how] = how_us.get(how, 0.0) + dur
    n = max(1, len(model_runs))
    per_run = lambda d: {k: v / n / 1e3 for k, v in d.items()}   # noqa: E731 - ms per run
    return {"batch": batch, "runs": len(model_runs), "part_ms": per_run(part_us), "sub_ms": per_run(sub_us),
            "op_ms": {p: per_run(d) for p, d in op_us.items()}, "matched_ms": per_run(how_us),
            "node_sum_ms": node_sum_us / n / 1e3, "model_run_ms": run_us / n / 1e3,
            "unattributed_nodes_ms": dict(sorted(per_run(unattributed).items(), key=lambda kv: -kv[1])[:10])}


def plain_run_ms(path, size_hw, batch: int, reps: int) -> dict:
    from altub_fast.inference.graph import check_images

    sess = ort.InferenceSession(str(path), _ort_options(), providers=["CPUExecutionProvider"])
    x = check_images(size_hw, batch, seed=2)
    t = _times(lambda: sess.run(None, {"images": x}), reps)
    return {"median_ms": statistics.median(t) * 1e3, "min_ms": min(t) * 1e3, "reps": len(t)}


# ----------------------------------------------------------------------------- 3b. eager torch parts
def eager_parts(model, batch: int, reps: int) -> dict:
    """ms per batch of the backbone, flows (score_parts on features), scoring and the whole
    anomaly_map, in eager PyTorch as a user gets it (the CPU fast path)."""
    from altub_fast.imagenet import normalise

    h, w = model.image_size
    x = normalise(torch.rand(batch, 3, h, w))
    with user_default_env(), torch.no_grad():
        feats = model.extract_features(x)
        parts = model.score_parts(feats)
        model.scorer(parts, size=(h, w))   # with the two calls above: every path below warmed up
        out = {
            "backbone": _times(lambda: model.extract_features(x), reps, warmup=0),
            "flows": _times(lambda: model.score_parts(feats), reps, warmup=0),
            "scoring": _times(lambda: model.scorer(parts, size=(h, w)), reps, warmup=0),
            "total": _times(lambda: model.anomaly_map(x), reps, warmup=0),
        }
    return {k: statistics.median(v) * 1e3 for k, v in out.items()}


# ----------------------------------------------------------------------------- 4. end-to-end stages
def stage_times(model, files, size_hw, model_b8_ms: float, out_dir: Path) -> dict:
    """ms per image of each stage of predict's path, timed serially in this thread."""
    from PIL import Image

    from altub_fast.data import mvtec
    from altub_fast.inference.graph import prepare_for_export
    from altub_fast.predict_scoring import Prediction, ScoreResult

    h, w = size_hw
    decode, convert, resize, images = [], [], [], []
    for f in files:
        t0 = time.perf_counter()
        im = mvtec._open(str(f))                         # PIL open + load (+ copy), load_image's first half
        t1 = time.perf_counter()
        arr = mvtec._image_to_array(im, str(f), (h, w))  # the rest of load_image: resize, to float, CHW
        t2 = time.perf_counter()
        if im.mode in ("L", "RGB") and im.size != (w, h):
            im.resize((w, h), resample=Image.BILINEAR)     # the PIL resize alone (part of the line above)
        t3 = time.perf_counter()
        decode.append(t1 - t0)
        convert.append(t2 - t1)
        resize.append(t3 - t2)
        images.append(torch.from_numpy(arr))
    # batching as the reader and RuntimeScorer do it: stack, to numpy, and the finiteness check of the maps
    b = min(8, len(images))
    fake_maps = np.zeros((b, h, w), np.float32)
    t_batch = _times(lambda: (torch.stack(images[:b]).float().numpy(), np.isfinite(fake_maps).all()), 3)
    # predict's per-image bookkeeping and its writer
    maps = torch.rand(len(files), h, w)
    scores = torch.rand(len(files))
    result = ScoreResult([Prediction(str(f)) for f in files])
    t0 = time.perf_counter()
    for i in range(len(files)):
        result.record(i, maps[i], scores[i], 0.5, 0)
    t_record = time.perf_counter() - t0
    thr = predict.Threshold(0.5, "--threshold", "threshold 0.5 from --threshold")
    writer = "altub_fast.predict_outputs.write_outputs"
    try:
        t_write = min(_times(lambda: predict.write_outputs(result, thr, out_dir, "model.pt", {"note": "roofline"}), 3))
    except TypeError:   # its signature changed: a CSV row + the JSON document, as it writes them
        writer = "equivalent CSV + JSON writer (write_outputs' signature changed)"

        def write():
            with open(out_dir / "predictions.csv", "w", newline="") as fh:
                wr = csv.writer(fh)
                wr.writerow(["path", "score", "decision", "threshold", "error"])
                for p in result.predictions:
                    wr.writerow([p.path, repr(p.score), p.decision, "0.5", ""])
            (out_dir / "predictions.json").write_text(json.dumps(
                {"predictions": [dict(path=p.path, score=p.score, decision=p.decision) for p in result.predictions]},
                indent=2))
        out_dir.mkdir(parents=True, exist_ok=True)
        t_write = min(_times(write, 3))
    # the first-batch check: PyTorch's plain path on the first batch's first CHECK_IMAGES images
    # (RuntimeScorer._reference), once per run
    from altub_fast.inference.runtime_scorer import CHECK_IMAGES
    x = torch.stack(images[:min(b, CHECK_IMAGES)]).float()
    t0 = time.perf_counter()
    with torch.no_grad():
        prepare_for_export(model, (h, w))(x)
    t_check = time.perf_counter() - t0
    n = len(files)
    ms = {
        "decode (PIL open + load)": statistics.mean(decode) * 1e3,
        "resize + to float": statistics.mean(convert) * 1e3,
        "batch (stack, to numpy, finite check)": min(t_batch) / b * 1e3,
        "model (ONNX Runtime, batch 8)": model_b8_ms / 8,
        "record (ScoreResult.record)": t_record / n * 1e3,
        "write (CSV + JSON)": t_write / n * 1e3,
        f"first-batch check (once per run, / {n} files)": t_check / n * 1e3,
    }
    return {"ms_per_image": ms, "of_which_pil_resize_ms": statistics.mean(resize) * 1e3, "files": n,
            "writer": writer, "check_ms_per_run": t_check * 1e3}


def run_predict(ckpt, folder, out) -> dict:
    """``python -m altub_fast.predict --runtime onnxruntime --batch-size 8 --workers 2`` as
    test_predict_e2e.run_predict runs it; its predictions.json."""
    with user_default_env(), contextlib.redirect_stdout(io.StringIO()):
        code = predict.main(["--checkpoint", str(ckpt), str(folder), "--out", str(out), "--runtime", "onnxruntime",
                             "--batch-size", "8", "--max-overlays", "0", "--quiet", "--workers", "2"])
    assert code == predict.EXIT_OK
    return json.loads((out / "predictions.json").read_text())


def _cached_onnx(doc: dict):
    rt = doc.get("runtime") or {}
    if rt.get("runtime") != "onnxruntime":
        return None
    for entry in (rt.get("exports") or {}).values():
        p = Path(entry.get("path", ""))
        if p.suffix == ".onnx" and p.is_file():
            return p
    return None


# ----------------------------------------------------------------------------- the report
def _fmt_table(header, rows) -> list:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  " + "  ".join(str(c).rjust(wd) if i else str(c).ljust(wd)  # noqa: E731
                                      for i, (c, wd) in enumerate(zip(r, widths)))
    return [line(header)] + [line(r) for r in rows]


def _rate_rows(gflop: dict, ms_b1: dict, ms_b8: dict, peak: float, names) -> list:
    rows = []
    for p in names:
        g = gflop.get(p)
        cells = [p, "-" if g is None else f"{g:.3f}", f"{ms_b1[p]:.2f}", f"{ms_b8[p]:.2f}"]
        for ms in (ms_b1[p], ms_b8[p]):
            rate = g / (ms / 1e3) if g and ms > 0 else None
            cells.append("-" if rate is None else f"{rate:.1f}")
        for ms in (ms_b1[p], ms_b8[p]):
            rate = g / (ms / 1e3) if g and ms > 0 else None
            cells.append("-" if rate is None else f"{100 * rate / peak:.1f}%")
        rows.append(cells)
    return rows


RATE_HEADER = ["part", "GFLOP/img", "ms/img b1", "ms/img b8", "GFLOP/s b1", "GFLOP/s b8", "of peak b1",
               "of peak b8"]


def _total_row(label: str, gflop: float, ms: dict, peak: float) -> list:
    """A table row for the whole model: ``ms`` maps batch (1, 8) to that batch's part times."""
    rates = [gflop / ms[b]["total"] * 1e3 for b in (1, 8)]
    return [label, f"{gflop:.3f}", *(f"{ms[b]['total']:.2f}" for b in (1, 8)), *(f"{r:.1f}" for r in rates),
            *(f"{100 * r / peak:.1f}%" for r in rates)]


def _with_sum(d: dict, a="backbone", b="flows") -> dict:
    return {**d, f"{a}+{b}": d[a] + d[b]}


# ----------------------------------------------------------------------------- the test
def test_predict_roofline(benchmark, setup, tmp_path, bench_scale):
    from altub_fast.inference.graph import EXAMPLE_BATCH, check_images, export_onnx, prepare_for_export

    model, ckpt, folder, s = setup
    files = sorted(p for p in folder.iterdir())
    size = tuple(int(v) for v in model.image_size)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    phases, clock = {}, [time.perf_counter()]

    def phase(name):
        now = time.perf_counter()
        phases[name] = now - clock[0]
        clock[0] = now

    try:
        # predict first: its export is built (and cached) before anything is timed, and is the graph profiled
        docs = [run_predict(ckpt, folder, tmp_path / "predict_warm")]
        path, exported_here = _cached_onnx(docs[0]), False
        if path is None:
            path, exported_here = tmp_path / "model.onnx", True
            export_onnx(prepare_for_export(model, size), path,
                        torch.from_numpy(check_images(size, EXAMPLE_BATCH, seed=1)))
        for r in range(s["predict_rounds"]):   # the tiny case takes the rate of the warm-up run
            docs.append(run_predict(ckpt, folder, tmp_path / f"predict_{r}"))
        timed_docs = docs[1:] or docs
        phase("predict runs (first: export or cache)")
        rates = [d["throughput"]["images_per_s_end_to_end"] for d in timed_docs]

        gemm = gemm_limit(s["gemm"], s["gemm_reps"])
        peak = gemm["peak_GFLOPs"]
        flops = model_flops(prepare_for_export(model, size), size)
        gflop = _with_sum(flops["GFLOP_per_image"])
        phase("GEMM limit and FLOPs")

        table = onnx_part_table(path)
        prof = {b: profile_parts(path, size, b, s["reps_b1"] if b == 1 else s["reps_b8"], tmp_path / f"ort_b{b}", table)
                for b in (1, 8)}
        plain = {b: plain_run_ms(path, size, b, s["reps_b1"] if b == 1 else s["reps_b8"]) for b in (1, 8)}
        ort_ms = {}
        for b in (1, 8):   # profiled node times scaled to the plain wall time, per image
            scale = plain[b]["median_ms"] / prof[b]["node_sum_ms"]
            prof[b]["scale_to_plain"] = scale
            ort_ms[b] = _with_sum({p: v * scale / b for p, v in prof[b]["part_ms"].items()})
            ort_ms[b]["total"] = plain[b]["median_ms"] / b
        phase("ONNX Runtime profile and plain runs")

        eager = {b: eager_parts(model, b, s["reps_b1"] if b == 1 else s["reps_b8"]) for b in (1, 8)}
        eager_ms = {b: _with_sum({k: v / b for k, v in eager[b].items()}) for b in (1, 8)}
        phase("eager torch parts")

        stages = stage_times(model, files, size, plain[8]["median_ms"], tmp_path / "writer")
        serial_ms = sum(stages["ms_per_image"].values())
        pipelined_rate = statistics.median(rates)
        pipelined_ms = 1e3 / pipelined_rate
        phase("end-to-end stages")

        # pytest-benchmark's own timing: the model at batch 8 in ONNX Runtime (plain session.run)
        sess = ort.InferenceSession(str(path), _ort_options(), providers=["CPUExecutionProvider"])
        xb8 = check_images(size, 8, seed=3)
        if benchmark.disabled:
            benchmark(lambda: sess.run(None, {"images": xb8}))
        else:
            benchmark.pedantic(lambda: sess.run(None, {"images": xb8}), rounds=s["reps_b8"], iterations=1,
                               warmup_rounds=1)
        phase("pytest-benchmark rounds")
    finally:
        torch.set_num_threads(saved_threads)

    # ------------------------------------------------------------------ what must hold
    assert peak > 0 and all(v > 0 for r in gemm["sizes"].values() for v in r.values())
    assert flops["GFLOP_per_image"]["backbone"] > 0 and flops["GFLOP_per_image"]["flows"] > 0
    for b in (1, 8):
        p = prof[b]
        assert p["runs"] >= 1 and p["node_sum_ms"] > 0 and plain[b]["median_ms"] > 0
        # one run's nodes execute one after another (sequential executor): their sum fits in the run
        assert p["node_sum_ms"] <= p["model_run_ms"] * 1.02 + 0.5, p
        assert abs(sum(p["part_ms"].values()) - p["node_sum_ms"]) <= 1e-6 * p["node_sum_ms"] + 1e-6
        assert p["part_ms"]["backbone"] > 0 and p["part_ms"]["flows"] > 0
        assert all(v > 0 for v in eager[b].values())
    assert all(v >= 0 for v in stages["ms_per_image"].values()) and serial_ms > 0 and pipelined_rate > 0

    # ------------------------------------------------------------------ extra_info and the report
    attributed = {b: {k: v / prof[b]["node_sum_ms"] for k, v in prof[b]["matched_ms"].items()} for b in (1, 8)}
    stage_pct = {k: 100 * v / serial_ms for k, v in stages["ms_per_image"].items()}
    info = dict(
        level="roofline", threads=THREADS, cpu_count=os.cpu_count(), torch=torch.__version__,
        onnxruntime=ort.__version__, model=dict(name="fastflow", backbone=s["backbone"], image_px=size[0],
                                                flow_steps=int(model.flow_steps), weights="random, calibrated"),
        gemm=gemm, peak_GFLOPs=peak, flops=flops, phase_seconds=phases,
        onnx=dict(path_source="export_onnx now" if exported_here else "predict's cached export",
                  profile={str(b): prof[b] for b in (1, 8)}, plain={str(b): plain[b] for b in (1, 8)},
                  ms_per_image={str(b): ort_ms[b] for b in (1, 8)},
                  share_of_node_time_by_match={str(b): attributed[b] for b in (1, 8)}),
        eager=dict(ms_per_batch={str(b): eager[b] for b in (1, 8)}, ms_per_image={str(b): eager_ms[b] for b in (1, 8)}),
        ratio_to_peak={rt: {str(b): {p: (gflop[p] / (ms[b][p] / 1e3)) / peak for p in ("backbone", "flows",
                                                                                      "backbone+flows")
                                     if ms[b][p] > 0}
                            for b in (1, 8)} for rt, ms in (("onnxruntime", ort_ms), ("eager", eager_ms))},
        e2e=dict(file_px=s["files_px"], **stages, serial_ms_per_image=serial_ms, stage_percent=stage_pct,
                 pipelined_images_per_s=pipelined_rate, pipelined_ms_per_image=pipelined_ms,
                 pipelined_rounds=rates, serial_over_pipelined=serial_ms / pipelined_ms,
                 predict_seconds_scoring=[d["throughput"].get("seconds_scoring") for d in timed_docs],
                 predict_runtime=timed_docs[-1]["runtime"].get("runtime")),
    )
    benchmark.extra_info.update(info)

    L = [f"roofline: FastFlow {s['backbone']} ({int(model.flow_steps)} flow steps), {size[0]} px, {THREADS} threads, "
         f"torch {torch.__version__}, onnxruntime {ort.__version__} ({bench_scale})"]
    L.append("dense fp32 GEMM (square n, best of %d after warm-up):" % gemm["repetitions"])
    L += _fmt_table(["n", "torch.mm GFLOP/s", "ORT MatMul GFLOP/s", "numpy matmul GFLOP/s"],
                    [[n, f"{r['torch_mm_GFLOPs']:.1f}", f"{r['ort_matmul_GFLOPs']:.1f}",
                      f"{r['numpy_matmul_GFLOPs']:.1f}"] for n, r in gemm["sizes"].items()])
    L.append(f"  limit: {peak:.1f} GFLOP/s ({gemm['peak_from']})")
    L.append(f"FLOPs per image (FlopCounterMode on prepare_for_export(model), batch 1; convolutions and matmuls "
             f"only): total {flops['total_GFLOP']:.3f} GFLOP = " + ", ".join(
                 f"{p} {flops['GFLOP_per_image'][p]:.3f}" for p in PARTS))
    names = ["backbone", "flows", "backbone+flows", "scoring", "other"]
    L.append(f"ONNX Runtime ({'export made here' if exported_here else 'predict cached export'}; profiled node "
             f"times scaled to plain session.run median: b1 x{prof[1]['scale_to_plain']:.3f}, "
             f"b8 x{prof[8]['scale_to_plain']:.3f}):")
    rows = _rate_rows(gflop, ort_ms[1], ort_ms[8], peak, names)
    rows.append(["unattributed", "-", f"{ort_ms[1]['unattributed']:.2f}", f"{ort_ms[8]['unattributed']:.2f}",
                 "-", "-", "-", "-"])
    rows.append(_total_row("total (plain run)", flops["total_GFLOP"], ort_ms, peak))
    L += _fmt_table(RATE_HEADER, rows)
    for b in (1, 8):
        p = prof[b]
        L.append(f"  b{b} per run: nodes {p['node_sum_ms']:.1f} ms, profiled model_run {p['model_run_ms']:.1f} ms, "
                 f"plain {plain[b]['median_ms']:.1f} ms; node time matched by " + ", ".join(
                     f"{k} {100 * v:.1f}%" for k, v in sorted(attributed[b].items(), key=lambda kv: -kv[1])))
    p8 = prof[8]
    for part in ("backbone", "flows", "scoring", "other", "unattributed"):
        ops = p8["op_ms"].get(part)
        if not ops:
            continue
        tot = sum(ops.values())
        gemm_share = sum(v for k, v in ops.items() if k in GEMM_OPS) / tot if tot else 0.0
        top = ", ".join(f"{k} {100 * v / tot:.0f}%" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:4])
        subs = ", ".join(f"{k.split('/', 1)[1]} {100 * v / tot:.0f}%" for k, v in p8["sub_ms"].items()
                         if k.startswith(part + "/"))
        L.append(f"  b8 {part}: conv/matmul {100 * gemm_share:.0f}% of its time; ops {top}; {subs}")
    L.append("eager torch (CPU fast path, model.extract_features / score_parts / scorer timed separately):")
    erows = _rate_rows(gflop, eager_ms[1], eager_ms[8], peak, ["backbone", "flows", "backbone+flows", "scoring"])
    erows.append(_total_row("anomaly_map (whole)", flops["total_GFLOP"], eager_ms, peak))
    L += _fmt_table(RATE_HEADER, erows)
    L.append(f"end to end per image ({stages['files']} PNG files of {s['files_px']} px; each stage alone, one after "
             f"another in one thread, the model on its {THREADS} intra-op threads; writer: {stages['writer']}):")
    srows = [[k, f"{v:.2f}", f"{stage_pct[k]:.1f}%"] for k, v in stages["ms_per_image"].items()]
    srows.insert(2, ["  of which PIL resize", f"{stages['of_which_pil_resize_ms']:.2f}",
                     f"{100 * stages['of_which_pil_resize_ms'] / serial_ms:.1f}%"])
    srows.append(["serial total", f"{serial_ms:.2f}", "100.0%"])
    L += _fmt_table(["stage", "ms/img", "of serial"], srows)
    L.append(f"  predict (--runtime onnxruntime, batch 8, --workers 2; runtime {info['e2e']['predict_runtime']}): "
             f"{pipelined_rate:.2f} images/s = {pipelined_ms:.2f} ms/img (median of {len(rates)}: "
             + ", ".join(f"{r:.2f}" for r in rates) + f"), serial / pipelined = {serial_ms / pipelined_ms:.2f}x")
    L.append("(seconds spent: " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()) + ")")
    report = "\n".join(L)
    benchmark.extra_info["report"] = report
    print("\n" + report)
