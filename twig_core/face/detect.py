"""Face detectors behind one interface, all offline, all optional.

Built-in detectors (names as ADetailer spells them):

- ``mediapipe_face_short`` / ``mediapipe_face_full``: BlazeFace short range (faces within ~2 m, i.e. large in
  the frame) and full range (smaller faces), through mediapipe's legacy ``solutions.face_detection``. The
  models ship inside the mediapipe 0.10.21 wheel; newer wheels ship none, which is reported as such.
- ``mediapipe_face_mesh``: mediapipe's face mesh; each face also gets a mask (the convex hull of its
  468 landmarks).
- ``opencv_haar``: OpenCV's frontal-face Haar cascade, bundled with opencv-python(-headless) 4.x.
- ``ensemble`` (the default): every installed one of mediapipe full range (with tiles), mediapipe short range
  and Haar, plus YOLO models when given, merged by :func:`merge_detections` on calibrated confidences; see
  :class:`EnsembleDetector`.

YOLO face models (``.pt``, bbox or segmentation) run through ultralytics when it is installed; see
:mod:`.yolo` (loaded with PyTorch's restricted ``weights_only`` unpickler). :func:`get_detector` gives one
for a file path.

Each detector is a :class:`Detector`: ``status()`` (None when usable, else the reason, without importing the
package) and ``detect(image, confidence) -> list[Detection]`` on an RGB uint8 ``[H,W,3]`` array.
:func:`detect_faces` adds tiled detection for small faces, passes over quarter-turned copies for turned heads,
and merges duplicates.
"""

from __future__ import annotations

import importlib.util
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np

from ..errors import TwigError
from .masks import convex_hull, polygon_mask

MEDIAPIPE_PIN = "mediapipe==0.10.21"
MEDIAPIPE_HINT = f"pip install {MEDIAPIPE_PIN} (Python 3.12 or older)"
OPENCV_HINT = 'pip install "opencv-python-headless<5"'
ULTRALYTICS_HINT = "pip install ultralytics"
HAAR_FILE = "haarcascade_frontalface_default.xml"
YOLO_EXTENSIONS = (".pt", ".pth")


# --------------------------------------------------------------------------------------------------
# Detections


@dataclass
class Detection:
    """One detected face in image pixel coordinates.

    box: (x0, y0, x1, y1), x1/y1 exclusive, floats. confidence: 0..1 (see each detector for what it means;
    the ensemble's is calibrated across its members).
    mask: optional bool [H,W] for the whole image (face mesh hull, YOLO segmentation), else None (use the box).
    """

    box: tuple[float, float, float, float]
    confidence: float
    mask: Optional[np.ndarray] = field(default=None, repr=False)
    label: str = "face"
    source: str = ""
    found_by: tuple[str, ...] = ()  # the ensemble's members that found this face

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        """Mask area when there is a mask, else box area (what the size ratio filters compare)."""
        if self.mask is not None:
            return float(self.mask.sum())
        return max(0.0, self.width) * max(0.0, self.height)

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

    def shifted(self, dx: float, dy: float, full_hw: tuple[int, int] | None = None) -> "Detection":
        """The same detection moved by (dx, dy); a mask is placed into a zero mask of ``full_hw``."""
        x0, y0, x1, y1 = self.box
        mask = self.mask
        if mask is not None and full_hw is not None:
            big = np.zeros(full_hw, dtype=bool)
            h, w = mask.shape
            big[int(dy):int(dy) + h, int(dx):int(dx) + w] = mask
            mask = big
        return Detection((x0 + dx, y0 + dy, x1 + dx, y1 + dy), self.confidence, mask, self.label, self.source,
                         self.found_by)

    def to_dict(self) -> dict:
        return {
            "box": [round(float(v), 2) for v in self.box],
            "confidence": round(float(self.confidence), 4),
            "has_mask": self.mask is not None,
            "label": self.label,
            "source": self.source,
            **({"found_by": list(self.found_by)} if self.found_by else {}),
        }


