"""Where the tab runs: standalone (our own model folders and output folder) or inside the WebUI (A1111/Forge).

A host answers: which folders hold which models, where images are saved, which device to use, whether the
user pressed the WebUI's own Interrupt button, and how to take the WebUI's GPU lock. ``WebUIHost`` imports
the WebUI's ``modules`` lazily, on first use, so importing this file never needs the WebUI.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent

# what each picker lists, as folders under the models directory (first = where new files should go)
STANDALONE_FOLDERS = {
    "model": ("Twig", "Stable-diffusion", "diffusion_models"),
    "text_encoder": ("text_encoder", "text_encoders"),
    "vae": ("VAE", "vae"),
    "llm": ("LLM",),
    "face": ("adetailer", "ultralytics/bbox", "ultralytics/segm"),
    "lora": ("Lora", "loras"),  # the WebUI's LoRA folder (its --lora-dir too), for <lora:name:strength> in prompts
}


class Host:
    """The standalone host: models under ``models_dir``, images under ``outdir``."""

    name = "standalone"

    def __init__(self, models_dir: str | os.PathLike | None = None, outdir: str | os.PathLike | None = None,
                 device: str = "auto", extra_models: list[str] | None = None):
        self.models_dir = os.path.abspath(os.fspath(models_dir or (PACK_DIR / "models")))
        self.out = os.path.abspath(os.fspath(outdir or (PACK_DIR / "outputs")))
        self.device_choice = device
        self.extra_models = [os.path.abspath(p) for p in (extra_models or [])]
        self._lock = threading.Lock()

    # folders and files
    def folders(self, role: str) -> list[str]:
        return [os.path.join(self.models_dir, *sub.split("/")) for sub in STANDALONE_FOLDERS[role]]

    def folder_hint(self, role: str) -> str:
        return os.path.join(self.models_dir, STANDALONE_FOLDERS[role][0])

    def outdir(self) -> str:
        return self.out

    # running
    def device(self):
        from twig_core.devices import pick_device

        return pick_device(self.device_choice)

    def interrupted(self) -> bool:
        return False

    @contextlib.contextmanager
    def job(self, name: str):
        """Held while generating: one job at a time."""
        with self._lock:
            yield

    def free_host_models(self) -> None:
        """Release the host's own models before ours load (nothing to do standalone)."""


class WebUIHost(Host):
    """Inside Stable Diffusion WebUI (A1111) or Forge: its model folders, output folder, device, lock and
    Interrupt button."""

    name = "webui"

    def __init__(self):
        super().__init__()
        self.unload_webui_model = True

    @staticmethod
    def _module(name: str):
        import importlib

        try:
            return importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an older/newer WebUI without this module
            return None

    def _shared(self):
        return self._module("modules.shared")

    def _models_path(self) -> str:
        for mod in ("modules.paths_internal", "modules.paths"):
            m = self._module(mod)
            if m is not None and getattr(m, "models_path", None):
                return m.models_path
        shared = self._shared()
        return getattr(shared, "models_path", None) or os.path.join(os.getcwd(), "models")

    def _cmd_dir(self, name: str) -> str | None:
        opts = getattr(self._shared(), "cmd_opts", None)
        value = getattr(opts, name, None)
        return value if isinstance(value, str) and value else None

    def folders(self, role: str) -> list[str]:
        base = self._models_path()
        out = [os.path.join(base, *sub.split("/")) for sub in STANDALONE_FOLDERS[role]]
        extra = {"model": "ckpt_dir", "vae": "vae_dir", "text_encoder": "text_encoder_dir", "lora": "lora_dir"}.get(role)
        if extra and self._cmd_dir(extra):
            out.append(self._cmd_dir(extra))
        seen, unique = set(), []
        for f in out:
            key = os.path.normcase(os.path.abspath(f))
            if key not in seen:
                seen.add(key)
                unique.append(f)
        return unique

    def folder_hint(self, role: str) -> str:
        return os.path.join(self._models_path(), STANDALONE_FOLDERS[role][0])

    def outdir(self) -> str:
        opts = getattr(self._shared(), "opts", None)
        for key in ("outdir_txt2img_samples", "outdir_samples"):
            value = getattr(opts, key, None) if opts is not None else None
            if isinstance(value, str) and value:
                return os.path.join(os.path.dirname(os.path.abspath(value.rstrip("/\\"))), "twig-images")
        m = self._module("modules.paths_internal")
        base = getattr(m, "default_output_dir", None) or os.path.join(os.getcwd(), "outputs")
        return os.path.join(base, "twig-images")

    def device(self):
        import torch

        devices = self._module("modules.devices")
        dev = getattr(devices, "device", None)
        if dev is None and devices is not None and hasattr(devices, "get_optimal_device"):
            with contextlib.suppress(Exception):
                dev = devices.get_optimal_device()
        return torch.device(dev) if dev is not None else super().device()

    def _state(self):
        return getattr(self._shared(), "state", None)

    def interrupted(self) -> bool:
        state = self._state()
        return bool(getattr(state, "interrupted", False)) if state is not None else False

    @contextlib.contextmanager
    def job(self, name: str):
        """The WebUI's queue lock (no txt2img at the same time) and its job state (its Interrupt button)."""
        cq = self._module("modules.call_queue")
        lock = getattr(cq, "queue_lock", None) or self._lock
        with lock:
            state = self._state()
            began = False
            if state is not None and hasattr(state, "begin"):
                with contextlib.suppress(Exception):
                    state.begin(job=name)
                    began = True
            try:
                yield
            finally:
                if began:
                    with contextlib.suppress(Exception):
                        state.end()

    def free_host_models(self) -> None:
        """Move the WebUI's Stable Diffusion checkpoint off the GPU so ours fits (Forge: unload all its models;
        A1111: only a checkpoint that is already loaded; reading ``shared.sd_model`` would load one). The
        WebUI brings it back on its next txt2img."""
        if not self.unload_webui_model or self.device().type == "cpu":
            return
        sd_models = self._module("modules.sd_models")
        fn = getattr(sd_models, "unload_model_weights", None)
        if fn is None:
            return
        with contextlib.suppress(Exception):
            if self._module("modules_forge") is not None:
                fn()
                return
            loaded = getattr(getattr(sd_models, "model_data", None), "sd_model", None)
            if loaded is not None:
                fn(loaded)
