"""AltUBCflow: anomalib's Cflow (CFLOW-AD) with altub_fast's blocks and AltUB's learnable base.

:class:`AltUBCflowModel` has the layout of anomalib's ``CflowModel`` (``encoder``, ``decoders``;
the same state_dict keys for timm CNN backbones) plus ``bases`` (one
:class:`altub_fast.LearnableGaussian` per pooled layer); a state_dict without ``bases.*`` loads
with N(0, I) bases. Each decoder is altub_fast's ``cflow_decoder`` (conditional AllInOneBlocks,
the fused kernels on CUDA), built with anomalib's arguments.

Training follows anomalib's ``Cflow.training_step``: per layer, the B*h*w fibers are shuffled and
cut into fiber batches (the last one takes the remainder); each fiber batch is one update, on the
loss mean(-logsigmoid(log p / C)) with log p the base's log N(z; mu, sigma) (with its constant)
plus the log-det. AltUB's schedule counts these updates.

Scoring is anomalib's: per layer log p / C of every fiber (decoded in chunks of
``fiber_batch_size``, all at once when exporting) into anomalib's ``AnomalyMapGenerator``
(exp(log p / C - max), upsampled and summed, map = max - sum; note that anomalib takes both maxima
over the batch, so a map depends on the other images of its batch). With N(0, I) bases log p is
bit for bit anomalib's ``get_logp``.
"""
from __future__ import annotations

import math
from typing import Iterator, List, Optional, Sequence, Tuple

import einops
import torch
import torch.nn as nn
import torch.nn.functional as F
from anomalib.data import Batch, InferenceBatch
from anomalib.models import Cflow
from anomalib.models.components import AnomalibModule
from anomalib.models.image.cflow.anomaly_map import AnomalyMapGenerator
from anomalib.models.image.cflow.utils import positional_encoding_2d
from torch import Tensor

from ...models import cflow_decoder
from ...nn import LearnableGaussian
from .backbones import ANOMALIB_CFLOW_LAYERS, cflow_encoder
from .training import AltUBTraining, ScheduleLike, resolve_schedule

LN_SQRT_2PI = -math.log(math.sqrt(2 * math.pi))  # anomalib's get_logp constant, per dimension


