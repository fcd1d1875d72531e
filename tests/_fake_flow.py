"""A tiny flow for the trainer's parts' tests: no backbone, no DDP, a few parameters.

Its "features" are 2x2 average pools of the images (one scale, 3 channels); its flow is a
per-channel affine map z = (x - shift) * exp(-log_scale); its base a per-channel Gaussian (mu,
log sigma), learnable when ``altub``. It implements ``altub_fast.models.protocol.TrainableFlow``
and the few other members the trainer reads (``bases``, ``backbone``, ``trainable_state_dict``),
and counts the images it extracts features of (``extracted``).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset


class FakeBackbone(nn.Module):
    random_weights = False

    def describe(self):
        return {"name": "fake", "weights_origin": "none"}


class FakeBase(nn.Module):
    def __init__(self, channels, learnable):
        super().__init__()
        self.num_channels = channels
        self.mu = nn.Parameter(torch.zeros(channels), requires_grad=learnable)
        self.log_sigma = nn.Parameter(torch.zeros(channels), requires_grad=learnable)


class FakeFlow(nn.Module):
    default_lr = 0.05
    default_weight_decay = 0.0
    has_unused_parameters = False
    num_scales = 1

    def __init__(self, altub=True, channels=3):
        super().__init__()
        self.altub = bool(altub)
        self.config = {"name": "fake", "altub": self.altub, "channels": channels}
        self.backbone = FakeBackbone()
        self.shift = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.bases = nn.ModuleList([FakeBase(channels, self.altub)])
        self.register_buffer("loc", torch.zeros(()))     # the calibration constant
        self.extracted = 0

    def flow_parameters(self):
        return [self.shift, self.log_scale]

    def base_parameters(self):
        return [p for p in self.bases.parameters() if p.requires_grad]

    def trainable_state_dict(self, include_backbone=False):
        return dict(self.state_dict())

    @torch.no_grad()
    def extract_features(self, images):
        self.extracted += images.shape[0]
        return [F.avg_pool2d(images.float(), 2)]

    def training_units(self, features, generator=None):
        yield list(features)

    def _z(self, features):
        x = features[0]
        z = (x - self.shift.view(1, -1, 1, 1)) * torch.exp(-self.log_scale).view(1, -1, 1, 1)
        return z, -self.log_scale.sum() * x.shape[2] * x.shape[3]

    def _nll_per_image(self, z, logdet):
        base = self.bases[0]
        mu, log_sigma = base.mu.view(1, -1, 1, 1), base.log_sigma.view(1, -1, 1, 1)
        per_dim = 0.5 * ((z - mu) * torch.exp(-log_sigma)) ** 2 + log_sigma + 0.5 * math.log(2 * math.pi)
        return per_dim.flatten(1).sum(1) - logdet

    def step_loss(self, unit):
        z, logdet = self._z(unit)
        return self._nll_per_image(z, logdet).mean() / z[0].numel(), [z]

    def base_only_loss(self, unit):
        with torch.no_grad():
            z, logdet = self._z(unit)
        return self._nll_per_image(z, logdet).mean() / z[0].numel(), [z]

    def diagnose_nonfinite(self, unit):
        return f"fake flow: {int((~torch.isfinite(self._z(unit)[0])).sum())} non-finite z values"

    @torch.no_grad()
    def nll_per_dim(self, x):
        z, logdet = self._z(x)
        return self._nll_per_image(z, logdet) / z[0].numel()

    @torch.no_grad()
    def calibrate(self, batches):
        scores = torch.cat([self.nll_per_dim(list(b)) for b in batches])
        self.loc.fill_(float(scores.mean()))
        return (scores - self.loc).float()

    def scoring_rules(self):
        return {"score": "fake_nll", "image_score": "mean"}


class Images(Dataset):
    """``n`` seeded random images (3, 8, 8) with file names, recording which items were read."""

    def __init__(self, n=12, seed=0, prefix="img"):
        g = torch.Generator().manual_seed(seed)
        self.images = 1.5 + 0.5 * torch.randn(n, 3, 8, 8, generator=g)
        self.paths = [f"/data/{prefix}_{i:03d}.png" for i in range(n)]
        self.reads = []

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        self.reads.append(int(i))
        return {"image": self.images[i], "path": self.paths[i]}
