"""Export a trained checkpoint to ONNX, OpenVINO or TorchScript, and check the exported file.

    python -m altub_fast.export --checkpoint last.pt --format onnx            # -> last.onnx
    python -m altub_fast.export --checkpoint last.pt --format openvino        # -> last.xml + last.bin
    python -m altub_fast.export --checkpoint last.pt --format torchscript     # -> last.torchscript.pt
    python -m altub_fast.export --checkpoint last.pt --format onnx openvino --out deploy/model
    altub-fast export ...                                                     # the same

The exported graph is the whole model on the plain PyTorch path (``impl="torch"``: no Triton, no
custom op): one input ``images``, float32 (batch, 3, H, W), RGB in [0, 1] at the model's input size
(read and resized as :func:`altub_fast.data.load_image` does); the ImageNet normalisation, the
backbone, the flows and the score normalisation constants (the model's calibration buffers) are all
inside. Two outputs: ``maps`` (batch, H, W) float32 and ``scores`` (batch,). The batch size is free.
Several formats in one call export the graph once (OpenVINO is converted from the ONNX file).

After writing, the command loads the file in its runtime (onnxruntime, OpenVINO's runtime at f32
precision, torch.jit) and compares maps and scores with PyTorch's on check batches of other sizes
than the one exported with; a maximum error above ``--rtol`` (1e-4) times the largest PyTorch value
deletes the written files and exits with status 1. A ``<file>.json`` beside the export records the
input contract, the checkpoint's threshold and the check's numbers.

Exit status: 0 written and checked; 1 export or check failed; 2 bad arguments or checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from .imagenet import IMAGENET_MEAN, IMAGENET_STD
from .inference.exported import FORMATS, INPUT_NAME, OUTPUT_NAMES, ExportedModel, format_of

SUFFIXES = {"onnx": ".onnx", "openvino": ".xml", "torchscript": ".torchscript.pt"}
_OUT_ENDINGS = {"onnx": ".onnx", "openvino": ".xml", "torchscript": ".pt"}   # --out taken as the file itself
DEFAULT_RTOL = 1e-4
DEFAULT_OPSET = 18
EXAMPLE_BATCH = 2          # the batch size traced; the check runs other sizes
MAX_BATCH = 1 << 16        # the batch axis' declared upper bound (the graph itself has none)
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_ONNX_STANDARD_DOMAINS = ("", "ai.onnx")

__all__ = ["ExportError", "ExportCheckError", "AnomalyMapModule", "prepare_for_export", "export_model",
           "ExportedModel", "format_of", "check_images", "verify_export", "main"]   # ExportedModel, format_of:
# defined in altub_fast/inference/exported.py (loading an exported file is inference), re-exported here


class ExportError(RuntimeError):
    """Exporting failed or produced something unusable (a custom op in the graph, ...)."""


class ExportCheckError(ExportError):
    """The exported file does not reproduce PyTorch's maps and scores."""


