"""The interface every frozen backbone implements (:class:`FeatureExtractor`) and the small
helpers the backbone builders share (image sizes, architecture names, weights origins, the weights
error). The builders are in :mod:`.timm_backbones` and :mod:`.efficientnet_lite`;
:func:`~altub_fast.models.backbones.build_backbone` picks one."""
from __future__ import annotations

import math
import os
from typing import List, Sequence, Tuple, Union

import torch.nn as nn

ImageSize = Union[int, Tuple[int, int]]


class BackboneWeightsError(RuntimeError):
    """The backbone's pretrained weights could not be obtained."""


def as_hw(image_size: ImageSize) -> Tuple[int, int]:
    """(H, W) from an int or an (H, W) pair."""
    if isinstance(image_size, int):
        return int(image_size), int(image_size)
    h, w = image_size
    return int(h), int(w)


def base_name(name: str) -> str:
    """timm's architecture name without a pretrained tag: 'resnet18.tv_in1k' -> 'resnet18'."""
    return name.split(".")[0]


def file_origin(path: str) -> str:
    """How a weights file is named in ``weights_origin``: ``file:<absolute path> (<bytes> bytes)``."""
    try:
        size = os.path.getsize(path)
    except OSError:
        size = -1
    return f"file:{os.path.abspath(path)} ({size} bytes)"


class FeatureExtractor(nn.Module):
    """A frozen backbone: ``forward(images (B, 3, H, W)) -> [features (B, C_i, h_i, w_i)]``.

    Attributes: ``name`` (as given), ``kind`` ("cnn", "vit" or "efficientnet_lite"),
    ``channels`` and ``strides`` per output, ``weights_origin`` (where the weights came from:
    "timm:<hf id or url>", "file:<path> (<bytes>)", "package:<path>" or "random").
    """

    kind = "cnn"

    def __init__(self, name: str, channels: Sequence[int], strides: Sequence[int], weights_origin: str):
        super().__init__()
        self.name = name
        self.channels = [int(c) for c in channels]
        self.strides = [int(s) for s in strides]
        self.weights_origin = weights_origin

    @property
    def random_weights(self) -> bool:
        return self.weights_origin == "random"

    def freeze(self) -> "FeatureExtractor":
        for p in self.parameters():
            p.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> "FeatureExtractor":
        # Frozen ImageNet statistics: always eval, whatever the enclosing model does.
        return super().train(False)

    def feature_shapes(self, image_size: ImageSize) -> List[Tuple[int, int, int]]:
        """(C, h, w) of each output for an input of ``image_size``."""
        h, w = as_hw(image_size)
        return [(c, math.ceil(h / s), math.ceil(w / s)) for c, s in zip(self.channels, self.strides)]

    def describe(self) -> dict:
        return dict(name=self.name, kind=self.kind, channels=list(self.channels), strides=list(self.strides),
                    weights_origin=self.weights_origin)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, channels={self.channels}, strides={self.strides}, weights={self.weights_origin!r}"
