"""Conversions between PIL images, model-side tensors [B,3,H,W] in [-1,1] and host IMAGE [B,H,W,3] in [0,1]."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .errors import TwigError


def to_model(images: torch.Tensor) -> torch.Tensor:
    """Host IMAGE [B,H,W,C>=3] 0..1 -> [B,3,H,W] -1..1 (alpha dropped)."""
    if images.ndim != 4 or images.shape[-1] < 3:
        raise TwigError(f"expected an image batch [B,H,W,3], got shape {tuple(images.shape)}")
    return images[..., :3].permute(0, 3, 1, 2).float() * 2 - 1


def from_model(images: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] -1..1 -> host IMAGE [B,H,W,3] float32 0..1 (clamped)."""
    return ((images.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).contiguous()


def pil_to_model(image: Image.Image) -> torch.Tensor:
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return to_model(torch.from_numpy(arr)[None])


def model_to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = (from_model(images).numpy() * 255.0).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def png_info(prompt: str, negative: str, steps: int, cfg: float, seed: int, sampler: str, width: int, height: int,
             model: str = "Twig", batch_index: int = 0, loras=()):
    """PNG text chunk "parameters" in the WebUI's layout, so image browsers and "PNG Info" tabs read it.
    ``loras``: (name, strength) pairs applied, listed as ``LoRA: name:strength, ...``."""
    from PIL.PngImagePlugin import PngInfo

    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    extra = f", Batch pos: {batch_index}" if batch_index else ""
    if loras:
        extra += ", LoRA: " + "; ".join(f"{name}:{strength:g}" for name, strength in loras)
    lines.append(f"Steps: {steps}, Sampler: {sampler}, CFG scale: {cfg}, Seed: {seed}, Size: {width}x{height}, "
                 f"Model: {model}{extra}")
    info = PngInfo()
    info.add_text("parameters", "\n".join(lines))
    return info
