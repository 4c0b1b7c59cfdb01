"""Face refine: detect faces, crop each one, re-denoise it with the Twig model, paste it back seamlessly.

- ``detect``: offline face detectors behind one interface (mediapipe BlazeFace / face mesh, OpenCV Haar
  cascade, YOLO ``.pt`` models through ultralytics). Every detector package is optional.
- ``masks``: dilate/erode, feather, boxes and crop planning.
- ``refine``: face selection, per-face prompts, the crop -> refine -> paste loop and the Twig refiner.

Images here are in the host's pixel layout ``[B,H,W,3]`` float 0..1 (what ComfyUI passes and the WebUI
converts to), because the paste works in the caller's own pixel values: pixels the refine does not touch
come back bit-identical. The Twig refiner converts crops to the model's ``[B,3,H,W]`` -1..1 itself.
"""

from .detect import Detection, available_detectors, detect_faces, get_detector
from .refine import FaceJob, RefineResult, TwigRefiner, refine_faces, select_faces, split_prompts

__all__ = [
    "Detection",
    "FaceJob",
    "RefineResult",
    "TwigRefiner",
    "available_detectors",
    "detect_faces",
    "get_detector",
    "refine_faces",
    "select_faces",
    "split_prompts",
]
