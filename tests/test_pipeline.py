"""sample_latents: determinism, img2img, inpaint pinning and input checks on a tiny random transformer."""

from types import SimpleNamespace

import pytest
import torch

from twig_core.config import TransformerConfig
from twig_core.errors import TwigError
from twig_core.pipeline import sample_latents
from twig_core.transformer import TwigTransformer

CFG = TransformerConfig(in_channels=32, out_channels=32, width=64, depth=2, heads=2, cross_heads=2,
                        caption_channels=48, sample_size=4)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TwigTransformer(CFG).eval()


def cond(n=6, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, n, dtype=torch.long)
    mask[:, 4:] = 0
    return SimpleNamespace(embeds=torch.randn(batch, n, 48, generator=g), mask=mask)


def run(model, **kw):
    args = dict(width=128, height=96, steps=3, cfg=4.5, seed=7)
    args.update(kw)
    return sample_latents(model, cond(), cond(seed=1), **args)


def test_same_seed_same_latent_bit_for_bit(model):
    a, b = run(model), run(model)
    assert a.shape == (1, 32, 3, 4)
    assert torch.equal(a, b)
    assert not torch.equal(a, run(model, seed=8))


@pytest.mark.parametrize("sampler", ["flow_dpmpp_2m", "flow_euler"])
def test_both_samplers_and_no_cfg_run(model, sampler):
    out = run(model, sampler=sampler, cfg=1.0)
    assert torch.isfinite(out).all()


def test_one_prompt_serves_a_batch(model):
    out = run(model, batch_size=3)
    assert out.shape[0] == 3
    assert not torch.equal(out[0], out[1])  # different noise per image


def test_denoise_zero_returns_the_input(model):
    init = torch.randn(1, 32, 3, 4)
    out = sample_latents(model, cond(), cond(1), init_latent=init, denoise=0.0, steps=4)
    assert torch.equal(out, init)


def test_img2img_stays_closer_to_the_input_at_low_denoise(model):
    init = torch.randn(1, 32, 3, 4)
    low = sample_latents(model, cond(), cond(1), init_latent=init, denoise=0.2, steps=4, seed=3)
    high = sample_latents(model, cond(), cond(1), init_latent=init, denoise=1.0, steps=4, seed=3)
    assert (low - init).abs().mean() < (high - init).abs().mean()


def test_inpaint_keeps_unmasked_latents_exactly(model):
    init = torch.randn(2, 32, 3, 4)
    mask = torch.zeros(2, 1, 3, 4)
    mask[:, :, 1:, 2:] = 1
    out = sample_latents(model, cond(), cond(1), init_latent=init, denoise=1.0, mask=mask, steps=3)
    keep = mask.expand_as(init) == 0
    assert torch.equal(out[keep], init[keep])
    assert not torch.equal(out[~keep], init[~keep])


def test_bad_input_is_named(model):
    with pytest.raises(TwigError, match="width"):
        run(model, width=100)
    with pytest.raises(TwigError, match="steps"):
        run(model, steps=0)
    with pytest.raises(TwigError, match="NaN"):
        sample_latents(model, cond(), None, init_latent=torch.full((1, 32, 2, 2), float("nan")), denoise=0.5)
    with pytest.raises(TwigError, match="channels|shape"):
        sample_latents(model, cond(), None, init_latent=torch.zeros(1, 4, 2, 2), denoise=0.5)
    with pytest.raises(TwigError, match="prompts cannot condition"):
        sample_latents(model, cond(batch=2), None, width=64, height=64, batch_size=3, steps=1)
