"""What FastFlow and CFLOW-AD share: a frozen backbone, per-scale bases, the trainer's protocol and
the scoring protocol (per-scale log-likelihoods -> :class:`~altub_fast.models.scoring.MapScorer`)."""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
from torch import Tensor

from ..nn import cpu_fast
from .backbones import FeatureExtractor, NonFiniteError
from .config import ModelConfig
from .scoring import MapScorer, ScaleLogLik, concat_parts


class FlowModel(nn.Module):
    """Base of the flow models. Subclasses name their ``config_class`` (a
    :class:`~altub_fast.models.config.ModelConfig`), set ``self.config`` (resolved), ``self.backbone``
    (a frozen FeatureExtractor), ``self.bases`` (one LearnableGaussian per scale or layer) and
    ``self.scorer`` (a MapScorer), and implement ``flow_parameters``, ``_as_features``,
    ``score_parts`` and ``nll_per_dim``; :class:`~altub_fast.models.protocol.TrainableFlow` lists
    what the trainer uses."""

    config_class: Type[ModelConfig]
    config: ModelConfig
    scorer: MapScorer

    @classmethod
    def from_config(cls, config: Union[ModelConfig, Mapping], backbone: Optional[FeatureExtractor] = None):
        """The model ``config`` describes: a config of this model, or a dict of its options such as
        checkpoints store (read by ``config_class.from_dict``). A ready ``backbone`` replaces the
        config's backbone name."""
        if not isinstance(config, cls.config_class):
            config = cls.config_class.from_dict(config)
        args = config.arguments()
        name = args.pop("backbone")
        return cls(backbone if backbone is not None else name, **args)

    @property
    def image_size(self) -> Tuple[int, int]:
        """(H, W), the input size the model was built for."""
        return tuple(self.config.image_size)

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
        return cpu_fast.run_backbone(self.backbone, images, self.config.impl)

    # ------------------------------------------------------------------ scoring
    def score_parts(self, x) -> List[ScaleLogLik]:  # pragma: no cover - abstract
        raise NotImplementedError

    def nll_per_dim(self, x) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def score_mode(self) -> str:
        return self.scorer.mode

    def scoring_rules(self) -> Dict[str, str]:
        """The rules in use: {"score": the anomaly map, "image_score": the image score}."""
        return {"score": str(self.scorer.mode), "image_score": str(self.scorer.image_score_spec)}

    @property
    def calibrated(self) -> bool:
        """True once :meth:`calibrate` has set the score normalisation from held-out normal images."""
        return self.scorer.is_calibrated

    def _out_size(self, x) -> Tuple[int, int]:
        return tuple(x.shape[-2:]) if torch.is_tensor(x) else tuple(self.image_size)

    @torch.no_grad()
    def anomaly_map(self, x: Union[Tensor, Sequence[Tensor]]) -> Tuple[Tensor, Tensor]:
        """(maps (B, H, W) float32, scores (B,)) in the model's score mode (see
        :mod:`altub_fast.models.scoring`). Each image's map depends on that image and the model
        alone (its calibration constants), never on the other images of the batch."""
        maps, scores = self.scorer(self.score_parts(x), size=self._out_size(x))
        if self.check_finite and not bool(torch.isfinite(maps).all()):
            raise NonFiniteError(f"{type(self).__name__} anomaly map holds NaN/Inf (score={self.score_mode!r}, "
                                 f"calibrated={self.calibrated})")
        return maps, scores

    # predict() protocol: per-batch parts, then one combination (every map is per image).
    def partial_anomaly_map(self, x) -> Tuple[Tensor, Tensor]:
        return self.anomaly_map(x)

    @staticmethod
    def combine_anomaly_maps(parts: Sequence[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
        return torch.cat([p[0].cpu() for p in parts]), torch.cat([p[1].cpu() for p in parts])

    @torch.no_grad()
    def calibrate(self, batches: Iterable) -> Tensor:
        """Set the score normalisation from held-out **normal** images and return their image scores.

        ``batches``: an iterable of image batches (B, 3, H, W) or of per-scale feature lists (as the
        trainer's feature cache holds them). Sets every score mode's constants (see
        :meth:`MapScorer.fit`), then scores the same images in the model's mode: (N,) float32 on the
        CPU, the input of a false-alarm-rate threshold.
        """
        was_training = self.training
        self.eval()
        try:
            per_batch = [[ScaleLogLik(None if p.ll_full is None else p.ll_full.cpu(), p.ll_base.cpu())
                          for p in self.score_parts(b)] for b in batches]
            if not per_batch:
                raise ValueError("calibrate() needs at least one batch of held-out normal images")
            dev = self.scorer.loc.device
            parts = [ScaleLogLik(None if p.ll_full is None else p.ll_full.to(dev), p.ll_base.to(dev))
                     for p in concat_parts(per_batch)]
            self.scorer.fit(parts)
            return self.scorer(parts)[1].float().cpu()
        finally:
            self.train(was_training)
