"""The CPU fast path of the flow models, and what was measured to get there.

What PyTorch offers on a CPU was measured on the shared 2-core AMD EPYC development machine
(interleaved medians of wall time and of process CPU time; ``benchmarks/cpu_fast_options.py``,
``benchmarks/test_block_perf.py``, ``benchmarks/test_fastflow_perf.py``; numbers in README and
``benchmarks/results/cpu_fast_*``) and only what won is kept.

On by default wherever the implementation switch resolves to "auto" for CPU tensors
(``ALTUB_FAST_IMPL`` unset or "auto", or the model's ``impl="auto"``, and Triton's interpreter
off). Under "torch" (the plain reference, the oracle the tests compare with) and "triton"
nothing here applies, nor while torch.compile, torch.export or TorchScript trace.

The frozen backbone (:func:`run_backbone`, called by ``FlowModel.extract_features``):

- input images in channels_last (NHWC) memory format: oneDNN keeps every
  convolution in NHWC instead of reordering each activation into its blocked layout and back.
  The features are handed on in NCHW (one copy of each map): the flows after the backbone ran
  1.11x faster on NCHW features than on NHWC ones (resnet18, batch 8).
- every BatchNorm folded into the convolution feeding it (:func:`folded_backbone`): the backbone
  is frozen and in eval mode, so ``bn(conv(x))`` is one convolution with scaled weights and a
  bias. The fold runs on a private copy (the module, its state_dict and checkpoints are
  untouched; the copy costs the convolution weights once more in memory: 19 MB for
  efficientnet_lite0, 45 MB for resnet18's three stages), is checked against the unfolded
  backbone on the first batch it serves (relative difference at most 1e-4, else the plain
  backbone runs and a warning says why), and is rebuilt when any backbone parameter or buffer
  changes (load_state_dict, .to(), in-place edits).

  Backbone alone, 256 px: efficientnet_lite0 1.59x (batch 1) / 1.57x (batch 8), resnet18 1.22x /
  1.41x; channels_last alone 1.19-1.44x, the fold alone 1.05-1.32x; features within 1.5e-6
  relative.

The flows' subnets in inference (:func:`run_subnet`, called by ``AllInOneBlock``; no gradient
recorded, float32, no autocast): an nn.Sequential subnet's convolutions larger than 1x1 with at
least :data:`PACK_MIN_CHANNELS` (256) input channels run as oneDNN convolutions with prepacked
weights and the following ReLU fused in (``torch.ops.mkldnn._convolution_pointwise``, the private
op inductor's CPU backend emits; if it is missing or fails, the plain subnet runs). Eager
convolutions reorder their weights into oneDNN's blocked layout on every call; at 512 x 512 x 3 x 3
weights that is a real share of a 16x16 convolution. Packs are cached per input shape, rebuilt
when a weight changes (a flow that trains on is never stale) and checked against the plain subnet
on their first input. Subnet alone: 1.17-1.30x at 1024@16x16 (1.33x at batch 1), 1.10-1.11x at
512@32x32; 0.89-1.06x at 128 input channels and fewer, hence the threshold (wide_resnet50_2's 512
and 1024 channel scales pack; resnet18, efficientnet_lite0 and wide_resnet50_2's 256 channels do
not). 8-block flow at 1024@16x16, batch 4, against FrEIA 0.2: 1.38x in inference (21 interleaved
rounds; 1.19x without the packing).

Measured and left out:

- channels_last for the flows' subnet convolutions: the subnet alone gains 1.04-1.12x in
  inference and loses in training (0.76x), and an 8-block flow kept in NHWC end to end (with a
  gather that keeps the layout) ran 0.66-0.90x in inference and 0.62-0.83x in training against
  the NCHW flow (wide_resnet50_2 shapes, batch 4): the convolution backward is slower in NHWC,
  and the channel splits hand the convolutions strided views.
- ``torch.inference_mode`` instead of ``no_grad``: within noise (1.01x), and its outputs cannot
  be updated in place outside it.
- ``torch.compile`` (inductor) of the reference flows: 0.85-0.92x the eager reference for one
  block at 1024@8x8 (``pytest --benchmark-only``) and 1.00x for 8 blocks at 1024@16x16, after
  half a minute to minutes of compilation on a small CPU: it stays the user's choice
  (``model.compile()``; parameters stay graph inputs, so it trains too). Inductor's freezing
  (weights as constants) was not measured: it silently keeps the old weights if the model trains on.
- thread settings were not varied: torch's default (one thread per core) is used; the long
  studies pin one thread because they share the machine.
"""
from __future__ import annotations

import os
import warnings
import weakref
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


# ----------------------------------------------------------------------------- BatchNorm folding
#: Largest relative difference between folded and plain features that is accepted (float32
#: rounding gives ~1e-6; anything larger means the fold changed the function).
FOLD_RTOL = 1e-4
#: backbone -> (signature, folded copy or None for "use the backbone itself"). Held outside the
#: modules (not a submodule, not in state_dict(), not copied by deepcopy or pickled with them) and
#: weakly: a cache entry dies with its module.
_FOLDS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


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
    cached = _FOLDS.get(module)
    if cached is not None and cached[0] == sig:
        return module if cached[1] is None else cached[1]
    import copy

    probe = probe[:1]
    result = None
    pairs = _conv_bn_pairs(module, probe)
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
    _FOLDS[module] = (sig, result)
    return module if result is None else result


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


