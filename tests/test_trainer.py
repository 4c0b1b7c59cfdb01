"""The demo trainer's stages learn on a tiny fixed batch and resume from their checkpoints."""

import numpy as np
import torch

from tests.tiny import build_tiny_gemma2, build_tiny_gemma_tokenizer
from tests.tiny_models import TINY_DCAE, TINY_TRANSFORMER
from twig_core.text import TextEncoder
from twig_core.train.trainer import downsample_u8, train_dit, train_vae
from twig_core.transformer import TwigTransformer


def pictures(n=4, size=64):
    rng = np.random.default_rng(0)
    img = np.zeros((n, size, size, 3), np.uint8)
    for i in range(n):
        c = rng.integers(0, 255, 3)
        y, x = rng.integers(0, size // 2, 2)
        img[i, y:y + size // 2, x:x + size // 2] = c
    return img


def test_vae_stage_loss_falls_and_resumes(tmp_path):
    imgs = pictures()
    _, losses = train_vae(imgs, tmp_path, steps=30, batch=4, lr=3e-3, crop=64, config=TINY_DCAE, save_every=10)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    _, more = train_vae(imgs, tmp_path, steps=32, batch=4, lr=3e-3, crop=64, config=TINY_DCAE)
    assert len(more) == 2  # picked up at step 30


def test_dit_stage_loss_falls(tmp_path):
    tok = build_tiny_gemma_tokenizer()
    text = TextEncoder(build_tiny_gemma2(tok), tok, instruction="")
    torch.manual_seed(0)
    dit = TwigTransformer(TINY_TRANSFORMER)
    latents = torch.randn(2, 32, 2, 2)
    records = [{"captions": [{"en": "a red circle", "zh": "一个红色的圆"}]},
               {"captions": [{"en": "two blue squares", "zh": "两个蓝色的正方形"}]}]
    _, _, losses = train_dit(latents, records, text, dit, tmp_path, steps=60, batch=8, lr=3e-3, max_length=16)
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
    assert not dit.training


def test_downsample_is_an_area_mean():
    img = np.zeros((1, 4, 4, 3), np.uint8)
    img[0, :2, :2] = 200
    out = downsample_u8(img, 2)
    assert out.shape == (1, 2, 2, 3) and out[0, 0, 0, 0] == 200 and out[0, 1, 1, 0] == 0
