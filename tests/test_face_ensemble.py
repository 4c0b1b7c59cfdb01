"""The face ensemble on bench/bench_faces.py's real-photo cases: recall and precision targets, small faces, turned
heads, the merge rule, calibration (and its held-out fit), YOLO models as members, and the nodes' sort/limit
after merging. Skipped, with the reason, where mediapipe, OpenCV or scikit-image is missing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_face import _usable, astronaut, fake_ultralytics  # noqa: F401 - fixtures
from twig_core.errors import TwigError
from twig_core.face import detect as fdetect
from twig_core.face import yolo as fyolo
from twig_core.face.detect import Detection

def test_boxes_found_on_turned_copies_turn_back():
    img = np.zeros((60, 100, 3), np.uint8)
    img[10:20, 30:50] = 255  # a 20x10 block at x 30..50, y 10..20
    for k in (1, 2, 3):
        turned = np.rot90(img, k)
        ys, xs = np.nonzero(turned[..., 0])
        box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert fdetect._turned_back(box, k, 60, 100) == (30, 10, 50, 20), k


def test_merge_rule_keeps_one_source_as_is_and_combines_different_sources():
    a = Detection((0, 0, 10, 10), 0.6, source="x")
    same = Detection((1, 1, 11, 11), 0.5, source="x")
    other = Detection((0, 1, 10, 11), 0.5, source="y")
    far = Detection((50, 50, 60, 60), 0.4, source="y")
    assert fdetect.merge_detections([same, a, far]) == [a, far]
    merged = fdetect.merge_detections([a, same, other, far])
    assert merged[0].box == a.box and merged[0].source == "x+y" and merged[0].confidence == pytest.approx(0.8)
    assert merged[1] == far


def test_calibration_inverse_and_unknown_sources():
    for name in fdetect.CALIBRATION:
        for c in (0.05, 0.3, 0.9):
            assert fdetect.calibrated(name, fdetect.calibrated(name, c), inverse=True) == pytest.approx(c)
    assert fdetect.calibrated("yolo:face.pt", 0.42) == pytest.approx(0.42)


@pytest.fixture(scope="module")
def face_cases():
    pytest.importorskip("skimage.data", reason="scikit-image provides the test photographs")
    for name in ("mediapipe_face_full", "mediapipe_face_short", "opencv_haar"):
        _usable(name)
    from bench.bench_faces import face_cases

    return face_cases()


def test_face_case_boxes_are_hand_measured_where_the_detectors_agree(face_cases):
    """The astronaut's measured face box matches what every built-in detector finds (IoU ≥ 0.6)."""
    from bench.bench_faces import ASTRONAUT_FACE

    for name in ("mediapipe_face_full", "mediapipe_face_short", "opencv_haar"):
        (d,) = fdetect.detect_faces(face_cases[0].image, name, 0.3)
        assert fdetect.iou(d.box, ASTRONAUT_FACE)[0] >= 0.6, (name, d.box)


def test_ensemble_meets_the_recall_and_precision_targets(face_cases):
    from bench.bench_faces import detector_fn, score

    table = score(detector_fn("ensemble"), face_cases)
    assert table["ordinary"]["recall"] == 1.0 and table["ordinary"]["precision"] == 1.0, table["ordinary"]
    assert table["overall"]["recall"] >= 0.9 and table["overall"]["precision"] >= 0.95, table["overall"]
    assert table["rotated"]["recall"] == 1.0 and table["non-face"]["fp"] == 0, table
    for name in ("mediapipe_face_full", "opencv_haar"):  # at least as good as the best single detector
        single = score(detector_fn(name), face_cases)["overall"]
        assert table["overall"]["recall"] > single["recall"], (name, single)


def test_ensemble_detections_say_which_members_found_them(astronaut):
    (d,) = fdetect.detect_faces(astronaut, "ensemble", 0.3)
    assert d.source == "ensemble" and set(d.found_by) == {"mediapipe_face_full", "mediapipe_face_short", "opencv_haar"}
    assert d.to_dict()["found_by"] == list(d.found_by) and 0.9 < d.confidence <= 1.0


def test_default_finds_24px_faces_in_a_1024_image_and_haar_confirms_them(face_cases):
    """The default tiles find every face of the small-face scenes, 24 px ones included, with no false find;
    Haar, which scans the 1024² image at half size, still finds each of them on an upscaled crop."""
    from bench.bench_faces import match

    for case in (c for c in face_cases if c.category == "small"):
        found = fdetect.detect_faces(case.image, "ensemble", 0.3)
        assert match([d.box for d in found], case.faces) == (4, 0, 0), (case.name, [d.to_dict() for d in found])
        assert any(b[2] - b[0] < 25 for b in case.faces)
        assert all("opencv_haar" in d.found_by and "mediapipe_face_full" in d.found_by for d in found), case.name