# ----------------------------------------------------------------------------- packed subnets
#: subnet -> (signature, input shape or "refused", packed steps or None for "run it plain"); held
#: as :data:`_FOLDS` is (oneDNN's packed weights are not picklable, so never in the module).
_PACKS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _pointwise_ops():
    """oneDNN's fused convolution (+ ReLU) and its weight packing, or None where this torch lacks
    them (they are the private ops inductor's CPU backend emits)."""
    pw = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)
    reorder = getattr(torch._C._nn, "mkldnn_reorder_conv2d_weight", None)
    if pw is None or reorder is None or not torch.backends.mkldnn.is_available():
        return None
    return pw, reorder


#: Smallest input channel count (per group) of a convolution that is packed. Measured (subnet
#: inference, interleaved): 1.10-1.33x from 256 input channels up (wide_resnet50_2's 512 and 1024
#: channel scales), 0.89-1.06x at 128 and fewer (resnet18, efficientnet_lite0, wide_resnet50_2's
#: 256 channels), where oneDNN's packed path loses to PyTorch's default choice of algorithm.
PACK_MIN_CHANNELS = 256


def _packable_conv(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str)
            and m.weight.dtype == torch.float32 and tuple(m.kernel_size) != (1, 1)
            and m.in_channels // m.groups >= PACK_MIN_CHANNELS)


def _pack_steps(subnet: nn.Module, shape) -> Optional[list]:
    """The subnet as a list of steps: ("conv", packed weight, bias, conv, fused relu) for each 2-D
    convolution :func:`_packable_conv` accepts (with the ReLU after it fused in), ("module", m) for
    the rest. None when the subnet is not an nn.Sequential or holds nothing to pack."""
    ops = _pointwise_ops()
    if ops is None or not isinstance(subnet, nn.Sequential):
        return None
    _, reorder = ops
    children = list(subnet)
    steps, i, packed, shape = [], 0, 0, tuple(shape)
    with torch.no_grad():
        while i < len(children):
            m = children[i]
            if _packable_conv(m) and len(shape) == 4:
                relu = i + 1 < len(children) and type(children[i + 1]) is nn.ReLU
                w = reorder(m.weight.detach().to_mkldnn(), list(m.padding), list(m.stride), list(m.dilation),
                            m.groups, list(shape))
                steps.append(("conv", w, m.bias, m, relu))
                packed += 1
                i += 2 if relu else 1
            else:
                steps.append(("module", m))
                i += 1
            # the next convolution's input shape (a hint for oneDNN's weight layout; other modules
            # are taken to keep the shape, and the check in run_subnet guards the result)
            if isinstance(m, nn.Conv2d) and len(shape) == 4 and not isinstance(m.padding, str):
                out_hw = [(size + 2 * p - d * (k - 1) - 1) // st + 1 for size, p, d, k, st in
                          zip(shape[2:], m.padding, m.dilation, m.kernel_size, m.stride)]
                shape = (shape[0], m.out_channels, *out_hw)
    return steps if packed else None


def _run_steps(steps: list, x: Tensor) -> Tensor:
    pw, _ = _pointwise_ops()
    for step in steps:
        if step[0] == "conv":
            _, w, b, m, relu = step
            x = pw(x, w, b, list(m.padding), list(m.stride), list(m.dilation), m.groups,
                   "relu" if relu else "none", [], "")
        else:
            x = step[1](x)
    return x


def packs(x: Tensor, impl: Optional[str] = None) -> bool:
    """Whether a subnet call on ``x`` takes the packed path: the CPU fast path applies, no
    gradient is being recorded, float32 and no autocast."""
    return (not torch.is_grad_enabled() and x.dtype == torch.float32 and x.dim() == 4
            and not torch.is_autocast_enabled("cpu") and enabled(x, impl))


def run_subnet(subnet: nn.Module, x: Tensor, impl: Optional[str] = None) -> Tensor:
    """``subnet(x)``; in inference on the CPU fast path (:func:`packs`) an nn.Sequential subnet's
    convolutions larger than 1x1 with at least :data:`PACK_MIN_CHANNELS` input channels run as
    oneDNN convolutions with prepacked weights and the ReLU
    after them fused in. The packed weights are cached per input shape and rebuilt when any
    parameter changes; each new pack is checked against the plain subnet on its first input
    (relative difference at most :data:`FOLD_RTOL`), else the plain subnet runs from then on and a
    warning says why."""
    if not packs(x, impl):
        return subnet(x)
    sig = _signature(subnet)
    cached = _PACKS.get(subnet)
    if cached is not None and cached[0] == sig and cached[1] in (tuple(x.shape), "refused"):
        return subnet(x) if cached[2] is None else _run_steps(cached[2], x)
    try:
        steps = _pack_steps(subnet, x.shape)
        out = None if steps is None else _run_steps(steps, x)
    except Exception as e:  # a torch whose private oneDNN ops changed: plain from now on
        warnings.warn(f"the CPU fast path could not pack {type(subnet).__name__}'s convolutions "
                      f"({type(e).__name__}: {e}); the plain subnet is used", RuntimeWarning)
        _PACKS[subnet] = (sig, "refused", None)
        return subnet(x)
    plain = subnet(x)
    if steps is not None:
        diff = _max_rel_diff(out, plain)
        if diff > FOLD_RTOL:
            warnings.warn(f"the CPU fast path's packed convolutions differed from the plain subnet by {diff:.2e} "
                          f"relative (limit {FOLD_RTOL:g}); the plain subnet is used", RuntimeWarning)
            _PACKS[subnet] = (sig, "refused", None)
            return plain
    _PACKS[subnet] = (sig, tuple(x.shape), steps)
    return plain