def clip_box(box, width: int, height: int) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)


def iou(a, b) -> tuple[float, float]:
    """(intersection over union, intersection over the smaller box) of two boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    smaller = min(area_a, area_b)
    return (inter / union if union > 0 else 0.0), (inter / smaller if smaller > 0 else 0.0)


def merge_detections(dets: Iterable[Detection], iou_limit: float = 0.4, contain_limit: float = 0.6) -> list[Detection]:
    """The one merge rule, greedy non-maximum suppression: keep the most confident of overlapping boxes; a box
    mostly inside a kept one (a face cut by a tile edge, found again whole) is dropped too.

    When boxes from different detectors (``source``) fall on one kept face, they are independent evidence: the
    kept face's confidence becomes ``1 - prod(1 - c)`` over the best confidence of each source (one source:
    its own confidence, unchanged). Its ``source`` then names them all, joined by "+", the kept box's first.
    """
    kept: list[Detection] = []
    best: list[dict[str, float]] = []
    for d in sorted(dets, key=lambda d: -d.confidence):
        for k, b in zip(kept, best):
            union, inside = iou(d.box, k.box)
            if union > iou_limit or inside > contain_limit:
                b.setdefault(d.source, d.confidence)
                break
        else:
            kept.append(d)
            best.append({d.source: d.confidence})
    for i, (k, b) in enumerate(zip(kept, best)):
        if len(b) > 1:
            conf = 1.0 - math.prod(1.0 - c for c in b.values())
            kept[i] = Detection(k.box, conf, k.mask, k.label, "+".join(b))
    return kept


def as_rgb_uint8(image) -> np.ndarray:
    """An RGB uint8 [H,W,3] contiguous array from a numpy/torch image (uint8, or float 0..1), or a PIL image."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
    if hasattr(image, "detach"):  # torch
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] < 3:
        raise TwigError(f"face detection needs an RGB image [H,W,3], got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return np.ascontiguousarray(arr)


# --------------------------------------------------------------------------------------------------
# Package checks that do not import the package


def _spec_dir(module: str) -> Optional[str]:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    return os.path.dirname(spec.origin) if spec.origin else None


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return "?"


def _first_version(*dists: str) -> str:
    for d in dists:
        v = _version(d)
        if v != "?":
            return f"{d} {v}"
    return "the installed version"


# --------------------------------------------------------------------------------------------------
# Detectors


class Detector:
    """Interface. ``name`` is what users pick; ``tile_small_faces`` asks detect_faces to also scan tiles."""

    name = "detector"
    tile_small_faces = False
    min_face = 0  # the smallest face (px) it finds, where it has such a limit

    def status(self) -> Optional[str]:
        """None when this detector can run here, else a one-line reason with the fix."""
        return None

    def detect(self, image: np.ndarray, confidence: float = 0.3) -> list[Detection]:
        raise NotImplementedError

    def check(self) -> None:
        reason = self.status()
        if reason is not None:
            raise TwigError(f"face detector {self.name}: {reason}")


class MediapipeDetector(Detector):
    """BlazeFace through mediapipe 0.10.21's legacy solutions API (models bundled in the wheel).

    ``model_selection`` 0 = short range (128 px network input, faces filling a good part of the frame),
    1 = full range (sparse, 192 px, smaller faces). The confidence is BlazeFace's score.
    """

    MODEL_FILES = {0: "face_detection_short_range.tflite", 1: "face_detection_full_range_sparse.tflite"}

    def __init__(self, model_selection: int):
        self.model_selection = model_selection
        self.name = "mediapipe_face_short" if model_selection == 0 else "mediapipe_face_full"
        self.tile_small_faces = True  # BlazeFace sees 128/192 px: a 50 px face in a 1024 px image vanishes
        self._graphs: dict[float, object] = {}  # min_detection_confidence -> FaceDetection
        self._lock = threading.Lock()

    def _required_files(self) -> list[str]:
        return [os.path.join("modules", "face_detection", self.MODEL_FILES[self.model_selection]),
                os.path.join("python", "solutions", "face_detection.py")]

    def status(self) -> Optional[str]:
        root = _spec_dir("mediapipe")
        if root is None:
            return f"mediapipe is not installed (optional: {MEDIAPIPE_HINT})"
        missing = [f for f in self._required_files() if not os.path.isfile(os.path.join(root, f))]
        if missing:
            return (f"mediapipe {_version('mediapipe')} ships no bundled face models (missing {missing[0]}); "
                    f"newer mediapipe wheels dropped them — {MEDIAPIPE_HINT}, or use opencv_haar or a YOLO model")
        return None

    @staticmethod
    def _solutions():
        import mediapipe as mp

        solutions = getattr(mp, "solutions", None)
        if solutions is None:
            raise TwigError(f"mediapipe {_version('mediapipe')} has no legacy 'solutions' API; {MEDIAPIPE_HINT}")
        return solutions

    def detect(self, image: np.ndarray, confidence: float = 0.3) -> list[Detection]:
        self.check()
        img = as_rgb_uint8(image)
        h, w = img.shape[:2]
        with self._lock:  # a mediapipe graph runs one image at a time; building one costs more than running it
            key = float(confidence)
            if key not in self._graphs:
                if len(self._graphs) >= 4:  # thresholds come and go with the node's widget: keep a few
                    for graph in self._graphs.values():
                        graph.close()
                    self._graphs.clear()
                fd = self._solutions().face_detection
                self._graphs[key] = fd.FaceDetection(model_selection=self.model_selection,
                                                     min_detection_confidence=key)
            result = self._graphs[key].process(img)
        out = []
        for d in result.detections or []:
            rb = d.location_data.relative_bounding_box
            box = clip_box((rb.xmin * w, rb.ymin * h, (rb.xmin + rb.width) * w, (rb.ymin + rb.height) * h), w, h)
            if box[2] - box[0] >= 1 and box[3] - box[1] >= 1:
                out.append(Detection(box, float(d.score[0]) if d.score else 0.0, None, "face", self.name))
        return out


class MediapipeMeshDetector(MediapipeDetector):
    """mediapipe face mesh: box = landmark extent, mask = convex hull of the landmarks.

    The mesh reports no score of its own: faces it returns passed ``min_detection_confidence``, and their
    confidence is given as 1.0.
    """

    def __init__(self):
        super().__init__(0)
        self.name = "mediapipe_face_mesh"
        self.tile_small_faces = True

    def _required_files(self) -> list[str]:
        return [os.path.join("modules", "face_landmark", "face_landmark.tflite"),
                os.path.join("modules", "face_detection", "face_detection_short_range.tflite"),
                os.path.join("python", "solutions", "face_mesh.py")]

    def detect(self, image: np.ndarray, confidence: float = 0.3) -> list[Detection]:
        self.check()
        img = as_rgb_uint8(image)
        h, w = img.shape[:2]
        fm = self._solutions().face_mesh
        with fm.FaceMesh(static_image_mode=True, max_num_faces=64, refine_landmarks=False,
                         min_detection_confidence=float(confidence)) as mesh:
            result = mesh.process(img)
        out = []
        for face in result.multi_face_landmarks or []:
            pts = np.array([(p.x * w, p.y * h) for p in face.landmark], dtype=np.float64)
            box = clip_box((pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max() + 1, pts[:, 1].max() + 1), w, h)
            if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                continue
            out.append(Detection(box, 1.0, polygon_mask(convex_hull(pts), h, w), "face", self.name))
        return out


class HaarDetector(Detector):
    """OpenCV's frontal-face Haar cascade (``haarcascade_frontalface_default.xml``, bundled with OpenCV 4.x).

    A cascade gives no probability; the confidence is a logistic map of its final-stage weight,
    ``1 / (1 + exp(-2 (w - 4.5)))``: faces score about 0.8-0.95 (weights 5-6), the textures that fool the
    cascade about 0.01-0.2 (weights 2-3.5), so the usual 0.3 threshold separates them.
    """

    name = "opencv_haar"

    def __init__(self, scale_factor: float = 1.1, min_neighbors: int = 5, min_size: int = 24):
        self.scale_factor, self.min_neighbors, self.min_size = scale_factor, min_neighbors, min_size
        self.min_face = min_size
        self._cascade = None
        self._lock = threading.Lock()

    def _cascade_path(self) -> Optional[str]:
        root = _spec_dir("cv2")
        if root is None:
            return None
        return os.path.join(root, "data", HAAR_FILE)

    def status(self) -> Optional[str]:
        path = self._cascade_path()
        if path is None:
            return f"OpenCV is not installed (optional: {OPENCV_HINT})"
        if not os.path.isfile(path):
            return (f"{_first_version('opencv-python-headless', 'opencv-python', 'opencv-contrib-python')} ships no "
                    f"Haar cascades ({HAAR_FILE}); OpenCV 4.x wheels do: {OPENCV_HINT}")
        return None

    @staticmethod
    def confidence_of(weight: float) -> float:
        return 1.0 / (1.0 + math.exp(-2.0 * (float(weight) - 4.5)))

    def detect(self, image: np.ndarray, confidence: float = 0.3) -> list[Detection]:
        self.check()
        import cv2

        with self._lock:
            if self._cascade is None:
                cascade = cv2.CascadeClassifier(self._cascade_path())
                if cascade.empty():
                    raise TwigError(f"face detector {self.name}: OpenCV could not read {self._cascade_path()}")
                self._cascade = cascade
            cascade = self._cascade
        img = as_rgb_uint8(image)
        h, w = img.shape[:2]
        gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        boxes, _, weights = cascade.detectMultiScale3(
            gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
            minSize=(self.min_size, self.min_size), outputRejectLevels=True)
        out = []
        for (x, y, bw, bh), wt in zip(np.asarray(boxes).reshape(-1, 4), np.asarray(weights).reshape(-1)):
            conf = self.confidence_of(wt)
            if conf >= confidence:
                out.append(Detection(clip_box((x, y, x + bw, y + bh), w, h), conf, None, "face", self.name))
        return out


# --------------------------------------------------------------------------------------------------
# The ensemble

# Each member's own score s is mapped to logistic(a·logit(s) + b) before merging, so that a confidence means
# about the same whatever found the face. (a, b) per member were set on bench/bench_faces.py's photographs:
# BlazeFace full range as it is (its false finds there score ≤ 0.65), short range lowered (a lone find of 0.54
# becomes 0.24: its true and false finds both score 0.5-0.8, so it counts mostly where another member agrees),
# Haar raised (its faces score from 0.01 up, while minNeighbors=5 already rejects nearly every texture).
# `python bench/bench_faces.py --calibration` fits them on half the cases instead and scores the other half.
# Members run down to MEMBER_FLOOR on this scale, so two weak finds of one face add up (merge_detections'
# rule) while one weak find alone stays below the usual 0.3.
CALIBRATION = {
    "mediapipe_face_full": (1.0, 0.0),
    "mediapipe_face_short": (1.0, -1.25),
    "opencv_haar": (0.7, 0.5),
}
MEMBER_FLOOR = 0.02
# Images up to this size (longer side) are run with a border of a quarter of that side (edge pixels repeated):
# a face that fills the frame (an ID photo, a crop) is found once it has the surroundings detectors expect.
PAD_LIMIT = 768
PAD_FRACTION = 0.25
# The longest side the ensemble's Haar cascade scans (its cost grows with the pixels at its smallest scale).
HAAR_SIDE = 512


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def calibrated(source: str, score: float, inverse: bool = False, table: Optional[dict] = None) -> float:
    """A member's score on the ensemble's common scale (YOLO models and unknown sources: unchanged);
    ``inverse``: the member score that maps to ``score``. ``table``: (a, b) per member, :data:`CALIBRATION`
    unless given."""
    a, b = (CALIBRATION if table is None else table).get(source, (1.0, 0.0))
    x = (_logit(score) - b) / a if inverse else a * _logit(score) + b
    return 1.0 / (1.0 + math.exp(-min(max(x, -50.0), 50.0)))


class EnsembleDetector(Detector):
    """Every installed built-in detector, each where it is strong, merged by :func:`merge_detections`.

    Members: mediapipe full range (whole image, 256 px tiles for faces down to 24 px in a 1024² image, and
    quarter-turned copies), mediapipe short range (whole image: close-ups and tight crops, which the full-range
    model misses; it finds faces turned up to 180° itself), OpenCV Haar (upright: frontal faces at every scale;
    turned copies would triple its cost), plus any YOLO detectors given (whole image and turned copies). Small
    images get a border first (:data:`PAD_LIMIT`). Haar scans large images at most :data:`HAAR_SIDE` px wide,
    which costs a quarter of the full size at 1024², and looks at the faces too small for that scale on
    upscaled crops around where the other members found them, so it still has its say on every face. A member
    that is not installed is left out; the ensemble needs one. Scores are calibrated per member
    (:data:`CALIBRATION`), and a face several members found gets their combined confidence. Detections say
    ``source="ensemble"`` and name the members in ``found_by``.
    """

    name = "ensemble"
    tile_small_faces = True
    # (member, runs on tiles, runs on turned copies, longest side it scans, None = the image's own)
    MEMBERS = (("mediapipe_face_full", True, True, None), ("mediapipe_face_short", False, False, None),
               ("opencv_haar", False, False, HAAR_SIDE))

    def __init__(self, extra: Iterable[Detector] = (), calibration: Optional[dict] = None):
        self.extra = list(extra)
        self.calibration = CALIBRATION if calibration is None else calibration

    def members(self) -> list[tuple[Detector, bool, bool, Optional[int]]]:
        """(detector, tiles, turns, longest side) for each usable member."""
        out = [(get_detector(name), tiles, turns, side) for name, tiles, turns, side in self.MEMBERS]
        out += [(det, False, True, None) for det in self.extra]
        return [m for m in out if m[0].status() is None]

    def status(self) -> Optional[str]:
        if self.members():
            return None
        return "none of its members is installed: " + "; ".join(
            f"{name}: {get_detector(name).status()}" for name, *_ in self.MEMBERS)

    def detect(self, image: np.ndarray, confidence: float = 0.3, tiles="auto",
               turns: tuple[int, ...] = (1, 2, 3)) -> list[Detection]:
        return self.combine(self.member_finds(image, min(confidence, MEMBER_FLOOR), tiles, turns), confidence)

    def combine(self, found: list[Detection], confidence: float) -> list[Detection]:
        """The faces in members' finds (:meth:`member_finds`): scores calibrated, finds below
        :data:`MEMBER_FLOOR` dropped, boxes merged, faces below ``confidence`` dropped."""
        floor = min(confidence, MEMBER_FLOOR)
        out = [Detection(d.box, c, d.mask, d.label, d.source) for d in found
               if (c := calibrated(d.source, d.confidence, table=self.calibration)) >= floor]
        return [Detection(d.box, d.confidence, d.mask, d.label, self.name, tuple(d.source.split("+")))
                for d in merge_detections(out) if d.confidence >= confidence]

    def member_finds(self, image: np.ndarray, floor: float, tiles="auto",
                     turns: tuple[int, ...] = (1, 2, 3)) -> list[Detection]:
        """Every member's finds scoring at least ``floor`` once calibrated, unmerged, with the member's own
        score and name (``source``), in the image's pixels."""
        self.check()
        img = as_rgb_uint8(image)
        h, w = img.shape[:2]
        pad = round(PAD_FRACTION * max(h, w)) if max(h, w) <= PAD_LIMIT else 0
        work = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="edge") if pad else img
        tiles = "fine" if tiles == "auto" else tiles
        found, scaled = [], []
        for det, member_tiles, member_turns, side in self.members():
            member_floor = calibrated(det.name, floor, inverse=True, table=self.calibration)
            scale = min(1.0, side / max(work.shape[:2])) if side else 1.0
            if scale < 1.0:
                scaled.append((det, member_floor, scale))
                dets = _at_scale(det, work, member_floor, scale)
            else:
                dets, _ = _single_passes(det, work, member_floor, tiles if member_tiles else "off",
                                         turns if member_turns else ())
            found += [Detection(d.box, d.confidence, d.mask, d.label, det.name) for d in dets]
        for det, member_floor, scale in scaled:  # faces too small for the member at its scale: upscaled crops
            smallest = det.min_face / scale
            small = merge_detections(d for d in found if d.source != det.name and max(d.width, d.height) < smallest)
            for d in small:
                found += [Detection(e.box, e.confidence, e.mask, e.label, det.name)
                          for e in _around(det, work, member_floor, d.box)]
        out = []
        for d in found:
            box = clip_box((d.box[0] - pad, d.box[1] - pad, d.box[2] - pad, d.box[3] - pad), w, h)
            mask = None if d.mask is None else np.ascontiguousarray(d.mask[pad:pad + h, pad:pad + w])
            if box[2] - box[0] >= 1 and box[3] - box[1] >= 1:
                out.append(Detection(box, d.confidence, mask, d.label, d.source))
        return out


