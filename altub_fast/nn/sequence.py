"""FrEIA's SequenceINN, plus a one-call log-likelihood under a base distribution."""
from __future__ import annotations

from typing import Iterable, List, NamedTuple, Optional

import torch
import torch.nn as nn
from torch import Tensor

from .. import functional
from .allinone import InvertibleModule
from .base import LearnableGaussian


class FlowOutput(NamedTuple):
    """What :meth:`SequenceINN.forward_loglik` returns. Log-likelihoods are float32 and include the
    -0.5*log(2 pi) constant; ``log_prob`` = ``logp_sample + log_jac_det``.

    ``log_jac_det_pixel`` (B, *sp) float32 is the flow's log-det split per pixel, accumulated over
    all blocks (summed over pixels it is ``log_jac_det``); None when some block cannot split its
    log-det (one without ``forward_pixel``, e.g. FrEIA's own AllInOneBlock)."""
    z: Tensor
    log_jac_det: Tensor
    logp_pixel: Tensor
    logp_sample: Tensor
    log_jac_det_pixel: Optional[Tensor] = None

    @property
    def log_prob(self) -> Tensor:
        return self.logp_sample + self.log_jac_det


class SequenceINN(InvertibleModule):
    """A chain of invertible blocks with FrEIA's API: ``append(BlockClass, cond=None,
    cond_shape=None, **kwargs)``, indexing, ``len``, iteration, and
    ``forward(x, c=None, rev=False, jac=True) -> (z, log_jac_det)``.

    ``forward_loglik(x, c, base)`` also evaluates the base distribution on z; when the last block
    is an altub_fast AllInOneBlock it does so inside the same fused pass.
    """

    def __init__(self, *dims: int, force_tuple_output: bool = False):
        super().__init__([dims])
        self.shapes = [tuple(dims)]
        self.conditions: List[Optional[int]] = []
        self.module_list = nn.ModuleList()
        self.force_tuple_output = force_tuple_output

    def append(self, module_class, cond: Optional[int] = None, cond_shape=None, **kwargs):
        dims_in = [self.shapes[-1]]
        self.conditions.append(cond)
        if cond is not None:
            if cond_shape is None:
                raise ValueError("append(..., cond=i) needs cond_shape, the condition's shape without batch")
            kwargs["dims_c"] = [tuple(cond_shape)]
        module = module_class(dims_in, **kwargs)
        self.module_list.append(module)
        output_dims = module.output_dims(dims_in)
        if len(output_dims) != 1:
            raise ValueError("Module has more than one output")
        self.shapes.append(tuple(output_dims[0]))

    def __getitem__(self, item):
        return self.module_list.__getitem__(item)

    def __len__(self):
        return self.module_list.__len__()

    def __iter__(self):
        return self.module_list.__iter__()

    def output_dims(self, input_dims):
        if not self.force_tuple_output:
            raise ValueError("You can only call output_dims on a SequenceINN when setting force_tuple_output=True.")
        return input_dims

    def _cond(self, i: int, c) -> list:
        if self.conditions[i] is None:
            return []
        if c is None:
            raise ValueError(f"block {i} is conditional (condition index {self.conditions[i]}) but no conditions were given")
        return [c[self.conditions[i]]]

    def forward(self, x_or_z, c: Optional[Iterable[Tensor]] = None, rev: bool = False, jac: bool = True):
        iterator = range(len(self.module_list))
        log_det_jac = 0
        if rev:
            iterator = reversed(iterator)
        if torch.is_tensor(x_or_z):
            x_or_z = (x_or_z,)
        for i in iterator:
            cond = self._cond(i, c)
            if cond:
                x_or_z, j = self.module_list[i](x_or_z, c=cond, jac=jac, rev=rev)
            else:
                x_or_z, j = self.module_list[i](x_or_z, jac=jac, rev=rev)
            log_det_jac = j + log_det_jac
        return (x_or_z if self.force_tuple_output else x_or_z[0]), log_det_jac

    def forward_loglik(self, x: Tensor, c: Optional[Iterable[Tensor]] = None,
                       base: Optional[LearnableGaussian] = None) -> FlowOutput:
        """Run the flow forward and evaluate ``base`` (None: N(0, I)) on its output.

        The last block, if it has ``forward_loglik`` (altub_fast's AllInOneBlock), computes z, its
        log-det and the base log-likelihood in one fused pass; otherwise the base is evaluated after.
        Blocks with ``forward_pixel`` also give their per-pixel log-det, summed into
        ``log_jac_det_pixel`` (None if any block has none).
        """
        if len(self.module_list) == 0:
            raise ValueError("the flow has no blocks")
        mu = base.mu if base is not None else None
        log_sigma = base.log_sigma if base is not None else None
        if base is not None and base.num_channels != self.shapes[-1][0]:
            raise ValueError(f"base has {base.num_channels} channels, the flow outputs {self.shapes[-1][0]}")
        xs = (x,)
        log_det_jac = 0
        ld_pixel = 0  # becomes None once a block cannot split its log-det per pixel
        n = len(self.module_list)
        for i in range(n - 1):
            block, cond = self.module_list[i], self._cond(i, c)
            if hasattr(block, "forward_pixel"):
                xs, j, jp = block.forward_pixel(xs, c=cond)
            else:
                xs, j = block(xs, c=cond, jac=True) if cond else block(xs, jac=True)
                jp = None
            log_det_jac = j + log_det_jac
            ld_pixel = None if (jp is None or ld_pixel is None) else jp + ld_pixel
        last = self.module_list[n - 1]
        cond = self._cond(n - 1, c)
        if hasattr(last, "forward_loglik"):
            z, j, logp_pixel, logp_sample, jp = last.forward_loglik(xs, c=cond, mu=mu, log_sigma=log_sigma)
        else:
            (z,), j = last(xs, c=cond, jac=True) if cond else last(xs, jac=True)
            jp = None
            logp_pixel = functional.gaussian_log_prob(z, mu, log_sigma, reduction="pixel")
            logp_sample = logp_pixel.reshape(z.shape[0], -1).sum(1)
        ld_pixel = None if (jp is None or ld_pixel is None) else jp + ld_pixel
        return FlowOutput(z, j + log_det_jac, logp_pixel, logp_sample, ld_pixel)

    def log_prob(self, x: Tensor, c: Optional[Iterable[Tensor]] = None,
                 base: Optional[LearnableGaussian] = None) -> Tensor:
        """Per-sample log-likelihood of x under the flow and base, (B,) float32."""
        return self.forward_loglik(x, c, base).log_prob
