"""Helpers shared by the test files (pytest puts tests/ on sys.path: `from _helpers import ...`)."""
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
