"""Schedules and samplers against diffusers' flow schedulers, step by step."""

import math

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from twig_core import sampling
from twig_core.errors import TwigError


def dpm_ref(shift=3.0):
    return DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction")


def euler_ref(shift=3.0):
    return FlowMatchEulerDiscreteScheduler(shift=shift)


def velocity(x, t):
    """A stand-in 'model': smooth, nonlinear, depends on the timestep like a real one."""
    t = torch.as_tensor(t, dtype=torch.float32)
    return torch.tanh(0.8 * x + 0.3) * (1 + t / 1000) - 0.2 * x


@pytest.mark.parametrize("steps", [1, 2, 5, 20, 28])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_dpm_sigmas_and_timesteps_match(steps, shift):
    ref = dpm_ref(shift)
    ref.set_timesteps(steps)
    ours = sampling.flow_sigmas(steps, shift, "flow_dpmpp_2m")
    np.testing.assert_allclose(ours.numpy(), ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    assert [math.floor(float(s) * 1000) for s in ours[:-1]] == ref.timesteps.tolist()


@pytest.mark.parametrize("steps", [1, 2, 5, 20])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_sigmas_and_timesteps_match(steps, shift):
    ref = euler_ref(shift)
    ref.set_timesteps(steps)
    ours = sampling.flow_sigmas(steps, shift, "flow_euler")
    np.testing.assert_allclose(ours.numpy(), ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose((ours[:-1] * 1000).numpy(), ref.timesteps.numpy(), rtol=1e-6)


def run_pair(name, ref, steps, integer_t):
    ref.set_timesteps(steps)
    x0 = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    # reference loop, recording every step
    x = x0.clone()
    want = []
    for t in ref.timesteps:
        x = ref.step(velocity(x, t), t, x).prev_sample
        want.append(x.clone())
    # ours, the same stand-in model behind a denoiser
    def denoise(x, sigma):
        t = math.floor(sigma * 1000) if integer_t else sigma * 1000
        return x - sigma * velocity(x, t)

    got = []
    spec = sampling.SAMPLER_TABLE[name]
    assert spec.integer_timesteps == integer_t
    spec.function(denoise, x0.clone(), sampling.flow_sigmas(steps, 3.0, name),
                  callback=lambda d: got.append(d["x"].clone()))
    assert len(got) == len(want) == steps
    for i, (a, b) in enumerate(zip(got, want)):
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err <= 1e-4, f"step {i}: relative error {err}"


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 20])
def test_dpmpp_2m_every_step_matches(steps):
    run_pair("flow_dpmpp_2m", dpm_ref(), steps, integer_t=True)


@pytest.mark.parametrize("steps", [1, 3, 20])
def test_euler_every_step_matches(steps):
    run_pair("flow_euler", euler_ref(), steps, integer_t=False)


def test_denoise_uses_the_tail_of_a_longer_schedule():
    full = sampling.flow_sigmas(20, 3.0)
    part = sampling.flow_sigmas(10, 3.0, denoise=0.5)
    assert torch.equal(part, full[-11:])
    assert part[-1] == 0 and len(part) == 11


def test_noise_is_deterministic_by_seed():
    a = sampling.noise_like((1, 32, 4, 4), seed=42)
    b = sampling.noise_like((1, 32, 4, 4), seed=42)
    c = sampling.noise_like((1, 32, 4, 4), seed=43)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_seeds_below_2_32_keep_the_torch_generator_noise():
    # earlier versions (and ComfyUI's own noise) drew randn from a CPU generator seeded with the seed itself
    for seed in (0, 42, 2**31, 2**32 - 1):
        ref = torch.randn((1, 32, 4, 4), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(sampling.noise_like((1, 32, 4, 4), seed), ref)


def test_every_64_bit_seed_gives_its_own_noise():
    # torch's CPU generator keeps the low 32 bits: these seeds used to give the noise of seed 0, 2**32 - 1, 5
    seeds = [0, 2**32, 2**33, 2**64 - 1, 2**32 - 1, (1 << 32) | 5, 5, (5 << 32) | 5, 2**63]
    noises = [sampling.noise_like((1, 32, 4, 4), s) for s in seeds]
    for i in range(len(seeds)):
        for j in range(i):
            assert not torch.allclose(noises[i], noises[j], atol=1e-3), (seeds[i], seeds[j])
    assert torch.equal(sampling.noise_like((1, 32, 4, 4), 2**64 - 1), sampling.noise_like((1, 32, 4, 4), 2**64 - 1))
    # still standard normal: mean 0, std 1 (lo == hi included)
    for seed in (2**32, (7 << 32) | 7, 2**64 - 1):
        x = sampling.noise_like((64, 32, 16, 16), seed)
        assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1) < 0.01


def test_seeds_out_of_range_are_refused_and_derived_seeds_wrap():
    for bad in (-1, 2**64, 1.5, True, "3"):
        with pytest.raises(TwigError, match="seed must be a whole number 0"):
            sampling.noise_like((1, 32, 1, 1), bad)
    assert sampling.offset_seed(2**64 - 1, 1) == 0 and sampling.offset_seed(7, 3) == 10


def test_bad_arguments_raise():
    with pytest.raises(TwigError, match="steps"):
        sampling.flow_sigmas(0)
    with pytest.raises(TwigError, match="denoise"):
        sampling.flow_sigmas(10, denoise=0.0)
    with pytest.raises(TwigError, match="unknown sampler"):
        sampling.flow_sigmas(10, sampler="ddim")


def test_nan_latent_is_reported_not_returned():
    def broken(x, sigma):
        return torch.full_like(x, float("nan"))

    with pytest.raises(TwigError, match="NaN"):
        sampling.sample_flow_euler(broken, torch.zeros(1, 4, 2, 2), sampling.flow_sigmas(3, 3.0, "flow_euler"))


class _NaNModel:
    """A transformer stand-in computing in ``dtype`` whose prediction is NaN."""

    device = torch.device("cpu")

    def __init__(self, dtype):
        self.dtype = dtype

    def encode_caption(self, embeds, mask):
        return None

    def __call__(self, x, t, caption):
        return torch.full_like(x, float("nan"))


@pytest.mark.parametrize("dtype, says, never", [
    (torch.float16, "fp16 overflow — try bf16 or fp32", None),
    (torch.bfloat16, "try fp32", "fp16 overflow"),
    (torch.float32, "not overflow: the model or its inputs produced non-finite values — check the weights file",
     "fp16"),
])
@pytest.mark.parametrize("sampler", sampling.SAMPLERS)
def test_nan_hint_fits_the_compute_dtype(dtype, says, never, sampler):
    cond = type("Cond", (), {"embeds": torch.zeros(1, 2, 4), "mask": torch.ones(1, 2, dtype=torch.long)})()
    denoise = sampling.make_denoiser(_NaNModel(dtype), cond, cfg=1.0)
    with pytest.raises(TwigError, match="step 1") as e:
        sampling.get_sampler(sampler).function(denoise, torch.zeros(1, 4, 2, 2), sampling.flow_sigmas(3, 3.0, sampler))
    assert says in str(e.value)
    assert never is None or never not in str(e.value)
