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
- SIGMAS, samplers and schedulers: Twig's schedules as a node for SamplerCustom, and Twig Sampler's samplers and
  schedules added to core KSampler's lists (``twig_<name>``), giving Twig Sampler's result for the same seed.

Native latents follow ComfyUI's convention (the VAE's raw latent; the model scales it by the latent format), Twig
latents are model-space: use Twig Empty Latent for either (zeros), but do not feed a Twig VAE Encode latent to a
core sampler or the reverse. Every ``comfy.*`` name is looked up when a node runs (checked against ComfyUI 0.3.64
and the current sources); a missing one is reported by name.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import types

import torch

from twig_core import memory
from twig_core import int8 as twig_int8
from twig_core import ops as twig_ops
from twig_core.quant import QuantizedLayer, attach, quant_summary
from twig_core.sampling import MAX_STEPS, SAMPLERS, _stack, flow_sigmas, get_sampler
from twig_core.transformer import TwigTransformer

from .common import CATEGORY, MODEL, VAE, NodeError, node_errors
from .conditioning import TwigTextEncode
from .latent import TwigVAEDecode, TwigVAEEncode

NATIVE_CATEGORY = f"{CATEGORY}/native"
DEFAULT_SHIFT = 3.0
CHECKED_WITH = "ComfyUI 0.3.64"

log = logging.getLogger("twig")


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
    (and, in low-VRAM mode, streams) its weight on use, including the weights the transformer reads directly;
    the Twig LoRA Loader's adapters (twig_core.lora) are folded over the cast weight, in the layers' own forward
    too."""
    manual_cast = comfy_name("comfy.ops", "manual_cast")
    cast_bias_weight = comfy_name("comfy.ops", "cast_bias_weight")

    def cast(layer, x):
        out = cast_bias_weight(layer, x)  # (weight, bias), plus extras in some ComfyUI versions
        return twig_ops.with_adapters(layer, out[0], x.dtype), out[1]

    def weights(layer, x):
        if twig_int8.wants(layer, x):  # int8 products (CPU): packed once from the cast weight, then reused
            return twig_int8.Int8Weight(layer, lambda: cast(layer, x)[0]), layer.bias
        return cast(layer, x)

    class Linear(manual_cast.Linear):
        def forward_comfy_cast_weights(self, input):
            return twig_ops.dense(input, *weights(self, input))

    class Conv2d(manual_cast.Conv2d):
        def forward_comfy_cast_weights(self, input):
            return self._conv_forward(input, *weights(self, input))

    return types.SimpleNamespace(__name__="comfy.ops.manual_cast", Linear=Linear, Conv2d=Conv2d, weights=weights)


INTEGER_TIMESTEPS = "twig_integer_timesteps"  # transformer option: feed floor(sigma*1000), as Twig's DPM-Solver does


class NativeTwigTransformer(TwigTransformer):
    """The transformer with the call signature BaseModel uses: (x, timesteps, context=, attention_mask=, ...), and
    the device ComfyUI computes it on once its model manager placed it (``compute_device``): with ComfyUI's cast
    layers part of the weights may stay on the offload device (--lowvram, --novram) and stream in per layer, so
    the weights' own device says nothing about where the Twig sampler should send its inputs."""

    compute_device: torch.device | None = None

    @property
    def device(self) -> torch.device:
        return self.compute_device or super().device

    def forward(self, x, timesteps, context=None, attention_mask=None, control=None, transformer_options=None, **kwargs):
        if (transformer_options or {}).get(INTEGER_TIMESTEPS):
            timesteps = torch.floor(timesteps)
        return super().forward(x, timesteps, context, attention_mask)


def rebuild_for_host(transformer: TwigTransformer, operations) -> NativeTwigTransformer:
    """The same weights (shared, not copied) in a transformer whose layers come from ``operations``; layers
    holding GGUF or fp8 weights keep them as stored (twig_core.quant)."""
    with torch.device("meta"):
        native = NativeTwigTransformer(transformer.config, transformer.compute_dtype, operations=operations)
    for name, layer in transformer.named_modules():
        if isinstance(layer, QuantizedLayer):
            attach(native.get_submodule(name), "weight", layer.stored(), layer.wide_dtype, layer.qweight.device)
    native.load_state_dict(transformer.state_dict(), strict=True, assign=True)
    if twig_int8.enabled(transformer):  # the same weights: their smoothing and packs carry over
        twig_int8.enable(native, like=transformer)
    return native.eval().requires_grad_(False)


def for_host(transformer: TwigTransformer) -> TwigTransformer:
    """Inside ComfyUI (its ``comfy.ops`` loaded): the transformer rebuilt over the same weights with ComfyUI's
    manual-cast layers, so its model manager can load it partially and stream the rest; elsewhere unchanged."""
    if sys.modules.get("comfy.ops") is None:
        return transformer
    return rebuild_for_host(transformer, native_operations())


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

        def memory_required(self, input_shape, cond_shapes=None, **kwargs):
            """What ComfyUI frees before sampling and how it batches conds: twig_core.memory's estimate of one
            transformer call on ``input_shape`` (which already counts both CFG halves)."""
            dtype = self.manual_cast_dtype or self.get_dtype()
            return memory.step_bytes(self.diffusion_model.config, input_shape, dtype.itemsize, cfg=False)

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
        patcher = native_model(transformer, model_shift(model.path), _dcae_scale(), model.load_device,
                               model.offload_device)
        quantized = quant_summary(transformer)
        if quantized:
            logging.warning("Twig → native MODEL: %s keeps GGUF/fp8 weights (%s): ComfyUI's own LoRA nodes cannot "
                            "patch those layers (they report 'lora key not loaded'; a LoRA on it runs through Twig "
                            "LoRA Loader -> Twig Sampler); in low-VRAM mode their quantized blocks stream to the "
                            "device per layer", model.path, quantized)
        from .lora import patch_native  # a Twig LoRA Loader's stack becomes ComfyUI patches

        return (patch_native(patcher, model.loras) if getattr(model, "loras", None) else patcher,)


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


