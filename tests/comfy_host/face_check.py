"""The face nodes' part of the headless ComfyUI check (called from client.py's ``check``; also runnable alone
against a server that already has the tiny models: ``python face_check.py --url URL --output OUTPUT_DIR``).

1. text to image -> Twig Face Refine -> SaveImage, next to a SaveImage of the text-to-image result: a random tiny
   model draws no face, so the refined image must be the same picture, with count 0 reported.
2. scikit-image's astronaut photo (copied into the output folder, loaded with LoadImage) -> Twig Face Detect and
   Twig Face Refine -> SaveImage of the photo, the refined photo, the mask (MaskToImage), the crops and the
   detection preview: one face found and refined, and every pixel outside the mask unchanged.
The detector is the first one the node lists; with none installed the check expects the node's clear error.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

_main = sys.modules.get("__main__")
if _main is not None and hasattr(_main, "t2i_prompt") and hasattr(_main, "CheckFailed"):
    C = _main  # called from client.py's check: share its helpers (and its CheckFailed)
else:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import client as C  # noqa: E402


def face_inputs(detector: str, seed: int = 0) -> dict:
    return {"detector": detector, "confidence": 0.3, "small_faces": "auto", "max_faces": 0, "min_ratio": 0.0,
            "max_ratio": 1.0, "sort": "left-right", "dilate": 4, "feather": 5, "crop_factor": 3.0, "guide_size": 128,
            "max_size": 256, "denoise": 0.4, "steps": 3, "cfg": 4.5, "seed": seed, "sampler": "flow_dpmpp_2m",
            "shift": 3.0, "noise_mask": True}


def t2i_face_prompt(detector: str, seed: int = 5) -> dict:
    p = C.t2i_prompt(seed)
    p["20"] = {"class_type": "TwigFaceRefine",
               "inputs": {"image": ["7", 0], "model": ["1", 0], "vae": ["3", 0], "positive": ["4", 0],
                          "negative": ["4", 1], **face_inputs(detector)}}
    p["21"] = {"class_type": "SaveImage", "inputs": {"images": ["20", 0], "filename_prefix": "twig_face_t2i_refined"}}
    p["8"]["inputs"]["filename_prefix"] = "twig_face_t2i"
    return p


def photo_face_prompt(detector: str, photo: str) -> dict:
    p = C.t2i_prompt(0)
    for k in ("5", "6", "7", "8"):
        del p[k]
    p["10"] = {"class_type": "LoadImage", "inputs": {"image": f"{photo} [output]"}}
    p["11"] = {"class_type": "TwigFaceDetect",
               "inputs": {"image": ["10", 0], "detector": detector, "confidence": 0.3, "small_faces": "auto",
                          "max_faces": 0, "min_ratio": 0.0, "max_ratio": 1.0, "sort": "left-right", "dilate": 0}}
    p["12"] = {"class_type": "TwigFaceRefine",
               "inputs": {"image": ["10", 0], "model": ["1", 0], "vae": ["3", 0], "positive": ["4", 0],
                          "negative": ["4", 1], "faces": ["11", 0], **face_inputs(detector, seed=7)}}
    p["13"] = {"class_type": "MaskToImage", "inputs": {"mask": ["12", 1]}}
    saves = {"30": (["10", 0], "twig_face_photo"), "31": (["12", 0], "twig_face_refined"),
             "32": (["13", 0], "twig_face_mask"), "33": (["12", 2], "twig_face_before"),
             "34": (["12", 3], "twig_face_after"), "35": (["11", 2], "twig_face_preview")}
    for node, (images, prefix) in saves.items():
        p[node] = {"class_type": "SaveImage", "inputs": {"images": images, "filename_prefix": prefix}}
    return p


def _run(url: str, prompt: dict, what: str) -> dict:
    t0 = time.time()
    entry = C.wait_history(url, C.queue_prompt(url, prompt))
    if entry["status"]["status_str"] != "success":
        err = C.messages(entry).get("execution_error", {})
        raise C.CheckFailed(f"{what} failed in {err.get('node_type')}: {err.get('exception_type')}: "
                            f"{err.get('exception_message')}")
    C.log(f"{what}: completed in {time.time() - t0:.1f}s")
    return entry


def _saved(entry: dict, node: str, output_dir: str):
    import numpy as np
    from PIL import Image

    images = entry["outputs"][node]["images"]
    arrays = []
    for im in images:
        path = os.path.join(output_dir, im.get("subfolder", ""), im["filename"])
        with Image.open(path) as f:
            arrays.append(np.asarray(f.convert("RGB")))
    return arrays


def _ui_text(entry: dict, node: str) -> str:
    return " ".join(entry["outputs"].get(node, {}).get("text", []))


def _astronaut(output_dir: str) -> str | None:
    try:
        import skimage.data
    except Exception:
        return None
    src = os.path.join(os.path.dirname(skimage.data.__file__), "astronaut.png")
    if not os.path.isfile(src):
        return None
    shutil.copyfile(src, os.path.join(output_dir, "twig_face_astronaut.png"))
    return "twig_face_astronaut.png"


def check_face_refine(url: str, output_dir: str) -> None:
    import numpy as np

    info = C.get_json(url + "/object_info")
    for node in ("TwigFaceDetect", "TwigFaceRefine"):
        C.expect(node in info, f"{node} in /object_info")
    choices = info["TwigFaceRefine"]["input"]["required"]["detector"][0]
    C.log(f"face detectors listed by the node: {choices}")
    status, body = C.get(url + "/extensions/twig/docs/TwigFaceRefine.md")
    C.expect(status == 200 and body.startswith(b"# Twig Face Refine"), "Twig Face Refine help page served")
    detector = choices[0]
    if detector.startswith("(no face detector"):
        entry = C.wait_history(url, C.queue_prompt(url, t2i_face_prompt(detector)))
        err = C.messages(entry).get("execution_error", {})
        C.expect(entry["status"]["status_str"] == "error" and "no face detector is installed" in
                 str(err.get("exception_message")), "with no detector installed, Twig Face Refine says so")
        C.log("note: no face detector installed for this ComfyUI python; the photo check is skipped")
        return

    entry = _run(url, t2i_face_prompt(detector), f"text-to-image -> Twig Face Refine ({detector})")
    text = _ui_text(entry, "20")
    base, refined = _saved(entry, "8", output_dir)[0], _saved(entry, "21", output_dir)[0]
    if "no face" in text:
        C.expect(np.array_equal(base, refined), f"no face in the random picture: image passed through unchanged ({text})")
    else:
        C.expect(base.shape == refined.shape, f"refined picture has the input's size ({text})")

    photo = _astronaut(output_dir)
    if photo is None:
        C.log("note: scikit-image is not installed for this ComfyUI python; the photo check is skipped")
        return
    entry = _run(url, photo_face_prompt(detector, photo), f"photo -> Twig Face Detect + Twig Face Refine ({detector})")
    C.expect("1 face" in _ui_text(entry, "11"), f"Twig Face Detect: {_ui_text(entry, '11')}")
    C.expect("refined 1 face" in _ui_text(entry, "12"), f"Twig Face Refine: {_ui_text(entry, '12')}")
    original, refined = _saved(entry, "30", output_dir)[0], _saved(entry, "31", output_dir)[0]
    mask = _saved(entry, "32", output_dir)[0][..., 0]
    changed = (original != refined).any(-1)
    C.expect(changed.any() and changed[mask > 0].any(), f"the face changed ({int(changed.sum())} pixels)")
    # the saved mask is 8-bit: weights below 1/255 at the feather's rim are saved as 0, and there the paste may
    # move a pixel by at most one level; everything farther out is exactly the photo
    near = mask > 0
    for _ in range(2):
        near = near | np.roll(near, 1, 0) | np.roll(near, -1, 0) | np.roll(near, 1, 1) | np.roll(near, -1, 1)
    rim = changed & (mask == 0)
    C.expect(not changed[~near].any(), "every pixel outside the feathered mask is unchanged")
    C.expect(not rim.any() or (near[rim].all() and np.abs(original.astype(int) - refined.astype(int))[rim].max() <= 1),
             f"{int(rim.sum())} pixels on the mask's rim (weights below 1/255) moved by at most one level")
    ys, xs = np.nonzero(mask)
    C.expect(150 <= xs.min() and xs.max() < 305 and 25 <= ys.min() and ys.max() < 200,
             f"the mask lies on the astronaut's face (x {xs.min()}..{xs.max()}, y {ys.min()}..{ys.max()})")
    before, after = _saved(entry, "33", output_dir), _saved(entry, "34", output_dir)
    C.expect(len(before) == len(after) == 1 and before[0].shape == after[0].shape,
             f"crops before/after saved ({before[0].shape[1]}x{before[0].shape[0]})")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8188")
    ap.add_argument("--output", required=True)
    a = ap.parse_args()
    try:
        check_face_refine(a.url, a.output)
    except C.CheckFailed as e:
        C.log(f"FAILED: {e}")
        return 1
    C.log("face checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
