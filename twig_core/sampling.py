"""Flow-matching samplers, k-diffusion style.

A *denoiser* is any callable ``denoise(x, sigma) -> x0_hat``. Samplers are plain functions over a denoiser,
a starting latent and a decreasing list of sigmas ending in 0; guidance, inpainting and timestep conventions
all live in the denoiser closure (``make_denoiser``), not in the samplers. ``SAMPLER_TABLE`` is the one list of
sampler choices every front end offers: name -> (function, sigma schedule, integer timesteps).

Flow matching: x_sigma = (1 - sigma) x0 + sigma * noise, and the model predicts v = noise - x0, so
x0 = x_sigma - sigma * v.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable

import torch

from . import heap
from .devices import MAX_SEED
from .errors import TwigError
from .step_cache import Evaluations, StepCache

Denoiser = Callable[[torch.Tensor, float], torch.Tensor]
Callback = Callable[[dict], None]


CFG_MAX = 30.0  # the nodes' cfg widget range is 0 … CFG_MAX
MAX_STEPS = 200  # and their steps widget range 1 … MAX_STEPS
CACHE_MAX = 1.0  # and their step-cache threshold range 0 … CACHE_MAX


def check_settings(*, steps=None, cfg=None, denoise=None, shift=None, width=None, height=None, seed=None,
                   cache=None, cfg_interval=None) -> None:
    """Raise TwigError when a sampling setting is outside the range the nodes offer; ``None`` skips a setting.

    The one check every front end runs (command line, batch rows and defaults, WebUI tab), so a value the
    nodes refuse is refused everywhere: steps 1 … 200, cfg 0 … 30, denoise in (0, 1], shift > 0, width and height
    positive multiples of 32, seed 0 … 2**64 - 1 (:func:`check_seed`), cache (step-cache threshold) 0 … 1,
    cfg_interval a pair (lo, hi) of sigmas with 0 <= lo <= hi <= 1."""
    if cache is not None and (isinstance(cache, bool) or not isinstance(cache, (int, float))
                              or not 0.0 <= cache <= CACHE_MAX):
        raise TwigError(f"cache (--cache, the step-cache threshold) must be 0 (off) … {CACHE_MAX:g}, got {cache!r}")
    if cfg_interval is not None:
        try:
            lo, hi = cfg_interval
            ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)) and 0 <= lo <= hi <= 1
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise TwigError(f"cfg_interval (--cfg-interval) must be two sigmas lo,hi with 0 <= lo <= hi <= 1, "
                            f"got {cfg_interval!r}")
    if seed is not None:
        check_seed(seed)
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS):
        raise TwigError(f"steps must be a whole number 1 … {MAX_STEPS}, got {steps!r}")
    if cfg is not None and not (isinstance(cfg, (int, float)) and 0.0 <= cfg <= CFG_MAX):
        raise TwigError(f"cfg must be between 0 and {CFG_MAX:g}, got {cfg!r}")
    if denoise is not None and not (isinstance(denoise, (int, float)) and 0.0 < denoise <= 1.0):
        raise TwigError(f"denoise must be in (0, 1], got {denoise!r}")
    if shift is not None and not (isinstance(shift, (int, float)) and 0.0 < shift < math.inf):
        raise TwigError(f"shift must be > 0, got {shift!r}")
    if width is not None or height is not None:
        from .resolution import check_size

        check_size(64 if width is None else width, 64 if height is None else height)


def parse_cfg_interval(text: str | None, field: str = "--cfg-interval") -> tuple[float, float] | None:
    """``"LO,HI"`` (two sigmas) as a checked pair for ``make_denoiser``'s cfg_interval; None or "" gives None.
    A TwigError names ``field``."""
    if text is None or not str(text).strip():
        return None
    try:
        lo, hi = (float(v) for v in str(text).split(","))
        check_settings(cfg_interval=(lo, hi))
    except ValueError:  # TwigError included
        raise TwigError(f"{field} must be two sigmas LO,HI with 0 <= LO <= HI <= 1 (e.g. 0.2,0.95), got {text!r}") from None
    return lo, hi


def shift_sigma(sigma, shift: float):
    """Resolution shift of the flow schedule: s*sigma / (1 + (s-1)*sigma)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def flow_sigmas(steps: int, shift: float = 3.0, sampler: str = "flow_dpmpp_2m", denoise: float = 1.0) -> torch.Tensor:
    """Decreasing sigmas for ``steps`` steps, ending in 0 (float64, length steps+1): the sampler's schedule
    (:data:`SAMPLER_TABLE`), shifted. ``denoise`` < 1 (img2img) runs the last ``steps`` steps of a schedule of
    round(steps/denoise) steps.
    """
    check_settings(steps=steps, denoise=denoise, shift=shift)
    if steps / denoise > 100 * MAX_STEPS:
        raise TwigError(f"denoise {denoise!r} with {steps} steps asks for a schedule of more than "
                        f"{100 * MAX_STEPS} steps; raise denoise")
    total = max(steps, int(round(steps / denoise)))
    base = get_sampler(sampler).schedule(total, shift)
    sigmas = torch.cat([shift_sigma(base, shift), torch.zeros(1, dtype=torch.float64)])
    return sigmas[-(steps + 1):]


