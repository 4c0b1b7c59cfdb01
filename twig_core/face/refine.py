"""Face refine: select faces, crop each, refine the crop, paste the change back through a feathered mask.

The loop (:func:`refine_faces`) is independent of the model: it hands each crop to a *refiner*, a callable
``refiner(crop [1,h,w,3] 0..1, mask [1,h,w] 0..1, job: FaceJob) -> [1,h,w,3] 0..1`` at the work size. The
Twig refiner (:class:`TwigRefiner`) VAE-encodes the crop, partially re-denoises it (inpainting inside the
mask) and decodes it; tests use identity or painting refiners.

Paste: the refiner's *change* is resized back to the crop and added through the feathered mask,
``out = in + w · resize(refined − crop)``. Pixels where the mask weight is 0 — everything farther than the
feather from the dilated face mask — and pixels the refiner did not change stay bit-identical, and
resampling the crop there and back costs the original no detail.

Defaults follow ADetailer and Impact Pack's FaceDetailer: confidence 0.3, dilate 4 px, feather 5 px,
crop factor 3, guide size 512, max size 1024, denoise 0.4, 20 steps, per-face seed = seed + face number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ..errors import TwigError
from ..sampling import check_seed, offset_seed
from . import masks as M
from .detect import Detection

SORT_ORDERS = ("left-right", "largest", "confidence", "center")
SEP = "[SEP]"
PROMPT_TOKEN = "[PROMPT]"

DEFAULTS = dict(confidence=0.3, max_faces=0, min_ratio=0.0, max_ratio=1.0, sort="left-right", dilate=4, feather=5,
                crop_factor=3.0, guide_size=512, max_size=1024, denoise=0.4, steps=20, cfg=4.5)


# --------------------------------------------------------------------------------------------------
# Selection and prompts


def select_faces(detections: Sequence[Detection], width: int, height: int, *, confidence: float = 0.3,
                 max_faces: int = 0, min_ratio: float = 0.0, max_ratio: float = 1.0,
                 sort: str = "left-right") -> list[Detection]:
    """The faces to refine, in refine order.

    Kept: confidence ≥ ``confidence`` and face area / image area within [min_ratio, max_ratio] (mask area if
    the detector gave a mask, else box area). ``max_faces`` > 0 keeps only the largest ones (ADetailer's
    "k largest"). Order: "left-right" (box centre x, then y), "largest" (area), "confidence", or "center"
    (distance of the box centre from the image centre).
    """
    if sort not in SORT_ORDERS:
        raise TwigError(f"unknown sort order {sort!r}; choose one of {', '.join(SORT_ORDERS)}")
    if not 0.0 <= min_ratio <= max_ratio:
        raise TwigError(f"face size ratios must satisfy 0 ≤ min_ratio ≤ max_ratio, got {min_ratio} and {max_ratio}")
    area = float(width * height)
    keep = [d for d in detections if d.confidence >= confidence and min_ratio <= d.area / area <= max_ratio]
    if max_faces and max_faces > 0:
        keep = sorted(keep, key=lambda d: -d.area)[:max_faces]
    cx, cy = width / 2, height / 2
    keys = {
        "left-right": lambda d: (d.center[0], d.center[1]),
        "largest": lambda d: -d.area,
        "confidence": lambda d: -d.confidence,
        "center": lambda d: (d.center[0] - cx) ** 2 + (d.center[1] - cy) ** 2,
    }
    return sorted(keep, key=keys[sort])


def split_prompts(text: str, main: Optional[str] = None) -> list[Optional[str]]:
    """Per-face prompts from ``text``, ADetailer style.

    "a [SEP] b [SEP] c": face 1 gets a, face 2 b, faces 3+ c (the last prompt repeats). An empty part means
    the main prompt; ``[PROMPT]`` inside a part is replaced by the main prompt text ``main``. Parts that are
    empty while ``main`` is None come back as None: "use the main conditioning as it is".
    """
    text = text or ""
    parts = [p.strip() for p in re.split(r"\s*\[SEP\]\s*", text)]
    out: list[Optional[str]] = []
    for p in parts:
        if not p:
            out.append(main if main else None)
        elif PROMPT_TOKEN in p:
            if main is None:
                raise TwigError(f"the face prompt uses {PROMPT_TOKEN} but no main prompt text was given to insert")
            out.append(p.replace(PROMPT_TOKEN, main).strip())
        else:
            out.append(p)
    return out


def prompt_for(prompts: Sequence[Optional[str]], face_index: int) -> Optional[str]:
    """The prompt of the face with this index within its image (the last prompt repeats)."""
    if not prompts:
        return None
    return prompts[min(face_index, len(prompts) - 1)]


# --------------------------------------------------------------------------------------------------
# The crop -> refine -> paste loop


@dataclass
class FaceJob:
    """One face being refined: image_index in the batch, face_index within the image, number across the
    batch (seed offset), its detection and crop plan."""

    image_index: int
    face_index: int
    number: int
    detection: Detection
    plan: M.CropPlan

    def to_dict(self) -> dict:
        p = self.plan
        return {"image": self.image_index, "face": self.face_index, "number": self.number,
                "crop": [p.x0, p.y0, p.x1, p.y1], "work_size": [p.work_width, p.work_height],
                **self.detection.to_dict()}


Refiner = Callable[[torch.Tensor, torch.Tensor, FaceJob], torch.Tensor]


@dataclass
class RefineResult:
    """images: [B,H,W,C] (the input tensor itself when no face was refined); masks: [B,H,W] combined paste
    weights; before/after: per face, the crop at work size [h,w,3] as the refiner got it and returned it."""

    images: torch.Tensor
    masks: torch.Tensor
    before: list[torch.Tensor] = field(default_factory=list)
    after: list[torch.Tensor] = field(default_factory=list)
    jobs: list[FaceJob] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.jobs)


def face_mask(det: Detection, height: int, width: int) -> torch.Tensor:
    """[H,W] float: the detection's own mask if it has one, else its box."""
    if det.mask is not None:
        m = torch.as_tensor(det.mask).float()
        if tuple(m.shape) != (height, width):
            raise TwigError(f"detection mask is {tuple(m.shape)}, image is {(height, width)}")
        return m
    return M.box_mask(det.box, height, width)


