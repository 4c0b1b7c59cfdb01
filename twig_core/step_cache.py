"""Fewer transformer evaluations per picture: the first-block step cache and the count of evaluations.

Step cache (the First-Block Cache idea): neighbouring sampling steps often change the transformer's output
little, and how much block 0 changes the tokens tells early whether this step will differ from the last one.
Each step runs block 0 and compares its residual (what block 0 added to the tokens) with the one of the last
fully computed step: rel = mean|r - r_ref| / mean|r_ref|. Below the threshold, blocks 1 … N-1 are skipped and
the residual they added at that full step is added to block 0's output instead; otherwise they run and their
residual is kept. A picture served from the cache is computed in full at the next step whatever its change
(``max_run``, 1 by default, reused steps in a row): runs of reused steps drift far more than the change of block
0 shows, and at the same number of evaluations alternating keeps the final latents much closer to the full run's
(bench/RESULTS.md). The caller may forbid reuse for a step (``may_reuse``): the denoiser does so for the
schedule's last step, whose prediction becomes the picture.

The decision is made for each picture of the batch on its own: rows never interact inside the blocks, so a
batch gives every picture what it would get alone, and a picture whose tokens moved is computed in full even
when the rest of the batch is served from the cache. A picture's halves (unconditional and conditional rows of
a CFG pair) are decided together: serving one half from the cache while the other is computed breaks the
guidance difference, which CFG multiplies (measured: bench/RESULTS.md).

One :class:`StepCache` serves one batch composition (CFG pair or conditional half alone); the denoiser keeps
one per composition (``sampling.make_denoiser``). Memory: two token tensors [b, h*w, width] in the compute
dtype between steps, two more during a step (1024², a CFG pair, width 2240, fp32: 18 MB each). Deciding
reads one number per picture back from the device per step.

Unit of :class:`Evaluations`: the transformer body run over one latent image once ("image-evaluation"). Per
latent in the batch, a step with classifier-free guidance costs 2 (unconditional and conditional), one
without costs 1, and a step the cache serves costs block 0's share (1/depth) of that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


class StepCache:
    """Reuse the residual of blocks 1 … N-1, picture by picture, while block 0's residual moves less than
    ``threshold`` (relative)."""

    def __init__(self, threshold: float, halves: int = 1, max_run: int = 1):
        self.threshold = float(threshold)
        self.halves = halves  # the batch is ``halves`` stacked blocks of the same pictures (2: a CFG pair)
        self.max_run = max_run  # most steps in a row a picture may be served from the cache
        self.run_length: torch.Tensor | None = None  # each row's reused steps in a row so far
        self.first: torch.Tensor | None = None  # block 0's residual at each picture's last full step
        self.rest: torch.Tensor | None = None  # what blocks 1 … N-1 added at that step
        self.reused = False  # whether the last run skipped blocks 1 … N-1 for any picture
        self.share = 1.0  # the part of the transformer body the last run computed (1/depth for a reused picture)
        self.may_reuse = True  # False: the next run computes in full whatever the change (the caller's choice)

    def reset(self) -> None:
        """Forget the last full step (its residuals belong to another trajectory or batch)."""
        self.first = self.rest = self.run_length = None

    def run(self, tokens: torch.Tensor, run_block: Callable[..., torch.Tensor], depth: int):
        """The tokens [b, n, d] after all ``depth`` blocks; ``run_block(i, tokens, rows=None)`` runs block i over
        the whole batch or over the batch rows ``rows`` (it may update ``tokens`` in place)."""
        first = tokens.clone()
        tokens = run_block(0, tokens)
        first = first.neg_().add_(tokens)  # block 0's residual, in the input's memory
        b = tokens.shape[0]
        if self.may_reuse and self.rest is not None and self.rest.shape == tokens.shape:
            reuse = (relative_change(first, self.first, self.halves) < self.threshold).repeat(self.halves)
            reuse &= self.run_length < self.max_run
        else:
            reuse = torch.zeros(b, dtype=torch.bool)
        self.run_length = torch.where(reuse, (0 if self.run_length is None else self.run_length) + 1, 0)
        served = int(reuse.sum())
        self.reused = served > 0
        self.share = (b - served + served / depth) / b
        if served == b:
            return tokens + self.rest
        todo = None if served == 0 else (~reuse).nonzero().flatten().to(tokens.device)
        part = tokens if todo is None else tokens[todo]
        start = part.clone()
        for i in range(1, depth):
            part = run_block(i, part) if todo is None else run_block(i, part, todo)
        if todo is None:
            self.first, self.rest = first, start.neg_().add_(part)
            return part
        out = tokens.add_(self.rest)  # the reused rows; the computed ones are written over next
        out[todo] = part
        self.first[todo] = first[todo]
        self.rest[todo] = part - start
        return out


def relative_change(new: torch.Tensor, ref: torch.Tensor, halves: int = 1) -> torch.Tensor:
    """mean|new - ref| / mean|ref| in fp32 (0 where both are zero) for each picture of a batch of ``halves``
    stacked blocks of pictures (picture p: rows p, p + b/halves, …), on the CPU."""
    def per_picture(t):
        return t.abs().flatten(1).mean(1).view(halves, -1).sum(0)
    diff = per_picture(new.float() - ref.float())
    return (diff / per_picture(ref.float()).clamp_min(torch.finfo(torch.float32).tiny)).cpu()


@dataclass
class Evaluations:
    """Transformer work of one sampling run, in image-evaluations per latent (see the module docstring).

    ``full`` is what the same steps cost with neither the cache nor a CFG interval."""

    computed: float = 0.0
    full: float = 0.0
    steps: int = 0
    reused: int = 0  # steps the step cache served (for at least one picture of the batch)
    unguided: int = 0  # steps outside the CFG interval (conditional half only)

    def add(self, *, guided: bool, could_guide: bool, share: float = 1.0) -> None:
        """Count one step: with CFG or not, whether the run could have guided, the part of the body computed."""
        self.computed += (2.0 if guided else 1.0) * share
        self.full += 2.0 if could_guide else 1.0
        self.steps += 1
        self.reused += share < 1.0
        self.unguided += could_guide and not guided

    @property
    def ratio(self) -> float:
        """How many times fewer evaluations than ``full`` (1.0 before any step)."""
        return self.full / self.computed if self.computed else 1.0

    def __str__(self) -> str:
        return (f"{self.computed:.1f} of {self.full:g} transformer evaluations computed ({self.ratio:.2f}x fewer; "
                f"{self.reused} of {self.steps} steps from the cache, {self.unguided} without CFG)")
