"""FastFlow and CFLOW-AD with AltUB's learnable base (SPEC sections 2-4).

``build_model(name="fastflow" | "cflow", backbone=..., pretrained=..., weights=..., altub=...,
image_size=..., **kwargs)`` is the factory the CLI uses; each model's arguments are a dataclass
(:class:`FastFlowConfig`, :class:`CFlowConfig` in :mod:`.config`), and what the trainer asks of a
model is :class:`TrainableFlow` (:mod:`.protocol`).

Files: ``fastflow.py``, ``cflow.py`` (the models), ``common.py`` (what they share), ``config.py``
(their arguments as data), ``protocol.py`` (the trainer's view), ``scoring.py`` (maps and image
scores), ``backbones.py`` (``build_backbone``; the kinds in ``extractor.py``, ``timm_backbones.py``,
``efficientnet_lite.py``), ``checks.py`` (NonFiniteError and the batch helpers).
"""
from __future__ import annotations

from typing import Optional, Union

from .backbones import (EFFICIENTNET_LITE0, VIT_CONFIGS, BackboneWeightsError, FeatureExtractor, NonFiniteError,
                        build_backbone, check_finite, efficientnet_lite0_weights_path, images_from_batch)
from .cflow import CFlow, cflow_decoder, positionalencoding2d
from .config import FASTFLOW_DEFAULTS, CFlowConfig, FastFlowConfig, ModelConfig, model_key
from .fastflow import FastFlow, FastFlowOutput, fastflow_flow
from .protocol import TrainableFlow, config_dict
from .scoring import IMAGE_SCORES, SCORE_MODES, MapScorer, ScaleLogLik

MODELS = {"fastflow": FastFlow, "cflow": CFlow}
DEFAULT_BACKBONES = {key: cls.config_class.backbone for key, cls in MODELS.items()}


def build_model(name: str = "fastflow", backbone: Optional[Union[str, FeatureExtractor]] = None, *,
                pretrained: bool = True, weights: Optional[str] = None, altub: bool = True,
                image_size=256, **kwargs):
    """Build a FastFlow or CFlow model.

    Args:
      name: "fastflow" or "cflow".
      backbone: backbone name (default wide_resnet50_2) or a FeatureExtractor. FastFlow takes
        resnet18, wide_resnet50_2, deit_base_distilled_patch16_384 (image_size 384),
        cait_m48_448 (448), efficientnet_lite0 or any timm CNN; CFlow takes CNNs.
      pretrained: ImageNet backbone weights via timm (efficientnet_lite0: the packaged file).
      weights: local backbone state_dict file (machines without network).
      altub: learnable base (True) or the baseline's fixed N(0, I) (False).
      image_size: input size, int or (H, W).
      kwargs: the model's own options (FastFlow: flow_steps, hidden_ratio, conv3x3_only, clamp,
        norm_logdet, ...; CFlow: condition_dim, coupling_blocks, clamp, fiber_batch_size, permute_soft,
        ...; both: score ("loglik" | "fastflow" | "cflow"), image_score ("max" | "topk[:F]"),
        feature_blocks (efficientnet_lite0's blocks)). See :mod:`altub_fast.models.scoring`.
        A checkpoint's stored ``model_config`` may be passed whole: the options are read by the
        model's config class (:meth:`FastFlowConfig.from_dict <altub_fast.models.config.ModelConfig.from_dict>`:
        ``name`` must agree, ``backbone_weights_origin`` is found again, any other unknown key is a TypeError).
    """
    key = model_key(name)
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    cls = MODELS[key]
    extractor = backbone if isinstance(backbone, FeatureExtractor) else None
    options = dict(kwargs, pretrained=pretrained, weights=weights, altub=altub, image_size=image_size)
    if backbone is not None:
        options["backbone"] = extractor.name if extractor is not None else backbone
    return cls.from_config(cls.config_class.from_dict(options), backbone=extractor)


__all__ = ["FastFlow", "FastFlowOutput", "CFlow", "build_model", "build_backbone", "FeatureExtractor",
           "BackboneWeightsError", "NonFiniteError", "check_finite", "images_from_batch", "positionalencoding2d",
           "fastflow_flow", "cflow_decoder", "efficientnet_lite0_weights_path", "FASTFLOW_DEFAULTS",
           "VIT_CONFIGS", "EFFICIENTNET_LITE0", "MODELS", "SCORE_MODES", "IMAGE_SCORES", "MapScorer", "ScaleLogLik",
           "FastFlowConfig", "CFlowConfig", "ModelConfig", "TrainableFlow", "config_dict", "DEFAULT_BACKBONES"]