def dpm_solver_schedule(total: int, shift: float) -> torch.Tensor:
    """The DPM-Solver scheduler's spacing (diffusers, flow sigmas): linspace(0.999, 0.999/N, N), before the shift."""
    return torch.linspace(0.999, 0.999 / total, total, dtype=torch.float64)


def flow_euler_schedule(total: int, shift: float) -> torch.Tensor:
    """The flow-match Euler scheduler's spacing: linspace(1, shift(0.001), N), before the shift."""
    return torch.linspace(1.0, shift_sigma(0.001, shift), total, dtype=torch.float64)


def nonfinite_hint(dtype: torch.dtype | None) -> str:
    """What a NaN/inf in a run computing in ``dtype`` most likely means, and what to try."""
    if dtype == torch.float16:
        return "this usually means fp16 overflow — try bf16 or fp32 compute, or check the model file"
    if dtype == torch.bfloat16:
        return "bf16 rarely overflows, but it can — try fp32 compute, or check the model file"
    if dtype is not None and dtype.is_floating_point and torch.finfo(dtype).bits >= 32:
        return (f"the run computes in {str(dtype).removeprefix('torch.')}, so this is not overflow: the model or its "
                "inputs produced non-finite values — check the weights file (a damaged or wrong-model checkpoint) "
                "and the input image or latent")
    return "if the model computes in fp16 try bf16 or fp32, else check the weights file"


class _FiniteCheck:
    """The NaN/inf check of the latent after each step: on the CPU at once; on a GPU each step's flag stays on
    the device and all are read when sampling ends, so no step waits for the host."""

    def __init__(self, denoise):
        self.denoise, self.flags = denoise, []

    def __call__(self, x: torch.Tensor, i: int) -> None:
        if x.device.type != "cpu":
            self.flags.append(torch.isfinite(x).all())
        elif not torch.isfinite(x).all():
            self.fail(i)

    def finish(self) -> None:
        if self.flags:
            ok = torch.stack(self.flags).cpu()
            if not ok.all():
                self.fail(int((~ok).nonzero()[0, 0]))

    def fail(self, i: int):
        dtype = getattr(self.denoise, "compute_dtype", None)
        raise TwigError(f"the latent became NaN/inf at step {i + 1}; {nonfinite_hint(dtype)}")


@torch.no_grad()
def sample_flow_euler(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None):
    """First-order Euler steps along the flow: x <- x + (sigma_next - sigma) * v."""
    check = _FiniteCheck(denoise)
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = denoise(x, s)
        v = (x - x0) / s
        x = x + (s_next - s) * v
        check(x, i)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "denoised": x0})
    check.finish()
    return x


@torch.no_grad()
def sample_flow_dpmpp_2m(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None):
    """DPM-Solver++ (2nd-order multistep, midpoint form) in flow time: alpha = 1 - sigma, lambda = log(alpha/sigma).

    The first step and the final step (to sigma = 0) are first order.
    """
    prev_x0 = None
    lam_prev = None
    check = _FiniteCheck(denoise)
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = denoise(x, s)
        lam = math.log((1 - s) / s)
        if s_next == 0:
            x = x0
        else:
            lam_next = math.log((1 - s_next) / s_next)
            h = lam_next - lam
            coef = (1 - s_next) * math.expm1(-h)  # alpha_next * (exp(-h) - 1)
            if prev_x0 is None:
                d = x0
            else:
                r = (lam - lam_prev) / h
                d = x0 + (0.5 / r) * (x0 - prev_x0)
            x = (s_next / s) * x - coef * d
        prev_x0, lam_prev = x0, lam
        check(x, i)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "denoised": x0})
    check.finish()
    return x