class AltUBCflowModel(nn.Module):
    """CFLOW-AD's torch model with AltUB bases (anomalib's ``CflowModel`` arguments, plus
    ``altub``, ``weights`` (efficientnet_lite0) and ``impl``). ``forward(images)`` gives
    ``InferenceBatch(pred_score, anomaly_map)``."""

    def __init__(self, backbone: str, layers: Sequence[str], pre_trained: bool = True, fiber_batch_size: int = 64,
                 decoder: str = "freia-cflow", condition_vector: int = 128, coupling_blocks: int = 8,
                 clamp_alpha: float = 1.9, permute_soft: bool = False, altub: bool = True,
                 weights: Optional[str] = None, impl: Optional[str] = None):
        super().__init__()
        if decoder != "freia-cflow":
            raise ValueError(f"AltUBCflow has anomalib's 'freia-cflow' decoder only, got decoder={decoder!r}")
        if condition_vector % 4 != 0:
            raise ValueError(f"condition_vector must be a multiple of 4, got {condition_vector}")
        if fiber_batch_size < 1:
            raise ValueError(f"fiber_batch_size must be >= 1, got {fiber_batch_size}")
        self.backbone = backbone
        self.fiber_batch_size = int(fiber_batch_size)
        self.condition_vector = int(condition_vector)
        self.dec_arch = decoder
        self.encoder, self.pool_layers = cflow_encoder(backbone, layers, pre_trained, weights)
        for p in self.encoder.parameters():
            p.requires_grad = False
        self.pool_dims = list(self.encoder.out_dims)
        self.altub = bool(altub)
        self.decoders = nn.ModuleList([cflow_decoder(c, self.condition_vector, int(coupling_blocks), float(clamp_alpha),
                                                     bool(permute_soft), impl=impl) for c in self.pool_dims])
        self.bases = nn.ModuleList([LearnableGaussian(c, learnable=self.altub) for c in self.pool_dims])
        self.anomaly_map_generator = AnomalyMapGenerator(pool_layers=self.pool_layers)
        self._register_load_state_dict_pre_hook(self._default_bases)

    def _default_bases(self, state_dict, prefix, *args) -> None:
        """anomalib's Cflow state_dicts have no ``bases.*``: keep this model's (N(0, I) when new)."""
        for name, value in self.bases.state_dict().items():
            state_dict.setdefault(f"{prefix}bases.{name}", value.detach().clone())

    def flow_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.decoders.parameters() if p.requires_grad]

    def base_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.bases.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ fibers
    def activations(self, images: Tensor) -> List[Tensor]:
        """The frozen encoder's feature map of each pooled layer."""
        self.encoder.eval()
        with torch.no_grad():
            act = self.encoder(images)
        return [act[layer].detach() for layer in self.pool_layers]

    def fibers(self, feature: Tensor) -> Tuple[Tensor, Tensor]:
        """(B, C, h, w) -> fibers (B*h*w, C) and positional conditions (B*h*w, P), as anomalib."""
        b, _, h, w = feature.shape
        pos = einops.repeat(positional_encoding_2d(self.condition_vector, h, w).unsqueeze(0),
                            "b c h w-> (tile b) c h w", tile=b).to(feature.device)
        return (einops.rearrange(feature, "b c h w -> (b h w) c"), einops.rearrange(pos, "b c h w -> (b h w) c"))

    def training_units(self, images: Tensor) -> Iterator[Tuple[int, Tensor, Tensor]]:
        """(layer, fibers, conditions) per fiber batch, in anomalib's order and split."""
        for layer, feature in enumerate(self.activations(images)):
            e_r, c_r = self.fibers(feature)
            n = e_r.shape[0]
            batches = n // self.fiber_batch_size
            if batches <= 0:
                raise ValueError(f"layer {self.pool_layers[layer]!r} gives {n} fibers per image batch, fewer than "
                                 f"fiber_batch_size={self.fiber_batch_size}: decrease it or raise the batch size")
            perm = torch.randperm(n)
            for k in range(batches):
                stop = (k + 1) * self.fiber_batch_size if k < batches - 1 else n
                idx = perm[torch.arange(k * self.fiber_batch_size, stop)]
                yield layer, e_r[idx], c_r[idx]

    def _loss(self, logp: Tensor, c: int) -> Tensor:
        return (-F.logsigmoid(logp / c)).mean()

    def unit_loss(self, layer: int, e: Tensor, c: Tensor) -> Tensor:
        """An ordinary update's loss on one fiber batch (the decoder's fused pass)."""
        out = self.decoders[layer].forward_loglik(e, [c], base=self.bases[layer])
        return self._loss(out.log_prob, e.shape[1])

    def unit_base_only_loss(self, layer: int, e: Tensor, c: Tensor) -> Tensor:
        """The same loss with the decoder run without a graph: only the base gets gradients."""
        with torch.no_grad():
            z, ljd = self.decoders[layer](e, [c])
        return self._loss(self.bases[layer].log_prob(z, reduction="sample") + ljd, e.shape[1])

    def fiber_logp(self, layer: int, e: Tensor, c: Tensor) -> Tensor:
        """log p / C of each fiber: anomalib's get_logp with the base's mean and scale."""
        with torch.no_grad():
            z, ljd = self.decoders[layer](e, [c])
        base = self.bases[layer]
        u = (z - base.mu) / torch.exp(base.log_sigma)
        dim = e.shape[1]
        return (dim * LN_SQRT_2PI - 0.5 * torch.sum(u ** 2, 1) - base.log_sigma.sum() + ljd) / dim

    def forward(self, images: Tensor) -> InferenceBatch:
        distribution, height, width = [], [], []
        for layer, feature in enumerate(self.activations(images)):
            height.append(feature.shape[2])
            width.append(feature.shape[3])
            e_r, c_r = self.fibers(feature)
            n = e_r.shape[0]
            # rows decode independently; when exporting, one call (chunks would be unrolled in the graph)
            size = n if torch.compiler.is_compiling() else self.fiber_batch_size
            parts = [self.fiber_logp(layer, e_r[s:s + size], c_r[s:s + size]) for s in range(0, n, size)]
            distribution.append(torch.cat(parts))
        anomaly_map = self.anomaly_map_generator(distribution=distribution, height=height, width=width,
                                                 image_size=images.shape[-2:])
        return InferenceBatch(pred_score=torch.amax(anomaly_map, dim=(-2, -1)), anomaly_map=anomaly_map)


