"""Weight files read safely: a name -> tensor mapping over a safetensors, PyTorch or GGUF file, or several.

A file's type is sniffed from its first bytes, not its extension. ``.safetensors`` is read by a small reader
(header validated against the file size, then one tensor at a time: a large one as a private mapping of its bytes,
``map_range``, a small one read straight into its buffer) and written by one (``write_safetensors``: header first,
then one tensor at a time). PyTorch files go only through
``torch.load(weights_only=True)`` (memory-mapped when the file is a zip archive): a pickle that would construct
anything but tensors and plain containers is refused with a TwigError naming the file, and nothing in it runs.
GGUF files go to ``twig_core.gguf_io`` and float8 safetensors through ``twig_core.quant.fp8_view`` (their
weights stay narrow in memory). ``meta(name)`` gives a tensor's shape and dtype without reading it.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Mapping
from typing import Any, Iterator

import torch

from .errors import TwigError

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)

_MAX_HEADER = 256 * 1024 * 1024
# the order safetensors' own writer puts dtypes in (widest alignment first; then by name)
_ST_ORDER = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E4M3", "F8_E5M2", "I8", "U8",
             "BOOL")


def shortlist(items, n: int = 5) -> str:
    """The first ``n`` items for a message, with the total when there are more."""
    items = list(items)
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


class Weights(Mapping):
    """A read-only name -> tensor mapping over one or more files. ``meta(name)`` gives shape and dtype
    without reading; ``[name]`` reads the tensor (CPU, stored dtype). A reader gives ``_index``, the collection
    of its tensor names (in file order), which iteration, length and membership go through."""

    label: str = ""

    @property
    def _index(self):
        raise NotImplementedError

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key) -> bool:
        return key in self._index

    def meta(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def meta_dict(self) -> dict[str, torch.Tensor]:
        return {k: self.meta(k) for k in self}

    def file_of(self, key: str) -> str:
        return self.label

    def release(self, key: str) -> None:
        """Done with tensor ``key`` for now: a reader that maps its file drops the tensor's pages from this
        process's resident set (they stay in the page cache; a later read maps them again). A no-op elsewhere."""


