"""timm backbones: CNNs through ``features_only`` (:class:`TimmCNNBackbone`) and vision
transformers' patch tokens after one block (:class:`TimmViTBackbone`), with timm's weights (its own
download, or a local state_dict file) and the error that names both ways out when they cannot be had."""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import torch.nn as nn
from torch import Tensor

from .efficientnet_lite import EFFICIENTNET_LITE0
from .extractor import BackboneWeightsError, FeatureExtractor, ImageSize, as_hw, base_name, file_origin

#: Transformer backbones of the FastFlow paper: block index and native input size.
VIT_CONFIGS = {
    "deit_base_distilled_patch16_384": dict(block_index=7, input_size=384),
    "cait_m48_448": dict(block_index=40, input_size=448),
}


def is_vit_name(name: str) -> bool:
    """True for a timm vision transformer's name (ViT, DeiT, CaiT)."""
    b = base_name(name)
    return b in VIT_CONFIGS or b.startswith(("vit_", "deit", "cait"))


class TimmCNNBackbone(FeatureExtractor):
    """A timm CNN built with ``features_only=True``: the maps of its ``out_indices`` stages."""

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
        return model, file_origin(weights)
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs), "random"
    try:
        model = timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:  # download / hub / cache failures all end here
        raise _weights_error(name, e) from e
    cfg = getattr(model, "pretrained_cfg", None) or {}
    src = cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file") or "default"
    return model, f"timm:{src}"


def build_timm_backbone(name: str, pretrained: bool, weights: Optional[str], out_indices: Optional[Sequence[int]],
                        vit_block_index: Optional[int], image_size: Optional[ImageSize]) -> FeatureExtractor:
    """A timm transformer or CNN as :func:`~altub_fast.models.backbones.build_backbone` describes."""
    b = base_name(name)
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
