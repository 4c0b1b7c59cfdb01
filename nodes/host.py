"""Glue between the nodes and the host application (ComfyUI), with plain-torch fallbacks.

Nothing here imports ComfyUI. Inside ComfyUI its modules (``folder_paths``, ``comfy.model_management``,
``comfy.utils``, ``comfy.model_patcher``, ``comfy.cli_args``) are already loaded when the pack is imported,
so they are looked up in ``sys.modules``; outside ComfyUI (tests, scripts) every function falls back to
plain torch and a local model folder (``$TWIG_MODELS_DIR``, else ``<pack>/models``).

Memory: a loaded model is a :class:`ManagedModel`. Inside ComfyUI it is registered with ComfyUI's model
manager through a ``ModelPatcher``, so it is moved to the GPU with ``load_models_gpu`` right before use,
moved off when another model needs the room, and unloaded by ComfyUI's "Unload models" / "Free model and
node cache" actions like any built-in model. The transformer is rebuilt there from ComfyUI's cast layers
(``nodes.native.for_host``) and registered without ``force_full_load``, with the memory its latent needs
(``twig_core.memory``), so --lowvram / --novram or a full GPU load part of it and stream the rest while it computes
on the load device; the DC-AE and Gemma-2 are loaded whole. Loaded models are shared per (file, dtype, device)
through a weak cache: the weights live as long as a node output refers to them, so when ComfyUI drops its node cache
the RAM is returned too.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import traceback
import weakref
from typing import Callable, Iterable

import torch

from twig_core import catalog
from twig_core import devices as twig_devices
from twig_core.errors import TwigError
from twig_core.quant import quant_summary
from twig_core.lora import remove_loras

log = logging.getLogger("twig")

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------------
# Host modules (looked up, never imported)


def _host_module(name: str):
    """The host's module ``name`` if the host has loaded it, else None."""
    return sys.modules.get(name)


def model_management():
    return _host_module("comfy.model_management")


def inside_comfy() -> bool:
    return model_management() is not None and _host_module("folder_paths") is not None


# --------------------------------------------------------------------------------------------------
# Model folders


def local_models_dir() -> str:
    return os.environ.get("TWIG_MODELS_DIR") or os.path.join(PACK_DIR, "models")


def folder_paths_for(kind: str) -> list[str]:
    """Folders searched for ``kind`` ("diffusion_models", "checkpoints", "text_encoders", "vae", ...)."""
    fp = _host_module("folder_paths")
    if fp is not None:
        try:
            return list(fp.get_folder_paths(kind))
        except Exception:  # unknown kind in this host version
            return []
    return [os.path.join(local_models_dir(), kind)]


def register_folder(kind: str, subfolder: str | None = None) -> None:
    """Make sure ComfyUI knows the model folder ``kind`` (``models/<subfolder or kind>``)."""
    fp = _host_module("folder_paths")
    if fp is None:
        return
    names = getattr(fp, "folder_names_and_paths", {})
    if kind not in names:
        path = os.path.join(fp.models_dir, subfolder or kind)
        fp.add_model_folder_path(kind, path)


def _roots(kinds: Iterable[str]) -> list[str]:
    return [root for kind in kinds for root in folder_paths_for(kind)]


def list_models(kinds: Iterable[str], pipeline_kinds: Iterable[str] = (),
                extensions: tuple[str, ...] = catalog.MODEL_EXTENSIONS, demo: bool = False) -> list[str]:
    """Names for a loader's combo (twig_core.catalog): files and diffusers folders found in the ``kinds`` folders,
    plus diffusers *pipeline* folders found in ``pipeline_kinds`` folders, after the embedded demo models when
    ``demo``. Folders end in "/"."""
    entries = catalog.listing(_roots(kinds), extensions, pipeline_roots=_roots(pipeline_kinds))
    return list(catalog.with_demo(entries) if demo else entries)


