"""A whole tiny text-to-image run against diffusers' SanaPipeline: same weights, same seed, same image."""

import pytest
import torch
from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, SanaPipeline

from tests.test_transformer import diffusers_model
from tests.builders import TINY_DCAE, TINY_TRANSFORMER, build_tiny_gemma2, build_tiny_gemma_tokenizer
from twig_core.dcae import DCAE
from twig_core.keymap import diffusers_to_ours
from twig_core.pipeline import generate
from twig_core.text import TextEncoder
from twig_core.transformer import TwigTransformer


@pytest.fixture(scope="module")
def parts():
    tok = build_tiny_gemma_tokenizer()
    gemma = build_tiny_gemma2(tok)
    ref_tr = diffusers_model(TINY_TRANSFORMER)
    torch.manual_seed(3)
    ref_vae = AutoencoderDC(**TINY_DCAE.to_dict()).eval()
    ours_tr = TwigTransformer(TINY_TRANSFORMER).eval()
    ours_tr.load_state_dict(diffusers_to_ours(ref_tr.state_dict()))
    ours_vae = DCAE(TINY_DCAE).eval()
    ours_vae.load_state_dict(ref_vae.state_dict())
    # diffusers lower-cases prompts; the original pipeline does not. Match the reference here.
    text = TextEncoder(gemma, tok, lowercase=True)
    return tok, gemma, ref_tr, ref_vae, ours_tr, ours_vae, text


@pytest.mark.parametrize(
    "sampler,scheduler",
    [
        ("flow_dpmpp_2m", lambda: DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0,
                                                              prediction_type="flow_prediction")),
        ("flow_euler", lambda: FlowMatchEulerDiscreteScheduler(shift=3.0)),
    ],
)
@pytest.mark.parametrize("prompt", ["A red fox in the snow, watercolor", "雪地里的一只红狐狸，水彩画"])
def test_text_to_image_matches_sana_pipeline(parts, sampler, scheduler, prompt):
    tok, gemma, ref_tr, ref_vae, ours_tr, ours_vae, text = parts
    pipe = SanaPipeline(tokenizer=tok, text_encoder=gemma, vae=ref_vae, transformer=ref_tr, scheduler=scheduler())
    pipe.set_progress_bar_config(disable=True)
    kw = dict(height=64, width=96, num_inference_steps=4, guidance_scale=4.5)
    with torch.no_grad():
        want = pipe(prompt, negative_prompt="blurry", generator=torch.Generator().manual_seed(11), output_type="pt",
                    use_resolution_binning=False, **kw).images
    got = generate(ours_tr, ours_vae, text, prompt, "blurry", width=96, height=64, steps=4, cfg=4.5, seed=11,
                   sampler=sampler)
    got = ((got + 1) / 2).clamp(0, 1)
    assert got.shape == want.shape == (1, 3, 64, 96)
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err <= 1e-3, err
    assert want.std() > 0.01  # a real picture, not a constant


def test_same_seed_twice_is_bit_identical_and_seeds_differ(parts):
    *_, ours_tr, ours_vae, text = parts
    run = lambda seed: generate(ours_tr, ours_vae, text, "a cat", width=64, height=64, steps=2, seed=seed)
    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
