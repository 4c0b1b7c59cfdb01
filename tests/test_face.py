"""Face refine: detectors on real photographs, mask and crop geometry, the crop -> refine -> paste round trip,
end to end with tiny random Twig models, and the two ComfyUI nodes.

Detector tests run for every installed detector and are skipped, with the reason, for the others
(mediapipe==0.10.21, opencv-python-headless<5 and scikit-image come from requirements-test.txt). YOLO is
tested with a stand-in ``ultralytics`` module: not installed, file missing, pickles refused, safe loading.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from twig_core.errors import TwigError
from twig_core.face import detect as fdetect
from twig_core.face import masks as M
from twig_core.face import refine as R
from twig_core.face import yolo as fyolo
from twig_core.face.detect import Detection

# --------------------------------------------------------------------------------------------------
# Real photographs (scikit-image's data folder)

# Hand-measured on astronaut.png (512x512): the head including hair and chin, and points that any face box
# must contain (both eyes and the mouth).
HEAD = (150, 25, 305, 200)
EYES_AND_MOUTH = ((203, 102), (246, 102), (224, 145))


def _photo(name: str) -> np.ndarray:
    data = pytest.importorskip("skimage.data", reason="scikit-image provides the test photographs")
    from PIL import Image

    path = Path(os.path.dirname(data.__file__)) / name
    if not path.is_file():
        pytest.skip(f"scikit-image has no {name}")
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def astronaut():
    return _photo("astronaut.png")


def _inside(box, region, tol=0.0) -> bool:
    return (box[0] >= region[0] - tol and box[1] >= region[1] - tol and box[2] <= region[2] + tol
            and box[3] <= region[3] + tol)


def _contains(box, point) -> bool:
    return box[0] <= point[0] < box[2] and box[1] <= point[1] < box[3]


def _usable(name):
    why = fdetect.get_detector(name).status()
    if why is not None:
        pytest.skip(f"{name}: {why}")
    return name


@pytest.fixture(params=fdetect.BUILTIN_DETECTORS)
def detector(request):
    return _usable(request.param)


def test_detector_finds_the_astronauts_face(detector, astronaut):
    found = fdetect.detect_faces(astronaut, detector, 0.3)
    assert len(found) == 1, [d.to_dict() for d in found]
    d = found[0]
    assert _inside(d.box, HEAD), d.box
    assert all(_contains(d.box, p) for p in EYES_AND_MOUTH), d.box
    assert 0.3 <= d.confidence <= 1.0 and d.source == detector
    if d.mask is not None:  # the mesh hull: inside the box, covering the eyes and mouth
        assert d.mask.shape == astronaut.shape[:2] and d.mask.dtype == bool
        ys, xs = np.nonzero(d.mask)
        assert xs.min() >= d.box[0] - 1 and xs.max() < d.box[2] + 1
        assert all(d.mask[y, x] for x, y in EYES_AND_MOUTH)


def test_detector_finds_four_faces_in_a_2x2_tiling(detector, astronaut):
    tiled = np.concatenate([np.concatenate([astronaut, astronaut], 1)] * 2, 0)
    found = fdetect.detect_faces(tiled, detector, 0.3)
    assert len(found) == 4, [d.to_dict() for d in found]
    quadrants = set()
    for d in found:
        qx, qy = int(d.center[0] // 512), int(d.center[1] // 512)
        quadrants.add((qx, qy))
        head = (HEAD[0] + 512 * qx, HEAD[1] + 512 * qy, HEAD[2] + 512 * qx, HEAD[3] + 512 * qy)
        assert _inside(d.box, head), (d.box, head)
        assert all(_contains(d.box, (x + 512 * qx, y + 512 * qy)) for x, y in EYES_AND_MOUTH), d.box
    assert quadrants == {(0, 0), (1, 0), (0, 1), (1, 1)}


def test_detector_finds_a_distant_face(detector, astronaut):
    """The astronaut at 1/2 size (face about 50 px) in a 1024x768 picture: the case face refine is for."""
    if detector == "mediapipe_face_short":
        pytest.skip("the short-range model is for close-ups (faces within about 2 m)")
    from PIL import Image

    canvas = Image.new("RGB", (1024, 768), (128, 128, 128))
    canvas.paste(Image.fromarray(astronaut).resize((256, 256), Image.LANCZOS), (600, 400))
    found = fdetect.detect_faces(np.asarray(canvas), detector, 0.3)
    assert len(found) == 1, [d.to_dict() for d in found]
    head = tuple(600 + v / 2 if i % 2 == 0 else 400 + v / 2 for i, v in enumerate(HEAD))
    assert _inside(found[0].box, head, tol=2), (found[0].box, head)
    assert all(_contains(found[0].box, (600 + x / 2, 400 + y / 2)) for x, y in EYES_AND_MOUTH)


@pytest.mark.parametrize("photo", ["coffee.png", "chelsea.png"])
def test_detector_finds_nothing_on_face_free_photos(detector, photo):
    assert fdetect.detect_faces(_photo(photo), detector, 0.3) == []


def test_detection_accepts_float_images_and_reports_backends(astronaut):
    status = fdetect.available_detectors()
    assert set(status) == set(fdetect.BUILTIN_DETECTORS)
    assert all(v is None or isinstance(v, str) and v for v in status.values())
    name = next((n for n, why in status.items() if why is None), None)
    if name is None:
        pytest.skip("no face detector installed")
    as_float = torch.from_numpy(astronaut.astype(np.float32) / 255.0)
    a = fdetect.detect_faces(as_float, name, 0.3)
    b = fdetect.detect_faces(astronaut, name, 0.3)
    assert [d.box for d in a] == [d.box for d in b]


def test_unknown_detector_name():
    with pytest.raises(TwigError, match="unknown face detector"):
        fdetect.get_detector("retinaface")


# --------------------------------------------------------------------------------------------------
# Missing packages and models: each says so instead of finding nothing


def test_mediapipe_missing_or_without_bundled_models(monkeypatch, tmp_path):
    monkeypatch.setattr(fdetect, "_spec_dir", lambda m: None)
    for det in (fdetect.MediapipeDetector(0), fdetect.MediapipeDetector(1), fdetect.MediapipeMeshDetector()):
        assert "mediapipe is not installed" in det.status() and "0.10.21" in det.status()
        with pytest.raises(TwigError, match="not installed"):
            det.detect(np.zeros((64, 64, 3), np.uint8))
    # a newer wheel: the package is there, its model files are not
    (tmp_path / "python" / "solutions").mkdir(parents=True)
    monkeypatch.setattr(fdetect, "_spec_dir", lambda m: str(tmp_path) if m == "mediapipe" else None)
    why = fdetect.MediapipeDetector(1).status()
    assert "ships no bundled face models" in why and "face_detection_full_range_sparse.tflite" in why
    assert "mediapipe==0.10.21" in why


def test_opencv_missing_or_without_cascades(monkeypatch, tmp_path):
    monkeypatch.setattr(fdetect, "_spec_dir", lambda m: None)
    assert "OpenCV is not installed" in fdetect.HaarDetector().status()
    monkeypatch.setattr(fdetect, "_spec_dir", lambda m: str(tmp_path) if m == "cv2" else None)
    why = fdetect.HaarDetector().status()
    assert "ships no Haar cascades" in why and "opencv-python-headless<5" in why


def test_haar_confidence_is_monotone_and_calibrated():
    conf = [fdetect.HaarDetector.confidence_of(w) for w in (1.0, 2.0, 3.5, 4.5, 5.0, 6.0)]
    assert conf == sorted(conf) and conf[2] < 0.3 < conf[4] and abs(conf[3] - 0.5) < 1e-9


# --------------------------------------------------------------------------------------------------
# YOLO through a stand-in ultralytics


def _make_boom(marker):
    """What a malicious pickle would call (writes a file if it ever runs)."""
    Path(marker).write_text("ran")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_make_boom, (self.marker,))


@pytest.fixture
def fake_ultralytics(monkeypatch):
    """Modules ``ultralytics`` and ``ultralytics.nn.tasks`` with a YOLO that loads like the real one (torch.load
    on the file) and predicts fixed boxes."""
    root = types.ModuleType("ultralytics")
    root.__spec__ = importlib.machinery.ModuleSpec("ultralytics", None, is_package=True)
    root.__path__ = []
    nn_mod = types.ModuleType("ultralytics.nn")
    nn_mod.__spec__ = importlib.machinery.ModuleSpec("ultralytics.nn", None, is_package=True)
    tasks = types.ModuleType("ultralytics.nn.tasks")
    tasks.__spec__ = importlib.machinery.ModuleSpec("ultralytics.nn.tasks", None)

    class DetectionModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 1)

    DetectionModel.__module__ = "ultralytics.nn.tasks"
    DetectionModel.__qualname__ = "DetectionModel"
    tasks.DetectionModel = DetectionModel
    calls = []

    class Boxes:
        def __init__(self):
            self.xyxy = torch.tensor([[10.0, 12.0, 40.0, 44.0], [50.0, 5.0, 70.0, 30.0]])
            self.conf = torch.tensor([0.9, 0.4])

        def __len__(self):
            return 2

    class Masks:
        def __init__(self, h, w):
            m = torch.zeros(2, h, w)
            m[0, 14:40, 12:38] = 1
            m[1, 6:28, 52:68] = 1
            self.data = m

    class Result:
        def __init__(self, h, w, seg):
            self.boxes = Boxes()
            self.masks = Masks(h, w) if seg else None

    class YOLO:
        def __init__(self, path):
            calls.append(("load", path))
            self.ckpt = torch.load(path, map_location="cpu")  # like ultralytics: no weights_only argument
            self.seg = "seg" in os.path.basename(path)

        def predict(self, image, **kwargs):
            calls.append(("predict", kwargs))
            w, h = image.size
            return [Result(h, w, self.seg)]

    root.YOLO = YOLO
    root.nn = nn_mod
    nn_mod.tasks = tasks
    for name, mod in (("ultralytics", root), ("ultralytics.nn", nn_mod), ("ultralytics.nn.tasks", tasks)):
        monkeypatch.setitem(sys.modules, name, mod)
    return types.SimpleNamespace(DetectionModel=DetectionModel, calls=calls)


def test_yolo_not_installed(monkeypatch, tmp_path):
    real = fdetect.importlib.util.find_spec
    monkeypatch.setattr(fdetect.importlib.util, "find_spec", lambda n, *a: None if n == "ultralytics" else real(n, *a))
    det = fyolo.YoloDetector(str(tmp_path / "face_yolov8n.pt"))
    assert "ultralytics is not installed" in det.status()
    with pytest.raises(TwigError, match="ultralytics is not installed"):
        det.detect(np.zeros((32, 32, 3), np.uint8))


def test_yolo_model_file_missing(fake_ultralytics, tmp_path):
    det = fyolo.YoloDetector(str(tmp_path / "face_yolov8n.pt"))
    assert "model file not found" in det.status() and "models/ultralytics/bbox" in det.status()


def test_yolo_refuses_pickles_that_would_run_code(fake_ultralytics, tmp_path):
    marker = tmp_path / "ran.txt"
    path = tmp_path / "evil_face.pt"
    torch.save({"model": fake_ultralytics.DetectionModel(), "extra": _Payload(str(marker))}, path)
    det = fyolo.YoloDetector(str(path))
    assert det.status() is None
    with pytest.raises(TwigError, match=r"refusing to load.*test_face\._make_boom"):
        det.detect(np.zeros((32, 32, 3), np.uint8))
    assert not marker.exists()
    assert not any(c[0] == "load" for c in fake_ultralytics.calls)  # ultralytics never saw the file

    # builtins.getattr is refused too, even though it is a builtin
    path2 = tmp_path / "getattr_face.pt"

    class GetattrPayload:
        def __reduce__(self):
            return (getattr, (_Payload, "__init__"))

    torch.save({"x": GetattrPayload()}, path2)
    with pytest.raises(TwigError, match="builtins.getattr"):
        fyolo.safe_globals_for(str(path2))


@pytest.mark.parametrize("seg", [False, True])
def test_yolo_loads_with_the_restricted_unpickler_and_detects(fake_ultralytics, tmp_path, monkeypatch, seg):
    path = tmp_path / ("face_yolov8n-seg.pt" if seg else "face_yolov8n.pt")
    torch.save({"model": fake_ultralytics.DetectionModel(), "date": "2024-01-01"}, path)
    seen = {}
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    det = fyolo.YoloDetector(str(path))
    found = fdetect.detect_faces(np.zeros((48, 80, 3), np.uint8), det, 0.3)
    assert seen.get("weights_only") is True
    assert torch.load is spy  # the temporary restriction is undone
    assert [d.box for d in found] == [(10.0, 12.0, 40.0, 44.0), (50.0, 5.0, 70.0, 30.0)]
    assert [round(d.confidence, 2) for d in found] == [0.9, 0.4] and found[0].source == "yolo:" + path.name
    predict = [c[1] for c in fake_ultralytics.calls if c[0] == "predict"][0]
    assert predict["conf"] == 0.3 and predict["retina_masks"] is True
    if seg:
        assert found[0].mask.shape == (48, 80) and found[0].mask[20, 20] and not found[0].mask[2, 2]
    else:
        assert found[0].mask is None


# --------------------------------------------------------------------------------------------------
# Masks and crops


def test_grow_erode_and_box_mask():
    m = M.box_mask((10.2, 20.0, 30.0, 40.5), 64, 64)
    assert m.sum() == 20 * 21 and m[20, 10] == 1 and m[40, 29] == 1 and m[41, 29] == 0
    assert M.grow(m, 4).sum() == 28 * 29
    assert M.grow(m, -3).sum() == 14 * 15
    assert torch.equal(M.grow(m, 0), m)
    assert M.bbox_of(M.grow(m, 4)) == (6, 16, 34, 45)


def test_feather_is_bounded_monotone_and_exactly_zero_beyond_its_radius():
    m = M.box_mask((40, 30, 80, 70), 100, 120)
    for px in (1, 4, 8, 16):
        f = M.feather(m, px)
        assert f.min() >= 0 and f.max() <= 1
        support = M.bbox_of(f)
        assert support == (40 - px, 30 - px, 80 + px, 70 + px)
        row = f[50]  # through the box: rises monotonically to the box, falls after it
        left, right = row[: 60], row[60:]
        assert torch.all(left[1:] >= left[:-1]) and torch.all(right[1:] <= right[:-1])
        col = f[:, 60]
        assert torch.all(col[1:50] >= col[:49]) and torch.all(col[51:] <= col[50:-1])
        assert f[50, 60] == 1.0  # deep inside stays fully on
        assert torch.all(f[m == 0][(M.grow(m, px) == 0)[m == 0]] == 0)
    with pytest.raises(TwigError):
        M.feather(m, -1)


def test_crop_plan_scales_faces_to_the_guide_size_in_vae_cells():
    p = M.plan_crop((100, 100, 140, 150), None, 512, 512, crop_factor=3.0, guide_size=512, max_size=1024)
    assert (p.width, p.height) == (120, 150)
    assert p.work_width % 32 == 0 and p.work_height % 32 == 0 and max(p.work_width, p.work_height) <= 1024
    assert abs(p.work_height / p.height * 50 - 512) < 0.2 * 512 or p.work_height == 1024
    # a face near the corner: the crop is shifted inside, not cut
    p = M.plan_crop((0, 0, 30, 30), None, 200, 200, crop_factor=3.0, guide_size=64, max_size=256)
    assert (p.x0, p.y0, p.width, p.height) == (0, 0, 90, 90)
    # a big face is never shrunk for the guide size, only for max_size
    p = M.plan_crop((0, 0, 300, 300), None, 900, 900, crop_factor=2.0, guide_size=64, max_size=1024)
    assert p.work_width == 608  # 600 px crop kept at scale 1, rounded to 32
    p = M.plan_crop((0, 0, 400, 400), None, 900, 900, crop_factor=2.0, guide_size=64, max_size=512)
    assert max(p.work_width, p.work_height) <= 512
    # the crop always holds the feathered paste mask
    p = M.plan_crop((50, 50, 60, 60), (30, 20, 90, 95), 200, 200, crop_factor=1.0)
    assert p.x0 <= 30 and p.y0 <= 20 and p.x1 >= 90 and p.y1 >= 95
    with pytest.raises(TwigError):
        M.plan_crop((0, 0, 10, 10), None, 64, 64, crop_factor=0.5)


# --------------------------------------------------------------------------------------------------
# Selection and prompts


def _det(x0, y0, x1, y1, conf=0.9):
    return Detection((float(x0), float(y0), float(x1), float(y1)), conf)


def test_select_faces_filters_and_orders():
    dets = [_det(300, 10, 340, 50, 0.5), _det(10, 10, 110, 110, 0.35), _det(150, 150, 170, 170, 0.95),
            _det(0, 300, 5, 305, 0.99), _det(200, 0, 260, 60, 0.2)]
    sel = R.select_faces(dets, 400, 400, confidence=0.3, sort="left-right")
    assert [d.box[0] for d in sel] == [0, 10, 150, 300]
    assert [d.box[0] for d in R.select_faces(dets, 400, 400, sort="largest")] == [10, 300, 150, 0]
    assert [d.box[0] for d in R.select_faces(dets, 400, 400, sort="confidence")] == [0, 150, 300, 10]
    assert [d.box[0] for d in R.select_faces(dets, 400, 400, sort="center")][0] == 150
    assert [d.box[0] for d in R.select_faces(dets, 400, 400, max_faces=2)] == [10, 300]  # 2 largest, left-right
    assert [d.box[0] for d in R.select_faces(dets, 400, 400, min_ratio=0.001)] == [10, 150, 300]
    assert [d.box[0] for d in R.select_faces(dets, 400, 400, max_ratio=0.01)] == [0, 150, 300]
    with pytest.raises(TwigError):
        R.select_faces(dets, 400, 400, sort="random")


def test_per_face_prompts_with_sep_and_prompt_token():
    assert R.split_prompts("") == [None]
    assert R.split_prompts("", "a woman") == ["a woman"]
    p = R.split_prompts("smiling face [SEP] [PROMPT], freckles [SEP]", "a woman")
    assert p == ["smiling face", "a woman, freckles", "a woman"]
    assert [R.prompt_for(p, i) for i in range(5)] == p + ["a woman", "a woman"]
    assert R.split_prompts("old man[SEP]  [SEP]child") == ["old man", None, "child"]
    with pytest.raises(TwigError, match=r"\[PROMPT\]"):
        R.split_prompts("[PROMPT] detailed")


# --------------------------------------------------------------------------------------------------
# Crop -> refine -> paste


def _smooth_image(b, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(b, 3, 6, 6, generator=g)
    return torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)


def identity(crop, mask, job):
    return crop.clone()


def test_identity_refiner_returns_the_input_exactly():
    g = torch.Generator().manual_seed(1)
    img = torch.rand(2, 150, 211, 4, generator=g)  # odd sizes, an alpha channel, full-range noise
    dets = [[_det(20, 30, 60, 75), _det(100, 10, 190, 120)], [_det(0, 0, 25, 25)]]
    for guide, max_size in ((512, 1024), (64, 96), (32, 32)):
        r = R.refine_faces(img, dets, identity, guide_size=guide, max_size=max_size)
        assert r.count == 3 and torch.equal(r.images, img)
        assert r.masks.shape == (2, 150, 211) and r.masks.max() == 1


def test_painting_refiner_changes_only_the_masked_area():
    img = _smooth_image(1, 160, 200)
    red = torch.tensor([1.0, 0.0, 0.0])

    def paint(crop, mask, job):
        return red.expand_as(crop).clone()

    det = _det(60, 40, 110, 100)
    r = R.refine_faces(img, [[det]], paint, dilate=4, feather=6, guide_size=128, max_size=256)
    weights = R.paste_weights(det, 160, 200, 4, 6)
    assert torch.equal(r.masks[0], weights)
    changed = (r.images[0] != img[0]).any(-1)
    assert changed.any() and not (changed & (weights == 0)).any()
    inside = weights == 1
    assert torch.allclose(r.images[0][inside], red.expand(int(inside.sum()), 3), atol=0.06)
    # the crop previews are what the refiner saw and returned, at work size (multiples of 32)
    assert r.before[0].shape == r.after[0].shape and r.before[0].shape[0] % 32 == 0
    assert torch.equal(r.after[0][0, 0], red)


def test_faces_are_refined_in_order_with_numbers_across_the_batch():
    img = _smooth_image(2, 96, 96)
    seen = []

    def record(crop, mask, job):
        seen.append((job.image_index, job.face_index, job.number))
        assert mask.shape == crop.shape[:3] and 0 <= mask.min() and mask.max() <= 1
        return crop

    dets = [[_det(5, 5, 25, 25), _det(50, 50, 80, 80)], [_det(10, 60, 30, 90)]]
    R.refine_faces(img, dets, record, guide_size=64)
    assert seen == [(0, 0, 0), (0, 1, 1), (1, 0, 2)]


def test_no_faces_returns_the_input_itself():
    img = torch.rand(2, 64, 64, 3)
    r = R.refine_faces(img, [[], []], identity)
    assert r.images is img and r.count == 0 and r.masks.abs().sum() == 0 and r.before == []


def test_refiner_returning_the_wrong_shape_is_an_error():
    with pytest.raises(TwigError, match="refiner returned"):
        R.refine_faces(torch.rand(1, 64, 64, 3), [[_det(10, 10, 30, 30)]], lambda c, m, j: c[:, :8])


def test_eroded_away_mask_skips_the_face():
    img = torch.rand(1, 64, 64, 3)
    r = R.refine_faces(img, [[_det(10, 10, 14, 14)]], identity, dilate=-4)
    assert r.count == 0 and r.images is img and "empty" in r.skipped[0]


# --------------------------------------------------------------------------------------------------
# End to end with tiny random Twig models


@pytest.fixture(scope="module")
def tiny():
    from tests.builders import tiny_dcae, tiny_transformer
    from twig_core.text import Conditioning

    g = torch.Generator().manual_seed(0)
    cond = Conditioning(torch.randn(1, 6, 64, generator=g), torch.ones(1, 6, dtype=torch.long))
    uncond = Conditioning(torch.randn(1, 6, 64, generator=g), torch.ones(1, 6, dtype=torch.long))
    return types.SimpleNamespace(transformer=tiny_transformer(), vae=tiny_dcae(), cond=cond, uncond=uncond)


def _twig_refine(tiny, img, dets, seed=0, **kw):
    ref = R.TwigRefiner(tiny.transformer, tiny.vae, tiny.cond, tiny.uncond, steps=2, cfg=4.5, seed=seed,
                        denoise=kw.pop("denoise", 0.5))
    return R.refine_faces(img, dets, ref, guide_size=64, max_size=96, multiple=ref.multiple, **kw)


def test_twig_refine_end_to_end_shapes_seed_and_mask(tiny):
    img = _smooth_image(1, 96, 128, seed=3)
    dets = [[_det(40, 30, 72, 62)]]
    a = _twig_refine(tiny, img, dets, seed=5)
    b = _twig_refine(tiny, img, dets, seed=5)
    c = _twig_refine(tiny, img, dets, seed=6)
    assert a.images.shape == img.shape and a.count == 1
    assert torch.equal(a.images, b.images)  # deterministic for a seed
    assert not torch.equal(a.images, c.images)
    assert a.before[0].shape[-1] == 3 and a.before[0].shape[0] % 32 == 0 and a.before[0].shape[0] <= 96
    changed = (a.images != img).any(-1)
    assert changed.any() and not (changed[0] & (a.masks[0] == 0)).any()
    assert a.images.min() >= 0 and a.images.max() <= 1


def test_twig_refine_batch_of_two_and_getters(tiny):
    img = _smooth_image(2, 96, 96, seed=4)
    dets = [[_det(10, 10, 40, 40)], [_det(50, 40, 86, 80), _det(5, 60, 30, 90)]]
    calls = {"vae": [], "transformer": []}

    def vae_getter(**need):
        calls["vae"].append(need)
        return tiny.vae

    def transformer_getter(**need):
        calls["transformer"].append(need)
        return tiny.transformer

    ref = R.TwigRefiner(transformer_getter, vae_getter, tiny.cond, tiny.uncond, steps=2, seed=0, denoise=0.5)
    r = R.refine_faces(img, dets, ref, guide_size=64, max_size=96, multiple=ref.multiple)
    assert r.count == 3 and [j.number for j in r.jobs] == [0, 1, 2] and len(calls["vae"]) >= 6
    # each fetch says what it is for (the host's memory estimate): encode a crop, sample, decode its latent
    f = tiny.vae.spatial_factor
    encodes = [c for c in calls["vae"] if c.get("encode")]
    decodes = [c for c in calls["vae"] if "latent_shape" in c]
    assert len(encodes) == len(decodes) == len(calls["transformer"]) == 3
    for enc, dec, step in zip(encodes, decodes, calls["transformer"]):
        assert enc["encode"] is True and len(enc["pixels"]) == 2
        h, w = (-(-p // f) for p in enc["pixels"])
        assert step == {"latent_shape": (1, tiny.vae.config.latent_channels, h, w), "cfg": True}
        assert dec == {"latent_shape": step["latent_shape"]}
    for b in range(2):
        changed = (r.images[b] != img[b]).any(-1)
        assert changed.any() and not (changed & (r.masks[b] == 0)).any()
    # the same face alone in a one-image batch refines identically (face number 0, same seed)
    alone = _twig_refine(tiny, img[:1], dets[:1], seed=0)
    assert torch.equal(alone.images[0], r.images[0])


def test_twig_refine_zero_denoise_changes_only_by_the_vae_round_trip(tiny):
    img = _smooth_image(1, 64, 64)
    r = _twig_refine(tiny, img, [[_det(20, 20, 44, 44)]], denoise=0.0)
    assert r.count == 1 and not ((r.images != img).any(-1) & (r.masks == 0)).any()


# --------------------------------------------------------------------------------------------------
# The ComfyUI nodes (called the way ComfyUI calls them; no ComfyUI needed)


@pytest.fixture(scope="module")
def node_models(tmp_path_factory, tiny):
    from nodes import host
    from nodes.loaders import TextEncoderRef
    from tests.builders import save_tiny_gemma2_folder
    from twig_core.text import TextEncoder

    folder = tmp_path_factory.mktemp("te") / "tiny_gemma"
    save_tiny_gemma2_folder(folder)
    cpu = torch.device("cpu")
    model = host.ManagedModel("transformer", "tiny", lambda d: tiny.transformer, cpu, cpu, torch.float32)
    vae = host.ManagedModel("vae", "tiny", lambda d: tiny.vae, cpu, cpu, torch.float32)
    te = host.ManagedModel("text_encoder", str(folder), lambda d: TextEncoder.from_pretrained(str(folder)),
                           cpu, cpu, torch.float32, module_of=lambda t: t.model)
    return types.SimpleNamespace(model=model, vae=vae, te=TextEncoderRef(te, 300), cond=tiny.cond, uncond=tiny.uncond)


def _first_detector():
    ready = [n for n, why in fdetect.available_detectors().items() if why is None]
    if not ready:
        pytest.skip("no face detector installed")
    return "opencv_haar" if "opencv_haar" in ready else ready[0]


def _refine_node(node_models, image, detector, **kw):
    from nodes.face import TwigFaceRefine

    args = dict(confidence=0.3, small_faces="auto", max_faces=0, min_ratio=0.0, max_ratio=1.0, sort="left-right",
                dilate=4, feather=5, crop_factor=2.0, guide_size=64, max_size=128, denoise=0.5, steps=2, cfg=4.5,
                seed=0, sampler="flow_euler", shift=3.0, noise_mask=True)
    args.update(kw)
    return TwigFaceRefine().refine(image, node_models.model, node_models.vae, node_models.cond, node_models.uncond,
                                   detector, **args)


def test_node_lists_installed_detectors_and_yolo_models(tmp_path, monkeypatch):
    from nodes import face as nface

    monkeypatch.setenv("TWIG_MODELS_DIR", str(tmp_path))
    (tmp_path / "ultralytics" / "bbox").mkdir(parents=True)
    (tmp_path / "ultralytics" / "bbox" / "face_yolov8n.pt").write_bytes(b"")
    choices = nface.TwigFaceRefine.INPUT_TYPES()["required"]["detector"][0]
    ready = [n for n, why in fdetect.available_detectors().items() if why is None]
    assert choices == ready + ["bbox/face_yolov8n.pt"]
    assert nface.TwigFaceDetect.INPUT_TYPES()["required"]["detector"][0] == choices
    monkeypatch.setattr(fdetect, "_spec_dir", lambda m: None)
    (tmp_path / "ultralytics" / "bbox" / "face_yolov8n.pt").unlink()
    assert nface.detector_choices() == [nface.NO_DETECTOR]
    with pytest.raises(TwigError, match="no face detector is installed"):
        nface.resolve_detector(nface.NO_DETECTOR)


def test_detect_node_on_the_astronaut(astronaut):
    from nodes.face import FaceSet, TwigFaceDetect

    name = _first_detector()
    image = torch.from_numpy(np.stack([astronaut, astronaut[:, ::-1].copy()])).float() / 255.0
    out = TwigFaceDetect().detect(image, name, 0.3, "auto", 0, 0.0, 1.0, "left-right", 0)
    faces, mask, preview, count, info = out["result"]
    assert isinstance(faces, FaceSet) and count == 2 and mask.shape == (2, 512, 512)
    assert preview.shape == image.shape and not torch.equal(preview, image)
    assert mask[0, 110, 224] == 1 and mask[0, 400, 50] == 0 and mask[1, 110, 511 - 224] == 1
    assert '"count": 2' in info and name in info


def test_refine_node_on_the_astronaut_changes_only_the_face(node_models, astronaut):
    name = _first_detector()
    image = torch.from_numpy(astronaut.copy()).float()[None] / 255.0
    out = _refine_node(node_models, image, name)
    refined, mask, before, after, count = out["result"]
    assert count == 1 and refined.shape == image.shape and refined.dtype == image.dtype
    changed = (refined != image).any(-1)
    assert changed.any() and not (changed & (mask == 0)).any()
    assert mask[0, 110, 224] == 1 and mask[0, 400, 50] == 0
    assert before.shape == after.shape and before.shape[0] == 1
    assert "refined 1 face" in out["ui"]["text"][0]
    again = _refine_node(node_models, image, name)["result"][0]
    assert torch.equal(again, refined)


def test_refine_node_with_no_face_passes_the_image_through(node_models):
    name = _first_detector()
    image = torch.from_numpy(_photo("coffee.png")[:128, :160].copy()).float()[None] / 255.0
    out = _refine_node(node_models, image, name)
    refined, mask, before, after, count = out["result"]
    assert refined is image and count == 0 and mask.abs().sum() == 0 and before.shape == (1, 64, 64, 3)
    assert "no face" in out["ui"]["text"][0]


def test_refine_node_uses_given_faces_and_per_face_prompts(node_models):
    from nodes.face import FaceSet

    image = _smooth_image(2, 96, 128, seed=7)
    faces = FaceSet([[_det(10, 10, 40, 40), _det(70, 20, 100, 50)], []], 128, 96, "test")
    plain = _refine_node(node_models, image, "opencv_haar", faces=faces)["result"]
    assert plain[4] == 2 and torch.equal(plain[0][1], image[1])
    prompted = _refine_node(node_models, image, "opencv_haar", faces=faces, text_encoder=node_models.te,
                            face_prompt="a smiling face [SEP] [PROMPT], old", main_prompt="a portrait")["result"]
    assert prompted[4] == 2 and not torch.equal(prompted[0], plain[0])
    with pytest.raises(TwigError, match="text_encoder"):
        _refine_node(node_models, image, "opencv_haar", faces=faces, face_prompt="a face")
    with pytest.raises(TwigError, match="were detected on"):
        _refine_node(node_models, image[:1], "opencv_haar", faces=faces)


def test_detect_node_runs_a_yolo_model_from_the_bbox_folder(fake_ultralytics, tmp_path, monkeypatch):
    from nodes import face as nface

    monkeypatch.setenv("TWIG_MODELS_DIR", str(tmp_path))
    folder = tmp_path / "ultralytics" / "bbox"
    folder.mkdir(parents=True)
    torch.save({"model": fake_ultralytics.DetectionModel()}, folder / "face_yolov8n.pt")
    assert "bbox/face_yolov8n.pt" in nface.detector_choices()
    image = torch.rand(1, 48, 80, 3)
    faces, mask, preview, count, info = nface.TwigFaceDetect().detect(
        image, "bbox/face_yolov8n.pt", 0.5, "auto", 0, 0.0, 1.0, "confidence", 0)["result"]
    assert count == 1 and faces.detections[0][0].box == (10.0, 12.0, 40.0, 44.0)  # the 0.4 box is below 0.5
    assert mask[0, 20, 20] == 1 and mask[0, 5, 60] == 0 and "yolo:face_yolov8n.pt" in info
    with pytest.raises(TwigError, match="not found"):
        nface.TwigFaceDetect().detect(image, "bbox/missing.pt", 0.5, "auto", 0, 0.0, 1.0, "confidence", 0)
    assert nface._ultralytics_device(torch.device("cuda", 1)) == "1"
    assert nface._ultralytics_device(torch.device("cpu")) == "cpu"
