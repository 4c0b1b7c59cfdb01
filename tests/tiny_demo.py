"""A stand-in for the embedded demo model (``twig_core/demo_model``): the same pipeline-folder layout, written by
the same exporter, with tiny random weights, so workflow tests and the ComfyUI check run before (or without)
the trained demo weights.

Like the real demo: native size 128² (``sample_size`` 4 latent pixels), text encoder folder without Sana's
instruction prefix (``twig_text.json``), weights stored in fp16.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

DEMO_SIZE = 128


def write_demo_pipeline(out: str | os.PathLike) -> Path:
    """Write ``out/{model_index.json, transformer/, vae/, text_encoder/, tokenizer/}``; returns ``out``."""
    from tests.tiny import build_tiny_gemma2, build_tiny_gemma_tokenizer
    from tests.tiny_models import TINY_TRANSFORMER, tiny_dcae, tiny_transformer
    from twig_core.text import TextEncoder
    from training.export import export_pipeline
    from twig_core.transformer import TwigTransformer

    cfg = dataclasses.replace(TINY_TRANSFORMER, sample_size=DEMO_SIZE // 32)
    transformer = TwigTransformer(cfg).eval()
    transformer.load_state_dict(tiny_transformer().state_dict())  # same random weights as the node tests
    tokenizer = build_tiny_gemma_tokenizer()
    text_encoder = TextEncoder(build_tiny_gemma2(tokenizer), tokenizer, instruction=[])
    with torch.no_grad():
        export_pipeline(Path(out), transformer, tiny_dcae(), text_encoder)
    return Path(out)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(write_demo_pipeline(sys.argv[1]))
