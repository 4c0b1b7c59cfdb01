"""Precision presets: the speed/fidelity choices a user picks by name (``--preset``, the tab's and nodes' lists).

Each preset fixes the transformer's compute dtype, how its weights are held, and the sampler's shortcuts
(``cache``: reuse of a step's result when the first block barely changes; ``cfg_interval``: guidance only inside
a sigma range), resolved for the device it runs on:

- ``quality``: everything in fp32; what the parity tests hold to diffusers' fp32 output.
- ``balanced``: bf16 where the device multiplies it natively (GPUs of compute capability 8 and up, CPUs with
  AVX512-BF16 or AMX; there, on a CPU, large pictures' blocks run compiled: ``twig_core.compiled``), else fp16 on
  other GPUs; on a CPU without native bf16 it is ``quality``: fp32 is the
  fastest there (bf16 products fall to slow kernels, and fp16-held weights widened on every call cost time;
  ``--weight-dtype fp16`` still halves the memory).
- ``fast``: the sampler shortcuts, with ``balanced``'s dtypes on a GPU and on a CPU with AMX (whose bf16
  products beat torch's int8 routes); on other CPUs, the transformer's fp16-held weights
  with its large products in int8 (``twig_core.int8``), the rest in fp32. Gemma-2 stays in fp32 there: it runs
  only to the prompt's last token, and its linears in int8 saved too little a prompt for their load time, memory
  and error (bench/RESULTS.md).

``STEP_ERROR`` and ``LATENT_ERROR`` are each preset's stated bounds against diffusers in fp32 on the same
weights: the relative error (L2 norm of the difference over the norm of the reference) of one transformer step,
and of the latent after a whole run; ``TEXT_ERROR`` that of Gemma-2's final states against transformers' fp32
model; tests/test_presets.py holds every preset to them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .devices import cpu_amx, cpu_bf16, cuda_bf16
from .errors import TwigError


@dataclass(frozen=True)
class Preset:
    name: str
    dtype: str  # the transformer's compute dtype choice (devices.DTYPE_CHOICES)
    weight_dtype: str  # how its weights are held (devices.WEIGHT_DTYPE_CHOICES)
    cache: float = 0.0  # step-cache threshold (0: off)
    cfg_interval: tuple[float, float] | None = None  # guidance only for sigmas in this range (None: always)


PRESET_NAMES = ("quality", "balanced", "fast")
DEFAULT_PRESET = "balanced"
# The sampler shortcuts of ``fast``.
FAST_CACHE = 0.25  # what it saves and costs on the demo model: bench/RESULTS.md
FAST_CFG_INTERVAL: tuple[float, float] | None = None
# Stated bounds, tested: relative error against diffusers fp32 of one step / of a run's final latent.
# fast: on random weights (the tests' models, the full-size 1600M) int8 moves a step by about 1-2.6% and a run's
# latent by about 1%; on the trained demo model, whose activations vary more from token to token, a step by 1.5-5%
# (more at late steps) and a run's latent by 9-16%. With the step cache the test's picture moves by 18%, but the
# latent bound holds for a typical picture only: sampling is chaotic, and one demo picture in ten takes another
# path (14-70%); the cache is judged by held-out scores, picture by picture (bench/RESULTS.md).
# balanced: where it computes in bf16 (a CPU with AVX512-BF16/AMX, a recent GPU), bf16's 8-bit mantissa moves a step
# and a run's latent by about 0.75% (the tests' model on a Xeon with AMX); where it falls back to fp32 it is
# ``quality`` and keeps that preset's bounds.
STEP_ERROR = {"quality": 1e-5, "balanced": 2e-2, "fast": 6e-2}
LATENT_ERROR = {"quality": 1e-4, "balanced": 2e-2, "fast": 2.5e-1}
# Gemma-2's final states (what the transformer reads: kept tokens, by the mask) against transformers' fp32
# Gemma2Model on the same weights; the text encoder's dtype follows the preset's (fp32 unless the device computes
# bf16 natively: bf16 measured 0.9-1.2%).
TEXT_ERROR = {"quality": 1e-5, "balanced": 2e-2, "fast": 2e-2}


def resolve(name: str, device="cpu") -> Preset:
    """The preset ``name`` as concrete choices for ``device``."""
    if name not in PRESET_NAMES:
        raise TwigError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    dev = torch.device(device)
    if name == "quality":
        return Preset(name, "fp32", "same")
    if dev.type == "cpu":
        balanced = Preset(name, "bf16", "same") if cpu_bf16() else Preset(name, "fp32", "same")
    elif dev.type == "cuda" and not cuda_bf16(dev):
        balanced = Preset(name, "fp16", "same")
    else:
        balanced = Preset(name, "auto", "same")
    if name == "balanced":
        return balanced
    fast = Preset(name, "fp32", "int8") if dev.type == "cpu" and not cpu_amx() else replace(balanced, name=name)
    return replace(fast, cache=FAST_CACHE, cfg_interval=FAST_CFG_INTERVAL)
