"""Mask operations and crop planning for face refine (torch, and PIL for polygons; no OpenCV).

Masks are float tensors [H,W] in 0..1 (1 = face). ``grow`` dilates (px > 0) or erodes (px < 0) with a square
kernel, as ADetailer's erosion/dilation does; ``feather`` blurs with a Gaussian truncated at ``px`` pixels,
so a feathered mask is exactly zero farther than ``px`` from the grown mask: that is the boundary beyond
which the paste leaves pixels untouched. ``convex_hull``/``polygon_mask`` turn face-mesh landmarks into a bool
mask for the detectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import TwigError


def box_mask(box, height: int, width: int) -> torch.Tensor:
    """[H,W] float mask covering the pixels a box (x0, y0, x1, y1; floats, x1/y1 exclusive) touches."""
    x0, y0, x1, y1 = box
    m = torch.zeros(height, width)
    ix0, iy0 = max(0, int(math.floor(x0))), max(0, int(math.floor(y0)))
    ix1, iy1 = min(width, int(math.ceil(x1))), min(height, int(math.ceil(y1)))
    if ix1 > ix0 and iy1 > iy0:
        m[iy0:iy1, ix0:ix1] = 1.0
    return m


def grow(mask: torch.Tensor, px: int) -> torch.Tensor:
    """Dilate (px > 0) or erode (px < 0) a [H,W] mask by |px| pixels with a square kernel."""
    px = int(px)
    if px == 0:
        return mask.clone()
    m = mask.float()[None, None]
    k = 2 * abs(px) + 1
    if px > 0:
        out = F.max_pool2d(m, k, stride=1, padding=abs(px))
    else:
        out = 1.0 - F.max_pool2d(1.0 - m, k, stride=1, padding=abs(px))
    return out[0, 0]


def gaussian_kernel(px: int) -> torch.Tensor:
    """1-D Gaussian with sigma = px / 2, truncated at ±px, summing to 1."""
    sigma = max(px / 2.0, 1e-3)
    x = torch.arange(-px, px + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


def feather(mask: torch.Tensor, px: int) -> torch.Tensor:
    """Blur a [H,W] mask with a Gaussian truncated at ``px`` pixels (0 = unchanged). Values stay in 0..1."""
    px = int(px)
    if px < 0:
        raise TwigError(f"feather must be ≥ 0 pixels, got {px}")
    if px == 0:
        return mask.clone().float()
    k = gaussian_kernel(px)
    m = mask.float()[None, None]
    m = F.conv2d(F.pad(m, (px, px, 0, 0)), k.view(1, 1, 1, -1))
    m = F.conv2d(F.pad(m, (0, 0, px, px)), k.view(1, 1, -1, 1))
    m = m[0, 0].clamp(0.0, 1.0)
    # exact 0 away from the mask and exact 1 deep inside (rounding in the convolution leaves crumbs otherwise)
    m = torch.where(m < 1e-6, torch.zeros_like(m), m)
    return torch.where(m > 1 - 1e-6, torch.ones_like(m), m)


def bbox_of(mask: torch.Tensor, threshold: float = 0.0) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of the pixels above ``threshold`` (x1/y1 exclusive), or None if there are none."""
    ys, xs = torch.nonzero(mask > threshold, as_tuple=True)
    if ys.numel() == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@dataclass(frozen=True)
class CropPlan:
    """The crop around one face: region (x0, y0, x1, y1) in the image, and the size it is refined at."""

    x0: int
    y0: int
    x1: int
    y1: int
    work_width: int
    work_height: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def scale(self) -> float:
        return self.work_width / self.width


def _span(center: float, size: float, lo: int, hi: int) -> tuple[int, int]:
    """An integer span of ``size`` around ``center``, shifted to stay inside [lo, hi), shrunk if larger."""
    size = min(int(math.ceil(size)), hi - lo)
    start = int(round(center - size / 2))
    start = min(max(start, lo), hi - size)
    return start, start + size


def round_to(v: float, multiple: int, lo: int, hi: int) -> int:
    """``v`` rounded to a multiple of ``multiple``, within [lo, hi] (both multiples)."""
    return int(min(max(multiple * round(v / multiple), lo), hi))


