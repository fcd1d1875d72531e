"""A drop-in for FrEIA 0.2's AllInOneBlock (SPEC section 1).

Same constructor, same state_dict keys and shapes (``global_scale``, ``global_offset``, ``w_perm``,
``w_perm_inv`` or ``vk_householder``/``w_0``, ``subnet.*``), same ``forward(x, c=[], rev=False,
jac=True) -> ((z,), log_jac_det)``, same numbers. Differences, all invisible in the outputs:
- the hard permutation runs as an index gather (O(C) per pixel) instead of FrEIA's dense 1x1
  convolution (O(C^2)); the dense matrices stay in the state_dict for compatibility, and the
  index form is rebuilt from ``w_perm`` whenever a state_dict is loaded;
- everything after the subnet is one fused op (``altub_fast.functional.coupling_forward``),
  served by the Triton kernels where they can run;
- ``clamp_mode`` selects the soft clamp ("legacy" = FrEIA 0.2, "freia" = FrEIA master, "atan");
- it is a FrEIA ``InvertibleModule`` when FrEIA is importable (see ``_freia_compat``), loads FrEIA
  master's checkpoints too (index-form ``w_perm``), and saves in either layout
  (``state_dict_layout``: "dense" = FrEIA 0.2 / anomalib, "index" = FrEIA master).
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import functional, reference
from ..ops import CouplingOutput
from . import _freia_compat, cpu_fast
from ._freia_compat import InputShapeError, InvertibleModule, dims_list


def _shape_str(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


class AllInOneBlock(InvertibleModule):
    """Affine coupling + soft clamp + global affine (ActNorm) + permutation, FrEIA-compatible.

    Args are FrEIA 0.2's (see SPEC section 1), plus:
      clamp_mode: "legacy" (alpha*tanh(a), FrEIA 0.2 / anomalib), "freia" (alpha*tanh(a/alpha),
        FrEIA master) or "atan" (alpha*0.636*atan(a)).
      impl: None (``ALTUB_FAST_IMPL``), "auto", "triton" or "torch" for the fused step.
      state_dict_layout: how ``state_dict()`` stores a hard permutation, "dense" (FrEIA 0.2 /
        anomalib, (C, C, 1, ...) matrices) or "index" (FrEIA master, (C,) index vectors); loading
        takes either. ``altub_fast.nn.set_state_dict_layout(model, ...)`` sets it for a whole model.
    """

    def __init__(self, dims_in, dims_c=[], subnet_constructor: Callable = None,
                 affine_clamping: float = 2., gin_block: bool = False, global_affine_init: float = 1.,
                 global_affine_type: str = "SOFTPLUS", permute_soft: bool = False,
                 learned_householder_permutation: int = 0, reverse_permutation: bool = False,
                 clamp_mode: str = "legacy", impl: Optional[str] = None, state_dict_layout: str = "dense"):
        super().__init__(dims_list(dims_in, "dims_in"), dims_list(dims_c, "dims_c"))
        if len(self.dims_in) != 1:
            raise ValueError(f"AllInOneBlock takes exactly one input, got dims_in={dims_in}")
        channels = self.dims_in[0][0]
        self.input_rank = len(self.dims_in[0]) - 1
        if self.input_rank > 3:
            raise ValueError(f"Data is {1 + self.input_rank}D. Must be 1D-4D.")
        self.sum_dims = tuple(range(1, 2 + self.input_rank))
        if len(self.dims_c) == 0:
            self.conditional = False
            self.condition_channels = 0
        else:
            for dc in self.dims_c:
                if tuple(dc[1:]) != tuple(self.dims_in[0][1:]):
                    raise ValueError(f"Dimensions of input and condition don't agree: {dims_c} vs {dims_in}.")
            self.conditional = True
            self.condition_channels = sum(dc[0] for dc in self.dims_c)
        if clamp_mode not in reference.CLAMP_MODES:
            raise ValueError(f"clamp_mode must be one of {reference.CLAMP_MODES}, got {clamp_mode!r}")
        if global_affine_type not in reference.AFFINE_TYPES:
            raise ValueError('Global affine activation must be "SIGMOID", "SOFTPLUS" or "EXP"')

        self.splits = [channels - channels // 2, channels // 2]
        self.permute_function = {0: F.linear, 1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[self.input_rank]
        self.in_channels = channels
        self.clamp = affine_clamping
        self.clamp_mode = clamp_mode
        self.GIN = gin_block
        self.reverse_pre_permute = reverse_permutation
        self.householder = learned_householder_permutation
        self.permute_soft = permute_soft
        self.global_affine_type = global_affine_type
        self.impl = impl

        g0 = reference.global_scale_init(global_affine_init, global_affine_type)
        shape = (1, channels, *([1] * self.input_rank))
        self.global_scale = nn.Parameter(torch.ones(shape) * float(g0))
        self.global_offset = nn.Parameter(torch.zeros(shape))

        self._init_permutation(channels)

        if subnet_constructor is None:
            raise ValueError("Please supply a callable subnet_constructor function or object (see docstring)")
        self.subnet = subnet_constructor(self.splits[0] + self.condition_channels, 2 * self.splits[1])
        self.last_jac = None
        self.state_dict_layout = state_dict_layout

    def _init_permutation(self, channels: int) -> None:
        """The permutation's parameters (dense ``w_perm``/``w_perm_inv``, or Householder ``vk_householder``
        and ``w_0``) and the index form of a hard one (buffers ``perm``/``perm_inv``)."""
        if self.permute_soft and channels > 512:
            warnings.warn("Soft permutation will take a very long time to initialize "
                          f"with {channels} feature channels. Consider using hard permutation instead.")

        # The same draws from numpy's global generator as FrEIA, so a seeded construction gives
        # FrEIA's permutation.
        if self.permute_soft:
            from scipy.stats import special_ortho_group
            w = special_ortho_group.rvs(channels)
        else:
            w = np.zeros((channels, channels))
            for i, j in enumerate(np.random.permutation(channels)):
                w[i, j] = 1.

        if self.householder:
            self.vk_householder = nn.Parameter(0.2 * torch.randn(self.householder, channels), requires_grad=True)
            self.w_perm = None
            self.w_perm_inv = None
            self.w_0 = nn.Parameter(torch.FloatTensor(w), requires_grad=False)
        else:
            self.w_perm = nn.Parameter(torch.FloatTensor(w).view(channels, channels, *([1] * self.input_rank)),
                                       requires_grad=False)
            self.w_perm_inv = nn.Parameter(torch.FloatTensor(w.T).view(channels, channels, *([1] * self.input_rank)),
                                           requires_grad=False)
        self.hard_permutation = not (self.permute_soft or self.householder)
        # Index form of the hard permutation; not in the state_dict (w_perm is), rebuilt on load.
        self.register_buffer("perm", reference.perm_from_matrix(self.w_perm.data) if self.hard_permutation
                             else torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("perm_inv", reference.invert_perm(self.perm) if self.hard_permutation
                             else torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_load_state_dict_post_hook(AllInOneBlock._rebuild_perm_hook)

    def output_dims(self, input_dims):
        return input_dims

    # ------------------------------------------------------------------ checkpoint layouts
    @property
    def state_dict_layout(self) -> str:
        """How ``state_dict()`` stores a hard permutation: "dense" (FrEIA 0.2 / anomalib) or
        "index" (FrEIA master). Loading accepts both, whatever this is."""
        return self._state_dict_layout

    @state_dict_layout.setter
    def state_dict_layout(self, layout: str) -> None:
        _freia_compat.check_layout(layout)
        if layout == "index" and self.clamp_mode != "freia":
            warnings.warn("state_dict_layout='index' writes FrEIA master's checkpoint layout, but FrEIA master "
                          "clamps as clamp_mode='freia' and this block does not: there it will give other numbers")
        self._state_dict_layout = layout

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._state_dict_layout == "index" and self.hard_permutation:
            destination[prefix + "w_perm"], destination[prefix + "w_perm_inv"] = \
                _freia_compat.index_entries(self.perm, self.perm_inv)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # FrEIA master's checkpoints hold a hard permutation as (C,) index vectors: make them dense.
        if self.hard_permutation:
            if _freia_compat.dense_from_index(state_dict, prefix, self.in_channels, self.input_rank,
                                              self.w_perm.dtype) and self.clamp_mode != "freia":
                warnings.warn("loading FrEIA master's checkpoint layout (index-form w_perm) into a block with "
                              f"clamp_mode={self.clamp_mode!r}: FrEIA master's numbers need clamp_mode='freia'")
        elif self.permute_soft and getattr(state_dict.get(prefix + "w_perm"), "ndim", 0) == 1:
            raise ValueError(f"{prefix}w_perm is a hard permutation in FrEIA master's index form, but this "
                             "block has permute_soft=True (a dense rotation); build it with permute_soft=False")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # ------------------------------------------------------------------ permutations
    @staticmethod
    def _rebuild_perm_hook(module, incompatible_keys):
        module._rebuild_perm()

    def _rebuild_perm(self):
        if self.hard_permutation:
            w = self.w_perm.data.reshape(self.in_channels, self.in_channels)
            perm = reference.perm_from_matrix(w)
            if not torch.equal(w, F.one_hot(perm, self.in_channels).to(w.dtype)):
                raise ValueError("w_perm in the loaded state_dict is not a 0/1 permutation matrix; a "
                                 "block with a soft permutation needs permute_soft=True")
            self.perm = perm.to(self.perm.device)
            self.perm_inv = reference.invert_perm(self.perm)

    def _construct_householder_permutation(self) -> Tensor:
        w = self.w_0
        eye = torch.eye(self.in_channels, device=w.device, dtype=w.dtype)
        for vk in self.vk_householder:
            w = torch.mm(w, eye - 2 * torch.outer(vk, vk) / torch.dot(vk, vk))
        return w.reshape(self.in_channels, self.in_channels, *([1] * self.input_rank))

    def _dense_weights(self) -> Tuple[Tensor, Tensor]:
        if self.householder:
            w = self._construct_householder_permutation()
            return w, w.transpose(0, 1).contiguous()
        return self.w_perm, self.w_perm_inv

    def _apply_dense(self, x: Tensor, w: Tensor) -> Tensor:
        return self.permute_function(x, w.to(x.dtype))

    # ------------------------------------------------------------------ validation
    def _check_inputs(self, x, c) -> Tuple[Tensor, list]:
        if isinstance(x, (tuple, list)):
            if len(x) != 1:
                raise InputShapeError(f"AllInOneBlock takes one input tensor, got {len(x)}")
            x = x[0]
        if not torch.is_tensor(x):
            raise TypeError(f"input must be a tensor or a 1-tuple of tensors, got {type(x).__name__}")
        expected_dims = 2 + self.input_rank
        exp_shape = "(B, " + ", ".join(str(d) for d in self.dims_in[0]) + ")"
        if x.dim() != expected_dims:
            raise InputShapeError(f"AllInOneBlock expected {expected_dims}-D input {exp_shape}, got "
                                  f"{x.dim()}-D input of shape {_shape_str(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise InputShapeError(f"AllInOneBlock expected {self.in_channels} channels (input {exp_shape}), "
                                  f"got {x.shape[1]} channels in input of shape {_shape_str(x.shape)}")
        c = list(c) if c is not None else []
        if len(c) != len(self.dims_c):
            raise InputShapeError(f"AllInOneBlock expected {len(self.dims_c)} condition tensor(s) of shape(s) "
                                  f"{['(B, ' + ', '.join(map(str, d)) + ')' for d in self.dims_c]}, got {len(c)}")
        for i, (ci, dc) in enumerate(zip(c, self.dims_c)):
            want = (x.shape[0], dc[0], *x.shape[2:])
            if tuple(ci.shape) != want:
                raise InputShapeError(f"condition {i} must have shape {_shape_str(want)} (batch and spatial "
                                      f"size of the input, {dc[0]} channels), got {_shape_str(ci.shape)}")
        return x, c

    def _subnet(self, x1: Tensor, c: list) -> Tensor:
        # in inference on the CPU fast path, the subnet's convolutions run prepacked (cpu_fast)
        return cpu_fast.run_subnet(self.subnet, torch.cat([x1, *c], 1) if self.conditional else x1, self.impl)

    # ------------------------------------------------------------------ forward
    def _prepare_forward(self, x, c):
        x, c = self._check_inputs(x, c)
        w = w_inv = None
        if not self.hard_permutation:
            w, w_inv = self._dense_weights()
        if self.reverse_pre_permute:
            x = x.index_select(1, self.perm_inv) if self.hard_permutation else self._apply_dense(x, w_inv)
        a = self._subnet(x[:, :self.splits[0]], c)
        return x, a, w

    def forward_outputs(self, x, c=[], *, pixel_logdet: bool = False, loglik: bool = False,
                        mu: Optional[Tensor] = None, log_sigma: Optional[Tensor] = None) -> CouplingOutput:
        """The one full forward: z, log_jac_det (B,) and, as asked, the per-pixel log-det
        (``pixel_logdet``) and the base log-likelihood of z (``loglik``; mu/log_sigma None means
        N(0, I)), as a :class:`~altub_fast.ops.CouplingOutput` (absent outputs None).
        :meth:`forward`, :meth:`forward_pixel` and :meth:`forward_loglik` are views of it.

        The per-pixel log-det is each pixel's share of log_jac_det (their sum over pixels): the
        coupling's log-scales summed over channels plus the global affine's sum_c log Psi(g_c).
        The permutations (hard, soft, Householder, and the reverse pre-permutation) are orthogonal
        and add 0. The log-likelihoods include the -0.5*log(2 pi) constant; with a hard
        permutation they come from the same fused pass as z.
        """
        x, a, w = self._prepare_forward(x, c)
        kw = dict(clamp=self.clamp, clamp_mode=self.clamp_mode, gin=self.GIN,
                  affine_type=self.global_affine_type, pixel_logdet=pixel_logdet, impl=self.impl)
        if loglik:
            if mu is None:
                mu = torch.zeros(self.in_channels, device=x.device, dtype=torch.float32)
            if log_sigma is None:
                log_sigma = torch.zeros(self.in_channels, device=x.device, dtype=torch.float32)
            if self.hard_permutation:
                return functional.coupling_forward_loglik(x, a, self.global_scale, self.global_offset, self.perm,
                                                          mu, log_sigma, **kw)
        out = functional.coupling_forward(x, a, self.global_scale, self.global_offset,
                                          self.perm if self.hard_permutation else None, **kw)
        if not self.hard_permutation:
            out = out._replace(z=self._apply_dense(out.z, w))
        if loglik:  # a soft or Householder permutation: the base is evaluated after it
            logp_pixel = functional.gaussian_log_prob(out.z, mu, log_sigma, reduction="pixel")
            out = out._replace(logp_pixel=logp_pixel, logp_sample=logp_pixel.reshape(out.z.shape[0], -1).sum(1))
        return out

    def forward(self, x, c=[], rev=False, jac=True):
        """FrEIA's call: ``((z,), log_jac_det)``, or the reverse with ``rev=True``."""
        if rev:
            return self._reverse(x, c)
        out = self.forward_outputs(x, c)
        return (out.z,), out.log_jac_det

    def forward_pixel(self, x, c=[]):
        """Forward that also returns the per-pixel log-det: ((z,), log_jac_det (B,),
        log_jac_det_pixel (B, *sp) float32; (B,) for (B, C) data); see :meth:`forward_outputs`."""
        out = self.forward_outputs(x, c, pixel_logdet=True)
        return (out.z,), out.log_jac_det, out.log_jac_det_pixel

    def forward_loglik(self, x, c=[], mu: Optional[Tensor] = None, log_sigma: Optional[Tensor] = None
                       ) -> CouplingOutput:
        """Forward plus the base log-likelihood of z in one pass (the last block of a flow).

        Returns every field of the :class:`~altub_fast.ops.CouplingOutput`, in order: z,
        log_jac_det (B,), logp_pixel (B, *sp) summed over channels, logp_sample (B,),
        log_jac_det_pixel (B, *sp) as :meth:`forward_pixel`; mu/log_sigma None means N(0, I).
        """
        return self.forward_outputs(x, c, pixel_logdet=True, loglik=True, mu=mu, log_sigma=log_sigma)

    def _reverse(self, z, c):
        z, c = self._check_inputs(z, c)
        w = w_inv = None
        if self.hard_permutation:
            u, ld_global = reference.global_affine_reverse(z, self.global_scale, self.global_offset, self.perm,
                                                           gin=self.GIN, affine_type=self.global_affine_type)
        else:
            w, w_inv = self._dense_weights()
            u, ld_global = reference.global_affine_reverse(self._apply_dense(z, w_inv), self.global_scale,
                                                           self.global_offset, None, gin=self.GIN,
                                                           affine_type=self.global_affine_type)
        x1, y2 = u[:, :self.splits[0]], u[:, self.splits[0]:]
        a = self._subnet(x1, c)
        x2, ld_coupling = reference.coupling_reverse(y2, a, clamp=self.clamp, clamp_mode=self.clamp_mode,
                                                     gin=self.GIN)
        x = torch.cat([x1, x2], 1)
        if self.reverse_pre_permute:
            x = x.index_select(1, self.perm) if self.hard_permutation else self._apply_dense(x, w)
        return (x,), ld_coupling + ld_global

    def extra_repr(self) -> str:
        return (f"channels={self.in_channels}, clamp={self.clamp}, clamp_mode={self.clamp_mode!r}, "
                f"gin={self.GIN}, affine={self.global_affine_type}, "
                f"permutation={'hard' if self.hard_permutation else 'soft' if self.permute_soft else 'householder'}")
