"""TIPO prompt expansion node: a few tags and/or a sentence in, a long, detailed prompt out (twig_core.tipo)."""

from __future__ import annotations

import os

from twig_core.catalog import TIPO_EXTENSIONS
from twig_core.devices import DTYPE_CHOICES, MAX_SEED
from twig_core.errors import TwigError
from twig_core.tipo import (DEFAULT_FORMAT, FORMAT_PRESETS, LENGTHS, TASKS, Sampling, TipoModel, expand,
                            load_tag_lists, tag_list_folders)

from . import host
from .common import CATEGORY, node_errors

LLM_FOLDER = "LLM"
NO_MODEL = "none (format only)"
CUSTOM_FORMAT = "custom (format below)"

# The model in use stays loaded between runs (one at a time); ComfyUI's model manager may still move it off
# the GPU when another model needs the room, and Twig Unload Models releases it.
_KEEP: dict[str, host.ManagedModel] = {}


def _register() -> None:
    host.register_folder(LLM_FOLDER)


def model_choices() -> list[str]:
    """TIPO models in models/LLM (folders with config.json, or .safetensors files), then the format-only entry."""
    _register()
    return host.list_models([LLM_FOLDER], extensions=TIPO_EXTENSIONS) + [NO_MODEL]


def load_model(name: str, device: str = "default", dtype: str = "auto") -> host.ManagedModel:
    """The ManagedModel for a models/LLM entry, kept loaded for the next run."""
    _register()
    path = host.resolve_model(name, [LLM_FOLDER])
    load_dev, offload_dev = host.devices("text", device)
    dt = host.pick_dtype(dtype, load_dev, "tipo")
    model = host.cached_model(
        "tipo", path, dt, load_dev, offload_dev,
        lambda dev: TipoModel.from_pretrained(path, dtype=dt, device=dev),
        module_of=lambda tipo: tipo.model,
    )
    _KEEP.clear()
    _KEEP["model"] = model
    return model


def tag_lists_for(model_path: str | None):
    """Tag lists from ``<model>/tag-list``, ``models/LLM/tag-list`` or an installed TIPO-KGen, else built in."""
    search = []
    if model_path:
        search.append(model_path if os.path.isdir(model_path) else os.path.dirname(model_path))
    search += host.folder_paths_for(LLM_FOLDER)
    return load_tag_lists(tag_list_folders(search))


