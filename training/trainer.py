"""A small trainer for Twig-architecture models, used to make the embedded demo model.

Stages (each resumable from its last checkpoint, each small enough for one sitting on a CPU):
  vae      DC-AE autoencoder on the rendered pictures (L1 + MSE, latent-noise augmentation)
  latents  encode every training picture once with the trained DC-AE
  decoder  the DC-AE's decoder trained further, encoder frozen, object pixels weighted
  text     Gemma-2 pre-trained to read the scene out of captions (``text_pretrain.py``)
  dit      DiT trained with the flow-matching loss on those latents, Gemma-2 frozen (or trained along)
The same loop fine-tunes a real checkpoint (``train_dit`` takes any TwigTransformer / TextEncoder, on the
transformer's device), and ``lora.apply_lora`` restricts training to low-rank adapters.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from twig_core.errors import TwigError


def log(msg: str, path: str | os.PathLike | None = None) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def cycle_at(step: int, cycles) -> tuple[int, int, float]:
    """(first step, length, peak learning rate) of the cycle that ``step`` falls in; ``cycles`` are consecutive
    (length, peak) pairs, each a warm-up and cosine decay of its own (warm restarts)."""
    first = 0
    for length, peak in cycles:
        if step < first + length:
            return first, length, peak
        first += length
    raise ValueError(f"step {step} is past the last cycle")


def to_model_images(batch_u8: np.ndarray) -> torch.Tensor:
    """uint8 [B,H,W,3] -> float [B,3,H,W] in [-1,1]."""
    return torch.from_numpy(batch_u8).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def downsample_u8(images: np.ndarray, size: int) -> np.ndarray:
    """Area-average uint8 pictures [N,S,S,3] down to size² (S a multiple of size)."""
    n, s = images.shape[0], images.shape[1]
    if s == size:
        return images
    if s % size:
        raise TwigError(f"pictures of {s}² cannot be area-averaged to {size}²")
    f = s // size
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(0, n, 512):
        chunk = images[i:i + 512].astype(np.float32).reshape(-1, size, f, size, f, 3).mean(axis=(2, 4))
        out[i:i + 512] = np.clip(np.rint(chunk), 0, 255).astype(np.uint8)
    return out


class Checkpoint:
    """A resumable training state at ``path`` (torch.save of tensors/ints only, loaded with weights_only)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def load(self):
        if not self.path.is_file():
            return None
        return torch.load(self.path, map_location="cpu", weights_only=True)

    def save(self, **state) -> None:
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)


def descend(opt: torch.optim.Optimizer, loss: torch.Tensor, params) -> float:
    """One optimiser step on ``loss`` with the gradients of ``params`` clipped to norm 1; returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.item()


def open_stage(work: str | os.PathLike, name: str) -> tuple[Checkpoint, Path]:
    """A training stage's resumable checkpoint (``work/<name>.ckpt``) and log file (``work/<name>.log``).
    Makes ``work`` and flushes denormals to zero (denormal weights/grads otherwise slow CPU training ten-fold)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_flush_denormal(True)
    return Checkpoint(work / f"{name}.ckpt"), work / f"{name}.log"


# ------------------------------------------------------------------------------------------------- stage 1: vae


def train_vae(images: np.ndarray, work: str | os.PathLike, steps: int = 3000, batch: int = 16, lr: float = 1e-3,
              crop: int = 64, full_from: float = 0.85, seed: int = 0, save_every: int = 100, config=None):
    """Train the demo DC-AE on uint8 pictures [N,H,W,3]. Random 32-aligned crops of ``crop`` pixels first (cheap),
    whole pictures for the last (1 - full_from) of the steps. Returns (model, losses of this run)."""
    from twig_core.dcae import DCAE

    from .demo import DEMO_DCAE

    ck, logf = open_stage(work, "vae")
    torch.manual_seed(seed)
    model = DCAE(config or DEMO_DCAE).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99), fused=True)
    start = 0
    state = ck.load()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = int(state["step"])
        log(f"resumed vae at step {start}", logf)
    rng = np.random.default_rng(seed + start)
    n, size = images.shape[0], images.shape[1]
    losses = []
    t0 = time.time()
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        idx = rng.integers(0, n, batch)
        x = to_model_images(images[idx])
        if step < full_from * steps and crop < size:
            cells = (size - crop) // 32 + 1
            oy, ox = 32 * int(rng.integers(0, cells)), 32 * int(rng.integers(0, cells))
            x = x[:, :, oy:oy + crop, ox:ox + crop]
        if rng.random() < 0.5:
            x = x.flip(-1)
        z = model.encode_raw(x)
        z = z + 0.05 * z.detach().std() * torch.randn_like(z)  # a decoder that tolerates imperfect latents
        y = model.decode_raw(z)
        loss = recon_loss(y, x)
        losses.append(descend(opt, loss, model.parameters()))
        if step % 20 == 0 or step == steps - 1:
            log(f"vae step {step} loss {loss.item():.4f} lr {lr_at(step, steps, lr):.2e} "
                f"({(time.time() - t0) / (step - start + 1):.2f}s/step)", logf)
        if (step + 1) % save_every == 0 or step == steps - 1:
            ck.save(model=model.state_dict(), opt=opt.state_dict(), step=step + 1)
    return model.eval(), losses


