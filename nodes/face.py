"""Face nodes: detect faces (boxes, masks, preview) and refine every face with the Twig model, ADetailer style."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from twig_core.catalog import scan
from twig_core.devices import MAX_SEED
from twig_core.errors import TwigError
from twig_core.face import detect as fdetect
from twig_core.face import refine as frefine
from twig_core.sampling import MAX_STEPS, SAMPLERS

from . import host
from .common import CATEGORY, CONDITIONING, MODEL, TEXT_ENCODER, VAE, NodeError, log, node_errors
from .sampling import SAMPLER_HELP

FACES = "TWIG_FACES"
FACE_CATEGORY = CATEGORY + "/face"
YOLO_KINDS = (("ultralytics_bbox", "ultralytics/bbox", "bbox/"), ("ultralytics_segm", "ultralytics/segm", "segm/"))
NO_DETECTOR = ("(no face detector installed: pip install \"opencv-python-headless<5\", "
               "or mediapipe==0.10.21, or ultralytics + a model in models/ultralytics/bbox)")
TILE_CHOICES = ["auto", "on", "fine", "off"]
TURN_CHOICES = ["auto", "on", "off"]
D = frefine.DEFAULTS


@dataclass
class FaceSet:
    """What flows through a TWIG_FACES socket: the detections of each image of a batch, best first."""

    detections: list[list[fdetect.Detection]]
    width: int
    height: int
    detector: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(len(d) for d in self.detections)

    def __repr__(self) -> str:
        return f"<Twig faces: {self.count} in {len(self.detections)} image(s), {self.detector}>"


# --------------------------------------------------------------------------------------------------
# Detector choices: installed built-ins, then YOLO models in models/ultralytics/{bbox,segm}


def _yolo_dirs(kind: str, subfolder: str) -> list[str]:
    host.register_folder(kind, subfolder)
    if host.inside_comfy():
        return host.folder_paths_for(kind)
    return [os.path.join(host.local_models_dir(), *subfolder.split("/"))]


def _yolo_files() -> dict[str, str]:
    """Combo name ("bbox/face_yolov8n.pt") -> full path."""
    out: dict[str, str] = {}
    for kind, sub, prefix in YOLO_KINDS:
        for root in _yolo_dirs(kind, sub):
            for name, path in scan(root, fdetect.YOLO_EXTENSIONS, folders=False).items():
                out.setdefault(prefix + name, path)
    return out


def detector_choices() -> list[str]:
    names = [n for n, why in fdetect.available_detectors().items() if why is None]
    names += list(_yolo_files())
    return names or [NO_DETECTOR]


def _ultralytics_device(dev: torch.device) -> str:
    """ComfyUI's device as ultralytics names it: "cpu", "mps", or the CUDA index ("0")."""
    if dev.type == "cuda":
        return str(dev.index or 0)
    return "mps" if dev.type == "mps" else "cpu"


def resolve_detector(name: str) -> fdetect.Detector:
    if name == NO_DETECTOR or not name:
        raise TwigError("no face detector is installed; " + NO_DETECTOR.strip("()"))
    files = _yolo_files()
    if name != "ensemble" and name not in fdetect.BUILTIN_DETECTORS:
        if name not in files:
            raise TwigError(f"face detector {name!r} not found; YOLO models go in models/ultralytics/bbox "
                            f"(or segm), built-in ones are {', '.join(fdetect.BUILTIN_DETECTORS)}")
        name = files[name]
    # the ensemble's extra members: YOLO face models of the bbox folder (segm holds segmentation models)
    boxes = [path for n, path in files.items() if n.startswith("bbox/")]
    det = fdetect.choose_detector(name, boxes, device=_ultralytics_device(host.default_device()))
    det.check()
    return det


# --------------------------------------------------------------------------------------------------
# Shared inputs and helpers


def _check_image(image) -> None:
    if not torch.is_tensor(image) or image.ndim != 4 or image.shape[-1] < 3:
        got = tuple(image.shape) if torch.is_tensor(image) else type(image).__name__
        raise TwigError(f"image must be an IMAGE [batch, height, width, 3], got {got}")


