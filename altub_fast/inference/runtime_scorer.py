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
each size runs PyTorch too (the model on the plain path the graph was exported from) on the
batch's first :data:`CHECK_IMAGES` images: the graph's maps and scores of those images, from its
run on the whole batch (so at the batch size it serves), must agree within ``rtol`` (1e-4) of
PyTorch's largest value. An image's outputs do not depend on the other images of its batch, so
the whole batch in PyTorch would check the same thing at up to 16x the cost (a batch of 32: 4 s
of eager PyTorch on 2 cores, resnet18 at 256 px). A graph that fails the check,
or an export that cannot be built, prints a warning and the scorer moves on: with ``auto`` to the next
installed runtime (checked the same way), else, and after the last, to PyTorch for the rest of the
run (that batch's scores are then PyTorch's), so scores are never silently different. ONNX Runtime
used to miss 1e-4 on FastFlow (resnet18, 256 px: 1.5e-4 at one image, failed at batch 8), from its
float32 ``LayerNormalization`` over whole feature maps; the graph now takes those statistics in
float64 (:class:`~altub_fast.inference.graph.PreciseLayerNorm`) and agrees within 5e-7. A map that
is not finite raises :class:`~altub_fast.models.NonFiniteError`, as the model does.

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
from .runtime import FORMAT_OF_RUNTIME, installed_runtimes, resolve_runtime, runtime_version
from .scorer import Scorer

__all__ = ["RuntimeScorer", "make_scorer", "describe_runtime", "DEFAULT_RTOL", "CHECK_IMAGES", "serves_whole_sets"]

