"""CFLOW-AD (arXiv 2107.12571) with AltUB's learnable base (SPEC sections 2, 4 and 6).

Frozen backbone (wide_resnet50_2 layer2/3/4 by default) -> per pooled layer, "fibers" (one
C-vector per feature-map position) conditioned on a 2-D sin/cos positional encoding -> one
conditional flow per layer (SequenceINN(C) of 8 AllInOneBlocks) -> per-layer base
N(mu, diag(sigma^2)) (a frozen N(0, I) when ``altub=False``).

Training follows gudovskiy/cflow-ad: for each image batch and each layer, the B*h*w fibers are
shuffled and split into fiber batches (``fiber_batch_size``, 256; the incomplete remainder is
dropped, as there), one optimiser update per fiber batch; loss = mean of -logsigmoid(log p / C).

Scoring (:mod:`altub_fast.models.scoring`): every fiber's log p is already its full
log-likelihood (base plus its log-det). ``score="cflow"`` is CFLOW-AD's map, per layer
exp(log p / C - max) upsampled (align_corners=True) and summed, map = max - sum, with both maxima
taken over held-out normal training images (the official code takes them over the test set, anomalib
over the batch: either makes a score depend on the other images scored). "loglik" standardises each
layer's log p / C by held-out normal statistics and averages the layers.
"""
from __future__ import annotations

import math
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..nn import AllInOneBlock, LearnableGaussian, SequenceINN
from .backbones import (EFFICIENTNET_LITE0, FeatureExtractor, ImageSize, NonFiniteError, base_name, build_backbone,
                        is_vit_name, nonfinite_flow_parts)
from .common import FlowModel
from .config import CFlowConfig, setting
from .scoring import MapScorer, ScaleLogLik

Features = Union[List[Tensor], Tuple[Tensor, ...]]
FiberUnit = Tuple[int, Tensor, Tensor]   # (layer, fibers (N, C), conditions (N, P))


def positionalencoding2d(D: int, H: int, W: int) -> Tensor:
    """gudovskiy/cflow-ad's 2-D sin/cos positional encoding, (D, H, W) float32.

    The first D/2 channels encode the column (interleaved sin, cos), the second D/2 the row.
    """
    if D % 4 != 0:
        raise ValueError(f"Cannot use sin/cos positional encoding with odd dimension (got dim={D:d})")
    P = torch.zeros(D, H, W)
    D = D // 2
    div_term = torch.exp(torch.arange(0.0, D, 2) * -(math.log(1e4) / D))
    pos_w = torch.arange(0.0, W).unsqueeze(1)
    pos_h = torch.arange(0.0, H).unsqueeze(1)
    P[0:D:2, :, :] = torch.sin(pos_w * div_term).transpose(0, 1).unsqueeze(1).repeat(1, H, 1)
    P[1:D:2, :, :] = torch.cos(pos_w * div_term).transpose(0, 1).unsqueeze(1).repeat(1, H, 1)
    P[D::2, :, :] = torch.sin(pos_h * div_term).transpose(0, 1).unsqueeze(2).repeat(1, 1, W)
    P[D + 1::2, :, :] = torch.cos(pos_h * div_term).transpose(0, 1).unsqueeze(2).repeat(1, 1, W)
    return P


class FiberSubnet:
    """CFLOW-AD's subnet constructor: Linear(c_in, 2 c_in) -> ReLU -> Linear(2 c_in, c_out),
    c_in = C1 + P (the passive half plus the condition)."""

    def __call__(self, c_in: int, c_out: int) -> nn.Module:
        return nn.Sequential(nn.Linear(c_in, 2 * c_in), nn.ReLU(), nn.Linear(2 * c_in, c_out))


