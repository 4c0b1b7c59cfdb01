"""Face detection recall and precision per kind of framing and per detector, on real photographs.

The cases are built from scikit-image's photographs (no download): the astronaut (one face, measured by hand),
LFW crops (``skimage.data.lfw_subset``: the first 100 are tight face crops, the last 100 background crops) and
face-free photos (coffee, chelsea, rocket, motorcycle). Categories:

- ordinary: the astronaut as is, mirrored, darkened, in 2x2 and 4x4 grids, and two face-free photos;
- small: astronaut heads scaled to 24-40 px faces pasted at known places over cluttered 1024² photos;
- rotated: the astronaut turned by 60, 90, 120, 180 and 270 degrees (the face box turned with it);
- tight: LFW face crops at 128 px (ID-photo framing, the face fills the picture);
- non-face: LFW background crops at 128 px (every detection is a false one).

A detection matches a true face when their boxes overlap with IoU >= 0.4 (each true face matches once).
Run as a script: ``python bench/bench_faces.py [detector[:tiles[:turned_heads]] ...]`` prints the table and the
time per 1024² image (the small-face cases), e.g. ``ensemble ensemble:fine ensemble:auto:off opencv_haar``.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twig_core.face import detect as fdetect  # noqa: E402

# Hand-measured on astronaut.png (512x512): hairline to chin, ear to ear.
ASTRONAUT_FACE = (175.0, 65.0, 275.0, 175.0)
# Around the face, the part of the astronaut pasted as a small person: head, hair and collar.
ASTRONAUT_HEAD = (130, 10, 320, 250)
# A tight LFW crop at 128 px: the face fills it but for a strip of hair above (checked by eye on the 100 crops).
TIGHT_SIZE = 128
TIGHT_FACE = (0.0, 10.0, 128.0, 128.0)
MATCH_IOU = 0.4
CATEGORIES = ("ordinary", "small", "rotated", "tight", "non-face")


@dataclass
class Case:
    name: str
    category: str
    image: np.ndarray  # RGB uint8 [H,W,3]
    faces: list  # true face boxes (x0, y0, x1, y1)


def _data():
    try:
        from skimage import data
    except ImportError as e:  # pragma: no cover - the bench and the tests need scikit-image
        raise RuntimeError("the face cases need scikit-image (pip install scikit-image)") from e
    return data


def photo(data, filename: str) -> np.ndarray:
    """An RGB uint8 photo from scikit-image's data folder (the files that ship inside the package)."""
    from PIL import Image

    return np.asarray(Image.open(os.path.join(os.path.dirname(data.__file__), filename)).convert("RGB"))


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((w, h), Image.LANCZOS))


def _rgb(gray: np.ndarray) -> np.ndarray:
    g = (np.clip(gray, 0, 1) * 255).round().astype(np.uint8) if gray.dtype != np.uint8 else gray
    return np.repeat(g[..., None], 3, axis=2)


def _rotate(img: np.ndarray, box, degrees: int):
    """The image turned counter-clockwise by ``degrees`` (canvas grown to hold it, grey corners) and the face's
    box there: the axis box of the face's ellipse (the one inscribed in ``box``) turned with it, which, unlike
    the box of the turned corners, stays as tight as an upright face box."""
    from PIL import Image

    h, w = img.shape[:2]
    out = Image.fromarray(img).rotate(degrees, resample=Image.BICUBIC, expand=True, fillcolor=(128, 128, 128))
    W, H = out.size
    t = np.deg2rad(degrees)
    cx, cy = (box[0] + box[2]) / 2 - w / 2, (box[1] + box[3]) / 2 - h / 2
    # PIL turns counter-clockwise on screen (y down): x' = x cos + y sin, y' = -x sin + y cos
    nx, ny = cx * np.cos(t) + cy * np.sin(t) + W / 2, -cx * np.sin(t) + cy * np.cos(t) + H / 2
    a, b = (box[2] - box[0]) / 2, (box[3] - box[1]) / 2
    hw, hh = np.hypot(a * np.cos(t), b * np.sin(t)), np.hypot(a * np.sin(t), b * np.cos(t))
    return np.asarray(out), (nx - hw, ny - hh, nx + hw, ny + hh)