def recon_loss(y: torch.Tensor, x: torch.Tensor, object_weight: float = 0.0, edge_weight: float = 0.0) -> torch.Tensor:
    """L1 + MSE between a decoded batch ``y`` and its pictures ``x`` ([B,3,H,W] in [-1,1]). ``object_weight`` > 0
    counts the pixels that differ from their picture's median colour (the objects, not the background)
    1 + object_weight times: small objects are a sliver of the pixels, and a plain mean lets the decoder drop them.
    ``edge_weight`` > 0 adds that weight on the pixels next to a colour change (3x3 neighbourhood), the outlines
    that tell a star or a square from a round blob."""
    if not (object_weight or edge_weight):
        return F.l1_loss(y, x) + F.mse_loss(y, x)
    w = torch.ones_like(x[:, :1])
    if object_weight:
        background = x.flatten(2).median(-1).values[..., None, None]
        w = w + object_weight * ((x - background).abs().amax(1, keepdim=True) > 0.1).float()
    if edge_weight:
        spread = F.max_pool2d(x, 3, 1, 1) + F.max_pool2d(-x, 3, 1, 1)  # local max - local min, per channel
        w = w + edge_weight * (spread.amax(1, keepdim=True) > 0.1).float()
    err = y - x
    return (err.abs() * w).mean() + (err.square() * w).mean()


def finetune_decoder(vae, images: np.ndarray, work: str | os.PathLike, steps: int = 1500, batch: int = 16,
                     lr: float = 2e-4, object_weight: float = 4.0, edge_weight: float = 0.0, seed: int = 0,
                     save_every: int = 100):
    """Train the DC-AE's decoder further on whole pictures with the encoder frozen, so latents already encoded
    (and a DiT trained on them) stay valid; ``object_weight`` and ``edge_weight`` as in ``recon_loss``. Checkpoint
    ``work/decoder.ckpt`` holds the whole autoencoder. Returns (vae, losses of this run)."""
    ck, logf = open_stage(work, "decoder")
    state = ck.load()
    start = 0
    if state is not None:
        vae.load_state_dict(state["model"])
        start = int(state["step"])
    flags = [p.requires_grad for p in vae.parameters()]
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    if state is not None:
        opt.load_state_dict(state["opt"])
        log(f"resumed decoder at step {start}", logf)
    rng = np.random.default_rng(seed + start)
    trng = torch.Generator().manual_seed(seed + start)
    vae.train()
    losses = []
    t0 = time.time()
    for step in range(start, steps):
        rate = lr_at(step, steps, lr, warmup=50)
        for g in opt.param_groups:
            g["lr"] = rate
        x = to_model_images(images[np.sort(rng.integers(0, len(images), batch))])
        if rng.random() < 0.5:
            x = x.flip(-1)
        with torch.no_grad():
            z = vae.encode_raw(x)
            z = z + 0.05 * z.std() * torch.randn(z.shape, generator=trng)
        loss = recon_loss(vae.decode_raw(z), x, object_weight, edge_weight)
        losses.append(descend(opt, loss, params))
        if step % 20 == 0 or step == steps - 1:
            log(f"decoder step {step} loss {loss.item():.4f} lr {rate:.2e} "
                f"({(time.time() - t0) / (step - start + 1):.2f}s/step)", logf)
        if (step + 1) % save_every == 0 or step == steps - 1:
            ck.save(model=vae.state_dict(), opt=opt.state_dict(), step=step + 1)
    for p, flag in zip(vae.parameters(), flags):  # handed back as it came
        p.requires_grad_(flag)
    return vae.eval(), losses


@torch.no_grad()
def latent_scale(model, images: np.ndarray, n: int = 512, batch: int = 64) -> float:
    """The scaling factor that gives the encoded pictures unit standard deviation."""
    zs = [model.encode_raw(to_model_images(images[i:i + batch])) for i in range(0, min(n, len(images)), batch)]
    return float(1.0 / torch.cat(zs).std())