def _resized(img: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((width, height), Image.BILINEAR, reducing_gap=2.0))


def _at_scale(detector: Detector, img: np.ndarray, confidence: float, scale: float) -> list[Detection]:
    """``detector`` on ``img`` resized by ``scale``, boxes in ``img``'s pixels (box-only detectors)."""
    h, w = img.shape[:2]
    small = _resized(img, max(1, round(w * scale)), max(1, round(h * scale)))
    sx, sy = small.shape[1] / w, small.shape[0] / h
    return [Detection(clip_box((d.box[0] / sx, d.box[1] / sy, d.box[2] / sx, d.box[3] / sy), w, h), d.confidence,
                      None, d.label, d.source)
            for d in detector.detect(small, confidence) if d.confidence >= confidence]


def _around(detector: Detector, img: np.ndarray, confidence: float, box) -> list[Detection]:
    """``detector`` on a crop three times the size of ``box`` around it, enlarged so that the face there is
    twice the detector's smallest face (``min_face``); boxes in ``img``'s pixels."""
    h, w = img.shape[:2]
    side = max(box[2] - box[0], box[3] - box[1], 1.0)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    x0, y0 = max(0, int(cx - 1.5 * side)), max(0, int(cy - 1.5 * side))
    x1, y1 = min(w, int(math.ceil(cx + 1.5 * side))), min(h, int(math.ceil(cy + 1.5 * side)))
    scale = max(1.0, 2.0 * detector.min_face / side)
    found = _at_scale(detector, np.ascontiguousarray(img[y0:y1, x0:x1]), confidence, scale)
    return [d.shifted(x0, y0) for d in found]


