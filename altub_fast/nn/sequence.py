"""FrEIA's SequenceINN (0.2's and master's API), plus a one-call log-likelihood under a base distribution."""
from __future__ import annotations

import operator
from typing import Iterable, List, NamedTuple, Optional

import torch
import torch.nn as nn
from torch import Tensor

from .. import functional
from ..ops import CouplingOutput
from ._freia_compat import InvertibleModule, dims_list
from .allinone import AllInOneBlock
from .base import LearnableGaussian


class FlowOutput(NamedTuple):
    """What :meth:`SequenceINN.forward_loglik` returns. Log-likelihoods are float32 and include the
    -0.5*log(2 pi) constant; ``log_prob`` = ``logp_sample + log_jac_det``.

    ``log_jac_det_pixel`` (B, *sp) float32 is the flow's log-det split per pixel, accumulated over
    all blocks (summed over pixels it is ``log_jac_det``); None when some block cannot split its
    log-det (any block but altub_fast's AllInOneBlock, e.g. FrEIA's own)."""
    z: Tensor
    log_jac_det: Tensor
    logp_pixel: Tensor
    logp_sample: Tensor
    log_jac_det_pixel: Optional[Tensor] = None

    @property
    def log_prob(self) -> Tensor:
        return self.logp_sample + self.log_jac_det