def test_ensemble_scans_large_images_with_haar_at_half_size(monkeypatch, face_cases):
    haar = fdetect.get_detector("opencv_haar")
    shapes = []
    real = type(haar).detect
    monkeypatch.setattr(type(haar), "detect",
                        lambda self, img, conf=0.3: shapes.append(img.shape[:2]) or real(self, img, conf))
    case = next(c for c in face_cases if c.category == "small")
    fdetect.detect_faces(case.image, "ensemble", 0.3)
    assert shapes[0] == (fdetect.HAAR_SIDE, fdetect.HAAR_SIDE)
    assert all(max(s) < 200 for s in shapes[1:]) and len(shapes) >= 2  # crops around the small faces only


def test_turned_heads_off_runs_no_turned_passes(monkeypatch, face_cases):
    calls = []
    det = fdetect.get_detector("mediapipe_face_full")
    real = type(det).detect
    monkeypatch.setattr(type(det), "detect", lambda self, img, conf=0.3: calls.append(img.shape) or real(self, img, conf))
    rotated = next(c for c in face_cases if c.name == "rotated 90").image
    fdetect.detect_faces(rotated, det, 0.3, tiles="off", turned_heads="off")
    assert calls == [rotated.shape]
    calls.clear()
    fdetect.detect_faces(rotated, det, 0.3, tiles="off", turned_heads="on")
    h, w = rotated.shape[:2]
    assert calls == [(h, w, 3), (w, h, 3), (h, w, 3), (w, h, 3)]
    with pytest.raises(TwigError, match="turned_heads"):
        fdetect.detect_faces(rotated, det, 0.3, turned_heads="sideways")


def test_ensemble_takes_yolo_models_as_members(fake_ultralytics, tmp_path):
    path = tmp_path / "face_yolov8n.pt"
    torch.save({"model": fake_ultralytics.DetectionModel()}, path)
    ens = fdetect.EnsembleDetector(extra=[fyolo.YoloDetector(str(path))])
    found = fdetect.detect_faces(np.full((1024, 1024, 3), 128, np.uint8), ens, 0.3, turned_heads="off")
    assert sorted((d.box, round(d.confidence, 2)) for d in found) == [((10.0, 12.0, 40.0, 44.0), 0.9),
                                                                       ((50.0, 5.0, 70.0, 30.0), 0.4)]
    assert all(d.source == "ensemble" and d.found_by == ("yolo:face_yolov8n.pt",) for d in found)


