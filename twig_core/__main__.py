"""Command line: ``python -m twig_core generate --prompt "..." --out image.png`` for one image,
``python -m twig_core batch PROMPTS --out DIR`` for a prompt file (also under ``torchrun``),
``python -m twig_core convert IN OUT --type q8_0`` for smaller weights (GGUF or fp8; ``twig_core.convert``)."""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a script, ``python /path/to/pack/twig_core ...``
    import os as _os, runpy as _runpy, sys as _sys  # noqa: E401  (the pack root replaces this folder on sys.path)

    _sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _runpy.run_module("twig_core", run_name="__main__", alter_sys=True)
    raise SystemExit

import argparse
import sys
import time
from pathlib import Path

from .catalog import DEMO_NAME, demo_dir, demo_location
from .devices import DTYPE_CHOICES, OFFLOAD_CHOICES, WEIGHT_DTYPE_CHOICES
from .errors import TwigError
from .presets import DEFAULT_PRESET, PRESET_NAMES
from .sampling import SAMPLERS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m twig_core", description="Twig / Sana text-to-image engine")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="text to image (or image to image with --image)")
    g.add_argument("--prompt", required=True, help="English or Chinese prompt")
    _generation_options(g)
    g.add_argument("--batch", type=int, default=1)
    g.add_argument("--image", help="input image for image to image")
    g.add_argument("--denoise", type=float, default=0.6, help="strength for --image (0 … 1)")
    g.add_argument("--out", default="twig.png", help="output PNG (batch > 1 adds _1, _2 …)")
    g.add_argument("--keep-loaded", action="store_true",
                   help="load all three networks before starting (the default loads each only for its stage and "
                        "drops it after: Gemma-2, then the transformer, then the VAE; peak memory is the largest "
                        "one, not the sum)")
    b = sub.add_parser("batch", help="a prompt file (.txt, .jsonl, .csv) to one PNG per image; under torchrun the "
                       "processes share the work")
    b.add_argument("prompts", help="prompt file: .txt (a prompt a line), .jsonl or .csv with per-row overrides")
    b.add_argument("--out", required=True, help="output folder (resumable: complete images are kept)")
    _generation_options(b)
    b.add_argument("--count", type=int, default=1, help="images per row unless the row says")
    b.add_argument("--eval", action="store_true", help="score rows that carry a demo scene (python -m training.score)")
    c = sub.add_parser("convert", help="a transformer or Gemma-2 checkpoint to GGUF (quantized) or fp8 safetensors")
    c.add_argument("src", help="any checkpoint file or folder the loader reads")
    c.add_argument("out", help="output .gguf (or .safetensors for --type fp8)")
    c.add_argument("--type", required=True, choices=["q8_0", "q6_k", "q5_k_m", "q5_0", "q4_k_m", "q4_0", "f16", "bf16", "fp8"])
    return p


def _generation_options(g: argparse.ArgumentParser) -> None:
    g.add_argument("--negative", default="", help="negative prompt")
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--cfg", type=float, default=4.5)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--width", type=int, default=None, help="pixels, multiple of 32 (default: the model's native size)")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--sampler", default=SAMPLERS[0], choices=SAMPLERS)
    g.add_argument("--shift", type=float, default=3.0)
    g.add_argument("--cache", type=float, default=None, metavar="THRESH",
                   help="step cache: reuse the later blocks' work while the first block's change stays under THRESH "
                        "(relative, 0 … 1), never two steps in a row (0 = off; default: the preset's, 0.25 in fast, "
                        "else off)")
    g.add_argument("--cfg-interval", default=None, metavar="LO,HI",
                   help="guidance only while LO <= sigma <= HI; other steps run the prompt alone (one pass, not two)")
    g.add_argument("--max-length", type=int, default=300, help="prompt tokens kept (300 … 1200)")
    g.add_argument("--transformer", help="transformer checkpoint (file, .gguf or diffusers folder), or a pipeline folder "
                   f"(default: the embedded demo model, {DEMO_NAME}; $TWIG_DEMO_DIR moves it)")
    g.add_argument("--text-encoder", help="Gemma-2 folder or single file (.safetensors or .gguf)")
    g.add_argument("--vae", help="DC-AE file or folder")
    g.add_argument("--preset", default=None, choices=PRESET_NAMES,
                   help=f"precision preset (default {DEFAULT_PRESET}): quality = fp32; balanced = bf16 where the "
                        "device has it natively (fp16 on older GPUs, fp32 on other CPUs); fast = the step cache, "
                        "with int8 products on a CPU. --dtype / --weight-dtype / --cache given as well win")
    g.add_argument("--dtype", default=None, choices=DTYPE_CHOICES, help="compute dtype (default: the preset's)")
    g.add_argument("--weight-dtype", default=None, choices=WEIGHT_DTYPE_CHOICES,
                   help="the transformer's weights in memory: same as --dtype, as stored in the file, fp16/bf16 "
                        "(half the memory of fp32 while computing in --dtype), or int8 (CPU: fp16-held weights "
                        "whose large products run in int8)")
    g.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:1, mps … (default: cuda, else mps, when available)")
    g.add_argument("--offload", default="auto", choices=OFFLOAD_CHOICES,
                   help="keep only the running network on the GPU (Gemma-2, then the transformer, then the VAE); "
                        "auto: on CUDA cards under 14 GiB (generate without --keep-loaded holds one at a "
                        "time anyway)")
    g.add_argument("--tile", default="auto", help="VAE tile size in latent pixels, 'auto' or 'none'")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="apply a LoRA (diffusers/PEFT, kohya or OneTrainer file; or a demo LoRA by name, e.g. "
                        "twig_demo_pink) at a strength (default 1); repeatable, stacked in order")


