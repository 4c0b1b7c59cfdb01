"""GGUF files, read and written with the ``gguf`` package (an optional dependency: requirements-gguf.txt).

Reading: :class:`GGUFFile` is a ``twig_core.weights.Weights`` over a GGUF file mapped copy-on-write.
F32/F16/BF16 tensors read as torch tensors, quantized ones as ``twig_core.quant.QTensor``; both are views of
the file's pages (nothing is copied unless a dtype change asks for it; a write never reaches the file).
A quantized tensor carries ``release``, a :class:`MappedPages` for its bytes: the layer holding it calls it once
it has widened the blocks for a call, so the file's pages leave the process's resident set layer by layer (they
stay in the page cache: the next call maps them again without reading the disk) and a network's memory in use
is one layer of its file, not the whole file.
Shapes: GGUF lists dimensions innermost first; the torch shape is the reverse, or ComfyUI-GGUF's
``comfy.gguf.orig_shape.<name>`` array when the writer flattened the tensor.
``general.architecture`` says what the file holds: "sana" (ours; ComfyUI-GGUF files carry their own names,
e.g. "flux", and such a file is refused naming it), "gemma2" (llama.cpp's Gemma-2 layout, see
``twig_core.keymap.GEMMA_GGUF_KEYS``), or none (stable-diffusion.cpp style: the keys decide).

Writing: :func:`write_gguf` stores tensors one at a time (each read, encoded and written before the next is
read) under a GGML type chosen per tensor by :func:`pick_type`; ``twig_core.convert`` decides what goes in.
"""

from __future__ import annotations

import json
import mmap
import os

import torch

from .errors import TwigError
from .quant import BLOCKS, FLOAT_TYPES, QTensor
from .weights import Weights

# what general.architecture says for each network of ours
ARCHITECTURES = {"transformer": "sana", "text_encoder": "gemma2"}
CONFIG_KEY = "twig.diffusers_config"  # the transformer's diffusers config.json, as JSON text


def require_gguf(what: str):
    """The ``gguf`` module, or a TwigError naming ``what`` needed it and how to install it."""
    try:
        import gguf
    except ImportError:
        raise TwigError(f"{what}: GGUF files need the optional 'gguf' package: "
                        "pip install -r requirements-gguf.txt (or pip install 'gguf>=0.10')") from None
    return gguf