@dataclass(frozen=True)
class Sampler:
    """One sampler choice. Each keeps the spacing and timestep rounding of its reference scheduler, so results
    match Sana's published pipeline."""

    function: Callable  # sample_x(denoise, x, sigmas, callback)
    schedule: Callable[[int, float], torch.Tensor]  # (steps, shift) -> unshifted decreasing sigmas
    integer_timesteps: bool  # the model sees floor(sigma*1000), as the DPM-Solver scheduler feeds it
    description: str


SAMPLER_TABLE: dict[str, Sampler] = {
    "flow_dpmpp_2m": Sampler(sample_flow_dpmpp_2m, dpm_solver_schedule, True, "Sana's DPM-Solver++ 2M"),
    "flow_euler": Sampler(sample_flow_euler, flow_euler_schedule, False, "first-order Euler"),
}
SAMPLERS = tuple(SAMPLER_TABLE)  # the names, the default first


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLER_TABLE:
        raise TwigError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLER_TABLE[name]


def make_denoiser(
    model,
    cond,
    uncond=None,
    cfg: float = 4.5,
    integer_timesteps: bool = False,
    inpaint: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    cache: float = 0.0,
    cfg_interval: tuple[float, float] | None = None,
    stats: Evaluations | None = None,
    final_sigma: float | None = None,
) -> Denoiser:
    """Wrap a flow-prediction transformer into ``denoise(x, sigma) -> x0``.

    cond / uncond: ``Conditioning``-like objects with ``.embeds`` [B,N,C] and ``.mask`` [B,N]. With cfg != 1 and
    an uncond, both halves run as one batch and are mixed as uncond + cfg * (cond - uncond). Caption projection
    and cross-attention keys/values are computed once here, not at every step.
    integer_timesteps: feed floor(sigma*1000) like the reference DPM-Solver scheduler does.
    inpaint: (x0_orig, noise, mask) in latent space, mask 1 = regenerate. Outside the mask the latent is pinned
    to the original re-noised to the current sigma, and the prediction there is the original itself.
    cache: step-cache threshold (``twig_core.step_cache``; 0 = off): while block 0's residual changes less than
    this (relative) since the last full step, the other blocks' residual of that step is reused.
    cfg_interval: (lo, hi): guidance only while lo <= sigma <= hi; outside, only the conditional half runs.
    stats: where to count transformer evaluations (``denoise.stats``, a new ``Evaluations`` by default).
    final_sigma: the sigma of the schedule's last step: the cache never serves it, as its prediction is the
    picture (both samplers end on x = x0).
    """
    check_settings(cache=cache, cfg_interval=cfg_interval)
    use_cfg = uncond is not None and cfg != 1.0
    caches, step_caches, last = {}, {}, [None]

    def caption_cache(batch: int, guided: bool):
        """Caption states for a latent batch: [uncond x batch; cond x batch] with CFG, else cond x batch."""
        if (batch, guided) not in caches:
            parts = [uncond, cond] if guided else [cond]
            embeds, mask = _stack([_expand(c, batch) for c in parts])
            caches[batch, guided] = model.encode_caption(embeds.to(model.device), mask.to(model.device))
        return caches[batch, guided]

    def step_cache(guided: bool, sigma: float) -> dict:
        """The step cache of this batch composition, emptied unless the previous step had the same one."""
        if not cache:
            return {}
        held = step_caches.setdefault(guided, StepCache(cache, halves=2 if guided else 1))
        if last[0] != guided:
            held.reset()
        last[0] = guided
        held.may_reuse = final_sigma is None or sigma > final_sigma
        return {"step_cache": held}

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        if inpaint is not None:
            orig, noise, m = inpaint
            x = x * m + ((1 - sigma) * orig + sigma * noise) * (1 - m)
        t_val = math.floor(sigma * 1000) if integer_timesteps else sigma * 1000
        guided = use_cfg and (cfg_interval is None or cfg_interval[0] <= sigma <= cfg_interval[1])
        xin = torch.cat([x, x]) if guided else x
        t = torch.full((xin.shape[0],), float(t_val), device=model.device)
        extra = step_cache(guided, sigma)
        v = model(xin.to(model.device, model.dtype), t, caption_cache(x.shape[0], guided), **extra).float().to(x.device)
        denoise.stats.add(guided=guided, could_guide=use_cfg, share=extra["step_cache"].share if extra else 1.0)
        if guided:
            v_u, v_c = v.chunk(2)
            v = v_u + cfg * (v_c - v_u)
        x0 = x - sigma * v
        if inpaint is not None:
            x0 = x0 * m + orig * (1 - m)
        return x0

    denoise.compute_dtype = model.dtype  # for the NaN message: which overflow (if any) to suspect
    denoise.stats = Evaluations() if stats is None else stats  # "N of M evaluations computed" for front ends

    return denoise


