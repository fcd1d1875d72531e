"""predict's scoring loop: files read ahead on worker threads, scored batch by batch, streamed.

:func:`score_files` reads the files through :func:`altub_fast.inference.pipeline.read_ahead`
(``workers`` threads decode and resize the next batches while the scorer runs) and records one
:class:`Prediction` per file. Nothing grows with the number of files but those small records: no
image outlives its batch, and the maps kept for overlays go, float16, to a temporary file
(:class:`MapSpill`) that the overlays read back chunk by chunk. A progress line (tqdm, on stderr)
shows images/s; :class:`ScoreResult` records the loop's seconds.
"""
from __future__ import annotations

import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

from .inference import Scorer
from .inference.pipeline import DEFAULT_WORKERS, read_ahead

GOOD, DEFECT, NO_DECISION, ERROR = "good", "defect", "n/a", "error"

__all__ = ["GOOD", "DEFECT", "NO_DECISION", "ERROR", "decide", "Prediction", "MapSpill", "ScoreResult",
           "score_files"]


def decide(score: float, threshold: Optional[float]) -> str:
    """``defect`` if ``score > threshold``, ``good`` otherwise, ``n/a`` without a threshold."""
    if threshold is None:
        return NO_DECISION
    return DEFECT if score > threshold else GOOD


@dataclass
class Prediction:
    path: str
    score: Optional[float] = None
    decision: str = ERROR
    error: Optional[str] = None
    index: int = -1             # position among the scored images (overlay numbering); -1 for errors


class MapSpill:
    """Anomaly maps kept for the overlays, float16, in an anonymous temporary file (deleted when
    closed or when the process ends): ``positions`` (file positions, in the order added) and
    ``read(positions)`` -> (n, H, W) float16 tensor."""

    def __init__(self) -> None:
        self._file = None
        self._slot: dict = {}
        self._shape: Optional[Tuple[int, int]] = None

    def add(self, position: int, amap) -> None:
        import torch

        a = amap.to("cpu", torch.float16).contiguous().numpy()
        if self._file is None:
            self._file = tempfile.TemporaryFile(prefix="altub_fast-maps-")
            self._shape = tuple(a.shape)
        if tuple(a.shape) != self._shape:
            raise ValueError(f"maps of one run must share a shape: {a.shape} after {self._shape}")
        self._file.seek(0, 2)
        self._slot[position] = self._file.tell() // a.nbytes
        self._file.write(a.tobytes())

    @property
    def positions(self) -> List[int]:
        return list(self._slot)

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, position: int) -> bool:
        return position in self._slot

    def read(self, positions: Sequence[int]):
        import numpy as np
        import torch

        h, w = self._shape
        nbytes = h * w * 2
        out = np.empty((len(positions), h, w), dtype=np.float16)
        for k, p in enumerate(positions):
            self._file.seek(self._slot[p] * nbytes)
            out[k] = np.frombuffer(self._file.read(nbytes), dtype=np.float16).reshape(h, w)
        return torch.from_numpy(out)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._slot.clear()


@dataclass
class ScoreResult:
    predictions: List[Prediction]            # every file, in input order
    maps: MapSpill = field(default_factory=MapSpill)   # the kept maps (see MapSpill), by file position
    map_range: Tuple[float, float] = (math.inf, -math.inf)
    n_scored: int = 0
    seconds: float = 0.0                     # the scoring loop, first read to last result

    def record(self, position: int, amap, score, threshold: Optional[float], keep_maps: int) -> None:
        """File ``position`` scored: its score, decision and overlay number; its map kept (float16,
        spilled to disk) while fewer than ``keep_maps`` are; the maps' range widened."""
        pred = self.predictions[position]
        pred.score = float(score)
        pred.decision = decide(pred.score, threshold)
        pred.index = self.n_scored
        amap = amap.float()
        lo, hi = self.map_range
        self.map_range = (min(lo, float(amap.min())), max(hi, float(amap.max())))
        if self.n_scored < keep_maps:
            self.maps.add(position, amap)
        self.n_scored += 1


def _score_batch(scorer: Scorer, images, ok: List[int]):
    """([(position in chunk, map, score)], [(position in chunk, error)]) for the loaded images of a
    chunk: one scorer call, or, where its map is not finite, one call per image to find the culprits."""
    from .models import NonFiniteError

    if not ok:
        return [], []
    try:
        maps, scores = scorer.score(images)
        return [(j, maps[k], scores[k]) for k, j in enumerate(ok)], []
    except NonFiniteError:
        outputs, errors = [], []
        for k, j in enumerate(ok):
            try:
                m, s = scorer.score(images[k:k + 1])
                outputs.append((j, m[0], s[0]))
            except NonFiniteError as e:
                errors.append((j, f"the model's anomaly map is not finite: {e}"))
        return outputs, errors


def score_files(model, files: Sequence[str], *, batch_size: int = 16, device: Optional[str] = None,
                threshold: Optional[float] = None, keep_maps: int = 0, progress: bool = True,
                on_result: Optional[Callable[[Prediction], None]] = None,
                workers: int = DEFAULT_WORKERS) -> ScoreResult:
    """Score ``files`` in batches (``model``: a trained model, scored by ``model.anomaly_map``, or
    a :class:`~altub_fast.inference.Scorer`, e.g. an exported runtime's), reading ahead on
    ``workers`` threads. Unreadable files (and images whose map is not finite) become predictions
    with decision ``error``. The maps of the first ``keep_maps`` scored images are kept (float16,
    spilled to a temporary file) for overlays."""
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    scorer = model if isinstance(model, Scorer) else Scorer(model, device)
    result = ScoreResult([Prediction(str(f)) for f in files])
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress, dynamic_ncols=True,
               file=sys.stderr)
    t0 = time.perf_counter()
    for start, (images, ok, bad) in read_ahead(files, scorer.image_size, batch_size=batch_size, workers=workers,
                                               normalise=scorer.input_normalised):
        outputs, not_finite = _score_batch(scorer, images, ok)
        for j, msg in bad + not_finite:
            result.predictions[start + j].error = msg
        for j, amap, score in outputs:
            result.record(start + j, amap, score, threshold, keep_maps)
        n = min(batch_size, len(files) - start)
        for j in range(n):
            if on_result is not None:
                on_result(result.predictions[start + j])
        bar.update(n)
    result.seconds = time.perf_counter() - t0
    bar.close()
    return result
