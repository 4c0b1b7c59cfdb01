"""Fewer transformer evaluations: the first-block step cache and the CFG interval of ``make_denoiser``, against
hand-built denoisers on a tiny random transformer, plus the evaluation count and the settings' checks."""

import math
from types import SimpleNamespace

import pytest
import torch

from twig_core import sampling
from twig_core.__main__ import main as cli
from twig_core.errors import TwigError
from twig_core.pipeline import sample_latents
from twig_core.step_cache import StepCache

from tests.builders import tiny_transformer


@pytest.fixture(scope="module")
def model():
    return tiny_transformer()


@pytest.fixture(scope="module")
def conds(model):
    channels = model.config.caption_channels
    g = torch.Generator().manual_seed(3)
    make = lambda n: SimpleNamespace(embeds=torch.randn(1, n, channels, generator=g),  # noqa: E731
                                     mask=torch.tensor([[1] * (n - 2) + [0, 0]]))
    return make(6), make(5)


def velocity(model, x, sigma, *captions):
    """The transformer's velocity for ``x`` under each caption in turn (one batch), computed plainly."""
    embeds, mask = sampling._stack([sampling._expand(c, x.shape[0]) for c in captions])
    xin = torch.cat([x] * len(captions))
    with torch.no_grad():
        return model(xin, torch.full((xin.shape[0],), sigma * 1000), embeds, mask)


def reference(model, cond_, uncond, cfg):
    """Today's denoiser, built by hand: both halves every step, mixed uncond + cfg * (cond - uncond)."""
    def denoise(x, sigma):
        v_u, v_c = velocity(model, x, sigma, uncond, cond_).chunk(2)
        return x - sigma * (v_u + cfg * (v_c - v_u))
    return denoise


@pytest.mark.parametrize("sampler", sampling.SAMPLERS)
def test_off_is_bit_identical_to_plain_cfg(model, conds, sampler):
    c, u = conds
    x = torch.randn(2, 32, 3, 4, generator=torch.Generator().manual_seed(1))
    sigmas = sampling.flow_sigmas(5, 3.0, sampler)
    run = sampling.get_sampler(sampler).function
    denoise = sampling.make_denoiser(model, c, u, 4.5, cache=0.0, cfg_interval=None)
    got = run(denoise, x, sigmas)
    assert torch.equal(got, run(reference(model, c, u, 4.5), x, sigmas))
    assert denoise.stats.computed == denoise.stats.full == 10 and denoise.stats.reused == 0


@pytest.mark.parametrize("max_run, pattern", [(1, "FRFRF"), (2, "FRRFR"), (4, "FRRRR")])
def test_a_picture_is_served_from_the_cache_at_most_max_run_steps_in_a_row(model, conds, max_run, pattern):
    c, _ = conds
    x = torch.randn(1, 32, 3, 4, generator=torch.Generator().manual_seed(2))
    cc = model.encode_caption(c.embeds, c.mask)
    held, got = StepCache(1e9, max_run=max_run), ""
    with torch.no_grad():
        for _ in pattern:
            model(x, torch.tensor([900.0]), cc, step_cache=held)
            got += "R" if held.reused else "F"
    assert got == pattern
    held.reset()
    with torch.no_grad():
        model(x, torch.tensor([900.0]), cc, step_cache=held)
    assert not held.reused and held.run_length.tolist() == [0]


