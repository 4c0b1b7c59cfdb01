"""Text -> image and image -> image, from loaded parts.

``sample_latents`` is the one sampling entry point (used by the nodes, the CLI, the WebUI tab and face
refine); ``generate`` adds prompt encoding and VAE decoding around it.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from . import dcae_exec, sampling
from .devices import Residency
from .errors import TwigError
from .resolution import check_size


def latent_mask(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """A pixel or latent mask ([H,W], [B,H,W] or [B,1,H,W], 1 = regenerate) resized to [B,1,h,w] in 0..1."""
    m = mask.float()
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[:, None]
    if m.ndim != 4 or m.shape[1] != 1:
        raise TwigError(f"mask must be [H,W], [B,H,W] or [B,1,H,W], got shape {tuple(mask.shape)}")
    if m.shape[-2:] != (h, w):
        m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
    return m.clamp(0, 1)


def sample_latents(
    transformer,
    cond,
    uncond=None,
    *,
    width: int | None = None,
    height: int | None = None,
    batch_size: int = 1,
    steps: int = 20,
    cfg: float = 4.5,
    seed: int = 0,
    sampler: str = "flow_dpmpp_2m",
    shift: float = 3.0,
    init_latent: torch.Tensor | None = None,
    denoise: float = 1.0,
    mask: torch.Tensor | None = None,
    callback: Callable[[dict], None] | None = None,
    cache: float = 0.0,
    cfg_interval: tuple[float, float] | None = None,
    stats: sampling.Evaluations | None = None,
) -> torch.Tensor:
    """Sample model-space latents [B,C,h,w] (float32, CPU). The noise is drawn on the CPU (the same seed gives
    the same image on any device); the steps then run on the transformer's device.

    Text to image: give width/height (pixels, multiples of 32) and batch_size. Image to image: give
    ``init_latent`` and ``denoise`` < 1. Inpaint: also give ``mask`` (1 = regenerate); latents outside the
    mask come back exactly as they went in. ``denoise`` == 0 returns ``init_latent`` unchanged.
    ``cache`` (step-cache threshold, 0 = off) and ``cfg_interval`` (guidance only for lo <= sigma <= hi) spend
    fewer transformer evaluations (``sampling.make_denoiser``); ``stats`` (an ``Evaluations``) counts them.
    """
    channels = transformer.config.in_channels
    if init_latent is None:
        if width is None or height is None:
            raise TwigError("text to image needs width and height")
        check_size(width, height)
        if batch_size < 1:
            raise TwigError(f"batch_size must be ≥ 1, got {batch_size}")
        shape = (batch_size, channels, height // 32, width // 32)
        if denoise != 1.0 or mask is not None:
            raise TwigError("denoise < 1 and masks need an input latent (image to image)")
    else:
        init_latent = init_latent.float().cpu()
        if init_latent.ndim != 4 or init_latent.shape[1] != channels:
            raise TwigError(f"input latent has shape {tuple(init_latent.shape)}; this model expects [B,{channels},h,w]")
        if not torch.isfinite(init_latent).all():
            raise TwigError("input latent contains NaN/inf")
        shape = tuple(init_latent.shape)
        if denoise == 0:
            return init_latent.clone()
    device = transformer.device
    noise = sampling.noise_like(shape, seed).to(device)
    if init_latent is not None:
        init_latent = init_latent.to(device)
    sigmas = sampling.flow_sigmas(steps, shift, sampler, denoise)
    inpaint = None
    if mask is not None:
        m = latent_mask(mask, shape[2], shape[3]).expand(shape[0], 1, -1, -1).to(device)
        inpaint = (init_latent, noise, m)
    integer = sampling.get_sampler(sampler).integer_timesteps
    denoiser = sampling.make_denoiser(transformer, cond, uncond, cfg, integer_timesteps=integer, inpaint=inpaint,
                                      cache=cache, cfg_interval=cfg_interval, stats=stats,
                                      final_sigma=float(sigmas[-2]))
    x = sampling.sample(denoiser, noise, sigmas, sampler, init=init_latent if denoise < 1.0 else None, callback=callback)
    if inpaint is not None:
        x = x * inpaint[2] + init_latent * (1 - inpaint[2])
    return x.cpu()


def generate(
    transformer,
    vae,
    text_encoder,
    prompt: str,
    negative: str = "",
    *,
    width: int = 1024,
    height: int = 1024,
    batch_size: int = 1,
    steps: int = 20,
    cfg: float = 4.5,
    seed: int = 0,
    sampler: str = "flow_dpmpp_2m",
    shift: float = 3.0,
    max_length: int = 300,
    image: torch.Tensor | None = None,
    denoise: float = 1.0,
    mask: torch.Tensor | None = None,
    tile_size: int | str | None = "auto",
    callback: Callable[[dict], None] | None = None,
    residency: Residency | None = None,
    cache: float = 0.0,
    cfg_interval: tuple[float, float] | None = None,
    stats: sampling.Evaluations | None = None,
) -> torch.Tensor:
    """Prompt -> images [B,3,H,W] in [-1,1]. ``image`` ([B,3,H,W] in [-1,1]) switches to image to image.

    ``tile_size``: VAE tiles in latent pixels; "auto" tiles only images larger than 1024², None never tiles
    (see dcae_exec: out of memory, the VAE retries with smaller tiles). ``residency`` (``Parts.residency``)
    puts each network on the device before it runs; with offloading, only that one. ``cache``,
    ``cfg_interval`` and ``stats``: as for :func:`sample_latents`. Each network is used in one stretch (image to
    image: VAE encode, text, transformer, VAE decode) and no reference to it is kept after its stage, so
    deferred parts (``loader.load_parts(lazy=True)``) are held one at a time.
    """
    use = (residency or Residency()).use
    init = None
    if image is not None:  # first: with deferred networks the VAE is then loaded and dropped before Gemma-2 loads
        check_size(image.shape[-1], image.shape[-2])
        with torch.no_grad():
            init = dcae_exec.encode(use(vae), image.float(), tile_size=tile_size)[0].float().cpu()
    cond, uncond = _encode(use(text_encoder), prompt, negative if cfg != 1.0 else None, max_length)
    latents = sample_latents(
        use(transformer), cond, uncond, width=width, height=height, batch_size=batch_size, steps=steps, cfg=cfg,
        seed=seed, sampler=sampler, shift=shift, init_latent=init, denoise=denoise if init is not None else 1.0,
        mask=mask, callback=callback, cache=cache, cfg_interval=cfg_interval, stats=stats,
    )
    with torch.no_grad():
        return dcae_exec.decode(use(vae), latents, tile_size=tile_size)[0].float().cpu()


def _encode(encoder, prompt: str, negative: str | None, max_length: int):
    """(cond, uncond or None); a function of its own so that no reference to the encoder outlives it."""
    cond = encoder.encode([prompt], max_length=max_length, use_instruction=True)
    if negative is None:
        return cond, None
    return cond, encoder.encode([negative], max_length=max_length, use_instruction=False)
