"""Tiny stand-ins for real components, built in-process (no downloads), for tests that need them.

- build_tiny_gemma_tokenizer(): a Gemma-style BPE tokenizer (byte fallback, spaces as "▁", <bos> added
  in front, <pad>=0 <eos>=1 <bos>=2 <unk>=3) trained on a few English and Chinese sentences and Sana's
  instruction text.
- build_tiny_gemma2(tokenizer): a 2-layer, 64-wide random Gemma2Model (or Gemma2ForCausalLM).
- save_tiny_gemma2_folder(path): both saved as a Hugging Face folder.
"""

from __future__ import annotations

import json
import os

import torch

TINY_CORPUS = [
    "A small, fluffy white cat curled up in a round shape, sleeping peacefully on a warm sunny windowsill.",
    "A bustling city street scene at dusk, featuring glowing street lamps and a double-decker bus.",
    "a cyberpunk cat with a neon sign that says Sana",
    "A photo of an astronaut riding a horse on the moon, highly detailed, 8k, cinematic lighting.",
    "An oil painting of a lighthouse on a rocky coast during a storm, dramatic waves, dark clouds.",
    "portrait of a young woman with red hair, freckles, green eyes, soft light, shallow depth of field",
    "low quality, blurry, watermark, text, deformed hands, extra fingers, jpeg artifacts",
    "一只可爱的小猫在窗台上睡觉，阳光温暖，窗外开满了红色的花。",
    "繁华的城市街道，黄昏时分，路灯闪烁，人群穿着五颜六色的衣服。",
    "山水画，远处的高山被云雾环绕，近处有一条小河和一座木桥。",
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions.",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without "
    "overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
]

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # ids 0..4, Gemma's order for the first three


def build_tiny_gemma_tokenizer(vocab_size: int = 700, corpus: list[str] | None = None):
    """A transformers GemmaTokenizer over a BPE vocabulary trained on ``corpus``.

    Like Gemma's: spaces normalized to "▁", no pre-tokenization at encode time, byte fallback for unseen
    characters (<0x00>..<0xFF> are in the vocabulary), <bos> prepended, no <eos> appended.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    # split only while training, so merges stay inside "▁word" pieces
    trainer_tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    trainer_tok.train_from_iterator(corpus or TINY_CORPUS, trainer)

    vocab = dict(trainer_tok.get_vocab())
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in json.loads(trainer_tok.to_str())["model"]["merges"]]
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)


def tiny_gemma2_config(vocab_size: int):
    from transformers import Gemma2Config

    return Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        max_position_embeddings=4096,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        attn_implementation="eager",
    )


def build_tiny_gemma2(tokenizer, seed: int = 0, causal_lm: bool = False):
    """A random tiny Gemma-2 (eval mode, float32). Norm weights are randomized too, so nothing is trivial."""
    from transformers import Gemma2ForCausalLM, Gemma2Model

    torch.manual_seed(seed)
    config = tiny_gemma2_config(len(tokenizer))
    model = (Gemma2ForCausalLM if causal_lm else Gemma2Model)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
    return model.eval()


def save_tiny_gemma2_folder(path: str | os.PathLike, seed: int = 0, causal_lm: bool = False):
    """Save a tiny Gemma-2 + tokenizer as a plain Hugging Face folder; returns (model, tokenizer)."""
    tokenizer = build_tiny_gemma_tokenizer()
    model = build_tiny_gemma2(tokenizer, seed=seed, causal_lm=causal_lm)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return model, tokenizer
