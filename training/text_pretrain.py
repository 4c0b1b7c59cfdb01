"""Give the demo's Gemma-2 text encoder a head start before the DiT sees it.

Twig's real text encoder arrives pre-trained and frozen; the demo's starts from random weights. Trained only
through the diffusion loss, it learns colour words (a bag-of-words signal) long before it learns which object
goes where or how many there are. This stage trains it alone, fast (no DiT, no pictures in the loop), to make
its hidden states carry the scene in a form that cross-attention can read:

  layout   an attention probe with one learned query per cell of a GRIDxGRID grid reads the hidden states and
           names the palette colour at that cell's centre (objects and background), from the rendered picture
  objects  one query per object colour reads how many objects of that colour there are (0-4), their shape, and
           where they are: the mean centre (x, y) of that colour's objects, a regression only for the colours
           present. Without it the layout head settles on where a colour is on average, the same for "on the
           left" and "on the right"; binding the place to the colour is what the DiT needs to read.

Both languages map onto the same targets, so an English caption and its Chinese translation are pulled onto
the same content. The probe heads are thrown away afterwards; only the Gemma-2 weights go on to the DiT stage,
which then keeps them frozen, as Sana and Twig keep Gemma frozen.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from twig_core.errors import TwigError

from .scenes import COLOR_NAMES, OBJECT_COLORS, PALETTE, SHAPES
from .trainer import descend, encode_batch, log, lr_at, open_stage, pick_captions

GRID = 8
MAX_COUNT = 4

_PAL = np.array([PALETTE[c] for c in COLOR_NAMES], dtype=np.float32)


def layout_targets(images: np.ndarray, grid: int = GRID) -> torch.Tensor:
    """Palette index [N, grid*grid] of the pixel at each cell centre of uint8 pictures [N,S,S,3]."""
    s = images.shape[1]
    step = s // grid
    centres = images[:, step // 2::step, step // 2::step][:, :grid, :grid].astype(np.float32)  # [N,g,g,3]
    dist = np.abs(centres[..., None, :] - _PAL).sum(-1)  # [N,g,g,K]
    return torch.from_numpy(dist.argmin(-1).reshape(len(images), grid * grid).astype(np.int64))


def object_targets(records: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per object colour: count [N, C] (0..MAX_COUNT), shape [N, C] (0 = none, 1.. = SHAPES index + 1) and the
    mean centre of its objects [N, C, 2] (x, y in [0, 1]; 0 where the colour is absent)."""
    n, c = len(records), len(OBJECT_COLORS)
    counts = torch.zeros(n, c, dtype=torch.long)
    shapes = torch.zeros(n, c, dtype=torch.long)
    centres = torch.zeros(n, c, 2)
    for i, r in enumerate(records):
        for g in r["scene"]["groups"]:
            j = OBJECT_COLORS.index(g["color"])
            counts[i, j] = min(MAX_COUNT, counts[i, j] + int(g["count"]))
            shapes[i, j] = SHAPES.index(g["shape"]) + 1
            inst = g.get("instances") or []
            if inst:
                centres[i, j] = torch.tensor([[d["cx"], d["cy"]] for d in inst]).mean(0)
    return counts, shapes, centres


class SceneProbe(nn.Module):
    """Learned queries attending over text hidden states (masked), each followed by a small classifier."""

    def __init__(self, width: int, dim: int = 128, grid: int = GRID):
        super().__init__()
        self.n_cells, self.n_obj = grid * grid, len(OBJECT_COLORS)
        self.queries = nn.Parameter(torch.randn(self.n_cells + self.n_obj, dim) * dim ** -0.5)
        self.key = nn.Linear(width, dim)
        self.value = nn.Linear(width, dim)
        self.mix = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.cell_head = nn.Linear(dim, len(COLOR_NAMES))
        self.count_head = nn.Linear(dim, MAX_COUNT + 1)
        self.shape_head = nn.Linear(dim, len(SHAPES) + 1)
        self.centre_head = nn.Linear(dim, 2)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor):
        k, v = self.key(hidden), self.value(hidden)
        att = torch.einsum("qd,bnd->bqn", self.queries, k) * k.shape[-1] ** -0.5
        att = att.masked_fill(~mask.bool()[:, None, :], float("-inf")).softmax(-1)
        h = self.mix(torch.einsum("bqn,bnd->bqd", att, v))
        cells, objs = h[:, :self.n_cells], h[:, self.n_cells:]
        return self.cell_head(cells), self.count_head(objs), self.shape_head(objs), self.centre_head(objs).sigmoid()


