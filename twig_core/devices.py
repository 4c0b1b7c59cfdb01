"""Devices, dtypes and seeds for every front end (command line, ComfyUI nodes, WebUI tab).

The names users pick ("auto", "fp16", "bf16", "fp32"; weight dtypes "same", "stored", "fp16", "bf16", "int8"), what
"auto" means for each device and network (bf16 only where the GPU computes it natively), the Gemma-2 fp16 rule,
the keyword arguments a weight-dtype choice gives the loader, the seed range, and the device housekeeping every
front end shares (recognising out-of-memory errors, returning cached memory). Host-specific choices (ComfyUI's
model manager) are layered on top by the host glue.
"""

from __future__ import annotations

import functools
import gc

import torch

from .errors import TwigError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_CHOICES = ("auto", "fp16", "bf16", "fp32")
WEIGHT_DTYPE_CHOICES = ("same", "stored", "fp16", "bf16", "int8")

# Seeds are 0 … 2**64 - 1, as in ComfyUI (twig_core.sampling.noise_like: the seed → noise mapping)
MAX_SEED = 2**64 - 1

# what "auto" gives each network ("role") on a GPU without bf16 and on Apple's MPS; None: the networks share one
ROLES = (None, "diffusion", "vae", "text", "tipo")
_HALF_WITHOUT_BF16 = (None, "diffusion", "tipo")
_HALF_ON_MPS = ("diffusion", "tipo")


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def default_device() -> torch.device:
    """CUDA when available, else Apple's MPS when available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if mps_available() else "cpu")


def pick_device(choice: str | torch.device | None = "auto") -> torch.device:
    """A device choice ("auto"/None/"" = :func:`default_device`, else "cpu", "cuda", "cuda:1", ...)."""
    if choice is None or choice in ("", "auto"):
        return default_device()
    try:
        return torch.device(choice)
    except (RuntimeError, TypeError) as e:
        raise TwigError(f"unknown device {choice!r}; use auto, cpu, cuda, cuda:1, ...") from e


def cuda_bf16(device=None) -> bool:
    """Whether the CUDA GPU computes bf16 natively (compute capability 8.0 and up: Ampere, Ada, Hopper, ...).
    ``torch.cuda.is_bf16_supported()`` also counts emulated bf16 (Turing, Volta, Pascal), which runs slower than
    fp16 there, so it is not asked."""
    if not torch.cuda.is_available():
        return False
    dev = None if device is None or torch.device(device).index is None else torch.device(device)
    return tuple(torch.cuda.get_device_capability(dev)) >= (8, 0)


def mps_bf16() -> bool:
    """Whether MPS computes bf16 (macOS 14 and up)."""
    check = getattr(getattr(torch.backends, "mps", None), "is_macos_or_newer", None)
    return mps_available() and check is not None and bool(check(14, 0))


def is_out_of_memory(exc: BaseException) -> bool:
    """An out-of-memory error of any device: CUDA's ``OutOfMemoryError``, or the RuntimeError that MPS (and
    older torch) raise with "out of memory" in the message."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def clear_cache() -> None:
    """Return the memory cached by torch's allocator on CUDA and on MPS (no-op on the CPU)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if mps_available() and hasattr(torch, "mps"):
        torch.mps.empty_cache()


def text_dtype(dtype: torch.dtype | None, device) -> torch.dtype | None:
    """Gemma-2 overflows in fp16: bf16 (a CUDA GPU with native bf16, MPS on macOS 14+) or fp32 instead; other
    dtypes pass."""
    if dtype == torch.float16:
        dev = torch.device(device)
        native = cuda_bf16(dev) if dev.type == "cuda" else dev.type == "mps" and mps_bf16()
        return torch.bfloat16 if native else torch.float32
    return dtype


def resolve_dtype(choice, device="cpu", role: str | None = None) -> torch.dtype | None:
    """Map a user choice ("auto", "fp16", "bf16", "fp32", a torch.dtype or None) to a dtype.

    "auto" on CUDA: bf16 where the GPU computes it natively (:func:`cuda_bf16`), else fp16 (fp32 for the VAE,
    whose activations overflow fp16); on MPS fp16 for the transformer and TIPO, bf16 for Gemma-2 from macOS 14;
    fp32 elsewhere. For ``role`` "text" it is never fp16 (:func:`text_dtype`). None stays None (keep
    the stored dtype).
    """
    if choice is None or isinstance(choice, torch.dtype):
        return choice
    if role not in ROLES:
        raise TwigError(f"unknown role {role!r}; one of {', '.join(map(str, ROLES))}")
    if isinstance(choice, str):
        key = choice.lower().replace("float", "fp").replace("bfloat", "bf").replace("half", "fp16")
        key = {"fp": "fp32", "bf": "bf16"}.get(key, key)
        if key in DTYPES:
            return DTYPES[key]
        if key == "auto":
            dev = torch.device(device)
            if role == "text":
                return text_dtype(torch.float16 if dev.type == "mps" else resolve_dtype("auto", dev), dev)
            if dev.type == "cuda":
                if cuda_bf16(dev):
                    return torch.bfloat16
                return torch.float16 if role in _HALF_WITHOUT_BF16 else torch.float32
            if dev.type == "mps" and role in _HALF_ON_MPS:
                return torch.float16
            return torch.float32
    raise TwigError(f"unknown dtype {choice!r}; use {', '.join(DTYPE_CHOICES)}")


def weight_dtype_kwargs(weight_dtype, dtype, device="cpu", role: str = "diffusion") -> dict:
    """``dtype``/``compute_dtype`` arguments of ``load_transformer`` / ``load_vae`` for a weight_dtype choice:
    "same" (or None) holds the weights in ``dtype``; "stored" keeps the file's dtype and "fp16"/"bf16" that
    dtype, both computing in ``dtype`` (fp32 on CPU when ``dtype`` is None). "int8" (the transformer on the CPU,
    ``twig_core.int8``): fp16-held weights whose large products run in int8, the rest computing in fp32; for
    the VAE, or on a GPU, it means "same"."""
    if weight_dtype not in (None, *WEIGHT_DTYPE_CHOICES):
        raise TwigError(f"weight_dtype {weight_dtype!r}: choose one of {', '.join(WEIGHT_DTYPE_CHOICES)}")
    if weight_dtype == "int8":
        if role != "diffusion" or torch.device(device).type != "cpu":
            return {"dtype": dtype}
        compute = dtype or torch.float32
        return {"dtype": torch.float16, "compute_dtype": compute, "int8": compute == torch.float32}
    if weight_dtype in (None, "same"):
        return {"dtype": dtype}
    compute = dtype or (torch.float32 if torch.device(device).type == "cpu" else None)
    return {"dtype": None if weight_dtype == "stored" else resolve_dtype(weight_dtype, device),
            "compute_dtype": compute}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """This CPU's feature flags, read from /proc/cpuinfo (Linux); empty where unknown."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): elsewhere bf16 products fall back to
    kernels several times slower than fp32."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_amx() -> bool:
    """Whether this CPU has AMX tiles for bf16: there torch's bf16 products beat every int8 route it has
    (bench/RESULTS.md), so bf16 is the fastest reduced precision."""
    return "amx_bf16" in cpu_flags()