def paste_weights(det: Detection, height: int, width: int, dilate: int, feather: int) -> torch.Tensor:
    """The feathered paste mask of one face: its mask grown by ``dilate`` px, blurred over ``feather`` px."""
    return M.feather(face_mask_grown(det, height, width, dilate), feather)


def face_mask_grown(det: Detection, height: int, width: int, px: int) -> torch.Tensor:
    """The detection's mask (or box) grown (px > 0) or eroded (px < 0), unfeathered."""
    return M.grow(face_mask(det, height, width), px)


def refine_faces(images: torch.Tensor, detections: Sequence[Sequence[Detection]], refiner: Refiner, *,
                 dilate: int = 4, feather: int = 5, crop_factor: float = 3.0, guide_size: int = 512,
                 max_size: int = 1024, multiple: int = 32,
                 on_face: Optional[Callable[[FaceJob], None]] = None) -> RefineResult:
    """Refine the given faces of each image ([B,H,W,C] float 0..1, C ≥ 3; ``detections[b]`` in refine order).

    Faces are refined one after another on the updated image, so overlapping faces build on each other.
    With no faces the input tensor is returned as it is.
    """
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[-1] < 3:
        got = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise TwigError(f"face refine needs images [B,H,W,3] in 0..1, got {got}")
    if len(detections) != images.shape[0]:
        raise TwigError(f"got detections for {len(detections)} images but the batch has {images.shape[0]}")
    b_, h, w = images.shape[:3]
    combined = torch.zeros(b_, h, w)
    result = RefineResult(images, combined)
    if not any(len(d) for d in detections):
        return result
    out = images.clone()
    number = 0
    for b, dets in enumerate(detections):
        for j, det in enumerate(dets):
            weights = paste_weights(det, h, w, dilate, feather)
            support = M.bbox_of(weights)
            if support is None:
                result.skipped.append(f"image {b} face {j}: mask is empty after dilate/erode {dilate} px")
                continue
            plan = M.plan_crop(det.box, support, w, h, crop_factor, guide_size, max_size, multiple)
            job = FaceJob(b, j, number, det, plan)
            if on_face is not None:
                on_face(job)
            region = out[b:b + 1, plan.y0:plan.y1, plan.x0:plan.x1, :3].permute(0, 3, 1, 2).float()
            work = M.resize_image(region, plan.work_height, plan.work_width).clamp(0.0, 1.0)
            work_hwc = work.permute(0, 2, 3, 1).contiguous()
            wcrop = weights[plan.y0:plan.y1, plan.x0:plan.x1]
            noise_mask = M.resize_mask(wcrop, plan.work_height, plan.work_width)[None]
            refined = refiner(work_hwc.clone(), noise_mask, job)
            if not torch.is_tensor(refined) or tuple(refined.shape) != tuple(work_hwc.shape):
                got = tuple(refined.shape) if torch.is_tensor(refined) else type(refined).__name__
                raise TwigError(f"the refiner returned {got} for a crop of {tuple(work_hwc.shape)}")
            refined = refined.detach().float().cpu()
            change = (refined - work_hwc).permute(0, 3, 1, 2)
            change = M.resize_image(change, plan.height, plan.width)[0].permute(1, 2, 0)  # [h,w,3]
            delta = change * wcrop[..., None]
            old = out[b, plan.y0:plan.y1, plan.x0:plan.x1, :3]
            new = torch.where(delta != 0, (old.float() + delta).clamp(0.0, 1.0).to(old.dtype), old)
            out[b, plan.y0:plan.y1, plan.x0:plan.x1, :3] = new
            combined[b] = torch.maximum(combined[b], weights)
            result.before.append(work_hwc[0])
            result.after.append(refined[0].clamp(0.0, 1.0))
            result.jobs.append(job)
            number += 1
    if result.jobs:
        result.images = out
    return result


