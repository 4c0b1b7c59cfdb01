"""Tiny random Twig models written the way users install real ones, for node tests and the ComfyUI check.

``write_model_folders(root)`` fills a ComfyUI-style ``models/`` folder:
  diffusion_models/<prefix>.safetensors       transformer, original NVlabs names
  vae/<prefix>_dcae.safetensors               DC-AE, diffusers AutoencoderDC names (32x, 32 channels)
  text_encoders/<prefix>_gemma/               Gemma-2 Hugging Face folder with its tokenizer
Everything is small enough to build and run in a second or two on a CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from twig_core.config import TransformerConfig
from twig_core.dcae import DCAE, RES_BLOCK, VIT_BLOCK, DCAEConfig
from twig_core.transformer import TwigTransformer

# heads of width 32, so every size can be inferred from tensor shapes; caption width = tiny Gemma's hidden size
TINY_TRANSFORMER = TransformerConfig(in_channels=32, out_channels=32, width=64, depth=2, heads=2, cross_heads=2,
                                     caption_channels=64)

# six stages -> 32x downsampling and 32 latent channels like the real DC-AE, a few thousand weights per stage
TINY_DCAE = DCAEConfig(
    latent_channels=32,
    encoder_block_out_channels=(8, 8, 16, 16, 32, 32),
    decoder_block_out_channels=(8, 8, 16, 16, 32, 32),
    encoder_layers_per_block=(1,) * 6,
    decoder_layers_per_block=(1,) * 6,
    encoder_block_types=(RES_BLOCK,) * 4 + (VIT_BLOCK,) * 2,
    decoder_block_types=(RES_BLOCK,) * 4 + (VIT_BLOCK,) * 2,
    encoder_qkv_multiscales=((),) * 4 + ((5,), (5,)),
    decoder_qkv_multiscales=((),) * 4 + ((5,), (5,)),
    attention_head_dim=8,
    decoder_norm_types=("rms_norm",) * 6,
    decoder_act_fns=("silu",) * 6,
)


def tiny_transformer(seed: int = 0) -> TwigTransformer:
    torch.manual_seed(seed)
    model = TwigTransformer(TINY_TRANSFORMER)
    with torch.no_grad():  # some layers start at zero; randomise all so outputs depend on every input
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return model.eval()


def tiny_dcae(seed: int = 0) -> DCAE:
    torch.manual_seed(seed)
    return DCAE(TINY_DCAE).eval()


def write_model_folders(root: str | os.PathLike, prefix: str = "tiny") -> dict[str, str]:
    """Write the three tiny models under ``root`` (a models/ folder); returns the names a loader combo shows."""
    from tests.tiny import save_tiny_gemma2_folder

    root = Path(root)
    for sub in ("diffusion_models", "vae", "text_encoders", "checkpoints"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    names = {
        "model": f"{prefix}_twig.safetensors",
        "vae": f"{prefix}_dcae.safetensors",
        "text_encoder": f"{prefix}_gemma/",
    }
    save_file(tiny_transformer().state_dict(), str(root / "diffusion_models" / names["model"]))
    save_file(tiny_dcae().state_dict(), str(root / "vae" / names["vae"]))
    save_tiny_gemma2_folder(root / "text_encoders" / names["text_encoder"].rstrip("/"))
    return names
