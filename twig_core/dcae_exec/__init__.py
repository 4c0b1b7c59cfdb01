"""Running DC-AE: the one entry that decides how an encode or decode runs.

``decode(vae, latent, ...)`` and ``encode(vae, images, ...)`` validate their input once, cast it to the
model's device and compute dtype (results come back on the input's device in its dtype), pick the tile size
("auto": tiles only above 1024x1024 px, see auto_tile_size), pick a strategy (below), retry with smaller
tiles when memory runs short, and return the result together with the ``Run`` that says what ran.

Decode strategies (``strategy="auto"`` picks the first that fits, per device and autograd):

    untiled, CPU without autograd           banded     every layer over row bands of its maps
    untiled, otherwise                      plain      the whole network on whole maps
    tiled, attention reaches the output     blended    overlapping tiles, blended
    tiled, CPU without autograd             streamed   the local stages stream row bands (no tiles)
    tiled, otherwise                        tiles      exact tiles of the local stages

Encode: ``plain`` untiled, ``blended`` tiled. Every strategy but ``blended`` gives the untiled result up to
summation order (see strategies.py); the kernels they run are in kernels.py.
"""

from __future__ import annotations

import gc
import logging
import traceback
from typing import Callable, Optional

import torch

from ..dcae import TileSize
from ..devices import clear_cache, is_out_of_memory
from ..errors import TwigError
from ..ops import channels_last
from .kernels import CPU_BAND, Run, forward
from .strategies import decode_banded, decode_plan, decode_streamed, decode_tiled, run_blended

__all__ = ["decode", "encode", "Run", "choose", "auto_tile_size", "fallback_tiles", "oom_floor", "DECODE_STRATEGIES",
           "ENCODE_STRATEGIES"]

log = logging.getLogger("twig")


def auto_tile_size(latent_height: int, latent_width: int, max_side: int = 32) -> Optional[int]:
    """Tile size (latent px) for a latent of this size: None (untiled) up to ``max_side**2`` latent pixels
    (1024x1024 px for f32), else ``max_side``."""
    if latent_height * latent_width <= max_side * max_side:
        return None
    return max_side


def _blended_decode(vae, z: torch.Tensor, run: Run) -> torch.Tensor:
    dec = vae.decoder
    return run_blended(lambda t: forward(dec, t, run), z, run.tile_size, run.overlap, 1, vae.spatial_factor, 1,
                       vae.config.in_channels)


def _blended_encode(vae, x: torch.Tensor, run: Run) -> torch.Tensor:
    # tiles start on the f-pixel grid, so tile latents line up exactly
    enc, f = vae.encoder, vae.spatial_factor
    return run_blended(lambda t: forward(enc, t, run), x, run.tile_size, run.overlap, f, 1, f,
                       vae.config.latent_channels)


# name -> fn(vae, x on the model's device in its compute dtype, run) -> result
DECODE_STRATEGIES: dict[str, Callable] = {
    "plain": lambda vae, z, run: forward(vae.decoder, z, run),
    "banded": lambda vae, z, run: decode_banded(vae.decoder, z, run),
    "streamed": lambda vae, z, run: decode_streamed(vae.decoder, z, run),
    "tiles": lambda vae, z, run: decode_tiled(vae.decoder, z, run),
    "blended": _blended_decode,
}
ENCODE_STRATEGIES: dict[str, Callable] = {
    "plain": lambda vae, x, run: forward(vae.encoder, x, run),
    "blended": _blended_encode,
}


def choose(what: str, vae, strategy: str, tiled: bool, device_type: str, autograd: bool) -> str:
    """The strategy a ``what`` ("decode" or "encode") runs on ``device_type``: ``strategy`` itself once checked
    to fit, or for "auto" the one the table in this module's docstring gives."""
    table = DECODE_STRATEGIES if what == "decode" else ENCODE_STRATEGIES
    in_bands = device_type == "cpu" and not autograd
    if strategy == "auto":
        if what == "encode":
            return "blended" if tiled else "plain"
        if not tiled:
            return "banded" if in_bands else "plain"
        if decode_plan(vae.decoder) is None:
            return "blended"
        return "streamed" if in_bands else "tiles"
    if strategy not in table:
        raise TwigError(f"DCAE.{what}: unknown strategy {strategy!r}; use 'auto' or one of {sorted(table)}")
    if strategy in ("banded", "streamed") and autograd:
        raise TwigError(f"DCAE.{what}: strategy {strategy!r} runs without autograd only (use torch.no_grad())")
    if strategy in ("tiles", "blended") and not tiled:
        raise TwigError(f"DCAE.{what}: strategy {strategy!r} needs a tile_size")
    if strategy in ("streamed", "tiles") and decode_plan(vae.decoder) is None:
        raise TwigError(f"DCAE.{what}: strategy {strategy!r} needs local layers after the last attention block; "
                        "this decoder has none (use 'blended')")
    return strategy


