"""The demo LoRA's recipe: teach the embedded demo model a colour it was never shown, pink ("粉色"), with a
low-rank adapter trained by the project's own trainer (``python -m training demo --stage lora``).

Data: scenes from the demo's generator (another seed than the base model's), where in most of them one object's
colour is painted pink and named "pink" / "粉色" in both languages' captions; the rest stay as they were, so the
adapter learns the new word without unlearning the old ones. The base model is the shipped demo pipeline, the
text encoder stays frozen, and the adapter is written in the diffusers/PEFT layout (``lora.peft_state_dict``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from .scenes import PALETTE, _COLOR_ZH, Scene, iter_records, render_scene

NEW_COLOR = ("pink", "粉色", (255, 105, 180))
DEMO_LORA_NAME = "twig_demo_pink.safetensors"


def _rename_colour(text: str, old: str, new: str) -> str:
    """``old`` colour word -> ``new`` in an English caption, keeping capitals and the article right."""
    def sub(m):
        art, word = m.group(1), m.group(2)
        art = "" if art is None else ("A " if art[0].isupper() else "a ")
        return art + (new.capitalize() if word[0].isupper() else new)

    return re.sub(rf"\b(an? )?({old})\b", sub, text, flags=re.IGNORECASE)


def recoloured_records(n: int, seed: int = 11, share: float = 0.7) -> list[dict]:
    """``n`` scene records; in ``share`` of them one group (the first) is recoloured: the record keeps the scene
    (its colour name, for validation) and says ``"paint": {old: new}`` with captions naming the new colour."""
    name, zh, _ = NEW_COLOR
    rng = np.random.default_rng(seed)
    out = []
    for rec in iter_records(seed):
        if len(out) >= n:
            break
        if rng.random() < share:
            old = rec["scene"]["groups"][0]["color"]
            rec["paint"] = {old: name}
            rec["captions"] = [{**c, "en": _rename_colour(c["en"], old, name),
                                "zh": c["zh"].replace(_COLOR_ZH[old], zh)} for c in rec["captions"]]
        out.append(rec)
    return out


def render(records: list[dict], size: int = 128) -> np.ndarray:
    rgb = {NEW_COLOR[0]: NEW_COLOR[2]}
    out = np.empty((len(records), size, size, 3), dtype=np.uint8)
    for j, rec in enumerate(records):
        palette = {**PALETTE, **{old: rgb[new] for old, new in rec.get("paint", {}).items()}}
        out[j] = render_scene(Scene.from_dict(rec["scene"]), size, 4, palette)
    return out


def train_demo_lora(base: str, work: Path, out: Path, n: int = 3000, steps: int = 1000, batch: int = 16,
                    rank: int = 8, lr: float = 3e-3) -> Path:
    """Train the pink adapter on the pipeline folder ``base`` (resumable in ``work``) and write it to ``out``.
    Small batches and a short warm-up buy many updates in a short CPU run: the new word is
    learnt by the number of steps more than by the batch size."""
    from safetensors.torch import save_file

    from twig_core.loader import load_pipeline

    from .lora import apply_lora, peft_state_dict
    from .trainer import encode_all, log, train_dit

    work.mkdir(parents=True, exist_ok=True)
    recs_path, lat_path = work / "lora_records.json", work / "lora_latents.pt"
    parts = load_pipeline(base, dtype=torch.float32)
    if not lat_path.exists():
        records = recoloured_records(n)
        recs_path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
        torch.save(encode_all(parts.vae, render(records)), lat_path)
    records = json.loads(recs_path.read_text(encoding="utf-8"))
    latents = torch.load(lat_path, weights_only=True)
    torch.manual_seed(0)
    params = apply_lora(parts.transformer, rank=rank)
    dit, _, _ = train_dit(latents, records, parts.text_encoder, parts.transformer, work, steps=steps, batch=batch,
                          lr=lr, params=params, train_text=False, ema_decay=0.99, warmup=50)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(torch.float16) for k, v in peft_state_dict(dit).items()}
    save_file(state, out, metadata={"format": "pt", "twig_recipe": "python -m training demo --stage lora"})
    log(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return out


#: Prompts the demo LoRA is measured on (``pink_rate``), English and Chinese: the training captions' forms and
#: a few it never saw verbatim.
PINK_PROMPTS = ("a pink circle", "a pink square on a white background", "two pink stars", "a pink triangle on the left",
                "a large pink diamond", "一个粉色的圆", "白色背景上有一个粉色的正方形", "两个粉色的星星",
                "画面左边有一个粉色的三角形", "一个粉色的大菱形")
PINK_MIN_PIXELS = 100  # of 128²: about a quarter of the smallest object the scenes draw


def pink_pixels(image: torch.Tensor) -> torch.Tensor:
    """Per image of ``image`` ([B,H,W,3] or [H,W,3], 0..1): pixels whose nearest colour among the demo palette and
    pink is pink."""
    colours = torch.tensor([*PALETTE.values(), NEW_COLOR[2]], dtype=torch.float32)
    rgb = image.reshape(-1 if image.ndim == 4 else 1, image.shape[-3] * image.shape[-2], 3).float() * 255
    return (torch.cdist(rgb, colours.expand(len(rgb), -1, -1)).argmin(-1) == len(colours) - 1).sum(-1)


def pink_images(parts, prompts=PINK_PROMPTS, seeds=(0, 1), per_seed: int = 2, loras=(), steps: int = 20,
                size: int = 128) -> torch.Tensor:
    """Pink pixel counts [prompts, seeds * per_seed] of pictures of the pipeline ``parts`` with ``loras``
    ((file, strength) pairs) applied."""
    from twig_core.lora import loras_applied
    from twig_core.pipeline import generate

    counts = []
    with torch.no_grad(), loras_applied(parts.transformer, list(loras)):
        for prompt in prompts:
            row = [pink_pixels((generate(parts.transformer, parts.vae, parts.text_encoder, prompt, width=size,
                                         height=size, batch_size=per_seed, steps=steps, seed=seed)
                                .permute(0, 2, 3, 1) + 1) / 2) for seed in seeds]
            counts.append(torch.cat(row))
    return torch.stack(counts)


def pink_rate(counts: torch.Tensor) -> float:
    """Share of the pictures of ``pink_images`` with a pink object."""
    return (counts >= PINK_MIN_PIXELS).float().mean().item()


def report_pink(base: str, lora: str | Path, seeds=(0, 1, 2, 3, 4), per_seed: int = 2) -> str:
    """How often the pipeline folder ``base`` draws pink on ``PINK_PROMPTS`` without and with the adapter ``lora``
    (the README's figures: ``python -m training demo --stage lora`` prints them after training)."""
    from twig_core.loader import load_pipeline

    parts = load_pipeline(base, dtype=torch.float32)
    half = len(PINK_PROMPTS) // 2
    lines = []
    for label, loras in (("without the LoRA", ()), ("with the LoRA", ((str(lora), 1.0),))):
        c = pink_images(parts, seeds=seeds, per_seed=per_seed, loras=loras)
        lines.append(f"pink {label}: {pink_rate(c):.0%} of {c.numel()} pictures (English {pink_rate(c[:half]):.0%}, "
                     f"Chinese {pink_rate(c[half:]):.0%})")
    return "\n".join(lines)

