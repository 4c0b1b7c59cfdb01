"""A tiny random Twig pipeline folder, the layout of the embedded demo model, buildable on any transformers.

``write_tiny_pipeline(out)`` exports a random 2-layer transformer (native 128 px), a tiny DC-AE and a tiny
Gemma-2 with a byte-fallback BPE tokenizer through ``training.export.export_pipeline``. The tokenizer
is built with the ``tokenizers`` library and wrapped in ``PreTrainedTokenizerFast``, so this works on
transformers 4.4x (what Forge ships) as well as 5.x, without sentencepiece.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tests.tiny import TINY_CORPUS, build_tiny_gemma2
from tests.tiny_models import TINY_TRANSFORMER, tiny_dcae

DEMO_PROMPTS = ["左边一个红色的圆，右边一个蓝色的正方形", "a green triangle above a yellow circle",
                "红色的三角形", "a blue square on the left, a red circle on the right"]
NATIVE = 128  # pixels, like the demo model


def build_fast_tokenizer(vocab_size: int = 600):
    """Gemma-like BPE (<pad>=0 <eos>=1 <bos>=2 <unk>=3, "▁" for spaces, byte fallback, <bos> prepended)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=[f"<0x{b:02X}>" for b in range(256)])
    tok.train_from_iterator(TINY_CORPUS + DEMO_PROMPTS, trainer)
    for b in range(256):
        if tok.token_to_id(f"<0x{b:02X}>") is None:
            tok.add_tokens([f"<0x{b:02X}>"])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_native_transformer(seed: int = 0):
    from twig_core.transformer import TwigTransformer

    torch.manual_seed(seed)
    model = TwigTransformer(TINY_TRANSFORMER.replace(sample_size=NATIVE // 32))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return model.eval()


def write_tiny_pipeline(out: str | os.PathLike, seed: int = 0) -> Path:
    """The pipeline folder (model_index.json, transformer/, vae/, text_encoder/, tokenizer/) at ``out``."""
    from twig_core.text import TextEncoder
    from training.export import export_pipeline

    tokenizer = build_fast_tokenizer()
    gemma = build_tiny_gemma2(tokenizer, seed=seed)
    te = TextEncoder(gemma, tokenizer, instruction=[])
    export_pipeline(Path(out), tiny_native_transformer(seed), tiny_dcae(seed), te, dtype=torch.float32)
    mark_safetensors_pt(Path(out) / "text_encoder" / "model.safetensors")
    return Path(out)


def mark_safetensors_pt(path: Path) -> None:
    """Add the ``{"format": "pt"}`` header entry that transformers before 4.50 requires of a model file."""
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(path)), str(path), metadata={"format": "pt"})