# ---- input checks ---------------------------------------------------------------------------------------------


def _check_images(vae, images: torch.Tensor) -> None:
    f, c = vae.spatial_factor, vae.config.in_channels
    if not torch.is_tensor(images) or images.ndim != 4:
        got = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise TwigError(f"DCAE.encode: images must be a tensor [B,{c},H,W], got {got}")
    if images.shape[1] != c:
        raise TwigError(f"DCAE.encode: images have {images.shape[1]} channels, expected {c} (shape [B,{c},H,W])")
    h, w = images.shape[-2:]
    if h % f or w % f or h == 0 or w == 0:
        raise TwigError(
            f"DCAE.encode: image size {w}x{h} is not a multiple of {f}; crop or pad to "
            f"{max(f, w // f * f)}x{max(f, h // f * f)}"
        )


def _check_latent(vae, latent: torch.Tensor) -> None:
    c = vae.config.latent_channels
    if not torch.is_tensor(latent) or latent.ndim != 4:
        got = tuple(latent.shape) if torch.is_tensor(latent) else type(latent).__name__
        raise TwigError(f"DCAE.decode: latent must be a tensor [B,{c},h,w], got {got}")
    if latent.shape[1] != c:
        raise TwigError(f"DCAE.decode: latent has {latent.shape[1]} channels, expected {c}; is it a Twig/Sana latent?")
    if latent.shape[-1] == 0 or latent.shape[-2] == 0:
        raise TwigError(f"DCAE.decode: empty latent {tuple(latent.shape)}")


def _tile_size(what: str, tile_size: TileSize, h: int, w: int) -> Optional[int]:
    """tile_size checked, "auto" resolved (latent px; None: untiled)."""
    if tile_size == "auto":
        return auto_tile_size(h, w)
    if tile_size is not None and (isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size <= 0):
        raise TwigError(f"DCAE.{what}: tile_size must be a positive int (latent px), 'auto' or None, got {tile_size!r}")
    return tile_size


def _overlap(what: str, overlap: Optional[int], tile: Optional[int]) -> Optional[int]:
    """overlap checked against the tile, default a quarter tile (None when untiled)."""
    if tile is None:
        return None
    if overlap is None:
        return tile // 4
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0 or overlap >= tile:
        raise TwigError(f"DCAE.{what}: overlap must be an int in [0, tile_size) (latent px), got {overlap!r}")
    return overlap


# ---- out-of-memory retry --------------------------------------------------------------------------------------


def free_after_oom(exc: BaseException) -> None:
    """Drop the tensors held by the failed call's frames, then return cached GPU memory."""
    try:
        traceback.clear_frames(exc.__traceback__)
    except Exception:  # noqa: BLE001
        pass
    gc.collect()
    clear_cache()


def fallback_tiles(first: int, floor: int) -> list[int]:
    """Tile sizes (latent px) to retry with after running out of memory: halving ``first`` down to ``floor``."""
    out, t = [], first
    while t // 2 >= floor:
        t //= 2
        out.append(t)
    return out


def oom_floor(device_type: str) -> int:
    """The smallest tile (latent px) an out-of-memory retry tries: on a GPU smaller tiles cost more in halo
    and per-tile overhead than they save."""
    return 4 if device_type == "cpu" else 8


def _run(attempt: Callable, tile: Optional[int], longest: int, device_type: str, retry: bool, label: str,
         is_oom: Callable, free_memory: Callable):
    """attempt(tile) -> (result, run); with ``retry``, on running out of memory again with halved tiles."""
    if not retry:
        return attempt(tile)
    try:
        return attempt(tile)
    except Exception as e:  # noqa: BLE001
        if not is_oom(e):
            raise
        free_memory(e)
    tried = []
    for t in fallback_tiles(min(tile or longest, longest), oom_floor(device_type)):
        log.warning("[Twig] %s ran out of memory; retrying with tiles of %d latent px", label, t)
        tried.append(t)
        try:
            out, run = attempt(t)
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            free_memory(e)
            continue
        run.retries = tried
        return out, run
    raise TwigError("out of memory even with the smallest tiles; lower the batch size or use a smaller image")