class TwigTIPO:
    DESCRIPTION = ("Expands a few tags and/or a short English sentence into a long, detailed prompt with a TIPO "
                   "model (models/LLM), seeded and offline. A Chinese sentence is passed through unchanged "
                   "(TIPO reads English only). 'none (format only)' just formats the input.")

    @classmethod
    def INPUT_TYPES(cls):
        lengths = list(LENGTHS)
        return {
            "required": {
                "tags": ("STRING", {"multiline": True, "default": "", "dynamicPrompts": False, "tooltip": "Comma-separated tags (Danbooru style); (tag:1.2) weights are kept. Write artist:name / character:name / copyright:name to set a category."}),
                "nl_prompt": ("STRING", {"multiline": True, "default": "", "dynamicPrompts": False, "tooltip": "A short sentence (English). A Chinese sentence is kept as written and not sent to TIPO."}),
                "ban_tags": ("STRING", {"multiline": True, "default": "", "tooltip": "Comma-separated tags to remove from the result: a tag goes if it contains an entry, or an entry matches it as a regular expression."}),
                "format_preset": (list(FORMAT_PRESETS) + [CUSTOM_FORMAT], {"default": DEFAULT_FORMAT, "tooltip": "How the categories are written into the prompt; 'custom' uses the format text below."}),
                "format": ("STRING", {"multiline": True, "default": FORMAT_PRESETS[DEFAULT_FORMAT], "tooltip": "Used with 'custom': placeholders <|special|> <|characters|> <|copyrights|> <|artist|> <|general|> <|generated|> <|extended|> <|quality|> <|meta|> <|rating|>."}),
                "width": ("INT", {"default": 1024, "min": 64, "max": 16384, "step": 32, "tooltip": "Image width: TIPO is told the aspect ratio."}),
                "height": ("INT", {"default": 1024, "min": 64, "max": 16384, "step": 32, "tooltip": "Image height: TIPO is told the aspect ratio."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True, "tooltip": "The same seed gives the same prompt."}),
                "tag_length": (lengths, {"default": "long", "tooltip": "Tag count target: very_short 6-18, short 18-36, long 36-54, very_long 54-72."}),
                "nl_length": (lengths, {"default": "long", "tooltip": "Sentence count target: very_short 1-2, short 2-4, long 4-8, very_long 8+."}),
                "task": (["auto", "none"] + list(TASKS), {"default": "auto", "tooltip": "auto: TIPO's passes for this input. Otherwise one pass of this task (none: extend the tags)."}),
                "temperature": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 2.0, "step": 0.01, "tooltip": "0 = always the most likely token."}),
                "top_p": ("FLOAT", {"default": 0.95, "min": 0.01, "max": 1.0, "step": 0.01}),
                "top_k": ("INT", {"default": 80, "min": 0, "max": 1000, "tooltip": "0 = off."}),
                "min_p": ("FLOAT", {"default": 0.05, "min": 0.0, "max": 0.99, "step": 0.01, "tooltip": "0 = off."}),
                "max_new_tokens": ("INT", {"default": 512, "min": 16, "max": 2048, "tooltip": "Most tokens one pass may write."}),
                "model": (model_choices(), {"tooltip": "A TIPO model in models/LLM (folder with config.json, weights and tokenizer), or format only."}),
                "device": (["default", "cpu", "gpu"], {"default": "default"}),
                "dtype": (list(DTYPE_CHOICES), {"default": "auto", "tooltip": "auto: bf16/fp16 on GPU, fp32 on CPU."}),
            }
        }

    RETURN_TYPES = ("STRING", "STRING", "STRING", "STRING")
    RETURN_NAMES = ("prompt", "user_prompt", "unformatted_prompt", "parts_json")
    OUTPUT_TOOLTIPS = (
        "The expanded prompt, formatted: connect to Twig Text Encode.",
        "Your own input, formatted the same way (no model).",
        "Your tags, the new tags, then the description on its own line (no format).",
        "JSON: every category of the expanded ('tipo') and your ('user') prompt, passes run, notes.",
    )
    FUNCTION = "expand"
    CATEGORY = CATEGORY

    @node_errors("Twig TIPO")
    def expand(self, tags="", nl_prompt="", ban_tags="", format_preset=DEFAULT_FORMAT, format="", width=1024,
               height=1024, seed=0, tag_length="long", nl_length="long", task="auto", temperature=0.5,
               top_p=0.95, top_k=80, min_p=0.05, max_new_tokens=512, model=NO_MODEL, device="default",
               dtype="auto"):
        if format_preset == CUSTOM_FORMAT:
            template = format
        elif format_preset in FORMAT_PRESETS:
            template = FORMAT_PRESETS[format_preset]
        else:
            raise TwigError(f"unknown format preset {format_preset!r}")
        tipo, path = None, None
        if model != NO_MODEL:
            managed = load_model(model, device, dtype)
            path = managed.path
        lists = tag_lists_for(path)
        if model != NO_MODEL:
            tipo = managed.get()
        host.check_interrupt()
        progress = host.Progress(int(max_new_tokens))

        def step(n):
            host.check_interrupt()
            progress.update(min(n, int(max_new_tokens)))

        result = expand(
            tipo, tags, nl_prompt, ban_tags=ban_tags, format=template, width=int(width), height=int(height),
            seed=int(seed), tag_length=tag_length, nl_length=nl_length, task=task,
            sampling=Sampling(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                              min_p=float(min_p), max_new_tokens=int(max_new_tokens)),
            lists=lists, callback=step if tipo is not None else None,
        )
        return {"ui": {"text": [result.prompt]},
                "result": (result.prompt, result.user_prompt, result.unformatted, result.parts_json())}
