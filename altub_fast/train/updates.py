"""The two updates AltUB alternates (SPEC 2), each with its own optimiser, its all-reduce and its
handling of a non-finite loss.

- :class:`FlowUpdate`, the ordinary update: ``model.step_loss(unit)``, backward, and the flow
  optimiser (Adam) steps theta_flow and theta_base (the base in a parameter group of its own, with
  weight decay 0: decay would pull it back to N(0, I)). Under DDP, DistributedDataParallel
  all-reduces the gradients (``find_unused_parameters`` = ``model.has_unused_parameters``).
- :class:`BaseOnlyUpdate`: ``model.base_only_loss(unit)`` (the flow runs without a graph), the base
  gradients all-reduced explicitly (their mean over ranks), clipped by value, and a separate base
  optimiser (SGD, or Adam; weight decay 0) steps theta_base with lr = ``schedule.lr`` or
  ``schedule.r`` * the flow optimiser's current lr. The flow optimiser and its state are untouched.

Both run the loss under bfloat16 autocast when ``amp`` (CUDA), then every rank agrees whether the
loss is finite (one rank's NaN stops all); only a finite loss steps the optimiser. A non-finite one
goes to the :class:`NonFinitePolicy`: ``"skip"`` logs and skips the update (the trainer counts it),
``"raise"`` raises :class:`NonFiniteLossError` with the model's diagnosis. Which update runs when is
the trainer's schedule (schedule.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor

from ..models.backbones import NonFiniteError
from .cache import autocast
from .distributed import StepModule, all_true, mean_over_ranks
from .schedule import NONFINITE_POLICIES, AltUBSchedule

logger = logging.getLogger(__name__)


class NonFiniteLossError(NonFiniteError):
    """A training loss was NaN or Inf (the message names the epoch and step)."""


class NonFinitePolicy:
    """What happens after a non-finite loss: ``mode`` "skip" (log; the update is skipped) or
    "raise" (:class:`NonFiniteLossError` naming where, the model's ``diagnose_nonfinite(unit)`` and
    the last good checkpoint, which ``last_checkpoint()`` gives, None if none was written)."""

    def __init__(self, mode: str, model, last_checkpoint: Callable[[], Optional[str]] = lambda: None):
        if mode not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {mode!r}")
        self.mode, self.model, self.last_checkpoint = mode, model, last_checkpoint

    def __call__(self, unit: Any, value: float, where: str) -> None:
        if self.mode == "skip":
            logger.warning("non-finite training loss (%s) at %s: update skipped (on_nonfinite='skip')", value, where)
            return
        try:
            diag = self.model.diagnose_nonfinite(unit)
        except Exception as e:  # pragma: no cover - diagnosis must not hide the error
            diag = f"(diagnosis failed: {e})"
        last = self.last_checkpoint()
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been written"
        raise NonFiniteLossError(f"non-finite training loss ({value}) at {where}: {diag}. Nothing was "
                                 f"updated; {kept}. on_nonfinite='skip' skips such updates instead.")


@dataclass
class UpdateResult:
    loss: float                      # NaN when skipped
    skipped: bool                    # the loss was not finite (on some rank): nothing was updated
    z: List[Optional[Tensor]]        # the flow's outputs per scale (None where a unit has none)


class _Update:
    """One update on one unit: the loss (under autocast), its gradients, a step if the loss is
    finite on every rank. Subclasses give ``_loss``, ``_gradients`` and ``_apply``."""

    def __init__(self, model, optimizer: torch.optim.Optimizer, *, world_size: int, device: torch.device,
                 amp: bool, nonfinite: NonFinitePolicy):
        self.model, self.optimizer = model, optimizer
        self.world_size, self.device, self.amp = world_size, device, amp
        self.nonfinite = nonfinite

    def __call__(self, unit: Any, where: str) -> UpdateResult:
        """Update on ``unit`` (an item of ``model.training_units``); ``where`` ("epoch e, step s")
        names it if the loss is not finite."""
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.amp):
            loss, zs = self._loss(unit)
        self._gradients(loss)
        finite = all_true(bool(torch.isfinite(loss.detach())), self.world_size, self.device)
        if finite:
            self._apply()
        self.optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if not finite:
            self.nonfinite(unit, value, where)
        return UpdateResult(value if finite else float("nan"), not finite, zs)

    def _loss(self, unit) -> Tuple[Tensor, List[Optional[Tensor]]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _gradients(self, loss: Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _apply(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class FlowUpdate(_Update):
    """The ordinary update (see the module docstring): Adam with ``lr`` on the flow (weight decay
    ``weight_decay``) and the base (weight decay 0); DDP when ``world_size`` > 1 (``ddp``)."""

    def __init__(self, model, *, lr: float, weight_decay: float, world_size: int = 1,
                 device: torch.device = torch.device("cpu"), amp: bool = False, nonfinite: NonFinitePolicy):
        groups = [{"params": list(model.flow_parameters()), "weight_decay": weight_decay, "name": "flow"}]
        base = list(model.base_parameters())
        if base:
            groups.append({"params": base, "weight_decay": 0.0, "name": "base"})
        super().__init__(model, torch.optim.Adam(groups, lr=lr), world_size=world_size, device=device, amp=amp,
                         nonfinite=nonfinite)
        self.step_module = StepModule(model)
        self.ddp = None
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [device.index] if device.type == "cuda" else None
            self.ddp = DDP(self.step_module, device_ids=ids, broadcast_buffers=False,
                           find_unused_parameters=bool(model.has_unused_parameters))

    @property
    def lr(self) -> float:
        """The flow optimiser's current learning rate."""
        return float(self.optimizer.param_groups[0]["lr"])

    def _loss(self, unit):
        return (self.ddp if self.ddp is not None else self.step_module)(unit)

    def _gradients(self, loss: Tensor) -> None:
        loss.backward()   # always, so that DDP's reducer sees every forward matched

    def _apply(self) -> None:
        self.optimizer.step()


