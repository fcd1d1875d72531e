"""Anomaly maps and image scores from a flow's per-pixel log-likelihoods (both models).

A model hands over, per scale (FastFlow) or pooled layer (CFLOW-AD), two (B, h, w) float32 maps,
each per dimension (divided by the scale's channel count C):

- ``ll_full``: the full log-likelihood of the feature vector at that position: the base's log p(z)
  summed over channels, plus that position's share of the flow's log-determinant (the coupling
  log-scales summed over channels and blocks, the global affine's sum of log Psi, and, for FastFlow,
  the LayerNorm's elementwise log|weight|). This is the exact log-density of the features there:
  the coupling Jacobian is diagonal in the transformed channels at each pixel.
- ``ll_base``: the base term alone (what FastFlow's published map uses).

Score modes (``score=``, the pixel map):

- ``"loglik"`` (FastFlow's default): per scale, the negative full log-likelihood standardised by its mean and
  standard deviation over the pixels of held-out *normal* training images; bilinear upsampling
  (align_corners=False); mean over scales. Without the standardisation, a scale with more log-density
  spread would outvote the others.
- ``"fastflow"``: the FastFlow paper's map, -exp(mean over channels of log p(z)) without the
  constant (SPEC 3). Needs no calibration.
- ``"cflow"`` (CFLOW-AD's default): CFLOW-AD's map, per layer exp(ll_full - M) upsampled (align_corners=True) and summed,
  map = T - sum (SPEC 4). The official code takes M and T over the whole *test* set; here they come
  from the held-out normal images, so an image's score does not depend on which other images are scored.

Image score (``image_score=``): ``[MAP/]RULE``. RULE is ``"max"`` (the map's maximum, SPEC 5 and
the papers), ``"topk"`` (the mean of the top ``topk_fraction`` of the map's pixels, 1 % unless
given) or ``"topk:F"``. MAP, when given, is the map the image score is taken from, which may differ
from the pixel map; without it the image score comes from the pixel map (the form every checkpoint
written before issue 19 stores, so they keep their rules).

The defaults are the rules with the highest *minimum* over every data set measured, the two
held-out real sets of issue 19 included (issue 19's study, ``docs/results.md``). FastFlow: the
``loglik`` pixel map, whose worst set is 0.780 pixel AUROC where FastFlow's map falls to 0.681
(aligned dark tyres, where its map lights up the background). Both models: the image score
``fastflow/topk:0.2``, the top 20 % of FastFlow's map, with the highest worst-case image AUROC (0.785)
of the image rules measured on every set. CFLOW-AD: its own ``cflow`` map (``CFlowConfig.default_score``),
which keeps the Jacobian as ``loglik`` does and beat it on CFLOW-AD on both sets where they were compared;
no held-out set measured CFLOW-AD.

Every constant is a registered buffer of :class:`MapScorer` (so it is in the state_dict, in every
checkpoint and in an exported model) and is set only by :meth:`MapScorer.fit` from held-out normal
images, never from test data.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..reference import LOG_2PI

SCORE_MODES = ("loglik", "fastflow", "cflow")
IMAGE_SCORES = ("max", "topk")
DEFAULT_SCORE = "loglik"                 # the highest worst-case pixel AUROC (issue 19), see the docstring
DEFAULT_IMAGE_SCORE = "fastflow/topk:0.2"  # the highest worst-case image AUROC (issue 19)
DEFAULT_TOPK_FRACTION = 0.01             # of a bare "topk" (the pre-issue-19 default image score)


class ScaleLogLik(NamedTuple):
    """One scale's per-dimension log-likelihoods, (B, h, w) float32 each (see the module docstring)."""
    ll_full: Optional[Tensor]
    ll_base: Tensor


class ImageScoreRule(NamedTuple):
    """An image score: the map it is taken from (None: the pixel map), "max" | "topk", the fraction."""
    map: Optional[str]
    rule: str
    fraction: float

    @property
    def spec(self) -> str:
        """The rule as ``image_score=`` takes it (without the fraction, which is stored beside it)."""
        return f"{self.map}/{self.rule}" if self.map else self.rule


def parse_image_rule(image_score: Optional[str], topk_fraction: Optional[float] = None) -> ImageScoreRule:
    """:class:`ImageScoreRule` from "[MAP/]max", "[MAP/]topk" or "[MAP/]topk:F" (None: the default).
    An explicit ``topk_fraction`` wins over a bare "topk"'s 1 %; "topk:F" wins over both."""
    spec = (image_score or DEFAULT_IMAGE_SCORE).strip().lower()
    src: Optional[str] = None
    if "/" in spec:
        src, spec = (t.strip() for t in spec.split("/", 1))
        if src not in SCORE_MODES:
            raise ValueError(f"the map of image_score {image_score!r} must be one of {SCORE_MODES}, got {src!r}")
    rule, frac = parse_image_score(spec, topk_fraction)
    return ImageScoreRule(src, rule, frac)


