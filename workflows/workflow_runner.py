"""Run an API-form workflow (the JSON ComfyUI's POST /prompt takes) through the pack's node classes, without
ComfyUI: nodes run in dependency order, each called the way ComfyUI calls it (an instance, its FUNCTION, the
inputs its INPUT_TYPES declares). The few core ComfyUI nodes the example workflows use are replaced by small
stand-ins (``STANDINS``) that do the same thing on tensors. build.py renders the demo workflows' previews
with it and the tests run every workflow with it; the pack itself never imports it.

Also: ``with_models`` swaps the loader choices of a workflow for other model names (the tiny test models), so a
workflow made for the real weights can be run end to end on a CPU.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def dependency_order(api: dict) -> list[str]:
    """Node ids so that every node comes after the nodes it reads from (ties: by numeric id)."""
    deps = {nid: {v[0] for v in entry["inputs"].values() if is_link(v)} for nid, entry in api.items()}
    missing = {d for ds in deps.values() for d in ds if d not in api}
    if missing:
        raise ValueError(f"links to nodes that are not in the workflow: {sorted(missing)}")
    key = lambda n: (int(n) if n.isdigit() else 10**9, n)  # noqa: E731
    ready = deque(sorted((n for n, d in deps.items() if not d), key=key))
    done: list[str] = []
    while ready:
        n = ready.popleft()
        done.append(n)
        for m in sorted(deps, key=key):
            if n in deps[m]:
                deps[m].discard(n)
                if not deps[m] and m not in done and m not in ready:
                    ready.append(m)
    if len(done) != len(api):
        raise ValueError("the workflow has a cycle")
    return done


# --------------------------------------------------------------------------------------------------
# Stand-ins for core ComfyUI nodes (same inputs and outputs as ComfyUI's, tensors only)


class LoadImage:
    """ComfyUI's LoadImage: a file from the input folder -> IMAGE [1,H,W,3] 0..1 and MASK [1,H,W]."""

    input_dir = os.environ.get("COMFY_INPUT_DIR", "")
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": (sorted(os.listdir(cls.input_dir)) if os.path.isdir(cls.input_dir) else [],)}}

    def load_image(self, image):
        with Image.open(os.path.join(self.input_dir, image)) as im:
            rgba = im.convert("RGBA")
        arr = torch.from_numpy(np.asarray(rgba).astype(np.float32) / 255.0)
        return arr[None, :, :, :3], 1.0 - arr[None, :, :, 3]


class SaveImage:
    """ComfyUI's SaveImage, keeping the images in memory (``saved``) instead of writing files."""

    saved: list[tuple[str, torch.Tensor]] = []
    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})}}

    def save_images(self, images, filename_prefix="ComfyUI"):
        SaveImage.saved.append((filename_prefix, images))
        return {"ui": {"images": [{"filename": f"{filename_prefix}_{i:05}_.png"} for i in range(images.shape[0])]}}


class PreviewImage(SaveImage):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}}

    def save_images(self, images):
        return super().save_images(images, "preview")


class PreviewAny:
    RETURN_TYPES = ()
    FUNCTION = "main"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"source": ("*", {})}}

    def main(self, source=None):
        return {"ui": {"text": [str(source)]}}


class ImageScale:
    """ComfyUI's "Upscale Image" (no crop; bilinear/bicubic/area/nearest; lanczos through PIL)."""

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "upscale"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "upscale_method": (["nearest-exact", "bilinear", "area", "bicubic", "lanczos"],),
                             "width": ("INT", {"default": 512}), "height": ("INT", {"default": 512}),
                             "crop": (["disabled", "center"],)}}

    def upscale(self, image, upscale_method, width, height, crop="disabled"):
        if upscale_method == "lanczos":
            out = []
            for im in image:
                pil = Image.fromarray((im.clamp(0, 1).numpy() * 255).round().astype(np.uint8))
                out.append(torch.from_numpy(np.asarray(pil.resize((width, height), Image.LANCZOS)).astype(np.float32) / 255))
            return (torch.stack(out),)
        mode = {"nearest-exact": "nearest-exact", "bilinear": "bilinear", "area": "area", "bicubic": "bicubic"}[upscale_method]
        x = image.movedim(-1, 1)
        y = F.interpolate(x, size=(height, width), mode=mode)
        return (y.movedim(1, -1).clamp(0, 1),)


STANDINS = {"LoadImage": LoadImage, "SaveImage": SaveImage, "PreviewImage": PreviewImage, "PreviewAny": PreviewAny,
            "ImageScale": ImageScale}


# --------------------------------------------------------------------------------------------------


def _declared(cls) -> set[str]:
    spec = cls.INPUT_TYPES()
    return {name for section in ("required", "optional") for name in spec.get(section, {})}


def execute(api: dict, node_classes: dict[str, type], standins: dict[str, type] | None = None) -> tuple[dict, dict]:
    """Run every node; returns ({node id: output tuple}, {node id: its "ui" dict, for nodes that return one})."""
    standins = STANDINS if standins is None else standins
    results: dict[str, tuple] = {}
    ui: dict[str, Any] = {}
    for nid in dependency_order(api):
        entry = api[nid]
        cls = node_classes.get(entry["class_type"]) or standins.get(entry["class_type"])
        if cls is None:
            raise KeyError(f"node {nid}: no class for {entry['class_type']!r}")
        declared = _declared(cls)
        kwargs = {}
        for name, value in entry["inputs"].items():
            if name not in declared:
                continue  # e.g. the frontend's "upload" button value; ComfyUI ignores it too
            kwargs[name] = results[value[0]][value[1]] if is_link(value) else value
        out = getattr(cls(), cls.FUNCTION)(**kwargs)
        if isinstance(out, dict):
            if out.get("ui") is not None:
                ui[nid] = out["ui"]
            out = out.get("result", ())
        results[nid] = tuple(out) if out is not None else ()
    return results, ui


LOADER_FIELDS = {"TwigModelLoader": ("model_name", "model"), "TwigTextEncoderLoader": ("text_encoder_name", "text_encoder"),
                 "TwigVAELoader": ("vae_model", "vae"), "TwigTIPO": ("model", "tipo")}


def with_models(api: dict, names: dict[str, str], **overrides) -> dict:
    """A copy of ``api`` whose loaders use ``names`` ({"model", "text_encoder", "vae", "tipo"} -> choice).

    ``overrides``: {class_type: {input: value}} applied to every node of that class (e.g. fewer steps)."""
    import copy

    out = copy.deepcopy(api)
    for entry in out.values():
        field = LOADER_FIELDS.get(entry["class_type"])
        if field and field[1] in names:
            entry["inputs"][field[0]] = names[field[1]]
        for name, value in overrides.get(entry["class_type"], {}).items():
            if name in entry["inputs"] and not is_link(entry["inputs"][name]):
                entry["inputs"][name] = value
    return out
