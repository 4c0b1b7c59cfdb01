"""Score a text-to-image model on held-out demo prompts with the pixel evaluator, English and Chinese."""

from __future__ import annotations

import torch

from twig_core.image import model_to_pil
from twig_core.pipeline import sample_latents
from twig_core.step_cache import Evaluations

from .evaluate import by_order, eval_prompts, evaluate_sets, format_report
from .scenes import stated_order


@torch.no_grad()
def generate_batch(parts, prompts: list[str], seed: int, steps: int, cfg: float, size: int = 128, batch: int = 32,
                   **fewer):
    """Pictures (PIL) for ``prompts``; picture i uses noise from seed + i // batch, row i % batch. ``fewer``:
    ``cache``, ``cfg_interval`` and ``stats`` for ``sample_latents``."""
    text, out = parts.text_encoder, []
    uncond = text.encode([""], use_instruction=False)
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        cond = text.encode(chunk, max_length=min(300, 2 + max(text.count_tokens(p) for p in chunk)))
        lat = sample_latents(parts.transformer, cond, uncond, width=size, height=size, batch_size=len(chunk),
                             steps=steps, cfg=cfg, seed=seed + start // batch, **fewer)
        out += model_to_pil(parts.vae.decode(lat))
    return out


def evaluate_demo(parts, records: list[dict], n: int = 100, steps: int = 20, cfg: float = 4.5, seed: int = 0,
                  style: str = "long", cache: float = 0.0, cfg_interval: tuple[float, float] | None = None) -> dict:
    """{"summary": accuracies per category and language + agreement + transformer evaluations, "text": a
    printable table}. ``cache`` / ``cfg_interval``: the sampler's options for fewer evaluations."""
    prompts = eval_prompts(records[:n], style)
    stats = Evaluations()
    fewer = dict(cache=cache, cfg_interval=cfg_interval, stats=stats)
    en = generate_batch(parts, [p["en"] for p in prompts], seed, steps, cfg, **fewer)
    zh = generate_batch(parts, [p["zh"] for p in prompts], seed, steps, cfg, **fewer)
    rep = evaluate_sets([p["scene"] for p in prompts], en, zh, [p["check_background"] for p in prompts])
    rep["by_order"] = by_order([stated_order(p["en"]) for p in prompts], rep["results_en"], rep["results_zh"])
    summary = {lang: {cat: v["accuracy"] for cat, v in rep[lang].items()} for lang in ("en", "zh")}
    summary["agreement"] = rep["agreement"]
    summary["position_by_relation_order"] = rep["by_order"]
    summary.update(n=len(prompts), steps=steps, cfg=cfg, style=style, cache=cache, cfg_interval=cfg_interval,
                   evaluations={"computed": stats.computed, "full": stats.full, "ratio": stats.ratio})
    return {"summary": summary, "text": f"{format_report(rep)}\n{stats}", "images_en": en, "images_zh": zh, "report": rep}
