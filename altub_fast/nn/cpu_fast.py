"""The CPU fast path of the flow models: where the implementation switch resolves to "auto" for
CPU tensors (Triton's interpreter off, not while torch.compile, torch.export or TorchScript
trace), the frozen backbone runs with channels_last input and its BatchNorms folded
(:mod:`.cpu_fold`) and the flows' subnets run their wide convolutions prepacked in inference
(:mod:`.cpu_pack`); :mod:`.cpu_common` holds the switch and the checks both share. Under "torch"
(the plain reference the tests compare with) and "triton" nothing here applies.

This module is the one the rest of the package imports. What was measured, what is on and what
was left out: ``docs/cpu_fast.md``. To patch a constant or helper in a test, patch the module that
defines it (e.g. ``cpu_pack.PACK_MIN_CHANNELS``): the names here are re-exports.
"""
from __future__ import annotations

from .cpu_common import FOLD_RTOL, enabled, max_rel_diff, signature
from .cpu_fold import FoldEntry, foldable, folded_backbone, run_backbone
from .cpu_pack import PACK_MIN_CHANNELS, PackEntry, PackedConv, packs, run_subnet

__all__ = ["FOLD_RTOL", "PACK_MIN_CHANNELS", "FoldEntry", "PackEntry", "PackedConv", "enabled", "foldable",
           "folded_backbone", "max_rel_diff", "packs", "run_backbone", "run_subnet", "signature"]