class AltUBCflow(AltUBTraining, Cflow):
    """anomalib's Cflow trained with AltUB.

    anomalib's arguments (``backbone``, ``layers``, ``pre_trained``, ``fiber_batch_size``,
    ``decoder``, ``condition_vector``, ``coupling_blocks``, ``clamp_alpha``, ``permute_soft``,
    ``lr``, ``pre_processor``, ``post_processor``, ``evaluator``, ``visualizer``) mean what they
    mean there; ``backbone="efficientnet_lite0"`` (offline ImageNet weights) takes layers
    ``"blocks.N"`` (anomalib's default layers stand for blocks 4, 10, 15). AltUB's ``altub``,
    ``k``, ``r``, ``base_lr``, ``warmup``, ``schedule`` as in
    :class:`~altub_fast.integrations.anomalib.AltUBFastflow`; one update is one fiber batch.
    ``image_size``: the input size of anomalib's default pre-processor (default 256).

    ``__init__`` builds :class:`AltUBCflowModel` instead of anomalib's (it calls
    ``AnomalibModule.__init__`` directly); the rest of Cflow is inherited.
    """

    def __init__(self, backbone: str = "wide_resnet50_2", layers: Sequence[str] = ANOMALIB_CFLOW_LAYERS,
                 pre_trained: bool = True, fiber_batch_size: int = 64, decoder: str = "freia-cflow",
                 condition_vector: int = 128, coupling_blocks: int = 8, clamp_alpha: float = 1.9,
                 permute_soft: bool = False, lr: float = 0.0001, altub: bool = True, k: Optional[int] = None,
                 r: Optional[float] = None, base_lr: Optional[float] = None, warmup: Optional[int] = None,
                 schedule: ScheduleLike = None, image_size: Optional[Sequence[int]] = None,
                 weights: Optional[str] = None, impl: Optional[str] = None,
                 pre_processor=True, post_processor=True, evaluator=True, visualizer=True) -> None:
        if pre_processor is True and image_size is not None:
            size = (int(image_size), int(image_size)) if isinstance(image_size, int) else tuple(image_size)
            pre_processor = self.configure_pre_processor(size)
        # Lightning's save_hyperparameters collects the arguments of each __init__ frame that holds
        # the __class__ cell; naming it here creates the cell (this __init__ calls no zero-arg super())
        assert __class__ is not None
        AnomalibModule.__init__(self, pre_processor=pre_processor, post_processor=post_processor,
                                evaluator=evaluator, visualizer=visualizer)
        self.model = AltUBCflowModel(backbone=backbone, layers=layers, pre_trained=pre_trained,
                                     fiber_batch_size=fiber_batch_size, decoder=decoder,
                                     condition_vector=condition_vector, coupling_blocks=coupling_blocks,
                                     clamp_alpha=clamp_alpha, permute_soft=permute_soft, altub=altub,
                                     weights=weights, impl=impl)
        self.learning_rate = lr
        self._setup_altub(altub, resolve_schedule(schedule, k, r, base_lr, warmup), lr, 0.0)

    def training_step(self, batch: Batch, *args, **kwargs):
        del args, kwargs
        total = torch.zeros([1], dtype=torch.float64, device=batch.image.device)
        for layer, e, c in self.model.training_units(batch.image):
            loss = self.altub_update(lambda: self.model.unit_loss(layer, e, c),
                                     lambda: self.model.unit_base_only_loss(layer, e, c))
            total += loss * e.shape[0]
        self._log_altub(total, batch.image.shape[0])
        return {"loss": total}