def parse_image_score(image_score: Optional[str], topk_fraction: Optional[float] = None) -> Tuple[str, float]:
    """("max" | "topk", fraction) from "max", "topk" or "topk:F" (no map; see :func:`parse_image_rule`)."""
    if image_score is None:
        return parse_image_rule(None, topk_fraction)[1:]
    rule = image_score.strip().lower()
    frac = DEFAULT_TOPK_FRACTION if topk_fraction is None else float(topk_fraction)
    if rule.startswith("topk:"):
        rule, f = rule.split(":", 1)
        try:
            frac = float(f)
        except ValueError:
            raise ValueError(f"image_score 'topk:F' needs a number F in (0, 1], got {image_score!r}") from None
    if rule not in IMAGE_SCORES:
        raise ValueError(f"image_score must be one of {IMAGE_SCORES} (or 'topk:F'), got {image_score!r}")
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"the top-k fraction must be in (0, 1], got {frac}")
    return rule, frac


def check_score_mode(score: Optional[str]) -> str:
    mode = (score or DEFAULT_SCORE).strip().lower()
    if mode not in SCORE_MODES:
        raise ValueError(f"score must be one of {SCORE_MODES}, got {score!r}")
    return mode


def image_scores_from_maps(maps: Tensor, rule: str = "max", fraction: float = DEFAULT_TOPK_FRACTION) -> Tensor:
    """(N,) image scores from (N, H, W) maps: the maximum, or the mean of the top ``fraction`` of pixels."""
    flat = maps.flatten(1)
    if rule == "max":
        return flat.amax(dim=1)
    if rule == "topk":
        k = max(1, int(math.ceil(fraction * flat.shape[1])))
        return flat.topk(k, dim=1).values.mean(dim=1)
    raise ValueError(f"unknown image score rule {rule!r}")


