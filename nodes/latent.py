"""Latent nodes: empty latent at Sana's aspect-ratio bins, DC-AE decode and encode (tiled when needed)."""

from __future__ import annotations

import torch

from twig_core import image as timage
from twig_core import dcae_exec
from twig_core.errors import TwigError
from twig_core.resolution import BINS_1024, MULTIPLE, check_size, nearest_bin

from . import host
from .common import CATEGORY, MODEL, VAE, log, node_errors

CUSTOM = "custom"
MAX_SIZE = 8192
MAX_BATCH = 64
LATENT_CHANNELS = 32


def _label(h: int, w: int) -> str:
    return f"{w}x{h} ({w / h:.2f}:1)"


ASPECTS = {_label(h, w): (h, w) for h, w in BINS_1024}
ASPECT_CHOICES = [CUSTOM] + list(ASPECTS)
DEFAULT_ASPECT = _label(1024, 1024)


def base_size_of(model) -> int:
    """Pixel size the transformer was trained at (its native latent grid times 32); 1024 if unknown."""
    cfg = getattr(model, "config", None)
    size = getattr(cfg, "sample_size", None)
    return int(size) * MULTIPLE if size else 1024


def pick_size(aspect: str, width: int, height: int, base: int = 1024) -> tuple[int, int]:
    """(width, height) in pixels for an aspect choice (scaled to ``base``) or the custom size."""
    if aspect == CUSTOM:
        check_size(int(width), int(height))
        return int(width), int(height)
    if aspect not in ASPECTS:
        raise TwigError(f"unknown aspect ratio {aspect!r}; choose one of the listed sizes or 'custom'")
    h, w = ASPECTS[aspect]
    if base != 1024:
        h, w = nearest_bin(h, w, base)
    return w, h


class TwigEmptyLatent:
    DESCRIPTION = ("An empty latent at one of Sana's trained aspect-ratio sizes (scaled to the connected model's base "
                   "size) or at a custom size in multiples of 32.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "aspect_ratio": (ASPECT_CHOICES, {"default": DEFAULT_ASPECT, "tooltip": "Sana's trained sizes (shown for 1024 px models; scaled to the model's base size when a model is connected), or custom."}),
                "width": ("INT", {"default": 1024, "min": MULTIPLE, "max": MAX_SIZE, "step": MULTIPLE, "tooltip": "Used when aspect_ratio is custom (multiple of 32)."}),
                "height": ("INT", {"default": 1024, "min": MULTIPLE, "max": MAX_SIZE, "step": MULTIPLE, "tooltip": "Used when aspect_ratio is custom (multiple of 32)."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": MAX_BATCH, "tooltip": "Images per run."}),
            },
            "optional": {
                "model": (MODEL, {"tooltip": "Connect to scale the aspect-ratio sizes to this model's base resolution."}),
            },
        }

    RETURN_TYPES = ("LATENT", "INT", "INT")
    RETURN_NAMES = ("latent", "width", "height")
    FUNCTION = "generate"
    CATEGORY = CATEGORY

    @node_errors("Twig Empty Latent")
    def generate(self, aspect_ratio, width, height, batch_size=1, model=None):
        base, channels = 1024, LATENT_CHANNELS
        if model is not None:
            tr = model.peek()
            base = base_size_of(tr)
            channels = int(getattr(tr.config, "in_channels", LATENT_CHANNELS))
        w, h = pick_size(aspect_ratio, width, height, base)
        if not 1 <= batch_size <= MAX_BATCH:
            raise TwigError(f"batch_size must be 1 … {MAX_BATCH}, got {batch_size}")
        samples = torch.zeros(int(batch_size), channels, h // MULTIPLE, w // MULTIPLE)
        return ({"samples": samples}, w, h)


# --------------------------------------------------------------------------------------------------
# DC-AE


def _run(fn, what: str, vae, x, tile_size: int):
    """fn (dcae_exec.decode or encode) on one item, tiles of ``tile_size`` px (0: automatic), out of memory
    retried with smaller tiles; the result as float32 on the CPU."""
    f = vae.spatial_factor
    if tile_size and tile_size % f:
        raise TwigError(f"tile_size {tile_size} px is not a multiple of {f}")
    with torch.no_grad():
        out, _ = fn(vae, x, tile_size=tile_size // f if tile_size else "auto", label=what, is_oom=host.is_oom,
                    free_memory=host.free_after_failure)
    return out.float().cpu()


TILE_INPUT = ("INT", {"default": 0, "min": 0, "max": 4096, "step": MULTIPLE,
                      "tooltip": "Tile size in pixels (multiple of 32). 0 = automatic: tiles only above 1024x1024 "
                                 "or when memory runs short. On CPU a tiled decode streams row bands instead of tiles "
                                 "(the same image, whatever the tile size)."})


class TwigVAEDecode:
    DESCRIPTION = "Decodes a Twig latent to an IMAGE with DC-AE, tiling large images automatically."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "vae": (VAE,), "tile_size": TILE_INPUT}}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY

    @node_errors("Twig VAE Decode")
    def decode(self, samples, vae, tile_size=0):
        latent = _latent_samples(samples)
        model = vae.get(memory_required=host.vae_memory_required(vae.peek(), latent.shape, tile_size))
        out = []
        for i in range(latent.shape[0]):
            host.check_interrupt()
            out.append(timage.from_model(_run(dcae_exec.decode, "Twig VAE Decode", model, latent[i:i + 1], tile_size)))
        return (torch.cat(out, 0),)