def probe_loss(probe: SceneProbe, hidden, mask, cells, counts, shapes, centres):
    """The three cross-entropies plus the centre error (mean squared, in units of half the picture, over
    the colours present); and the accuracies [cells, counts, shapes] and the centres' mean distance (for the log)."""
    lc, ln, ls, pc = probe(hidden.float(), mask)
    present = (counts > 0).float()
    n_present = present.sum().clamp(min=1)
    sq = ((pc - centres) ** 2).sum(-1)
    losses = (F.cross_entropy(lc.flatten(0, 1), cells.flatten()),
              F.cross_entropy(ln.flatten(0, 1), counts.flatten()),
              F.cross_entropy(ls.flatten(0, 1), shapes.flatten()),
              (sq * present).sum() / n_present * 4)
    with torch.no_grad():
        acc = [(lc.argmax(-1) == cells).float().mean().item(), (ln.argmax(-1) == counts).float().mean().item(),
               (ls.argmax(-1) == shapes).float().mean().item(),
               ((sq.sqrt() * present).sum() / n_present).item()]
    return sum(losses) / len(losses), acc


def pretrain_text(images: np.ndarray, records: list[dict], text_encoder, work: str | os.PathLike,
                  steps: int = 3000, batch: int = 64, lr: float = 1e-3, max_length: int = 144, seed: int = 0,
                  save_every: int = 100, grid: int = GRID):
    """Train ``text_encoder.model`` (plus a throw-away :class:`SceneProbe`) to read scenes out of captions.
    ``images`` are the uint8 training pictures aligned with ``records``. Resumes from ``work/text.ckpt``.
    Returns (text_encoder in eval mode, per-step losses of this run, last [cell, count, shape accuracy, centre
    error])."""
    ck, logf = open_stage(work, "text")
    if len(images) != len(records):
        raise TwigError(f"{len(images)} pictures but {len(records)} caption records")
    cells = layout_targets(images, grid)
    counts, shapes, centres = object_targets(records)
    torch.manual_seed(seed)
    probe = SceneProbe(text_encoder.hidden_size, grid=grid)
    params = list(text_encoder.model.parameters()) + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99), fused=True)
    start = 0
    state = ck.load()
    if state is not None:
        text_encoder.model.load_state_dict(state["text"])
        probe.load_state_dict(state["probe"])
        opt.load_state_dict(state["opt"])
        start = int(state["step"])
        log(f"resumed text at step {start}", logf)
    text_encoder.model.train()
    rng = np.random.default_rng(seed + start)
    losses, acc = [], [0.0, 0.0, 0.0, 0.0]
    t0 = time.time()
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=100)
        idx = rng.integers(0, len(records), batch)
        hidden, mask = encode_batch(text_encoder, pick_captions(records, idx, rng, p_uncond=0.0), max_length)
        loss, acc = probe_loss(probe, hidden, mask, cells[idx], counts[idx], shapes[idx], centres[idx])
        losses.append(descend(opt, loss, params))
        if step % 25 == 0 or step == steps - 1:
            log(f"text step {step} loss {loss.item():.4f} acc cells {acc[0]:.3f} counts {acc[1]:.3f} "
                f"shapes {acc[2]:.3f} centre error {acc[3]:.3f} ({(time.time() - t0) / (step - start + 1):.2f}s/step)",
                logf)
        if (step + 1) % save_every == 0 or step == steps - 1:
            ck.save(text=text_encoder.model.state_dict(), probe=probe.state_dict(), opt=opt.state_dict(),
                    step=step + 1)
    text_encoder.model.eval()
    return text_encoder, losses, acc
