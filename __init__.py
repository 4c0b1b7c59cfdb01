"""Twig for ComfyUI: Sana-family text-to-image nodes backed by the self-contained ``twig_core`` engine.

ComfyUI imports this folder as a package; the engine is imported as the top-level package ``twig_core``,
so this folder is put on ``sys.path`` first (it is not otherwise, inside ComfyUI). The node modules are
imported relatively because ComfyUI has a top-level module called ``nodes`` of its own.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