class MappedPages:
    """The whole memory pages of bytes ``[start, end)`` of a file mapped by ``mm`` (a ``mmap.mmap``); calling it
    drops them from this process's resident set (``MADV_DONTNEED``; a copy-on-write map's untouched pages are
    the file's, so a later read maps them again from the page cache). Pages shared with the neighbouring tensors
    stay. A no-op where the platform has no ``madvise``."""

    def __init__(self, mm, start: int, end: int):
        page = mmap.PAGESIZE
        self.mm, self.start, self.end = mm, -(-start // page) * page, min(end, len(mm)) // page * page

    def __call__(self) -> None:
        if self.end > self.start and hasattr(mmap, "MADV_DONTNEED") and not self.mm.closed:
            self.mm.madvise(mmap.MADV_DONTNEED, self.start, self.end - self.start)


class GGUFFile(Weights):
    """A GGUF file as a name -> tensor mapping (see the module docstring); ``field(key)`` reads metadata."""

    def __init__(self, path: str):
        gguf = require_gguf(path)
        self.path = self.label = path
        try:
            self._reader = gguf.GGUFReader(path, "c")  # copy-on-write map: tensors are views, never written back
        except Exception as e:  # a short or damaged file fails inside the reader with assorted errors
            raise TwigError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None
        self._entries = {}
        for t in self._reader.tensors:
            qtype = t.tensor_type.name
            if qtype not in BLOCKS:
                raise TwigError(f"{path}: tensor {t.name!r} has GGML type {qtype}, which Twig does not read")
            shape = self.field(f"comfy.gguf.orig_shape.{t.name}")
            shape = tuple(int(d) for d in (shape if shape is not None else reversed(t.shape.tolist())))
            self._entries[t.name] = (t, qtype, shape)
        self.arch = self.field("general.architecture")

    def field(self, key: str, default=None):
        f = self._reader.get_field(key)
        if f is None:
            return default
        value = f.contents()
        return value.tolist() if hasattr(value, "tolist") else value

    @property
    def embedded_config(self) -> dict | None:
        text = self.field(CONFIG_KEY)
        return json.loads(text) if text else None

    @property
    def _index(self):
        return self._entries

    def qtype(self, key: str) -> str:
        return self._entries[key][1]

    def meta(self, key):
        _, qtype, shape = self._entries[key]
        return torch.empty(shape, dtype=FLOAT_TYPES.get(qtype, torch.uint8), device="meta")

    def __getitem__(self, key):
        t, qtype, shape = self._entries[key]
        raw = torch.from_numpy(t.data)  # a view of the file's pages: loading holds about the file's size
        if qtype in FLOAT_TYPES:
            return raw.reshape(-1).view(torch.uint8).view(FLOAT_TYPES[qtype]).reshape(shape)
        q = QTensor(raw.reshape(-1, raw.shape[-1]) if raw.dim() > 1 else raw.reshape(1, -1), qtype, shape)
        mm = getattr(self._reader.data, "_mmap", None)  # numpy's memmap of the whole file, from byte 0
        if mm is not None:
            q.release = MappedPages(mm, int(t.data_offset), int(t.data_offset) + int(t.n_bytes))
        return q

    def summary(self) -> str:
        """'Q8_0 x120, F32 x200' style count of the stored types."""
        counts: dict[str, int] = {}
        for _, qtype, _ in self._entries.values():
            counts[qtype] = counts.get(qtype, 0) + 1
        return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


# --------------------------------------------------------------------------------------------------
# Writing


def pick_type(name: str, shape, qtype: str, wide: tuple[str, ...] = ()) -> str:
    """The GGML type one tensor is written in when the file's type is ``qtype``. Kept wide (F32), as the
    GGUF community does for DiTs: 1-D tensors (norms, biases), tensors of at most 1024 values, and names
    containing any of ``wide`` (modulation tables, embeddings the caller names). A quantized type whose
    block does not divide the rows falls back: K-quants to Q8_0, then F16."""
    n = 1
    for d in shape:
        n *= int(d)
    if len(shape) <= 1 or n <= 1024 or any(w in name for w in wide):
        return "F32"
    if qtype in FLOAT_TYPES:
        return qtype
    for candidate in (qtype, "Q8_0", "F16"):
        if candidate in FLOAT_TYPES or int(shape[-1]) % BLOCKS[candidate][0] == 0:
            return candidate
    return "F16"  # pragma: no cover


CHUNK = 1 << 22  # values encoded at a time: a tensor's fp32 copy and the quantizer's work stay this small


def _encode_rows(rows: torch.Tensor, qtype: str, kind):
    import numpy as np

    from .quant import quantize_k

    gguf = require_gguf("writing GGUF")
    t = rows.to(torch.float32).contiguous()
    if qtype == "F32":
        return t.numpy()
    if qtype == "F16":
        return t.to(torch.float16).numpy()
    if qtype in ("Q4_K", "Q5_K", "Q6_K"):
        return quantize_k(t, qtype).numpy()
    try:
        return np.asarray(gguf.quants.quantize(t.numpy(), kind))
    except NotImplementedError:
        raise TwigError(f"the gguf package cannot quantize to {qtype}") from None


def encode(tensor: torch.Tensor, qtype: str):
    """(numpy data, raw GGML type) for ``gguf``'s writer: float types as arrays, the rest as blocks made by
    the package's quantizer (BF16, Q8_0, Q4_0/1, Q5_0/1); it has none for K-quants, which come from
    ``twig_core.quant.quantize_k`` (Q4_K, Q5_K, Q6_K). Rows go :data:`CHUNK` values at a time into the one
    output array, so a wide copy of the whole tensor never exists (a bf16 embedding stays bf16 until encoded)."""
    import numpy as np

    gguf = require_gguf("writing GGUF")
    kind = None if qtype in ("F32", "F16") else gguf.GGMLQuantizationType[qtype]
    t = tensor.detach().to("cpu")
    rows = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, -1)
    step = max(1, CHUNK // max(1, rows.shape[1]))
    out = None
    for i in range(0, rows.shape[0], step):
        part = _encode_rows(rows[i:i + step], qtype, kind)
        if out is None:
            out = np.empty((rows.shape[0], *part.shape[1:]), dtype=part.dtype)
        out[i:i + step] = part
    return out.reshape(*t.shape[:-1], -1) if t.dim() > 1 else out.reshape(-1), kind


def nbytes(shape, qtype: str) -> int:
    """Bytes of a tensor of ``shape`` stored as ``qtype``."""
    values, size = BLOCKS[qtype]
    n = 1
    for d in shape:
        n *= int(d)
    return n // values * size


def write_gguf(path: str, arch: str, tensors, metadata: dict | None = None, orig_shapes: dict | None = None):
    """Write a GGUF file whose ``general.architecture`` is ``arch``, tensor by tensor: ``tensors`` is a list of
    (name, torch shape as stored, GGML type name, read) where ``read()`` gives the tensor (any float dtype) when
    its turn comes, so one tensor and its encoding are in memory at a time. ``metadata`` values
    are str, int, float, bool or lists of them; ``orig_shapes``: tensors stored flattened, with their torch
    shape (ComfyUI-GGUF's convention)."""
    import numpy as np

    gguf = require_gguf(path)
    tmp = path + ".part"
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        for key, value in (metadata or {}).items():
            if isinstance(value, bool):
                writer.add_bool(key, value)
            elif isinstance(value, int):
                writer.add_uint32(key, value) if value >= 0 else writer.add_int32(key, value)
            elif isinstance(value, float):
                writer.add_float32(key, value)
            elif isinstance(value, str):
                writer.add_string(key, value)
            else:
                writer.add_array(key, list(value))
        for key, shape in (orig_shapes or {}).items():
            writer.add_array(f"comfy.gguf.orig_shape.{key}", [int(d) for d in shape])
        for name, shape, qtype, _ in tensors:  # declared first: the header lists every tensor's type and size
            writer.add_tensor_info(name, [int(d) for d in shape], np.dtype(np.float32), nbytes(shape, qtype),
                                   raw_dtype=gguf.GGMLQuantizationType[qtype])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, shape, qtype, read in tensors:
            writer.write_tensor_data(encode(read().reshape(shape), qtype)[0])
    finally:
        writer.close()
    os.replace(tmp, path)


class GemmaGGUF(Weights):
    """A llama.cpp Gemma-2 GGUF under transformers' Gemma2Model names (``keymap.GEMMA_GGUF_KEYS``), its
    stored 1 + w norm weights given back as w."""

    def __init__(self, f: GGUFFile):
        from . import keymap

        self.file, self.label, self.path, self.field = f, f.label, f.path, f.field
        self._names = keymap.rename_keys(list(f), keymap.GEMMA_GGUF_KEYS, "to_ours")
        self._offset = keymap.GEMMA_GGUF_NORM_OFFSET

    @property
    def _index(self):
        return self._names

    def meta(self, key):
        return self.file.meta(self._names[key])

    def __getitem__(self, key):
        t = self.file[self._names[key]]
        if key.endswith("norm.weight"):
            t = (t.dequantize() if isinstance(t, QTensor) else t.float()) - self._offset
        return t


def open_gguf(path: str) -> Weights:
    """A GGUF file as weights under our names; TwigError naming the file for a foreign architecture."""
    f = GGUFFile(path)
    if f.arch == ARCHITECTURES["text_encoder"]:
        return GemmaGGUF(f)
    if f.arch not in (None, ARCHITECTURES["transformer"]):
        raise TwigError(f"{path}: a GGUF file of architecture {f.arch!r}; Twig reads Sana/Twig transformers "
                        f"({ARCHITECTURES['transformer']!r}) and Gemma-2 text encoders "
                        f"({ARCHITECTURES['text_encoder']!r})")
    return f