def ordinary_cases(astronaut: np.ndarray, data) -> list[Case]:
    f = ASTRONAUT_FACE
    grid2 = np.concatenate([np.concatenate([astronaut, astronaut], 1)] * 2, 0)
    small = _resize(astronaut, 256, 256)
    grid4 = np.concatenate([np.concatenate([small] * 4, 1)] * 4, 0)
    return [
        Case("astronaut", "ordinary", astronaut, [f]),
        Case("mirrored", "ordinary", np.ascontiguousarray(astronaut[:, ::-1]), [(512 - f[2], f[1], 512 - f[0], f[3])]),
        Case("dark", "ordinary", (astronaut.astype(np.float32) * 0.3).round().astype(np.uint8), [f]),
        Case("grid 2x2", "ordinary", grid2,
             [(f[0] + 512 * i, f[1] + 512 * j, f[2] + 512 * i, f[3] + 512 * j) for j in range(2) for i in range(2)]),
        Case("grid 4x4", "ordinary", grid4,
             [tuple(v / 2 + 256 * (i if k % 2 == 0 else j) for k, v in enumerate(f)) for j in range(4) for i in range(4)]),
        Case("coffee", "ordinary", photo(data, "coffee.png"), []),
        Case("chelsea", "ordinary", photo(data, "chelsea.png"), []),
    ]


# Cluttered backgrounds and where the small faces go: (photo, [(face width px, x, y of the head patch), ...]).
SMALL_LAYOUT = (
    ("coffee.png", [(24, 120, 140), (28, 700, 90), (32, 420, 610), (40, 830, 760)]),
    ("rocket.jpg", [(24, 300, 300), (28, 820, 200), (32, 130, 700), (40, 560, 820)]),
    ("chelsea.png", [(24, 860, 600), (28, 90, 420), (32, 640, 330), (40, 260, 860)]),
    ("motorcycle_left.png", [(24, 500, 130), (28, 180, 840), (32, 880, 430), (40, 380, 470)]),
)


def small_cases(astronaut: np.ndarray, data) -> list[Case]:
    hx0, hy0, hx1, hy1 = ASTRONAUT_HEAD
    head = astronaut[hy0:hy1, hx0:hx1]
    fw = ASTRONAUT_FACE[2] - ASTRONAUT_FACE[0]
    out = []
    for n, (filename, faces) in enumerate(SMALL_LAYOUT):
        img = _resize(photo(data, filename), 1024, 1024).copy()
        boxes = []
        for k, (size, x, y) in enumerate(faces):
            s = size / fw
            patch = _resize(head if (n + k) % 2 == 0 else np.ascontiguousarray(head[:, ::-1]),
                            round(head.shape[1] * s), round(head.shape[0] * s))
            img[y:y + patch.shape[0], x:x + patch.shape[1]] = patch
            fx0 = ASTRONAUT_FACE[0] - hx0 if (n + k) % 2 == 0 else hx1 - ASTRONAUT_FACE[2]
            boxes.append((x + fx0 * s, y + (ASTRONAUT_FACE[1] - hy0) * s,
                          x + (fx0 + fw) * s, y + (ASTRONAUT_FACE[3] - hy0) * s))
        out.append(Case(f"small faces on {filename}", "small", img, boxes))
    return out


def rotated_cases(astronaut: np.ndarray) -> list[Case]:
    out = []
    for deg in (60, 90, 120, 180, 270):
        img, box = _rotate(astronaut, ASTRONAUT_FACE, deg)
        out.append(Case(f"rotated {deg}", "rotated", img, [box]))
    return out


def lfw_cases(data, count: int = 16) -> list[Case]:
    crops = data.lfw_subset()
    out = []
    for i in range(count):
        out.append(Case(f"lfw face {i}", "tight", _resize(_rgb(crops[i]), TIGHT_SIZE, TIGHT_SIZE), [TIGHT_FACE]))
    for i in range(count):
        out.append(Case(f"lfw non-face {i}", "non-face", _resize(_rgb(crops[100 + i]), TIGHT_SIZE, TIGHT_SIZE), []))
    return out


