"""Twig as a native ComfyUI model: nodes that turn the Twig loaders' outputs into core MODEL, CONDITIONING, VAE
and SIGMAS, so core KSampler / SamplerCustom, VAE Decode / Encode (tiled too), model patches and the packs built
on them take Twig like any core model.

- MODEL: a ``comfy.model_base.BaseModel`` subclass around twig_core's transformer (rebuilt over the same weights
  with ComfyUI's manual-cast layers, so fp8 weights and low-VRAM streaming apply), ``ModelType.FLOW`` with the
  model's shift (3.0 unless its pipeline folder says otherwise; ModelSamplingSD3/AuraFlow nodes change it), a
  32-channel latent format with the DC-AE scaling factor, managed by a ``comfy.model_patcher.ModelPatcher``.
- CONDITIONING: Gemma-2 states with Sana's instruction prefix and the loader's 300-1200 token budget, carrying the
  attention mask, which the native model applies exactly as the Twig sampler does.
- VAE: the DC-AE behind the core VAE node methods, through the Twig VAE nodes' decode/encode (tiling, OOM fallback).

Native latents follow ComfyUI's convention (the VAE's raw latent; the model scales it by the latent format), Twig
latents are model-space: use Twig Empty Latent for either (zeros), but do not feed a Twig VAE Encode latent to a
core sampler or the reverse. Every ``comfy.*`` name is looked up when a node runs (checked against ComfyUI 0.3.64
and the current sources); a missing one is reported by name.
"""

from __future__ import annotations

import importlib
import json
import os
import types

import torch

from twig_core.sampling import MAX_STEPS, SAMPLERS, _stack, flow_sigmas
from twig_core.transformer import TwigTransformer

from .common import CATEGORY, MODEL, VAE, NodeError, node_errors
from .conditioning import TwigTextEncode
from .latent import TwigVAEDecode, TwigVAEEncode

NATIVE_CATEGORY = f"{CATEGORY}/native"
DEFAULT_SHIFT = 3.0
CHECKED_WITH = "ComfyUI 0.3.64"


def comfy_name(module: str, *names: str):
    """``module.name[.name...]`` from ComfyUI, or a NodeError naming what is missing."""
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise NodeError(f"Twig native nodes need ComfyUI's {module} (checked with {CHECKED_WITH}): {e}") from e
    for n in names:
        if not hasattr(obj, n):
            raise NodeError(f"this ComfyUI has no {module}.{'.'.join(names)} (the native Twig path was checked "
                            f"with {CHECKED_WITH}); use the Twig nodes instead")
        obj = getattr(obj, n)
    return obj


# --------------------------------------------------------------------------------------------------
# MODEL


def native_operations():
    """ComfyUI's manual-cast layers as an operations namespace for twig_core's transformer: every layer casts
    (and, in low-VRAM mode, streams) its weight on use, including the weights the transformer reads directly."""
    manual_cast = comfy_name("comfy.ops", "manual_cast")
    cast_bias_weight = comfy_name("comfy.ops", "cast_bias_weight")

    def weights(layer, x):
        out = cast_bias_weight(layer, x)  # (weight, bias), plus extras in some ComfyUI versions
        return out[0], out[1]

    return types.SimpleNamespace(__name__="comfy.ops.manual_cast", Linear=manual_cast.Linear,
                                 Conv2d=manual_cast.Conv2d, weights=weights)


class NativeTwigTransformer(TwigTransformer):
    """The transformer with the call signature BaseModel uses: (x, timesteps, context=, attention_mask=, ...)."""

    def forward(self, x, timesteps, context=None, attention_mask=None, control=None, transformer_options=None, **kwargs):
        return super().forward(x, timesteps, context, attention_mask)


def rebuild_for_host(transformer: TwigTransformer, operations) -> NativeTwigTransformer:
    """The same weights (shared, not copied) in a transformer whose layers come from ``operations``."""
    with torch.device("meta"):
        native = NativeTwigTransformer(transformer.config, transformer.compute_dtype, operations=operations)
    native.load_state_dict(transformer.state_dict(), strict=True, assign=True)
    return native.eval().requires_grad_(False)


def model_shift(path: str) -> float:
    """The flow shift a pipeline folder's scheduler config gives (``flow_shift``), else Sana's 3.0."""
    for folder in (path, os.path.dirname(path.rstrip("/\\"))):
        cfg = os.path.join(folder, "scheduler", "scheduler_config.json")
        if os.path.isfile(cfg):
            try:
                with open(cfg, encoding="utf-8") as f:
                    return float(json.load(f).get("flow_shift") or DEFAULT_SHIFT)
            except (OSError, ValueError, TypeError) as e:
                raise NodeError(f"cannot read flow_shift from {cfg}: {e}") from e
    return DEFAULT_SHIFT


