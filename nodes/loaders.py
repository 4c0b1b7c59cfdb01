"""Loader nodes: transformer, Gemma-2 text encoder, DC-AE. Files or diffusers folders from ComfyUI's model folders."""

from __future__ import annotations

from dataclasses import dataclass

from twig_core import loader
from twig_core.devices import DTYPE_CHOICES, WEIGHT_DTYPE_CHOICES, weight_dtype_kwargs
from twig_core.errors import TwigError
from twig_core.text import MAX_LENGTH_LIMIT, SANA_MAX_LENGTH

from . import host
from .common import CATEGORY, MODEL, TEXT_ENCODER, VAE, node_errors

MODEL_FOLDERS = ("diffusion_models", "unet", "checkpoints")  # unet: where GGUF users keep them
TEXT_FOLDERS = ("text_encoders",)
VAE_FOLDERS = ("vae",)


def _choices(kinds, pipeline_kinds=()):
    """A loader's combo: the embedded demo models first (all three loaders read their pipeline folders, so the demo
    workflows run without downloading anything), then what the model folders hold."""
    names = host.list_models(kinds, pipeline_kinds, demo=True)
    return names or [f"(put a model in models/{kinds[0]})"]


def resolve(name, kinds, pipeline_kinds=()) -> str:
    """Full path for a loader choice: an embedded demo model, or a file/folder in the model folders."""
    return host.resolve_model(name, kinds, pipeline_kinds)


def validate(name, kinds, pipeline_kinds=()):
    """A loader's check of its file choice when a prompt is queued (ComfyUI calls VALIDATE_INPUTS instead of its
    bare "Value not in list"): True, or which folder the file belongs in (e.g. a shared workflow whose weights are
    not installed yet)."""
    try:
        resolve(name, kinds, pipeline_kinds)
    except TwigError as e:
        return f"{e}; put it there and refresh (R), or pick another"
    return True


DTYPE_INPUT = list(DTYPE_CHOICES)
WEIGHT_DTYPE_INPUT = (list(WEIGHT_DTYPE_CHOICES), {"default": "same", "tooltip": "Weights in memory: same as dtype, as stored in the file, or fp16/bf16. fp16 weights computing in fp32 take half the memory of fp32. int8 (CPU): fp16 weights whose large products run in int8, about twice as fast as fp32; a step stays within about 3% of fp32 (the fast preset on CPUs without AMX; with AMX, fast uses bf16, which is faster)."})
VAE_WEIGHT_DTYPE_INPUT = ([c for c in WEIGHT_DTYPE_CHOICES if c != "int8"], WEIGHT_DTYPE_INPUT[1])


@dataclass
class TextEncoderRef:
    """What flows through a TWIG_TEXT_ENCODER socket: the loaded Gemma-2 and the token budget to encode with."""

    model: host.ManagedModel
    max_tokens: int

    def __repr__(self) -> str:
        return f"<Twig text encoder {self.model.name}, {self.max_tokens} tokens>"


class TwigModelLoader:
    DESCRIPTION = "Loads a Twig / Sana transformer (NVlabs .pth/.safetensors, ComfyUI single file, GGUF, fp8 or diffusers folder)."

    @classmethod
    def INPUT_TYPES(cls):
        names = _choices(MODEL_FOLDERS)
        return {
            "required": {
                "model_name": (names, {"tooltip": "A file (.safetensors, .pth, .gguf) or diffusers folder in models/diffusion_models, models/unet or models/checkpoints."}),
                "dtype": (DTYPE_INPUT, {"default": "auto", "tooltip": "Compute dtype (and weight dtype unless weight_dtype says otherwise). auto: ComfyUI's choice for this GPU (fp32 on CPU)."}),
            },
            "optional": {"weight_dtype": WEIGHT_DTYPE_INPUT},
        }

    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, model_name):
        return validate(model_name, MODEL_FOLDERS)

    @node_errors("Twig Model Loader")
    def load(self, model_name, dtype="auto", weight_dtype="same"):
        path = resolve(model_name, MODEL_FOLDERS)
        load_dev, offload_dev = host.devices("diffusion")
        dt, kwargs = host.transformer_dtypes(dtype, weight_dtype, load_dev, path)
        model = host.cached_model(
            "transformer", path, dt, load_dev, offload_dev,
            lambda device: loader.load_transformer(path, device=device, **kwargs).eval().requires_grad_(False),
            extra=(weight_dtype,),
        )
        return (model,)


