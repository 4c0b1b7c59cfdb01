"""The Twig tab for Stable Diffusion WebUI (A1111) and Forge, also runnable on its own.

- ``engine``: the work, without gradio (model pickers, loaded models, one run, PNG saving);
- ``host``: standalone folders or the WebUI's (models, outputs, device, lock, Interrupt button);
- ``ui``: the gradio Blocks, shared by ``scripts/twig_tab.py`` (inside the WebUI) and
  ``python -m twig_webui`` (standalone).
"""

from .engine import Engine, Settings
from .host import Host, WebUIHost


def build_ui(engine=None, **kwargs):
    """The tab's gradio Blocks (imports gradio only when called)."""
    from .ui import build_ui as _build

    return _build(engine, **kwargs)


__all__ = ["Engine", "Settings", "Host", "WebUIHost", "build_ui"]
