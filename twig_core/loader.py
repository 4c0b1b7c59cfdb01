"""Load every published Twig / Sana checkpoint layout, safely, with the config read from the weights: the public
entry that the command line, the ComfyUI nodes and the WebUI tab use.

``detect`` says which network a file or folder holds; ``load_transformer``, ``load_vae`` and
``load_text_encoder`` load one network, ``load_parts``/``load_pipeline`` all three. Behind it:

- ``twig_core.weights``: the file readers (safetensors, or ``torch.load(weights_only=True)``; never a pickle
  that builds objects);
- ``twig_core.layout``: diffusers folders, shards and variants, and which network a key set holds;
- ``twig_core.keymap``: the key tables between every layout and our names;
- ``twig_core.assign``: filling a meta-device model from checked weights;
- ``twig_core.networks`` (transformer, DC-AE), ``twig_core.gemma`` (Gemma-2) and ``twig_core.tokenizer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import TwigError
from .gemma import gemma2_config_from_shapes, load_text_encoder
from .layout import classify, detect
from .networks import load_transformer, load_vae
from .tokenizer import load_tokenizer, tokenizer_from_spiece
from .weights import PrefixedWeights, SafetensorsFile, TorchFile, UnionWeights, Weights, open_weights

__all__ = [
    "detect",
    "classify",
    "load_transformer",
    "load_vae",
    "load_text_encoder",
    "load_tokenizer",
    "load_pipeline",
    "load_parts",
    "Parts",
    "resolve_dtype",
    "weight_dtype_kwargs",
    "WEIGHT_DTYPE_CHOICES",
    "open_weights",
    "Weights",
    "SafetensorsFile",
    "TorchFile",
    "UnionWeights",
    "PrefixedWeights",
    "gemma2_config_from_shapes",
    "tokenizer_from_spiece",
]

DTYPE_CHOICES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(choice, device="cpu") -> torch.dtype | None:
    """Map a user choice ("auto", "fp16", "bf16", "fp32", a torch.dtype or None) to a dtype.

    "auto": bf16 on a CUDA device that supports it, else fp16 on CUDA, fp32 elsewhere. None stays None (keep
    the stored dtype).
    """
    if choice is None or isinstance(choice, torch.dtype):
        return choice
    if isinstance(choice, str):
        key = choice.lower().replace("float", "fp").replace("bfloat", "bf").replace("half", "fp16")
        key = {"fp": "fp32", "bf": "bf16"}.get(key, key)
        if key in DTYPE_CHOICES:
            return DTYPE_CHOICES[key]
        if key == "auto":
            dev = torch.device(device)
            if dev.type == "cuda":
                return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.float32
    raise TwigError(f"unknown dtype {choice!r}; use auto, fp16, bf16 or fp32")


@dataclass
class Parts:
    """The three networks of a text-to-image run."""

    transformer: Any
    text_encoder: Any
    vae: Any


def _text_dtype(dtype: torch.dtype | None, device) -> torch.dtype | None:
    """Gemma-2 overflows in fp16: use bf16 (CUDA with bf16) or fp32 instead."""
    if dtype == torch.float16:
        dev = torch.device(device)
        return torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return dtype


WEIGHT_DTYPE_CHOICES = ("same", "stored", "fp16", "bf16")


def weight_dtype_kwargs(weight_dtype, dtype, device="cpu") -> dict:
    """``dtype``/``compute_dtype`` arguments of :func:`load_transformer` / :func:`load_vae` for a weight_dtype
    choice: "same" (or None) holds the weights in ``dtype``; "stored" keeps the file's dtype and "fp16"/"bf16"
    that dtype, both computing in ``dtype`` (fp32 on CPU when ``dtype`` is None)."""
    if weight_dtype in (None, "same"):
        return {"dtype": dtype}
    if weight_dtype not in WEIGHT_DTYPE_CHOICES:
        raise TwigError(f"weight_dtype {weight_dtype!r}: choose one of {', '.join(WEIGHT_DTYPE_CHOICES)}")
    compute = dtype or (torch.float32 if torch.device(device).type == "cpu" else None)
    return {"dtype": None if weight_dtype == "stored" else resolve_dtype(weight_dtype, device),
            "compute_dtype": compute}


def load_parts(transformer, text_encoder=None, vae=None, dtype=None, device="cpu", weight_dtype=None) -> Parts:
    """Load the three networks. ``transformer`` may be a pipeline folder (or an all-in-one file), in which
    case a missing ``text_encoder``/``vae`` is taken from it. ``weight_dtype`` keeps the transformer's and the
    VAE's weights in that dtype ("stored": as in the file) while they compute in ``dtype``."""
    if transformer is None:
        raise TwigError("no transformer given (a checkpoint file, a diffusers folder or a pipeline folder)")
    dtype = resolve_dtype(dtype, device)
    whole = detect(transformer) == "pipeline"
    text_encoder = text_encoder if text_encoder is not None else (transformer if whole else None)
    vae = vae if vae is not None else (transformer if whole else None)
    if text_encoder is None:
        raise TwigError(f"{transformer}: holds no text encoder; give a Gemma-2 folder or file")
    if vae is None:
        raise TwigError(f"{transformer}: holds no VAE; give a DC-AE file or folder")
    kwargs = weight_dtype_kwargs(weight_dtype, dtype, device)
    model = load_transformer(transformer, device=device, **kwargs)
    te = load_text_encoder(text_encoder, dtype=_text_dtype(dtype, device), device=device,
                           expected_width=model.config.caption_channels)
    ae = load_vae(vae, device=device, **kwargs)
    return Parts(model, te, ae)


def load_pipeline(path, dtype=None, device="cpu") -> Parts:
    """A whole diffusers pipeline folder (or all-in-one file) as one thing."""
    if detect(path) != "pipeline":
        raise TwigError(f"{path}: not a pipeline folder (no model_index.json or transformer/ + vae/ subfolders)")
    return load_parts(path, dtype=dtype, device=device)