def _load(a: argparse.Namespace, device: str | None = None, lazy: bool = False):
    """The three networks the options name (the embedded demo model by default), loaded once; ``lazy``: each
    when its stage comes (``loader.load_parts``), its files checked now."""
    from . import loader
    from .devices import pick_device, when_loaded
    from .quant import quant_summary

    device = pick_device(device or a.device)
    _apply_preset(a, device)
    transformer_path = a.transformer
    if transformer_path is None:
        transformer_path = demo_dir()
        if transformer_path is None:
            raise TwigError(f"no --transformer given and the embedded demo model is missing "
                            f"({demo_location()})")
        print(f"using {DEMO_NAME} ({transformer_path}); it knows simple coloured shapes", file=sys.stderr)
    parts = loader.load_parts(transformer_path, a.text_encoder, a.vae, dtype=a.dtype, device=device,
                              weight_dtype=a.weight_dtype, offload=a.offload, lazy=lazy)

    def say(what, model):
        if quant_summary(model):
            print(f"{what} weights: {quant_summary(model)}", file=sys.stderr)

    when_loaded(parts.transformer, lambda model: say("transformer", model))
    when_loaded(parts.text_encoder, lambda encoder: say("text encoder", encoder.model))
    return parts


def _apply_preset(a: argparse.Namespace, device) -> None:
    """Fill the options the user left unset from the preset (resolved for ``device``)."""
    from .presets import resolve

    preset = resolve(a.preset or DEFAULT_PRESET, device)
    a.dtype = a.dtype or preset.dtype
    a.weight_dtype = a.weight_dtype or preset.weight_dtype
    for name in ("cache", "cfg_interval"):  # sampler shortcuts
        if getattr(a, name, None) is None:
            setattr(a, name, getattr(preset, name))


