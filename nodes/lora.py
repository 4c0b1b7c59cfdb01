"""LoRA nodes: "Twig LoRA Loader" stacks LoRA files (from ``models/loras``) on a TWIG_MODEL, and "Twig LoRA Loader
(native)" puts them on a core MODEL as ModelPatcher patches. Neither changes or reloads the base weights: a
strength change or a removed LoRA gives the base model back (twig_core.lora for the Twig path, ComfyUI's own
patch/unpatch for the native one)."""

from __future__ import annotations

import os

import torch

from twig_core import catalog
from twig_core.errors import TwigError
from twig_core.lora import LoraFile, apply_loras, read_lora

from . import host
from .common import CATEGORY, MODEL, NodeError, node_errors

LORA_FOLDER = "loras"
_FILES: dict[str, tuple[tuple, LoraFile]] = {}  # path -> ((size, mtime), the file read once)


def lora_names() -> list[str]:
    return list(catalog.lora_listing(host.folder_paths_for(LORA_FOLDER))) or ["(put a LoRA in models/loras)"]


def lora_file(name: str) -> LoraFile:
    """The LoRA ``name`` picked from the combo, read once per file version."""
    path = catalog.lora_listing(host.folder_paths_for(LORA_FOLDER)).get(name)
    if path is None:
        raise TwigError(f"LoRA '{name}' not found; put it in models/{LORA_FOLDER} and refresh (R)")
    st = os.stat(path)
    stamp = (st.st_size, st.st_mtime_ns)
    if path not in _FILES or _FILES[path][0] != stamp:  # a file changed on disk is read again
        _FILES[path] = (stamp, read_lora(path))
    return _FILES[path][1]


class LoraModel:
    """A TWIG_MODEL with LoRAs: the base model (a ``host.ManagedModel``, shared with every other use of it) and the
    stack of (LoraFile, strength) put on its layers whenever it is fetched with ``get()``."""

    def __init__(self, base, loras: list[tuple[LoraFile, float]]):
        self.base, self.loras = base, loras

    def __getattr__(self, name):  # kind, path, name, load_device, peek, release ... are the base model's
        if name in ("base", "loras"):  # not set yet (a copy being made)
            raise AttributeError(name)
        return getattr(self.base, name)

    def __repr__(self) -> str:
        stack = ", ".join(f"{f.name}:{s:g}" for f, s in self.loras)
        return f"{self.base!r} + LoRA {stack}"

    def get(self, memory_required: int = 0):
        transformer = self.base.get(memory_required)  # a plain ManagedModel.get() clears any stack a previous node set
        apply_loras(transformer, self.loras)
        return transformer


def stack_of(model) -> tuple:
    """(base model, LoRA stack) of a TWIG_MODEL."""
    return (model.base, list(model.loras)) if isinstance(model, LoraModel) else (model, [])


class TwigLoraLoader:
    DESCRIPTION = ("Applies a LoRA (diffusers/PEFT, kohya or OneTrainer file for Sana / Twig) to a Twig model at a "
                   "strength. Chain several to stack them. The base weights are never changed or reloaded.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (MODEL, {"tooltip": "From Twig Model Loader (or another Twig LoRA Loader)."}),
            # "lora", not core's "lora_name": ComfyUI's frontend (1.27) sends inputs of that name through its asset
            # browser check, which throws (and leaves the node unloadable) where a core loader failed to import
            "lora": (lora_names(), {"tooltip": "A LoRA file in models/loras (twig_demo_pink comes with the "
                                               "demo model)."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05,
                                   "tooltip": "Multiplies the LoRA's change; 0 is the base model."}),
        }}

    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @node_errors("Twig LoRA Loader")
    def load(self, model, lora, strength=1.0):
        base, loras = stack_of(model)
        if getattr(base, "kind", "transformer") != "transformer":
            raise NodeError(f"Twig LoRA Loader: model must come from Twig Model Loader, got {type(model).__name__}")
        return (LoraModel(base, [*loras, (lora_file(lora), float(strength))]),)


# -------------------------------------------------------------------------------------------------- native MODEL


def native_patches(lora: LoraFile) -> dict:
    """ComfyUI patches for ``lora`` on the native model (keys ``diffusion_model.<our name>.weight``; a slice of a
    fused weight as (key, (dim 0, first row, rows))), made by ComfyUI's own LoRA reader from kohya-named tensors,
    so each ComfyUI version builds the patch objects it knows."""
    from .native import comfy_name

    load_lora = comfy_name("comfy.lora", "load_lora")
    tensors, to_load = {}, {}
    for name, entries in lora.layers.items():
        for n, (index, parts, w) in enumerate(entries):
            if w.magnitude is not None:
                raise NodeError(f"{lora.path}: DoRA LoRAs run on the Twig sampler path (Twig LoRA Loader), not on "
                                "the native MODEL")
            key = f"twig.{name}.{n}"
            tensors[f"{key}.lora_up.weight"] = w.up
            tensors[f"{key}.lora_down.weight"] = w.down
            tensors[f"{key}.alpha"] = torch.tensor(w.scale * w.down.shape[0])
            target = f"diffusion_model.{name}.weight"
            rows = w.up.shape[0]
            to_load[key] = target if parts == 1 else (target, (0, index * rows, rows))
    return load_lora(tensors, to_load, log_missing=False)


def patch_native(patcher, loras) -> object:
    """A clone of the ModelPatcher ``patcher`` with every (LoraFile, strength) added as patches."""
    from twig_core.quant import quant_summary

    quantized = quant_summary(getattr(patcher.model, "diffusion_model", None))
    if quantized and loras:  # ComfyUI patches address "<layer>.weight"; these layers hold "qweight" blocks
        raise NodeError(f"Twig LoRA Loader (native MODEL): {loras[0][0].path}: the transformer keeps GGUF/fp8 "
                        f"weights ({quantized}), which ComfyUI's LoRA patches cannot reach; put the LoRA on the "
                        "Twig path (Twig LoRA Loader -> Twig Sampler), or load an fp16/bf16 transformer")
    out = patcher.clone()
    for lora, strength in loras:
        patches = native_patches(lora)
        added = out.add_patches(patches, float(strength))
        if len(added) != len(patches):
            raise NodeError(f"{lora.path}: {len(patches) - len(added)} of its patches name no weight of this MODEL "
                            "(is it a Twig native MODEL?)")
    return out


class TwigLoraLoaderNative:
    DESCRIPTION = ("Applies a Sana / Twig LoRA to the native MODEL (Twig → native MODEL) through ComfyUI's patches, "
                   "so strength changes never reload the base. Chain several to stack them.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "From Twig → native MODEL."}),
            "lora": (lora_names(), {"tooltip": "A LoRA file in models/loras."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05}),
        }}

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = f"{CATEGORY}/native"

    @node_errors("Twig LoRA Loader (native)")
    def load(self, model, lora, strength=1.0):
        return (patch_native(model, [(lora_file(lora), float(strength))]),)


NODES = {
    "TwigLoraLoader": (TwigLoraLoader, "Twig LoRA Loader"),
    "TwigLoraLoaderNative": (TwigLoraLoaderNative, "Twig LoRA Loader (native MODEL)"),
}
