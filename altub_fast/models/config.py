"""The models' arguments as data: :class:`FastFlowConfig` and :class:`CFlowConfig`.

One dataclass per model is the single source of its arguments. ``FastFlow(...)`` and ``CFlow(...)``
take the keyword arguments they always took, put them in their config, and read every setting from
``model.config`` from then on (``model.flow_steps``, ``model.altub`` and the like are
:class:`setting` attributes that read it).

A config is first *as given* (``None`` where the model picks a default) and then, once the model has
its backbone, *resolved* (:meth:`FastFlowConfig.resolved`): FastFlow's flow_steps, hidden_ratio and
conv3x3_only filled in per backbone (:data:`FASTFLOW_DEFAULTS`), the scoring rules filled in and
parsed, the backbone's own name, its ``backbone_weights_origin`` and efficientnet_lite0's
``feature_blocks`` taken from the built backbone. ``model.config`` is always resolved.

``config.to_dict()`` is the plain dict checkpoints store under ``"model_config"``: the same keys, in
the same order, with the same values as the dict older versions stored (``check_finite`` is a
runtime switch and is not stored). ``FastFlowConfig.from_dict(d)`` reads such a dict back: its
``"name"`` must be the model's, ``backbone_weights_origin`` is read but not an argument (the model
finds it again), and any other key the config does not know is a ``TypeError`` naming it.
``build_model`` and ``FlowModel.from_config`` build a model from a config or such a dict.

A config also reads like that dict, as the code that knew only the dict expects: it is a
:class:`~collections.abc.Mapping` over the stored keys (``config["backbone"]``, ``config.get("impl")``,
``dict(config)``, ``keys()``, ``items()``) and equals a dict with the same stored items.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Dict, List, Optional, Tuple, Union

from .extractor import FeatureExtractor, as_hw, base_name
from .scoring import DEFAULT_SCORE, check_score_mode, parse_image_rule

__all__ = ["ModelConfig", "FastFlowConfig", "CFlowConfig", "FASTFLOW_DEFAULTS", "model_key", "setting"]

#: Per-backbone defaults of FastFlow (gathierry/FastFlow and anomalib's configurations).
FASTFLOW_DEFAULTS: Dict[str, dict] = {
    "resnet18": dict(flow_steps=8, hidden_ratio=1.0, conv3x3_only=True),
    "wide_resnet50_2": dict(flow_steps=8, hidden_ratio=1.0, conv3x3_only=False),
    "deit_base_distilled_patch16_384": dict(flow_steps=20, hidden_ratio=0.16, conv3x3_only=False),
    "cait_m48_448": dict(flow_steps=20, hidden_ratio=0.16, conv3x3_only=False),
}
_CNN_DEFAULT = dict(flow_steps=8, hidden_ratio=1.0, conv3x3_only=False)
_VIT_DEFAULT = dict(flow_steps=20, hidden_ratio=0.16, conv3x3_only=False)

_ARGUMENT = "argument"   # field metadata: False for what the model fills in (not an __init__ argument)
_STORED = "stored"       # field metadata: False for what checkpoints do not store


def _derived() -> Any:
    """A field the model fills in from its backbone: stored, not an argument."""
    return dataclasses.field(default=None, metadata={_ARGUMENT: False})


def _runtime(default: Any) -> Any:
    """An argument checkpoints do not store (a runtime switch)."""
    return dataclasses.field(default=default, metadata={_STORED: False})


def _list_or_none(values) -> Optional[list]:
    return None if values is None else list(values)


def _cast_or_none(cast, value):
    return None if value is None else cast(value)


def model_key(name: str) -> str:
    """A model name as ``build_model`` and the configs compare them: "FastFlow", "fast-flow" -> "fastflow"."""
    return str(name).lower().replace("-", "").replace("_", "")


@dataclasses.dataclass(eq=False)
class ModelConfig(Mapping):
    """What both models' configs share: the first fields (the backbone, its input and weights, the
    base), the stored dict (:meth:`to_dict`), reading one back (:meth:`from_dict`), the model's
    keyword arguments (:meth:`arguments`), the mapping view, and the resolution of the fields both
    models fill in from their backbone."""

    #: The model's name, the stored dict's first key (FastFlow.model_name, CFlow.model_name).
    name: ClassVar[str] = ""
    #: The pixel map when ``score`` is None (see :mod:`.scoring`: chosen by the worst data set, issue 19).
    default_score: ClassVar[str] = DEFAULT_SCORE

    backbone: str = "wide_resnet50_2"
    image_size: Union[int, Tuple[int, int], List[int]] = 256
    pretrained: bool = True
    weights: Optional[str] = None
    altub: bool = True

    def _check_common(self) -> None:
        """Normalise the fields both models have, as the models always stored them."""
        if not isinstance(self.backbone, str):
            raise TypeError(f"backbone must be a backbone name (str) or a FeatureExtractor, "
                            f"got {type(self.backbone).__name__}")
        self.image_size = list(as_hw(self.image_size))
        self.altub = bool(self.altub)
        self.clamp = float(self.clamp)
        self.out_indices = _list_or_none(self.out_indices)
        self.feature_blocks = _list_or_none(self.feature_blocks)
        self.check_finite = bool(self.check_finite)

    def _resolved_from(self, backbone: FeatureExtractor, **filled):
        """A copy with the backbone's name, weights origin and blocks, the scoring rules parsed, and
        ``filled`` (the model's own defaults)."""
        blocks = getattr(backbone, "feature_blocks", None)
        rule = parse_image_rule(self.image_score, self.topk_fraction)
        return dataclasses.replace(self, backbone=backbone.name, backbone_weights_origin=backbone.weights_origin,
                                   score=check_score_mode(self.score or self.default_score), image_score=rule.spec,
                                   topk_fraction=rule.fraction,
                                   feature_blocks=_list_or_none(blocks), **filled)

    # ------------------------------------------------------------------ the stored dict
    @classmethod
    def stored_keys(cls) -> Tuple[str, ...]:
        """The keys of :meth:`to_dict`, in order: "name", then every stored field."""
        return ("name",) + tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get(_STORED, True))

    def to_dict(self) -> Dict[str, Any]:
        """The plain dict checkpoints store (``"model_config"``)."""
        return {key: self[key] for key in self.stored_keys()}

    @classmethod
    def from_dict(cls, d: Mapping) -> "ModelConfig":
        """The config a stored dict (or any dict of this model's options) describes; see the module
        docstring for ``name``, ``backbone_weights_origin`` and unknown keys."""
        d = dict(d)
        name = d.pop("name", cls.name)
        if model_key(name) != cls.name:
            raise ValueError(f"a {name!r} model's config cannot be read as {cls.__name__} (the {cls.name!r} model's)")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise TypeError(f"{cls.__name__} has no option {', '.join(map(repr, unknown))}; "
                            f"it takes {', '.join(known)}")
        return cls(**d)

    def arguments(self) -> Dict[str, Any]:
        """The model's keyword arguments that give this config (``backbone`` as a name)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get(_ARGUMENT, True)}

    # ------------------------------------------------------------------ the mapping view
    def __getitem__(self, key: str) -> Any:
        if key not in self.stored_keys():
            raise KeyError(key)
        return self.name if key == "name" else getattr(self, key)

    def __iter__(self):
        return iter(self.stored_keys())

    def __len__(self) -> int:
        return len(self.stored_keys())

    def __eq__(self, other) -> bool:
        if isinstance(other, ModelConfig):
            return type(other) is type(self) and dataclasses.astuple(self) == dataclasses.astuple(other)
        if isinstance(other, Mapping):
            return self.to_dict() == dict(other)
        return NotImplemented

    __hash__ = None  # mutable (export switches check_finite and inference_chunk off on its copy)


@dataclasses.dataclass(eq=False)
class FastFlowConfig(ModelConfig):
    """FastFlow's arguments (see :class:`~altub_fast.models.fastflow.FastFlow` for each)."""

    name: ClassVar[str] = "fastflow"

    flow_steps: Optional[int] = None
    hidden_ratio: Optional[float] = None
    conv3x3_only: Optional[bool] = None
    clamp: float = 2.0
    clamp_mode: str = "legacy"
    out_indices: Optional[List[int]] = None
    vit_block_index: Optional[int] = None
    impl: Optional[str] = None
    block: str = "altub"
    backbone_weights_origin: Optional[str] = _derived()
    norm_logdet: bool = True
    score: Optional[str] = None
    image_score: Optional[str] = None
    topk_fraction: Optional[float] = None
    feature_blocks: Optional[List[int]] = None
    check_finite: bool = _runtime(True)

    def __post_init__(self) -> None:
        self._check_common()
        self.flow_steps = _cast_or_none(int, self.flow_steps)
        self.hidden_ratio = _cast_or_none(float, self.hidden_ratio)
        self.conv3x3_only = _cast_or_none(bool, self.conv3x3_only)
        self.norm_logdet = bool(self.norm_logdet)

    def resolved(self, backbone: FeatureExtractor) -> "FastFlowConfig":
        """Every default filled in for ``backbone`` (:data:`FASTFLOW_DEFAULTS`, else the CNN or
        transformer default), and the fields taken from it."""
        d = FASTFLOW_DEFAULTS.get(base_name(backbone.name), _VIT_DEFAULT if backbone.kind == "vit" else _CNN_DEFAULT)
        filled = {k: d[k] if getattr(self, k) is None else getattr(self, k)
                  for k in ("flow_steps", "hidden_ratio", "conv3x3_only")}
        return self._resolved_from(backbone, **filled)