# --------------------------------------------------------------------------------------------------
# Registry and tiled detection

_BUILTIN = {
    "ensemble": EnsembleDetector,
    "mediapipe_face_full": lambda: MediapipeDetector(1),
    "mediapipe_face_short": lambda: MediapipeDetector(0),
    "mediapipe_face_mesh": MediapipeMeshDetector,
    "opencv_haar": HaarDetector,
}
BUILTIN_DETECTORS = tuple(_BUILTIN)
_INSTANCES: dict[tuple, Detector] = {}
_INSTANCES_LOCK = threading.Lock()


def available_detectors() -> dict[str, Optional[str]]:
    """Built-in detector name -> None if usable here, else why not (checked without importing packages)."""
    return {name: get_detector(name).status() for name in BUILTIN_DETECTORS}


def get_detector(name: str, device: Optional[str] = None) -> Detector:
    """A built-in detector by name, or a YOLO model by file path (``.pt``/``.pth``). Instances are reused."""
    key = (name, device)
    if name not in _BUILTIN and os.path.isfile(name):  # a YOLO file replaced on disk is loaded again
        st = os.stat(name)
        key += (st.st_mtime_ns, st.st_size)
    with _INSTANCES_LOCK:
        det = _INSTANCES.get(key)
        if det is None:
            if name in _BUILTIN:
                det = _BUILTIN[name]()
            elif name.lower().endswith(YOLO_EXTENSIONS) or os.sep in name or "/" in name:
                from .yolo import YoloDetector

                det = YoloDetector(name, device)
            else:
                raise TwigError(f"unknown face detector {name!r}; choose one of {', '.join(BUILTIN_DETECTORS)} "
                                f"or a YOLO .pt file")
            _INSTANCES[key] = det
        return det


