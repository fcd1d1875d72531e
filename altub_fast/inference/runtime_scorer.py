"""Scoring through an exported graph (ONNX Runtime or OpenVINO), checked against PyTorch.

    scorer = make_scorer(model, "auto", checkpoint="last.pt", device="cpu")
    images, ok, bad = scorer.read(files)          # as the scorer takes them
    maps, scores = scorer.score(images)           # (B, H, W), (B,), torch tensors on the CPU
    scorer.info                                   # which runtime ran, its export, the check's numbers

:func:`make_scorer` gives a plain :class:`~altub_fast.inference.Scorer` for ``torch`` (and for
``auto`` where no exported runtime is installed, or on CUDA), else a :class:`RuntimeScorer`. That
one exports the model once per input size (:mod:`~altub_fast.inference.graph`, the graph
``python -m altub_fast.export`` writes: ``model.anomaly_map``'s map and image score rule) into the
cache beside the checkpoint (:mod:`~altub_fast.inference.export_cache`), and on the first batch of
each size runs PyTorch too: maps and scores must agree within ``rtol`` (1e-4) of PyTorch's largest
value. A cached export that fails the check is rebuilt and checked again; a fresh one that fails,
or an export that cannot be built, prints a warning and the scorer runs PyTorch from then on (that
batch's scores are PyTorch's), so scores are never silently different. A map that is not finite
raises :class:`~altub_fast.models.NonFiniteError`, as the model does.

``input_normalised``: False (predict) reads files as RGB in [0, 1], which the graph takes directly;
True (eval, whose datasets give ImageNet-normalised images) undoes the normalisation before the
graph (``x * std + mean``, a rounding error far below the check's tolerance).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..imagenet import IMAGENET_MEAN, IMAGENET_STD
from ..imagenet import normalise as imagenet_normalise
from .export_cache import ExportKey, file_digest, get_export
from .exported import ExportedModel
from .graph import DEFAULT_OPSET, EXAMPLE_BATCH, check_images, export_onnx, export_openvino, prepare_for_export, rel_err
from .runtime import FORMAT_OF_RUNTIME, resolve_runtime, runtime_version
from .scorer import Scorer

__all__ = ["RuntimeScorer", "make_scorer", "describe_runtime", "DEFAULT_RTOL", "serves_whole_sets"]

DEFAULT_RTOL = 1e-4
_FILE = {"onnxruntime": "model.onnx", "openvino": "model.xml"}


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def serves_whole_sets(model: nn.Module) -> bool:
    """True when the model's whole-set scores are its per-batch ``anomaly_map`` concatenated (the
    exported graph gives exactly that); False where a model combines batches otherwise."""
    from ..models.common import FlowModel

    return (getattr(type(model), "partial_anomaly_map", None) is FlowModel.partial_anomaly_map
            and getattr(type(model), "combine_anomaly_maps", None) is FlowModel.combine_anomaly_maps)


class RuntimeScorer(Scorer):
    """A :class:`Scorer` whose ``score`` runs an exported graph in ``runtime`` (see the module
    docstring). ``threads``: the runtime's intra-op threads (default: torch's)."""

    def __init__(self, model: nn.Module, runtime: str, checkpoint, *, input_normalised: bool = False,
                 threads: Optional[int] = None, rtol: float = DEFAULT_RTOL, requested: Optional[str] = None,
                 warn: Callable[[str], None] = _warn):
        super().__init__(model, "cpu")
        if runtime not in FORMAT_OF_RUNTIME:
            raise ValueError(f"runtime must be one of {tuple(FORMAT_OF_RUNTIME)}, got {runtime!r}")
        self.input_normalised = bool(input_normalised)
        self.runtime, self.checkpoint, self.rtol, self._warn = runtime, str(checkpoint), float(rtol), warn
        self.threads = threads or torch.get_num_threads()
        self.version = runtime_version(runtime)
        self._digest: Optional[str] = None
        self._runners: Dict[Tuple[int, int], ExportedModel] = {}
        self._cached: Dict[Tuple[int, int], bool] = {}
        self._checked: set = set()
        self.info = {"requested": requested or runtime, "runtime": runtime, "version": self.version,
                     "exports": {}, "check": None, "note": None}

    # ------------------------------------------------------------------ the export
    def _key(self, size: Tuple[int, int]) -> ExportKey:
        if self._digest is None:
            self._digest = file_digest(self.checkpoint)
        return ExportKey.for_model(self.model, self.checkpoint, self.runtime, self.version, size, DEFAULT_OPSET,
                                   digest=self._digest)

    def _build(self, size: Tuple[int, int]) -> Callable:
        def build(folder):
            module = prepare_for_export(self.model, size)
            example = torch.from_numpy(check_images(size, EXAMPLE_BATCH, seed=1))
            onnx_path = folder / _FILE["onnxruntime"]
            export_onnx(module, onnx_path, example)
            if self.runtime == "openvino":
                export_openvino(module, folder / _FILE["openvino"], example, onnx_path=onnx_path)
                onnx_path.unlink()
                return folder / _FILE["openvino"]
            return onnx_path
        return build

    def _load(self, size: Tuple[int, int], rebuild: bool = False) -> ExportedModel:
        key = self._key(size)
        path, cached = get_export(key, self.checkpoint, self._build(size), rebuild=rebuild)
        try:
            runner = ExportedModel(path, FORMAT_OF_RUNTIME[self.runtime], threads=self.threads)
        except Exception:   # noqa: BLE001 - a file the runtime refuses is corrupt whatever it raises
            if not cached:
                raise
            path, cached = get_export(key, self.checkpoint, self._build(size), rebuild=True)
            runner = ExportedModel(path, FORMAT_OF_RUNTIME[self.runtime], threads=self.threads)
        self._runners[size], self._cached[size] = runner, cached
        self.info["exports"][f"{size[0]}x{size[1]}"] = {"path": str(path), "cached": cached}
        return runner

    def prepare(self, size_hw: Optional[Sequence[int]] = None) -> bool:
        """Export (or find in the cache) the graph for ``size_hw`` (default: the model's) and load
        it; False, with a warning, when that fails and the scorer falls back to PyTorch."""
        size = tuple(int(v) for v in (size_hw or self.image_size))
        if self.runtime == "torch":
            return False
        if size in self._runners:
            return True
        try:
            self._load(size)
            return True
        except Exception as e:   # noqa: BLE001 - any exporter or runtime failure: PyTorch instead
            self._fall_back(f"the {self.runtime} export of {self.checkpoint} at {size[0]}x{size[1]} failed "
                            f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})")
            return False

    def _fall_back(self, why: str) -> None:
        self._warn(f"{why}; scoring with PyTorch (runtime torch) instead")
        self.info.update(runtime="torch", version=torch.__version__, note=why)
        self.runtime = "torch"

    # ------------------------------------------------------------------ scoring
    def _torch(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = images if self.input_normalised else imagenet_normalise(images)
        return Scorer.score(self, x)

    def _graph_input(self, images: torch.Tensor) -> np.ndarray:
        if not self.input_normalised:
            return images.detach().cpu().float().numpy()
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
        return (images.detach().cpu().float() * std + mean).numpy()

    def _check(self, size, images, maps, scores) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """PyTorch on the same batch: None when the graph agrees, else PyTorch's outputs."""
        ref_maps, ref_scores = self._torch(images)
        em, es = rel_err(maps, ref_maps.float().numpy()), rel_err(scores, ref_scores.float().numpy())
        ok = em <= self.rtol and es <= self.rtol
        self.info["check"] = {"batch": int(images.shape[0]), "max_rel_err_maps": em, "max_rel_err_scores": es,
                              "rtol": self.rtol, "passed": bool(ok)}
        return None if ok else (ref_maps, ref_scores)

    def _first_batch(self, size, images, x, maps, scores):
        """The check of a size's first batch: (maps, scores) to return, PyTorch's after a fallback."""
        ref = self._check(size, images, maps, scores)
        if ref is not None and self._cached[size]:   # a cached graph that disagrees: rebuild, check again
            try:
                self._load(size, rebuild=True)
                maps, scores = self._runners[size](x)
                ref = self._check(size, images, maps, scores)
            except Exception as e:   # noqa: BLE001 - the rebuild failed: PyTorch, as for a mismatch
                self._fall_back(f"rebuilding the {self.runtime} export failed ({type(e).__name__}: {e})")
                return self._torch(images)
        if ref is not None:
            c = self.info["check"]
            self._fall_back(f"the {self.runtime} graph does not reproduce PyTorch within {self.rtol:g} relative "
                            f"on the first batch (maps {c['max_rel_err_maps']:.3g}, scores "
                            f"{c['max_rel_err_scores']:.3g})")
            return ref
        self._checked.add(size)
        return maps, scores

    @torch.no_grad()
    def score(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(maps (B, H, W), scores (B,)) of a batch, from the exported graph (PyTorch after a fallback)."""
        size = tuple(int(v) for v in images.shape[-2:])
        if self.runtime == "torch" or not self.prepare(size):
            return self._torch(images)
        x = self._graph_input(images)
        maps, scores = self._runners[size](x)
        if size not in self._checked:
            maps, scores = self._first_batch(size, images, x, maps, scores)
            if torch.is_tensor(maps):   # PyTorch's, after a fallback
                return maps, scores
        if not np.isfinite(maps).all():
            from ..models import NonFiniteError
            raise NonFiniteError(f"{type(self.model).__name__} anomaly map holds NaN/Inf (runtime {self.runtime})")
        return torch.from_numpy(np.ascontiguousarray(maps)), torch.from_numpy(np.ascontiguousarray(scores))

    def partial(self, images: torch.Tensor):
        return self.score(images)


def make_scorer(model: nn.Module, runtime: str = "auto", checkpoint=None, device=None, *,
                feeds_normalised: bool = False, amp: bool = False, **kw) -> Scorer:
    """The scorer for ``runtime`` (``auto``, ``torch``, ``onnxruntime``, ``openvino``; see
    :func:`~altub_fast.inference.runtime.resolve_runtime`, whose :class:`RuntimeUnavailable` an
    explicit runtime that is not installed raises). ``checkpoint``: the file ``model`` was loaded
    from (the cache key; without one, or for a model that combines batches otherwise than by
    concatenation, the scorer is torch's, with a warning where the runtime was explicit).
    ``feeds_normalised``: the caller passes ImageNet-normalised images (eval's datasets) instead
    of reading files with ``scorer.read``. Every scorer's ``info`` says which runtime runs."""
    name = resolve_runtime(runtime, device)
    reason = None
    if name != "torch" and (checkpoint is None or not Path(checkpoint).is_file()):
        reason = "no checkpoint file to key the export cache by"
    elif name != "torch" and not serves_whole_sets(model):
        reason = f"{type(model).__name__} combines its batches' maps otherwise than the exported graph"
    if name != "torch" and reason is None:
        return RuntimeScorer(model, name, checkpoint, input_normalised=feeds_normalised, requested=runtime, **kw)
    if reason is not None and runtime != "auto":
        _warn(f"--runtime {runtime}: {reason}; scoring with PyTorch (runtime torch)")
    scorer = Scorer(model, device, amp)
    scorer.info.update(requested=runtime, note=reason)
    return scorer


def describe_runtime(info: dict) -> str:
    """A scorer's ``info`` in a few words, e.g. ``onnxruntime 1.20.1 (auto; cached export)``."""
    text = f"{info['runtime']} {info['version']}"
    how = [] if info.get("requested") in (None, info["runtime"]) else [str(info["requested"])]
    exports = list((info.get("exports") or {}).values())
    if exports and info["runtime"] != "torch":
        how.append("cached export" if exports[-1]["cached"] else "exported now")
    return text + (f" ({'; '.join(how)})" if how else "")
