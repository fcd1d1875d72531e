"""Reading ahead: image files decoded and resized on worker threads while the model scores.

    for start, batch in read_ahead(files, scorer.image_size, batch_size=16, workers=2,
                                   normalise=scorer.input_normalised):
        maps, scores = scorer.score(batch.images)      # the next batches are being read meanwhile

Each file is one task on a thread pool (PIL decodes and resizes with the GIL released, and the
runtimes release it while they compute, so threads overlap). Batches come out in file order.
At most ``(workers + 1) * batch_size`` files are read but not yet handed out, so memory does not
grow with the number of files: a folder of any size streams through. ``workers=0`` reads each
batch in the calling thread, when it is asked for (no overlap).
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence, Tuple

from .images import ImageBatch, stack_batch, try_read_image

__all__ = ["read_ahead", "DEFAULT_WORKERS"]

DEFAULT_WORKERS = 2


def read_ahead(files: Sequence[str], size_hw: Tuple[int, int], *, batch_size: int, workers: int = DEFAULT_WORKERS,
               normalise: bool = True) -> Iterator[Tuple[int, ImageBatch]]:
    """(position of the batch's first file, :class:`ImageBatch` of ``files[start:start + batch_size]``)
    for every batch, in order (see the module docstring). ``normalise``: as
    :func:`~altub_fast.inference.images.read_images`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be 0 or more, got {workers}")
    size_hw = (int(size_hw[0]), int(size_hw[1]))
    starts = range(0, len(files), batch_size)
    if workers == 0:
        for s in starts:
            yield s, stack_batch([try_read_image(f, size_hw, normalise) for f in files[s:s + batch_size]], size_hw)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="altub_fast-read") as pool:
        pending: deque = deque()
        queued = iter(starts)

        def submit_next() -> None:
            s = next(queued, None)
            if s is not None:
                pending.append((s, [pool.submit(try_read_image, f, size_hw, normalise)
                                    for f in files[s:s + batch_size]]))

        for _ in range(workers + 1):
            submit_next()
        try:
            while pending:
                s, futures = pending.popleft()
                submit_next()
                yield s, stack_batch([f.result() for f in futures], size_hw)
        finally:   # the consumer stopped early (an error, a break): drop what is still queued
            for _, futures in pending:
                for f in futures:
                    f.cancel()