def latent_format(scale: float):
    """A 32-channel, 2-D ComfyUI latent format whose model-space latent is raw * ``scale`` (the DC-AE's)."""
    base = comfy_name("comfy.latent_formats", "LatentFormat")
    return type("TwigDCAE", (base,), {"__module__": __name__, "latent_channels": 32, "latent_dimensions": 2,
                                      "scale_factor": scale})


def native_model(transformer: TwigTransformer, shift: float, scale: float, load_device, offload_device):
    """A ModelPatcher over a BaseModel that runs ``transformer`` (its weights shared) as a flow model."""
    base_model = comfy_name("comfy.model_base", "BaseModel")
    base_config = comfy_name("comfy.supported_models_base", "BASE")
    flow = comfy_name("comfy.model_base", "ModelType", "FLOW")
    patcher_class = comfy_name("comfy.model_patcher", "ModelPatcher")
    cond_regular = comfy_name("comfy.conds", "CONDRegular")

    class TwigConfig(base_config):
        unet_config = {"disable_unet_model_creation": True}
        unet_extra_config = {}
        sampling_settings = {"shift": float(shift), "multiplier": 1000}
        latent_format = latent_format(scale)
        memory_usage_factor = 1.0

    class TwigNativeModel(base_model):
        """Twig inside ComfyUI's sampling: x, sigma*1000 and the caption states plus their attention mask."""

        def extra_conds(self, **kwargs):
            out = super().extra_conds(**kwargs)
            mask = kwargs.get("attention_mask")
            if mask is not None:
                out["attention_mask"] = cond_regular(mask)
            return out

    config = TwigConfig(TwigConfig.unet_config)
    native = rebuild_for_host(transformer, native_operations())
    if native.weight_dtype != native.dtype:
        config.manual_cast_dtype = native.dtype
    model = TwigNativeModel(config, model_type=flow, device=load_device)
    model.diffusion_model = native
    return patcher_class(model, load_device=load_device, offload_device=offload_device)


class TwigToNativeModel:
    DESCRIPTION = ("Gives the Twig transformer as a core MODEL for KSampler, SamplerCustom, model patches and "
                   "LoRA loaders: flow matching with the model's shift (3.0; ModelSamplingSD3/AuraFlow change it). "
                   "Pair it with Twig Text Encode (native) and Twig → native VAE.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": (MODEL, {"tooltip": "From Twig Model Loader."})}}

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("MODEL",)
    FUNCTION = "convert"
    CATEGORY = NATIVE_CATEGORY

    @node_errors("Twig → native MODEL")
    def convert(self, model):
        if not hasattr(model, "peek") or model.kind != "transformer":
            raise NodeError(f"Twig → native MODEL: model must come from Twig Model Loader, got {type(model).__name__}")
        transformer = model.peek()
        return (native_model(transformer, model_shift(model.path), _dcae_scale(), model.load_device,
                             model.offload_device),)


def _dcae_scale() -> float:
    from twig_core.dcae import DCAEConfig

    return DCAEConfig().scaling_factor


# --------------------------------------------------------------------------------------------------
# CONDITIONING


def to_native(*conds) -> list:
    """Twig conditionings as core CONDITIONING lists, padded (masked zeros) to one length, so ComfyUI batches
    positive and negative together without repeating tokens."""
    embeds, mask = _stack([(c.embeds, c.mask) for c in conds])
    out, start = [], 0
    for c in conds:
        end = start + c.batch_size
        out.append([[embeds[start:end].float(), {"attention_mask": mask[start:end]}]])
        start = end
    return out


class TwigTextEncodeNative:
    DESCRIPTION = ("Twig Text Encode with core CONDITIONING outputs (for KSampler and other core nodes): Gemma-2 "
                   "states with Sana's instruction prefix on the positive prompt, the loader's token budget, and "
                   "the attention mask the native model applies.")

    @classmethod
    def INPUT_TYPES(cls):
        return TwigTextEncode.INPUT_TYPES()

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "STRING")
    RETURN_NAMES = ("positive", "negative", "token_report")
    OUTPUT_TOOLTIPS = ("Positive conditioning for a core sampler with the Twig native MODEL.",
                       "Negative conditioning for a core sampler with the Twig native MODEL.",
                       "Token counts of both prompts, and truncation warnings.")
    FUNCTION = "encode"
    CATEGORY = NATIVE_CATEGORY

    def encode(self, text_encoder, positive, negative="", unload_after=False):
        done = TwigTextEncode().encode(text_encoder, positive, negative, unload_after)
        pos, neg, report = done["result"]
        return {"ui": done["ui"], "result": (*to_native(pos, neg), report)}


