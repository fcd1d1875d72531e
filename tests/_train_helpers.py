"""Small models and data the trainer tests share (pytest puts tests/ on sys.path)."""
import math

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from altub_fast.models import CFlow, FastFlow, FeatureExtractor


class TinyBackbone(FeatureExtractor):
    """Two strided convs with fixed random weights: 8 channels at stride 4, 16 at stride 8."""

    def __init__(self):
        super().__init__("tiny", [8, 16], [4, 8], "random")
        g = torch.Generator().manual_seed(123)
        self.c1 = nn.Conv2d(3, 8, 4, stride=4)
        self.c2 = nn.Conv2d(8, 16, 2, stride=2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        self.freeze()

    def forward(self, x):
        a = torch.relu(self.c1(x))
        return [a, torch.relu(self.c2(a))]


def make_images(n=24, size=32, seed=0):
    """Structured 'normal' images: oriented sinusoids with a little noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    imgs = []
    for i in range(n):
        phase = 2 * math.pi * torch.rand(1, generator=g)
        base = torch.sin(12 * xx + 3 * yy + phase)
        img = torch.stack([base, 0.5 * base, -base]) + 0.1 * torch.randn(3, size, size, generator=g)
        imgs.append(img)
    return torch.stack(imgs)


class DictSet(Dataset):
    """Yields dicts like altub_fast.data.MVTecAD."""

    def __init__(self, images, labels=None):
        self.images = images
        self.labels = labels if labels is not None else torch.zeros(len(images), dtype=torch.long)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "mask": torch.zeros(1, *self.images.shape[-2:]),
                "label": int(self.labels[i]), "defect": "good", "path": f"img_{i}.png"}


def fastflow(altub=True, seed=0):
    torch.manual_seed(seed)
    np.random.seed(seed)
    return FastFlow(TinyBackbone(), image_size=32, flow_steps=2, hidden_ratio=1.0, altub=altub)


def cflow(altub=True, seed=0):
    torch.manual_seed(seed)
    np.random.seed(seed)
    return CFlow(TinyBackbone(), image_size=32, coupling_blocks=2, condition_dim=8, fiber_batch_size=32, altub=altub)


OPTS = dict(batch_size=8, progress=False, seed=3)


def params(model):
    return {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}


class PathSet(DictSet):
    """A DictSet whose images have file names (``paths``), like MVTecAD, and that records which
    items were read (``reads``)."""

    def __init__(self, images, prefix="img"):
        super().__init__(images)
        self.paths = [f"/data/{prefix}_{i:03d}.png" for i in range(len(images))]
        self.reads = []

    def __getitem__(self, i):
        self.reads.append(int(i))
        item = super().__getitem__(i)
        item["path"] = self.paths[i]
        return item


class ScriptedNLL(FastFlow):
    """A tiny FastFlow whose NLL follows a script: after its e-th epoch of training (counted by its
    own updates, in a buffer, so that it resumes), ``nll_per_dim`` gives ``script[e - 1]`` for every
    image (the last value after the script ends). Training itself is real."""

    def __init__(self, script, updates_per_epoch, seed=0):
        torch.manual_seed(seed)
        super().__init__(TinyBackbone(), image_size=32, flow_steps=1, hidden_ratio=1.0, altub=False)
        self.script = [float(v) for v in script]
        self.updates_per_epoch = int(updates_per_epoch)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def step_loss(self, unit):
        self.updates += 1
        return super().step_loss(unit)

    def nll_per_dim(self, x):
        n = self._as_features(x)[0].shape[0]
        epoch = int(self.updates) // self.updates_per_epoch
        return torch.full((n,), self.script[min(max(epoch, 1), len(self.script)) - 1])
