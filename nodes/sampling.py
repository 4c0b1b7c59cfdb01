"""The sampler node: text to image, image to image (denoise) and inpainting (the latent's noise_mask)."""

from __future__ import annotations

import torch

from twig_core.devices import MAX_SEED
from twig_core.pipeline import sample_latents
from twig_core.sampling import CACHE_MAX, MAX_STEPS, SAMPLER_TABLE, SAMPLERS
from twig_core.step_cache import Evaluations

from . import host
from .common import CATEGORY, CONDITIONING, MODEL, NodeError, log, node_errors
from .latent import _latent_samples
from .preview import preview_image

SAMPLER_HELP = " ".join(f"{name}: {s.description}." for name, s in SAMPLER_TABLE.items())


def _check_cond(name, cond):
    if not hasattr(cond, "embeds") or not hasattr(cond, "mask"):
        raise NodeError(f"Twig Sampler: {name} must come from Twig Text Encode, got {type(cond).__name__}")


class TwigSampler:
    DESCRIPTION = ("Samples a Twig latent with a flow-matching solver and classifier-free guidance. denoise < 1 "
                   "keeps part of the input latent (image to image); a latent noise_mask limits changes to the "
                   "masked area (inpainting).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL,),
                "positive": (CONDITIONING,),
                "negative": (CONDITIONING,),
                "latent": ("LATENT", {"tooltip": "Twig Empty Latent for text to image, or Twig VAE Encode for image to image."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True, "tooltip": "Noise seed; the same seed gives the same image on any device."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": MAX_STEPS, "tooltip": "Solver steps (20 is Sana's default)."}),
                "cfg": ("FLOAT", {"default": 4.5, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01, "tooltip": "Guidance scale; 1.0 skips the negative prompt (twice as fast)."}),
                "sampler": (list(SAMPLERS), {"default": SAMPLERS[0], "tooltip": SAMPLER_HELP}),
                "shift": ("FLOAT", {"default": 3.0, "min": 0.1, "max": 20.0, "step": 0.1, "round": 0.01, "tooltip": "Flow schedule shift (Sana: 3.0; higher for larger images)."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "1.0 = from pure noise; lower keeps more of the input latent; 0 returns it unchanged."}),
            },
            "optional": {
                "cache": ("FLOAT", {"default": 0.0, "min": 0.0, "max": CACHE_MAX, "step": 0.01, "tooltip": "Step cache: while the first block's change stays under this (relative), reuse the other blocks' work of the last full step, never two steps in a row. 0 = off."}),
                "cfg_sigma_min": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Guidance only for noise levels (sigma) from this …"}),
                "cfg_sigma_max": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "… to this; other steps run the prompt alone (one pass instead of two). 0 … 1 = always."}),
            },
        }

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    @node_errors("Twig Sampler")
    def sample(self, model, positive, negative, latent, seed, steps, cfg, sampler, shift, denoise, cache=0.0,
               cfg_sigma_min=0.0, cfg_sigma_max=1.0):
        _check_cond("positive", positive)
        _check_cond("negative", negative)
        interval = None if (cfg_sigma_min, cfg_sigma_max) == (0.0, 1.0) else (float(cfg_sigma_min), float(cfg_sigma_max))
        if not 0.0 <= cfg_sigma_min <= cfg_sigma_max <= 1.0:
            raise NodeError(f"Twig Sampler: cfg_sigma_min {cfg_sigma_min} … cfg_sigma_max {cfg_sigma_max} must be a "
                            "range within 0 … 1")
        stats = Evaluations()
        init = _latent_samples(latent)
        mask = latent.get("noise_mask")
        host.check_interrupt()
        out = dict(latent)
        if denoise == 0:
            out["samples"] = init.float().clone()
            return (out,)

        tokens = max(positive.embeds.shape[1], negative.embeds.shape[1])
        need = host.step_memory_required(model.peek(), init.shape, cfg=cfg != 1.0, caption_tokens=tokens)
        transformer = model.get(memory_required=need)
        want_preview, max_size = host.preview_settings()
        bar = host.Progress(steps)
        projection = getattr(transformer, "latent_rgb", None)

        def callback(state):
            host.check_interrupt()
            preview = None
            if want_preview:
                preview = ("JPEG", preview_image(state["denoised"], max_size, projection), max_size)
            bar.update(state["i"] + 1, preview)

        with torch.no_grad():
            samples = sample_latents(
                transformer, positive, negative, steps=int(steps), cfg=float(cfg), seed=int(seed),
                sampler=sampler, shift=float(shift), init_latent=init, denoise=float(denoise),
                mask=mask, callback=callback, cache=float(cache), cfg_interval=interval, stats=stats,
            )
        if stats.computed < stats.full:
            log.info("Twig Sampler: %s", stats)
        out["samples"] = samples
        return (out,)