# --------------------------------------------------------------------------------------------------
# Twig's samplers and schedules in core KSampler / KSamplerSelect


def comfy_sampler_name(name: str) -> str:
    """The name a Twig sampler (twig_core.sampling.SAMPLER_TABLE) and its schedule have in ComfyUI's lists."""
    return f"twig_{name}"


def k_sampler_function(name: str):
    """Twig's sampler ``name`` as the k-diffusion style function comfy.samplers.KSAMPLER runs:
    ``f(model, x, sigmas, extra_args, callback, disable)``, over ComfyUI's denoiser ``model(x, sigma, **extra)``.

    What makes it Twig Sampler's and not only the same update rule: the model sees floor(sigma*1000) where the
    Twig sampler feeds integer timesteps (DPM-Solver++, through a transformer option the native model reads), and
    an empty latent (text to image) starts from the noise itself, as Twig Sampler and diffusers' DPM-Solver do,
    where ComfyUI would scale it by sigmas[0] (below 1 in the DPM-Solver schedule)."""
    sampler = get_sampler(name)

    def run(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra = dict(extra_args or {})
        if sampler.integer_timesteps:
            options = dict(extra.get("model_options") or {})
            options["transformer_options"] = {**options.get("transformer_options", {}), INTEGER_TIMESTEPS: True}
            extra["model_options"] = options
        latent, noise = getattr(model, "latent_image", None), getattr(model, "noise", None)
        if latent is not None and noise is not None and extra.get("denoise_mask") is None and not latent.any():
            x = noise.to(x)
        ones = x.new_ones([x.shape[0]])
        return sampler.function(lambda xt, sigma: model(xt, sigma * ones, **extra), x, sigmas, callback)

    run.__name__ = f"sample_{comfy_sampler_name(name)}"
    return run


def twig_scheduler(name: str):
    """Twig's schedule for sampler ``name`` as a ComfyUI scheduler: (model_sampling, steps) -> sigmas, shifted by
    the model's shift (ModelSamplingSD3/AuraFlow change it), float32 ending in 0."""

    def schedule(model_sampling, steps):
        return flow_sigmas(int(steps), float(getattr(model_sampling, "shift", DEFAULT_SHIFT)), name).float()

    return schedule


def register_samplers(samplers=None, k_diffusion=None) -> list[str]:
    """Adds each Twig sampler to ComfyUI's sampler list (KSampler, KSamplerAdvanced, KSamplerSelect) and its
    schedule to the scheduler list (KSampler, BasicScheduler), under ``twig_<name>``: core KSampler with sampler
    and scheduler twig_flow_dpmpp_2m is Twig Sampler's flow_dpmpp_2m. ComfyUI keeps these as module-level
    registries (``KSAMPLER_NAMES``/``SAMPLER_NAMES``, ``SCHEDULER_HANDLERS``/``SCHEDULER_NAMES``, checked with
    0.3.64); where one is missing nothing is added there and the log says so (Twig Flow Sigmas +
    SamplerCustom is the way then). Returns the names added; calling again adds nothing."""
    samplers = samplers or sys.modules.get("comfy.samplers")
    k_diffusion = k_diffusion or sys.modules.get("comfy.k_diffusion.sampling")
    if samplers is None or k_diffusion is None:
        return []
    added = []
    lists = [getattr(samplers, n, None) for n in ("KSAMPLER_NAMES", "SAMPLER_NAMES")]
    handlers, scheduler_names = getattr(samplers, "SCHEDULER_HANDLERS", None), getattr(samplers, "SCHEDULER_NAMES", None)
    handler_class = getattr(samplers, "SchedulerHandler", None)
    has_samplers = all(isinstance(names, list) for names in lists)
    has_schedulers = isinstance(handlers, dict) and isinstance(scheduler_names, list) and handler_class is not None
    for name in SAMPLERS:
        key = comfy_sampler_name(name)
        if has_samplers:
            setattr(k_diffusion, f"sample_{key}", k_sampler_function(name))
            if key not in lists[0]:
                added.append(f"sampler {key}")
            for names in lists:
                if key not in names:
                    names.append(key)
        if has_schedulers:
            handlers.setdefault(key, handler_class(twig_scheduler(name)))
            if key not in scheduler_names:
                scheduler_names.append(key)
                added.append(f"scheduler {key}")
    if not (has_samplers and has_schedulers):
        log.warning("[Twig] this ComfyUI keeps no %s list the Twig pack knows (checked with %s): use Twig Flow Sigmas "
                    "with SamplerCustom", "sampler" if not has_samplers else "scheduler", CHECKED_WITH)
    return added


NODES = {
    "TwigToNativeModel": (TwigToNativeModel, "Twig → native MODEL"),
    "TwigTextEncodeNative": (TwigTextEncodeNative, "Twig Text Encode (native CONDITIONING)"),
    "TwigToNativeVAE": (TwigToNativeVAE, "Twig → native VAE"),
    "TwigFlowSigmas": (TwigFlowSigmas, "Twig Flow Sigmas"),
}
