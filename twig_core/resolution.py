"""Sana's aspect-ratio bins and size checks.

The model was trained on a fixed set of (height, width) buckets around 1024² pixels; sizes near those
buckets give the best images. Other base sizes (512, 2048, the small demo model) scale the same table.
"""

from __future__ import annotations

from .errors import TwigError

# (height, width) buckets of the 1024-pixel models, from tall to wide
BINS_1024: tuple[tuple[int, int], ...] = (
    (512, 2048), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600), (640, 1536), (704, 1472),
    (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152), (896, 1152), (896, 1088),
    (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896), (1152, 896), (1152, 832),
    (1216, 832), (1280, 768), (1344, 768), (1408, 704), (1472, 704), (1536, 640), (1600, 640), (1728, 576),
    (2048, 512),
)

MULTIPLE = 32  # one latent pixel of the 32x DC-AE


def bins(base: int = 1024) -> list[tuple[int, int]]:
    """The buckets for a model trained at ``base``² pixels, rounded to multiples of 32, duplicates removed."""
    out: list[tuple[int, int]] = []
    for h, w in BINS_1024:
        hw = (max(MULTIPLE, round(h * base / 1024 / MULTIPLE) * MULTIPLE),
              max(MULTIPLE, round(w * base / 1024 / MULTIPLE) * MULTIPLE))
        if hw not in out:
            out.append(hw)
    return out


def nearest_bin(height: int, width: int, base: int = 1024) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to height/width."""
    ratio = height / width
    return min(bins(base), key=lambda hw: abs(hw[0] / hw[1] - ratio))


def check_size(width: int, height: int) -> None:
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or v < MULTIPLE or v % MULTIPLE:
            raise TwigError(f"{name} must be a positive multiple of {MULTIPLE} pixels, got {v!r}")
