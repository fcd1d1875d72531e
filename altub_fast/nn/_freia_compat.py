"""What makes altub_fast's flow modules drop-ins for FrEIA's, in whichever version is installed.

- The base class. When FrEIA can be imported, ``InvertibleModule`` *is*
  ``FrEIA.modules.InvertibleModule``, so altub_fast's AllInOneBlock and SequenceINN are FrEIA
  modules: FrEIA master's ``SequenceINN.append`` and ``GraphINN``'s ``Node`` take them as built
  instances, and ``FrEIA.distributions`` wraps them. Without FrEIA it is a local stand-in with the
  same API. The choice is made once, when altub_fast is imported; FrEIA stays optional.
- Shapes. ``dims_list`` brings ``dims_in`` / ``dims_c`` to FrEIA master's normal form, a list of
  int tuples (FrEIA 0.2 keeps whatever it is given), so shape comparisons agree across versions.
- Checkpoints. FrEIA 0.2 (and anomalib) store a hard permutation as dense 0/1 matrices ``w_perm`` /
  ``w_perm_inv`` of shape (C, C, 1, ...); FrEIA master stores index vectors of shape (C,) under the
  same keys (z[:, i] = v[:, w_perm[i]], ``w_perm_inv`` its inverse). ``STATE_DICT_LAYOUTS`` names
  the two ("dense", "index"); the helpers below convert and check them.
"""
from __future__ import annotations

import operator
import warnings
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

Dims = List[Tuple[int, ...]]

#: "dense": FrEIA 0.2 / anomalib (C, C, 1, ...) matrices; "index": FrEIA master's (C,) vectors.
STATE_DICT_LAYOUTS = ("dense", "index")


class InputShapeError(ValueError, RuntimeError):
    """An input of the wrong shape. A ValueError, as altub_fast raises for bad arguments, and also
    the RuntimeError that FrEIA master's AllInOneBlock raises for it, so code catching either works."""


def dims_list(dims: Optional[Iterable], what: str = "dims_in") -> Dims:
    """``dims`` (shapes without the batch axis, e.g. ``[(C, H, W)]``) as a list of int tuples."""
    if dims is None:
        return []
    hint = f"{what} must be a list of shapes without the batch axis, such as [(C, H, W)]"
    try:
        entries = list(dims)
    except TypeError:
        raise TypeError(f"{hint}; got {dims!r}") from None
    out = []
    for shape in entries:
        if isinstance(shape, int):
            raise TypeError(f"{hint} (even a single input's shape goes inside a list); got {dims!r}")
        try:
            out.append(tuple(operator.index(s) for s in shape))
        except TypeError:
            raise TypeError(f"{hint}, of integers; got {dims!r}") from None
    return out


class LocalInvertibleModule(nn.Module):
    """FrEIA's ``InvertibleModule`` API, for when FrEIA is not installed.

    ``dims_in`` / ``dims_c``: lists of input / condition shapes without the batch axis. Subclasses
    implement ``forward(x_or_z, c=None, rev=False, jac=True) -> ((out, ...), log_jac_det)`` (the
    log-det of the direction evaluated) and ``output_dims(input_dims) -> [shape, ...]``.
    """

    def __init__(self, dims_in, dims_c=None):
        super().__init__()
        self.dims_in = dims_list(dims_in, "dims_in")
        self.dims_c = dims_list(dims_c, "dims_c")

    def forward(self, x_or_z, c=None, rev: bool = False, jac: bool = True):
        raise NotImplementedError(f"{type(self).__name__} does not provide forward(...)")

    def output_dims(self, input_dims):
        raise NotImplementedError(f"{type(self).__name__} does not provide output_dims(...)")


def _import_freia_base():
    """FrEIA's InvertibleModule, or None (with the reason) when FrEIA cannot be imported."""
    try:
        from FrEIA.modules import InvertibleModule as freia_base
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == "FrEIA":  # not installed: the ordinary case, say nothing
            return None, e
        warnings.warn(f"FrEIA is installed but could not be imported ({e}); altub_fast's flow modules "
                      "will not be FrEIA InvertibleModules", RuntimeWarning)
        return None, e
    except Exception as e:  # an installed but broken FrEIA must not stop `import altub_fast`
        warnings.warn(f"FrEIA is installed but could not be imported ({type(e).__name__}: {e}); "
                      "altub_fast's flow modules will not be FrEIA InvertibleModules", RuntimeWarning)
        return None, e
    return freia_base, None


