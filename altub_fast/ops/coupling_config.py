"""Launch configuration of the coupling kernels (``altub_fast.kernels.coupling``): the tile, the
channel groups and, in the backward, the pixel sub-tiles per program; :func:`launch_config` is the
heuristic, :func:`forced_config` overrides it (tests, debugging). Used by
``altub_fast.ops.coupling_launch``; no Triton here.
"""
import contextlib
from dataclasses import dataclass
from typing import Dict, Optional

import torch

__all__ = ["LaunchConfig", "launch_config", "forced_config"]

_TILE = 1024            # elements per [BLOCK_C, BLOCK_P] register tile
_PROGRAMS_PER_SM = 4    # split channels into groups until the grid has this many programs per SM


@dataclass(frozen=True)
class LaunchConfig:
    """Tile [block_c, block_p] (powers of two), cpg output channels per program (a multiple of
    block_c; groups = cdiv(C, cpg)), num_warps, and (backward only) pix_iters pixel sub-tiles per
    program (> 1 only with cpg == block_c)."""
    block_c: int
    block_p: int
    cpg: int
    num_warps: int = 4
    pix_iters: int = 1

    def groups(self, C: int) -> int:
        return max(1, -(-C // self.cpg))

    def tiles(self, P: int) -> int:
        """Programs along the pixels (= rows R of the per-channel partial buffers)."""
        return -(-P // (self.block_p * self.pix_iters))


_FORCED: Optional[Dict[str, int]] = None


@contextlib.contextmanager
def forced_config(block_c: int, block_p: int, cpg: Optional[int] = None, pix_iters: int = 1):
    """Force the launch configuration inside the block (tests and debugging): tile
    [block_c, block_p], ``cpg`` channels per program (default block_c, i.e. as many channel groups
    as chunks), ``pix_iters`` pixel sub-tiles per backward program (needs cpg == block_c)."""
    global _FORCED
    for v in (block_c, block_p):
        if v < 1 or v & (v - 1):
            raise ValueError(f"block sizes must be powers of two, got {block_c}, {block_p}")
    cpg = block_c if cpg is None else cpg
    if cpg % block_c:
        raise ValueError(f"cpg ({cpg}) must be a multiple of block_c ({block_c})")
    if pix_iters < 1 or (pix_iters > 1 and cpg != block_c):
        raise ValueError(f"pix_iters ({pix_iters}) > 1 needs cpg == block_c (got {cpg}, {block_c})")
    prev, _FORCED = _FORCED, dict(block_c=block_c, block_p=block_p, cpg=cpg, pix_iters=pix_iters)
    try:
        yield
    finally:
        _FORCED = prev


def _pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


_SM_COUNT: Dict[int, int] = {}


def _programs_target(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter: fewer, bigger programs are faster
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _PROGRAMS_PER_SM * _SM_COUNT[idx]


def launch_config(C: int, N: int, P: int, device: torch.device, backward: bool = False) -> LaunchConfig:
    """The heuristic. Tiles hold up to 1024 elements with one warp per 128 (4 elements per
    thread): ptxas (sm_90) then keeps the forward under 64 and the backward under about 115
    registers without spills (2048-element tiles on 4 warps spill in the backward). Spatial data
    (N >= 16) is contiguous along pixels: tiles of up to 256 pixels by 4 channels. Fiber data
    (N < 16, CFLOW-AD's (B*H*W, C)) is contiguous along channels: tiles of up to 256 channels by 4+
    pixels. Channels are then split into groups until the grid has about 4 programs per SM (no
    split under the interpreter, where fewer, bigger programs are faster).

    Backward with fiber data: a pixel tile of a few rows would make the (R, C) per-channel
    partial buffers a sizeable fraction of the data, so each program takes one channel chunk
    (cpg = block_c) and loops over up to 64 pixel sub-tiles while the grid keeps about 4 programs
    per SM."""
    if _FORCED is not None:
        f = dict(_FORCED)
        if not backward:
            f["pix_iters"] = 1
        return LaunchConfig(**f)
    C = max(int(C), 1)
    P = max(int(P), 1)
    if N >= 16:
        block_p = min(_pow2(P), 256)
        block_c = max(2, min(_pow2(C), _TILE // block_p))
    else:
        block_c = max(2, min(_pow2(C), 256))
        block_p = max(2, min(_pow2(P), _TILE // block_c))
    chunks = -(-C // block_c)
    tiles = -(-P // block_p)
    target = _programs_target(device)
    num_warps = max(1, min(8, (block_c * block_p) // 128))
    if backward and N < 16:
        pix_iters = 1
        while (pix_iters < 64 and block_p * pix_iters < P
               and -(-P // (block_p * pix_iters * 2)) * chunks >= target):
            pix_iters *= 2
        return LaunchConfig(block_c, block_p, block_c, num_warps, pix_iters)
    groups = min(chunks, max(1, -(-target // tiles)))
    cpg = -(-chunks // groups) * block_c
    return LaunchConfig(block_c, block_p, cpg, num_warps)