# ----------------------------------------------------------------------------- the exported module
class AnomalyMapModule(nn.Module):
    """images (B, 3, H, W) RGB in [0, 1] -> (maps (B, H, W) float32, scores (B,) float32): ImageNet
    normalisation, then ``model.anomaly_map``. Build it with :func:`prepare_for_export`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.image_size = tuple(int(v) for v in model.image_size)
        # the constants as buffers, so the exported graph holds them as named initializers
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        maps, scores = self.model.anomaly_map((images - self.mean) / self.std)
        return maps.float(), scores.float()


def prepare_for_export(model: nn.Module) -> AnomalyMapModule:
    """A copy of ``model`` on the CPU, in eval mode, without gradients, on the plain PyTorch path
    (every block's ``impl="torch"``), without the data-dependent finiteness check, and (CFLOW-AD)
    scoring all fibers in one flow call, so no loop bound depends on the batch size."""
    m = copy.deepcopy(model).cpu().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    for sub in m.modules():   # to become altub_fast.backend.use_plain_path(m) once backend.py lands
        if hasattr(sub, "impl"):
            sub.impl = "torch"
    if hasattr(m, "check_finite"):
        m.check_finite = False
    if hasattr(m, "inference_chunk"):
        m.inference_chunk = 1 << 62
    module = AnomalyMapModule(m).eval()
    with torch.no_grad():   # fills lazily built constants (CFLOW-AD's positional encodings) before tracing
        module(torch.from_numpy(check_images(module.image_size, 1)))
    return module


def check_images(size_hw: Sequence[int], n: int = 3, seed: int = 0) -> np.ndarray:
    """``n`` deterministic image-like test inputs (n, 3, H, W) float32 in [0, 1]: smooth random
    colour fields (8x8 noise upsampled) with a little pixel noise."""
    g = torch.Generator().manual_seed(seed)
    h, w = int(size_hw[0]), int(size_hw[1])
    coarse = torch.rand(n, 3, 8, 8, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return (0.9 * smooth + 0.1 * torch.rand(n, 3, h, w, generator=g)).clamp(0, 1).numpy().astype(np.float32)


# ----------------------------------------------------------------------------- writers
@contextlib.contextmanager
def _quiet():
    """Silence the exporters' progress prints and tracer warnings (errors still raise)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _param_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def export_onnx(module: AnomalyMapModule, path: Path, example: torch.Tensor, opset: int = DEFAULT_OPSET) -> List[Path]:
    """torch.export-based ONNX export with a dynamic batch axis; weights inside the file unless
    they pass 1.8 GB (then ``<file>.data`` beside it). Returns the written files."""
    external = _param_bytes(module) > 1_800_000_000
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad(), _quiet():
        torch.onnx.export(module, (example,), str(path), dynamo=True, input_names=[INPUT_NAME],
                          output_names=list(OUTPUT_NAMES), dynamic_shapes={"images": {0: batch}},
                          opset_version=opset, external_data=external, report=False, verbose=False)
    _check_onnx_ops(path)
    files = [path]
    data = Path(str(path) + ".data")
    if data.exists():
        files.append(data)
    return files


def _check_onnx_ops(path: Path) -> None:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    custom = sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in _ONNX_STANDARD_DOMAINS})
    custom += sorted({f"function {f.domain}::{f.name}" for f in proto.functions})
    if custom:
        raise ExportError(f"the ONNX graph {path} holds non-standard operators {custom}: the export must be "
                          "plain PyTorch (impl='torch')")
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    if not isinstance(dims[0], str):
        raise ExportError(f"the ONNX input's batch axis came out fixed ({dims}); expected a free batch size")


def export_torchscript(module: AnomalyMapModule, path: Path, example: torch.Tensor) -> List[Path]:
    """torch.jit.trace (the batch size is traced symbolically; the check proves other sizes work)."""
    with torch.no_grad(), _quiet():
        traced = torch.jit.trace(module, (example,), check_trace=False)
    kinds = {n.kind() for n in traced.inlined_graph.nodes()}
    custom = sorted(k for k in kinds if k.startswith("altub_fast::") or k == "prim::PythonOp")
    if custom:
        raise ExportError(f"the TorchScript graph holds custom operators {custom}: the export must be plain PyTorch")
    with _quiet():
        torch.jit.save(traced, str(path))
    return [path]


def export_openvino(module: AnomalyMapModule, path: Path, example: torch.Tensor, opset: int = DEFAULT_OPSET,
                    onnx_path: Optional[Path] = None) -> List[Path]:
    """OpenVINO's converter run on an ONNX export (``onnx_path``, or a temporary one made as
    :func:`export_onnx` does); weights kept in float32 (``compress_to_fp16=False``). Writes
    ``<name>.xml`` and ``<name>.bin``."""
    import openvino as ov

    if path.suffix != ".xml":
        raise ValueError(f"an OpenVINO model is written as NAME.xml (+ NAME.bin), got {path}")
    with tempfile.TemporaryDirectory(prefix="altub_fast_export_") as tmp:
        if onnx_path is None:
            onnx_path = Path(tmp) / "model.onnx"
            export_onnx(module, onnx_path, example, opset)
        with _quiet():
            ov_model = ov.convert_model(str(onnx_path))
        ov.save_model(ov_model, str(path), compress_to_fp16=False)
    return [path, path.with_suffix(".bin")]


