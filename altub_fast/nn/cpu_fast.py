"""The CPU fast path of the flow models, and what was measured to get there.

What PyTorch offers on a CPU was measured on the shared 2-core AMD EPYC development machine
(interleaved medians of wall time and of process CPU time; ``benchmarks/test_cpu_fast_perf.py``,
README's results) and only what won is kept.

On by default, wherever the implementation switch resolves to "auto" for CPU tensors
(``ALTUB_FAST_IMPL`` unset or "auto", or the model's ``impl="auto"``, and Triton's interpreter
off), for the frozen backbone (:func:`run_backbone`, called by ``FlowModel.extract_features``):

- the input images in channels_last (NHWC) memory format (:func:`backbone_input`). oneDNN then
  keeps every convolution in NHWC instead of reordering each activation into its blocked layout
  and back. The features are handed on in the plain NCHW layout (one copy of each map): the flows
  after the backbone ran 1.11x faster on NCHW features than on NHWC ones (resnet18, batch 8).
- every BatchNorm folded into the convolution that feeds it (:func:`folded_backbone`): the
  backbone is frozen and in eval mode, so ``bn(conv(x))`` is one convolution with scaled weights
  and a bias, and the normalisation pass over each activation disappears. The fold runs on a
  private copy (the module, its state_dict and checkpoints are untouched; the copy costs the
  convolution weights once more in memory: 19 MB for efficientnet_lite0, 45 MB for resnet18's
  three stages), is checked against the unfolded backbone on the first batch it serves (relative
  difference at most 1e-4, else the plain backbone is used and a warning says why), and is rebuilt
  when any backbone parameter or buffer changes (load_state_dict, .to(), in-place edits).

Together, measured on the backbone alone (interleaved medians, 256 px): efficientnet_lite0
1.24x (batch 1) / 1.55x (batch 8), resnet18 1.20x / 1.37x; channels_last alone 1.05-1.31x, the
fold alone 1.05-1.12x. Relative difference of the features: 1e-6.

Under "torch" (the plain reference, the oracle the tests compare with) and "triton" nothing here
applies.

Measured and left out (numbers in README):

- channels_last for the flows' subnet convolutions: the subnet alone gains 1.07x in inference at
  C = 1024 and loses in training (0.76x), and an 8-block flow kept in NHWC end to end (with a
  gather that keeps the layout) ran 0.66-0.90x in inference and 0.62-0.83x in training against
  the NCHW flow (wide_resnet50_2 shapes, batch 4): the convolution backward is slower in NHWC,
  and the channel splits hand the convolutions strided views.
- oneDNN's fused conv + ReLU with prepacked weights in eager mode (the private
  ``torch.ops.mkldnn._convolution_pointwise``, what inductor emits): the subnet's inference
  1.17x at 1024@16x16 and 1.29x at batch 1, but 0.94x at 256@64x64 and 0.86x for 1x1 subnets,
  inference only, and the packed weights go stale when the flow trains on: mixed, left out.
- ``torch.inference_mode`` instead of ``no_grad``: within noise (1.01x), and its outputs cannot
  be updated in place outside it.
- ``torch.compile`` (inductor) is a real gain for the flows and the whole model, but costs from
  half a minute to several minutes of compilation on a small CPU, more than a typical scoring run
  takes; it stays the user's choice: ``model.compile()`` (works for training and inference;
  parameters stay graph inputs). Inductor's freezing (weights folded in as constants, oneDNN
  conv + ReLU fusion with prepacked weights) goes further for inference only, and silently keeps
  the old weights if the model trains on, so it is not switched on here.
- thread settings: torch's default, one thread per physical core, is what one would set.
"""
from __future__ import annotations

import os
import warnings
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .. import functional


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


def backbone_input(images: Tensor, impl: Optional[str] = None) -> Tensor:
    """``images`` (B, 3, H, W) as the backbone should get them: in channels_last where
    :func:`enabled`, else unchanged (same values either way)."""
    if images.dim() == 4 and enabled(images, impl):
        return images.contiguous(memory_format=torch.channels_last)
    return images


# ----------------------------------------------------------------------------- BatchNorm folding
#: Largest relative difference between folded and plain features that is accepted (float32
#: rounding gives ~1e-6; anything larger means the fold changed the function).
FOLD_RTOL = 1e-4
_CACHE_ATTR = "_altub_fast_folded"


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


def _signature(module: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer of ``module`` is replaced, moved or edited in place."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device.type)
                 for t in (*module.parameters(), *module.buffers()))


def _max_rel_diff(a, b) -> float:
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


def foldable(module: nn.Module) -> bool:
    """Folding applies to a frozen module in eval mode: no parameter trains and no BatchNorm
    updates its running statistics."""
    return not module.training and not any(p.requires_grad for p in module.parameters())


def folded_backbone(module: nn.Module, probe: Tensor) -> nn.Module:
    """``module`` with every BatchNorm folded into the convolution feeding it: a cached copy,
    checked against ``module`` on ``probe`` (one image is enough) when built. ``module`` itself
    where nothing folds, where the check fails (with a warning) or where :func:`foldable` is False.
    """
    if not foldable(module):
        return module
    sig = _signature(module)
    cached = module.__dict__.get(_CACHE_ATTR)
    if cached is not None and cached[0] == sig:
        return cached[1]
    import copy

    probe = probe[:1]
    result = module
    pairs = _conv_bn_pairs(module, probe)
    module.__dict__.pop(_CACHE_ATTR, None)   # never copy an old twin into the new one
    if pairs:
        twin = copy.deepcopy(module)
        index = {id(m): m2 for m, m2 in zip(module.modules(), twin.modules())}
        for conv, bn in pairs:
            _fold(index[id(conv)], index[id(bn)])
        with torch.no_grad():
            diff = _max_rel_diff(twin(probe), module(probe))
        if diff <= FOLD_RTOL:
            result = twin
        else:
            warnings.warn(f"the CPU fast path did not fold {type(module).__name__}'s BatchNorms: the folded "
                          f"backbone differed from the plain one by {diff:.2e} relative (limit {FOLD_RTOL:g}); "
                          "the plain backbone is used", RuntimeWarning)
    # stored outside the module tree: not a submodule, not in state_dict(), not moved by .to()
    module.__dict__[_CACHE_ATTR] = (sig, result)
    return result


def run_backbone(backbone: nn.Module, images: Tensor, impl: Optional[str] = None):
    """The frozen backbone's forward on ``images`` as the CPU fast path runs it where
    :func:`enabled` (channels_last input, BatchNorms folded, features back in NCHW), else the plain
    ``backbone(images)``."""
    if images.dim() == 4 and enabled(images, impl):
        images = images.contiguous(memory_format=torch.channels_last)
        feats = folded_backbone(backbone, images)(images)
        if torch.is_tensor(feats):
            return feats.contiguous()
        return type(feats)(f.contiguous() if torch.is_tensor(f) else f for f in feats)
    return backbone(images)
