"""ComfyUI nodes for Twig: thin adapters over twig_core (V1 node API).

Types between nodes: TWIG_MODEL, TWIG_TEXT_ENCODER, TWIG_VAE (loaded models, see ``host.ManagedModel``),
TWIG_CONDITIONING (``twig_core.text.Conditioning``), and ComfyUI's own LATENT
(``{"samples": [B,32,H/32,W/32]}``, model-space) and IMAGE (``[B,H,W,3]`` float 0..1). ``native`` turns the
Twig types into ComfyUI's own MODEL, CONDITIONING, VAE and SIGMAS for core samplers and VAE nodes.
"""

from .conditioning import TwigTextEncode
from .latent import TwigEmptyLatent, TwigVAEDecode, TwigVAEEncode
from .loaders import TwigModelLoader, TwigTextEncoderLoader, TwigUnloadModels, TwigVAELoader
from .sampling import TwigSampler

NODE_CLASS_MAPPINGS = {
    "TwigModelLoader": TwigModelLoader,
    "TwigTextEncoderLoader": TwigTextEncoderLoader,
    "TwigVAELoader": TwigVAELoader,
    "TwigTextEncode": TwigTextEncode,
    "TwigEmptyLatent": TwigEmptyLatent,
    "TwigSampler": TwigSampler,
    "TwigVAEDecode": TwigVAEDecode,
    "TwigVAEEncode": TwigVAEEncode,
    "TwigUnloadModels": TwigUnloadModels,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "TwigModelLoader": "Twig Model Loader",
    "TwigTextEncoderLoader": "Twig Text Encoder Loader (Gemma-2)",
    "TwigVAELoader": "Twig VAE Loader (DC-AE)",
    "TwigTextEncode": "Twig Text Encode",
    "TwigEmptyLatent": "Twig Empty Latent (Resolution)",
    "TwigSampler": "Twig Sampler",
    "TwigVAEDecode": "Twig VAE Decode",
    "TwigVAEEncode": "Twig VAE Encode",
    "TwigUnloadModels": "Twig Unload Models",
}

from .face import TwigFaceDetect, TwigFaceRefine  # noqa: E402

NODE_CLASS_MAPPINGS.update({"TwigFaceDetect": TwigFaceDetect, "TwigFaceRefine": TwigFaceRefine})
NODE_DISPLAY_NAME_MAPPINGS.update({"TwigFaceDetect": "Twig Face Detect", "TwigFaceRefine": "Twig Face Refine"})

from .tipo import TwigTIPO  # noqa: E402

NODE_CLASS_MAPPINGS["TwigTIPO"] = TwigTIPO
NODE_DISPLAY_NAME_MAPPINGS["TwigTIPO"] = "Twig TIPO Prompt Expansion"

from .native import NODES as _NATIVE, register_samplers  # noqa: E402

NODE_CLASS_MAPPINGS.update({k: cls for k, (cls, _) in _NATIVE.items()})
NODE_DISPLAY_NAME_MAPPINGS.update({k: title for k, (_, title) in _NATIVE.items()})
register_samplers()  # Twig's samplers and schedules in core KSampler's lists, when running inside ComfyUI

from .lora import NODES as _LORA  # noqa: E402

NODE_CLASS_MAPPINGS.update({k: cls for k, (cls, _) in _LORA.items()})
NODE_DISPLAY_NAME_MAPPINGS.update({k: title for k, (_, title) in _LORA.items()})

from .tokens import register_routes  # noqa: E402

register_routes()  # POST /twig/token_count for the live token count, when running inside ComfyUI

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
