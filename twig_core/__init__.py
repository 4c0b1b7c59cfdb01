"""Twig engine: Sana-family text-to-image models in plain PyTorch, with no host (ComfyUI, WebUI) or diffusers code.

``DEMO_DIR`` is where the small demo model ships inside the engine: a diffusers-layout pipeline folder.
"""

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent / "demo_model"
