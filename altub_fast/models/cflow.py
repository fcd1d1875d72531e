"""CFLOW-AD (arXiv 2107.12571) with AltUB's learnable base (SPEC sections 2, 4 and 6).

Frozen backbone (wide_resnet50_2 layer2/3/4 by default) -> per pooled layer, "fibers" (one
C-vector per feature-map position) conditioned on a 2-D sin/cos positional encoding -> one
conditional flow per layer (SequenceINN(C) of 8 AllInOneBlocks) -> per-layer base
N(mu, diag(sigma^2)) (a frozen N(0, I) when ``altub=False``).

Training follows gudovskiy/cflow-ad: for each image batch and each layer, the B*h*w fibers are
shuffled and split into fiber batches (``fiber_batch_size``, 256; the incomplete remainder is
dropped, as there), one optimiser update per fiber batch; loss = mean of -logsigmoid(log p / C).

Scoring: per layer exp(log p / C - max), upsampled (align_corners=True), summed over layers;
anomaly map = max - sum. The max is taken over the whole test set (as the official code does):
:meth:`CFlow.maps_from_log_likelihoods` takes all test log-likelihoods at once, and
``altub_fast.train.predict`` uses it. :meth:`CFlow.anomaly_map` on a single batch uses that batch
as the set (scores then depend on the batch composition, as anomalib's do).
"""
from __future__ import annotations

import math
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..nn import AllInOneBlock, LearnableGaussian, SequenceINN
from .backbones import (EFFICIENTNET_LITE0, FeatureExtractor, ImageSize, NonFiniteError, as_hw, base_name,
                        build_backbone, is_vit_name, nonfinite_flow_parts)