def face_models(paths) -> list[str]:
    """The YOLO files among ``paths`` that find faces (a name containing "face"): the same folders hold hand and
    person models, which must not join an ensemble of face detectors."""
    return [p for p in paths if "face" in os.path.basename(p).lower()]


def choose_detector(name: str, yolo_paths=(), device: Optional[str] = None) -> Detector:
    """The detector a user picked: ``ensemble`` with the YOLO face models among ``yolo_paths`` as extra members,
    another built-in by name, or a YOLO file by path (on ``device``, ultralytics' device string)."""
    if name == "ensemble":
        return EnsembleDetector(extra=[get_detector(p, device=device) for p in face_models(yolo_paths)])
    return get_detector(name, device=None if name in _BUILTIN else device)


TILE_SIZE = 512  # 4x the short-range network's 128 px input: faces keep the scale the model was trained at
FINE_TILE_SIZE = 256  # full range's 192 px input sees a 24 px face of a 256 px tile at 18 px
# Faces smaller than this found in tiles are dropped: what BlazeFace finds there below 20 px is texture (the
# tiles are for faces from 24 px).
MIN_TILE_FACE = 20


def _starts(size: int, tile: int, overlap: float) -> list[int]:
    if size <= tile:
        return [0]
    stride = max(1, int(tile * (1.0 - overlap)))
    n = int(math.ceil((size - tile) / stride)) + 1
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def tile_grid(height: int, width: int, tile: int = TILE_SIZE, overlap: float = 0.5) -> list[tuple[int, int, int, int]]:
    """Overlapping square tiles (x0, y0, x1, y1) of ``tile`` px covering the image; with half overlap every
    face smaller than half a tile lies whole inside at least one tile."""
    tw, th = min(tile, width), min(tile, height)
    return [(x, y, x + tw, y + th) for y in _starts(height, th, overlap) for x in _starts(width, tw, overlap)]