class MapScorer(nn.Module):
    """Turns per-scale :class:`ScaleLogLik` into anomaly maps (N, H, W) and image scores (N,).

    Buffers (set by :meth:`fit` from held-out normal images; defaults before that): ``loc`` and
    ``scale`` (S,) for "loglik", ``cflow_max`` (S,) and ``cflow_total`` () for "cflow", and
    ``calibrated`` (a bool). A checkpoint written before these existed loads with the defaults.
    """

    def __init__(self, num_scales: int, image_size: Tuple[int, int], score: Optional[str] = None,
                 image_score: Optional[str] = None, topk_fraction: Optional[float] = None):
        super().__init__()
        self.num_scales = int(num_scales)
        self.image_size = tuple(int(v) for v in image_size)
        self.mode = check_score_mode(score)
        self.set_image_rule(parse_image_rule(image_score, topk_fraction))
        for name, value in self._defaults().items():
            self.register_buffer(name, value)
        self._register_load_state_dict_pre_hook(self._fill_missing)

    def _defaults(self) -> dict:
        S = self.num_scales
        return dict(loc=torch.zeros(S), scale=torch.ones(S), cflow_max=torch.zeros(S),
                    cflow_total=torch.zeros(()), calibrated=torch.zeros((), dtype=torch.bool))

    def _fill_missing(self, state_dict, prefix, *args):
        for name, value in self._defaults().items():
            state_dict.setdefault(prefix + name, value)

    def set_image_rule(self, rule: ImageScoreRule) -> None:
        self.image_map, self.image_rule, self.topk_fraction = rule.map, rule.rule, rule.fraction

    @property
    def image_score_rule(self) -> ImageScoreRule:
        return ImageScoreRule(self.image_map, self.image_rule, self.topk_fraction)

    @property
    def image_score_spec(self) -> str:
        """The image score as ``image_score=`` takes it: "topk", "max" or "MAP/topk" (checkpoints store it)."""
        return self.image_score_rule.spec

    @property
    def rules(self) -> dict:
        """The rules in words, as eval's table and results.json name them."""
        src = self.image_map or self.mode
        what = "maximum" if self.image_rule == "max" else f"mean of the top {100 * self.topk_fraction:g} %"
        return {"score": self.mode, "image_score": self.image_score_spec, "topk_fraction": self.topk_fraction,
                "image_score_text": f"{what} of the {src} map"}

    @property
    def is_calibrated(self) -> bool:
        return bool(self.calibrated)

    @property
    def description(self) -> dict:
        return dict(score=self.mode, image_score=self.image_score_spec, topk_fraction=self.topk_fraction,
                    calibrated=self.is_calibrated)

    # ------------------------------------------------------------------ maps
    def _check(self, parts: Sequence[ScaleLogLik], mode: str) -> None:
        if len(parts) != self.num_scales:
            raise ValueError(f"expected {self.num_scales} scales of log-likelihoods, got {len(parts)}")
        if mode != "fastflow" and any(p.ll_full is None for p in parts):
            raise ValueError(f"score={mode!r} needs the flow's per-pixel log-determinant, which this flow does not "
                             "give (FrEIA's own AllInOneBlock, block='freia', reports only per-sample log-dets); "
                             "use score='fastflow'")

    def maps(self, parts: Sequence[ScaleLogLik], mode: Optional[str] = None,
             size: Optional[Tuple[int, int]] = None) -> Tensor:
        """(B, H, W) float32 anomaly maps (higher = more anomalous) in ``mode`` (default: the model's)."""
        mode = check_score_mode(mode or self.mode)
        self._check(parts, mode)
        size = tuple(size) if size is not None else self.image_size
        if mode == "fastflow":
            per = [-torch.exp(p.ll_base.float() + 0.5 * LOG_2PI) for p in parts]
            return _upsample_mean(per, size, align_corners=False)
        if mode == "loglik":
            per = [(self.loc[i] - p.ll_full.float()) / self.scale[i] for i, p in enumerate(parts)]
            return _upsample_mean(per, size, align_corners=False)
        # cflow
        acc = 0.0
        for i, p in enumerate(parts):
            prob = torch.exp(p.ll_full.float() - self.cflow_max[i]).unsqueeze(1)
            acc = acc + F.interpolate(prob, size=size, mode="bilinear", align_corners=True).squeeze(1)
        return self.cflow_total - acc

    def image_scores(self, maps: Tensor) -> Tensor:
        """Image scores from maps of the image score's own map (see :meth:`forward`)."""
        return image_scores_from_maps(maps, self.image_rule, self.topk_fraction)

    def forward(self, parts: Sequence[ScaleLogLik], size: Optional[Tuple[int, int]] = None) -> Tuple[Tensor, Tensor]:
        """(pixel maps (B, H, W), image scores (B,)): the image score from its own map when it names
        one that differs from the pixel map. Each image's outputs depend on that image alone."""
        maps = self.maps(parts, size=size)
        src = maps if self.image_map in (None, self.mode) else self.maps(parts, mode=self.image_map, size=size)
        return maps, self.image_scores(src)

    # ------------------------------------------------------------------ calibration
    @torch.no_grad()
    def fit(self, parts: Sequence[ScaleLogLik]) -> None:
        """Set every mode's constants from held-out normal images' log-likelihoods (per scale, all
        images concatenated along the batch axis)."""
        if len(parts) != self.num_scales:
            raise ValueError(f"expected {self.num_scales} scales of log-likelihoods, got {len(parts)}")
        if parts[0].ll_base.shape[0] < 1:
            raise ValueError("calibration needs at least one held-out normal image")
        dev = self.loc.device
        full = all(p.ll_full is not None for p in parts)
        for i, p in enumerate(parts):
            ll = (p.ll_full if full else p.ll_base).double()
            if not bool(torch.isfinite(ll).all()):
                raise ValueError(f"held-out log-likelihoods of scale {i} hold NaN/Inf; cannot calibrate")
            self.loc[i] = ll.mean().to(dev)
            self.scale[i] = ll.std(unbiased=False).clamp_min(1e-6).to(dev) if ll.numel() > 1 else 1.0
            self.cflow_max[i] = ll.max().to(dev)
        if full:
            self.cflow_total.zero_()
            total = self.maps(parts, mode="cflow")   # with cflow_total = 0: -sum
            self.cflow_total.fill_(float((-total).max()))
        self.calibrated.fill_(True)

    def extra_repr(self) -> str:
        return (f"scales={self.num_scales}, score={self.mode!r}, image_score={self.image_score_spec!r}, "
                f"topk_fraction={self.topk_fraction}, calibrated={self.is_calibrated}")


def _upsample_mean(per_scale: List[Tensor], size, align_corners: bool) -> Tensor:
    ups = [F.interpolate(m.unsqueeze(1), size=size, mode="bilinear", align_corners=align_corners)
           for m in per_scale]
    return torch.stack(ups, dim=-1).mean(dim=-1).squeeze(1).float()


def concat_parts(batches: Sequence[Sequence[ScaleLogLik]]) -> List[ScaleLogLik]:
    """Per-batch lists of ScaleLogLik -> one list with every batch concatenated (on the CPU)."""
    if not batches:
        raise ValueError("no batches of log-likelihoods")
    out = []
    for i in range(len(batches[0])):
        full = [b[i].ll_full for b in batches]
        out.append(ScaleLogLik(None if any(f is None for f in full) else torch.cat([f.cpu() for f in full]),
                               torch.cat([b[i].ll_base.cpu() for b in batches])))
    return out
