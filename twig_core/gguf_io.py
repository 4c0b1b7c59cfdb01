"""GGUF files, read and written with the ``gguf`` package (an optional dependency: requirements-gguf.txt).

Reading: :class:`GGUFFile` is a ``twig_core.weights.Weights`` over a GGUF file mapped copy-on-write.
F32/F16/BF16 tensors read as torch tensors, quantized ones as ``twig_core.quant.QTensor``; both are views of
the file's pages (nothing is copied unless a dtype change asks for it; a write never reaches the file).
Shapes: GGUF lists dimensions innermost first; the torch shape is the reverse, or ComfyUI-GGUF's
``comfy.gguf.orig_shape.<name>`` array when the writer flattened the tensor.
``general.architecture`` says what the file holds: "sana" (ours; ComfyUI-GGUF files carry their own names,
e.g. "flux", and such a file is refused naming it), "gemma2" (llama.cpp's Gemma-2 layout, see
``twig_core.keymap.GEMMA_GGUF_KEYS``), or none (stable-diffusion.cpp style: the keys decide).

Writing: :func:`write_gguf` stores (name, tensor) pairs under a GGML type chosen per tensor by
:func:`pick_type`; ``twig_core.convert`` decides what goes in.
"""

from __future__ import annotations

import json
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
        return QTensor(raw.reshape(-1, raw.shape[-1]) if raw.dim() > 1 else raw.reshape(1, -1), qtype, shape)

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


def encode(tensor: torch.Tensor, qtype: str):
    """(numpy data, raw GGML type) for ``gguf``'s writer: float types as arrays, the rest as blocks made by
    the package's quantizer (BF16, Q8_0, Q4_0/1, Q5_0/1); it has none for K-quants, which come from
    ``twig_core.quant.quantize_k`` (Q4_K, Q5_K, Q6_K)."""
    import numpy as np

    from .quant import quantize_k

    gguf = require_gguf("writing GGUF")
    t = tensor.detach().to("cpu", torch.float32).contiguous()
    if qtype == "F32":
        return t.numpy(), None
    if qtype == "F16":
        return t.to(torch.float16).numpy(), None
    kind = gguf.GGMLQuantizationType[qtype]
    if qtype in ("Q4_K", "Q5_K", "Q6_K"):
        return quantize_k(t.reshape(-1, t.shape[-1]), qtype).numpy(), kind
    try:
        return np.asarray(gguf.quants.quantize(t.numpy(), kind)), kind
    except NotImplementedError:
        raise TwigError(f"the gguf package cannot quantize to {qtype}") from None


def write_gguf(path: str, arch: str, tensors, metadata: dict | None = None, orig_shapes: dict | None = None):
    """Write ``tensors`` (an iterable of (name, numpy data, raw GGML type or None)) as a GGUF file whose
    ``general.architecture`` is ``arch``; ``metadata`` values are str, int, float, bool or lists of them;
    ``orig_shapes``: tensors stored flattened, with their torch shape (ComfyUI-GGUF's convention)."""
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
        for name, data, raw_type in tensors:
            writer.add_tensor(name, data, raw_dtype=raw_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
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
