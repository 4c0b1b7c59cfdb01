"""Standalone Twig tab: ``python -m twig_webui [--model PATH] [--models-dir DIR] [--port 7860]``.

The same gradio UI as the WebUI tab, served on localhost. Models are picked from ``--models-dir``
(Twig/, Stable-diffusion/, text_encoder/, VAE/, LLM/, adetailer/ below it, as in the WebUI), plus every
``--model`` given and the embedded demo models this install has.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a script, ``python /path/to/pack/twig_webui ...``
    import os as _os, runpy as _runpy, sys as _sys  # noqa: E401  (the pack root replaces this folder on sys.path)

    _sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _runpy.run_module("twig_webui", run_name="__main__", alter_sys=True)
    raise SystemExit

import argparse
import logging
import os
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m twig_webui", description="Twig text-to-image tab, standalone")
    p.add_argument("--model", action="append", default=[],
                   help="a Twig model (pipeline folder, transformer file or folder); may be repeated")
    p.add_argument("--models-dir", default=None,
                   help="folder with Twig/, Stable-diffusion/, text_encoder/, VAE/, LLM/, adetailer/ (default: ./models)")
    p.add_argument("--outdir", default=None, help="where images are saved (default: ./outputs/twig-images)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: localhost only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:1, mps ... (default: cuda, else mps, when available)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in args.model:
        if not os.path.exists(path):
            print(f"error: --model {path}: no such file or folder", file=sys.stderr)
            return 2
    try:
        import gradio as gr
    except ImportError:
        print("error: gradio is not installed (pip install -r requirements-webui.txt)", file=sys.stderr)
        return 2
    from .engine import Engine
    from .host import Host
    from .ui import build_ui

    models_dir = os.path.abspath(args.models_dir or "models")
    outdir = os.path.abspath(args.outdir or os.path.join("outputs", "twig-images"))
    os.makedirs(outdir, exist_ok=True)
    engine = Engine(Host(models_dir, outdir, device=args.device, extra_models=args.model))
    # system fonts: nothing is fetched from the network
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    ui = build_ui(engine, theme=theme)
    ui.queue()
    print(f"Twig: models from {models_dir}, images to {outdir}", flush=True)
    ui.launch(server_name=args.host, server_port=args.port, allowed_paths=[outdir], inbrowser=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