@torch.no_grad()
def encode_all(model, images: np.ndarray, batch: int = 64) -> torch.Tensor:
    """Model-space latents of every picture (float16 to keep the cache small)."""
    out = []
    for i in range(0, len(images), batch):
        out.append(model.encode(to_model_images(images[i:i + batch])).half())
        if (i // batch) % 50 == 0:
            log(f"encoded {i + len(out[-1])}/{len(images)} pictures")
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------- stage 3: dit


def pick_captions(records: list[dict], idx, rng: np.random.Generator, p_uncond: float = 0.1,
                  p_zh: float = 0.5) -> list[str | None]:
    """One caption per picked record: a random style, Chinese with probability p_zh; None = dropped (for CFG)."""
    out: list[str | None] = []
    for i in idx:
        if rng.random() < p_uncond:
            out.append(None)
            continue
        caps = records[int(i)]["captions"]
        c = caps[int(rng.integers(0, len(caps)))]
        out.append(c["zh"] if rng.random() < p_zh else c["en"])
    return out


def encode_batch(text_encoder, captions: list[str | None], max_length: int, train: bool = True):
    """Embeddings [B,N,C] and mask [B,N]: captions on the positive path (with the encoder's instruction, if any),
    dropped ones as the empty negative. N is the longest caption of the batch (at most ``max_length``): padding
    is masked out of cross-attention, so a shorter padded length gives the same result for less work."""
    run = text_encoder.forward if train else text_encoder.encode
    longest = max((text_encoder.count_tokens(c) for c in captions if c is not None), default=0)
    max_length = max(2, min(max_length, longest + 2))
    pos = [i for i, c in enumerate(captions) if c is not None]
    neg = [i for i, c in enumerate(captions) if c is None]
    parts = {}
    if pos:
        parts["pos"] = run([captions[i] for i in pos], max_length=max_length, use_instruction=True)
    if neg:
        parts["neg"] = run([""] * len(neg), max_length=max_length, use_instruction=False)
    b = len(captions)
    first = next(iter(parts.values()))
    embeds = first.embeds.new_zeros(b, max_length, first.embeds.shape[-1])
    mask = first.mask.new_zeros(b, max_length)
    for key, rows in (("pos", pos), ("neg", neg)):
        if rows:
            embeds[rows] = parts[key].embeds
            mask[rows] = parts[key].mask
    return embeds, mask


def flow_batch(x0: torch.Tensor, rng: torch.Generator):
    """Noised latents, timesteps and velocity targets: sigma half logit-normal, half uniform."""
    b = x0.shape[0]
    u = torch.randn(b, generator=rng).sigmoid()
    uni = torch.rand(b, generator=rng)
    sigma = torch.where(torch.rand(b, generator=rng) < 0.5, u, uni).clamp(1e-3, 1.0)
    noise = torch.randn(x0.shape, generator=rng)
    s = sigma.view(-1, 1, 1, 1)
    return (1 - s) * x0 + s * noise, sigma * 1000, noise - x0


class EMA:
    """Exponential moving average of the trained parameters (only those: frozen weights, e.g. under LoRA
    adapters, need no shadow copy)."""

    def __init__(self, params, decay: float):
        self.decay = decay
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - d)

    def state(self) -> list[torch.Tensor]:
        return self.shadow

    def load(self, shadow) -> None:
        for s, v in zip(self.shadow, shadow):
            s.copy_(v)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live and averaged weights (call twice to restore)."""
        for s, p in zip(self.shadow, self.params):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


def focus_weights(records: list[dict], focus: dict[str, float]) -> np.ndarray:
    """One weight per record for ``train_dit``: the largest factor of ``focus`` (a shape, colour or position name,
    e.g. {"star": 3}) that one of the scene's objects has, else 1. A name no scene has is refused."""
    out = np.ones(len(records))
    seen = set()
    for i, r in enumerate(records):
        names = {g.get(k) for g in r["scene"]["groups"] for k in ("shape", "color", "position")}
        seen |= names
        hits = [f for name, f in focus.items() if name in names]
        if hits:
            out[i] = max(hits)
    unknown = sorted(set(focus) - seen)
    if unknown:
        raise TwigError(f"focus: no training scene has {', '.join(unknown)} (names are shapes, colours or "
                        "positions, e.g. star, red, top_left)")
    return out