def resolve_model(name: str, kinds: Iterable[str], pipeline_kinds: Iterable[str] = ()) -> str:
    """Full path of the file or folder ``name`` picked from a loader combo; TwigError naming the folders."""
    kinds, pipeline_kinds = list(kinds), list(pipeline_kinds)
    if not name or not isinstance(name, str):
        raise TwigError(f"no model selected; put one in models/{' or models/'.join(kinds)} and refresh")
    path = catalog.find(name, _roots(kinds), _roots(pipeline_kinds))
    if path is not None:
        return path
    searched = _roots(kinds + pipeline_kinds)
    raise TwigError(
        f"model '{name}' not found; expected it in models/{' or models/'.join(kinds)} "
        f"(searched: {', '.join(searched) or 'no folders registered'})"
    )


# --------------------------------------------------------------------------------------------------
# Devices and dtypes


def default_device() -> torch.device:
    """ComfyUI's torch device inside ComfyUI, else twig_core.devices' default."""
    mm = model_management()
    if mm is not None and hasattr(mm, "get_torch_device"):
        return torch.device(mm.get_torch_device())
    return twig_devices.default_device()


def devices(role: str, choice: str = "default") -> tuple[torch.device, torch.device]:
    """(load device, offload device) for role "diffusion", "text" or "vae"; choice "default", "gpu" or "cpu"."""
    if choice == "cpu":
        cpu = torch.device("cpu")
        return cpu, cpu
    mm = model_management()
    if mm is None:
        d = default_device()
        return d, d
    load = {"diffusion": "get_torch_device", "text": "text_encoder_device", "vae": "vae_device"}[role]
    offload = {"diffusion": "unet_offload_device", "text": "text_encoder_offload_device", "vae": "vae_offload_device"}[role]
    if choice == "gpu":
        load = "get_torch_device"
    load_dev = getattr(mm, load, None) or getattr(mm, "get_torch_device", None)
    off_dev = getattr(mm, offload, None)
    ld = torch.device(load_dev()) if load_dev else default_device()
    od = torch.device(off_dev()) if off_dev else torch.device("cpu")
    return ld, od


_UNET_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def pick_dtype(choice: str, device: torch.device, role: str, params: int = 0) -> torch.dtype:
    """The dtype for a loader's dtype choice (twig_core.devices.DTYPE_CHOICES); "auto" asks ComfyUI's model
    manager for the transformer (its weight dtype for a model of ``params`` parameters: on a card too small for
    them it picks a narrower one) and the VAE, else twig_core.devices decides."""
    mm = model_management()
    if choice == "auto" and mm is not None:
        try:
            if role == "diffusion" and hasattr(mm, "unet_dtype"):
                return mm.unet_dtype(device, model_params=int(params), supported_dtypes=_UNET_DTYPES)
            if role == "vae" and hasattr(mm, "vae_dtype"):
                return mm.vae_dtype(device, allowed_dtypes=[torch.bfloat16, torch.float32])
        except Exception:
            pass
    return twig_devices.resolve_dtype(choice, device, role)


def parameter_count(path: str) -> int:
    """The transformer's parameter count in the file or folder ``path``, from tensor shapes only (nothing read);
    0 where it cannot be told (the loader then reports what is wrong with the file)."""
    from twig_core.layout import open_source

    try:
        return sum(t.numel() for t in open_source(path, "transformer").weights.meta_dict().values())
    except Exception:
        return 0


def transformer_dtypes(choice: str, weight_choice: str, device: torch.device, path: str) -> tuple[torch.dtype, dict]:
    """(dtype, ``load_transformer`` dtype arguments) for the Model Loader's dtype and weight_dtype choices.

    "auto" inside ComfyUI holds the weights in ComfyUI's dtype for a model of this file's size (``unet_dtype``)
    and computes in ComfyUI's manual-cast choice for it (``unet_manual_cast``), as ComfyUI does for its own
    models: e.g. fp16 weights computing in fp32 on a GPU without fast fp16, or fp8 weights (--fp8_e4m3fn-unet)
    computing in bf16. An explicit weight_dtype keeps its meaning (twig_core.devices.weight_dtype_kwargs)."""
    mm = model_management()
    inside = choice == "auto" and mm is not None
    dtype = pick_dtype(choice, device, "diffusion", parameter_count(path) if inside else 0)
    kwargs = twig_devices.weight_dtype_kwargs(weight_choice, dtype, device)
    if inside and weight_choice in (None, "same") and hasattr(mm, "unet_manual_cast"):
        try:
            compute = mm.unet_manual_cast(dtype, device, _UNET_DTYPES)
        except Exception:
            compute = None
        if compute is not None and compute != dtype:
            kwargs["compute_dtype"] = compute
    return dtype, kwargs