from .common import FlowModel

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
    """

    model_name = "cflow"
    default_lr = 2e-4
    default_weight_decay = 0.0

    def __init__(self, backbone: Union[str, FeatureExtractor] = "wide_resnet50_2", *, image_size: ImageSize = 256,
                 pretrained: bool = True, weights: Optional[str] = None, altub: bool = True,
                 out_indices: Optional[Sequence[int]] = None, condition_dim: int = 128, coupling_blocks: int = 8,
                 clamp: float = 1.9, fiber_batch_size: int = 256, permute_soft: bool = False,
                 clamp_mode: str = "legacy", impl: Optional[str] = None, check_finite: bool = True,
                 inference_chunk: int = 65536):
        super().__init__()
        if condition_dim % 4 != 0:
            raise ValueError(f"condition_dim must be a multiple of 4, got {condition_dim}")
        self.image_size = as_hw(image_size)
        if isinstance(backbone, FeatureExtractor):
            self.backbone = backbone
        else:
            if is_vit_name(backbone):
                raise ValueError("CFlow takes CNN backbones (multi-scale feature maps), not transformers "
                                 f"such as {backbone!r}")
            effnet = base_name(backbone) == EFFICIENTNET_LITE0
            idx = None if effnet else (tuple(out_indices) if out_indices is not None else (2, 3, 4))
            self.backbone = build_backbone(backbone, pretrained=pretrained, weights=weights, out_indices=idx,
                                           image_size=self.image_size)
        if self.backbone.kind == "vit":
            raise ValueError("CFlow takes CNN backbones (multi-scale feature maps), not transformers")
        self.altub = bool(altub)
        self.condition_dim = int(condition_dim)
        self.coupling_blocks = int(coupling_blocks)
        self.clamp = float(clamp)
        self.fiber_batch_size = int(fiber_batch_size)
        self.check_finite = bool(check_finite)
        self.inference_chunk = int(inference_chunk)
        self.channels = list(self.backbone.channels)
        self.feature_shapes = self.backbone.feature_shapes(self.image_size)
        self.decoders = nn.ModuleList([cflow_decoder(c, self.condition_dim, self.coupling_blocks, self.clamp,
                                                     permute_soft, clamp_mode, impl) for c in self.channels])
        self.bases = nn.ModuleList([LearnableGaussian(c, learnable=self.altub) for c in self.channels])
        self._pos_cache: Dict[Tuple[int, int, str], Tensor] = {}
        self.config = dict(name=self.model_name, backbone=self.backbone.name, image_size=list(self.image_size),
                           pretrained=pretrained, weights=weights, altub=self.altub,
                           out_indices=list(out_indices) if out_indices is not None else None,
                           condition_dim=self.condition_dim, coupling_blocks=self.coupling_blocks, clamp=self.clamp,
                           fiber_batch_size=self.fiber_batch_size, permute_soft=permute_soft, clamp_mode=clamp_mode,
                           impl=impl, backbone_weights_origin=self.backbone.weights_origin)

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
    def log_likelihoods(self, x: Union[Tensor, Features]) -> List[Tensor]:
        """Per layer (B, h, w) float32: log p / C of every position (the normalised likelihood)."""
        feats = self._as_features(x)
        out = []
        for layer, f in enumerate(feats):
            B, C, h, w = f.shape
            e, c = self.fibers(f)
            parts = []
            for s in range(0, e.shape[0], self.inference_chunk):
                parts.append(self.fiber_loglik(layer, e[s:s + self.inference_chunk], c[s:s + self.inference_chunk]).log_prob)
            ll = (torch.cat(parts).float() / C).reshape(B, h, w)
            if self.check_finite and not bool(torch.isfinite(ll).all()):
                raise NonFiniteError(f"CFlow log-likelihood of layer {layer} holds NaN/Inf: "
                                     + self.diagnose_nonfinite((layer, e, c)))
            out.append(ll)
        return out

    @torch.no_grad()
    def maps_from_log_likelihoods(self, log_likelihoods: Sequence[Tensor], image_size: Optional[ImageSize] = None,
                                  chunk: int = 32) -> Tuple[Tensor, Tensor]:
        """Anomaly maps of a whole set from all its log-likelihoods at once.

        ``log_likelihoods``: per layer (N, h, w) (as :meth:`log_likelihoods`, concatenated over
        the set). Per layer exp(ll - max over the set) (float64), bilinear upsampling with
        align_corners=True, sum over layers; map = max over the set - sum. Returns (maps (N, H, W)
        float32 on the CPU, scores (N,) = per-image max of the map).
        """
        size = as_hw(image_size) if image_size is not None else self.image_size
        lls = [ll.detach().cpu().double() for ll in log_likelihoods]
        if len(lls) != self.num_scales:
            raise ValueError(f"expected {self.num_scales} layers of log-likelihoods, got {len(lls)}")
        n = lls[0].shape[0]
        maxes = [ll.max() for ll in lls]
        score = torch.empty(n, *size, dtype=torch.float64)
        for s in range(0, n, chunk):
            acc = torch.zeros(min(chunk, n - s), *size, dtype=torch.float64)
            for ll, mx in zip(lls, maxes):
                prob = torch.exp(ll[s:s + chunk] - mx).unsqueeze(1)
                acc += F.interpolate(prob, size=size, mode="bilinear", align_corners=True).squeeze(1)
            score[s:s + chunk] = acc
        maps = (score.max() - score).float()
        if self.check_finite and not bool(torch.isfinite(maps).all()):
            raise NonFiniteError("CFlow anomaly maps hold NaN/Inf (non-finite log-likelihoods)")
        return maps, maps.flatten(1).amax(dim=1)

    @torch.no_grad()
    def anomaly_map(self, x: Union[Tensor, Features]) -> Tuple[Tensor, Tensor]:
        """(maps (B, H, W) float32, scores (B,)) using this batch as the set for the max (see the
        module docstring; prefer ``altub_fast.train.predict`` for test-set scores)."""
        size = tuple(x.shape[-2:]) if torch.is_tensor(x) else self.image_size
        maps, scores = self.maps_from_log_likelihoods(self.log_likelihoods(x), size)
        dev = x.device if torch.is_tensor(x) else x[0].device
        return maps.to(dev), scores.to(dev)

    # predict() protocol: collect log-likelihoods per batch, normalise over the whole set at the end.
    def partial_anomaly_map(self, x: Union[Tensor, Features]) -> List[Tensor]:
        return [ll.cpu() for ll in self.log_likelihoods(x)]

    def combine_anomaly_maps(self, parts: Sequence[List[Tensor]]) -> Tuple[Tensor, Tensor]:
        lls = [torch.cat([p[l] for p in parts]) for l in range(self.num_scales)]
        return self.maps_from_log_likelihoods(lls)