class TwigTextEncoderLoader:
    DESCRIPTION = "Loads Gemma-2 (folder with tokenizer, diffusers pipeline folder or single file) for Twig prompts."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder_name": (_choices(TEXT_FOLDERS, MODEL_FOLDERS), {"tooltip": "Gemma-2-2B(-it) in models/text_encoders: an HF folder with its tokenizer, a single file, or a diffusers pipeline folder."}),
                "max_tokens": ("INT", {"default": SANA_MAX_LENGTH, "min": SANA_MAX_LENGTH, "max": MAX_LENGTH_LIMIT, "step": 1, "tooltip": "Prompt length budget in tokens. Sana was trained with 300; longer prompts are truncated with a warning."}),
                "device": (["default", "cpu", "gpu"], {"default": "default", "tooltip": "cpu keeps the GPU free for the transformer (slower prompt encoding)."}),
                "dtype": (DTYPE_INPUT, {"default": "auto", "tooltip": "auto: bf16 on GPUs that support it, else fp32. fp16 overflows in Gemma-2."}),
            }
        }

    RETURN_TYPES = (TEXT_ENCODER,)
    RETURN_NAMES = ("text_encoder",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, text_encoder_name):
        return validate(text_encoder_name, TEXT_FOLDERS, MODEL_FOLDERS)

    @node_errors("Twig Text Encoder Loader")
    def load(self, text_encoder_name, max_tokens=SANA_MAX_LENGTH, device="default", dtype="auto"):
        path = resolve(text_encoder_name, TEXT_FOLDERS, MODEL_FOLDERS)
        load_dev, offload_dev = host.devices("text", device)
        dt = host.pick_dtype(dtype, load_dev, "text")
        model = host.cached_model(
            "text_encoder", path, dt, load_dev, offload_dev,
            lambda dev: loader.load_text_encoder(path, dtype=dt, device=dev),
            module_of=lambda te: te.model,
        )
        return (TextEncoderRef(model, int(max_tokens)),)


class TwigVAELoader:
    DESCRIPTION = "Loads the DC-AE autoencoder (diffusers vae/ folder, pipeline folder or single file)."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                # not "vae_name": ComfyUI's frontend gives that input name special (asset browser) handling
                "vae_model": (_choices(VAE_FOLDERS, MODEL_FOLDERS), {"tooltip": "DC-AE f32c32 in models/vae: a file, a diffusers vae/ folder, or a pipeline folder."}),
                "dtype": (DTYPE_INPUT, {"default": "auto", "tooltip": "Compute dtype (and weight dtype unless weight_dtype says otherwise). auto: bf16 on GPUs that support it, else fp32."}),
            },
            "optional": {"weight_dtype": VAE_WEIGHT_DTYPE_INPUT},
        }

    RETURN_TYPES = (VAE,)
    RETURN_NAMES = ("vae",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, vae_model):
        return validate(vae_model, VAE_FOLDERS, MODEL_FOLDERS)

    @node_errors("Twig VAE Loader")
    def load(self, vae_model, dtype="auto", weight_dtype="same"):
        path = resolve(vae_model, VAE_FOLDERS, MODEL_FOLDERS)
        load_dev, offload_dev = host.devices("vae")
        dt = host.pick_dtype(dtype, load_dev, "vae")
        kwargs = weight_dtype_kwargs(weight_dtype, dt, load_dev, "vae")
        vae = host.cached_model(
            "vae", path, dt, load_dev, offload_dev,
            lambda dev: loader.load_vae(path, device=dev, **kwargs).eval().requires_grad_(False),
            extra=(weight_dtype,),
        )
        return (vae,)


class TwigUnloadModels:
    DESCRIPTION = "Releases every Twig model from GPU and RAM; they load again when next used."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "optional": {"latent": ("LATENT", {"tooltip": "Wire a latent through to unload right after sampling."})}}

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "unload"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    @node_errors("Twig Unload Models")
    def unload(self, latent=None):
        host.release_all()
        return (latent,)
