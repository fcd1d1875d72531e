"""Which runtime scores the images: ``torch`` (eager PyTorch), ``onnxruntime`` or ``openvino``.

    name = resolve_runtime("auto", device="cpu")     # the fastest one installed, else "torch"
    message = runtime_missing("openvino")            # None, or one line naming the extra

``auto`` takes the first installed runtime of :data:`AUTO_ORDER`, the order measured on this
project's CPU machine (FastFlow, efficientnet_lite0, 256 px, 2 intra-op threads, both runtimes
called alternately in one process: ONNX Runtime 20.0 images/s at batch 1 and 26.5 at batch 8,
OpenVINO 16.2 and 20.7, i.e. OpenVINO at 0.81x and 0.78x of ONNX Runtime); it falls back to
torch where neither is installed, and on a CUDA device (the exported runtimes run on the CPU).
A runtime counts as installed when it and the exporter it needs (onnx, onnxscript: the graph is
exported with ``torch.onnx``; OpenVINO converts the ONNX file) can be imported: :data:`NEEDS`,
all in the ``[export]`` extra. Nothing here imports a runtime; it asks ``importlib`` only.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
from typing import Iterable, List, Optional

__all__ = ["RUNTIMES", "AUTO_ORDER", "EXPORTED_RUNTIMES", "FORMAT_OF_RUNTIME", "NEEDS", "EXPORT_EXTRA",
           "RuntimeUnavailable", "missing_packages", "runtime_missing", "installed_runtimes", "runtime_version",
           "resolve_runtime"]

RUNTIMES = ("auto", "torch", "onnxruntime", "openvino")
AUTO_ORDER = ("onnxruntime", "openvino")                 # fastest first, measured (see the docstring)
EXPORTED_RUNTIMES = ("onnxruntime", "openvino")
FORMAT_OF_RUNTIME = {"onnxruntime": "onnx", "openvino": "openvino"}
EXPORT_EXTRA = 'pip install "altub_fast[export]"'

#: The packages each export format needs (OpenVINO converts the ONNX export); all in ``[export]``.
NEEDS = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "openvino": ("onnx", "onnxscript", "openvino"),
         "torchscript": ()}


class RuntimeUnavailable(ValueError):
    """A runtime was asked for that cannot run here; the message is one line saying why."""


def missing_packages(formats: Iterable[str]) -> List[str]:
    """The packages the export ``formats`` need that are not installed, sorted."""
    return sorted({p for f in formats for p in NEEDS[f] if importlib.util.find_spec(p) is None})


def runtime_missing(runtime: str) -> Optional[str]:
    """None when ``runtime`` and its exporter are installed (or it is torch / auto), else one line
    naming the missing packages and the extra that brings them."""
    if runtime not in FORMAT_OF_RUNTIME:
        return None
    missing = missing_packages([FORMAT_OF_RUNTIME[runtime]])
    if not missing:
        return None
    return f"--runtime {runtime} needs {', '.join(missing)}, not installed: {EXPORT_EXTRA}"


def installed_runtimes() -> List[str]:
    """The exported runtimes usable here, fastest first."""
    return [r for r in AUTO_ORDER if runtime_missing(r) is None]


def runtime_version(runtime: str) -> str:
    """The installed distribution's version ("torch": torch's)."""
    dist = {"torch": "torch", "onnxruntime": "onnxruntime", "openvino": "openvino"}[runtime]
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:   # e.g. onnxruntime-gpu, openvino-nightly
        module = importlib.import_module(dist)
        return str(getattr(module, "__version__", "unknown"))


def resolve_runtime(requested: str, device: Optional[str] = None) -> str:
    """The runtime to use for ``requested`` (one of :data:`RUNTIMES`) on ``device``; raises
    :class:`RuntimeUnavailable` for an explicit runtime that is not installed or cannot run there."""
    if requested not in RUNTIMES:
        raise RuntimeUnavailable(f"--runtime must be one of {', '.join(RUNTIMES)}, got {requested!r}")
    on_cpu = device is None or str(device).startswith("cpu")
    if requested == "auto":
        found = installed_runtimes() if on_cpu else []
        return found[0] if found else "torch"
    if requested == "torch":
        return "torch"
    missing = runtime_missing(requested)
    if missing:
        raise RuntimeUnavailable(missing)
    if not on_cpu:
        raise RuntimeUnavailable(f"--runtime {requested} runs on the CPU, not on --device {device}: "
                                 f"use --runtime torch there, or --device cpu")
    return requested
