"""AltUBFastflow: anomalib's Fastflow with altub_fast's blocks and AltUB's learnable base.

:class:`AltUBFastflowModel` has the layout of anomalib's ``FastflowModel`` (``feature_extractor``,
``norms``, ``fast_flow_blocks``; the same state_dict keys for timm CNN backbones) plus ``bases``
(one :class:`altub_fast.LearnableGaussian` per scale). A state_dict without ``bases.*`` (anomalib's
own Fastflow checkpoints) loads, the bases starting at N(0, I).

Training loss, per scale, mean over the batch of -log N(z; mu, sigma) - log|det J| (without the
constant), from the flow's fused pass (``SequenceINN.forward_loglik``); ``norm_logdet=True`` (the
default) also counts the trainable LayerNorm's elementwise scale, so the loss is the exact NLL of
the standardised features; ``norm_logdet=False`` is the published loss (anomalib's
``FastflowLoss`` when ``altub=False``).

Anomaly map, per scale, ``-exp(mean over channels of log N(z; mu, sigma))`` without the constant,
upsampled (bilinear, align_corners=False) and averaged over scales, image score its maximum:
anomalib's map exactly when the base is N(0, I) (``altub=False``).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from anomalib.data import Batch, InferenceBatch
from anomalib.models import Fastflow
from anomalib.models.components import AnomalibModule
from torch import Tensor

from ...models import fastflow_flow
from ...nn import LearnableGaussian
from ...reference import LOG_2PI
from .backbones import fastflow_extractor
from .training import AltUBTraining, ScheduleLike, per_dim_base_loglik, resolve_schedule


class AltUBFastflowModel(nn.Module):
    """FastFlow's torch model with AltUB bases (anomalib's ``FastflowModel`` arguments, plus
    ``altub``, ``norm_logdet``, ``clamp``, ``weights``, ``feature_blocks`` and ``impl``).

    ``forward(images)``: in training mode (hidden variables, log-dets) per scale, as anomalib's;
    in eval mode ``InferenceBatch(pred_score, anomaly_map)``.
    """

    def __init__(self, input_size: Tuple[int, int], backbone: str, pre_trained: bool = True, flow_steps: int = 8,
                 conv3x3_only: bool = False, hidden_ratio: float = 1.0, altub: bool = True,
                 norm_logdet: bool = True, clamp: float = 2.0, weights: Optional[str] = None,
                 feature_blocks: Optional[Sequence[int]] = None, impl: Optional[str] = None):
        super().__init__()
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.feature_extractor, shapes, kind = fastflow_extractor(backbone, pre_trained, weights, self.input_size,
                                                                  feature_blocks)
        for p in self.feature_extractor.parameters():
            p.requires_grad = False
        self.feature_shapes = shapes
        self.altub = bool(altub)
        self.norm_logdet = bool(norm_logdet)
        # transformers bring their own final norm; CNN scales get a trainable LayerNorm([C, h, w])
        self.norms = nn.ModuleList([nn.LayerNorm(list(s), elementwise_affine=True) for s in shapes]
                                   if kind != "vit" else [nn.Identity() for _ in shapes])
        self.fast_flow_blocks = nn.ModuleList([fastflow_flow(s, int(flow_steps), float(hidden_ratio),
                                                             bool(conv3x3_only), clamp=float(clamp), impl=impl)
                                               for s in shapes])
        self.bases = nn.ModuleList([LearnableGaussian(s[0], learnable=self.altub) for s in shapes])
        self._register_load_state_dict_pre_hook(self._default_bases)

    def _default_bases(self, state_dict, prefix, *args) -> None:
        """anomalib's Fastflow state_dicts have no ``bases.*``: keep this model's (N(0, I) when new)."""
        for name, value in self.bases.state_dict().items():
            state_dict.setdefault(f"{prefix}bases.{name}", value.detach().clone())

    # ------------------------------------------------------------------ parameter groups
    def flow_parameters(self) -> List[nn.Parameter]:
        """The LayerNorms and the flows (trainable ones)."""
        return [p for m in (self.norms, self.fast_flow_blocks) for p in m.parameters() if p.requires_grad]

    def base_parameters(self) -> List[nn.Parameter]:
        """mu and log sigma of every scale (none when altub=False)."""
        return [p for p in self.bases.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ features, loss, map
    def features(self, images: Tensor) -> List[Tensor]:
        """The frozen backbone's features, each through its scale's LayerNorm."""
        self.feature_extractor.eval()
        with torch.no_grad():
            feats = list(self.feature_extractor(images))
        return [norm(f) for norm, f in zip(self.norms, feats)]

    def _norm_logdet(self, i: int) -> Optional[Tensor]:
        norm = self.norms[i]
        if not isinstance(norm, nn.LayerNorm) or norm.weight is None:
            return None
        return torch.log(norm.weight.float().abs()).sum()

    def loss(self, images: Tensor) -> Tensor:
        """Sum over scales of the batch-mean NLL (see the module docstring)."""
        total = images.new_zeros(())
        for i, f in enumerate(self.features(images)):
            out = self.fast_flow_blocks[i].forward_loglik(f, base=self.bases[i])
            nll = -(out.logp_sample + (0.5 * LOG_2PI) * out.z[0].numel()) - out.log_jac_det
            ln = self._norm_logdet(i) if self.norm_logdet else None
            total = total + (nll.mean() if ln is None else (nll - ln).mean())
        return total

    def base_only_loss(self, images: Tensor) -> Tensor:
        """The same loss with the LayerNorms and flows run without a graph: only the bases get
        gradients (AltUB's base-only update, SPEC 2)."""
        total = images.new_zeros(())
        with torch.no_grad():
            outs = [flow(f) for flow, f in zip(self.fast_flow_blocks, self.features(images))]
        for base, (z, ljd) in zip(self.bases, outs):
            total = total + (-base.log_prob(z, reduction="sample", include_const=False) - ljd).mean()
        return total

    def anomaly_map(self, hidden_variables: Sequence[Tensor]) -> Tensor:
        """(B, 1, H, W): see the module docstring."""
        flow_maps = []
        for z, base in zip(hidden_variables, self.bases):
            prob = torch.exp(per_dim_base_loglik(z, base))
            flow_maps.append(F.interpolate(input=-prob, size=self.input_size, mode="bilinear", align_corners=False))
        return torch.mean(torch.stack(flow_maps, dim=-1), dim=-1)

    def forward(self, input_tensor: Tensor) -> Union[Tuple[List[Tensor], List[Tensor]], InferenceBatch]:
        hidden_variables, log_jacobians = [], []
        for flow, f in zip(self.fast_flow_blocks, self.features(input_tensor)):
            z, ljd = flow(f)
            hidden_variables.append(z)
            log_jacobians.append(ljd)
        if self.training:
            return hidden_variables, log_jacobians
        anomaly_map = self.anomaly_map(hidden_variables)
        return InferenceBatch(pred_score=torch.amax(anomaly_map, dim=(-2, -1)), anomaly_map=anomaly_map)


class AltUBFastflow(AltUBTraining, Fastflow):
    """anomalib's Fastflow trained with AltUB.

    anomalib's arguments (``backbone``, ``pre_trained``, ``flow_steps``, ``conv3x3_only``,
    ``hidden_ratio``, ``pre_processor``, ``post_processor``, ``evaluator``, ``visualizer``) mean
    what they mean there; ``backbone`` also takes ``"efficientnet_lite0"`` (offline ImageNet weights)
    and other timm CNNs. AltUB's:

      altub: learnable base per scale (True) or anomalib's fixed N(0, I) (False).
      k, r, base_lr, warmup: override the ``schedule``'s fields (every k-th update after ``warmup``
        is base-only; base lr = ``base_lr`` or r times the flow lr). schedule: an
        :class:`~altub_fast.train.schedule.AltUBSchedule` or a dict of its fields (default
        k=5, r=5, warmup=20, unit="step", optimizer="sgd", clip_value=100).
      norm_logdet: the exact NLL (True) or the published FastFlow loss (False); see the module.
      lr, weight_decay: the flow's Adam (anomalib's 1e-3 and 1e-5).
      image_size: with ``pre_processor=True``, the input size of anomalib's default pre-processor
        (resize + ImageNet normalisation; default 256); saved with the hyperparameters, so a
        checkpoint reloads at its size.
      weights: a local backbone state_dict file; feature_blocks: efficientnet_lite0's blocks
        (default 4, 10, 15); impl: the blocks' implementation switch (None: ``ALTUB_FAST_IMPL``).

    ``__init__`` builds :class:`AltUBFastflowModel` instead of anomalib's (it calls
    ``AnomalibModule.__init__`` directly); everything else of Fastflow (evaluator, trainer
    arguments, validation step, learning type) is inherited.
    """

    def __init__(self, backbone: str = "resnet18", pre_trained: bool = True, flow_steps: int = 8,
                 conv3x3_only: bool = False, hidden_ratio: float = 1.0, altub: bool = True,
                 k: Optional[int] = None, r: Optional[float] = None, base_lr: Optional[float] = None,
                 warmup: Optional[int] = None, schedule: ScheduleLike = None, norm_logdet: bool = True,
                 lr: float = 1e-3, weight_decay: float = 1e-5,
                 image_size: Optional[Union[int, Sequence[int]]] = None, weights: Optional[str] = None,
                 feature_blocks: Optional[Sequence[int]] = None, impl: Optional[str] = None,
                 pre_processor=True, post_processor=True, evaluator=True, visualizer=True) -> None:
        if pre_processor is True and image_size is not None:
            size = (int(image_size), int(image_size)) if isinstance(image_size, int) else tuple(image_size)
            pre_processor = self.configure_pre_processor(size)
        # Lightning's save_hyperparameters collects the arguments of each __init__ frame that holds
        # the __class__ cell; naming it here creates the cell (this __init__ calls no zero-arg super())
        assert __class__ is not None
        AnomalibModule.__init__(self, pre_processor=pre_processor, post_processor=post_processor,
                                evaluator=evaluator, visualizer=visualizer)
        if self.input_size is None:
            raise ValueError("AltUBFastflow needs an input size: a pre_processor that resizes, or image_size=")
        self.backbone, self.pre_trained, self.flow_steps = backbone, pre_trained, flow_steps
        self.conv3x3_only, self.hidden_ratio = conv3x3_only, hidden_ratio
        self.model = AltUBFastflowModel(input_size=tuple(self.input_size), backbone=backbone, pre_trained=pre_trained,
                                        flow_steps=flow_steps, conv3x3_only=conv3x3_only, hidden_ratio=hidden_ratio,
                                        altub=altub, norm_logdet=norm_logdet, weights=weights,
                                        feature_blocks=feature_blocks, impl=impl)
        self._setup_altub(altub, resolve_schedule(schedule, k, r, base_lr, warmup), lr, weight_decay)

    def training_step(self, batch: Batch, *args, **kwargs):
        del args, kwargs
        images = batch.image
        loss = self.altub_update(lambda: self.model.loss(images), lambda: self.model.base_only_loss(images))
        self._log_altub(loss, images.shape[0])
        return {"loss": loss}
