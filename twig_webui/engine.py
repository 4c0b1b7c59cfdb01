"""The tab's work without any gradio: what the pickers list, the loaded models, and one generation run.

Everything here calls twig_core (loader, pipeline, tipo, face, image); the gradio layer (``ui.py``) only
turns widget values into a :class:`Settings` and shows a :class:`Result`. Tests drive this module directly.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import logging
import os
import random
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from twig_core import catalog
from twig_core.errors import TwigError
from twig_core.presets import DEFAULT_PRESET, PRESET_NAMES, resolve as resolve_preset
from twig_core.sampling import SAMPLERS

from .host import Host

log = logging.getLogger("twig")

FROM_MODEL = "(from the model)"
RANDOM_SEEDS = 2**32  # a random seed is drawn below this, as the WebUI does (any seed up to 2**64 - 1 is accepted)

Progress = Callable[[float, str], None]


class Interrupted(TwigError):
    """The user pressed Interrupt (the tab's button or the WebUI's)."""


@dataclass
class Settings:
    prompt: str
    negative: str = ""
    size: str = ""  # "WxH" from size_choices(); "" = the model's native square
    steps: int = 20
    cfg: float = 4.5
    seed: int = -1  # -1 = random
    sampler: str = SAMPLERS[0]
    batch_size: int = 1
    model: str = ""  # a name from Catalog.models(); "" = the demo model / first one
    text_encoder: str = FROM_MODEL
    vae: str = FROM_MODEL
    dtype: str = DEFAULT_PRESET  # a precision preset (twig_core.presets) or a compute dtype ("auto", "fp32" …)
    max_length: int = 300
    tipo: bool = False
    tipo_model: str = ""
    tipo_length: str = "long"  # very_short, short, long, very_long: tag and sentence length targets
    tipo_max_tokens: int = 512  # most tokens one TIPO pass may write
    face: bool = False
    face_detector: str = ""
    face_denoise: float = 0.4
    cache: float = 0.0  # step-cache threshold, 0 = off (twig_core.step_cache); 0 with a preset: the preset's
    cfg_interval: tuple[float, float] | None = None  # guidance only for sigmas lo … hi; None = always (or the preset's)


@dataclass
class Result:
    paths: list[str]  # saved PNGs, parameters in their "parameters" text chunk
    infotext: str  # the first image's parameters, as stored
    seed: int
    prompt: str  # the prompt the image was made from (after TIPO)
    width: int
    height: int
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------------
# What the pickers list


class Catalog:
    """Name -> path for each picker, read from the host's model folders on every call (Refresh)."""

    def __init__(self, host: Host):
        self.host = host

    def _listed(self, role: str, kinds: tuple[str, ...]) -> dict[str, str]:
        return catalog.listing(self.host.folders(role), kinds=kinds)

    def models(self) -> dict[str, str]:
        out = catalog.with_demo({})
        for path in self.host.extra_models:  # --model PATH: shown by its name, the full path if names clash
            name = os.path.basename(path.rstrip("/\\")) + ("/" if os.path.isdir(path) else "")
            out.setdefault(name if name not in out else path, path)
        out.update({k: v for k, v in self._listed("model", ("transformer", "pipeline")).items() if k not in out})
        return out

    def text_encoders(self) -> dict[str, str]:
        return {FROM_MODEL: "", **self._listed("text_encoder", ("text_encoder", "pipeline"))}

    def vaes(self) -> dict[str, str]:
        return {FROM_MODEL: "", **self._listed("vae", ("vae", "pipeline"))}

    def tipo_models(self) -> dict[str, str]:
        return catalog.listing(self.host.folders("llm"), catalog.TIPO_EXTENSIONS)

    def loras(self) -> dict[str, str]:
        """LoRA files by name, also by name without extension (what ``<lora:NAME:0.8>`` in a prompt gives)."""
        out = catalog.lora_listing(self.host.folders("lora"))
        for name, path in list(out.items()):
            out.setdefault(os.path.splitext(name)[0], path)
        return out

    def face_detectors(self) -> dict[str, str]:
        from twig_core.face import detect as fdetect

        out = {n: n for n, why in fdetect.available_detectors().items() if why is None}
        for name, path in catalog.listing(self.host.folders("face"), fdetect.YOLO_EXTENSIONS, folders=False).items():
            out.setdefault(name, path)
        return out

    def resolve(self, role: str, name: str) -> str:
        table = {"model": self.models, "text_encoder": self.text_encoders, "vae": self.vaes,
                 "tipo": self.tipo_models, "face": self.face_detectors, "lora": self.loras}[role]()
        if name in table:
            return table[name]
        if name and os.path.exists(name) and role == "model":
            return os.path.abspath(name)
        hint = self.host.folder_hint({"tipo": "llm"}.get(role, role))
        what = {"model": "Twig model", "text_encoder": "text encoder", "vae": "VAE", "tipo": "TIPO model",
                "face": "face detector", "lora": "LoRA"}[role]
        if not name:
            raise TwigError(f"no {what} selected; put one in {hint} and press Refresh")
        raise TwigError(f"{what} {name!r} not found (looked in {', '.join(self.host.folders(role if role != 'tipo' else 'llm'))}); "
                        f"press Refresh")


