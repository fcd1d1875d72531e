"""Fused ops: launchers and autograd (torch.library custom ops) around the Triton kernels.

One module per op (``coupling``). Importing this package imports neither Triton nor the kernels;
``altub_fast.functional`` imports the op modules lazily, and they import the kernels on first launch.

:class:`CouplingOutput` is what the coupling's entries return, here and in ``altub_fast.functional``
(defined in this package so that importing it registers no custom op).
"""
from typing import NamedTuple, Optional

from torch import Tensor


class CouplingOutput(NamedTuple):
    """The outputs of AllInOneBlock's fused post-subnet step; an absent output is None.

    z: (B, C, *sp) in x's dtype. log_jac_det: (B,) float32 (float64 for float64 data on the
    reference). logp_pixel (B, *sp) and logp_sample (B,), float32: the base log-likelihood of z
    per pixel (summed over channels) and per sample, with the -0.5*log(2 pi) constant; None
    without a base (mu, log_sigma). log_jac_det_pixel (B, *sp) float32: the log-det split per
    pixel (summed over pixels it is log_jac_det); None unless asked for (``pixel_logdet=True``).
    """
    z: Tensor
    log_jac_det: Tensor
    logp_pixel: Optional[Tensor] = None
    logp_sample: Optional[Tensor] = None
    log_jac_det_pixel: Optional[Tensor] = None