_FREIA_BASE, FREIA_IMPORT_ERROR = _import_freia_base()
#: True when altub_fast's flow modules are FrEIA InvertibleModules (FrEIA was importable).
FREIA_AVAILABLE = _FREIA_BASE is not None
#: The base class of AllInOneBlock and SequenceINN (FrEIA's own where FrEIA is importable).
InvertibleModule = _FREIA_BASE if FREIA_AVAILABLE else LocalInvertibleModule


# ----------------------------------------------------------------------------- checkpoint layouts
def check_layout(layout: str) -> str:
    if layout not in STATE_DICT_LAYOUTS:
        raise ValueError(f"state_dict_layout must be one of {STATE_DICT_LAYOUTS} ('dense': FrEIA 0.2 "
                         f"and anomalib, 'index': FrEIA master), got {layout!r}")
    return layout


def _check_index(t: Tensor, key: str, channels: int) -> Tensor:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{key}: an index-form permutation (FrEIA master's layout) must be an integer "
                         f"tensor, got dtype {t.dtype}")
    if t.numel() != channels:
        raise ValueError(f"{key}: index-form permutation has {t.numel()} entries, the block has "
                         f"{channels} channels")
    t = t.to(torch.long)
    if not torch.equal(torch.sort(t.cpu()).values, torch.arange(channels)):
        raise ValueError(f"{key}: not a permutation of 0..{channels - 1} (entries repeat or fall "
                         "outside that range)")
    return t


def dense_from_index(state_dict: Dict[str, Tensor], prefix: str, channels: int, rank: int,
                     dtype: torch.dtype) -> bool:
    """Rewrite FrEIA master's index-form ``w_perm`` / ``w_perm_inv`` under ``prefix`` in
    ``state_dict`` (in place) as FrEIA 0.2's dense matrices of shape (C, C, 1 x rank).

    Returns whether anything was index-form. Raises ValueError for an index that is not a
    permutation of the channels, or a ``w_perm_inv`` that is not ``w_perm``'s inverse.
    """
    keys = (prefix + "w_perm", prefix + "w_perm_inv")
    found = {k: state_dict[k] for k in keys if k in state_dict and torch.is_tensor(state_dict[k])
             and state_dict[k].dim() == 1}
    if not found:
        return False
    index = {k: _check_index(t, k, channels) for k, t in found.items()}
    if len(index) == 2:
        perm, perm_inv = index[keys[0]], index[keys[1]]
        if not torch.equal(perm_inv[perm], torch.arange(channels, device=perm.device)):
            raise ValueError(f"{keys[1]} is not the inverse permutation of {keys[0]}")
    view = (channels, channels, *([1] * rank))
    for k, idx in index.items():
        # Row i of the dense matrix has its 1 in column idx[i]: conv(v, W)[:, i] = v[:, idx[i]].
        state_dict[k] = F.one_hot(idx, channels).to(dtype).reshape(view)
    return True


def index_entries(perm: Tensor, perm_inv: Tensor) -> Tuple[Tensor, Tensor]:
    """FrEIA master's ``(w_perm, w_perm_inv)`` state_dict entries from a block's index form."""
    return perm.detach().clone().to(torch.long), perm_inv.detach().clone().to(torch.long)


def set_state_dict_layout(module: nn.Module, layout: str) -> nn.Module:
    """Make every altub_fast AllInOneBlock inside ``module`` (the module itself included) save its
    hard permutation in ``layout`` ("dense": FrEIA 0.2 / anomalib; "index": FrEIA master) from now
    on. Loading accepts both layouts whatever this is. Returns ``module``."""
    check_layout(layout)
    blocks = [m for m in module.modules() if hasattr(m, "state_dict_layout")]
    if not blocks:
        raise ValueError(f"{type(module).__name__} contains no altub_fast AllInOneBlock whose "
                         "state_dict layout could be set")
    for m in blocks:
        m.state_dict_layout = layout
    return module