class SafetensorsFile(Weights):
    """A .safetensors file: the header is parsed and checked up front; tensors are read one by one."""

    def __init__(self, path: str):
        self.path = self.label = path
        size = os.path.getsize(path)
        try:
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise TwigError(f"{path}: file is empty or truncated (no safetensors header)")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > _MAX_HEADER:
                    raise TwigError(
                        f"{path}: truncated or corrupt safetensors file (header of {n} bytes, file has {size})"
                    )
                header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TwigError(f"{path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise TwigError(f"{path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        avail = size - self._start
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            try:
                dtype = _ST_DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise TwigError(f"{path}: corrupt safetensors entry for {key!r}: {info!r}") from None
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if end - begin != nbytes or begin < 0 or any(s < 0 for s in shape):
                raise TwigError(f"{path}: corrupt safetensors entry {key!r}: {end - begin} bytes for shape {shape}")
            if end > avail:
                raise TwigError(
                    f"{path}: truncated file: tensor {key!r} ends at byte {self._start + end}, "
                    f"the file has {size} bytes (incomplete download?)"
                )
            self._entries[key] = (dtype, shape, begin, end)

    @property
    def _index(self):
        return self._entries

    def meta(self, key: str) -> torch.Tensor:
        dtype, shape, _, _ = self._entries[key]
        return torch.empty(shape, dtype=dtype, device="meta")

    def __getitem__(self, key: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entries[key]
        if end > begin and end - begin >= MAP_MIN_BYTES:
            t = map_range(self.path, self._start + begin, end - begin, dtype)
            if t is not None:
                return t.reshape(shape)
        buf = torch.empty(end - begin, dtype=torch.uint8)
        if end > begin:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self._start + begin)
                view = memoryview(buf.numpy())
                got = 0
                while got < len(view):
                    n = f.readinto(view[got:])
                    if not n:
                        raise TwigError(f"{self.path}: truncated while reading {key!r}")
                    got += n
        return buf.view(dtype).reshape(shape)


# tensors at least this large are mapped (``map_range``) rather than read
MAP_MIN_BYTES = 1 << 20


def map_range(path: str, at: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Bytes ``[at, at + nbytes)`` of the file as a flat ``dtype`` tensor backed by a private, copy-on-write mapping
    of just that range: nothing is copied, the kernel is asked to read the pages ahead (``MADV_WILLNEED``), a
    write to the tensor stays in this process, and the mapping ends with the tensor's last reference. So a tensor
    used as stored (bf16 Gemma-2 under bf16) costs no copy and no second set of pages beside the page cache, and
    one that is cast is read through the mapping and let go. None where the range cannot be mapped (an offset
    not aligned to the dtype, a file system without mappings), and the caller reads it instead.
    Like a memory-mapped ``.pth``, a file truncated in place while its tensors are in use ends the process
    (SIGBUS); replacing it (a new file renamed over the old, as downloaders do) is safe."""
    import mmap

    size = torch.empty((), dtype=dtype).element_size()
    if at % size:
        return None
    base = at - at % mmap.ALLOCATIONGRANULARITY
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), at + nbytes - base, offset=base, access=mmap.ACCESS_COPY)
    except (OSError, ValueError, OverflowError):
        return None
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_WILLNEED"):
        mm.madvise(mmap.MADV_WILLNEED)
    return torch.frombuffer(mm, dtype=dtype, count=nbytes // size, offset=at - base)


def drop_pages(address: int, size: int) -> None:
    """``MADV_DONTNEED`` on the whole pages of ``[address, address + size)`` of a read-only file mapping (Linux and
    macOS; a no-op elsewhere): the pages leave the resident set and are read back from the file when touched."""
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    start, end = -(-address // page) * page, (address + size) // page * page
    if end <= start or not hasattr(mmap, "MADV_DONTNEED"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), ctypes.c_int(mmap.MADV_DONTNEED))


def write_safetensors(path: str, entries, metadata: dict | None = None) -> None:
    """Write a .safetensors file tensor by tensor: ``entries`` are (name, dtype, shape, read) and ``read()``
    gives the tensor when its turn comes, so one is in memory at a time. The header (8-byte little-endian
    length, JSON padded with spaces to 8 bytes) is known from dtypes and shapes and goes first; names are in
    safetensors' own order, so the bytes are those ``safetensors.torch.save_file`` writes for the same tensors."""
    st_name = {v: k for k, v in _ST_DTYPES.items()}
    entries = sorted(entries, key=lambda e: (_ST_ORDER.index(st_name[e[1]]), e[0]))
    header: dict[str, Any] = {} if metadata is None else {"__metadata__": metadata}
    at = 0
    for name, dtype, shape, _ in entries:
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": st_name[dtype], "shape": [int(d) for d in shape], "data_offsets": [at, at + n]}
        at += n
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, dtype, shape, read in entries:
            t = read()
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise TwigError(f"{path}: tensor {name!r} came as {t.dtype} {tuple(t.shape)}, declared {dtype} "
                                f"{tuple(shape)}")
            f.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))


def _unwrap_checkpoint(obj: Any, path: str) -> dict[str, torch.Tensor]:
    """The tensor dict inside a loaded PyTorch checkpoint (a bare state dict, or under ``state_dict``,
    ``model``, ``module`` or ``ema``, the way training scripts nest it)."""
    for _ in range(3):
        if isinstance(obj, Mapping) and obj and all(torch.is_tensor(v) for v in obj.values()):
            return dict(obj)
        if isinstance(obj, Mapping):
            for key in ("state_dict", "model", "module", "ema", "state_dict_ema", "model_ema"):
                if isinstance(obj.get(key), Mapping):
                    obj = obj[key]
                    break
            else:
                tensors = {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)}
                if tensors:
                    return tensors
                break
        else:
            break
    raise TwigError(f"{path}: no tensors found in this PyTorch checkpoint (expected a state dict)")