def test_node_limits_and_sorts_the_merged_ensemble_faces(astronaut):
    """max_faces and sort act on the merged faces: duplicates from tiles, turned copies and members are gone."""
    from nodes.face import run_detection

    _usable("ensemble")
    grid = np.concatenate([np.concatenate([astronaut, astronaut], 1)] * 2, 0)
    image = torch.from_numpy(grid[None].astype(np.float32) / 255.0)
    faces = run_detection(image, "ensemble", 0.3, "auto", 0, 0.0, 1.0, "left-right")
    assert len(faces.detections[0]) == 4 and faces.detector == "ensemble"
    top = run_detection(image, "ensemble", 0.3, "auto", 3, 0.0, 1.0, "confidence", "off").detections[0]
    assert len(top) == 3 and [d.confidence for d in top] == sorted((d.confidence for d in top), reverse=True)
    assert len({(int(d.center[0] // 512), int(d.center[1] // 512)) for d in top}) == 3


def test_mediapipe_reuses_a_few_graphs_and_gives_the_same_faces(astronaut):
    det = fdetect.get_detector(_usable("mediapipe_face_short"))
    first = det.detect(astronaut, 0.3)
    for conf in (0.31, 0.32, 0.33, 0.34, 0.35, 0.3):
        assert [d.box for d in det.detect(astronaut, conf)] == [d.box for d in first]
        assert len(det._graphs) <= 4


def test_calibration_fit_recovers_a_known_logistic_and_splits_every_category():
    """fit_calibration on finds whose truth follows logistic(2·logit(s) - 1) gives back about (2, -1)."""
    from bench.bench_faces import CATEGORIES, Case, face_cases, fit_calibration, split

    rng = np.random.default_rng(0)
    cases, finds = [], {}
    for x in rng.uniform(-4, 4, 4000):
        s = 1 / (1 + np.exp(-x))
        true = rng.random() < 1 / (1 + np.exp(-(2 * x - 1)))
        case = Case("synthetic", "small", np.zeros((1, 1, 3), np.uint8), [(0, 0, 10, 10)])
        finds[id(case.image)] = [Detection((0, 0, 10, 10) if true else (50, 50, 60, 60), float(s), source="m")]
        cases.append(case)
    a, b = fit_calibration(cases, finds)["m"]
    assert abs(a - 2) < 0.2 and abs(b + 1) < 0.2, (a, b)
    pytest.importorskip("skimage.data", reason="scikit-image provides the test photographs")
    fit, held = split(face_cases())
    assert not {id(c.image) for c in fit} & {id(c.image) for c in held}
    assert {c.category for c in fit} == {c.category for c in held} == set(CATEGORIES)


def test_node_ensemble_takes_the_yolo_face_models_of_the_bbox_folder(fake_ultralytics, tmp_path, monkeypatch):
    """A face model in models/ultralytics/bbox joins the nodes' ensemble (loaded with the restricted unpickler);
    a hand model there does not."""
    from nodes import face as nface

    _usable("ensemble")
    monkeypatch.setenv("TWIG_MODELS_DIR", str(tmp_path))
    folder = tmp_path / "ultralytics" / "bbox"
    folder.mkdir(parents=True)
    torch.save({"model": fake_ultralytics.DetectionModel()}, folder / "face_yolov8n.pt")
    torch.save({"model": fake_ultralytics.DetectionModel()}, folder / "hand_yolov8n.pt")
    det = nface.resolve_detector("ensemble")
    assert [m[0].name for m in det.members()][-1:] == ["yolo:face_yolov8n.pt"]
    image = torch.full((1, 800, 800, 3), 0.5)  # larger than PAD_LIMIT: the stand-in boxes are not shifted
    faces = nface.run_detection(image, "ensemble", 0.5, "auto", 0, 0.0, 1.0, "confidence", "off").detections[0]
    assert [(d.box, d.found_by) for d in faces] == [((10.0, 12.0, 40.0, 44.0), ("yolo:face_yolov8n.pt",))]
    assert [c[1] for c in fake_ultralytics.calls if c[0] == "load"] == [str(folder / "face_yolov8n.pt")]


def test_choose_detector_gives_the_ensemble_the_yolo_face_models_only(fake_ultralytics, tmp_path):
    """The one rule the nodes and the tab share: YOLO files whose name says face join the ensemble, others (hand,
    person) do not; a YOLO file picked by itself is that detector."""
    _usable("ensemble")
    face, hand = tmp_path / "face_yolov8n.pt", tmp_path / "hand_yolov8n.pt"
    for p in (face, hand):
        torch.save({"model": fake_ultralytics.DetectionModel()}, p)
    det = fdetect.choose_detector("ensemble", [str(face), str(hand)])
    assert [m[0].name for m in det.members()][-1:] == ["yolo:face_yolov8n.pt"]
    assert fdetect.choose_detector(str(hand)).name == "yolo:hand_yolov8n.pt"
    assert fdetect.choose_detector("opencv_haar", [str(face)]) is fdetect.get_detector("opencv_haar")


def test_tab_ensemble_takes_the_yolo_face_models_of_its_folders(tmp_path, monkeypatch):
    """The tab's face refine hands the YOLO files of its face folders to the shared rule (choose_detector), which
    keeps the face models for the ensemble."""
    from twig_webui.engine import Engine, Settings
    from twig_webui.host import Host

    _usable("ensemble")
    folder = tmp_path / "models" / "adetailer"
    folder.mkdir(parents=True)
    for n in ("face_yolov8n.pt", "hand_yolov8n.pt"):
        (folder / n).write_bytes(b"stand-in")  # listed by name; never loaded here

    class Chosen(Exception):
        pass

    def choose(name, paths=(), device=None):
        raise Chosen(name, sorted(paths), fdetect.face_models(paths))

    monkeypatch.setattr(fdetect, "choose_detector", choose)
    engine = Engine(Host(tmp_path / "models", tmp_path / "out", device="cpu"))
    s = Settings(prompt="a face", face=True, face_detector="ensemble")
    with pytest.raises(Chosen) as got:
        engine._face_refine(s, None, "a face", torch.zeros(1, 64, 64, 3), 0, lambda *a: None)
    name, paths, faces = got.value.args
    assert name == "ensemble" and paths == sorted(str(folder / n) for n in ("face_yolov8n.pt", "hand_yolov8n.pt"))
    assert faces == [str(folder / "face_yolov8n.pt")]
