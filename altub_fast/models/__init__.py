"""FastFlow and CFLOW-AD with AltUB's learnable base (SPEC sections 2-4).

``build_model(name="fastflow" | "cflow", backbone=..., pretrained=..., weights=..., altub=...,
image_size=..., **kwargs)`` is the factory the CLI uses.
"""
from __future__ import annotations

from typing import Optional, Union

from .backbones import (EFFICIENTNET_LITE0, VIT_CONFIGS, BackboneWeightsError, FeatureExtractor, NonFiniteError,
                        build_backbone, check_finite, efficientnet_lite0_weights_path, images_from_batch)
from .cflow import CFlow, cflow_decoder, positionalencoding2d
from .fastflow import FASTFLOW_DEFAULTS, FastFlow, FastFlowOutput, fastflow_flow
from .scoring import IMAGE_SCORES, SCORE_MODES, MapScorer, ScaleLogLik

MODELS = {"fastflow": FastFlow, "cflow": CFlow}
DEFAULT_BACKBONES = {"fastflow": "wide_resnet50_2", "cflow": "wide_resnet50_2"}


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
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    cls = MODELS[key]
    kwargs.pop("name", None)
    kwargs.pop("backbone_weights_origin", None)
    return cls(backbone if backbone is not None else DEFAULT_BACKBONES[key], pretrained=pretrained,
               weights=weights, altub=altub, image_size=image_size, **kwargs)


__all__ = ["FastFlow", "FastFlowOutput", "CFlow", "build_model", "build_backbone", "FeatureExtractor",
           "BackboneWeightsError", "NonFiniteError", "check_finite", "images_from_batch", "positionalencoding2d",
           "fastflow_flow", "cflow_decoder", "efficientnet_lite0_weights_path", "FASTFLOW_DEFAULTS",
           "VIT_CONFIGS", "EFFICIENTNET_LITE0", "MODELS", "SCORE_MODES", "IMAGE_SCORES", "MapScorer", "ScaleLogLik"]