def plan_crop(face_box, support_box, width: int, height: int, crop_factor: float = 3.0, guide_size: int = 512,
              max_size: int = 1024, multiple: int = 32) -> CropPlan:
    """Where to crop around a face and at what size to refine it.

    The region is the face box scaled by ``crop_factor`` around its centre (context for the model), grown to
    contain ``support_box`` (the feathered paste mask, so the paste never reaches the crop's edge), shifted
    back inside the image where it sticks out. The crop is resized so the face's longer side becomes about
    ``guide_size`` (never shrunk for that), capped so the crop's longer side is at most ``max_size``; both
    work sides are multiples of ``multiple`` (the VAE's cell).
    """
    if crop_factor < 1.0:
        raise TwigError(f"crop_factor must be ≥ 1.0, got {crop_factor}")
    if guide_size < multiple or max_size < multiple:
        raise TwigError(f"guide_size and max_size must be at least {multiple} px, got {guide_size} and {max_size}")
    fx0, fy0, fx1, fy1 = (float(v) for v in face_box)
    fw, fh = max(1.0, fx1 - fx0), max(1.0, fy1 - fy0)
    cx, cy = (fx0 + fx1) / 2, (fy0 + fy1) / 2
    cw, ch = fw * crop_factor, fh * crop_factor
    if support_box is not None:
        sx0, sy0, sx1, sy1 = support_box
        # smallest region centred on the face that still holds the support, plus 2 px of margin
        cw = max(cw, 2 * max(cx - sx0, sx1 - cx) + 4)
        ch = max(ch, 2 * max(cy - sy0, sy1 - cy) + 4)
    x0, x1 = _span(cx, cw, 0, width)
    y0, y1 = _span(cy, ch, 0, height)
    if support_box is not None:  # shifting may have pushed part of the support out: take the union
        x0, y0 = min(x0, int(support_box[0])), min(y0, int(support_box[1]))
        x1, y1 = max(x1, int(support_box[2])), max(y1, int(support_box[3]))
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
    w, h = x1 - x0, y1 - y0
    scale = max(guide_size / max(fw, fh), 1.0)
    scale = min(scale, max_size / max(w, h))
    top = max_size // multiple * multiple
    return CropPlan(x0, y0, x1, y1, round_to(w * scale, multiple, multiple, top), round_to(h * scale, multiple, multiple, top))


def resize_image(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize [B,C,H,W] pixels (bicubic, antialiased when shrinking)."""
    if tuple(x.shape[-2:]) == (height, width):
        return x.clone()
    shrink = height < x.shape[-2] or width < x.shape[-1]
    return F.interpolate(x.float(), size=(height, width), mode="bicubic", align_corners=False, antialias=shrink)


def resize_mask(m: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize a [H,W] mask (bilinear, antialiased when shrinking), values in 0..1."""
    if tuple(m.shape[-2:]) == (height, width):
        return m.clone().float()
    shrink = height < m.shape[-2] or width < m.shape[-1]
    out = F.interpolate(m.float()[None, None], size=(height, width), mode="bilinear", align_corners=False,
                        antialias=shrink)
    return out[0, 0].clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------------
# Polygon masks (a face mesh hull), with no OpenCV


def convex_hull(points: np.ndarray) -> np.ndarray:
    """Convex hull (Andrew's monotone chain) of [N,2] points, counter-clockwise, as [M,2]."""
    pts = sorted(set(map(tuple, np.asarray(points, dtype=np.float64).tolist())))
    if len(pts) <= 2:
        return np.array(pts, dtype=np.float64)

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1], dtype=np.float64)


def polygon_mask(polygon: np.ndarray, height: int, width: int) -> np.ndarray:
    """bool [H,W] mask of a filled polygon."""
    from PIL import Image, ImageDraw

    im = Image.new("L", (width, height), 0)
    if len(polygon) >= 3:
        ImageDraw.Draw(im).polygon([tuple(p) for p in polygon.tolist()], fill=255, outline=255)
    return np.asarray(im) > 127