def _tile_size(detector: Detector, height: int, width: int, tiles) -> Optional[int]:
    """Tile size for ``tiles`` ("auto", "on", "fine", "off", or a size in px), or None for whole-image detection
    only."""
    if tiles in ("off", None, 0, False):
        return None
    if tiles == "auto":
        tiles = "on" if detector.tile_small_faces else "off"
        if tiles == "off":
            return None
    size = TILE_SIZE if tiles in ("on", True) else FINE_TILE_SIZE if tiles == "fine" else tiles
    if not isinstance(size, int) or size < 64:
        raise TwigError(f"tiles must be 'auto', 'on', 'fine', 'off' or a tile size of at least 64 px, got {tiles!r}")
    return size if max(height, width) > size * 1.25 else None


def _touches_inner_edge(box, x0: int, y0: int, x1: int, y1: int, width: int, height: int, margin: float = 2.0) -> bool:
    """Whether a box found in tile (x0, y0, x1, y1) (box in tile coordinates) reaches a tile edge that is not
    an image edge."""
    bx0, by0, bx1, by1 = box
    tw, th = x1 - x0, y1 - y0
    return ((x0 > 0 and bx0 <= margin) or (y0 > 0 and by0 <= margin)
            or (x1 < width and bx1 >= tw - margin) or (y1 < height and by1 >= th - margin))