def face_cases() -> list[Case]:
    """Every case, in CATEGORIES order."""
    data = _data()
    astronaut = photo(data, "astronaut.png")
    return ordinary_cases(astronaut, data) + small_cases(astronaut, data) + rotated_cases(astronaut) + lfw_cases(data)


def match(found, truth, limit: float = MATCH_IOU) -> tuple[int, int, int]:
    """(true positives, missed faces, false detections): greedy, best IoU first, each true face once."""
    pairs = sorted(((fdetect.iou(f, t)[0], i, j) for i, f in enumerate(found) for j, t in enumerate(truth)),
                   reverse=True)
    used_f, used_t = set(), set()
    for v, i, j in pairs:
        if v >= limit and i not in used_f and j not in used_t:
            used_f.add(i)
            used_t.add(j)
    return len(used_t), len(truth) - len(used_t), len(found) - len(used_f)


def score(detect, cases) -> dict:
    """category -> {"tp", "fn", "fp", "recall", "precision", "misses": [case names]}; ``detect(image)`` returns
    boxes. "overall" adds every category up."""
    table = {c: {"tp": 0, "fn": 0, "fp": 0, "misses": []} for c in CATEGORIES + ("overall",)}
    for case in cases:
        tp, fn, fp = match(list(detect(case.image)), case.faces)
        for key in (case.category, "overall"):
            row = table[key]
            row["tp"] += tp
            row["fn"] += fn
            row["fp"] += fp
            if fn or fp:
                row["misses"].append(f"{case.name} (-{fn} +{fp})")
    for row in table.values():
        row["recall"] = row["tp"] / (row["tp"] + row["fn"]) if row["tp"] + row["fn"] else 1.0
        row["precision"] = row["tp"] / (row["tp"] + row["fp"]) if row["tp"] + row["fp"] else 1.0
    return table


def detector_fn(spec: str, confidence: float = 0.3):
    """``detect(image) -> boxes`` for "name[:tiles[:turned_heads]]" (see detect_faces)."""
    name, tiles, turns = (spec.split(":") + ["auto", "auto"])[:3]
    det = fdetect.get_detector(name)
    return lambda image: [d.box for d in fdetect.detect_faces(image, det, confidence, tiles, turns)]


def time_per_image(detect, images) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) per image, after one warm-up call that loads the models.
    On a shared machine the CPU seconds are the steadier figure."""
    detect(images[0])
    t, c = time.perf_counter(), time.process_time()
    for img in images:
        detect(img)
    return (time.perf_counter() - t) / len(images), (time.process_time() - c) / len(images)


# --------------------------------------------------------------------------------------------------
# The ensemble's calibration, fitted on one half of the cases and scored on the other


def split(cases) -> tuple[list[Case], list[Case]]:
    """(fit part, held-out part): alternate cases of each category, so both parts hold every kind."""
    fit, held = [], []
    for c in CATEGORIES:
        part = [case for case in cases if case.category == c]
        fit += part[0::2]
        held += part[1::2]
    return fit, held


def member_finds(cases, floor: float = 1e-3) -> dict[int, list]:
    """id(case.image) -> the ensemble members' unmerged finds with their own scores (down to ``floor``)."""
    raw = fdetect.EnsembleDetector(calibration={})
    return {id(c.image): raw.member_finds(c.image, floor) for c in cases}


