"""Helpers shared by the test files (pytest puts tests/ on sys.path: `from _helpers import ...`)."""
import importlib.util
import os

import torch
import torch.nn as nn


def make_subnet(rank, hidden=8):
    """A small subnet constructor for data with ``rank`` spatial axes: Linear (rank 0) or
    Conv1d/2d/3d with 'same' padding, hidden -> ReLU -> out."""
    def ctor(c_in, c_out):
        if rank == 0:
            return nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU(), nn.Linear(hidden, c_out))
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[rank]
        return nn.Sequential(conv(c_in, hidden, 3, padding=1), nn.ReLU(), conv(hidden, c_out, 3, padding=1))
    return ctor


def randomise_base(model, scale=0.3, generator=None):
    """Move every scale's learnable base (mu, log sigma) of a flow model off its N(0, I) init,
    reproducibly (seed 5 unless a generator is given); returns the generator."""
    g = generator if generator is not None else torch.Generator().manual_seed(5)
    with torch.no_grad():
        for b in model.bases:
            b.mu.copy_(scale * torch.randn(b.mu.shape, generator=g))
            b.log_sigma.copy_(scale * torch.randn(b.log_sigma.shape, generator=g))
    return g


def load_benchmark_script(stem):
    """A script of benchmarks/ (``stem``.py, not a test module) imported as a module."""
    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", f"{stem}.py")
    spec = importlib.util.spec_from_file_location(stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
