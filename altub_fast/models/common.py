"""What FastFlow and CFLOW-AD share: a frozen backbone, per-scale bases and the trainer's protocol."""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn
from torch import Tensor


class FlowModel(nn.Module):
    """Base of the flow models. Subclasses set ``self.backbone`` (a frozen FeatureExtractor) and
    ``self.bases`` (one LearnableGaussian per scale or layer) and implement ``flow_parameters``."""

    def base_parameters(self) -> List[nn.Parameter]:
        """theta_base: mu and log sigma of every scale (empty when altub=False)."""
        return [p for p in self.bases.parameters() if p.requires_grad]

    def trainable_state_dict(self, include_backbone: bool = False) -> Dict[str, Tensor]:
        """Everything but the backbone (which is reproducible from its name and weights)."""
        return {k: v for k, v in self.state_dict().items() if include_backbone or not k.startswith("backbone.")}

    def _check_images(self, images: Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")

    @torch.no_grad()
    def extract_features(self, images: Tensor) -> List[Tensor]:
        """The frozen backbone's raw feature maps."""
        self._check_images(images)
        self.backbone.eval()
        return self.backbone(images)
