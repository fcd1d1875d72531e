"""Reading the metrics' inputs: maps and masks as arrays, tensors or per-image sequences, chunk by chunk.

``maps`` and ``masks`` are arrays or tensors of shape (N, H, W) or (N, 1, H, W), or sequences of
per-image (H, W) / (1, H, W) arrays of one size. Masks are binarised at 0.5. :class:`_ImageStack`
gives chunks of images as float32 without copying the whole set; :func:`_chunks` walks maps and
masks together and refuses NaN / Inf. (The names keep their leading underscore: they are the
metrics' and the figures' (``viz.py``) plumbing, not an API.)
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Tuple, Union

import numpy as np

ArrayLike = Union[np.ndarray, "torch.Tensor", Sequence]  # noqa: F821


def _to_numpy(x) -> np.ndarray:
    """A numpy view of an ndarray, a torch tensor (any device, any float dtype) or a nested sequence."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        import torch

        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


class _ImageStack:
    """Read-only, chunked access to N same-size 2-D images given in any of the accepted forms."""

    def __init__(self, data, name: str) -> None:
        self.name = name
        if isinstance(data, (list, tuple)):
            self._items: Optional[list] = list(data)
            self._array = None
            if not self._items:
                raise ValueError(f"{name} is empty")
            first = self._squeeze(_to_numpy(self._items[0]), 0)
            self.n, self.shape = len(self._items), first.shape
        else:
            self._items = None
            self._array = data
            shape = tuple(data.shape)
            if len(shape) == 4 and shape[1] == 1:
                shape = (shape[0],) + shape[2:]
            if len(shape) != 3:
                raise ValueError(f"{name} must have shape (N, H, W) or (N, 1, H, W), got {tuple(data.shape)}")
            if shape[0] == 0:
                raise ValueError(f"{name} is empty")
            self.n, self.shape = shape[0], shape[1:]
        self.pixels_per_image = int(np.prod(self.shape))

    def _squeeze(self, a: np.ndarray, i: int) -> np.ndarray:
        if a.ndim == 3 and a.shape[0] == 1:
            a = a[0]
        if a.ndim != 2:
            raise ValueError(f"{self.name}[{i}] must have shape (H, W) or (1, H, W), got {a.shape}")
        return a

    def chunk(self, start: int, stop: int) -> np.ndarray:
        """Images ``start:stop`` as a float32 (k, H, W) array."""
        if self._items is not None:
            parts = []
            for i in range(start, stop):
                a = self._squeeze(_to_numpy(self._items[i]), i)
                if a.shape != self.shape:
                    raise ValueError(f"{self.name}[{i}] has shape {a.shape}, expected {self.shape}")
                parts.append(a)
            out = np.stack(parts)
        else:
            out = _to_numpy(self._array[start:stop]).reshape((stop - start,) + tuple(self.shape))
        return out.astype(np.float32, copy=False)


def _stacks(maps, masks, chunk_pixels: int) -> Tuple[_ImageStack, _ImageStack, int]:
    m, g = _ImageStack(maps, "maps"), _ImageStack(masks, "masks")
    if m.n != g.n:
        raise ValueError(f"maps has {m.n} images but masks has {g.n}")
    if tuple(m.shape) != tuple(g.shape):
        raise ValueError(f"maps are {tuple(m.shape)} per image but masks are {tuple(g.shape)}")
    return m, g, max(1, chunk_pixels // m.pixels_per_image)


def _chunks(maps: _ImageStack, masks: _ImageStack, per_chunk: int
            ) -> Iterator[Tuple[int, np.ndarray, np.ndarray]]:
    """(first image index, float32 maps, bool masks) chunk by chunk; raises on NaN / Inf."""
    for start in range(0, maps.n, per_chunk):
        stop = min(maps.n, start + per_chunk)
        m, g = maps.chunk(start, stop), masks.chunk(start, stop)
        for arr, what in ((m, "maps"), (g, "masks")):
            if not np.isfinite(arr).all():
                bad = start + int(np.flatnonzero(~np.isfinite(arr).reshape(len(arr), -1).all(1))[0])
                kind = "NaN" if np.isnan(arr[bad - start]).any() else "Inf"
                raise ValueError(f"{what}[{bad}] contains {kind}; {what} must be finite")
        yield start, m, g >= 0.5