@dataclasses.dataclass(eq=False)
class CFlowConfig(ModelConfig):
    """CFLOW-AD's arguments (see :class:`~altub_fast.models.cflow.CFlow` for each)."""

    name: ClassVar[str] = "cflow"
    #: CFLOW-AD's own map: it keeps the flow's Jacobian (which the FastFlow map's failure on issue 19's
    #: set A showed is needed) and beat "loglik" on CFLOW-AD on every set where both were measured.
    default_score: ClassVar[str] = "cflow"

    out_indices: Optional[List[int]] = None
    condition_dim: int = 128
    coupling_blocks: int = 8
    clamp: float = 1.9
    fiber_batch_size: int = 256
    permute_soft: bool = False
    clamp_mode: str = "legacy"
    impl: Optional[str] = None
    backbone_weights_origin: Optional[str] = _derived()
    inference_chunk: int = 65536
    score: Optional[str] = None
    image_score: Optional[str] = None
    topk_fraction: Optional[float] = None
    feature_blocks: Optional[List[int]] = None
    check_finite: bool = _runtime(True)

    def __post_init__(self) -> None:
        if self.condition_dim % 4 != 0:
            raise ValueError(f"condition_dim must be a multiple of 4, got {self.condition_dim}")
        self._check_common()
        self.condition_dim = int(self.condition_dim)
        self.coupling_blocks = int(self.coupling_blocks)
        self.fiber_batch_size = int(self.fiber_batch_size)
        self.inference_chunk = int(self.inference_chunk)

    def resolved(self, backbone: FeatureExtractor) -> "CFlowConfig":
        """The scoring rules filled in and the fields taken from ``backbone``."""
        return self._resolved_from(backbone)


class setting:
    """A model attribute that reads ``model.config.<name>``: the config is the one place a setting
    lives. Read-only (setting it is an ``AttributeError`` saying so) unless ``writable``: the runtime
    switches export turns off on its copy (``check_finite``, ``inference_chunk``) write through to
    the config."""

    def __init__(self, writable: bool = False):
        self.writable = writable

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, model, owner=None):
        return self if model is None else getattr(model.config, self.name)

    def __set__(self, model, value) -> None:
        if not self.writable:
            raise AttributeError(f"{type(model).__name__}.{self.name} is read from model.config "
                                 f"({self.name}={getattr(model.config, self.name)!r}); build a new model to change it")
        setattr(model.config, self.name, value)
