"""What the model pickers list: weight files and diffusers folders found in model folders, what each holds,
the name it is shown under, and the embedded demo model. Shared by the command line, the ComfyUI nodes and the
WebUI tab, which only say which folders to search (and add their own widgets on top).

A name is the path relative to the folder it was found in, with "/" separators; a diffusers folder (one
holding ``model_index.json`` or ``config.json``) is listed as "name/" and stands for the files inside it. The
demo models are the pipeline folders ``twig_core/demo_model`` (128², ``$TWIG_DEMO_DIR`` overrides it), shown as
:data:`DEMO_NAME` everywhere, and ``twig_core/demo_model_256`` (256², :data:`DEMO_256_NAME`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .errors import TwigError

# what twig_core.loader reads (it sniffs the format from the first bytes: safetensors, torch or GGUF)
MODEL_EXTENSIONS = (".safetensors", ".sft", ".pth", ".pt", ".ckpt", ".bin", ".gguf")
# what is classified (kind) by reading its keys: safetensors headers are small and Twig ships a .pth; a pickled
# .ckpt/.pt/.bin beside them is most likely another model's checkpoint, which would have to be read whole
# (a GGUF's tensor directory is read without its data, like a safetensors header)
CLASSIFIED_EXTENSIONS = (".safetensors", ".sft", ".pth", ".gguf")
TIPO_EXTENSIONS = (".safetensors", ".sft")
LORA_EXTENSIONS = (".safetensors", ".sft", ".pt", ".pth", ".bin")
MAX_DEPTH = 4

DEMO_NAME = "twig-demo (embedded)"
DEMO_DIR = Path(__file__).resolve().parent / "demo_model"
# the 256² demo model: 8x8 latents, which keep the shapes a 128² picture's 4x4 ones lose
DEMO_256_NAME = "twig-demo 256 (embedded)"
DEMO_256_DIR = Path(__file__).resolve().parent / "demo_model_256"
DEMO_NAMES = (DEMO_NAME, DEMO_256_NAME)
# LoRAs made for the demo model (``python -m training demo --stage lora``), listed beside a host's own LoRAs
DEMO_LORA_DIR = Path(__file__).resolve().parent / "demo_loras"


def demo_location() -> str:
    """Where the demo pipeline folder is looked for: $TWIG_DEMO_DIR, else twig_core/demo_model."""
    return os.environ.get("TWIG_DEMO_DIR") or str(DEMO_DIR)


def demo_dir() -> str | None:
    """The embedded demo pipeline folder, or None when this install has none (:func:`demo_location`)."""
    path = demo_location()
    return path if is_pipeline_folder(path) else None


def _demo_locations() -> dict[str, str]:
    """name -> where each embedded demo model is looked for (:data:`DEMO_NAMES` order)."""
    return {DEMO_NAME: demo_location(), DEMO_256_NAME: str(DEMO_256_DIR)}


def demos() -> dict[str, str]:
    """name -> folder of the embedded demo models this install has: the 128² one, then the 256² one."""
    return {name: path for name, path in _demo_locations().items() if is_pipeline_folder(path)}


def with_demo(entries: dict[str, str]) -> dict[str, str]:
    """``entries`` (name -> path) after the demo models this install has (:func:`demos`)."""
    return {**demos(), **entries}


def is_model_folder(path: str) -> bool:
    """A diffusers component folder (config.json) or pipeline folder (model_index.json)."""
    return os.path.isfile(os.path.join(path, "model_index.json")) or os.path.isfile(os.path.join(path, "config.json"))


def is_pipeline_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model_index.json"))


def scan(root: str, extensions: tuple[str, ...] = MODEL_EXTENSIONS, *, folders: bool = True,
         folders_only: bool = False, max_depth: int = MAX_DEPTH) -> dict[str, str]:
    """name -> path under ``root``: diffusers folders first ("name/"; not searched further), then files with
    ``extensions`` down to ``max_depth`` folders deep. ``folders`` False: no folder stands for its files."""
    files: dict[str, str] = {}
    dirs: dict[str, str] = {}
    if not os.path.isdir(root):
        return {}
    for cur, subdirs, names in os.walk(root, followlinks=True):
        rel = os.path.relpath(cur, root)
        depth = 0 if rel == "." else rel.count(os.sep) + 1
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        if folders and depth > 0 and is_model_folder(cur):
            dirs[rel.replace(os.sep, "/") + "/"] = cur
            subdirs[:] = []  # components of a pipeline are reached through the pipeline folder
            continue
        if depth >= max_depth:
            subdirs[:] = []
        if not folders_only:
            for n in sorted(names):
                if n.lower().endswith(extensions):
                    files[os.path.normpath(os.path.join(rel, n)).replace(os.sep, "/")] = os.path.join(cur, n)
    return {**dirs, **files}


def listing(roots: Iterable[str], extensions: tuple[str, ...] = MODEL_EXTENSIONS, *, kinds: Iterable[str] | None = None,
            pipeline_roots: Iterable[str] = (), folders: bool = True) -> dict[str, str]:
    """name -> path of what the ``roots`` hold, plus the pipeline folders (model_index.json) in ``pipeline_roots``;
    the first folder wins when two hold the same name. ``kinds`` (e.g. ("transformer", "pipeline")): only what
    :func:`kind` says is one of them, among folders and :data:`CLASSIFIED_EXTENSIONS` files."""
    if kinds is not None:
        kinds = tuple(kinds)
        extensions = tuple(e for e in extensions if e in CLASSIFIED_EXTENSIONS)
    out: dict[str, str] = {}
    for root in roots:
        for name, path in scan(root, extensions, folders=folders).items():
            if name not in out and (kinds is None or kind(path) in kinds):
                out[name] = path
    for root in pipeline_roots:
        for name, path in scan(root, folders_only=True).items():
            if name not in out and is_pipeline_folder(path):
                out[name] = path
    return out


def lora_listing(roots: Iterable[str]) -> dict[str, str]:
    """name -> path of the LoRA files in ``roots``, then those made for the demo model (:data:`DEMO_LORA_DIR`)."""
    return listing([*roots, str(DEMO_LORA_DIR)], LORA_EXTENSIONS, folders=False)


def find_lora(name: str, roots: Iterable[str] = ()) -> str:
    """A LoRA given as a path, or by its name (with or without extension) in ``roots`` and the demo LoRAs."""
    if os.path.isfile(name):
        return name
    for listed, path in lora_listing(roots).items():
        if name in (listed, os.path.splitext(listed)[0]):
            return path
    where = ", ".join([*roots, str(DEMO_LORA_DIR)])
    raise TwigError(f"LoRA {name}: no such file (nor a LoRA of that name in {where})")


def find(name: str, roots: Iterable[str], pipeline_roots: Iterable[str] = ()) -> str | None:
    """Full path of a listed ``name`` (one of :data:`DEMO_NAMES`, or a file or folder in ``roots``, or a pipeline folder
    in ``pipeline_roots``), None if it is not there. Names never lead out of their folder."""
    if name in DEMO_NAMES:
        path = demos().get(name)
        if path is None:
            raise TwigError(f"'{name}' is not in this install (expected a pipeline folder at "
                            f"{_demo_locations()[name]}); pick a model from the list")
        return path
    if not name:
        return None
    rel = name.rstrip("/")
    for root, pipelines_only in [(r, False) for r in roots] + [(r, True) for r in pipeline_roots]:
        top = os.path.abspath(root)
        path = os.path.abspath(os.path.join(root, rel))
        if os.path.commonpath([path, top]) != top:
            continue
        if is_pipeline_folder(path) if pipelines_only else os.path.exists(path):
            return path
    return None


_KIND_CACHE: dict[tuple, str | None] = {}


def kind(path: str) -> str | None:
    """What ``path`` holds ("transformer", "vae", "text_encoder", "pipeline"; twig_core.loader.detect),
    remembered per file version; None for anything the loader does not read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (path, st.st_mtime_ns, st.st_size)
    if key not in _KIND_CACHE:
        from . import loader

        try:
            _KIND_CACHE[key] = loader.detect(path)
        except Exception:  # noqa: BLE001 - not ours (an SD checkpoint, a CLIP, ...)
            _KIND_CACHE[key] = None
    return _KIND_CACHE[key]