def train_dit(latents: torch.Tensor, records: list[dict], text_encoder, transformer, work: str | os.PathLike,
              steps: int = 4000, batch: int = 64, lr: float = 5e-4, max_length: int = 144, seed: int = 0,
              p_uncond: float = 0.1, ema_decay: float = 0.998, save_every: int = 100, params=None,
              bf16: bool = False, train_text: bool = True, restarts=(), warmup: int = 200,
              save_seconds: float | None = None, weights=None):
    """Flow-matching training of ``transformer`` (and the text encoder's model when ``train_text``; ``params``
    restricts the trainable set further, e.g. to LoRA weights). ``train_text=False`` keeps the text encoder frozen
    and runs it without gradients, as Sana/Twig train with Gemma frozen.
    ``latents`` are model-space [N,C,h,w] aligned with ``records``, or a list of such tensors at different grids
    (e.g. 8x8 and 4x4): step i draws its batch from ``latents[i % len(latents)]``, so one model learns every size.
    ``bf16``: bfloat16 autocast for the forward pass (about 1.5x faster on CPUs with AVX512-BF16).
    ``warmup``: steps of linear learning-rate warm-up at the start of each cycle.
    ``restarts``: (steps, peak lr) pairs, further cosine cycles after the first (``steps`` at ``lr``); a run that
    stopped at the end of one cycle goes on into the next from its checkpoint.
    The batch order is drawn from ``seed`` plus the step a run (or a cycle) starts at, so resuming from a
    checkpoint saved at a cycle's end continues exactly as an uninterrupted run would.
    Checkpoints (``work/dit.ckpt``) every ``save_every`` steps and, with ``save_seconds``, also once that many seconds
    passed since the last one, so a stopped run loses little whatever a step costs.
    ``weights``: one non-negative number per record; a batch draws each record with that relative chance
    (default: all alike), e.g. from ``focus_weights``.
    Returns (transformer, text_encoder, losses of this run) with the averaged (EMA) weights loaded."""
    ck, logf = open_stage(work, "dit")
    chance = None
    if weights is not None:
        chance = np.asarray(weights, dtype=np.float64)
        if chance.shape != (len(records),) or (chance < 0).any() or chance.sum() <= 0:
            raise TwigError(f"weights: need {len(records)} non-negative numbers, not all 0 (got shape "
                            f"{chance.shape})")
        chance = chance / chance.sum()
    grids = list(latents) if isinstance(latents, (list, tuple)) else [latents]
    for lat in grids:
        if len(lat) != len(records):
            raise TwigError(f"{len(lat)} latents ({'x'.join(map(str, lat.shape[-2:]))}) but {len(records)} caption "
                            "records")
    modules = [transformer, text_encoder.model] if train_text else [transformer]
    trainable = list(params) if params is not None else [p for m in modules for p in m.parameters()]
    device = transformer.device  # batches are drawn on the CPU, then moved
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01, betas=(0.9, 0.99), fused=True)
    ema = EMA(trainable, ema_decay)
    start = 0
    state = ck.load()
    if state is not None:
        transformer.load_state_dict(state["transformer"])
        text_encoder.model.load_state_dict(state["text"])
        opt.load_state_dict(state["opt"])
        ema.load(state["ema"])
        start = int(state["step"])
        log(f"resumed dit at step {start}", logf)
    for m in modules:
        m.train()
    if not train_text:
        text_encoder.model.eval().requires_grad_(False)
    cycles = [(steps, lr), *restarts]
    total = sum(n for n, _ in cycles)
    losses = []
    t0 = saved = time.time()
    for step in range(start, total):
        first, length, peak = cycle_at(step, cycles)
        if step == start or step == first:
            rng = np.random.default_rng(seed + step)
            trng = torch.Generator().manual_seed(seed + step)
        rate = lr_at(step - first, length, peak, warmup=warmup)
        for g in opt.param_groups:
            g["lr"] = rate
        idx = rng.integers(0, len(records), batch) if chance is None else rng.choice(len(records), batch, p=chance)
        xt, t, target = (v.to(device) for v in flow_batch(grids[step % len(grids)][idx].float(), trng))
        with torch.autocast(xt.device.type, dtype=torch.bfloat16, enabled=bf16):
            embeds, mask = encode_batch(text_encoder, pick_captions(records, idx, rng, p_uncond), max_length,
                                        train=train_text)
            v = transformer(xt, t, embeds, mask)
        loss = F.mse_loss(v.float(), target)
        losses.append(descend(opt, loss, trainable))
        ema.update(step)
        if step % 25 == 0 or step == total - 1:
            log(f"dit step {step} loss {loss.item():.4f} lr {rate:.2e} "
                f"({(time.time() - t0) / (step - start + 1):.2f}s/step)", logf)
        if ((step + 1) % save_every == 0 or step == total - 1
                or (save_seconds is not None and time.time() - saved >= save_seconds)):
            ck.save(transformer=transformer.state_dict(), text=text_encoder.model.state_dict(), opt=opt.state_dict(),
                    ema=ema.state(), step=step + 1)
            saved = time.time()
    for m in modules:
        m.eval()
    ema.swap()  # leave the averaged weights in the models
    return transformer, text_encoder, losses