class TwigVAEEncode:
    DESCRIPTION = "Encodes an IMAGE to a Twig latent with DC-AE (for image to image and inpainting)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"pixels": ("IMAGE",), "vae": (VAE,), "tile_size": TILE_INPUT}}

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    @node_errors("Twig VAE Encode")
    def encode(self, pixels, vae, tile_size=0):
        if not torch.is_tensor(pixels) or pixels.ndim != 4 or pixels.shape[-1] < 3:
            got = tuple(pixels.shape) if torch.is_tensor(pixels) else type(pixels).__name__
            raise TwigError(f"pixels must be an IMAGE [batch, height, width, 3], got {got}")
        vae.peek().load_encoder()  # read on first encode, before the host places the model and counts its memory
        need = host.vae_memory_required(vae.peek(), None, tile_size, encode=True, pixels=pixels.shape[1:3])
        model = vae.get(memory_required=need)
        pixels = center_crop(pixels, model.spatial_factor)
        out = []
        for i in range(pixels.shape[0]):
            host.check_interrupt()
            out.append(_run(dcae_exec.encode, "Twig VAE Encode", model, timage.to_model(pixels[i:i + 1]), tile_size))
        return ({"samples": torch.cat(out, 0)},)


def center_crop(pixels: torch.Tensor, multiple: int) -> torch.Tensor:
    """Crop an IMAGE [B,H,W,C] centrally to multiples of ``multiple`` (DC-AE works on 32x32 cells)."""
    h, w = pixels.shape[1:3]
    nh, nw = h // multiple * multiple, w // multiple * multiple
    if nh == 0 or nw == 0:
        raise TwigError(f"image is {w}x{h} px; the VAE needs at least {multiple}x{multiple}")
    if (nh, nw) != (h, w):
        log.info("[Twig] cropping %dx%d image to %dx%d (multiples of %d)", w, h, nw, nh, multiple)
        top, left = (h - nh) // 2, (w - nw) // 2
        pixels = pixels[:, top:top + nh, left:left + nw]
    return pixels


def _latent_samples(latent) -> torch.Tensor:
    if not isinstance(latent, dict) or "samples" not in latent:
        raise TwigError(f"expected a LATENT (a dict with 'samples'), got {type(latent).__name__}")
    s = latent["samples"]
    if not torch.is_tensor(s) or s.ndim != 4:
        got = tuple(s.shape) if torch.is_tensor(s) else type(s).__name__
        raise TwigError(f"LATENT samples must be [batch, channels, height/32, width/32], got {got}")
    return s