def _expand(c, batch: int):
    """One prompt serves a whole latent batch; otherwise prompt and latent batches must agree."""
    e = c.embeds
    m = c.mask if c.mask is not None else torch.ones(e.shape[:2], dtype=torch.long, device=e.device)
    if e.shape[0] == batch:
        return e, m
    if e.shape[0] == 1:
        return e.expand(batch, -1, -1), m.expand(batch, -1)
    raise TwigError(f"{e.shape[0]} prompts cannot condition a batch of {batch} latents")


def _stack(pairs):
    """Concatenate (embeds, mask) pairs along the batch, padding shorter captions with masked zeros."""
    n = max(e.shape[1] for e, _ in pairs)
    es, ms = [], []
    for e, m in pairs:
        extra = n - e.shape[1]
        if extra:
            e = torch.cat([e, e.new_zeros(e.shape[0], extra, e.shape[2])], 1)
            m = torch.cat([m, m.new_zeros(m.shape[0], extra)], 1)
        es.append(e)
        ms.append(m)
    return torch.cat(es), torch.cat(ms)


def check_seed(seed, field: str = "seed") -> int:
    """``seed`` as an int, or TwigError naming ``field`` when it is not a whole number in 0 … 2**64 - 1."""
    try:
        value = None if isinstance(seed, bool) else operator.index(seed)
    except TypeError:
        value = None
    if value is None or not 0 <= value <= MAX_SEED:
        raise TwigError(f"{field} must be a whole number 0 … {MAX_SEED}, got {seed!r}")
    return value


def offset_seed(seed: int, n: int) -> int:
    """The seed of image/face ``n`` after ``seed`` (batch rows and images, face refine): seed + n, wrapping
    at 2**64 so every derived seed stays in range."""
    return (int(seed) + int(n)) % (MAX_SEED + 1)


def noise_like(shape, seed: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Deterministic N(0,1) latent noise from a seed in 0 … 2**64 - 1, drawn on the CPU so it is the same on
    every device; the one seed → noise mapping of every front end.

    torch's CPU generator keeps only the low 32 bits of a seed, so the seed is split: ``lo = seed mod 2**32``,
    ``hi = seed >> 32``. Seeds below 2**32 (hi = 0) give ``randn`` of a generator seeded with ``lo`` (what
    ComfyUI's own noise gives for those seeds). Larger seeds give ``(a + b) / sqrt(2)``: ``a`` as for ``lo``,
    ``b`` the second block of ``shape`` drawn from a generator seeded with ``hi``; the sum of two independent
    N(0,1) draws over sqrt(2) is N(0,1), and distinct seeds give distinct noise. Negative or larger seeds are a
    TwigError."""
    seed = check_seed(seed)
    lo, hi = seed & 0xFFFF_FFFF, seed >> 32
    x = torch.randn(shape, generator=torch.Generator(device="cpu").manual_seed(lo), dtype=torch.float32)
    if hi:
        b = torch.randn((2, *shape), generator=torch.Generator(device="cpu").manual_seed(hi), dtype=torch.float32)[1]
        x = (x + b) / math.sqrt(2.0)
    return x.to(device=device, dtype=dtype)


def sample(
    denoise: Denoiser,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    sampler: str = "flow_dpmpp_2m",
    init: torch.Tensor | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Run ``sampler`` from pure noise (init None) or from ``init`` noised to sigmas[0] (img2img). The steps'
    freed temporaries stay in the C heap for the next step's (``heap.kept``)."""
    function = get_sampler(sampler).function
    s0 = float(sigmas[0])
    x = noise if init is None else (1 - s0) * init + s0 * noise
    with heap.kept():
        return function(denoise, x, sigmas, callback)
