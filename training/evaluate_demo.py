"""Score a text-to-image model on held-out demo prompts with the pixel evaluator, English and Chinese; and the
references it is read against: the scorer's shape classifier on the ground-truth pictures, and the same scorer on
the pictures passed through the model's DC-AE (encode, decode), which bounds what any DiT on its latents can reach,
at the demo's picture size and at the data stage's larger one."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from twig_core.image import model_to_pil
from twig_core.pipeline import sample_latents
from twig_core.step_cache import Evaluations

from .evaluate import (CATEGORIES, aggregate, by_order, check_shape_classifier, eval_prompts, evaluate_image,
                       evaluate_sets, format_report, verdicts)
from .demo import IMAGE_SIZE
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
                  style: str = "long", size: int = IMAGE_SIZE, cache: float = 0.0,
                  cfg_interval: tuple[float, float] | None = None) -> dict:
    """{"summary": accuracies per category and language + agreement + transformer evaluations, "text": a
    printable table}. Pictures drawn at another ``size`` are scored area-averaged to 128², as
    ``reference_report`` scores its reconstructions. ``cache`` / ``cfg_interval``: the sampler's options for fewer
    evaluations."""
    prompts = eval_prompts(records[:n], style)
    stats = Evaluations()
    fewer = dict(cache=cache, cfg_interval=cfg_interval, stats=stats)
    en = generate_batch(parts, [p["en"] for p in prompts], seed, steps, cfg, size, **fewer)
    zh = generate_batch(parts, [p["zh"] for p in prompts], seed, steps, cfg, size, **fewer)
    scored = [[im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX) for im in pics] for pics in (en, zh)]
    rep = evaluate_sets([p["scene"] for p in prompts], *scored, [p["check_background"] for p in prompts])
    rep["by_order"] = by_order([stated_order(p["en"]) for p in prompts], rep["results_en"], rep["results_zh"])
    summary = {lang: {cat: v["accuracy"] for cat, v in rep[lang].items()} for lang in ("en", "zh")}
    summary["agreement"] = rep["agreement"]
    summary["position_by_relation_order"] = rep["by_order"]
    summary["shape_by_name"] = rep["by_shape"]
    summary["verdicts"] = {"en": verdicts(rep["results_en"]), "zh": verdicts(rep["results_zh"])}
    summary.update(n=len(prompts), steps=steps, cfg=cfg, style=style, cache=cache, cfg_interval=cfg_interval,
                   evaluations={"computed": stats.computed, "full": stats.full, "ratio": stats.ratio})
    return {"summary": summary, "text": f"{format_report(rep)}\n{stats}", "images_en": en, "images_zh": zh,
            "report": rep}


@torch.no_grad()
def reference_report(vae, records: list[dict], images, n: int = 400, style: str = "long", batch: int = 32) -> dict:
    """The ground-truth pictures of ``records`` (uint8 [N,S,S,3], the data stage's, S a multiple of 128) scored at
    128² as they are and after an encode/decode through ``vae`` at 128² (the demo's latent grid, 4x4) and at S²
    (a finer grid; decoded, then area-averaged to 128² for the scorer), plus the shape classifier's accuracy per
    object on each: {"classifier": check_shape_classifier on the truth, "truth": aggregate, "dcae": {size:
    {"aggregate", "objects": check_shape_classifier}}, "text"}."""
    from .trainer import downsample_u8, to_model_images

    prompts = eval_prompts(records[:n], style)
    scenes, full = [p["scene"] for p in prompts], images[: len(prompts)]
    truth = downsample_u8(full, IMAGE_SIZE)
    def score(pictures) -> dict:
        return aggregate([evaluate_image(p["scene"], im, p["check_background"]) for p, im in zip(prompts, pictures)])

    out = {"classifier": check_shape_classifier(scenes, truth), "truth": score(truth), "dcae": {}}
    for src in [truth] + ([full] if full.shape[1] != IMAGE_SIZE else []):
        recon = np.concatenate([np.stack([np.asarray(im) for im in model_to_pil(
            vae.decode(vae.encode(to_model_images(src[i:i + batch]))))]) for i in range(0, len(src), batch)])
        recon = downsample_u8(recon, IMAGE_SIZE)
        out["dcae"][src.shape[1]] = {"aggregate": score(recon), "objects": check_shape_classifier(scenes, recon)}
    rows = [("shape classifier on the ground-truth pictures", out["classifier"])]
    rows += [(f"objects of the named shape through the DC-AE at {k}²", v["objects"]) for k, v in out["dcae"].items()]
    lines = [f"{what}: {c['accuracy']:.3f} of {c['n']} ("
             + ", ".join(f"{s} {v['accuracy']:.3f}" for s, v in c["by_shape"].items()) + ")" for what, c in rows]
    lines.append(f"{'category':<12}{'truth':>8}" + "".join(f"{f'DC-AE {k}':>10}" for k in out["dcae"]) + f"{'n':>6}")
    for cat in CATEGORIES:
        cells = "".join(f"{v['aggregate'][cat]['accuracy']:10.3f}" for v in out["dcae"].values())
        lines.append(f"{cat:<12}{out['truth'][cat]['accuracy']:8.3f}{cells}{out['truth'][cat]['n']:>6}")
    out["text"] = "\n".join(lines)
    return out
