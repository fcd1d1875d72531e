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
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .imagenet import IMAGENET_MEAN, IMAGENET_STD
from .inference.exported import FORMATS, INPUT_NAME, OUTPUT_NAMES, ExportedModel, format_of  # noqa: F401
from .inference.graph import (DEFAULT_OPSET, EXAMPLE_BATCH, MAX_BATCH, AnomalyMapModule, ExportCheckError,  # noqa: F401
                              ExportError, check_images, export_onnx, export_openvino, export_torchscript,
                              prepare_for_export)
from .inference.graph import rel_err as _rel_err
from .inference.runtime import EXPORT_EXTRA, NEEDS, missing_packages as _missing_for  # noqa: F401 (NEEDS)

SUFFIXES = {"onnx": ".onnx", "openvino": ".xml", "torchscript": ".torchscript.pt"}
_OUT_ENDINGS = {"onnx": ".onnx", "openvino": ".xml", "torchscript": ".pt"}   # --out taken as the file itself
DEFAULT_RTOL = 1e-4
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

__all__ = ["ExportError", "ExportCheckError", "AnomalyMapModule", "prepare_for_export", "export_model",
           "ExportedModel", "format_of", "check_images", "verify_export", "main"]   # ExportedModel, format_of:
# defined in altub_fast/inference/exported.py (loading an exported file is inference); the module, the
# writers and the errors in altub_fast/inference/graph.py (predict's runtime cache exports the same
# graph); all re-exported here


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


def missing_packages(formats: List[str]) -> Optional[str]:
    """None when every package the formats need is installed (:data:`NEEDS`, from
    :mod:`altub_fast.inference.runtime`), else one line naming what is missing and the extra that
    brings it."""
    missing = _missing_for(formats)
    if not missing:
        return None
    return f"--format {' '.join(formats)} needs {', '.join(missing)}, not installed: {EXPORT_EXTRA}"


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
