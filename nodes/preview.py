"""Cheap RGB previews of a latent while sampling (no VAE involved).

A 32-channel DC-AE latent has no published linear RGB approximation yet, so by default the preview shows
the latent's three strongest directions (a PCA over the pixels of the first image, with signs fixed so the
colours do not flip between steps). A model that carries a fitted ``latent_rgb`` projection ([C,3] weight and
optional [3] bias) is previewed with that instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image


def _pca_rgb(lat: torch.Tensor) -> torch.Tensor:
    """[C,h,w] -> [3,h,w] roughly in [-1,1] from the top-3 principal components."""
    c, h, w = lat.shape
    x = lat.reshape(c, h * w).T  # [N, C]
    x = x - x.mean(0, keepdim=True)
    k = min(3, c, max(1, h * w - 1))
    try:
        _, _, v = torch.linalg.svd(x, full_matrices=False)  # v: [C', C]
    except RuntimeError:
        v = torch.eye(c)[:k]
    v = v[:k]
    # fix the sign of each direction: its largest loading is positive
    idx = v.abs().argmax(dim=1)
    v = v * torch.sign(v.gather(1, idx[:, None]))
    y = x @ v.T  # [N, k]
    if k < 3:
        y = torch.cat([y, y[:, :1].expand(-1, 3 - k)], dim=1)
    scale = y.abs().amax(0, keepdim=True).clamp_min(1e-6)
    return (y / scale).T.reshape(3, h, w)


def latent_to_rgb(lat: torch.Tensor, projection: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
    """[C,h,w] latent -> [3,h,w] in [-1,1]."""
    lat = lat.detach().float().cpu()
    if projection is not None:
        weight, bias = projection
        rgb = torch.einsum("chw,cr->rhw", lat, weight.float())
        if bias is not None:
            rgb = rgb + bias.float()[:, None, None]
        return rgb.clamp(-1, 1)
    return _pca_rgb(lat)


def preview_image(latent: torch.Tensor, max_size: int = 512, projection=None, min_side: int = 256) -> Image.Image:
    """First image of a latent batch [B,C,h,w] as a small PIL image (upscaled so the UI shows it nicely)."""
    rgb = latent_to_rgb(latent[0], projection)  # [3,h,w]
    h, w = rgb.shape[-2:]
    factor = max(1, min(max_size // max(h, w), -(-min_side // max(1, min(h, w)))))
    if factor > 1:
        rgb = F.interpolate(rgb[None], scale_factor=factor, mode="bilinear", align_corners=False)[0]
    arr = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr, "RGB")