def cflow_decoder(channels: int, condition_dim: int = 128, coupling_blocks: int = 8, clamp: float = 1.9,
                  permute_soft: bool = False, clamp_mode: str = "legacy", impl: Optional[str] = None) -> SequenceINN:
    flow = SequenceINN(channels)
    for _ in range(coupling_blocks):
        flow.append(AllInOneBlock, cond=0, cond_shape=(condition_dim,), subnet_constructor=FiberSubnet(),
                    affine_clamping=clamp, global_affine_type="SOFTPLUS", permute_soft=permute_soft,
                    clamp_mode=clamp_mode, impl=impl)
    return flow


class CFlow(FlowModel):
    """CFLOW-AD with an AltUB base.

    Args:
      backbone: name (see :func:`build_backbone`; default wide_resnet50_2) or a FeatureExtractor.
      image_size: input size (used to upsample maps computed from features).
      pretrained, weights: backbone weights.
      altub: learnable base per pooled layer (True) or the fixed N(0, I) (False).
      out_indices: timm stages (default (2, 3, 4): layer2/3/4 of a ResNet; efficientnet_lite0
        always gives its blocks 2/4/10).
      condition_dim: P, the positional-encoding size (128).
      coupling_blocks: 8; clamp: 1.9; fiber_batch_size: 256.
      permute_soft: False (hard permutations, served by the fused kernels; anomalib's default).
        gudovskiy/cflow-ad uses True (a random rotation; slow to build for C = 2048).
      impl, clamp_mode: passed to every block.
      inference_chunk: fibers per flow call when scoring (bounds memory).
      score, image_score, topk_fraction: the anomaly map and image score (see
        :mod:`altub_fast.models.scoring`; default "fastflow" and "topk", the top-1 % mean).
      feature_blocks: efficientnet_lite0's blocks to take features from (default 4, 10, 15).

    The arguments live in ``self.config``, a resolved :class:`~altub_fast.models.config.CFlowConfig`
    (``self.condition_dim`` and the other settings read it); ``CFlow.from_config(config)`` builds the
    model a config, or a checkpoint's stored dict, describes.
    """

    config_class = CFlowConfig
    model_name = CFlowConfig.name
    default_lr = 2e-4
    default_weight_decay = 0.0
    has_unused_parameters = True  # one update trains one layer's decoder (DDP's find_unused_parameters)

    # settings, read from self.config (the single source of the arguments)
    altub = setting()
    condition_dim = setting()
    coupling_blocks = setting()
    clamp = setting()
    fiber_batch_size = setting()
    check_finite = setting(writable=True)
    inference_chunk = setting(writable=True)

    def __init__(self, backbone: Union[str, FeatureExtractor] = "wide_resnet50_2", *, image_size: ImageSize = 256,
                 pretrained: bool = True, weights: Optional[str] = None, altub: bool = True,
                 out_indices: Optional[Sequence[int]] = None, condition_dim: int = 128, coupling_blocks: int = 8,
                 clamp: float = 1.9, fiber_batch_size: int = 256, permute_soft: bool = False,
                 clamp_mode: str = "legacy", impl: Optional[str] = None, check_finite: bool = True,
                 inference_chunk: int = 65536, score: Optional[str] = None, image_score: Optional[str] = None,
                 topk_fraction: Optional[float] = None, feature_blocks: Optional[Sequence[int]] = None):
        super().__init__()
        extractor = backbone if isinstance(backbone, FeatureExtractor) else None
        given = CFlowConfig(
            backbone=backbone.name if extractor is not None else backbone, image_size=image_size,
            pretrained=pretrained, weights=weights, altub=altub, out_indices=out_indices, condition_dim=condition_dim,
            coupling_blocks=coupling_blocks, clamp=clamp, fiber_batch_size=fiber_batch_size,
            permute_soft=permute_soft, clamp_mode=clamp_mode, impl=impl, check_finite=check_finite,
            inference_chunk=inference_chunk, score=score, image_score=image_score, topk_fraction=topk_fraction,
            feature_blocks=feature_blocks)
        self.backbone = extractor if extractor is not None else self._build_backbone(given)
        if self.backbone.kind == "vit":
            raise ValueError("CFlow takes CNN backbones (multi-scale feature maps), not transformers")
        self.config = cfg = given.resolved(self.backbone)
        self.channels = list(self.backbone.channels)
        self.feature_shapes = self.backbone.feature_shapes(self.image_size)
        self.decoders = nn.ModuleList([cflow_decoder(c, cfg.condition_dim, cfg.coupling_blocks, cfg.clamp,
                                                     cfg.permute_soft, cfg.clamp_mode, cfg.impl)
                                       for c in self.channels])
        self.bases = nn.ModuleList([LearnableGaussian(c, learnable=cfg.altub) for c in self.channels])
        self._pos_cache: Dict[Tuple[int, int, str], Tensor] = {}
        self.scorer = MapScorer(len(self.channels), self.image_size, cfg.score, cfg.image_score, cfg.topk_fraction)

    @staticmethod
    def _build_backbone(config: CFlowConfig) -> FeatureExtractor:
        """The backbone a config names: a CNN (layer2/3/4 by default; efficientnet_lite0 its blocks)."""
        if is_vit_name(config.backbone):
            raise ValueError("CFlow takes CNN backbones (multi-scale feature maps), not transformers "
                             f"such as {config.backbone!r}")
        effnet = base_name(config.backbone) == EFFICIENTNET_LITE0
        idx = None if effnet else (tuple(config.out_indices) if config.out_indices is not None else (2, 3, 4))
        return build_backbone(config.backbone, pretrained=config.pretrained, weights=config.weights, out_indices=idx,
                              image_size=tuple(config.image_size), feature_blocks=config.feature_blocks)

    # ------------------------------------------------------------------ parameter groups
    @property
    def num_scales(self) -> int:
        return len(self.channels)

    def flow_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.decoders.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ features and fibers
    def _as_features(self, x: Union[Tensor, Features]) -> List[Tensor]:
        if torch.is_tensor(x):
            return self.extract_features(x)
        feats = list(x)
        if len(feats) != self.num_scales:
            raise ValueError(f"expected {self.num_scales} feature maps, got {len(feats)}")
        for i, (f, c) in enumerate(zip(feats, self.channels)):
            if f.dim() != 4 or f.shape[1] != c:
                raise ValueError(f"feature map {i} must be (B, {c}, h, w), got {tuple(f.shape)}")
        return feats

    def positional_encoding(self, h: int, w: int, device) -> Tensor:
        """(P, h, w) on ``device``, cached."""
        key = (h, w, str(device))
        if key not in self._pos_cache:
            self._pos_cache[key] = positionalencoding2d(self.condition_dim, h, w).to(device)
        return self._pos_cache[key]

    def fibers(self, feature: Tensor) -> Tuple[Tensor, Tensor]:
        """(B, C, h, w) -> fibers (B*h*w, C) and their conditions (B*h*w, P); row b*h*w + y*w + x."""
        B, C, h, w = feature.shape
        e = feature.reshape(B, C, h * w).transpose(1, 2).reshape(B * h * w, C)
        p = self.positional_encoding(h, w, feature.device).to(feature.dtype)
        c = p.reshape(1, self.condition_dim, h * w).expand(B, -1, -1).transpose(1, 2).reshape(B * h * w, -1)
        return e, c

    def fiber_loglik(self, layer: int, e: Tensor, c: Tensor):
        """:class:`altub_fast.FlowOutput` of layer ``layer``'s decoder on fibers (N, C)."""
        return self.decoders[layer].forward_loglik(e, [c], base=self.bases[layer])

    # ------------------------------------------------------------------ the trainer's protocol
    def training_units(self, features: Features, generator: Optional[torch.Generator] = None) -> Iterator[FiberUnit]:
        """Per layer: shuffle the fibers and yield full fiber batches (one update each)."""
        feats = self._as_features(features)
        N = self.fiber_batch_size
        for layer, f in enumerate(feats):
            e, c = self.fibers(f)
            E = e.shape[0]
            n_batches = E // N
            if n_batches == 0:
                raise ValueError(f"layer {layer} gives only {E} fibers per image batch, fewer than "
                                 f"fiber_batch_size={N}: decrease fiber_batch_size or increase the batch size")
            perm = torch.randperm(E, generator=generator).to(e.device)
            for k in range(n_batches):
                idx = perm[k * N:(k + 1) * N]
                yield layer, e[idx], c[idx]

    def _logsigmoid_loss(self, logp: Tensor, C: int) -> Tensor:
        return -F.logsigmoid(logp / C).mean()

    def step_loss(self, unit: FiberUnit) -> Tuple[Tensor, List[Optional[Tensor]]]:
        layer, e, c = unit
        out = self.fiber_loglik(layer, e, c)
        zs: List[Optional[Tensor]] = [None] * self.num_scales
        zs[layer] = out.z
        return self._logsigmoid_loss(out.log_prob, e.shape[1]), zs

    def forward(self, unit: FiberUnit) -> Tensor:
        """The loss of one fiber batch ``(layer, fibers, conditions)``."""
        return self.step_loss(unit)[0]

    def base_only_loss(self, unit: FiberUnit) -> Tuple[Tensor, List[Optional[Tensor]]]:
        layer, e, c = unit
        with torch.no_grad():
            z, ljd = self.decoders[layer](e, [c])
        logp = self.bases[layer].log_prob(z, reduction="sample") + ljd
        zs: List[Optional[Tensor]] = [None] * self.num_scales
        zs[layer] = z
        return self._logsigmoid_loss(logp, e.shape[1]), zs

    def diagnose_nonfinite(self, unit: FiberUnit) -> str:
        layer, e, c = unit
        with torch.no_grad():
            if not bool(torch.isfinite(e).all()):
                return f"backbone features (fibers) of layer {layer} hold NaN/Inf"
            z, ljd = self.decoders[layer](e, [c])
            parts = nonfinite_flow_parts(f"layer {layer}", z, ljd, self.bases[layer])
            return "; ".join(parts) or "features, z, log-dets and base are finite (overflow in the sum)"

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score_parts(self, x: Union[Tensor, Features]) -> List[ScaleLogLik]:
        """Per layer (B, h, w) float32: log p / C of every position (the full log-likelihood per
        dimension) and the base term alone / C."""
        feats = self._as_features(x)
        out = []
        for layer, f in enumerate(feats):
            B, C, h, w = f.shape
            e, c = self.fibers(f)
            full, base = [], []
            # one call when the fibers fit: no loop bound depends on the batch size (torch.export)
            starts = (0,) if e.shape[0] <= self.inference_chunk else range(0, e.shape[0], self.inference_chunk)
            for s in starts:
                o = self.fiber_loglik(layer, e[s:s + self.inference_chunk], c[s:s + self.inference_chunk])
                full.append(o.log_prob.float())
                base.append(o.logp_sample.float())
            ll = (torch.cat(full) / C).reshape(B, h, w)
            lb = (torch.cat(base) / C).reshape(B, h, w)
            if self.check_finite and not bool(torch.isfinite(ll).all()):
                raise NonFiniteError(f"CFlow log-likelihood of layer {layer} holds NaN/Inf: "
                                     + self.diagnose_nonfinite((layer, e, c)))
            out.append(ScaleLogLik(ll, lb))
        return out

    @torch.no_grad()
    def log_likelihoods(self, x: Union[Tensor, Features]) -> List[Tensor]:
        """Per layer (B, h, w) float32: log p / C of every position (the normalised likelihood)."""
        return [p.ll_full for p in self.score_parts(x)]

    @torch.no_grad()
    def nll_per_dim(self, x: Union[Tensor, Features]) -> Tensor:
        """(B,) float32: each image's negative log-likelihood in nats per dimension, over all layers
        (every position's fiber, base and log-det, with the constant)."""
        feats = self._as_features(x)
        total, dims = 0.0, 0
        for p, f in zip(self.score_parts(feats), feats):
            C = f.shape[1]
            total = total - p.ll_full.flatten(1).sum(1) * C
            dims += f[0].numel()
        return total / dims