class SequenceINN(InvertibleModule):
    """A chain of invertible blocks with FrEIA's API, 0.2's and master's:

    - ``append(BlockClass, cond=None, cond_shape=None, **kwargs)`` builds a block with
      ``dims_in=[previous output shape]``; ``append(block, cond=None)`` takes a built
      InvertibleModule whose ``dims_in`` is that;
    - ``flow[i]``, ``len``, iteration; ``flow[i:j:k]`` is a SequenceINN of the same block objects
      (not copies), its condition indices renumbered in order of first use, and a negative step
      runs the blocks inverted (:class:`Inverse`);
    - ``flow[i] = block`` replaces a block by one with the same input, output and condition shapes;
    - ``output_dims()`` is ``[output shape]``;
    - ``forward(x, c=None, rev=False, jac=True) -> (z, log_jac_det)``; ``c`` is the list of
      conditions, block i gets ``c[cond_i]``.

    ``forward_loglik(x, c, base)`` also evaluates the base distribution on z; when the last block
    is an altub_fast AllInOneBlock it does so inside the same fused pass.
    """

    def __init__(self, *dims: int, force_tuple_output: bool = False):
        try:
            shape = tuple(operator.index(d) for d in dims)
        except TypeError:
            raise TypeError("SequenceINN takes the input shape without the batch axis as integers, "
                            f"SequenceINN(C, H, W); got SequenceINN{dims!r}") from None
        super().__init__([shape])
        self.shapes = [shape]
        self.conditions: List[Optional[int]] = []
        self.module_list = nn.ModuleList()
        self.force_tuple_output = force_tuple_output

    def append(self, module_class, cond: Optional[int] = None, cond_shape=None, **kwargs):
        """Append a block class (built here, with ``dims_c=[cond_shape]`` when ``cond`` is given) or a
        built InvertibleModule. ``cond``: the index, in forward's ``c``, of the block's condition."""
        dims_in = [self.shapes[-1]]
        if isinstance(module_class, nn.Module):
            module = self._check_built(module_class, dims_in, cond, cond_shape, kwargs)
        else:
            if cond is not None:
                if cond_shape is None:
                    raise ValueError("append(..., cond=i) needs cond_shape, the condition's shape without batch")
                kwargs["dims_c"] = [tuple(cond_shape)]
            module = module_class(dims_in, **kwargs)
        output_dims = dims_list(module.output_dims(dims_in), "output_dims")
        if len(output_dims) != 1:
            raise ValueError(f"{type(module).__name__} has {len(output_dims)} outputs; a SequenceINN block has one")
        self.module_list.append(module)
        self.conditions.append(cond)
        self.shapes.append(output_dims[0])

    @staticmethod
    def _check_built(module: nn.Module, dims_in, cond, cond_shape, kwargs) -> nn.Module:
        name = type(module).__name__
        if not isinstance(module, InvertibleModule):
            raise TypeError(f"append takes an InvertibleModule class or a built InvertibleModule; "
                            f"{name} is not an InvertibleModule")
        if kwargs:
            raise ValueError(f"append got a built {name} and constructor arguments {sorted(kwargs)}; "
                             "pass a class with arguments, or a built block alone")
        if dims_list(module.dims_in, "dims_in") != dims_in:
            raise ValueError(f"the built {name} takes input shape(s) {module.dims_in}, but the previous "
                             f"block outputs {dims_in}")
        dims_c = dims_list(module.dims_c, "dims_c")
        if cond is None and dims_c:
            raise ValueError(f"the built {name} is conditional (dims_c={dims_c}): pass cond=<index of its "
                             "condition in forward's c>")
        if cond is not None and len(dims_c) != 1:
            raise ValueError(f"append(..., cond={cond}) feeds one condition, but the built {name} takes "
                             f"{len(dims_c)} (dims_c={dims_c})")
        if cond_shape is not None and dims_c != [tuple(cond_shape)]:
            raise ValueError(f"cond_shape={tuple(cond_shape)} but the built {name} has dims_c={dims_c}")
        return module

    def __getitem__(self, item):
        if not isinstance(item, slice):
            return self.module_list[item]
        start, stop, step = item.indices(len(self))
        # The sub-flow's input is the first block's input, or its output when running inverted.
        sub = SequenceINN(*self.shapes[start + 1 if step < 0 else start],
                          force_tuple_output=self.force_tuple_output)
        renumbered = {}
        for i in range(start, stop, step):
            cond = self.conditions[i]
            if cond is not None:
                cond = renumbered.setdefault(cond, len(renumbered))
            sub.append(self.module_list[i] if step > 0 else Inverse(self.module_list[i]), cond=cond)
        return sub

    def __setitem__(self, index, module):
        """Replace block ``index`` by a built InvertibleModule with the same input, output and
        condition shapes (FrEIA master's checks)."""
        if isinstance(index, slice):
            raise TypeError("SequenceINN item assignment takes one index; replace blocks one at a time")
        old = self.module_list[index]
        if not isinstance(module, InvertibleModule):
            raise TypeError(f"a SequenceINN block must be an InvertibleModule, got {type(module).__name__}")
        for what, want, got in (("input", old.dims_in, module.dims_in),
                                ("output", old.output_dims(old.dims_in), module.output_dims(module.dims_in)),
                                ("condition", old.dims_c, module.dims_c)):
            if dims_list(want, what) != dims_list(got, what):
                raise ValueError(f"block {index} has {what} shape(s) {dims_list(want, what)}; the replacement "
                                 f"{type(module).__name__} has {dims_list(got, what)}")
        self.module_list[index] = module

    def __len__(self):
        return self.module_list.__len__()

    def __iter__(self):
        return self.module_list.__iter__()

    def output_dims(self, input_dims=None):
        """``[output shape]``. Called with input shapes (FrEIA's InvertibleModule API), it needs
        ``force_tuple_output=True``, as in FrEIA, and this flow's own ``dims_in``."""
        if input_dims is None:
            return [self.shapes[-1]]
        if not self.force_tuple_output:
            raise ValueError("You can only call output_dims on a SequenceINN when setting force_tuple_output=True.")
        if dims_list(input_dims, "input_dims") != self.dims_in:
            raise ValueError(f"output_dims got input shape(s) {input_dims}; this SequenceINN takes {self.dims_in}")
        return [self.shapes[-1]]

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

        altub_fast's AllInOneBlocks run their full forward (:meth:`AllInOneBlock.forward_outputs`):
        each gives its per-pixel log-det, summed into ``log_jac_det_pixel``, and the last one
        computes z, its log-det and the base log-likelihood in one fused pass. Any other block runs
        its FrEIA call: it has no per-pixel log-det (``log_jac_det_pixel`` is then None), and when
        it is the last one the base is evaluated after it.
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
        for i in range(n):
            out = self._block_outputs(i, xs, c, i == n - 1, mu, log_sigma)
            xs = (out.z,)
            log_det_jac = out.log_jac_det + log_det_jac
            jp = out.log_jac_det_pixel
            ld_pixel = None if (jp is None or ld_pixel is None) else jp + ld_pixel
        if out.logp_pixel is None:
            logp_pixel = functional.gaussian_log_prob(out.z, mu, log_sigma, reduction="pixel")
            out = out._replace(logp_pixel=logp_pixel, logp_sample=logp_pixel.reshape(out.z.shape[0], -1).sum(1))
        return FlowOutput(out.z, log_det_jac, out.logp_pixel, out.logp_sample, ld_pixel)

    def _block_outputs(self, i: int, xs, c, last: bool, mu: Optional[Tensor],
                       log_sigma: Optional[Tensor]) -> CouplingOutput:
        """Block i's outputs: an AllInOneBlock's full forward (per-pixel log-det; the base
        log-likelihood too when it is the ``last``), else the FrEIA call's z and log-det alone."""
        block, cond = self.module_list[i], self._cond(i, c)
        if isinstance(block, AllInOneBlock):
            return block.forward_outputs(xs, c=cond, pixel_logdet=True, loglik=last, mu=mu, log_sigma=log_sigma)
        zs, j = block(xs, c=cond, jac=True) if cond else block(xs, jac=True)
        return CouplingOutput(zs if torch.is_tensor(zs) else zs[0], j)

    def log_prob(self, x: Tensor, c: Optional[Iterable[Tensor]] = None,
                 base: Optional[LearnableGaussian] = None) -> Tensor:
        """Per-sample log-likelihood of x under the flow and base, (B,) float32."""
        return self.forward_loglik(x, c, base).log_prob


class Inverse(InvertibleModule):
    """``module`` run the other way round: its forward is ``module(..., rev=True)`` and its reverse
    ``module``'s forward (as FrEIA master's ``FrEIA.modules.Inverse``). A SequenceINN slice with a
    negative step holds these."""

    def __init__(self, module: nn.Module):
        if not isinstance(module, InvertibleModule):
            raise TypeError(f"Inverse takes an InvertibleModule, got {type(module).__name__}")
        outputs = module.output_dims(None) if isinstance(module, SequenceINN) else module.output_dims(module.dims_in)
        super().__init__(dims_list(outputs, "output_dims"), dims_list(module.dims_c, "dims_c"))
        self.module = module

    def output_dims(self, input_dims):
        return dims_list(self.module.dims_in, "dims_in")

    def forward(self, x_or_z, c=None, rev: bool = False, jac: bool = True):
        if c is not None and len(c) > 0:  # FrEIA modules without conditions take no c argument
            return self.module(x_or_z, c=c, rev=not rev, jac=jac)
        return self.module(x_or_z, rev=not rev, jac=jac)