# --------------------------------------------------------------------------------------------------
# Progress, cancel, memory


def check_interrupt() -> None:
    """Raise the host's interrupt exception if the user pressed cancel (no-op outside ComfyUI)."""
    mm = model_management()
    fn = getattr(mm, "throw_exception_if_processing_interrupted", None) if mm is not None else None
    if fn is not None:
        fn()


def is_interrupt(exc: BaseException) -> bool:
    mm = model_management()
    cls = getattr(mm, "InterruptProcessingException", None) if mm is not None else None
    return (cls is not None and isinstance(exc, cls)) or isinstance(exc, KeyboardInterrupt)


def is_oom(exc: BaseException) -> bool:
    mm = model_management()
    cls = getattr(mm, "OOM_EXCEPTION", None) if mm is not None else None
    return (cls is not None and isinstance(exc, cls)) or twig_devices.is_out_of_memory(exc)


def soft_empty_cache() -> None:
    mm = model_management()
    fn = getattr(mm, "soft_empty_cache", None) if mm is not None else None
    if fn is not None:
        fn()
    else:
        twig_devices.clear_cache()


def free_after_failure(exc: BaseException) -> None:
    """Drop the tensors held by the failed call's frames, then return cached GPU memory."""
    try:
        traceback.clear_frames(exc.__traceback__)
    except Exception:
        pass
    gc.collect()
    soft_empty_cache()


class Progress:
    """A ComfyUI ProgressBar when running inside ComfyUI, else a no-op with the same calls."""

    def __init__(self, total: int):
        self.total = total
        utils = _host_module("comfy.utils")
        cls = getattr(utils, "ProgressBar", None) if utils is not None else None
        self._bar = cls(total) if cls is not None else None

    def update(self, step: int, preview=None) -> None:
        if self._bar is not None:
            self._bar.update_absolute(step, self.total, preview)


def preview_settings() -> tuple[bool, int]:
    """(previews wanted, max preview size in pixels) from ComfyUI's --preview-method/--preview-size."""
    if _host_module("comfy.utils") is None:
        return False, 512
    args = getattr(_host_module("comfy.cli_args"), "args", None)
    if args is None:
        return True, 512
    method = str(getattr(getattr(args, "preview_method", None), "value", getattr(args, "preview_method", "auto")))
    return method != "none", int(getattr(args, "preview_size", 512) or 512)


# --------------------------------------------------------------------------------------------------
# Loaded models


class _Holder(torch.nn.Module):
    """What ComfyUI's ModelPatcher manages: the torch module, with a plain ``device`` attribute
    (our modules expose ``device`` as a read-only property, which the patcher wants to assign)."""

    def __init__(self, inner: torch.nn.Module, device: torch.device):
        super().__init__()
        self.inner = inner
        self.device = device


