"""FastFlow (arXiv 2111.07677) with AltUB's learnable base (SPEC sections 2, 3 and 6).

Frozen backbone -> (CNNs) trainable LayerNorm([C, h, w]) per scale -> one 2-D flow per scale
(SequenceINN of altub_fast AllInOneBlocks) -> per-scale base N(mu, diag(sigma^2))
(:class:`altub_fast.LearnableGaussian`; a frozen N(0, I) when ``altub=False``).

The loss and the anomaly map both come from :meth:`SequenceINN.forward_loglik`, so the last
block's fused pass (Triton where it can run) computes z, the log-det and the base
log-likelihood together.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..nn import AllInOneBlock, LearnableGaussian, SequenceINN
from ..reference import LOG_2PI
from .backbones import FeatureExtractor, ImageSize, NonFiniteError, build_backbone, nonfinite_flow_parts
from .common import FlowModel
from .config import FastFlowConfig, setting
from .scoring import ScaleLogLik, MapScorer

Features = Union[List[Tensor], Tuple[Tensor, ...]]


class ConvSubnet:
    """FastFlow's subnet constructor: Conv2d(k) -> ReLU -> Conv2d(k), hidden = int(C_in * ratio),
    "same" padding written explicitly (k // 2). A class, so flows pickle."""

    def __init__(self, kernel_size: int, hidden_ratio: float):
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd for 'same' padding, got {kernel_size}")
        self.kernel_size = int(kernel_size)
        self.hidden_ratio = float(hidden_ratio)

    def __call__(self, c_in: int, c_out: int) -> nn.Module:
        hidden = int(c_in * self.hidden_ratio)
        if hidden < 1:
            raise ValueError(f"hidden_ratio {self.hidden_ratio} gives no hidden channels for {c_in} inputs")
        k, p = self.kernel_size, self.kernel_size // 2
        return nn.Sequential(nn.Conv2d(c_in, hidden, k, padding=p), nn.ReLU(),
                             nn.Conv2d(hidden, c_out, k, padding=p))


BLOCKS = ("altub", "freia")


def block_class(block: str = "altub", clamp_mode: str = "legacy", impl: Optional[str] = None):
    """The AllInOneBlock class to build flows from and its extra keywords.

    "altub": altub_fast's block (fused post-subnet step, gather permutation). "freia": FrEIA 0.2's
    own block (the reference implementation FastFlow, CFLOW-AD and anomalib use; a dev dependency),
    for side-by-side comparisons: same seed, same initial weights, same maths.
    """
    if block == "altub":
        return AllInOneBlock, dict(clamp_mode=clamp_mode, impl=impl)
    if block == "freia":
        try:
            from FrEIA.modules import AllInOneBlock as FrEIABlock
        except ImportError as e:
            raise ImportError("block='freia' needs FrEIA 0.2 (pip install FrEIA==0.2)") from e
        if clamp_mode != "legacy":
            raise ValueError(f"FrEIA 0.2's block only has the legacy clamp, not clamp_mode={clamp_mode!r}")
        return FrEIABlock, {}
    raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")


def fastflow_flow(shape: Tuple[int, int, int], flow_steps: int, hidden_ratio: float, conv3x3_only: bool,
                  clamp: float = 2.0, clamp_mode: str = "legacy", impl: Optional[str] = None,
                  block: str = "altub") -> SequenceINN:
    """One scale's flow: ``flow_steps`` AllInOneBlocks, hard permutation, SOFTPLUS global affine;
    k = 3 on even steps, 1 on odd steps unless ``conv3x3_only``."""
    cls, extra = block_class(block, clamp_mode, impl)
    flow = SequenceINN(*shape)
    for i in range(flow_steps):
        k = 1 if (i % 2 == 1 and not conv3x3_only) else 3
        flow.append(cls, subnet_constructor=ConvSubnet(k, hidden_ratio), affine_clamping=clamp,
                    global_affine_type="SOFTPLUS", permute_soft=False, **extra)
    return flow


class FastFlowOutput(NamedTuple):
    """What :meth:`FastFlow.forward` returns. Per-scale lists; log-likelihoods in float32 with the
    -0.5 log(2 pi) constant (as :class:`altub_fast.FlowOutput`)."""
    loss: Tensor                 # scalar: sum over scales of the batch-mean NLL (SPEC 3)
    z: List[Tensor]              # (B, C, h, w)
    log_jac_det: List[Tensor]    # (B,)
    logp_pixel: List[Tensor]     # (B, h, w), summed over channels
    logp_sample: List[Tensor]    # (B,), base term only
    log_jac_det_pixel: List[Optional[Tensor]]  # (B, h, w): each pixel's share of the flow's log-det
                                 # (None with FrEIA's own blocks); the LayerNorm's share is separate


class FastFlow(FlowModel):
    """FastFlow with an AltUB base.

    Args:
      backbone: backbone name (see :func:`build_backbone`) or a ready :class:`FeatureExtractor`.
      image_size: input size (int or (H, W)); sets the LayerNorm shapes.
      pretrained, weights: backbone weights (timm download / packaged file, or a local file).
      altub: learnable base (True) or the fixed N(0, I) of the baseline (False).
      flow_steps, hidden_ratio, conv3x3_only: default per backbone
        (:data:`~altub_fast.models.config.FASTFLOW_DEFAULTS`).
      clamp: affine clamping (2.0); clamp_mode: see :class:`AllInOneBlock`.
      out_indices: timm stages for CNNs (default (1, 2, 3)); vit_block_index: for transformers.
      impl: implementation switch passed to every block (None: ``ALTUB_FAST_IMPL``).
      block: "altub" (default) or "freia" (FrEIA 0.2's AllInOneBlock, the reference, for comparisons).
      check_finite: raise :class:`NonFiniteError` on NaN/Inf in the loss or the maps.
      norm_logdet: count the trainable LayerNorm's elementwise scale in the log-determinant of the
        loss (True, the default: the loss is then the exact NLL of the standardised features and
        cannot fall by shrinking the LayerNorm weights). False: the published FastFlow loss, which
        leaves it out (gathierry/FastFlow, anomalib).
      score, image_score, topk_fraction: the anomaly map and image score (see
        :mod:`altub_fast.models.scoring`; default "fastflow" and "topk", the top-1 % mean).
      feature_blocks: efficientnet_lite0's blocks to take features from (default 4, 10, 15).

    ``forward`` takes images (a tensor (B, 3, H, W)) or precomputed backbone features (a list or
    tuple of tensors, one per scale, as :meth:`extract_features` returns them).

    The arguments live in ``self.config``, a resolved :class:`~altub_fast.models.config.FastFlowConfig`
    (``self.flow_steps`` and the other settings read it); ``FastFlow.from_config(config)`` builds the
    model a config, or a checkpoint's stored dict, describes. Every NLL and score path adds its
    per-scale terms in :meth:`scale_loglik`.
    """

    config_class = FastFlowConfig
    model_name = FastFlowConfig.name
    default_lr = 1e-3
    default_weight_decay = 1e-5
    has_unused_parameters = False  # every update touches every scale's flow

    # settings, read from self.config (the single source of the arguments)
    altub = setting()
    flow_steps = setting()
    hidden_ratio = setting()
    conv3x3_only = setting()
    clamp = setting()
    norm_logdet = setting()
    check_finite = setting(writable=True)

    def __init__(self, backbone: Union[str, FeatureExtractor] = "wide_resnet50_2", *, image_size: ImageSize = 256,
                 pretrained: bool = True, weights: Optional[str] = None, altub: bool = True,
                 flow_steps: Optional[int] = None, hidden_ratio: Optional[float] = None,
                 conv3x3_only: Optional[bool] = None, clamp: float = 2.0, clamp_mode: str = "legacy",
                 out_indices: Optional[Sequence[int]] = None, vit_block_index: Optional[int] = None,
                 impl: Optional[str] = None, block: str = "altub", check_finite: bool = True,
                 norm_logdet: bool = True, score: Optional[str] = None, image_score: Optional[str] = None,
                 topk_fraction: Optional[float] = None, feature_blocks: Optional[Sequence[int]] = None):
        super().__init__()
        extractor = backbone if isinstance(backbone, FeatureExtractor) else None
        given = FastFlowConfig(
            backbone=backbone.name if extractor is not None else backbone, image_size=image_size,
            pretrained=pretrained, weights=weights, altub=altub, flow_steps=flow_steps, hidden_ratio=hidden_ratio,
            conv3x3_only=conv3x3_only, clamp=clamp, clamp_mode=clamp_mode, out_indices=out_indices,
            vit_block_index=vit_block_index, impl=impl, block=block, check_finite=check_finite,
            norm_logdet=norm_logdet, score=score, image_score=image_score, topk_fraction=topk_fraction,
            feature_blocks=feature_blocks)
        block_class(given.block, given.clamp_mode, given.impl)  # validate before building the backbone
        if extractor is None:
            extractor = build_backbone(given.backbone, pretrained=given.pretrained, weights=given.weights,
                                       out_indices=given.out_indices if given.out_indices is not None else (1, 2, 3),
                                       vit_block_index=given.vit_block_index, image_size=tuple(given.image_size),
                                       feature_blocks=given.feature_blocks)
        self.backbone = extractor
        self.config = cfg = given.resolved(extractor)
        self.feature_shapes = self.backbone.feature_shapes(self.image_size)
        # Transformers bring their own final norm; CNN scales get a trainable LayerNorm([C, h, w]).
        vit = self.backbone.kind == "vit"
        self.norms = nn.ModuleList([nn.Identity() if vit else nn.LayerNorm(list(s), elementwise_affine=True)
                                    for s in self.feature_shapes])
        self.flows = nn.ModuleList([fastflow_flow(s, cfg.flow_steps, cfg.hidden_ratio, cfg.conv3x3_only,
                                                  clamp=cfg.clamp, clamp_mode=cfg.clamp_mode, impl=cfg.impl,
                                                  block=cfg.block)
                                    for s in self.feature_shapes])
        self.bases = nn.ModuleList([LearnableGaussian(s[0], learnable=cfg.altub) for s in self.feature_shapes])
        self.scorer = MapScorer(len(self.feature_shapes), self.image_size, cfg.score, cfg.image_score,
                                cfg.topk_fraction)

    # ------------------------------------------------------------------ parameter groups
    @property
    def num_scales(self) -> int:
        return len(self.feature_shapes)

    def flow_parameters(self) -> List[nn.Parameter]:
        """theta_flow: coupling subnets, global affine, LayerNorms (trainable ones only)."""
        return [p for m in (self.norms, self.flows) for p in m.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ features
    def _check_images(self, images: Tensor) -> None:
        super()._check_images(images)
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(f"this FastFlow was built for {self.image_size[0]}x{self.image_size[1]} inputs "
                             f"(LayerNorm shapes depend on it), got {images.shape[-2]}x{images.shape[-1]}")

    def _as_features(self, x: Union[Tensor, Features]) -> List[Tensor]:
        if torch.is_tensor(x):
            return self.extract_features(x)
        feats = list(x)
        if len(feats) != self.num_scales:
            raise ValueError(f"expected {self.num_scales} feature maps, got {len(feats)}")
        for i, (f, s) in enumerate(zip(feats, self.feature_shapes)):
            if tuple(f.shape[1:]) != tuple(s):
                raise ValueError(f"feature map {i} must be (B, {s[0]}, {s[1]}, {s[2]}), got {tuple(f.shape)}")
        return feats

    # ------------------------------------------------------------------ forward and loss
    def norm_logdet_pixel(self, i: int) -> Optional[Tensor]:
        """(h, w) float32: scale ``i``'s LayerNorm elementwise log|weight| summed over channels (its
        log-det per pixel; the standardisation before it is a fixed map of the features), or None
        for a scale without a trainable LayerNorm (transformers)."""
        norm = self.norms[i]
        if not isinstance(norm, nn.LayerNorm) or norm.weight is None:
            return None
        return torch.log(norm.weight.float().abs()).sum(dim=0)

    def scale_loglik(self, i: int, logp: Tensor, log_det: Tensor, *, per_pixel: bool = False,
                     norm: bool = True) -> Tensor:
        """Scale ``i``'s log-likelihood: ``logp + log_det``, plus the LayerNorm's log-det when ``norm``
        (and the scale has a trainable LayerNorm). Every NLL and score path of FastFlow adds its terms here.

        ``logp`` and ``log_det`` are per sample (B,) or, with ``per_pixel``, per feature-map pixel
        (B, h, w; the LayerNorm's share is then its per-pixel map, else its sum). Whether the base's
        -0.5 log(2 pi) constant is in ``logp`` is the caller's choice (the training losses leave it out).
        """
        ll = logp + log_det
        ln = self.norm_logdet_pixel(i) if norm else None
        if ln is not None:
            ll = ll + (ln if per_pixel else ln.sum())
        return ll

    def forward(self, x: Union[Tensor, Features]) -> FastFlowOutput:
        feats = self._as_features(x)
        zs, ljds, lpp, lps, ldp = [], [], [], [], []
        loss = 0.0
        for i, f in enumerate(feats):
            out = self.flows[i].forward_loglik(self.norms[i](f), base=self.bases[i])
            numel = out.z[0].numel()
            # NLL without the constant: -(log p_base + 0.5 log(2 pi) * numel) - log|det J|.
            # With the fixed N(0, I) this is the baseline's 0.5 * sum z^2 - log|det J|.
            ll = self.scale_loglik(i, out.logp_sample + (0.5 * LOG_2PI) * numel, out.log_jac_det,
                                   norm=self.norm_logdet)
            loss = loss + (-ll).mean()
            zs.append(out.z)
            ljds.append(out.log_jac_det)
            lpp.append(out.logp_pixel)
            lps.append(out.logp_sample)
            ldp.append(out.log_jac_det_pixel)
        return FastFlowOutput(loss, zs, ljds, lpp, lps, ldp)

    def loss(self, x: Union[Tensor, Features]) -> Tensor:
        return self(x).loss

    # --- the trainer's protocol -------------------------------------------------------------
    def training_units(self, features: Features, generator: Optional[torch.Generator] = None) -> Iterator[Features]:
        """One optimiser update per image batch."""
        yield features

    def step_loss(self, unit: Features) -> Tuple[Tensor, List[Tensor]]:
        """(loss, [z per scale]) for one ordinary update."""
        out = self(unit)
        return out.loss, out.z

    def base_only_loss(self, unit: Features) -> Tuple[Tensor, List[Tensor]]:
        """The loss of a base-only update: the flow runs without a graph, so only mu and log sigma
        receive gradients (SPEC 2). The LayerNorm's log-det, which does not depend on them, is left
        out whatever ``norm_logdet`` says (the value is the baseline's loss)."""
        feats = self._as_features(unit)
        loss = 0.0
        zs = []
        for i, f in enumerate(feats):
            with torch.no_grad():
                z, ljd = self.flows[i](self.norms[i](f))
            lp = self.bases[i].log_prob(z, reduction="sample", include_const=False)
            loss = loss + (-self.scale_loglik(i, lp, ljd, norm=False)).mean()
            zs.append(z)
        return loss, zs

    def diagnose_nonfinite(self, unit: Features) -> str:
        """Where a non-finite loss came from (called only after one was seen)."""
        with torch.no_grad():
            feats = self._as_features(unit)
            parts = []
            for i, f in enumerate(feats):
                if not bool(torch.isfinite(f).all()):
                    parts.append(f"backbone features of scale {i} hold NaN/Inf")
                    continue
                z, ljd = self.flows[i](self.norms[i](f))
                parts += nonfinite_flow_parts(f"scale {i}", z, ljd, self.bases[i])
            return "; ".join(parts) or "features, z, log-dets and base are finite (overflow in the sum)"

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score_parts(self, x: Union[Tensor, Features]) -> List[ScaleLogLik]:
        """Per scale, the per-dimension log-likelihoods of every feature-map pixel (B, h, w):
        full (base log p(z) summed over channels + the pixel's log-det share of the flow and of the
        LayerNorm, divided by C) and base-only (see :mod:`altub_fast.models.scoring`)."""
        out = self(x)
        parts = []
        for i, (z, lpp, ldp) in enumerate(zip(out.z, out.logp_pixel, out.log_jac_det_pixel)):
            C = z.shape[1]
            full = None
            if ldp is not None:
                full = self.scale_loglik(i, lpp.float(), ldp.float(), per_pixel=True) / C
            parts.append(ScaleLogLik(full, lpp.float() / C))
        if self.check_finite:
            for i, p in enumerate(parts):
                if not bool(torch.isfinite(p.ll_base).all()) or (p.ll_full is not None
                                                                 and not bool(torch.isfinite(p.ll_full).all())):
                    raise NonFiniteError(f"FastFlow log-likelihood of scale {i} holds NaN/Inf: "
                                         + self.diagnose_nonfinite(self._as_features(x)))
        return parts

    @torch.no_grad()
    def nll_per_dim(self, x: Union[Tensor, Features]) -> Tensor:
        """(B,) float32: each image's negative log-likelihood in nats per dimension, over all scales,
        with every log-det (flow and LayerNorm) and the constant: the exact NLL of the standardised
        features, whatever ``norm_logdet`` says the training loss counts."""
        out = self(x)
        total, dims = 0.0, 0
        for i, (z, lps, ljd) in enumerate(zip(out.z, out.logp_sample, out.log_jac_det)):
            total = total - self.scale_loglik(i, lps.float(), ljd.float())
            dims += z[0].numel()
        return total / dims