# ---- the entry ------------------------------------------------------------------------------------------------


def decode(vae, latent: torch.Tensor, strategy: str = "auto", tile_size: TileSize = None,
           overlap: Optional[int] = None, *, raw: bool = False, band: Optional[int] = None, retry: bool = True,
           label: str = "DC-AE decode", is_oom: Callable = is_out_of_memory,
           free_memory: Callable = free_after_oom) -> tuple[torch.Tensor, Run]:
    """Latent [B,C,h,w] (model-space; unscaled with ``raw``) -> (images [B,3,h*f,w*f] in about [-1,1], not
    clamped, the Run).

    ``tile_size``: latent px per tile side, "auto" (auto_tile_size) or None (untiled); ``overlap``: latent px,
    used by blended tiles only (default a quarter tile). ``band``: the row-band budget (elements per batch
    item) of the banded and streamed strategies, default CPU_BAND. ``retry``: on running out of memory, retry
    with halved tiles down to 4 latent px on CPU, 8 elsewhere (``label`` names the work in the warning;
    ``is_oom``/``free_memory`` let a host recognise its own out-of-memory errors and free its caches). A
    decode computing in fp16 whose output is not finite runs again in fp32 (``Run.widened``)."""
    _check_latent(vae, latent)
    if not raw:
        latent = latent / vae.scaling_factor
    h, w = latent.shape[-2:]
    tile = _tile_size("decode", tile_size, h, w)
    overlap = _overlap("decode", overlap, tile)
    p = vae.decoder.conv_in.weight
    z = channels_last(latent.to(p.device, vae.dtype))
    autograd = torch.is_grad_enabled()

    def attempt(t):
        name = choose("decode", vae, strategy, t is not None, z.device.type, autograd)
        run = Run(name, z.device.type, not autograd, t)
        if name == "blended":
            run.overlap = overlap if t == tile else t // 4
        if name in ("banded", "streamed"):
            run.band = band or CPU_BAND
        return DECODE_STRATEGIES[name](vae, z, run), run

    x, run = _run(attempt, tile, max(h, w), z.device.type, retry, label, is_oom, free_memory)
    if z.dtype == torch.float16 and not bool(torch.isfinite(x).all()):
        # fp16 activations overflowed (a black or speckled image): the layers compute in their input's dtype,
        # so the same weights run again in fp32
        log.warning("[Twig] %s overflowed in fp16; decoding again in fp32", label)
        z = channels_last(latent.to(p.device, torch.float32))
        x, run = _run(attempt, tile, max(h, w), z.device.type, retry, label, is_oom, free_memory)
        run.widened = True
    return x.to(latent.device, latent.dtype).contiguous(), run


def encode(vae, images: torch.Tensor, strategy: str = "auto", tile_size: TileSize = None,
           overlap: Optional[int] = None, *, raw: bool = False, retry: bool = True, label: str = "DC-AE encode",
           is_oom: Callable = is_out_of_memory, free_memory: Callable = free_after_oom) -> tuple[torch.Tensor, Run]:
    """Images [B,3,H,W] in [-1,1] -> (model-space latent [B,C,H/f,W/f] (unscaled with ``raw``), the Run).
    ``tile_size``/``overlap`` in latent px as for decode (tiles cover tile_size*f image pixels); tiles blend."""
    _check_images(vae, images)
    f = vae.spatial_factor
    h, w = images.shape[-2] // f, images.shape[-1] // f
    tile = _tile_size("encode", tile_size, h, w)
    overlap = _overlap("encode", overlap, tile)
    p = vae.decoder.conv_in.weight
    x = channels_last(images.to(p.device, vae.dtype))
    autograd = torch.is_grad_enabled()

    def attempt(t):
        name = choose("encode", vae, strategy, t is not None, x.device.type, autograd)
        run = Run(name, x.device.type, not autograd, t)
        if name == "blended":
            run.overlap = overlap if t == tile else t // 4
        return ENCODE_STRATEGIES[name](vae, x, run), run

    z, run = _run(attempt, tile, max(h, w), x.device.type, retry, label, is_oom, free_memory)
    z = z.to(images.device, images.dtype).contiguous()
    return (z if raw else z * vae.scaling_factor), run
