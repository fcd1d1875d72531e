"""What AltUBFastflow and AltUBCflow share: the AltUB schedule in a Lightning training step.

:class:`AltUBTraining` is a mixin for an anomalib ``AnomalibModule`` whose ``self.model`` has
``flow_parameters()`` and ``base_parameters()``. It turns on Lightning's manual optimisation and
runs each update as altub_fast's trainer does (``altub_fast.train.trainer``, SPEC 2):

- an ordinary update: Adam over the flow parameters (anomalib's weight decay) and the base
  parameters (no weight decay), on the model's loss;
- a base-only update, when ``schedule.is_base_only(counter)`` (counter = updates so far, or the
  epoch with ``unit="epoch"``): the flow runs without a graph, only mu and log sigma get
  gradients, clipped by value (``clip_value``), and the base optimiser (SGD by default) steps at
  ``schedule.lr`` or ``schedule.r`` times the flow optimiser's current learning rate.

With ``altub=False`` (or ``k=0``) there is one Adam optimiser and every update is ordinary.
The counters (``altub_updates``, ``base_only_updates``) travel in Lightning checkpoints under
``"altub_fast"``. Exports (``to_onnx``, ``to_openvino``, ``to_torch``) trace the plain PyTorch path
of every block (``impl="torch"``: no Triton, no custom op), restored afterwards.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, Iterator, List, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from ...models import NonFiniteError
from ...train.schedule import AltUBSchedule

ScheduleLike = Union[AltUBSchedule, Mapping, None]


def resolve_schedule(schedule: ScheduleLike = None, k: Optional[int] = None, r: Optional[float] = None,
                     base_lr: Optional[float] = None, warmup: Optional[int] = None) -> AltUBSchedule:
    """The AltUBSchedule from ``schedule`` (an AltUBSchedule, a dict of its fields, or None for the
    defaults) with ``k``, ``r``, ``base_lr`` (the schedule's ``lr``) and ``warmup`` overriding it
    where they are not None."""
    if schedule is None:
        fields = {}
    elif isinstance(schedule, AltUBSchedule):
        fields = dataclasses.asdict(schedule)
    elif isinstance(schedule, Mapping):
        fields = dict(schedule)
        known = {f.name for f in dataclasses.fields(AltUBSchedule)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown AltUB schedule field(s) {unknown}; the fields are {sorted(known)}")
    else:
        raise TypeError(f"schedule must be an AltUBSchedule, a dict of its fields or None, "
                        f"got {type(schedule).__name__}")
    for name, value in (("k", k), ("r", r), ("lr", base_lr), ("warmup", warmup)):
        if value is not None:
            fields[name] = value
    return AltUBSchedule(**fields)


@contextlib.contextmanager
def plain_path(module: nn.Module) -> Iterator[nn.Module]:
    """Every submodule with an ``impl`` attribute (altub_fast's blocks) runs ``impl="torch"`` inside."""
    saved = [(m, m.impl) for m in module.modules() if hasattr(m, "impl")]
    try:
        for m, _ in saved:
            m.impl = "torch"
        yield module
    finally:
        for m, impl in saved:
            m.impl = impl


def per_dim_base_loglik(z: Tensor, base: nn.Module, dim: int = 1) -> Tensor:
    """Mean over channels (axis ``dim``) of log N(z; mu, sigma) without the -0.5 log(2 pi) constant:
    -0.5 * mean(((z - mu) / sigma)^2) - mean(log sigma). At mu = 0, sigma = 1 it is bit for bit
    anomalib's ``-mean(z**2) * 0.5`` (subtracting and dividing by exact zeros and ones)."""
    view = [1] * z.dim()
    view[dim] = -1
    u = (z - base.mu.view(view)) / torch.exp(base.log_sigma.view(view))
    return -torch.mean(u ** 2, dim=dim, keepdim=True) * 0.5 - base.log_sigma.mean()


class AltUBTraining:
    """Mixin (before the anomalib model class in the bases): AltUB's alternating updates in a
    manual-optimisation Lightning module. Call :meth:`_setup_altub` in ``__init__``."""

    model: nn.Module

    def _setup_altub(self, altub: bool, schedule: AltUBSchedule, lr: float, weight_decay: float) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.altub = bool(altub)
        self.schedule = schedule
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.automatic_optimization = False
        self.altub_updates = 0        # updates attempted (ordinary + base-only): the step counter
        self.base_only_updates = 0

    @property
    def alternates(self) -> bool:
        """True when some updates are base-only (altub=True and k > 0)."""
        return self.altub and self.schedule.k > 0 and bool(self.model.base_parameters())

    def configure_optimizers(self):
        """Adam over the flow (weight decay) and the base (none); with alternation, also the base
        optimiser of the schedule (its learning rate is set at every base-only update)."""
        groups = [{"params": self.model.flow_parameters(), "weight_decay": self.weight_decay, "name": "flow"}]
        base = self.model.base_parameters()
        if base:
            groups.append({"params": base, "weight_decay": 0.0, "name": "base"})
        flow_opt = torch.optim.Adam(groups, lr=self.lr)
        if not self.alternates:
            return flow_opt
        base_lr = self.schedule.lr if self.schedule.lr is not None else self.schedule.r * self.lr
        if self.schedule.optimizer.lower() == "sgd":
            base_opt = torch.optim.SGD(base, lr=base_lr, momentum=0.0, weight_decay=0.0)
        else:
            base_opt = torch.optim.Adam(base, lr=base_lr, weight_decay=0.0)
        return [flow_opt, base_opt]

    def _optimizer_list(self) -> List[Any]:
        opts = self.optimizers()
        return list(opts) if isinstance(opts, (list, tuple)) else [opts]

    def next_update_is_base_only(self) -> bool:
        """The schedule's decision for the next update (1-based counter, or the 1-based epoch)."""
        if not self.alternates:
            return False
        unit = self.schedule.unit
        return self.schedule.is_base_only(self.current_epoch + 1 if unit == "epoch" else self.altub_updates + 1)

    def altub_update(self, flow_loss: Callable[[], Tensor], base_loss: Callable[[], Tensor]) -> Tensor:
        """One update: ``base_loss()`` on a base-only update, else ``flow_loss()``; returns the loss."""
        base_only = self.next_update_is_base_only()
        self.altub_updates += 1
        opts = self._optimizer_list()
        opt = opts[1] if base_only else opts[0]
        loss = base_loss() if base_only else flow_loss()
        if not bool(torch.isfinite(loss.detach())):
            kind = "base-only" if base_only else "ordinary"
            raise NonFiniteError(f"non-finite training loss ({float(loss.detach())}) at {kind} update "
                                 f"{self.altub_updates} (epoch {self.current_epoch + 1}); nothing was updated")
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if base_only:
            params = self.model.base_parameters()
            if self.schedule.clip_value is not None:
                torch.nn.utils.clip_grad_value_(params, self.schedule.clip_value)
            flow_lr = opts[0].param_groups[0]["lr"]
            for group in opt.param_groups:
                group["lr"] = self.schedule.lr if self.schedule.lr is not None else self.schedule.r * flow_lr
            self.base_only_updates += 1
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def _log_altub(self, loss: Tensor, batch_size: int) -> None:
        self.log("train_loss", float(loss), on_epoch=True, prog_bar=True, logger=True, batch_size=batch_size)
        self.log("base_only_updates", float(self.base_only_updates), on_step=True, on_epoch=False, logger=True,
                 batch_size=batch_size)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def checkpoint_safe_globals(cls):
        return (*super().checkpoint_safe_globals(), AltUBSchedule)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["altub_fast"] = {"altub_updates": int(self.altub_updates),
                                    "base_only_updates": int(self.base_only_updates),
                                    "schedule": dataclasses.asdict(self.schedule)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("altub_fast")
        if state:
            self.altub_updates = int(state.get("altub_updates", 0))
            self.base_only_updates = int(state.get("base_only_updates", 0))

    # ------------------------------------------------------------------ exports
    def to_onnx(self, *args, **kwargs):
        with plain_path(self):
            return super().to_onnx(*args, **kwargs)

    def to_openvino(self, *args, **kwargs):
        with plain_path(self):
            return super().to_openvino(*args, **kwargs)

    def to_torch(self, *args, **kwargs):
        with plain_path(self):
            return super().to_torch(*args, **kwargs)