# --------------------------------------------------------------------------------------------------
# Sizes


def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[x×*]\s*(\d+)\s*", text or "")
    if not m:
        raise TwigError(f"size must look like 1024x1024 (width x height), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def size_choices(native: int) -> list[str]:
    """Sana's aspect-ratio buckets scaled to the model's native size, as "WxH", square first."""
    from twig_core.resolution import bins

    sizes = [f"{w}x{h}" for h, w in bins(native)]
    square = f"{native}x{native}"
    return [square] + [s for s in sizes if s != square]


def nearest_choice(choices: list[str], current: str) -> str:
    try:
        w, h = parse_size(current)
    except TwigError:
        return choices[0]
    return min(choices, key=lambda c: abs(parse_size(c)[0] / parse_size(c)[1] - w / h))


_NATIVE_CACHE: dict[tuple, int] = {}


def native_size(path: str) -> int:
    """The model's training size in pixels (its config's sample_size × 32), read without loading it."""
    try:
        st = os.stat(path)
    except OSError:
        return 1024
    key = (path, st.st_mtime_ns)
    if key in _NATIVE_CACHE:
        return _NATIVE_CACHE[key]
    size = 1024
    try:
        if os.path.isdir(path):
            for cfg in (os.path.join(path, "transformer", "config.json"), os.path.join(path, "config.json")):
                if os.path.isfile(cfg):
                    with open(cfg, encoding="utf-8") as f:
                        size = int(json.load(f).get("sample_size", 32)) * 32
                    break
        else:
            from twig_core import loader
            from twig_core.config import TransformerConfig

            size = TransformerConfig.from_state_dict(loader.open_weights(path).meta_dict()).sample_size * 32
    except Exception:  # noqa: BLE001 - unknown layout: the 1024 px default
        size = 1024
    _NATIVE_CACHE[key] = size
    return size


# --------------------------------------------------------------------------------------------------
# TIPO input


_SENTENCE = re.compile(r"[.!?。！？]\s*$")


def split_prompt(prompt: str) -> tuple[str, str]:
    """(tags, sentence) for TIPO: comma-separated parts of up to four words are tags, the rest is the
    sentence. A prompt without commas is one sentence unless it is a few words. Chinese (any CJK) text is
    sentence text: TIPO passes it through unchanged."""
    from twig_core.tipo import has_cjk

    parts = [p.strip() for p in prompt.split(",") if p.strip()]
    tags, text = [], []
    for p in parts:
        if not has_cjk(p) and len(p.split()) <= 4 and not _SENTENCE.search(p) and (len(parts) > 1 or len(p.split()) <= 3):
            tags.append(p)
        else:
            text.append(p)
    return ", ".join(tags), ", ".join(text)


# --------------------------------------------------------------------------------------------------
# Running


MIN_TRANSFORMERS = (4, 44)


def check_transformers() -> None:
    """Gemma-2 arrived in transformers 4.42 and works with Sana's settings from 4.44; A1111 pins 4.30."""
    import transformers

    have = tuple(int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    if have < MIN_TRANSFORMERS:
        raise TwigError(f"transformers {transformers.__version__} is too old for the Gemma-2 text encoder; Twig needs "
                        f"transformers>=4.44 (in the WebUI's Python: pip install \"transformers>=4.44\")")


def _free_memory() -> None:
    from twig_core.devices import clear_cache

    gc.collect()
    clear_cache()


def _next_number(folder: str) -> int:
    """The WebUI's file numbering: one more than the highest "NNNNN-" prefix in the folder."""
    top = -1
    if os.path.isdir(folder):
        for n in os.listdir(folder):
            m = re.match(r"(\d+)-", n)
            if m:
                top = max(top, int(m.group(1)))
    return top + 1


class Engine:
    """Holds the loaded models between runs (one set at a time) and runs one job at a time."""

    def __init__(self, host: Host | None = None):
        self.host = host or Host()
        self.catalog = Catalog(self.host)
        self._parts = None
        self._parts_key = None
        self._tipo = None
        self._tipo_key = None
        self._stop = threading.Event()

    # -- interrupting ----------------------------------------------------------------------------
    def interrupt(self) -> None:
        self._stop.set()

    def check(self) -> None:
        if self._stop.is_set() or self.host.interrupted():
            raise Interrupted("interrupted")

    # -- models ----------------------------------------------------------------------------------
    def default_model(self) -> str:
        names = list(self.catalog.models())
        return names[0] if names else ""

    def native(self, model: str) -> int:
        if self._parts is not None and self._parts_key and self._parts_key[0] == self._model_path_or_none(model):
            return int(self._parts.transformer.config.sample_size) * 32
        path = self._model_path_or_none(model)
        return native_size(path) if path else 1024

    def _model_path_or_none(self, model: str) -> str | None:
        try:
            return self.catalog.resolve("model", model or self.default_model())
        except TwigError:
            return None

    def unload(self) -> None:
        self._parts = self._parts_key = None
        self._tipo = self._tipo_key = None
        _free_memory()

    def shortcuts(self, s: Settings) -> dict:
        """The sampler shortcuts of a run: the settings' own, else (none set) those of the chosen preset."""
        cache, interval = float(s.cache), s.cfg_interval
        if s.dtype in PRESET_NAMES and not cache and interval is None:
            preset = resolve_preset(s.dtype, self.host.device())
            cache, interval = preset.cache, preset.cfg_interval
        return {"cache": cache, "cfg_interval": interval}

    def load(self, s: Settings, progress: Progress | None = None):
        from twig_core import loader
        check_transformers()

        model = self.catalog.resolve("model", s.model or self.default_model())
        te = self.catalog.resolve("text_encoder", s.text_encoder) if s.text_encoder != FROM_MODEL else None
        vae = self.catalog.resolve("vae", s.vae) if s.vae != FROM_MODEL else None
        device = self.host.device()
        key = (model, te or None, vae or None, s.dtype, str(device))
        if key != self._parts_key:
            if progress:
                progress(0.0, f"loading {os.path.basename(model.rstrip('/'))}")
            self._parts = self._parts_key = None
            _free_memory()
            self.host.free_host_models()
            try:
                dtype, weight_dtype = s.dtype, None
                if s.dtype in PRESET_NAMES:
                    preset = resolve_preset(s.dtype, device)
                    dtype, weight_dtype = preset.dtype, preset.weight_dtype
                self._parts = loader.load_parts(model, te or None, vae or None, dtype=dtype, device=device,
                                                weight_dtype=weight_dtype, offload="auto")
            except TwigError as e:
                if "holds no" in str(e):
                    where = self.host.folder_hint("text_encoder" if "text encoder" in str(e) else "vae")
                    raise TwigError(f"{e} (pick one above; they are listed from {where})") from e
                raise
            self._parts_key = key
        return self._parts

    def _tipo_model(self, name: str, device):
        from twig_core.tipo import TipoModel

        path = self.catalog.resolve("tipo", name)
        key = (path, str(device))
        if key != self._tipo_key:
            self._tipo = TipoModel.from_pretrained(path, dtype="auto", device=device)
            self._tipo_key = key
        return self._tipo, path

    # -- one run ---------------------------------------------------------------------------------
    def run(self, s: Settings, progress: Progress | None = None) -> Result:
        self._stop.clear()
        with self.host.job("twig"):
            try:
                return self._run(s, progress or (lambda f, d: None))
            finally:
                self._stop.clear()

    def _run(self, s: Settings, progress: Progress) -> Result:
        from twig_core.lora import apply_loras, split_lora_tags
        from twig_core.pipeline import generate
        from twig_core.resolution import check_size
        from twig_core.sampling import check_seed, check_settings

        started = time.perf_counter()
        prompt, lora_tags = split_lora_tags((s.prompt or "").strip())
        if not prompt:
            raise TwigError("write a prompt first (English or Chinese)")
        lora_files = [(self.catalog.resolve("lora", name), strength) for name, strength in lora_tags]
        if s.sampler not in SAMPLERS:
            raise TwigError(f"unknown sampler {s.sampler!r}; choose {', '.join(SAMPLERS)}")
        steps, batch = int(s.steps), int(s.batch_size)
        if steps < 1 or batch < 1:
            raise TwigError("steps and batch size must be at least 1")
        check_settings(steps=steps, cfg=float(s.cfg), cache=float(s.cache), cfg_interval=s.cfg_interval)
        self.check()
        parts = self.load(s, progress)
        self.check()
        native = int(parts.transformer.config.sample_size) * 32
        width, height = parse_size(s.size) if s.size else (native, native)
        check_size(width, height)
        seed = int(s.seed) if s.seed is not None and int(s.seed) >= 0 else random.randrange(RANDOM_SEEDS)
        check_seed(seed, "seed (-1 = random)")
        notes: list[str] = []
        extra: dict = {}
        from twig_core.quant import quant_summary

        stored = [f"{what} {quant_summary(m)}" for what, m in (("transformer", parts.transformer),
                                                             ("text encoder", parts.text_encoder.model))
                  if quant_summary(m)]
        if stored:  # GGUF / fp8 files: say how the weights are held
            notes.append("weights: " + "; ".join(stored))
        loras = apply_loras(parts.transformer, lora_files)  # none: the model as loaded
        if loras:
            extra["loras"] = loras
            notes.append("LoRA: " + ", ".join(f"{n}:{w:g}" for n, w in loras))

        if s.tipo:
            user_prompt = prompt
            prompt, tipo_notes = self._expand(s, parts, prompt, width, height, seed, progress)
            notes += tipo_notes
            extra["tipo"] = {"user_prompt": user_prompt, "model": s.tipo_model}
        self.check()

        def on_step(state: dict) -> None:
            self.check()
            i = int(state["i"]) + 1
            progress(0.1 + 0.75 * i / steps, f"step {i}/{steps}")

        progress(0.1, f"step 0/{steps}")
        images = generate(
            parts.transformer, parts.vae, parts.text_encoder, prompt, s.negative or "", width=width, height=height,
            batch_size=batch, steps=steps, cfg=float(s.cfg), seed=seed, sampler=s.sampler,
            max_length=int(s.max_length), callback=on_step, residency=parts.residency, **self.shortcuts(s),
        )
        self.check()
        pixels = ((images.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).contiguous()  # [B,H,W,3] 0..1
        if s.face:
            pixels, face_note = self._face_refine(s, parts, prompt, pixels, seed, progress)
            notes.append(face_note)
            extra["face_refine"] = {"detector": s.face_detector, "denoise": float(s.face_denoise), "result": face_note}
        progress(0.98, "saving")
        paths = self._save(pixels, prompt, s, seed, width, height, extra)
        from PIL import Image

        with Image.open(paths[0]) as im:
            infotext = im.text.get("parameters", "")
        return Result(paths, infotext, seed, prompt, width, height, notes, time.perf_counter() - started)

    def _expand(self, s: Settings, parts, prompt: str, width: int, height: int, seed: int, progress: Progress):
        from twig_core.tipo import Sampling, expand, load_tag_lists, tag_list_folders

        progress(0.02, "TIPO: loading")
        tipo, path = self._tipo_model(s.tipo_model, self.host.device())
        tipo = parts.residency.use(tipo)  # with offloading, it leaves the device when Gemma-2 comes
        tags, text = split_prompt(prompt)
        search = [path if os.path.isdir(path) else os.path.dirname(path)] + self.host.folders("llm")
        lists = load_tag_lists(tag_list_folders(search))
        sampling = Sampling(max_new_tokens=int(s.tipo_max_tokens))

        def on_token(n: int) -> None:
            self.check()
            progress(0.02 + 0.08 * min(n, sampling.max_new_tokens) / sampling.max_new_tokens, f"TIPO: {n} tokens")

        result = expand(tipo, tags, text, width=width, height=height, seed=seed, sampling=sampling, lists=lists,
                        tag_length=s.tipo_length, nl_length=s.tipo_length, callback=on_token)
        return result.prompt, [f"TIPO: {n}" for n in result.notes]

    def _face_refine(self, s: Settings, parts, prompt: str, pixels, seed: int, progress: Progress):
        import torch

        from twig_core.face import detect as fdetect
        from twig_core.face import refine as frefine

        name = s.face_detector or next(iter(self.catalog.face_detectors()), "")
        if not name:
            raise TwigError("face refine is on but no face detector is installed: pip install "
                            "\"opencv-python-headless<5\" (or mediapipe==0.10.21), or put a YOLO face model in "
                            f"{self.host.folder_hint('face')}")
        spec = self.catalog.resolve("face", name)
        dev = self.host.device()
        yolo = [p for n, p in self.catalog.face_detectors().items() if n not in fdetect.BUILTIN_DETECTORS]
        det = fdetect.choose_detector(spec, yolo, device=str(dev.index or 0) if dev.type == "cuda" else dev.type)
        det.check()
        h, w = int(pixels.shape[1]), int(pixels.shape[2])
        progress(0.86, "face refine: detecting")
        found = []
        for b in range(pixels.shape[0]):
            self.check()
            found.append(frefine.select_faces(fdetect.detect_faces(pixels[b], det), w, h))
        count = sum(len(f) for f in found)
        if not count:
            return pixels, f"face refine: no face found ({det.name})"
        use = parts.residency.use
        te = use(parts.text_encoder)
        with torch.no_grad():
            cond = te.encode([prompt], max_length=int(s.max_length), use_instruction=True)
            uncond = te.encode([s.negative or ""], max_length=int(s.max_length), use_instruction=False) \
                if float(s.cfg) != 1.0 else None
        steps = int(s.steps)

        def on_step(job, state):
            self.check()
            done = job.number * steps + int(state["i"]) + 1
            progress(0.87 + 0.1 * done / (steps * count), f"face {job.number + 1}/{count}: step {int(state['i']) + 1}")

        refiner = frefine.TwigRefiner(lambda **_: use(parts.transformer), lambda **_: use(parts.vae), cond, uncond, steps=steps, cfg=float(s.cfg),
                                      seed=seed, denoise=float(s.face_denoise), sampler=s.sampler, callback=on_step)
        result = frefine.refine_faces(pixels, found, refiner, multiple=refiner.multiple,
                                      on_face=lambda job: self.check())
        note = f"face refine: {result.count} face(s) with {det.name}"
        if result.skipped:
            note += "; skipped " + "; ".join(result.skipped)
        return result.images, note

    def _save(self, pixels, prompt: str, s: Settings, seed: int, width: int, height: int, extra: dict) -> list[str]:
        import numpy as np
        from PIL import Image

        from twig_core.image import png_info

        folder = os.path.join(self.host.outdir(), _dt.date.today().isoformat())
        os.makedirs(folder, exist_ok=True)
        number = _next_number(folder)
        label = self._model_label(s)
        arr = (pixels.float().clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
        paths = []
        for i, a in enumerate(arr):
            info = png_info(prompt, s.negative or "", int(s.steps), float(s.cfg), seed, s.sampler, width, height,
                            model=label, batch_index=i, loras=extra.get("loras", ()))
            if extra:
                info.add_text("twig", json.dumps(extra, ensure_ascii=False))
            path = os.path.join(folder, f"{number + i:05d}-{seed}.png")
            Image.fromarray(a, "RGB").save(path, pnginfo=info)
            paths.append(path)
        return paths

    def _model_label(self, s: Settings) -> str:
        name = s.model or self.default_model()
        demo_labels = {catalog.DEMO_NAME: "Twig demo", catalog.DEMO_256_NAME: "Twig demo 256"}
        if name in demo_labels:
            return demo_labels[name]
        base = os.path.basename(name.rstrip("/\\"))
        return os.path.splitext(base)[0] if not name.endswith("/") else base
