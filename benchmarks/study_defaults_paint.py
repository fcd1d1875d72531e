"""The synthetic defects of the issue-19 defaults study (``study_defaults.py``): defects (foreign
texture, colour, contrast, thin scratches) painted on the object of held-out normal images, the
object found without labels (pixels unlike the image border; the whole image for textures), or
anywhere in the image. A label-free estimate whose ranking of the rules the study compares with
the real test ranking."""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

DEFECT_KINDS = ("texture", "colour", "contrast", "scratch")


def object_mask(img: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    """(mask (H, W) bool, found): pixels unlike the image border's robust colour statistics, smoothed;
    the whole image (found False) when that is under 5 % or over 95 % of it (a texture)."""
    H, W = img.shape[-2:]
    b = max(2, H // 32)
    border = torch.cat([img[:, :b].reshape(3, -1), img[:, -b:].reshape(3, -1),
                        img[:, :, :b].reshape(3, -1), img[:, :, -b:].reshape(3, -1)], 1)
    med = border.median(1).values
    mad = (border - med[:, None]).abs().median(1).values
    d = ((img - med[:, None, None]).abs() / (1.4826 * mad[:, None, None] + 0.03)).amax(0)
    obj = F.avg_pool2d((d > 4).float()[None, None], 2 * b + 1, 1, b)[0, 0] > 0.5
    frac = float(obj.float().mean())
    if frac < 0.05 or frac > 0.95:
        return torch.ones(H, W, dtype=torch.bool), False
    return obj, True


def _shape_mask(kind: str, H: int, W: int, cy: float, cx: float, r: float, rng) -> torch.Tensor:
    """A blob (ellipse with a low-frequency wobble) or, for scratches, a thin slightly curved line."""
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32),
                            indexing="ij")
    th = rng.uniform(0, math.pi)
    c, s = math.cos(th), math.sin(th)
    if kind == "scratch":
        t = torch.linspace(-1, 1, 400)
        L, bend = r * rng.uniform(2.0, 4.0), r * rng.uniform(-0.5, 0.5)
        py, px = cy + t * L * s + bend * (t * t) * c, cx + t * L * c - bend * (t * t) * s
        m = torch.zeros(H, W)
        keep = (py >= 0) & (py < H) & (px >= 0) & (px < W)
        m[py[keep].long(), px[keep].long()] = 1.0
        w = max(1, int(round(H / 256 * rng.uniform(1.0, 2.5))))
        return F.max_pool2d(m[None, None], 2 * (w // 2) + 1, 1, w // 2)[0, 0] > 0 if w > 1 else m > 0
    a, bb = r * rng.uniform(0.6, 1.0), r * rng.uniform(0.3, 1.0)
    u = ((xx - cx) * c + (yy - cy) * s) / a
    v = (-(xx - cx) * s + (yy - cy) * c) / bb
    wob = F.interpolate(torch.from_numpy(rng.standard_normal((1, 1, 5, 5))).float(), size=(H, W),
                        mode="bicubic", align_corners=False)[0, 0]
    return u * u + v * v + 0.35 * wob < 1


def _appearance(kind: str, img: torch.Tensor, other: torch.Tensor, mask: torch.Tensor, rng) -> torch.Tensor:
    """The defect's pixel values over the whole image (only those under the mask are used)."""
    H, W = img.shape[-2:]
    if kind == "texture":   # another image's content, rotated and shifted, mixed with blocky noise
        src = torch.roll(torch.rot90(other, int(rng.integers(1, 4)), (1, 2)),
                         (int(rng.integers(H)), int(rng.integers(W))), (1, 2))
        src = F.interpolate(src[None], size=(H, W), mode="bilinear", align_corners=False)[0]
        noise = F.interpolate(torch.from_numpy(rng.random((1, 3, max(2, H // 16), max(2, W // 16)))).float(),
                              size=(H, W), mode="nearest")[0]
        return 0.5 * src + 0.5 * noise
    mean = img[:, mask].mean(1)[:, None, None] if bool(mask.any()) else img.mean((1, 2), keepdim=True)
    if kind == "colour":
        delta = torch.from_numpy(rng.choice([-1.0, 1.0], 3) * rng.uniform(0.15, 0.4, 3)).float()
        return img + delta[:, None, None]
    if kind == "contrast":
        gain = rng.choice([0.2, 2.5])
        return (img - mean) * gain + mean + rng.choice([-1.0, 1.0]) * rng.uniform(0.1, 0.25)
    level = rng.uniform(0.02, 0.2) if float(mean.mean()) > 0.5 else rng.uniform(0.8, 0.98)   # scratch
    return torch.full_like(img, level)


def paint_defects(images: torch.Tensor, on_object: bool, per_image: int, seed: int):
    """(painted images, masks (M, H, W) bool, meta) with ``per_image`` defects painted per image,
    kinds cycling through DEFECT_KINDS; on the object found by :func:`object_mask`, or anywhere."""
    rng = np.random.default_rng(seed)
    N, _, H, W = images.shape
    out, masks, meta = [], [], []
    min_area = max(6, int(20 * (H / 256) ** 2))
    for j in range(N * per_image):
        i, kind = j % N, DEFECT_KINDS[j % len(DEFECT_KINDS)]
        img = images[i]
        region, found = object_mask(img) if on_object else (torch.ones(H, W, dtype=torch.bool), False)
        ys, xs = torch.nonzero(region, as_tuple=True)
        for _ in range(20):
            k = int(rng.integers(len(ys)))
            r = H * rng.uniform(0.02, 0.08)
            m = _shape_mask(kind, H, W, float(ys[k]), float(xs[k]), r, rng) & region
            if int(m.sum()) >= min_area:
                break
        value = _appearance(kind, img, images[(i + 1 + int(rng.integers(max(1, N - 1)))) % N], m, rng)
        alpha = F.avg_pool2d(m.float()[None, None], 3, 1, 1)[0, 0].clamp(0, 1) * m.float()
        out.append((img * (1 - alpha) + value.clamp(0, 1) * alpha).clamp(0, 1))
        masks.append(m)
        meta.append(dict(kind=kind, area=float(m.float().mean()), object_found=bool(found)))
    return torch.stack(out), torch.stack(masks), meta

