"""An exported model (ONNX, OpenVINO, TorchScript) loaded in its runtime on the CPU.

    maps, scores = ExportedModel("last.onnx")(images)     # images: float32 (B, 3, H, W), RGB in [0, 1]

The file is what ``python -m altub_fast.export`` writes: one input ``images`` (RGB in [0, 1] at
the model's input size, un-normalised: the ImageNet normalisation is inside the graph), two outputs
``maps`` (B, H, W) and ``scores`` (B,). Read its images with
``altub_fast.inference.read_images(files, size, normalise=False)``. export checks every file it
writes with this class; predict / eval's ``--runtime onnxruntime|openvino``
(:class:`~altub_fast.inference.runtime_scorer.RuntimeScorer`) runs their cached exports with it.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import numpy as np
import torch

__all__ = ["FORMATS", "INPUT_NAME", "OUTPUT_NAMES", "ExportedModel", "format_of", "ort_session_options"]

FORMATS = ("onnx", "openvino", "torchscript")
INPUT_NAME, OUTPUT_NAMES = "images", ("maps", "scores")


def format_of(path) -> str:
    """The format a file name implies: .onnx, .xml (OpenVINO), .pt / .pth / .ts (TorchScript)."""
    name = str(path).lower()
    if name.endswith(".onnx"):
        return "onnx"
    if name.endswith(".xml"):
        return "openvino"
    if name.endswith((".pt", ".pth", ".ts")):
        return "torchscript"
    raise ValueError(f"cannot tell the format of {path} from its name (.onnx, .xml or .pt); pass fmt=")


def ort_session_options(threads: Optional[int] = None, spinning: bool = True):
    """ONNX Runtime's session options as :class:`ExportedModel` opens a graph: ``threads`` intra-op
    threads and one inter-op thread (None: the runtime's own choice); ``spinning=False``: idle
    threads sleep instead of spin-waiting."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


class ExportedModel:
    """An exported file, loaded in its runtime on the CPU: ``maps, scores = ExportedModel(path)(images)``
    with ``images`` a float32 array (B, 3, H, W) in [0, 1]; returns numpy arrays.

    onnxruntime (CPUExecutionProvider), OpenVINO's CPU plugin with ``INFERENCE_PRECISION_HINT=f32``
    (its default on CPUs with bfloat16 units would be bf16), or ``torch.jit.load``. ``threads``:
    intra-op threads of the runtime (default: the runtime's own choice). ``spinning=False``: ONNX
    Runtime's idle threads sleep instead of spin-waiting (``session.intra_op.allow_spinning``), so
    other threads of the process (image readers) get the cores between calls.
    """

    def __init__(self, path, fmt: Optional[str] = None, threads: Optional[int] = None, spinning: bool = True):
        self.path = str(path)
        self.format = fmt or format_of(path)
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        self.threads = threads
        if self.format == "onnx":
            import onnxruntime as ort

            self._session = ort.InferenceSession(self.path, ort_session_options(threads, spinning),
                                                 providers=["CPUExecutionProvider"])
        elif self.format == "openvino":
            import openvino as ov

            core = ov.Core()
            config = {"INFERENCE_PRECISION_HINT": "f32"}
            if threads:
                config["INFERENCE_NUM_THREADS"] = int(threads)
            self._compiled = core.compile_model(self.path, "CPU", config)
            self._request = self._compiled.create_infer_request()
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)   # torch.jit's deprecation notice
                self._module = torch.jit.load(self.path, map_location="cpu").eval()

    def __call__(self, images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(images, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {x.shape}")
        if self.format == "onnx":
            maps, scores = self._session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        elif self.format == "openvino":
            out = self._request.infer([x])
            maps, scores = (np.array(out[self._compiled.output(name)]) for name in OUTPUT_NAMES)
        else:
            with torch.no_grad():
                m, s = self._module(torch.from_numpy(x))
            maps, scores = m.numpy(), s.numpy()
        return maps, scores