class BaseOnlyUpdate(_Update):
    """The base-only update (see the module docstring). ``flow_lr()``: the flow optimiser's current
    lr, which the base lr follows unless ``schedule.lr`` is set."""

    def __init__(self, model, schedule: AltUBSchedule, flow_lr: Callable[[], float], *, world_size: int = 1,
                 device: torch.device = torch.device("cpu"), amp: bool = False, nonfinite: NonFinitePolicy):
        self.params = list(model.base_parameters())
        if not self.params:
            raise ValueError("a base-only update needs a learnable base (altub=True)")
        self.schedule, self.flow_lr = schedule, flow_lr
        if schedule.optimizer.lower() == "sgd":
            optimizer = torch.optim.SGD(self.params, lr=self.lr, momentum=0.0, weight_decay=0.0)
        else:
            optimizer = torch.optim.Adam(self.params, lr=self.lr, weight_decay=0.0)
        super().__init__(model, optimizer, world_size=world_size, device=device, amp=amp, nonfinite=nonfinite)
        self._grads: Optional[Tuple[Optional[Tensor], ...]] = None

    @property
    def lr(self) -> float:
        """The base optimiser's learning rate for the next step."""
        return self.schedule.lr if self.schedule.lr is not None else self.schedule.r * self.flow_lr()

    def _loss(self, unit):
        return self.model.base_only_loss(unit)

    def _gradients(self, loss: Tensor) -> None:
        self._grads = torch.autograd.grad(loss, self.params, allow_unused=True)

    def _apply(self) -> None:
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, self._grads)]
        self._grads = None
        for p, g in zip(self.params, mean_over_ranks(grads, self.world_size)):
            p.grad = g.reshape(p.shape).to(p.dtype)
        if self.schedule.clip_value is not None:
            torch.nn.utils.clip_grad_value_(self.params, self.schedule.clip_value)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.optimizer.step()