def detection_inputs() -> dict:
    return {
        "detector": (detector_choices(), {"tooltip": "Face detector. Lists what is installed: ensemble (the default: mediapipe full and short range, OpenCV Haar and the YOLO face models in models/ultralytics/bbox together, duplicates merged, confidences made comparable), mediapipe (0.10.21) BlazeFace full/short range and face mesh, OpenCV's Haar cascade, and YOLO .pt models from models/ultralytics/bbox or segm (needs ultralytics)."}),
        "confidence": ("FLOAT", {"default": D["confidence"], "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Minimum detection confidence (ADetailer default 0.3)."}),
        "small_faces": (TILE_CHOICES, {"default": "auto", "tooltip": "Also scan overlapping 512 px tiles to find small (distant) faces; fine: 256 px tiles, for faces down to 24 px in a 1024 px image (slower). auto: fine for the ensemble, on for the mediapipe models, off for Haar (it scans all scales) and YOLO."}),
        "max_faces": ("INT", {"default": D["max_faces"], "min": 0, "max": 100, "tooltip": "Keep only the N largest faces per image (0 = all)."}),
        "min_ratio": ("FLOAT", {"default": D["min_ratio"], "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": "Ignore faces smaller than this fraction of the image area (e.g. 0.01 skips background faces)."}),
        "max_ratio": ("FLOAT", {"default": D["max_ratio"], "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": "Ignore faces larger than this fraction of the image area."}),
        "sort": (list(frefine.SORT_ORDERS), {"default": D["sort"], "tooltip": "Face order (face 1 gets the first [SEP] prompt and seed + 0): left-right, largest first, most confident first, or nearest the centre first."}),
    }


TURNED_HEADS = {"turned_heads": (TURN_CHOICES, {"default": "auto", "tooltip": "Also detect on the image turned by 90, 180 and 270 degrees, for faces lying sideways or upside down (three more passes of the fast detectors). auto: on for the ensemble only."})}


def run_detection(image, detector, confidence, small_faces, max_faces, min_ratio, max_ratio, sort,
                  turned_heads="auto") -> FaceSet:
    det = resolve_detector(detector)
    h, w = int(image.shape[1]), int(image.shape[2])
    per_image = []
    for b in range(image.shape[0]):
        host.check_interrupt()
        found = fdetect.detect_faces(image[b], det, float(confidence), small_faces, turned_heads)
        per_image.append(frefine.select_faces(found, w, h, confidence=float(confidence), max_faces=int(max_faces),
                                              min_ratio=float(min_ratio), max_ratio=float(max_ratio), sort=sort))
    return FaceSet(per_image, w, h, det.name)


def _draw_preview(image: torch.Tensor, faces: FaceSet, dilate: int = 0) -> torch.Tensor:
    """The images with each face's mask tinted and its box, number and confidence drawn."""
    import numpy as np
    from PIL import Image, ImageDraw

    out = []
    for b in range(image.shape[0]):
        arr = (image[b, ..., :3].float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
        im = Image.fromarray(arr, "RGB")
        dets = faces.detections[b] if b < len(faces.detections) else []
        if dets:
            tint = np.zeros(arr.shape[:2], dtype=np.float32)
            for d in dets:
                tint = np.maximum(tint, frefine.face_mask_grown(d, arr.shape[0], arr.shape[1], dilate).numpy())
            a = arr.astype(np.float32)
            a[..., 1] = a[..., 1] * (1 - 0.35 * tint) + 255 * 0.35 * tint
            im = Image.fromarray(a.clip(0, 255).astype(np.uint8), "RGB")
            draw = ImageDraw.Draw(im)
            lw = max(1, round(max(arr.shape[:2]) / 300))
            for i, d in enumerate(dets):
                x0, y0, x1, y1 = d.box
                draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(0, 255, 0), width=lw)
                draw.text((x0 + 2, max(0, y0 - 12)), f"{i + 1}: {d.confidence:.2f}", fill=(0, 255, 0))
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0))
    return torch.stack(out)


def _combined_masks(faces: FaceSet, dilate: int) -> torch.Tensor:
    masks = torch.zeros(len(faces.detections), faces.height, faces.width)
    for b, dets in enumerate(faces.detections):
        for d in dets:
            masks[b] = torch.maximum(masks[b], frefine.face_mask_grown(d, faces.height, faces.width, dilate))
    return masks


