"""Which implementation serves a call: the one place that decides.

The switch is ``ALTUB_FAST_IMPL`` (auto | triton | torch), overridable per call, or per module
with its ``impl`` attribute. :func:`choose` answers, for the tensors of a call:

- "triton": the Triton kernels (``altub_fast.ops``) can run on these tensors (CUDA, or CPU under
  ``TRITON_INTERPRET=1``; a dtype the kernels take; Triton importable) and ``impl`` is "auto" or
  "triton". Under "triton" a call they cannot serve is a RuntimeError saying why
  (:func:`unavailable_reason`).
- "cpu_fast": the CPU fast path of ``altub_fast.nn.cpu_fast`` (folded backbone, packed subnet
  convolutions): every tensor is on the CPU, ``impl`` is "auto", Triton's interpreter is off and
  nothing is tracing the call (torch.compile, torch.export, TorchScript choose their own layouts).
  For a fused op this means the plain reference.
- "torch": the plain PyTorch reference (``altub_fast.reference``), the oracle the tests compare with.

:func:`resolve_impl` is the two-way answer the fused ops need ("triton" or "torch", no CPU fast
path), :func:`cpu_fast_applies` the yes/no the CPU fast path needs. :func:`check_kernel_tensors`
is what the kernels' launchers check about devices, dtypes and the interpreter before they
launch; :func:`use_plain_path` puts a whole model on "torch" (export).

Nothing here imports Triton at module import time (only :func:`unavailable_reason` tries to).
"""
from __future__ import annotations

import os
from typing import Callable, Iterable, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

IMPLS = ("auto", "triton", "torch")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON, TORCH, CPU_FAST = "triton", "torch", "cpu_fast"


def default_impl() -> str:
    """``ALTUB_FAST_IMPL`` (default "auto"), checked."""
    impl = os.environ.get("ALTUB_FAST_IMPL", "auto").strip().lower() or "auto"
    if impl not in IMPLS:
        raise ValueError(f"ALTUB_FAST_IMPL must be one of {IMPLS}, got {impl!r}")
    return impl


def requested(impl: Optional[str]) -> str:
    """``impl`` normalised ("auto", "triton" or "torch"); None means :func:`default_impl`."""
    if impl is None:
        return default_impl()
    which = str(impl).strip().lower()
    if which not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return which


def interpreter() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set now (the kernels themselves are built for the
    interpreter or not once, when Triton first decorates them; see ``ops.coupling.interpreter_active``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tracing() -> bool:
    """Whether torch.compile, torch.export or TorchScript is tracing the current call."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()


def unavailable_reason(*tensors: Tensor) -> Optional[str]:
    """None if the Triton kernels can run on these tensors, else a sentence saying why not."""
    if not tensors:
        raise ValueError("unavailable_reason needs at least one tensor")
    t = tensors[0]
    if t.device.type == "cuda":
        pass
    elif t.device.type == "cpu":
        if not interpreter():
            return ("the tensors are on the CPU and TRITON_INTERPRET=1 is not set (set it before "
                    "triton is imported to run the kernels in Triton's interpreter)")
    else:
        return f"the Triton kernels run on CUDA (or CPU under TRITON_INTERPRET=1), not on {t.device.type}"
    if any(x.device != t.device for x in tensors):
        return "the tensors are on different devices: " + ", ".join(sorted({str(x.device) for x in tensors}))
    for x in tensors:
        if x.dtype not in KERNEL_DTYPES:
            return f"the kernels take float32, float16 and bfloat16, not {x.dtype}"
        if x.device.type == "cpu" and x.dtype == torch.bfloat16:
            return "Triton's interpreter cannot do bfloat16 arithmetic (bfloat16 runs on CUDA only)"
    if not hasattr(torch.library, "custom_op"):
        return f"the kernels' autograd needs torch >= 2.4 (torch.library.custom_op); this is torch {torch.__version__}"
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"triton cannot be imported ({type(e).__name__}: {e})"
    return None


def resolve_impl(impl: Optional[str], *tensors: Tensor) -> str:
    """"triton" or "torch" for a fused op's call (the op has no CPU fast path of its own)."""
    which = requested(impl)
    if which == TORCH:
        return TORCH
    reason = unavailable_reason(*tensors)
    if reason is None:
        return TRITON
    if which == TRITON:
        raise RuntimeError(f"impl='triton' was asked for but cannot run: {reason}")
    return TORCH


def _cpu_fast(tensors: Tuple[Tensor, ...], which: str) -> bool:
    if not tensors:
        raise ValueError("choose needs at least one tensor")
    return (which == "auto" and all(t.device.type == "cpu" for t in tensors) and not interpreter()
            and not tracing())


def choose(*tensors: Tensor, impl: Optional[str] = None) -> str:
    """"triton", "torch" or "cpu_fast" for a call on ``tensors`` (see the module docstring)."""
    which = requested(impl)
    if _cpu_fast(tensors, which):
        return CPU_FAST
    return resolve_impl(which, *tensors)


def cpu_fast_applies(*tensors: Tensor, impl: Optional[str] = None) -> bool:
    """Whether :func:`choose` answers "cpu_fast", asked without resolving Triton: no import of
    Triton, and False (not the RuntimeError) for an ``impl="triton"`` the tensors cannot take.
    What the CPU fast path itself asks before it runs."""
    return _cpu_fast(tensors, requested(impl))


def check_kernel_tensors(named: Iterable[Tuple[str, Tensor]], data: Iterable[Tuple[str, Tensor]],
                         kernels_interpreted: Callable[[], bool], what: str) -> None:
    """What a kernel launcher needs of its tensors beyond their shapes, as clear errors:
    ``data`` (the tensors the kernels compute on, e.g. x and a) in a dtype the kernels take, every
    tensor of ``named`` (data included) on one device, that device CUDA or the CPU with
    ``kernels_interpreted()`` true (the kernels were built for Triton's interpreter), and no
    bfloat16 data on the CPU. ``what`` names the kernels in the messages ("coupling")."""
    named, data = list(named), list(data)
    for name, t in data:
        if t.dtype not in KERNEL_DTYPES:
            raise TypeError(f"the {what} kernels take float32, float16 and bfloat16; {name} is {t.dtype}")
    devs = {t.device for _, t in named}
    if len(devs) > 1:
        raise ValueError("all tensors must be on one device, got " +
                         ", ".join(f"{n}: {t.device}" for n, t in named))
    dev = named[0][1].device
    if dev.type == "cpu":
        if not kernels_interpreted():
            raise RuntimeError(
                f"the Triton {what} kernels got CPU tensors but were not built for Triton's "
                "interpreter: set TRITON_INTERPRET=1 before triton is first imported (or use the "
                "reference, impl='torch')")
        if any(t.dtype == torch.bfloat16 for _, t in data):
            raise TypeError("Triton's interpreter cannot do bfloat16 arithmetic (bfloat16 runs on CUDA only)")
    elif dev.type != "cuda":
        raise RuntimeError(f"the Triton {what} kernels run on CUDA (or CPU under TRITON_INTERPRET=1), "
                           f"not on {dev.type}")


def use_plain_path(module: nn.Module) -> nn.Module:
    """Put ``module`` and every submodule with an ``impl`` attribute on the plain PyTorch path
    (``impl = "torch"``: no Triton, no CPU fast path), e.g. before export; returns ``module``."""
    for sub in module.modules():
        if hasattr(sub, "impl"):
            sub.impl = TORCH
    return module
