"""The CPU fast path of the flow models, and what was measured to get there.

What PyTorch offers on a CPU was measured on the shared 2-core AMD EPYC development machine
(interleaved medians of wall time and of process CPU time; ``benchmarks/test_cpu_fast_perf.py``,
README's results) and only what won is kept.

On by default, wherever the implementation switch resolves to "auto" for CPU tensors
(``ALTUB_FAST_IMPL`` unset or "auto", or the model's ``impl="auto"``, and Triton's interpreter
off): the backbone's input images in channels_last (NHWC) memory format
(:func:`backbone_input`, called by ``FlowModel.extract_features``). oneDNN then keeps every
convolution of the frozen backbone in NHWC instead of reordering each activation into its blocked
layout and back: the backbone runs 1.18-1.35x faster for efficientnet_lite0 and resnet18 (batch 1
and 8 at 256 px), 1.02-1.05x for wide_resnet50_2, with the same numbers (max abs difference 0,
6e-7 for wide_resnet50_2). The features come out in NHWC strides; everything downstream reads them
by index, so only the strides differ. This serves scoring and the trainer's feature extraction.

Under "torch" (the plain reference, the oracle the tests compare with) and "triton" nothing here
applies.

Measured and left out (numbers in README):

- channels_last for the flows' subnet convolutions (weights and activations): 0.88-1.10x by shape
  in inference, 0.76-0.83x in training. Every block splits, concatenates and gathers channels,
  which hands the next block NCHW again.
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
from typing import Optional

import torch
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
