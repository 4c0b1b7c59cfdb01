"""YOLO face models (bbox or segmentation ``.pt``) through ultralytics, loaded with PyTorch's restricted
(``weights_only``) unpickler so that a model file cannot run code.

torch >= 2.6 loads with ``weights_only=True`` by default, which rejects ultralytics' pickled models, and
ultralytics answers by passing ``weights_only=False``. Here the checkpoint's globals are listed without
unpickling, anything but plain classes is refused (naming it), and ultralytics loads the file while every
``torch.load`` it makes is held to ``weights_only=True`` with exactly those classes allowed.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from typing import Optional

import numpy as np

from ..errors import TwigError
from .detect import ULTRALYTICS_HINT, YOLO_EXTENSIONS, Detection, Detector, as_rgb_uint8, clip_box


# Globals a YOLO checkpoint may name beyond what torch's weights_only unpickler allows by itself: classes
# only (never functions such as builtins.getattr, which can reach anything).
_SAFE_PREFIXES = ("ultralytics.", "torch.nn.modules.", "collections.", "numpy.dtypes.")
_SAFE_EXACT = {
    "builtins.set", "builtins.frozenset", "builtins.slice", "builtins.complex", "builtins.bytearray",
    "builtins.range", "torch.Size", "numpy.dtype", "numpy.ndarray",
    "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.Path", "types.SimpleNamespace", "argparse.Namespace",
    "datetime.datetime", "datetime.date", "datetime.timedelta",
}
# numpy helpers that rebuild arrays/scalars from bytes (what torch itself allows for numpy, by name)
_SAFE_FUNCTIONS = {"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
                   "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "_codecs.encode"}


def _resolve_global(name: str):
    import importlib

    module, _, attr = name.rpartition(".")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def checkpoint_globals(path: str) -> list[str]:
    """Globals a torch checkpoint names that torch's weights_only unpickler does not allow by default,
    read without unpickling anything (``torch.serialization.get_unsafe_globals_in_checkpoint``)."""
    import torch

    fn = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if fn is None or not hasattr(torch.serialization, "safe_globals"):
        raise TwigError(f"{os.path.basename(path)}: loading YOLO models safely needs torch 2.5 or newer "
                        f"(this is torch {torch.__version__})")
    try:
        return sorted(fn(path))
    except Exception as e:  # noqa: BLE001 - a broken or legacy-format file
        raise TwigError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e


def safe_globals_for(path: str) -> list:
    """The objects to allow for ``path`` under the restricted unpickler, or a TwigError that names every global
    the file needs that is not a plain class (which could run code when the file is loaded)."""
    names = checkpoint_globals(path)
    refused, allowed = [], []
    for name in names:
        ok = name in _SAFE_EXACT or name in _SAFE_FUNCTIONS or name.startswith(_SAFE_PREFIXES)
        obj = None
        if ok:
            try:
                obj = _resolve_global(name)
            except Exception:  # noqa: BLE001 - missing module or attribute
                ok = False
        if ok and name not in _SAFE_FUNCTIONS and not isinstance(obj, type):
            ok = False
        (allowed if ok else refused).append(obj if ok else name)
    if refused:
        raise TwigError(
            f"{os.path.basename(path)}: refusing to load this YOLO model: unpickling it would call "
            f"{', '.join(refused)}, which can run arbitrary code. Twig loads .pt models only with PyTorch's "
            f"restricted (weights_only) unpickler; use a model made by ultralytics' own training or export.")
    return allowed


class YoloDetector(Detector):
    """A YOLO face model (bbox or segmentation ``.pt``) run through ultralytics.

    Loading: the checkpoint's globals are listed without unpickling; anything but plain classes (e.g.
    ``builtins.getattr``, ``os.system``) is refused. Then ultralytics loads it while ``torch.load`` is held
    to ``weights_only=True`` with exactly those classes allowed, so the file cannot run code.
    Confidence is YOLO's box score; segmentation models also give masks.
    """

    def __init__(self, path: str, device: Optional[str] = None):
        """``device``: as ultralytics spells it ("cpu", "0" for the first CUDA GPU, "mps"); None = its choice."""
        self.path = os.path.abspath(path)
        self.name = "yolo:" + os.path.basename(path)
        self.device = device
        self._model = None
        self._lock = threading.Lock()

    def status(self) -> Optional[str]:
        if importlib.util.find_spec("ultralytics") is None:
            return f"ultralytics is not installed (optional, for YOLO .pt face models: {ULTRALYTICS_HINT})"
        if not os.path.isfile(self.path):
            return f"model file not found: {self.path} (put YOLO face models in models/ultralytics/bbox)"
        if not self.path.lower().endswith(YOLO_EXTENSIONS):
            return f"{os.path.basename(self.path)} is not a .pt/.pth model"
        return None

    def load(self):
        self.check()
        with self._lock:
            if self._model is None:
                self._model = load_yolo_safely(self.path)
            return self._model

    def detect(self, image: np.ndarray, confidence: float = 0.3) -> list[Detection]:
        from PIL import Image

        model = self.load()
        img = as_rgb_uint8(image)
        h, w = img.shape[:2]
        kwargs = dict(conf=float(confidence), verbose=False, retina_masks=True)
        if self.device is not None:
            kwargs["device"] = self.device
        results = model.predict(Image.fromarray(img), **kwargs)
        if not results:
            return []
        r = results[0]
        boxes = getattr(r, "boxes", None)
        if boxes is None or len(boxes) == 0:
            return []
        xyxy = _np(boxes.xyxy).reshape(-1, 4)
        conf = _np(boxes.conf).reshape(-1)
        masks = None
        if getattr(r, "masks", None) is not None:
            masks = _np(r.masks.data)
            if masks.shape[-2:] != (h, w):
                masks = _resize_masks(masks, h, w)
            masks = masks > 0.5
        out = []
        for i, (b, c) in enumerate(zip(xyxy, conf)):
            box = clip_box(b, w, h)
            if box[2] - box[0] >= 1 and box[3] - box[1] >= 1:
                m = masks[i] if masks is not None and i < len(masks) else None
                out.append(Detection(box, float(c), m, "face", self.name))
        return out


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _resize_masks(masks: np.ndarray, h: int, w: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32))[:, None]
    return F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[:, 0].numpy()


_LOAD_LOCK = threading.Lock()


def load_yolo_safely(path: str):
    """``ultralytics.YOLO(path)`` with every ``torch.load`` it makes forced to ``weights_only=True`` and only the
    file's own (checked) classes allowed."""
    import torch

    allowed = safe_globals_for(path)
    from ultralytics import YOLO

    real_load = torch.load

    def restricted_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    with _LOAD_LOCK, torch.serialization.safe_globals(allowed):
        torch.load = restricted_load
        try:
            return YOLO(path)
        except TwigError:
            raise
        except Exception as e:  # noqa: BLE001
            raise TwigError(f"{os.path.basename(path)}: ultralytics could not load it with the restricted "
                            f"unpickler ({type(e).__name__}: {e})") from e
        finally:
            torch.load = real_load