def _generate(a: argparse.Namespace) -> list[Path]:
    from PIL import Image
    from tqdm import tqdm

    from . import image as img
    from .catalog import find_lora
    from .devices import when_loaded
    from .lora import apply_loras, parse_lora_arg, read_lora
    from .pipeline import generate
    from .step_cache import Evaluations

    _check(a, denoise=a.denoise if a.image else None)
    loras = [(read_lora(find_lora(f)), s) for f, s in map(parse_lora_arg, a.lora)]  # read before any network
    if a.image and not Path(a.image).is_file():
        raise TwigError(f"--image {a.image}: no such file")
    parts = _load(a, lazy=not a.keep_loaded)
    transformer, text_encoder, vae = parts.transformer, parts.text_encoder, parts.vae
    applied = []  # the LoRA stack as applied, for the PNG's metadata

    def with_loras(model):
        applied[:] = apply_loras(model, loras)

    when_loaded(transformer, with_loras)
    native = transformer.config.sample_size * 32
    width, height = a.width or native, a.height or native
    init = None
    if a.image:
        pic = Image.open(a.image)
        init = img.pil_to_model(pic.resize((width, height), Image.LANCZOS))
    total = a.steps if init is None else max(1, round(a.steps * a.denoise))
    when_loaded(text_encoder, lambda encoder: _warn_truncation(encoder, a.prompt, a.negative if a.cfg != 1.0 else None,
                                                               a.max_length))
    bars = []  # the progress bar opens with the transformer, after what loading the other networks prints

    def open_bar(model):
        bars.append(tqdm(total=total, desc="sampling", unit="step", file=sys.stderr))

    when_loaded(transformer, open_bar)
    started, stats = time.perf_counter(), Evaluations()
    try:
        images = generate(
            transformer, vae, text_encoder, a.prompt, a.negative, width=width, height=height, batch_size=a.batch,
            steps=a.steps, cfg=a.cfg, seed=a.seed, sampler=a.sampler, shift=a.shift, max_length=a.max_length,
            image=init, denoise=a.denoise if init is not None else 1.0, tile_size=_tile(a.tile),
            callback=lambda info: bars[-1].update(1), residency=parts.residency, cache=a.cache,
            cfg_interval=a.cfg_interval, stats=stats,
        )
    finally:
        for bar in bars:
            bar.close()
    saved = f"; {stats}" if stats.computed < stats.full else ""
    print(f"done in {time.perf_counter() - started:.1f}s{saved}", file=sys.stderr)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for i, pic in enumerate(img.model_to_pil(images)):
        path = out if i == 0 else out.with_name(f"{out.stem}_{i}{out.suffix}")
        pic.save(path, pnginfo=img.png_info(a.prompt, a.negative, a.steps, a.cfg, a.seed, a.sampler, width, height,
                                                   batch_index=i, loras=applied))
        written.append(path)
        print(path)
    return written


def _batch(a: argparse.Namespace) -> int:
    from . import batch
    from .lora import parse_lora_arg

    _check(a)
    defaults = batch.Defaults(negative=a.negative, seed=a.seed, width=a.width, height=a.height, steps=a.steps,
                              cfg=a.cfg, sampler=a.sampler, shift=a.shift, count=a.count,
                              loras=tuple(parse_lora_arg(x) for x in a.lora))
    jobs, bad = batch.read_jobs(a.prompts, defaults)
    world = batch.join_world(a.device)
    try:
        device = a.device
        if world.size > 1 and device in ("auto", "cuda"):
            import torch

            if torch.cuda.is_available():
                device = f"cuda:{world.local_rank}"
        if world.rank == 0:
            for row in bad:
                print(f"error: {a.prompts} {row}", file=sys.stderr)
        draw = None
        if jobs:
            parts = _load(a, device)
            if world.rank == 0:
                for job in jobs:
                    if job.k == 0:
                        _warn_truncation(parts.text_encoder, job.prompt, job.negative if job.cfg != 1.0 else None,
                                         a.max_length, f"{a.prompts} line {job.line}: ")
            draw = batch.drawer(parts, max_length=a.max_length, tile_size=_tile(a.tile),
                                lora_root=Path(a.prompts).parent, cache=a.cache, cfg_interval=a.cfg_interval)
        counts = batch.run(jobs, a.out, draw, world)
        if world.rank == 0:
            print(f"{len(jobs)} images in {a.out} ({counts['drawn']} drawn by rank 0, "
                  f"{counts['skipped']} already there)", file=sys.stderr)
            if a.eval:
                print(batch.evaluate(a.prompts, a.out))
    finally:
        batch.leave_world(world)
    return 1 if bad else 0


def _check(a: argparse.Namespace, denoise: float | None = None) -> None:
    """The nodes' ranges for the options, before any model loads; --cfg-interval becomes a pair."""
    from .sampling import check_settings, parse_cfg_interval
    from .text import check_max_length

    a.cfg_interval = parse_cfg_interval(a.cfg_interval)
    check_settings(steps=a.steps, cfg=a.cfg, denoise=denoise, shift=a.shift, width=a.width, height=a.height,
                   seed=a.seed, cache=a.cache)
    check_max_length(a.max_length)


def _warn_truncation(text_encoder, prompt: str, negative: str | None, max_length: int, where: str = "") -> None:
    for line in text_encoder.truncation_warnings(prompt, negative, max_length):
        print(f"warning: {where}{line}", file=sys.stderr)


def _tile(value: str):
    if value in ("auto", "none"):
        return None if value == "none" else "auto"
    if not value.isdigit():
        raise TwigError(f"--tile must be a number of latent pixels, 'auto' or 'none', got {value!r}")
    return int(value)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "generate":
            _generate(args)
        elif args.command == "batch":
            return _batch(args)
        elif args.command == "convert":
            from .convert import convert

            print(convert(args.src, args.out, args.type))
        return 0
    except TwigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