# ----------------------------------------------------------------------------- running an export
def _rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max |ref| (inf for a shape mismatch or a non-finite value)."""
    if got.shape != ref.shape or not np.isfinite(got).all():
        return float("inf")
    scale = max(float(np.abs(ref).max()), 1e-12)
    return float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max() / scale)


def verify_export(runner: ExportedModel, module: AnomalyMapModule, batches: Sequence[np.ndarray],
                  rtol: float = DEFAULT_RTOL) -> Dict[str, object]:
    """Run ``runner`` and the PyTorch ``module`` on every batch; raise :class:`ExportCheckError`
    if any maps or scores differ by more than ``rtol`` times PyTorch's largest value. Returns the
    errors."""
    record = {"batch_sizes": [], "max_rel_err_maps": 0.0, "max_rel_err_scores": 0.0, "rtol": rtol}
    problems = []
    for b in batches:
        with torch.no_grad():
            ref_maps, ref_scores = (t.numpy() for t in module(torch.from_numpy(b)))
        maps, scores = runner(b)
        em, es = _rel_err(maps, ref_maps), _rel_err(scores, ref_scores)
        record["batch_sizes"].append(int(b.shape[0]))
        record["max_rel_err_maps"] = max(record["max_rel_err_maps"], em)
        record["max_rel_err_scores"] = max(record["max_rel_err_scores"], es)
        if not (em <= rtol and es <= rtol):
            problems.append(f"batch of {b.shape[0]}: maps {tuple(maps.shape)} vs {tuple(ref_maps.shape)}, "
                            f"relative error {em:.3g}; scores relative error {es:.3g}")
    if problems:
        raise ExportCheckError(f"{runner.format} export {runner.path} does not reproduce PyTorch within "
                               f"{rtol:g} relative: " + "; ".join(problems))
    return record


# ----------------------------------------------------------------------------- the whole job
def output_paths(formats: Sequence[str], checkpoint: str, out: Optional[str] = None) -> Dict[str, Path]:
    """Where each format goes: ``--out`` itself for one format when it ends in that format's
    suffix, else ``--out`` (default: the checkpoint's path without suffix) + the suffix."""
    if out and len(formats) == 1 and str(out).lower().endswith(_OUT_ENDINGS[formats[0]]):
        return {formats[0]: Path(out)}
    stem = Path(out) if out else Path(checkpoint).with_suffix("")
    return {f: Path(str(stem) + SUFFIXES[f]) for f in formats}


def export_model(model: nn.Module, fmt: str, path, *, images: Optional[np.ndarray] = None,
                 rtol: float = DEFAULT_RTOL, opset: int = DEFAULT_OPSET, metadata: Optional[dict] = None,
                 module: Optional[AnomalyMapModule] = None, onnx_path: Optional[Path] = None) -> dict:
    """Export ``model`` to ``path`` in ``fmt``, check the file against PyTorch and write
    ``<path>.json``. ``images``: extra check images (N, 3, H, W) in [0, 1] (default: three
    synthetic ones). ``module``: a :func:`prepare_for_export` of ``model`` to reuse;
    ``onnx_path``: for "openvino", an ONNX export of the same model to convert. Returns the JSON
    record; on a failed check the files are deleted and :class:`ExportCheckError` raised."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module if module is not None else prepare_for_export(model)
    h, w = module.image_size
    example = torch.from_numpy(check_images((h, w), EXAMPLE_BATCH, seed=1))
    check = check_images((h, w), 3) if images is None else np.asarray(images, dtype=np.float32)
    if check.ndim != 4 or check.shape[1:] != (3, h, w):
        raise ValueError(f"check images must be (N, 3, {h}, {w}), got {check.shape}")
    # one image alone, then groups of up to four: other batch sizes than the one exported with
    batches = [check[:1]] + [check[i:i + 4] for i in range(0, len(check), 4)]
    writer = {"onnx": lambda: export_onnx(module, path, example, opset),
              "openvino": lambda: export_openvino(module, path, example, opset, onnx_path),
              "torchscript": lambda: export_torchscript(module, path, example)}[fmt]
    files = writer()
    try:
        result = verify_export(ExportedModel(path, fmt), module, batches, rtol)
    except Exception:
        for f in files:
            with contextlib.suppress(OSError):
                f.unlink()
        raise
    record = {
        "format": fmt,
        "files": [str(f) for f in files],
        "bytes": sum(f.stat().st_size for f in files),
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, h, w], "dtype": "float32",
                  "values": f"RGB in [0, 1], resized to {h}x{w} as altub_fast.data.load_image does (bilinear, "
                            f"antialiased; greyscale repeated to 3 channels); the ImageNet normalisation is inside",
                  "imagenet_mean": list(IMAGENET_MEAN), "imagenet_std": list(IMAGENET_STD)},
        "outputs": [{"name": "maps", "shape": ["batch", h, w], "dtype": "float32",
                     "meaning": "anomaly map, higher is more anomalous"},
                    {"name": "scores", "shape": ["batch"], "dtype": "float32", "meaning": "image score"}],
        "score_mode": getattr(model, "score_mode", None),
        "calibrated": bool(getattr(model, "calibrated", False)),
        "decision_rule": "defect if score > threshold",
        "check": result,
        "opset": opset if fmt in ("onnx", "openvino") else None,
        "torch": torch.__version__,
        **(metadata or {}),
    }
    meta = Path(str(path) + ".json")
    meta.write_text(json.dumps(record, indent=2, default=str))
    record["files"].append(str(meta))
    return record


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m altub_fast.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by altub_fast's trainer (last.pt)")
    p.add_argument("--format", required=True, nargs="+", choices=FORMATS, help="one or more formats")
    p.add_argument("--out", default=None, help="output file for one format (NAME.onnx, NAME.xml, NAME.pt), or a "
                   "path without suffix, completed per format with .onnx, .xml (+ .bin), .torchscript.pt "
                   "(default: the checkpoint's path without its suffix)")
    p.add_argument("--check-images", nargs="+", default=None, metavar="PATH",
                   help="image files to check the export on as well (default: synthetic images only)")
    p.add_argument("--rtol", type=float, default=DEFAULT_RTOL,
                   help=f"largest allowed error relative to PyTorch's largest value (default {DEFAULT_RTOL:g})")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    return p


#: The packages each format needs (OpenVINO converts the ONNX export); all in the ``[export]`` extra.
NEEDS = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "openvino": ("onnx", "onnxscript", "openvino"),
         "torchscript": ()}


def missing_packages(formats: List[str]) -> Optional[str]:
    """None when every package the formats need is installed, else one line naming what is missing
    and the extra that brings it."""
    import importlib.util
    missing = sorted({p for f in formats for p in NEEDS[f] if importlib.util.find_spec(p) is None})
    if not missing:
        return None
    return (f"--format {' '.join(formats)} needs {', '.join(missing)}, not installed: "
            f'pip install "altub_fast[export]"')


def _fail(msg: str, status: int = EXIT_USAGE) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return status


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.rtol > 0:
        return _fail(f"--rtol must be positive, got {args.rtol}")
    missing = missing_packages([f for f in FORMATS if f in args.format])
    if missing:
        return _fail(missing)
    from .inference import CheckpointError, open_checkpoint, read_images

    try:
        model, ck = open_checkpoint(args.checkpoint, device="cpu")
    except CheckpointError as e:
        return _fail(str(e))
    formats = [f for f in FORMATS if f in args.format]   # ONNX before OpenVINO, which reuses it
    outs = output_paths(formats, args.checkpoint, args.out)
    if "openvino" in outs and outs["openvino"].suffix != ".xml":
        return _fail(f"an OpenVINO model is written as NAME.xml (+ NAME.bin), not {outs['openvino']}")
    h, w = model.image_size
    images = check_images((h, w), 3)
    if args.check_images:
        loaded, ok, bad = read_images(args.check_images, (h, w), normalise=False)   # RGB in [0, 1]
        if bad:
            return _fail("cannot use --check-images: " + "; ".join(msg for _, msg in bad))
        images = np.concatenate([images, loaded.numpy()])
    print(f"altub_fast export: {model.config.get('name', type(model).__name__)} ({model.config.get('backbone', '?')}, "
          f"{h}x{w}) from {args.checkpoint} to {', '.join(formats)}")
    meta = {"checkpoint": os.path.abspath(args.checkpoint), "model": dict(model.config),
            "threshold": ck.get("threshold")}
    module = prepare_for_export(model)
    for fmt in formats:
        try:
            record = export_model(model, fmt, outs[fmt], images=images, rtol=args.rtol, opset=args.opset,
                                  metadata=meta, module=module, onnx_path=outs.get("onnx") if fmt == "openvino" else None)
        except ExportCheckError as e:
            return _fail(f"{e}\nthe written {fmt} files were deleted", EXIT_FAILED)
        except ExportError as e:
            return _fail(str(e), EXIT_FAILED)
        c = record["check"]
        print(f"{fmt}: wrote {', '.join(record['files'])} ({record['bytes'] / 1e6:.1f} MB); checked in its runtime "
              f"against PyTorch on batches of {c['batch_sizes']} images: max relative error maps "
              f"{c['max_rel_err_maps']:.2g}, scores {c['max_rel_err_scores']:.2g} (limit {c['rtol']:g})")
    thr = ck.get("threshold")
    if isinstance(thr, dict) and "value" in thr:
        print(f"the checkpoint's threshold {float(thr['value']):.6g} is in each <file>.json: defect if score > threshold")
    else:
        print("the checkpoint stores no threshold: choose one on normal images before deploying "
              "(defect if score > threshold)")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
