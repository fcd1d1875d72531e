"""The model as an exportable graph, and the writers that export it (ONNX, OpenVINO, TorchScript).

    module = prepare_for_export(model)                   # images in [0, 1] -> (maps, scores), plain PyTorch
    export_onnx(module, Path("m.onnx"), example)         # example: a (B, 3, H, W) float32 tensor
    export_openvino(module, Path("m.xml"), example, onnx_path=Path("m.onnx"))

The graph is the whole model on the plain PyTorch path (``impl="torch"``: no Triton, no custom
op): one input ``images``, float32 (batch, 3, H, W), RGB in [0, 1]; the ImageNet normalisation,
the backbone, the flows and the score normalisation constants are inside. Two outputs: ``maps``
(batch, H, W) float32 and ``scores`` (batch,): ``model.anomaly_map``'s map and image score rule.
The batch size is free; H and W are fixed at export.

A LayerNorm over many elements (FastFlow's, over a whole (C, h, w) feature map: 262 144 values at
resnet18's first scale) is exported with its mean and variance taken in float64
(:class:`PreciseLayerNorm`). ONNX Runtime's own ``LayerNormalization`` accumulates them in float32
and drifts by 4e-5 relative there, which reached 1e-4 on the maps (measured: FastFlow, resnet18,
256 px, batch 8; PyTorch's float32 stays within 5e-7 of float64), failing the runtime check; with
float64 statistics the graph agrees with PyTorch to float32 rounding. :data:`GRAPH_VERSION` names
this form of the graph, so cached exports of an older form are rebuilt.

``python -m altub_fast.export`` (the command, with its check and ``<file>.json``) and the runtime
cache of predict / eval (:mod:`altub_fast.inference.runtime`) both export through this file, so
they write the same graph. Moved here from ``export.py``, which re-exports every name.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
import tempfile
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..backend import use_plain_path
from ..imagenet import IMAGENET_MEAN, IMAGENET_STD
from .exported import INPUT_NAME, OUTPUT_NAMES

__all__ = ["ExportError", "ExportCheckError", "AnomalyMapModule", "PreciseLayerNorm", "precise_layer_norms",
           "prepare_for_export", "check_images", "export_onnx", "export_openvino", "export_torchscript", "rel_err",
           "DEFAULT_OPSET", "EXAMPLE_BATCH", "MAX_BATCH", "GRAPH_VERSION"]

DEFAULT_OPSET = 18
EXAMPLE_BATCH = 2          # the batch size traced; the checks run other sizes
MAX_BATCH = 1 << 16        # the batch axis' declared upper bound (the graph itself has none)
_ONNX_STANDARD_DOMAINS = ("", "ai.onnx")
GRAPH_VERSION = 2          # 2: LayerNorm statistics in float64 (PreciseLayerNorm); part of the cache key
PRECISE_NORM_MIN = 4096    # normalised elements from which a LayerNorm's statistics are taken in float64


class ExportError(RuntimeError):
    """Exporting failed or produced something unusable (a custom op in the graph, ...)."""


class ExportCheckError(ExportError):
    """The exported file does not reproduce PyTorch's maps and scores."""


# ----------------------------------------------------------------------------- the exported module
class AnomalyMapModule(nn.Module):
    """images (B, 3, H, W) RGB in [0, 1] -> (maps (B, H, W) float32, scores (B,) float32): ImageNet
    normalisation, then ``model.anomaly_map``. Build it with :func:`prepare_for_export`.
    ``image_size``: the (H, W) it is exported at (default: the model's)."""

    def __init__(self, model: nn.Module, image_size: Optional[Sequence[int]] = None):
        super().__init__()
        self.model = model
        self.image_size = tuple(int(v) for v in (image_size if image_size is not None else model.image_size))
        # the constants as buffers, so the exported graph holds them as named initializers
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        maps, scores = self.model.anomaly_map((images - self.mean) / self.std)
        return maps.float(), scores.float()


class PreciseLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters, same function) whose mean and variance are computed in
    float64 and applied in the input's dtype: exported, it becomes plain reductions rather than
    ONNX's ``LayerNormalization``, whose float32 statistics drift over large maps (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(x.dim() - len(self.normalized_shape), x.dim()))
        xd = x.double()
        mean = xd.mean(dim=dims, keepdim=True)
        var = (xd - mean).square().mean(dim=dims, keepdim=True)
        y = (x - mean.to(x.dtype)) * torch.rsqrt(var + self.eps).to(x.dtype)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y


def precise_layer_norms(model: nn.Module) -> None:
    """Every ``nn.LayerNorm`` of ``model`` over at least :data:`PRECISE_NORM_MIN` elements becomes a
    :class:`PreciseLayerNorm` in place (the same parameter tensors; a copy's, in prepare_for_export)."""
    for module in model.modules():
        if type(module) is nn.LayerNorm and math.prod(module.normalized_shape) >= PRECISE_NORM_MIN:
            module.__class__ = PreciseLayerNorm


def _plain_backbone(model: nn.Module) -> None:
    """The backbone's path is chosen by the model's config (``config.impl``, None: the
    environment's ``ALTUB_FAST_IMPL``), not by a submodule's ``impl``, so ``use_plain_path`` leaves
    it to the CPU fast path under "auto": set it to "torch" too (on the copy being exported)."""
    cfg = getattr(model, "config", None)
    if isinstance(cfg, dict):
        cfg["impl"] = "torch"
    elif cfg is not None and hasattr(cfg, "impl"):
        cfg.impl = "torch"


def prepare_for_export(model: nn.Module, image_size: Optional[Sequence[int]] = None) -> AnomalyMapModule:
    """A copy of ``model`` on the CPU, in eval mode, without gradients, on the plain PyTorch path
    (:func:`altub_fast.backend.use_plain_path`: every block's ``impl="torch"``), without the
    data-dependent finiteness check, with large LayerNorms' statistics in float64
    (:class:`PreciseLayerNorm`), and (CFLOW-AD) scoring all fibers in one flow call, so no loop
    bound depends on the batch size. ``image_size``: the input (H, W) to export at (default: the
    model's)."""
    m = copy.deepcopy(model).cpu().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    use_plain_path(m)
    _plain_backbone(m)
    precise_layer_norms(m)
    if hasattr(m, "check_finite"):
        m.check_finite = False
    if hasattr(m, "inference_chunk"):
        m.inference_chunk = 1 << 62
    module = AnomalyMapModule(m, image_size).eval()
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


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max |ref| (inf for a shape mismatch or a non-finite value)."""
    got, ref = np.asarray(got), np.asarray(ref)
    if got.shape != ref.shape or not np.isfinite(got).all():
        return float("inf")
    if got.size == 0:
        return 0.0
    scale = max(float(np.abs(ref).max()), 1e-12)
    return float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max() / scale)


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
