"""The CPU fast path for the flows' subnets in inference: an nn.Sequential subnet's wide
convolutions run as oneDNN convolutions with prepacked weights and the following ReLU fused in
(``torch.ops.mkldnn._convolution_pointwise``, the private op inductor's CPU backend emits). Packs
are cached per input shape, rebuilt when a weight changes and checked against the plain subnet on
their first input. Why and how much: ``docs/cpu_fast.md``."""
from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import List, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from .cpu_common import FOLD_RTOL, enabled, max_rel_diff, signature

#: Smallest input channel count (per group) of a convolution that is packed. Measured (subnet
#: inference, interleaved): 1.10-1.33x from 256 input channels up (wide_resnet50_2's 512 and 1024
#: channel scales), 0.89-1.06x at 128 and fewer (resnet18, efficientnet_lite0, wide_resnet50_2's
#: 256 channels), where oneDNN's packed path loses to PyTorch's default choice of algorithm.
PACK_MIN_CHANNELS = 256


@dataclass(frozen=True, eq=False)
class PackedConv:
    """One step of a packed subnet: ``conv`` with its weight reordered into oneDNN's layout
    (``weight``), its ``bias``, and whether the ReLU after it is fused in."""

    weight: Tensor
    bias: Optional[Tensor]
    conv: nn.Conv2d
    relu: bool


#: A packed subnet: its steps in order, each a :class:`PackedConv` or a module that runs as is.
Steps = List[Union[PackedConv, nn.Module]]


@dataclass(frozen=True, eq=False)
class PackEntry:
    """What :func:`run_subnet` decided for a subnet whose parameters and buffers had ``signature``.
    ``refused``: the packing failed or disagreed with the plain subnet, which runs for every input
    shape from then on. Otherwise ``steps`` are the packs for inputs of ``shape``, or None where
    the subnet holds nothing to pack."""

    signature: tuple
    shape: Optional[tuple] = None
    steps: Optional[Steps] = None
    refused: bool = False

    def serves(self, sig: tuple, shape: tuple) -> bool:
        """Whether this entry still decides for a call with parameters ``sig`` on ``shape``."""
        return self.signature == sig and (self.refused or self.shape == shape)


#: subnet -> its :class:`PackEntry`; held as :data:`.cpu_fold._FOLDS` is (oneDNN's packed weights
#: are not picklable, so never in the module).
_PACKS: "weakref.WeakKeyDictionary[nn.Module, PackEntry]" = weakref.WeakKeyDictionary()


def _pointwise_ops():
    """oneDNN's fused convolution (+ ReLU) and its weight packing, or None where this torch lacks
    them (they are the private ops inductor's CPU backend emits)."""
    pw = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)
    reorder = getattr(torch._C._nn, "mkldnn_reorder_conv2d_weight", None)
    if pw is None or reorder is None or not torch.backends.mkldnn.is_available():
        return None
    return pw, reorder


def _packable_conv(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str)
            and m.weight.dtype == torch.float32 and tuple(m.kernel_size) != (1, 1)
            and m.in_channels // m.groups >= PACK_MIN_CHANNELS)


def _conv_out_shape(m: nn.Module, shape: tuple) -> tuple:
    """The shape after ``m`` of an input of ``shape``: a convolution's output shape, else
    ``shape`` (a hint for oneDNN's weight layout: other modules are taken to keep the shape, and
    the check in :func:`run_subnet` guards the result)."""
    if isinstance(m, nn.Conv2d) and len(shape) == 4 and not isinstance(m.padding, str):
        out_hw = [(size + 2 * p - d * (k - 1) - 1) // st + 1 for size, p, d, k, st in
                  zip(shape[2:], m.padding, m.dilation, m.kernel_size, m.stride)]
        return (shape[0], m.out_channels, *out_hw)
    return shape


def _pack_steps(subnet: nn.Module, shape) -> Optional[Steps]:
    """The subnet as :data:`Steps`: a :class:`PackedConv` for each 2-D convolution
    :func:`_packable_conv` accepts (with the ReLU after it fused in), the module itself for the
    rest. None when the subnet is not an nn.Sequential or holds nothing to pack."""
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
                steps.append(PackedConv(w, m.bias, m, relu))
                packed += 1
                i += 2 if relu else 1
            else:
                steps.append(m)
                i += 1
            shape = _conv_out_shape(m, shape)
    return steps if packed else None


def _run_steps(steps: Steps, x: Tensor) -> Tensor:
    pw, _ = _pointwise_ops()
    for step in steps:
        if isinstance(step, PackedConv):
            m = step.conv
            x = pw(x, step.weight, step.bias, list(m.padding), list(m.stride), list(m.dilation), m.groups,
                   "relu" if step.relu else "none", [], "")
        else:
            x = step(x)
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
    (relative difference at most :data:`~.cpu_common.FOLD_RTOL`), else the plain subnet runs from
    then on and a warning says why."""
    if not packs(x, impl):
        return subnet(x)
    sig = signature(subnet)
    entry = _PACKS.get(subnet)
    if entry is not None and entry.serves(sig, tuple(x.shape)):
        return subnet(x) if entry.steps is None else _run_steps(entry.steps, x)
    try:
        steps = _pack_steps(subnet, x.shape)
        out = None if steps is None else _run_steps(steps, x)
    except Exception as e:  # a torch whose private oneDNN ops changed: plain from now on
        warnings.warn(f"the CPU fast path could not pack {type(subnet).__name__}'s convolutions "
                      f"({type(e).__name__}: {e}); the plain subnet is used", RuntimeWarning)
        _PACKS[subnet] = PackEntry(sig, refused=True)
        return subnet(x)
    plain = subnet(x)
    if steps is not None:
        diff = max_rel_diff(out, plain)
        if diff > FOLD_RTOL:
            warnings.warn(f"the CPU fast path's packed convolutions differed from the plain subnet by {diff:.2e} "
                          f"relative (limit {FOLD_RTOL:g}); the plain subnet is used", RuntimeWarning)
            _PACKS[subnet] = PackEntry(sig, refused=True)
            return plain
    _PACKS[subnet] = PackEntry(sig, tuple(x.shape), steps)
    return plain