def _turned_back(box, k: int, height: int, width: int):
    """A box found in ``np.rot90(image, k)`` (k quarter turns counter-clockwise) in the image's coordinates."""
    x0, y0, x1, y1 = box
    h, w = (width, height) if k % 2 else (height, width)  # the turned image's size
    for _ in range(k % 4):  # undo one quarter turn: (x, y) in the turned image was (w_turned - y, x) before
        x0, y0, x1, y1 = h - y1, x0, h - y0, x1
        h, w = w, h
    return x0, y0, x1, y1


def _turns(detector: Detector, turns) -> tuple[int, ...]:
    """Quarter turns (1-3) to run besides the upright image for ``turns`` ("auto", "on", "off")."""
    if turns not in ("auto", "on", "off", True, False, None):
        raise TwigError(f"turned_heads must be 'auto', 'on' or 'off', got {turns!r}")
    on = turns in ("on", True) or (turns == "auto" and isinstance(detector, EnsembleDetector))
    return (1, 2, 3) if on else ()


def _single_passes(detector: Detector, img: np.ndarray, confidence: float, tiles, turns: tuple[int, ...]):
    """One detector over the whole image, its tiles (see detect_faces) and its quarter-turned copies, unmerged."""
    h, w = img.shape[:2]
    size = _tile_size(detector, h, w, tiles)
    found = [d for d in detector.detect(img, confidence) if d.confidence >= confidence]
    if size is not None:
        for x0, y0, x1, y1 in tile_grid(h, w, size):
            crop = np.ascontiguousarray(img[y0:y1, x0:x1])
            for d in detector.detect(crop, confidence):
                # a face cut by an inner tile edge lies whole in a neighbouring tile (half overlap): skip it
                if (d.confidence >= confidence and max(d.width, d.height) >= MIN_TILE_FACE
                        and not _touches_inner_edge(d.box, x0, y0, x1, y1, w, h)):
                    found.append(d.shifted(x0, y0, (h, w)))
    for k in turns:
        for d in detector.detect(np.ascontiguousarray(np.rot90(img, k)), confidence):
            if d.confidence >= confidence:
                mask = None if d.mask is None else np.ascontiguousarray(np.rot90(d.mask, -k))
                found.append(Detection(_turned_back(d.box, k, h, w), d.confidence, mask, d.label, d.source))
    return found, size is not None or bool(turns)