# --------------------------------------------------------------------------------------------------
# VAE


class NativeDCAE:
    """The DC-AE with the methods core VAE nodes call (decode, decode_tiled, encode, encode_tiled and the
    compression queries). Latents are raw (ComfyUI's convention); images IMAGE [B,H,W,3] in 0..1."""

    latent_channels = 32
    latent_dim = 2
    output_channels = 3

    def __init__(self, vae):
        self.vae = vae
        self.downscale_ratio = self.upscale_ratio = 32
        self.scale = _dcae_scale()

    def __repr__(self) -> str:
        return f"<Twig native VAE {self.vae.name}>"

    def throw_exception_if_invalid(self):
        return None

    def spacial_compression_decode(self):
        return self.upscale_ratio

    def spacial_compression_encode(self):
        return self.downscale_ratio

    def temporal_compression_decode(self):
        return None

    def decode(self, samples, tile_size: int = 0, **_):
        return TwigVAEDecode().decode({"samples": samples.float() * self.scale}, self.vae, tile_size)[0]

    def decode_tiled(self, samples, tile_x=None, tile_y=None, overlap=None, **_):
        tile = max(tile_x or 0, tile_y or 0)  # latent px; the DC-AE's tiles are square with their own overlap
        return self.decode(samples, tile * self.upscale_ratio)

    def encode(self, pixels, tile_size: int = 0):
        latent = TwigVAEEncode().encode(pixels[..., :3], self.vae, tile_size)[0]["samples"]
        return latent / self.scale

    def encode_tiled(self, pixels, tile_x=None, tile_y=None, overlap=None, **_):
        tile = max(tile_x or 0, tile_y or 0)  # pixels
        return self.encode(pixels, tile // self.downscale_ratio * self.downscale_ratio)


class TwigToNativeVAE:
    DESCRIPTION = ("Gives the DC-AE as a core VAE for VAE Decode, VAE Decode (Tiled), VAE Encode and VAE Encode "
                   "(for Inpainting), through the Twig VAE nodes' decoder (tiling, out-of-memory fallback).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": (VAE, {"tooltip": "From Twig VAE Loader."})}}

    RETURN_TYPES = ("VAE",)
    RETURN_NAMES = ("VAE",)
    FUNCTION = "convert"
    CATEGORY = NATIVE_CATEGORY

    @node_errors("Twig → native VAE")
    def convert(self, vae):
        if not hasattr(vae, "peek") or vae.kind != "vae":
            raise NodeError(f"Twig → native VAE: vae must come from Twig VAE Loader, got {type(vae).__name__}")
        return (NativeDCAE(vae),)


# --------------------------------------------------------------------------------------------------
# SIGMAS


class TwigFlowSigmas:
    DESCRIPTION = ("Twig's flow schedules as SIGMAS for core SamplerCustom: with sampler 'euler' and the same seed "
                   "(below 2^32), schedule flow_euler gives what Twig Sampler's flow_euler gives.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "steps": ("INT", {"default": 20, "min": 1, "max": MAX_STEPS}),
            "schedule": (list(SAMPLERS), {"default": "flow_euler", "tooltip": "Whose spacing: Sana's DPM-Solver++ or flow Euler."}),
            "shift": ("FLOAT", {"default": DEFAULT_SHIFT, "min": 0.1, "max": 20.0, "step": 0.1, "round": 0.01}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("SIGMAS",)
    RETURN_NAMES = ("sigmas",)
    FUNCTION = "sigmas"
    CATEGORY = NATIVE_CATEGORY

    @node_errors("Twig Flow Sigmas")
    def sigmas(self, steps, schedule, shift, denoise):
        return (flow_sigmas(int(steps), float(shift), schedule, float(denoise)).float(),)


NODES = {
    "TwigToNativeModel": (TwigToNativeModel, "Twig → native MODEL"),
    "TwigTextEncodeNative": (TwigTextEncodeNative, "Twig Text Encode (native CONDITIONING)"),
    "TwigToNativeVAE": (TwigToNativeVAE, "Twig → native VAE"),
    "TwigFlowSigmas": (TwigFlowSigmas, "Twig Flow Sigmas"),
}