# --------------------------------------------------------------------------------------------------
# The Twig refiner


def _resolve(obj, **need):
    """A model, or a getter returning it (so a host can load or move it right before use). Getters are called
    with what the coming call will work on, for the host's memory estimate: the transformer's with
    ``latent_shape`` and ``cfg``; the DC-AE's with ``latent_shape`` (decode) or ``pixels`` (h, w) and
    ``encode=True``; none of them when only the model's attributes are read."""
    if callable(obj) and not isinstance(obj, torch.nn.Module):
        return obj(**need)
    return obj


class TwigRefiner:
    """Re-denoise a face crop with a Twig transformer and DC-AE: encode → ``sample_latents`` (img2img from
    ``denoise``, inpainting inside the mask when ``use_mask``) → decode. Face number n uses seed + n.

    ``transformer`` and ``vae`` may also be getters, called right before each use with what that use needs
    (see ``_resolve``; a getter may ignore it).
    ``conds_for(job) -> (cond, uncond)`` overrides the conditioning per face (per-face prompts).
    ``callback(job, state)`` is called after every sampler step.
    """

    def __init__(self, transformer, vae, cond, uncond=None, *, steps: int = 20, cfg: float = 4.5, seed: int = 0,
                 denoise: float = 0.4, sampler: str = "flow_dpmpp_2m", shift: float = 3.0, use_mask: bool = True,
                 conds_for: Optional[Callable[[FaceJob], tuple]] = None,
                 callback: Optional[Callable[[FaceJob, dict], None]] = None):
        if not 0.0 <= denoise <= 1.0:
            raise TwigError(f"denoise must be in 0..1, got {denoise}")
        self.transformer, self.vae = transformer, vae
        self.cond, self.uncond = cond, uncond
        self.steps, self.cfg, self.seed, self.denoise = int(steps), float(cfg), check_seed(seed), float(denoise)
        self.sampler, self.shift, self.use_mask = sampler, float(shift), bool(use_mask)
        self.conds_for, self.callback = conds_for, callback

    @property
    def multiple(self) -> int:
        return int(getattr(_resolve(self.vae), "spatial_factor", 32))

    def __call__(self, crop: torch.Tensor, mask: torch.Tensor, job: FaceJob) -> torch.Tensor:
        from .. import dcae_exec
        from .. import image as timage
        from ..pipeline import sample_latents

        cond, uncond = self.conds_for(job) if self.conds_for is not None else (self.cond, self.uncond)
        vae = _resolve(self.vae, pixels=tuple(crop.shape[-3:-1]), encode=True)
        cb = None
        if self.callback is not None:
            def cb(state, job=job):
                self.callback(job, state)
        with torch.no_grad():
            latent = dcae_exec.encode(vae, timage.to_model(crop))[0].float().cpu()
            transformer = _resolve(self.transformer, latent_shape=tuple(latent.shape), cfg=self.cfg != 1.0)
            latent = sample_latents(
                transformer, cond, uncond if self.cfg != 1.0 else None, steps=self.steps, cfg=self.cfg,
                seed=offset_seed(self.seed, job.number), sampler=self.sampler, shift=self.shift, init_latent=latent,
                denoise=self.denoise, mask=mask if self.use_mask else None, callback=cb,
            )
            # fetched again: the host may have moved it while the transformer ran
            vae = _resolve(self.vae, latent_shape=tuple(latent.shape))
            out = dcae_exec.decode(vae, latent)[0].float().cpu()
        return timage.from_model(out)