class ManagedModel:
    """One loaded model (transformer, DC-AE or text encoder) and its place in host memory.

    ``get()`` returns the twig_core object ready on its load device, loading it again if it was released.
    ``release()`` drops the weights (VRAM and RAM); the next ``get()`` reads the file again.
    """

    def __init__(self, kind: str, path: str, load_fn: Callable[[torch.device], object],
                 load_device: torch.device, offload_device: torch.device, dtype: torch.dtype, module_of=None):
        self.kind, self.path = kind, path
        self.name = os.path.basename(path.rstrip("/\\")) or path
        self.load_device, self.offload_device, self.dtype = load_device, offload_device, dtype
        self._load_fn = load_fn
        self._module_of = module_of or (lambda obj: obj)
        self._obj = None
        self._patcher = None
        self._patched_bytes = 0  # the module's resident size when the patcher was made
        self._warned = False  # said that ComfyUI left the weights off the load device
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        state = "loaded" if self._obj is not None else "released"
        stored = quant_summary(self._module_of(self._obj)) if self._obj is not None else ""  # e.g. "Q8_0 x140"
        dtype = str(self.dtype).replace("torch.", "") + (f" (weights {stored})" if stored else "")
        return f"<Twig {self.kind} {self.name} {dtype} on {self.load_device}, {state}>"

    @property
    def loaded(self) -> bool:
        return self._obj is not None

    def peek(self):
        """The twig_core object without moving it (loading it from disk if needed). Inside ComfyUI the
        transformer is rebuilt over the same weights with ComfyUI's cast layers, so it can be streamed."""
        with self._lock:
            if self._obj is None:
                mm = model_management()
                # inside ComfyUI weights wait on the offload device until ComfyUI moves them
                first = self.offload_device if mm is not None else self.load_device
                obj = self._load_fn(first)
                if mm is not None and self.kind == "transformer":
                    from .native import for_host

                    obj = for_host(obj)
                self._obj = obj
                self._patcher = None
            return self._obj

    def get(self, memory_required: int = 0):
        """The twig_core object ready to run on its load device (registered with ComfyUI's model manager).

        ``memory_required``: bytes the coming run needs beyond the weights (``twig_core.memory``); ComfyUI frees
        that much (unloading other models, or keeping part of a streamable model's weights off the device).
        A transformer built from ComfyUI's cast layers may be loaded partially (--lowvram, --novram, or too
        little free memory) and computes on the load device, its other weights streamed in per layer; the other
        networks are loaded whole, or run where ComfyUI left them, with a warning."""
        with self._lock:
            obj = self.peek()
            module = self._module_of(obj)
            mm = model_management()
            mp = _host_module("comfy.model_patcher")
            if mm is not None and mp is not None and hasattr(mm, "load_models_gpu"):
                size = resident_bytes(module)
                if self._patcher is not None and size != self._patched_bytes:
                    # weights read since ComfyUI measured the model (the DC-AE's encoder, read on first
                    # encode): register it anew so that its memory accounting covers them
                    self._unregister()
                    self._patcher = None
                if self._patcher is None:
                    holder = _holder_class(self.kind)(module, _param_device(module))
                    self._patcher = mp.ModelPatcher(holder, load_device=self.load_device, offload_device=self.offload_device)
                    self._patched_bytes = size
                streams = streams_weights(module)
                mm.load_models_gpu([self._patcher], memory_required=int(memory_required), force_full_load=not streams)
                self._placed(module, streams)
            elif _param_device(module) != self.load_device:
                module.to(self.load_device)
            if self.kind == "transformer":  # a LoRA stack is only there for whoever set it (nodes.lora.LoraModel)
                remove_loras(module)
            return obj

    def _placed(self, module: torch.nn.Module, streams: bool) -> None:
        """After ComfyUI placed the weights: a streamable model computes on the load device whatever part of
        its weights stayed behind; any other model runs where its weights are, said once if that is not the
        load device (ComfyUI in --novram keeps models it cannot stream off the GPU)."""
        if streams:
            module.compute_device = self.load_device
            return
        where = _param_device(module)
        if where != self.load_device and not self._warned:
            self._warned = True
            log.warning("[Twig] ComfyUI kept the %s %s on %s, not %s (--novram, or too little free memory): it runs "
                        "there, slower", self.kind.replace("_", " "), self.name, where, self.load_device)

    def offload(self) -> None:
        """Move the weights to the offload device (frees VRAM, keeps RAM)."""
        with self._lock:
            if self._obj is None:
                return
            if not self._unregister():
                self._module_of(self._obj).to(self.offload_device)
            soft_empty_cache()

    def release(self) -> None:
        """Drop the weights entirely; a later ``get()`` loads the file again."""
        with self._lock:
            self._unregister()
            self._obj = None
            self._patcher = None
        gc.collect()
        soft_empty_cache()

    def _unregister(self) -> bool:
        """Unload from ComfyUI's model manager; True if it was registered there."""
        mm = model_management()
        if self._patcher is None or mm is None:
            return False
        loaded = getattr(mm, "current_loaded_models", [])
        found = False
        for i in range(len(loaded) - 1, -1, -1):
            if loaded[i].model is self._patcher:
                loaded[i].model_unload()
                loaded.pop(i)
                found = True
        if not found:
            self._patcher.detach()
        return True


