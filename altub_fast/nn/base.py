"""AltUB's learnable base distribution N(mu, diag(sigma^2)) (SPEC section 2)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from .. import functional


class LearnableGaussian(nn.Module):
    """Per-channel Gaussian base with parameters ``mu`` and ``log_sigma`` (log standard deviation),
    both initialised to 0, so training starts from N(0, I).

    ``learnable=False`` freezes it into the fixed N(0, I) of the baseline flows (the parameters stay
    in the state_dict, at zero, with requires_grad=False). ``freeze()`` / ``unfreeze()`` switch later.
    """

    def __init__(self, num_channels: int, learnable: bool = True):
        super().__init__()
        if int(num_channels) < 1:
            raise ValueError(f"num_channels must be >= 1, got {num_channels}")
        self.num_channels = int(num_channels)
        self.mu = nn.Parameter(torch.zeros(self.num_channels), requires_grad=learnable)
        self.log_sigma = nn.Parameter(torch.zeros(self.num_channels), requires_grad=learnable)

    @property
    def learnable(self) -> bool:
        return self.mu.requires_grad

    def freeze(self, reset: bool = True) -> "LearnableGaussian":
        """Make it the fixed N(0, I) (``reset=False`` keeps the current mu and sigma fixed)."""
        if reset:
            with torch.no_grad():
                self.mu.zero_()
                self.log_sigma.zero_()
        self.mu.requires_grad_(False)
        self.log_sigma.requires_grad_(False)
        return self

    def unfreeze(self) -> "LearnableGaussian":
        self.mu.requires_grad_(True)
        self.log_sigma.requires_grad_(True)
        return self

    @property
    def sigma(self) -> Tensor:
        return self.log_sigma.exp()

    def _check(self, z: Tensor) -> None:
        if z.dim() < 2 or z.shape[1] != self.num_channels:
            raise ValueError(f"LearnableGaussian({self.num_channels}) expected z of shape "
                             f"(B, {self.num_channels}, ...), got {tuple(z.shape)}")

    def log_prob(self, z: Tensor, reduction: str = "none", include_const: bool = True,
                 impl: Optional[str] = None) -> Tensor:
        """log p(z) per element ("none"), per pixel summed over channels ("pixel") or per sample
        ("sample"), in float32."""
        self._check(z)
        return functional.gaussian_log_prob(z, self.mu, self.log_sigma, reduction=reduction,
                                            include_const=include_const, impl=impl)

    def sample(self, batch: int, *spatial: int, generator: Optional[torch.Generator] = None) -> Tensor:
        shape = (batch, self.num_channels, *spatial)
        eps = torch.randn(shape, generator=generator, device=self.mu.device)
        view = (1, self.num_channels, *([1] * len(spatial)))
        return self.mu.detach().view(view) + self.sigma.detach().view(view) * eps

    def extra_repr(self) -> str:
        return f"num_channels={self.num_channels}, learnable={self.learnable}"