DEFAULT_RTOL = 1e-4
CHECK_IMAGES = 2           # images of a size's first batch that PyTorch recomputes for the check
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
    docstring). ``threads``: the runtime's intra-op threads (default: torch's). ``fallbacks``: the
    runtimes to try, in order, when one cannot export or disagrees with PyTorch, before PyTorch
    itself (``auto``: the other installed runtimes; an explicit runtime: none)."""

    def __init__(self, model: nn.Module, runtime: str, checkpoint, *, input_normalised: bool = False,
                 threads: Optional[int] = None, rtol: float = DEFAULT_RTOL, requested: Optional[str] = None,
                 fallbacks: Sequence[str] = (), warn: Callable[[str], None] = _warn):
        super().__init__(model, "cpu")
        if runtime not in FORMAT_OF_RUNTIME:
            raise ValueError(f"runtime must be one of {tuple(FORMAT_OF_RUNTIME)}, got {runtime!r}")
        self.input_normalised = bool(input_normalised)
        self.runtime, self.checkpoint, self.rtol, self._warn = runtime, str(checkpoint), float(rtol), warn
        self.threads = threads or torch.get_num_threads()
        self._fallbacks = [r for r in fallbacks if r != runtime and r in FORMAT_OF_RUNTIME]
        self._digest: Optional[str] = None
        self.info = {"requested": requested or runtime, "exports": {}, "check": None, "note": None}
        self._use(runtime)

    def _use(self, runtime: str) -> None:
        """Switch to ``runtime`` ("torch" included): nothing exported, loaded or checked for it yet."""
        self.runtime = runtime
        self.version = torch.__version__ if runtime == "torch" else runtime_version(runtime)
        self._runners: Dict[Tuple[int, int], ExportedModel] = {}
        self._checked: set = set()
        self.info.update(runtime=runtime, version=self.version)

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
            runner = self._open(path)
        except Exception:   # noqa: BLE001 - a file the runtime refuses is corrupt whatever it raises
            if not cached:
                raise
            path, cached = get_export(key, self.checkpoint, self._build(size), rebuild=True)
            runner = self._open(path)
        self._runners[size] = runner
        self.info["exports"][f"{size[0]}x{size[1]}"] = {"path": str(path), "cached": cached}
        return runner

    def _open(self, path) -> ExportedModel:
        # ONNX Runtime's threads wait without spinning: the reader threads share the cores
        return ExportedModel(path, FORMAT_OF_RUNTIME[self.runtime], threads=self.threads, spinning=False)

    def prepare(self, size_hw: Optional[Sequence[int]] = None) -> bool:
        """Export (or find in the cache) the graph for ``size_hw`` (default: the model's) and load
        it; False, with a warning, when that fails and the scorer falls back (to the next runtime
        of ``fallbacks``, else PyTorch)."""
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
        nxt = self._fallbacks.pop(0) if self._fallbacks else "torch"
        then = "scoring with PyTorch (runtime torch) instead" if nxt == "torch" else f"trying {nxt} instead"
        self._warn(f"{why}; {then}")
        self.info["note"] = "; ".join(filter(None, [self.info.get("note"), why]))
        self._use(nxt)

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

    def _check(self, size, ref, maps, scores) -> bool:
        """The graph's outputs of a batch against PyTorch's (``ref``) on its first ``len(ref[1])``
        images, recorded in ``info``."""
        n = len(ref[1])
        em, es = rel_err(maps[:n], ref[0]), rel_err(scores[:n], ref[1])
        ok = em <= self.rtol and es <= self.rtol
        self.info["check"] = {"runtime": self.runtime, "batch": int(maps.shape[0]), "images_checked": n,
                              "max_rel_err_maps": em, "max_rel_err_scores": es, "rtol": self.rtol,
                              "reference": "PyTorch, plain path (impl='torch')", "passed": bool(ok)}
        return ok

    def _reference(self, size, x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """PyTorch's maps and scores of the graph input ``x``: the model on the plain PyTorch path,
        the function the graph was exported from (a copy from :func:`prepare_for_export`, dropped
        after). The eager CPU fast path differs from it by up to its own 1e-4
        (``cpu_fast.FOLD_RTOL`` on the features), more than a faithful graph does."""
        with torch.no_grad():
            maps, scores = prepare_for_export(self.model, size)(torch.from_numpy(x))
        return maps.numpy(), scores.numpy()

    def _first_batch(self, size, ref, maps, scores):
        """The check of a size's first batch: the graph's (maps, scores), or None after falling back.
        A cached entry that disagrees is not rebuilt: its files passed their hashes, so a rebuild
        from the same checkpoint gives the same graph (corruption is what the hashes catch)."""
        if not self._check(size, ref, maps, scores):
            c = self.info["check"]
            self._fall_back(f"the {self.runtime} graph does not reproduce PyTorch within {self.rtol:g} relative "
                            f"on the first batch (maps {c['max_rel_err_maps']:.3g}, scores "
                            f"{c['max_rel_err_scores']:.3g})")
            return None
        self._checked.add(size)
        return maps, scores

    @torch.no_grad()
    def score(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(maps (B, H, W), scores (B,)) of a batch, from the exported graph (PyTorch after a fallback)."""
        size = tuple(int(v) for v in images.shape[-2:])
        ref = None
        while self.runtime != "torch":
            if not self.prepare(size):
                continue                      # it fell back: the next runtime, or PyTorch
            x = self._graph_input(images)
            maps, scores = self._runners[size](x)
            if size not in self._checked:
                ref = ref if ref is not None else self._reference(size, x[:CHECK_IMAGES])
                out = self._first_batch(size, ref, maps, scores)
                if out is None:
                    continue
                maps, scores = out
            if not np.isfinite(maps).all():
                from ..models import NonFiniteError
                raise NonFiniteError(f"{type(self.model).__name__} anomaly map holds NaN/Inf (runtime {self.runtime})")
            return torch.from_numpy(np.ascontiguousarray(maps)), torch.from_numpy(np.ascontiguousarray(scores))
        return self._torch(images)

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
        others = installed_runtimes() if runtime == "auto" else ()
        return RuntimeScorer(model, name, checkpoint, input_normalised=feeds_normalised, requested=runtime,
                             fallbacks=others, **kw)
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
