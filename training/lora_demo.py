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


def train_demo_lora(base: str, work: Path, out: Path, n: int = 3000, steps: int = 600, batch: int = 32,
                    rank: int = 8, lr: float = 2e-3) -> Path:
    """Train the pink adapter on the pipeline folder ``base`` (resumable in ``work``) and write it to ``out``."""
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
                          lr=lr, params=params, train_text=False, ema_decay=0.99)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(torch.float16) for k, v in peft_state_dict(dit).items()}
    save_file(state, out, metadata={"format": "pt", "twig_recipe": "python -m training demo --stage lora"})
    log(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return out