class TorchFile(Weights):
    """A PyTorch checkpoint (.pth/.pt/.ckpt/.bin), loaded with ``weights_only=True`` (memory-mapped if it is
    a zip archive, so tensors stay in the file's pages until used)."""

    def __init__(self, path: str, zip_format: bool):
        import pickle

        self.path = self.label = path
        self._mapped = False  # tensors are views of the file's pages (mmap)
        try:
            if path.endswith(".safetensors"):
                # a PyTorch file named .safetensors: torch.load picks the safetensors reader by the name and fails
                # with "header too large", so it gets the bytes through a file object (read, not memory-mapped)
                with open(path, "rb") as f:
                    obj = torch.load(f, map_location="cpu", weights_only=True)
            else:
                try:
                    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zip_format)
                    self._mapped = zip_format
                except pickle.UnpicklingError:
                    raise
                except Exception:
                    if not zip_format:
                        raise
                    # some platforms/filesystems cannot memory-map; a truly broken file fails again below
                    obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            m = re.search(r"Unsupported (?:global|operand)[^.]*|Unsupported class[^.]*", str(e))
            why = m.group(0).strip() if m else "it is not a plain tensor checkpoint"
            raise TwigError(
                f"{path}: refused to load: the pickle in this file asks to build Python objects other than "
                f"tensors ({why}); such a file can run code, and nothing in it was run. "
                "Use a .safetensors copy of the weights."
            ) from None
        except Exception as e:  # zip/pickle/storage errors: truncated or not a checkpoint
            raise TwigError(f"{path}: cannot read this PyTorch file (truncated or corrupt?): {e}") from None
        self._sd = _unwrap_checkpoint(obj, path)

    @property
    def _index(self):
        return self._sd

    def meta(self, key: str) -> torch.Tensor:
        t = self._sd[key]
        return torch.empty(t.shape, dtype=t.dtype, device="meta")

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._sd[key]

    def release(self, key: str) -> None:
        if self._mapped:  # never on anonymous memory, which MADV_DONTNEED would zero
            t = self._sd[key]
            drop_pages(t.data_ptr(), t.numel() * t.element_size())


class UnionWeights(Weights):
    """Several files seen as one mapping (sharded checkpoints)."""

    def __init__(self, parts: list[Weights], label: str):
        self.parts, self.label = parts, label
        self._where: dict[str, Weights] = {}
        for part in parts:
            for key in part:
                self._where.setdefault(key, part)

    @property
    def _index(self):
        return self._where

    def meta(self, key):
        return self._where[key].meta(key)

    def __getitem__(self, key):
        return self._where[key][key]

    def file_of(self, key):
        return self._where[key].label

    def release(self, key):
        self._where[key].release(key)


class PrefixedWeights(Weights):
    """The keys of ``base`` that start with ``prefix``, with the prefix removed (``strip=False``: names kept,
    e.g. one half of a DC-AE, so that renaming the original layout reads only that half)."""

    def __init__(self, base: Weights, prefix: str, strip: bool = True):
        self.base, self.label = base, base.label
        self.prefix = prefix if strip else ""  # what goes back in front of a key to find it in base
        self._keys = dict.fromkeys(k[len(self.prefix):] for k in base if k.startswith(prefix))

    @property
    def _index(self):
        return self._keys

    def meta(self, key):
        return self.base.meta(self.prefix + key)

    def __getitem__(self, key):
        if key not in self._keys:
            raise KeyError(key)
        return self.base[self.prefix + key]

    def file_of(self, key):
        return self.base.file_of(self.prefix + key)

    def release(self, key):
        self.base.release(self.prefix + key)


def open_weights(path: str | os.PathLike) -> Weights:
    """Open one weight file, whatever its extension says: safetensors, PyTorch zip, legacy pickle or GGUF."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TwigError(f"weight file not found: {path}")
    if os.path.getsize(path) == 0:
        raise TwigError(f"{path}: the file is empty")
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"GGUF":
        from .gguf_io import open_gguf

        return open_gguf(path)
    from .quant import fp8_view  # float8 weights stay narrow in their layers, whatever the container

    if head[:4] == b"PK\x03\x04":
        return fp8_view(TorchFile(path, zip_format=True))
    if len(head) >= 9 and head[8:9] == b"{":
        return fp8_view(SafetensorsFile(path))
    if head[:1] == b"\x80":  # a pickle stream: the legacy (pre-zip) torch.save format
        return fp8_view(TorchFile(path, zip_format=False))
    raise TwigError(f"{path}: not a safetensors or PyTorch checkpoint (unrecognised first bytes {head[:8]!r})")
