"""Stable Diffusion WebUI (A1111) / Forge extension entry: adds the "Twig" tab.

The WebUI loads every file in an extension's ``scripts/`` folder; this one only registers the tab. The tab
itself is ``twig_webui.ui.build_ui`` (the same UI as ``python -m twig_webui``), and all the work is done by
``twig_core``. Standalone, without a WebUI: ``python scripts/twig_tab.py --model PATH``.
"""

from __future__ import annotations

import os
import sys

EXTENSION_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if EXTENSION_DIR not in sys.path:
    sys.path.append(EXTENSION_DIR)  # appended: the WebUI's own modules keep precedence

TAB_TITLE = "Twig"
TAB_ID = "twig"


def on_ui_tabs():
    """script_callbacks.on_ui_tabs callback: [(blocks, title, elem_id)]."""
    from twig_webui.engine import Engine
    from twig_webui.host import WebUIHost
    from twig_webui.ui import build_ui

    return [(build_ui(Engine(WebUIHost())), TAB_TITLE, TAB_ID)]


def _register() -> bool:
    try:
        from modules import script_callbacks
    except ImportError:
        return False
    script_callbacks.on_ui_tabs(on_ui_tabs)
    return True


if __name__ == "__main__":
    from twig_webui.__main__ import main

    sys.exit(main())
else:
    _register()
