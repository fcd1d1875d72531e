"""What a trainable flow model offers the trainer, eval, predict and export.

FastFlow and CFLOW-AD implement :class:`TrainableFlow`; the trainer (``altub_fast.train``) talks to
a model through these members only: no ``getattr`` probing, no model names. A new model that
implements them trains, calibrates, checkpoints and scores like the two that ship.

A *unit* is what one optimiser update consumes: FastFlow's is a batch of per-scale features,
CFLOW-AD's a batch of feature fibers of one layer (``training_units`` yields them from a batch of
features).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterable, Iterator, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class TrainableFlow(Protocol):
    #: AltUB's learnable base (True) or the fixed N(0, I) of the baseline (False).
    altub: bool
    #: The flow optimiser's defaults (FastFlow: Adam 1e-3, 1e-5; CFLOW-AD: 2e-4, 0).
    default_lr: float
    default_weight_decay: float
    #: DistributedDataParallel's ``find_unused_parameters``: True where one update leaves some flow
    #: parameters out (CFLOW-AD trains one layer's decoder per unit).
    has_unused_parameters: bool
    #: The model's arguments as data (FastFlowConfig / CFlowConfig of :mod:`.config`: a dataclass whose
    #: ``to_dict()`` is what checkpoints store; :func:`config_dict` accepts a plain dict too).
    config: Any
    #: How many feature scales (or CFLOW-AD layers) the backbone gives.
    num_scales: int
    #: The frozen backbone (a FeatureExtractor: ``describe()``, ``random_weights``) and the
    #: per-scale LearnableGaussian bases (the trainer reports their statistics).
    backbone: torch.nn.Module
    bases: torch.nn.ModuleList

    def flow_parameters(self) -> List[torch.nn.Parameter]: ...

    def base_parameters(self) -> List[torch.nn.Parameter]: ...

    def extract_features(self, images: Tensor) -> List[Tensor]: ...

    def training_units(self, features: Sequence[Tensor],
                       generator: Optional[torch.Generator] = None) -> Iterator[Any]: ...

    def step_loss(self, unit: Any) -> Tuple[Tensor, List[Optional[Tensor]]]: ...

    def base_only_loss(self, unit: Any) -> Tuple[Tensor, List[Optional[Tensor]]]: ...

    def diagnose_nonfinite(self, unit: Any) -> str: ...

    def nll_per_dim(self, x: Any) -> Tensor: ...

    def calibrate(self, batches: Iterable) -> Tensor: ...

    def scoring_rules(self) -> Dict[str, str]: ...

    def trainable_state_dict(self, include_backbone: bool = False) -> Dict[str, Tensor]: ...


def config_dict(config: Any) -> Dict[str, Any]:
    """A model's ``config`` as a plain dict (what checkpoints store): a dataclass with ``to_dict()``,
    any other dataclass, or a dict (the form older code used)."""
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    return dict(config)