def fit_calibration(cases, finds, l2: float = 1.0) -> dict[str, tuple[float, float]]:
    """(a, b) per member: logistic regression of "this find is a true face" on logit(score), over each
    member's finds in ``cases`` (its duplicates merged first), with an L2 penalty towards (1, 0) (the score as
    it is) so that a member whose scores separate faces perfectly on a few cases gets a finite slope."""
    samples: dict[str, list[tuple[float, int]]] = {}
    for case in cases:
        by_member: dict[str, list] = {}
        for d in finds[id(case.image)]:
            by_member.setdefault(d.source, []).append(d)
        for member, dets in by_member.items():
            for d in fdetect.merge_detections(dets):
                true = any(fdetect.iou(d.box, t)[0] >= MATCH_IOU for t in case.faces)
                samples.setdefault(member, []).append((fdetect._logit(d.confidence), int(true)))
    out = {}
    for member, xy in sorted(samples.items()):
        x, y = np.array([v[0] for v in xy]), np.array([v[1] for v in xy], dtype=np.float64)
        a, b = 1.0, 0.0
        for _ in range(50):  # Newton's method on the penalised negative log-likelihood
            p = 1.0 / (1.0 + np.exp(-np.clip(a * x + b, -50, 50)))
            g = np.array([np.sum((p - y) * x) + l2 * (a - 1.0), np.sum(p - y) + l2 * b])
            wgt = p * (1 - p)
            hess = np.array([[np.sum(wgt * x * x) + l2, np.sum(wgt * x)], [np.sum(wgt * x), np.sum(wgt) + l2]])
            a, b = np.array([a, b]) - np.linalg.solve(hess, g)
        out[member] = (round(float(a), 3), round(float(b), 3))
    return out


def calibration_report(cases) -> None:
    """Prints the calibration fitted on one part and the ensemble's scores with it and with the shipped one on
    both parts."""
    fit, held = split(cases)
    finds = member_finds(cases)
    fitted = fit_calibration(fit, finds)
    print(f"calibration fitted on {len(fit)} cases (held out: {len(held)}): {fitted}")
    print(f"shipped: {fdetect.CALIBRATION}")
    print("| calibration | part | " + " | ".join(CATEGORIES) + " | recall / precision |")
    print("|---|---|" + "---|" * (len(CATEGORIES) + 1))
    for label, table in (("shipped", fdetect.CALIBRATION), ("fitted", fitted)):
        ens = fdetect.EnsembleDetector(calibration=table)
        detect = lambda image: [d.box for d in ens.combine(finds[id(image)], 0.3)]  # noqa: E731
        for part, part_cases in (("fit", fit), ("held out", held)):
            t = score(detect, part_cases)
            cells = [f"{t[c]['fp']} false" if c == "non-face" else
                     f"{t[c]['tp']}/{t[c]['tp'] + t[c]['fn']}" + (f", {t[c]['fp']} false" if t[c]["fp"] else "")
                     for c in CATEGORIES]
            o = t["overall"]
            print(f"| {label} | {part} | " + " | ".join(cells) + f" | {o['recall']:.2f} / {o['precision']:.2f} |")


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("detectors", nargs="*", help="name[:tiles[:turned_heads]] (default: every installed detector)")
    ap.add_argument("--no-time", action="store_true", help="skip the per-image timing")
    ap.add_argument("--calibration", action="store_true",
                    help="fit the ensemble's calibration on half the cases, score it on both halves, and stop")
    args = ap.parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", file=sys.stderr)
    if args.calibration:
        return calibration_report(face_cases())
    names = args.detectors or [n for n, why in fdetect.available_detectors().items() if why is None]
    cases = face_cases()
    timing = [c.image for c in cases if c.image.shape[:2] == (1024, 1024)][:3]
    print("| detector | " + " | ".join(CATEGORIES) + " | overall recall / precision | s per 1024² image (wall / CPU) |")
    print("|---|" + "---|" * (len(CATEGORIES) + 2))
    for name in names:
        fn = detector_fn(name)
        table = score(fn, cases)
        cells = []
        for c in CATEGORIES:
            r = table[c]
            cells.append(f"{r['fp']} false" if c == "non-face" else
                         f"{r['tp']}/{r['tp'] + r['fn']}" + (f", {r['fp']} false" if r["fp"] else ""))
        o = table["overall"]
        secs = "" if args.no_time else "{:.2f} / {:.2f}".format(*time_per_image(fn, timing))
        print(f"| {name} | " + " | ".join(cells) + f" | {o['recall']:.2f} / {o['precision']:.2f} | {secs} |")
        if o["misses"]:
            print(f"  misses {name}: " + "; ".join(o["misses"]), file=sys.stderr)


if __name__ == "__main__":
    main()