def pack_crops(crops: list[torch.Tensor]) -> torch.Tensor:
    """Crops [h,w,3] of different sizes as one IMAGE batch, each centred on black at the largest size."""
    if not crops:
        return torch.zeros(1, 64, 64, 3)
    h = max(c.shape[0] for c in crops)
    w = max(c.shape[1] for c in crops)
    out = torch.zeros(len(crops), h, w, 3)
    for i, c in enumerate(crops):
        top, left = (h - c.shape[0]) // 2, (w - c.shape[1]) // 2
        out[i, top:top + c.shape[0], left:left + c.shape[1]] = c[..., :3].float().clamp(0, 1)
    return out


def _get(ref, memory_required: int = 0):
    """The twig_core object behind a node input (a host.ManagedModel or a plain object)."""
    return ref.get(memory_required=memory_required) if _managed(ref) else ref


def _managed(ref) -> bool:
    return hasattr(ref, "get") and hasattr(ref, "release")


def transformer_getter(model):
    """Face refine's getter for the transformer: ComfyUI is told the memory a step on the crop's latent needs."""
    def get(latent_shape=None, cfg=True):
        if not _managed(model) or latent_shape is None:
            return _get(model)
        return _get(model, host.step_memory_required(model.peek(), latent_shape, cfg=cfg))
    return get


def vae_getter(vae):
    """Face refine's getter for the DC-AE: ComfyUI is told the memory encoding the crop (``pixels``) or
    decoding its latent needs."""
    def get(latent_shape=None, pixels=None, encode=False):
        if not _managed(vae) or (latent_shape is None and pixels is None):
            return _get(vae)
        return _get(vae, host.vae_memory_required(vae.peek(), latent_shape, encode=encode, pixels=pixels))
    return get


def _cond_row(cond, b: int, batch: int):
    """Row ``b`` of a conditioning batched per image, else the conditioning itself."""
    n = getattr(cond, "batch_size", 1)
    if n == 1 or n != batch:
        return cond
    from twig_core.text import Conditioning

    reports = cond.reports[b:b + 1] if cond.reports else ()
    return Conditioning(cond.embeds[b:b + 1], cond.mask[b:b + 1], reports)


# --------------------------------------------------------------------------------------------------
# Nodes


class TwigFaceDetect:
    DESCRIPTION = ("Detects faces offline (mediapipe, OpenCV Haar or a YOLO model) and outputs them for Twig Face "
                   "Refine, plus their combined mask and a preview with boxes and confidences.")

    @classmethod
    def INPUT_TYPES(cls):
        inputs = detection_inputs()
        inputs["dilate"] = ("INT", {"default": 0, "min": -128, "max": 128, "tooltip": "Grow (+) or shrink (-) the output mask by this many pixels (the detections themselves are unchanged)."})
        return {"required": {"image": ("IMAGE",), **inputs}, "optional": dict(TURNED_HEADS)}

    RETURN_TYPES = (FACES, "MASK", "IMAGE", "INT", "STRING")
    RETURN_NAMES = ("faces", "mask", "preview", "count", "info")
    OUTPUT_TOOLTIPS = ("Detections per image, for Twig Face Refine's faces input.",
                       "Union of the face masks (mesh/segmentation masks, else boxes) per image.",
                       "The images with the faces boxed, numbered in refine order, with confidences.",
                       "Number of faces found in the whole batch.",
                       "JSON: every face's box, confidence and source, and which detectors are installed.")
    FUNCTION = "detect"
    CATEGORY = FACE_CATEGORY

    @node_errors("Twig Face Detect")
    def detect(self, image, detector, confidence=D["confidence"], small_faces="auto", max_faces=0, min_ratio=0.0,
               max_ratio=1.0, sort=D["sort"], dilate=0, turned_heads="auto"):
        _check_image(image)
        faces = run_detection(image, detector, confidence, small_faces, max_faces, min_ratio, max_ratio, sort,
                              turned_heads)
        info = json.dumps({
            "detector": faces.detector, "count": faces.count,
            "images": [[d.to_dict() for d in dets] for dets in faces.detections],
            "detectors": {k: (v or "ready") for k, v in fdetect.available_detectors().items()},
        }, ensure_ascii=False)
        text = f"{faces.count} face(s) with {faces.detector}"
        return {"ui": {"text": [text]},
                "result": (faces, _combined_masks(faces, int(dilate)), _draw_preview(image, faces, int(dilate)),
                           faces.count, info)}