# ---- where the networks live between uses ----------------------------------------------------------------------

OFFLOAD_CHOICES = ("auto", "on", "off")
# "auto" offloads on CUDA cards with less memory than this: Gemma-2, the 1600M transformer and DC-AE hold about
# 9 GB in bf16, which does not fit beside a 1024² step's activations on 6-12 GB cards.
OFFLOAD_BELOW_BYTES = 14 * 2**30


def wants_offload(choice, device) -> bool:
    """Whether a run on ``device`` keeps only the running network there: "on"/True, "off"/False/None, or
    "auto": a CUDA device with less than OFFLOAD_BELOW_BYTES (never the CPU, nor MPS, whose memory is the
    CPU's)."""
    if choice in (True, "on"):
        return True
    if choice in (False, None, "off"):
        return False
    if choice != "auto":
        raise TwigError(f"offload {choice!r}: choose one of {', '.join(OFFLOAD_CHOICES)}")
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_properties(dev.index or 0).total_memory < OFFLOAD_BELOW_BYTES


class Deferred:
    """A network named but not loaded yet: ``get()`` loads it (once, until ``release()`` drops it) and runs the
    ``on_load`` hooks on it; ``config`` is what is known without loading (the transformer's, else None). With
    deferred parts a one-shot run holds one network at a time (see Residency)."""

    def __init__(self, name: str, load, config=None):
        self.name, self.config, self.on_load = name, config, []
        self._load, self._model = load, None

    def get(self):
        if self._model is None:
            model = self._load()
            for hook in self.on_load:
                hook(model)
            self._model = model
        return self._model

    def release(self) -> None:
        self._model = None

    def __repr__(self):
        return f"Deferred({self.name}, {'loaded' if self._model is not None else 'not loaded'})"


def when_loaded(network, hook) -> None:
    """``hook(model)`` on a loaded network now; on a :class:`Deferred` one each time it loads."""
    if isinstance(network, Deferred):
        network.on_load.append(hook)
    else:
        hook(network)


class Residency:
    """Which networks sit on the run ``device``. With ``offload`` only the one in use: ``use(network)`` moves
    it there and the one used before back to CPU memory (Gemma-2 leaves before sampling, the transformer
    before decoding). Without, ``use`` returns each network where it was loaded. A :class:`Deferred` network
    is loaded by ``use`` and dropped (its memory returned) when another network is used."""

    def __init__(self, device="cpu", offload: bool = False):
        self.device = torch.device(device)
        self.offload = bool(offload)
        self._held = None  # the network moved to the device (or loaded) last

    def use(self, network):
        if network is None or not (self.offload or isinstance(network, Deferred)):
            return network
        if self._held is not None and self._held is not network:
            self._put_away(self._held)
        self._held = network
        return network.get() if isinstance(network, Deferred) else network.to(self.device)

    def _put_away(self, network) -> None:
        if isinstance(network, Deferred):
            network.release()
            gc.collect()  # modules can sit in reference cycles; their tensors (or file mappings) go now
        else:
            network.to("cpu")
        clear_cache()