def test_a_huge_threshold_reuses_the_rest_residual_of_the_last_full_step(model, conds):
    c, _ = conds
    x = torch.randn(1, 32, 3, 4, generator=torch.Generator().manual_seed(2))
    cc = model.encode_caption(c.embeds, c.mask)
    held = StepCache(1e9)
    with torch.no_grad():
        full = model(x, torch.tensor([900.0]), cc, step_cache=held)
        assert not held.reused and torch.equal(full, model(x, torch.tensor([900.0]), cc))
        cached = model(x * 0.9, torch.tensor([700.0]), cc, step_cache=held)
    assert held.reused and held.share == 1 / model.config.depth
    # by hand: block 0 at the new step, plus what blocks 1 … N-1 added at the full step, then the final layer
    with torch.no_grad():
        def tokens_after(x, t, stop):
            temb = model.t_embedder(torch.tensor([t]), torch.float32)
            h = model.x_embedder(x)
            first = model.blocks[0](h.clone(), model.t_block(temb), cc.block_kv(0, model.blocks[0]), cc.bias, (3, 4))
            h = first.clone()
            for i in range(1, stop):
                h = model.blocks[i](h, model.t_block(temb), cc.block_kv(i, model.blocks[i]), cc.bias, (3, 4))
            return first, h, temb
        first_full, last_full, _ = tokens_after(x, 900.0, model.config.depth)
        first_new, _, temb = tokens_after(x * 0.9, 700.0, 1)
        out = model.final_layer(first_new + (last_full - first_full), temb)
    want = out.view(1, 3, 4, 1, 1, 32).permute(0, 5, 1, 3, 2, 4).reshape(1, 32, 3, 4)
    torch.testing.assert_close(cached, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(cached, model(x * 0.9, torch.tensor([700.0]), cc))


def test_each_row_decides_alone_and_gets_what_it_would_get_alone(model, conds):
    """A batch of two pictures with their own captions (different masks): one barely moves between the steps and
    is served from the cache, the other moves and is computed in full; each row equals the same picture run
    alone with a cache of its own."""
    (c, u), g = conds, torch.Generator().manual_seed(7)
    embeds, mask = sampling._stack([sampling._expand(c, 1), sampling._expand(u, 1)])
    x = torch.randn(2, 32, 3, 4, generator=g)
    moved = x.clone()
    moved[1] = torch.randn(32, 3, 4, generator=g)
    depth = model.config.depth
    with torch.no_grad():
        batch = StepCache(0.05)
        cc = model.encode_caption(embeds, mask)
        model(x, torch.tensor([800.0, 800.0]), cc, step_cache=batch)
        got = model(moved, torch.tensor([800.0, 800.0]), cc, step_cache=batch)
        assert batch.reused and batch.share == pytest.approx((1 + 1 / depth) / 2)
        for row, caption in enumerate((c, u)):
            alone = StepCache(0.05)
            one = model.encode_caption(caption.embeds, caption.mask)
            model(x[row:row + 1], torch.tensor([800.0]), one, step_cache=alone)
            want = model(moved[row:row + 1], torch.tensor([800.0]), one, step_cache=alone)
            assert alone.reused == (row == 0)
            torch.testing.assert_close(got[row:row + 1], want, rtol=1e-5, atol=1e-6)
        # the row computed last time moved the batch's reference: the same input again is served for it now, and
        # the row served last time is computed (at most max_run = 1 reused step in a row)
        model(moved, torch.tensor([800.0, 800.0]), cc, step_cache=batch)
        assert batch.share == pytest.approx((1 + 1 / depth) / 2) and batch.run_length.tolist() == [0, 1]


def test_a_guided_batch_renders_each_picture_as_it_would_alone(model, conds):
    """CFG pairs of two pictures in one batch: each picture's halves are decided together, the pictures apart.
    At this threshold the two pictures alone take the cache at different steps; batched, both come out as
    they did alone and the batch computes what the two runs did together."""
    c, u = conds
    x = torch.randn(2, 32, 3, 4, generator=torch.Generator().manual_seed(8))
    sigmas = sampling.flow_sigmas(8, 3.0)

    def render(latents):
        den = sampling.make_denoiser(model, c, u, 4.5, cache=0.03)
        with torch.no_grad():
            return sampling.sample(den, latents, sigmas), den.stats

    both, stats = render(x)
    alone = [render(x[i:i + 1]) for i in range(2)]
    assert alone[0][1].reused != alone[1][1].reused
    for i, (picture, _) in enumerate(alone):
        torch.testing.assert_close(both[i:i + 1], picture, rtol=1e-4, atol=1e-5)
    assert stats.computed == pytest.approx(sum(s.computed for _, s in alone) / 2)


@pytest.mark.parametrize("sampler", sampling.SAMPLERS)
def test_the_largest_threshold_drops_the_count_and_zero_never_reuses(model, conds, sampler):
    c, u = conds
    fast, never = sampling.Evaluations(), sampling.Evaluations()
    args = dict(width=128, height=96, steps=8, seed=4, sampler=sampler)
    plain = sample_latents(model, c, u, **args)
    cached = sample_latents(model, c, u, cache=sampling.CACHE_MAX, stats=fast, **args)
    tiny = sample_latents(model, c, u, cache=1e-30, stats=never, **args)
    assert fast.reused > 0 and fast.computed < fast.full == 16
    assert math.isclose(fast.computed, 2 * (8 - fast.reused) + 2 * fast.reused / model.config.depth)
    assert never.reused == 0 and never.computed == 16 and torch.equal(tiny, plain)
    assert torch.isfinite(cached).all() and not torch.equal(cached, plain)


def test_cfg_interval_guides_inside_and_runs_the_prompt_alone_outside(model, conds):
    c, u = conds
    x = torch.randn(2, 32, 3, 4, generator=torch.Generator().manual_seed(5))
    denoise = sampling.make_denoiser(model, c, u, 4.5, cfg_interval=(0.3, 0.8))
    plain = reference(model, c, u, 4.5)
    for sigma in (0.9, 0.8, 0.5, 0.3, 0.2, 0.6):  # out, edge, in, edge, out, in again: the batch changes back and forth
        got = denoise(x, sigma)
        if 0.3 <= sigma <= 0.8:
            torch.testing.assert_close(got, plain(x, sigma), rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(got, x - sigma * velocity(model, x, sigma, c), rtol=1e-5, atol=1e-6)
    assert denoise.stats.unguided == 2 and denoise.stats.computed == 10 and denoise.stats.full == 12


def test_cache_and_interval_keep_inpainting_pinned(model, conds):
    c, u = conds
    init = torch.randn(1, 32, 3, 4, generator=torch.Generator().manual_seed(6))
    mask = torch.zeros(1, 3, 4)
    mask[:, :, :2] = 1
    stats = sampling.Evaluations()
    out = sample_latents(model, c, u, init_latent=init, mask=mask, steps=6, cache=0.5, cfg_interval=(0.4, 1.0),
                         stats=stats)
    assert torch.equal(out[..., 2:], init[..., 2:])
    assert not torch.equal(out[..., :2], init[..., :2]) and stats.unguided > 0
    assert stats.full / stats.computed == stats.ratio > 1


@pytest.mark.parametrize("cache", [-0.1, 1.5, float("nan"), True, "0.2"])
def test_bad_cache_thresholds_are_refused(model, conds, cache):
    with pytest.raises(TwigError, match="cache"):
        sampling.make_denoiser(model, conds[0], conds[1], cache=cache)


@pytest.mark.parametrize("interval", [(0.9, 0.1), (0.0, 2.0), (-0.1, 0.5), (0.1,), "ab", (float("nan"), 0.5)])
def test_bad_cfg_intervals_are_refused(model, conds, interval):
    with pytest.raises(TwigError, match="cfg_interval"):
        sampling.make_denoiser(model, conds[0], conds[1], cfg_interval=interval)


@pytest.mark.parametrize("flags, says", [(["--cache", "-1"], "--cache"), (["--cfg-interval", "0.5"], "--cfg-interval"),
                                         (["--cfg-interval", "0.9,0.2"], "--cfg-interval")])
def test_the_command_line_names_the_bad_flag(flags, says, capsys):
    assert cli(["generate", "--prompt", "a red circle", *flags]) == 2
    assert says in capsys.readouterr().err


def test_parse_cfg_interval():
    assert sampling.parse_cfg_interval("0.2, 0.95") == (0.2, 0.95)
    assert sampling.parse_cfg_interval("") is None and sampling.parse_cfg_interval(None) is None


def test_the_last_step_always_runs_in_full(model, conds, monkeypatch):
    """Both samplers end on x = x0 of the last step, so the cache never serves that step."""
    c, u = conds
    seen = []
    run = StepCache.run

    def spy(self, *args):
        out = run(self, *args)
        seen.append(self.reused)
        return out

    monkeypatch.setattr(StepCache, "run", spy)
    x = torch.randn(1, 32, 3, 4, generator=torch.Generator().manual_seed(8))
    sigmas = sampling.flow_sigmas(6)
    for final, last_reused in ((None, True), (float(sigmas[-2]), False)):
        seen.clear()
        denoise = sampling.make_denoiser(model, c, u, cache=sampling.CACHE_MAX, final_sigma=final)
        sampling.sample(denoise, x, sigmas)
        assert any(seen[:-1]) and seen[-1] is last_reused
