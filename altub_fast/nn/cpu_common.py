"""What the CPU fast path's two mechanisms (:mod:`.cpu_fold`, :mod:`.cpu_pack`) share: the switch
that says whether the path applies, the signature that tells a cache entry is stale, and the check
of a fast result against the plain one. The path itself: :mod:`altub_fast.nn.cpu_fast` and
``docs/cpu_fast.md``."""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from .. import functional

#: Largest relative difference between a fast result (folded features, packed subnet output) and
#: the plain one that is accepted (float32 rounding gives ~1e-6; anything larger means the fast
#: path changed the function).
FOLD_RTOL = 1e-4


def enabled(x: Tensor, impl: Optional[str] = None) -> bool:
    """Whether the CPU fast path applies to tensor ``x``: it is on the CPU and the implementation
    (``impl``, else ``ALTUB_FAST_IMPL``) is "auto" with Triton's interpreter off. Not while
    torch.compile, torch.export or TorchScript trace the call (they choose their own layouts)."""
    which = functional.default_impl() if impl is None else str(impl).strip().lower()
    if which not in functional.IMPLS:
        raise ValueError(f"impl must be one of {functional.IMPLS}, got {impl!r}")
    if which != "auto" or x.device.type != "cpu":
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    return os.environ.get("TRITON_INTERPRET", "0") != "1"


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