def detect_faces(image, detector: Detector | str, confidence: float = 0.3, tiles="auto",
                 turned_heads="auto") -> list[Detection]:
    """Faces in one RGB image (uint8 or float 0..1, [H,W,3]) with confidence ≥ ``confidence``.

    ``tiles``: "off" = the whole image only; "on" (or a tile size in px) = the whole image plus overlapping
    512 px tiles, for faces too small for BlazeFace's 128/192 px input; "fine" = 256 px tiles, which BlazeFace
    enlarges for faces down to 24 px in a 1024² image (about five times the work of "on"); "auto" = "fine" for
    the ensemble, "on" for the mediapipe models, "off" for the Haar cascade (it scans every scale itself) and
    YOLO. ``turned_heads``: "on" also runs the
    detector on the image turned by 90, 180 and 270 degrees (boxes turned back), for faces lying sideways or
    upside down — three more whole-image passes; "auto" = on for the ensemble only. Faces found more than once
    are merged by :func:`merge_detections` (the most confident box wins; a box mostly inside a kept one is
    dropped, and a face cut by a tile's inner edge is ignored: with half overlap it lies whole in a
    neighbouring tile). The ensemble runs this for each member, then merges everything with the same rule.
    """
    if isinstance(detector, str):
        detector = get_detector(detector)
    img = as_rgb_uint8(image)
    turns = _turns(detector, turned_heads)
    if isinstance(detector, EnsembleDetector):
        return detector.detect(img, confidence, tiles, turns)
    found, several = _single_passes(detector, img, confidence, tiles, turns)
    return merge_detections(found) if several else found
