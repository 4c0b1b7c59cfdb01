"""Devices, dtypes and seeds for every front end (command line, ComfyUI nodes, WebUI tab).

The names users pick ("auto", "fp16", "bf16", "fp32"; weight dtypes "same", "stored", "fp16", "bf16"), what
"auto" means for each network, the Gemma-2 fp16 rule, the keyword arguments a weight-dtype choice gives the
loader, and the seed range. Host-specific choices (ComfyUI's model manager) are layered on top by the host glue.
"""

from __future__ import annotations

import torch

from .errors import TwigError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_CHOICES = ("auto", "fp16", "bf16", "fp32")
WEIGHT_DTYPE_CHOICES = ("same", "stored", "fp16", "bf16")

# Seeds are 0 … 2**64 - 1, as in ComfyUI (twig_core.sampling.noise_like: the seed → noise mapping)
MAX_SEED = 2**64 - 1

# what "auto" gives each network ("role") on a GPU without bf16 and on Apple's MPS; None: the networks share one
ROLES = (None, "diffusion", "vae", "text", "tipo")
_HALF_WITHOUT_BF16 = (None, "diffusion", "tipo")
_HALF_ON_MPS = ("diffusion", "tipo")


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_device(choice: str | torch.device | None = "auto") -> torch.device:
    """A device choice ("auto"/None/"" = :func:`default_device`, else "cpu", "cuda", "cuda:1", ...)."""
    if choice is None or choice in ("", "auto"):
        return default_device()
    try:
        return torch.device(choice)
    except (RuntimeError, TypeError) as e:
        raise TwigError(f"unknown device {choice!r}; use auto, cpu, cuda, cuda:1, ...") from e


def cuda_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def text_dtype(dtype: torch.dtype | None, device) -> torch.dtype | None:
    """Gemma-2 overflows in fp16: bf16 (a CUDA device with bf16) or fp32 instead; other dtypes pass."""
    if dtype == torch.float16:
        return torch.bfloat16 if torch.device(device).type == "cuda" and cuda_bf16() else torch.float32
    return dtype


def resolve_dtype(choice, device="cpu", role: str | None = None) -> torch.dtype | None:
    """Map a user choice ("auto", "fp16", "bf16", "fp32", a torch.dtype or None) to a dtype.

    "auto" on CUDA: bf16 where the GPU has it, else fp16 (fp32 for the VAE); on MPS fp16 for the transformer
    and TIPO; fp32 elsewhere. For ``role`` "text" it is never fp16 (:func:`text_dtype`). None stays None (keep
    the stored dtype).
    """
    if choice is None or isinstance(choice, torch.dtype):
        return choice
    if role not in ROLES:
        raise TwigError(f"unknown role {role!r}; one of {', '.join(map(str, ROLES))}")
    if isinstance(choice, str):
        key = choice.lower().replace("float", "fp").replace("bfloat", "bf").replace("half", "fp16")
        key = {"fp": "fp32", "bf": "bf16"}.get(key, key)
        if key in DTYPES:
            return DTYPES[key]
        if key == "auto":
            dev = torch.device(device)
            if role == "text":
                return text_dtype(resolve_dtype("auto", dev), dev)
            if dev.type == "cuda":
                if cuda_bf16():
                    return torch.bfloat16
                return torch.float16 if role in _HALF_WITHOUT_BF16 else torch.float32
            if dev.type == "mps" and role in _HALF_ON_MPS:
                return torch.float16
            return torch.float32
    raise TwigError(f"unknown dtype {choice!r}; use {', '.join(DTYPE_CHOICES)}")


def weight_dtype_kwargs(weight_dtype, dtype, device="cpu") -> dict:
    """``dtype``/``compute_dtype`` arguments of ``load_transformer`` / ``load_vae`` for a weight_dtype choice:
    "same" (or None) holds the weights in ``dtype``; "stored" keeps the file's dtype and "fp16"/"bf16" that
    dtype, both computing in ``dtype`` (fp32 on CPU when ``dtype`` is None)."""
    if weight_dtype in (None, "same"):
        return {"dtype": dtype}
    if weight_dtype not in WEIGHT_DTYPE_CHOICES:
        raise TwigError(f"weight_dtype {weight_dtype!r}: choose one of {', '.join(WEIGHT_DTYPE_CHOICES)}")
    compute = dtype or (torch.float32 if torch.device(device).type == "cpu" else None)
    return {"dtype": None if weight_dtype == "stored" else resolve_dtype(weight_dtype, device),
            "compute_dtype": compute}
