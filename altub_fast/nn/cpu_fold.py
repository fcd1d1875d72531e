"""The CPU fast path for the frozen backbone: channels_last input and every BatchNorm folded into
the convolution feeding it, on a private copy that is checked against the backbone and rebuilt
when the backbone changes. Why and how much: ``docs/cpu_fast.md``."""
from __future__ import annotations

import copy
import warnings
import weakref
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .cpu_common import FOLD_RTOL, enabled, max_rel_diff, signature


@dataclass(frozen=True, eq=False)
class FoldEntry:
    """What :func:`folded_backbone` decided for a backbone whose parameters and buffers had
    ``signature``: ``folded`` is the folded copy that runs, or None where the backbone itself runs
    (nothing folds, or the folded copy failed its check)."""

    signature: tuple
    folded: Optional[nn.Module]


#: backbone -> its :class:`FoldEntry`. Held outside the modules (not a submodule, not in
#: state_dict(), not copied by deepcopy or pickled with them) and weakly: an entry dies with its
#: module.
_FOLDS: "weakref.WeakKeyDictionary[nn.Module, FoldEntry]" = weakref.WeakKeyDictionary()


def _conv_bn_pairs(module: nn.Module, probe: Tensor) -> List[Tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """(conv, bn) pairs where the BatchNorm's input is exactly that convolution's output in a
    forward of ``probe``. Outputs are kept alive during the probe so no tensor id is reused."""
    produced, pairs, handles = {}, [], []

    def conv_hook(mod, inputs, out):
        produced[id(out)] = (mod, out)

    def bn_hook(mod, inputs, out):
        hit = produced.get(id(inputs[0]))
        if hit is not None and hit[1] is inputs[0]:
            pairs.append((hit[0], mod))

    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_hook(bn_hook))
    try:
        with torch.no_grad():
            module(probe)
    finally:
        for h in handles:
            h.remove()
    # a convolution or a BatchNorm met twice (shared modules) cannot be folded once for all uses
    convs = [c for c, _ in pairs]
    bns = [b for _, b in pairs]
    return [(c, b) for c, b in pairs if convs.count(c) == 1 and bns.count(b) == 1]


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Make ``conv`` compute ``bn(conv(x))`` (eval-mode BatchNorm) and turn ``bn`` into a no-op."""
    with torch.no_grad():
        inv = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            inv = inv * bn.weight.double()
        w = conv.weight.double() * inv.reshape(-1, *([1] * (conv.weight.dim() - 1)))
        b = conv.bias.double() if conv.bias is not None else torch.zeros_like(inv)
        b = (b - bn.running_mean.double()) * inv
        if bn.bias is not None:
            b = b + bn.bias.double()
    dtype = conv.weight.dtype
    conv.weight = nn.Parameter(w.to(dtype), requires_grad=False)
    conv.bias = nn.Parameter(b.to(dtype), requires_grad=False)
    bn.forward = _identity


def _identity(x: Tensor) -> Tensor:
    return x


def foldable(module: nn.Module) -> bool:
    """Folding applies to a frozen module in eval mode: no parameter trains and no BatchNorm
    updates its running statistics."""
    return not module.training and not any(p.requires_grad for p in module.parameters())


def _checked_fold(module: nn.Module, probe: Tensor) -> Optional[nn.Module]:
    """A copy of ``module`` with its BatchNorms folded, if any fold and the copy gives
    ``module``'s numbers on ``probe`` (else None, with a warning where the check failed)."""
    pairs = _conv_bn_pairs(module, probe)
    if not pairs:
        return None
    twin = copy.deepcopy(module)
    index = {id(m): m2 for m, m2 in zip(module.modules(), twin.modules())}
    for conv, bn in pairs:
        _fold(index[id(conv)], index[id(bn)])
    with torch.no_grad():
        diff = max_rel_diff(twin(probe), module(probe))
    if diff <= FOLD_RTOL:
        return twin
    warnings.warn(f"the CPU fast path did not fold {type(module).__name__}'s BatchNorms: the folded "
                  f"backbone differed from the plain one by {diff:.2e} relative (limit {FOLD_RTOL:g}); "
                  "the plain backbone is used", RuntimeWarning)
    return None


def folded_backbone(module: nn.Module, probe: Tensor) -> nn.Module:
    """``module`` with every BatchNorm folded into the convolution feeding it: a cached copy,
    checked against ``module`` on ``probe`` (one image is enough) when built. ``module`` itself
    where nothing folds, where the check fails (with a warning) or where :func:`foldable` is False.
    """
    if not foldable(module):
        return module
    sig = signature(module)
    entry = _FOLDS.get(module)
    if entry is None or entry.signature != sig:
        entry = FoldEntry(sig, _checked_fold(module, probe[:1]))
        _FOLDS[module] = entry
    return module if entry.folded is None else entry.folded


def run_backbone(backbone: nn.Module, images: Tensor, impl: Optional[str] = None):
    """The frozen backbone's forward on ``images`` as the CPU fast path runs it where
    :func:`~.cpu_common.enabled` (channels_last input, BatchNorms folded, features back in NCHW),
    else the plain ``backbone(images)``."""
    if images.dim() == 4 and enabled(images, impl):
        images = images.contiguous(memory_format=torch.channels_last)
        feats = folded_backbone(backbone, images)(images)
        if torch.is_tensor(feats):
            return feats.contiguous()
        return type(feats)(f.contiguous() if torch.is_tensor(f) else f for f in feats)
    return backbone(images)