_HOLDER_NAMES = {"transformer": "TwigTransformer", "vae": "TwigDCAE", "text_encoder": "TwigGemma2"}
_HOLDER_CLASSES: dict[str, type] = {}


def _holder_class(kind: str) -> type:
    """A _Holder subclass named after the model, so ComfyUI's log says what it is loading."""
    name = _HOLDER_NAMES.get(kind, "TwigModel")
    if name not in _HOLDER_CLASSES:
        _HOLDER_CLASSES[name] = type(name, (_Holder,), {"__module__": __name__})
    return _HOLDER_CLASSES[name]


def step_memory_required(transformer, latent_shape, cfg: bool = True, caption_tokens: int = 300) -> int:
    """Bytes one sampling step of ``transformer`` on a latent of ``latent_shape`` [B,C,h,w] needs beyond the
    weights (twice the batch with ``cfg``), for ``ManagedModel.get``."""
    from twig_core import memory

    return memory.step_bytes(transformer.config, tuple(latent_shape), transformer.dtype.itemsize, cfg=cfg,
                             caption_tokens=caption_tokens)


def vae_memory_required(vae, latent_shape=None, tile_size: int = 0, encode: bool = False, pixels=None) -> int:
    """Bytes a DC-AE decode (or ``encode``) of one latent of ``latent_shape`` [B,C,h,w] needs beyond the weights,
    in tiles of ``tile_size`` pixels (0: dcae_exec's automatic choice), for ``ManagedModel.get``. An encode may
    give the image's ``pixels`` (height, width) instead of the latent shape."""
    from twig_core import dcae_exec, memory

    if latent_shape is None:
        f = vae.spatial_factor
        latent_shape = (1, vae.config.latent_channels, pixels[0] // f, pixels[1] // f)
    h, w = latent_shape[-2:]
    f = vae.spatial_factor
    tile = tile_size // f if tile_size else dcae_exec.auto_tile_size(h, w)
    stages = vae.config.encoder_block_out_channels if encode else vae.config.decoder_block_out_channels
    return memory.vae_bytes((1, *latent_shape[1:]), vae.dtype.itemsize, stages[0], f, tile)


def streams_weights(module: torch.nn.Module) -> bool:
    """True for a model built from ComfyUI's cast layers (``nodes.native.NativeTwigTransformer``): ComfyUI may
    keep part of its weights off the device, and it says itself where it computes (``compute_device``)."""
    return hasattr(module, "compute_device")


def resident_bytes(module: torch.nn.Module) -> int:
    """Bytes of the weights the module holds now (a DC-AE whose encoder is not read yet: the decoder's)."""
    return sum(t.nelement() * t.element_size() for t in module.state_dict().values())


def _param_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


_CACHE: dict[tuple, "weakref.ref[ManagedModel]"] = {}
_CACHE_LOCK = threading.Lock()


def _file_stamp(path: str) -> tuple:
    try:
        st = os.stat(path)
        return (st.st_mtime_ns, st.st_size)
    except OSError:
        return (0, 0)


def cached_model(kind: str, path: str, dtype: torch.dtype, load_device: torch.device, offload_device: torch.device,
                 load_fn: Callable[[torch.device], object], module_of=None, extra: tuple = ()) -> ManagedModel:
    """The shared ManagedModel for (kind, file, dtype, devices), created and loaded if not alive."""
    key = (kind, os.path.abspath(path), _file_stamp(path), str(dtype), str(load_device), str(offload_device)) + extra
    with _CACHE_LOCK:
        for k in [k for k, ref in _CACHE.items() if ref() is None]:
            del _CACHE[k]
        ref = _CACHE.get(key)
        model = ref() if ref is not None else None
        if model is None:
            model = ManagedModel(kind, path, load_fn, load_device, offload_device, dtype, module_of)
            _CACHE[key] = weakref.ref(model)
    model.peek()  # load now, so a bad file is reported by its loader node
    return model


def loaded_models() -> list[ManagedModel]:
    return [m for m in (ref() for ref in list(_CACHE.values())) if m is not None]


def release_all() -> None:
    """Release every Twig model (what the unload node calls)."""
    for m in loaded_models():
        m.release()
