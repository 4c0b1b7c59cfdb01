"""The embedded demo model's networks: tiny Twig-architecture sizes (its weights ship in twig_core/demo_model).

Same code paths as the real model, smaller sizes:
  DC-AE   6 stages, 32x down, 32 latent channels (ResBlock x4 + EfficientViT x2), ~2M weights
  DiT     TwigTransformer, 16 latent tokens for a 128² picture (the recipe adds Sana's sin-cos positional
          embedding, which the 2K/4K Sana models use: on a 4x4 grid, zero padding alone says little about place)
  text    Gemma-2 (transformers) with the demo tokenizer; trained without Sana's instruction prefix, which
          would triple the text encoder's training cost (its folder says so in twig_text.json)
Pictures are 128², so latents are [B, 32, 4, 4].
"""

from __future__ import annotations

from twig_core.config import TransformerConfig
from twig_core.dcae import RES_BLOCK, VIT_BLOCK, DCAEConfig

IMAGE_SIZE = 128

DEMO_DCAE = DCAEConfig(
    latent_channels=32,
    encoder_block_out_channels=(8, 16, 32, 64, 128, 128),
    decoder_block_out_channels=(8, 16, 32, 64, 128, 128),
    encoder_layers_per_block=(1, 1, 1, 1, 1, 1),
    decoder_layers_per_block=(1, 1, 1, 1, 1, 1),
    encoder_block_types=(RES_BLOCK,) * 4 + (VIT_BLOCK,) * 2,
    decoder_block_types=(RES_BLOCK,) * 4 + (VIT_BLOCK,) * 2,
    encoder_qkv_multiscales=((),) * 4 + ((5,), (5,)),
    decoder_qkv_multiscales=((),) * 4 + ((5,), (5,)),
    attention_head_dim=32,
    decoder_norm_types=("rms_norm",) * 6,
    decoder_act_fns=("silu",) * 6,
)

GEMMA_WIDTH = 192

DEMO_TRANSFORMER = TransformerConfig(
    in_channels=32, out_channels=32, width=256, depth=6, heads=8, cross_heads=4, caption_channels=GEMMA_WIDTH,
    mlp_ratio=2.5, sample_size=IMAGE_SIZE // 32,
)


def demo_gemma_config(vocab_size: int):
    from transformers import Gemma2Config

    return Gemma2Config(
        vocab_size=vocab_size, hidden_size=GEMMA_WIDTH, intermediate_size=512, num_hidden_layers=3,
        num_attention_heads=3, num_key_value_heads=1, head_dim=64, query_pre_attn_scalar=64,
        max_position_embeddings=2048, sliding_window=512, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        attn_implementation="eager",
    )
