"""What the CPU fast path's two mechanisms (:mod:`.cpu_fold`, :mod:`.cpu_pack`) share: the switch
that says whether the path applies (the answer of :mod:`altub_fast.backend`, the one place that
decides), the signature that tells a cache entry is stale, and the check of a fast result against
the plain one. The path itself: :mod:`altub_fast.nn.cpu_fast` and ``docs/cpu_fast.md``."""
from __future__ import annotations

from typing import Optional

import torch.nn as nn
from torch import Tensor

from .. import backend

#: Largest relative difference between a fast result (folded features, packed subnet output) and
#: the plain one that is accepted (float32 rounding gives ~1e-6; anything larger means the fast
#: path changed the function).
FOLD_RTOL = 1e-4


def enabled(x: Tensor, impl: Optional[str] = None) -> bool:
    """Whether the CPU fast path applies to tensor ``x``: ``backend.choose(x, impl=impl)`` would be
    "cpu_fast" (``x`` on the CPU, the implementation, ``impl`` else ``ALTUB_FAST_IMPL``, "auto",
    Triton's interpreter off, nothing tracing the call). Asked through
    :func:`altub_fast.backend.cpu_fast_applies`, which does not resolve Triton: an ``impl="triton"``
    that cannot run here is False, not choose()'s RuntimeError."""
    return backend.cpu_fast_applies(x, impl=impl)


def signature(module: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer of ``module`` is replaced, moved or edited in place."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device.type)
                 for t in (*module.parameters(), *module.buffers()))


def max_rel_diff(a, b) -> float:
    """Largest ``max|a - b| / max|b|`` over the tensors of ``a`` and ``b`` (a tensor or a list or
    tuple of them); infinite where their numbers or shapes differ."""
    a = list(a) if isinstance(a, (list, tuple)) else [a]
    b = list(b) if isinstance(b, (list, tuple)) else [b]
    if len(a) != len(b):
        return float("inf")
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return float("inf")
        scale = float(y.abs().max()) or 1.0
        worst = max(worst, float((x - y).abs().max()) / scale)
    return worst