class TwigFaceRefine:
    DESCRIPTION = ("Finds every face and re-draws it with the Twig model at a higher resolution, then pastes it back "
                   "through a feathered mask (ADetailer / FaceDetailer style). Pixels outside the mask stay "
                   "bit-identical; with no face found the image passes through unchanged.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE",),
                "model": (MODEL,),
                "vae": (VAE,),
                "positive": (CONDITIONING, {"tooltip": "Main prompt conditioning (used for faces without their own prompt)."}),
                "negative": (CONDITIONING,),
                **detection_inputs(),
                "dilate": ("INT", {"default": D["dilate"], "min": -128, "max": 128, "tooltip": "Grow (+) or erode (-) each face mask in pixels before feathering (ADetailer default 4)."}),
                "feather": ("INT", {"default": D["feather"], "min": 0, "max": 128, "tooltip": "Blur of the paste mask in pixels; beyond it nothing changes."}),
                "crop_factor": ("FLOAT", {"default": D["crop_factor"], "min": 1.0, "max": 10.0, "step": 0.1, "tooltip": "Context around the face: the crop is the face box times this (FaceDetailer default 3.0)."}),
                "guide_size": ("INT", {"default": D["guide_size"], "min": 64, "max": 4096, "step": 32, "tooltip": "The crop is upscaled so the face is about this many pixels (never downscaled for it)."}),
                "max_size": ("INT", {"default": D["max_size"], "min": 64, "max": 4096, "step": 32, "tooltip": "Upper limit for the crop's longer side after scaling."}),
                "denoise": ("FLOAT", {"default": D["denoise"], "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "How much of each face is re-drawn (ADetailer default 0.4)."}),
                "steps": ("INT", {"default": D["steps"], "min": 1, "max": MAX_STEPS}),
                "cfg": ("FLOAT", {"default": D["cfg"], "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True, "tooltip": "Face n (counted across the batch from 0) uses seed + n."}),
                "sampler": (list(SAMPLERS), {"default": SAMPLERS[0], "tooltip": SAMPLER_HELP}),
                "shift": ("FLOAT", {"default": 3.0, "min": 0.1, "max": 20.0, "step": 0.1, "round": 0.01}),
                "noise_mask": ("BOOLEAN", {"default": True, "tooltip": "Re-draw only inside the face mask (inpainting); off re-draws the whole crop and relies on the feathered paste."}),
            },
            "optional": {
                "faces": (FACES, {"tooltip": "Detections from Twig Face Detect; when connected the detector settings here are not used for detecting (the filters still apply)."}),
                "text_encoder": (TEXT_ENCODER, {"tooltip": "Needed only for face_prompt / face_negative."}),
                "face_prompt": ("STRING", {"multiline": True, "default": "", "dynamicPrompts": True, "tooltip": "Prompt for the faces; empty = the main prompt. 'a [SEP] b' gives face 1 a and faces 2+ b; [PROMPT] inserts main_prompt."}),
                "face_negative": ("STRING", {"multiline": True, "default": "", "dynamicPrompts": True, "tooltip": "Negative prompt for the faces, with [SEP] like face_prompt; empty = the main negative."}),
                "main_prompt": ("STRING", {"multiline": False, "default": "", "tooltip": "The main prompt's text, inserted where face_prompt says [PROMPT]."}),
                **TURNED_HEADS,
            },
        }

    RETURN_TYPES = ("IMAGE", "MASK", "IMAGE", "IMAGE", "INT")
    RETURN_NAMES = ("image", "mask", "crops_before", "crops_after", "count")
    OUTPUT_TOOLTIPS = ("The image with every face refined.",
                       "Combined feathered paste mask (where pixels could change).",
                       "Each face crop as the model received it (work size).",
                       "Each face crop as the model returned it.",
                       "Number of faces refined in the batch.")
    FUNCTION = "refine"
    CATEGORY = FACE_CATEGORY

    @node_errors("Twig Face Refine")
    def refine(self, image, model, vae, positive, negative, detector, confidence=D["confidence"], small_faces="auto",
               max_faces=0, min_ratio=0.0, max_ratio=1.0, sort=D["sort"], dilate=D["dilate"], feather=D["feather"],
               crop_factor=D["crop_factor"], guide_size=D["guide_size"], max_size=D["max_size"], denoise=D["denoise"],
               steps=D["steps"], cfg=D["cfg"], seed=0, sampler=SAMPLERS[0], shift=3.0, noise_mask=True, faces=None,
               text_encoder=None, face_prompt="", face_negative="", main_prompt="", turned_heads="auto"):
        _check_image(image)
        for name, c in (("positive", positive), ("negative", negative)):
            if not hasattr(c, "embeds") or not hasattr(c, "mask"):
                raise NodeError(f"Twig Face Refine: {name} must come from Twig Text Encode, got {type(c).__name__}")
        batch, h, w = int(image.shape[0]), int(image.shape[1]), int(image.shape[2])
        if faces is not None:
            if not isinstance(faces, FaceSet):
                raise TwigError(f"faces must come from Twig Face Detect, got {type(faces).__name__}")
            if (faces.width, faces.height) != (w, h) or len(faces.detections) != batch:
                raise TwigError(f"faces were detected on {len(faces.detections)} image(s) of {faces.width}x{faces.height}, "
                                f"but this image batch is {batch} x {w}x{h}")
            selected = [frefine.select_faces(d, w, h, confidence=float(confidence), max_faces=int(max_faces),
                                             min_ratio=float(min_ratio), max_ratio=float(max_ratio), sort=sort)
                        for d in faces.detections]
            found = FaceSet(selected, w, h, faces.detector)
        else:
            found = run_detection(image, detector, confidence, small_faces, max_faces, min_ratio, max_ratio, sort,
                                  turned_heads)

        empty = torch.zeros(batch, h, w)
        if found.count == 0:
            msg = f"no face found ({found.detector}); image returned unchanged"
            log.info("[Twig] Face Refine: %s", msg)
            return {"ui": {"text": [msg]}, "result": (image, empty, pack_crops([]), pack_crops([]), 0)}

        conds_for = self._prompt_conditioning(positive, negative, batch, text_encoder, face_prompt, face_negative,
                                              main_prompt)
        total = int(steps) * found.count
        bar = host.Progress(total)

        def on_step(job, state):
            host.check_interrupt()
            bar.update(job.number * int(steps) + state["i"] + 1)

        refiner = frefine.TwigRefiner(
            transformer_getter(model), vae_getter(vae), positive, negative, steps=int(steps), cfg=float(cfg),
            seed=int(seed), denoise=float(denoise), sampler=sampler, shift=float(shift), use_mask=bool(noise_mask),
            conds_for=conds_for, callback=on_step)

        result = frefine.refine_faces(
            image, found.detections, refiner, dilate=int(dilate), feather=int(feather),
            crop_factor=float(crop_factor), guide_size=int(guide_size), max_size=int(max_size),
            multiple=refiner.multiple, on_face=lambda job: host.check_interrupt())
        msg = f"refined {result.count} face(s) with {found.detector}"
        if result.skipped:
            msg += "; skipped: " + "; ".join(result.skipped)
        out = result.images.to(image.dtype) if result.count else image
        return {"ui": {"text": [msg]},
                "result": (out, result.masks, pack_crops(result.before), pack_crops(result.after), result.count)}

    @staticmethod
    def _prompt_conditioning(positive, negative, batch, text_encoder, face_prompt, face_negative, main_prompt):
        """A conds_for(job) callable: per-face prompts encoded once each; empty parts use the main conditioning."""
        main = main_prompt if main_prompt and main_prompt.strip() else None
        pos_prompts = frefine.split_prompts(face_prompt or "", main)
        neg_prompts = frefine.split_prompts(face_negative or "", None)
        if all(p is None for p in pos_prompts + neg_prompts):
            return lambda job: (_cond_row(positive, job.image_index, batch), _cond_row(negative, job.image_index, batch))
        if text_encoder is None or not hasattr(text_encoder, "model"):
            raise TwigError("face_prompt / face_negative need the text_encoder input (Twig Text Encoder Loader)")
        cache: dict[tuple[str, bool], object] = {}

        def encode(text: str, positive_side: bool):
            key = (text, positive_side)
            if key not in cache:
                with torch.no_grad():
                    te = _get(text_encoder.model)
                    cache[key] = te.encode([text], max_length=text_encoder.max_tokens,
                                           use_instruction=positive_side).to("cpu")
            return cache[key]

        def conds_for(job):
            p = frefine.prompt_for(pos_prompts, job.face_index)
            n = frefine.prompt_for(neg_prompts, job.face_index)
            cond = encode(p, True) if p is not None else _cond_row(positive, job.image_index, batch)
            uncond = encode(n, False) if n is not None else _cond_row(negative, job.image_index, batch)
            return cond, uncond

        return conds_for
