"""Load every published Twig / Sana checkpoint layout, safely, with the config read from the weights.

What is understood (``detect`` says which network a path holds):

- Transformer: NVlabs originals (``.pth`` with a ``state_dict`` entry, as Twig v0 alpha ships, or the same
  keys in ``.safetensors``; fused ``attn.qkv`` / ``cross_attn.kv_linear``; the unused ``pos_embed`` table and
  ``y_embedder.y_embedding`` null caption are dropped after ``pos_embed`` has told the training grid);
  diffusers ``SanaTransformer2DModel`` files and folders; ComfyUI single files with a container prefix such
  as ``model.diffusion_model.``.
- DC-AE: diffusers ``AutoencoderDC`` files/folders and the original MIT-Han-Lab layout, with any prefix.
- Gemma-2: Hugging Face folders (through ``TextEncoder.from_pretrained``) and single files as ComfyUI ships
  them (weights, optionally prefixed, plus a ``spiece_model`` uint8 tensor holding the sentencepiece model).
- diffusers folders: a component folder (``config.json`` + weights), a whole pipeline folder
  (``model_index.json`` with ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``), sharded
  weights with an index json, and ``fp16``/``bf16`` variants
  (``diffusion_pytorch_model.fp16.safetensors``, ``...fp16-00001-of-00002.safetensors`` +
  ``...safetensors.index.fp16.json``).

The renaming lives in ``twig_core.keymap`` (one table per network); configs are inferred from tensor shapes
(``TransformerConfig.from_state_dict``, ``DCAEConfig.from_state_dict``, ``gemma2_config_from_shapes``) unless a
diffusers ``config.json`` states them.

Safety and memory:

- A file's type is sniffed from its first bytes, not its extension. ``.safetensors`` is read by a small
  reader here (header validated against the file size, then one tensor at a time straight into its final
  buffer). PyTorch files go only through ``torch.load(weights_only=True)`` (memory-mapped when the file is a
  zip archive): a pickle that would construct anything but tensors and plain containers is refused with a
  TwigError naming the file, and nothing in it runs.
- Models are built on the meta device and every parameter is assigned from the file, so no random
  initialisation happens and the weights exist once: stored dtype by default (``dtype=None``; a file with
  mixed float dtypes is unified to its dominant one), or converted tensor by tensor.
- Every key and shape is checked before any tensor is read: a wrong, truncated or corrupt file gives one
  TwigError naming the file and the first offending keys/shapes, never a half-loaded model.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from . import keymap
from .config import TransformerConfig
from .devices import WEIGHT_DTYPE_CHOICES, resolve_dtype, weight_dtype_kwargs  # noqa: F401 (re-exported)
from .devices import text_dtype as _text_dtype
from .errors import TwigError

__all__ = [
    "detect",
    "load_transformer",
    "load_vae",
    "load_text_encoder",
    "load_pipeline",
    "load_parts",
    "Parts",
    "resolve_dtype",
    "weight_dtype_kwargs",
    "WEIGHT_DTYPE_CHOICES",
    "open_weights",
    "gemma2_config_from_shapes",
    "tokenizer_from_spiece",
]

# ==================================================================================================
# Weight files


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


def _first(items, n: int = 5) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


class Weights(Mapping):
    """A read-only name -> tensor mapping over one or more files. ``meta(name)`` gives shape and dtype
    without reading; ``[name]`` reads the tensor (CPU, stored dtype)."""

    label: str = ""

    def meta(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def meta_dict(self) -> dict[str, torch.Tensor]:
        return {k: self.meta(k) for k in self}

    def file_of(self, key: str) -> str:
        return self.label


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
            if end - begin != nbytes or begin < 0:
                raise TwigError(f"{path}: corrupt safetensors entry {key!r}: {end - begin} bytes for shape {shape}")
            if end > avail:
                raise TwigError(
                    f"{path}: truncated file: tensor {key!r} ends at byte {self._start + end}, "
                    f"the file has {size} bytes (incomplete download?)"
                )
            self._entries[key] = (dtype, shape, begin, end)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries

    def meta(self, key: str) -> torch.Tensor:
        dtype, shape, _, _ = self._entries[key]
        return torch.empty(shape, dtype=dtype, device="meta")

    def __getitem__(self, key: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entries[key]
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
        try:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zip_format)
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

    def __iter__(self) -> Iterator[str]:
        return iter(self._sd)

    def __len__(self) -> int:
        return len(self._sd)

    def __contains__(self, key) -> bool:
        return key in self._sd

    def meta(self, key: str) -> torch.Tensor:
        t = self._sd[key]
        return torch.empty(t.shape, dtype=t.dtype, device="meta")

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._sd[key]


class UnionWeights(Weights):
    """Several files seen as one mapping (sharded checkpoints)."""

    def __init__(self, parts: list[Weights], label: str):
        self.parts, self.label = parts, label
        self._where: dict[str, Weights] = {}
        for part in parts:
            for key in part:
                self._where.setdefault(key, part)

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)

    def __contains__(self, key):
        return key in self._where

    def meta(self, key):
        return self._where[key].meta(key)

    def __getitem__(self, key):
        return self._where[key][key]

    def file_of(self, key):
        return self._where[key].label


class PrefixedWeights(Weights):
    """The keys of ``base`` that start with ``prefix``, with the prefix removed (``strip=False``: names kept,
    e.g. one half of a DC-AE, so that renaming the original layout reads only that half)."""

    def __init__(self, base: Weights, prefix: str, strip: bool = True):
        self.base, self.label = base, base.label
        self.prefix = prefix if strip else ""  # what goes back in front of a key to find it in base
        self._keys = dict.fromkeys(k[len(self.prefix):] for k in base if k.startswith(prefix))

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def __contains__(self, key):
        return key in self._keys

    def meta(self, key):
        return self.base.meta(self.prefix + key)

    def __getitem__(self, key):
        if key not in self._keys:
            raise KeyError(key)
        return self.base[self.prefix + key]

    def file_of(self, key):
        return self.base.file_of(self.prefix + key)


def open_weights(path: str | os.PathLike) -> Weights:
    """Open one weight file, whatever its extension says: safetensors, PyTorch zip or legacy pickle."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TwigError(f"weight file not found: {path}")
    if os.path.getsize(path) == 0:
        raise TwigError(f"{path}: the file is empty")
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return TorchFile(path, zip_format=True)
    if head[:4] == b"GGUF":
        raise TwigError(f"{path}: GGUF files are not supported; use the .safetensors or .pth release")
    if len(head) >= 9 and head[8:9] == b"{":
        return SafetensorsFile(path)
    if head[:1] == b"\x80":  # a pickle stream: the legacy (pre-zip) torch.save format
        return TorchFile(path, zip_format=False)
    raise TwigError(f"{path}: not a safetensors or PyTorch checkpoint (unrecognised first bytes {head[:8]!r})")


# ==================================================================================================
# Folders: diffusers components, pipelines, shards and variants

_COMPONENT_DIRS = {"transformer": "transformer", "vae": "vae", "text_encoder": "text_encoder"}
_CLASS_KINDS = {"SanaTransformer2DModel": "transformer", "AutoencoderDC": "vae"}
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model")


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TwigError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise TwigError(f"{path}: expected a JSON object")
    return data


def _is_pipeline_dir(path: str) -> bool:
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return True
    return sum(os.path.isdir(os.path.join(path, d)) for d in _COMPONENT_DIRS.values()) >= 2


def _config_kind(cfg: dict) -> str | None:
    if cfg.get("_class_name") in _CLASS_KINDS:
        return _CLASS_KINDS[cfg["_class_name"]]
    if cfg.get("model_type") == "gemma2" or any("Gemma2" in a for a in cfg.get("architectures", []) or []):
        return "text_encoder"
    return None


def _config_name(cfg: dict) -> str:
    return cfg.get("_class_name") or cfg.get("model_type") or ",".join(cfg.get("architectures", []) or []) or "?"


_SHARD = re.compile(r"^(?P<stem>.+?)(?:\.(?P<v>[A-Za-z0-9_]+))?-(?P<i>\d+)-of-(?P<n>\d+)\.(?P<ext>safetensors|bin)$")


def _weight_sets(folder: str) -> dict[tuple[str | None, str], list[str] | str]:
    """Weight sets found in a component folder, keyed by (variant, format): either an index json path or a
    list of files (one file, or shards found without an index)."""
    names = set(os.listdir(folder))
    found: dict[tuple[str | None, str], Any] = {}
    for stem in _WEIGHT_STEMS:
        for ext in ("safetensors", "bin"):
            single = re.compile(rf"^{re.escape(stem)}(?:\.(?P<v>[A-Za-z0-9_]+))?\.{ext}$")
            index = re.compile(rf"^{re.escape(stem)}\.{ext}\.index(?:\.(?P<v>[A-Za-z0-9_]+))?\.json$")
            for name in sorted(names):
                for rx, is_index in ((index, True), (single, False)):
                    m = rx.match(name)
                    if m:
                        key = (m.group("v"), ext)
                        if is_index or key not in found:
                            found[key] = os.path.join(folder, name) if is_index else [os.path.join(folder, name)]
            shards: dict[tuple[str | None, int], list[tuple[int, str]]] = {}
            for name in names:
                m = _SHARD.match(name)
                if m and m.group("stem") == stem and m.group("ext") == ext:
                    shards.setdefault((m.group("v"), int(m.group("n"))), []).append(
                        (int(m.group("i")), os.path.join(folder, name)))
            for (v, n), files in shards.items():
                if (v, ext) not in found and sorted(i for i, _ in files) == list(range(1, n + 1)):
                    found[(v, ext)] = [f for _, f in sorted(files)]
    return found


def _pick_weight_set(folder: str, variant: str | None, dtype: torch.dtype | None) -> list[str] | str:
    sets = _weight_sets(folder)
    if not sets:
        # a folder holding one checkpoint under another name (e.g. an NVlabs repo's checkpoints/)
        files = [os.path.join(folder, n) for n in sorted(os.listdir(folder))
                 if n.endswith((".safetensors", ".pth", ".pt", ".ckpt", ".bin")) and not n.startswith(".")]
        sub = os.path.join(folder, "checkpoints")
        if not files and os.path.isdir(sub):
            files = [os.path.join(sub, n) for n in sorted(os.listdir(sub)) if n.endswith((".safetensors", ".pth"))]
        if len(files) == 1:
            return files
        if files:
            names = _first(os.path.basename(f) for f in files)
            raise TwigError(f"{folder}: several weight files ({names}); pick one file")
        raise TwigError(
            f"{folder}: no weights found (looked for diffusion_pytorch_model[.variant].safetensors, "
            "model[.variant].safetensors, their sharded *.index[.variant].json forms, and .bin)"
        )
    variants = sorted({v for v, _ in sets}, key=lambda v: (v is not None, v or ""))
    if variant is not None:
        if variant not in variants:
            raise TwigError(f"{folder}: no '{variant}' variant; found {_first(v or 'default' for v in variants)}")
        order = [variant]
    else:
        wanted = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype)
        order = ([wanted] if wanted in variants else []) + [v for v in variants if v != wanted]
    for v in order:
        for ext in ("safetensors", "bin"):
            if (v, ext) in sets:
                return sets[(v, ext)]
    raise TwigError(f"{folder}: no usable weights")  # pragma: no cover


def _open_set(weight_set: list[str] | str) -> Weights:
    if isinstance(weight_set, str):  # an index json
        index = _read_json(weight_set)
        wmap = index.get("weight_map")
        if not isinstance(wmap, dict) or not wmap:
            raise TwigError(f"{weight_set}: no weight_map in this index")
        folder = os.path.dirname(weight_set)
        files = sorted(set(wmap.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise TwigError(f"{weight_set}: shard files missing: {_first(missing)}")
        parts = [open_weights(os.path.join(folder, f)) for f in files]
        union = UnionWeights(parts, weight_set)
        absent = [k for k, f in wmap.items() if k not in union or union.file_of(k) != os.path.join(folder, f)]
        if absent:
            raise TwigError(
                f"{weight_set}: the index lists tensors its shards do not hold: {_first(absent)} "
                "(incomplete download or mixed variants?)"
            )
        return union
    if len(weight_set) == 1:
        return open_weights(weight_set[0])
    return UnionWeights([open_weights(f) for f in weight_set], f"{weight_set[0]} (+{len(weight_set) - 1} shards)")


@dataclass
class _Source:
    weights: Weights  # prefix stripped
    label: str  # for messages
    config: dict | None  # a diffusers/transformers config.json, when there is one
    folder: str | None


def _component_folder(path: str, kind: str) -> str:
    sub = os.path.join(path, _COMPONENT_DIRS[kind])
    if os.path.isdir(sub) and _is_pipeline_dir(path):
        return sub
    return path


def _open_source(path, kind: str, variant=None, dtype=None) -> _Source:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise TwigError(f"not found: {path}")
    config = None
    folder = None
    if os.path.isdir(path):
        folder = _component_folder(path, kind)
        cfg_path = os.path.join(folder, "config.json")
        if os.path.isfile(cfg_path):
            config = _read_json(cfg_path)
            got = _config_kind(config)
            if got is not None and got != kind:
                raise TwigError(f"{folder}: this folder holds a {_KIND_NAMES[got]} ({_config_name(config)}), "
                                f"not a {_KIND_NAMES[kind]}")
            if got is None and "_class_name" in config:
                raise TwigError(f"{folder}: {config['_class_name']} is not a Sana-family {_KIND_NAMES[kind]}")
        weights = _open_set(_pick_weight_set(folder, variant, dtype))
    else:
        weights = open_weights(path)
        # a diffusers component file picked on its own: use the config.json beside it when it matches
        cfg_path = os.path.join(os.path.dirname(path), "config.json")
        if os.path.isfile(cfg_path):
            try:
                cfg = _read_json(cfg_path)
            except TwigError:
                cfg = None
            if cfg is not None and _config_kind(cfg) == kind:
                config = cfg
    label = weights.label
    kinds = classify(weights.keys())
    if kind not in kinds:
        raise TwigError(_wrong_kind_message(label, kind, kinds, weights))
    prefix = kinds[kind]
    return _Source(PrefixedWeights(weights, prefix) if prefix else weights, label, config, folder)


# ==================================================================================================
# What a set of keys is

_KIND_NAMES = {
    "transformer": "Sana/Twig transformer",
    "vae": "DC-AE autoencoder (VAE)",
    "text_encoder": "Gemma-2 text encoder",
    "pipeline": "pipeline",
}

# Other well-known networks, so a wrong pick gets a helpful message: (key substring, description)
_FOREIGN = (
    ("input_blocks.0.0.weight", "a Stable Diffusion UNet"),
    ("double_blocks.0.", "a Flux transformer"),
    ("joint_blocks.0.", "an SD3 transformer"),
    ("decoder.mid.block_1.", "a KL autoencoder (SD/SDXL/Flux VAE)"),
    ("decoder.mid_block.resnets.0.", "a KL autoencoder (SD/SDXL/Flux VAE)"),
    ("encoder.block.0.layer.0.SelfAttention", "a T5 encoder"),
    ("text_model.encoder.layers.0.", "a CLIP text encoder"),
    ("blocks.0.mlp.fc1.weight", "a PixArt/DiT transformer"),
    ("transformer_blocks.0.ff.net.0.proj.weight", "a diffusers DiT transformer (not Sana)"),
)


def classify(keys) -> dict[str, str]:
    """Which Sana-family networks a key set holds: {kind: container prefix}."""
    keys = list(keys)
    keyset = set(keys)
    out: dict[str, str] = {}
    p = keymap.find_prefix(keys, keymap.ANCHORS["transformer"])
    if p is not None:  # Sana's Mix-FFN sets it apart from PixArt/DiT/SD3, which share the anchor
        mix_ffn = re.compile(re.escape(p) + r"(blocks\.\d+\.mlp\.inverted_conv\.conv|"
                             r"transformer_blocks\.\d+\.ff\.conv_inverted)\.weight$")
        if any(mix_ffn.match(k) for k in keys):
            out["transformer"] = p
    p = keymap.find_prefix(keys, keymap.ANCHORS["vae"])
    if p is not None and any(k.startswith((p + "encoder.down_blocks.", p + "decoder.up_blocks.",
                                           p + "encoder.stages.", p + "decoder.stages.")) for k in keys):
        dcae = re.compile(re.escape(p) + r"(encoder\.down_blocks|decoder\.up_blocks)\.\d+\.\d+\.")
        if any(k.startswith((p + "encoder.stages.", p + "decoder.stages.")) or dcae.match(k) for k in keys):
            out["vae"] = p
    p = keymap.find_prefix(keys, keymap.ANCHORS["text_encoder"])
    if p is not None:  # Gemma-2: sandwich norms around the MLP; Gemma-3 adds q/k norms, Llama/Gemma-1 have neither
        gemma2 = re.compile(re.escape(p) + r"layers\.\d+\.pre_feedforward_layernorm\.weight$")
        if any(gemma2.match(k) for k in keys) and p + "layers.0.self_attn.q_norm.weight" not in keyset:
            out["text_encoder"] = p
    return out


def _foreign(keys) -> str | None:
    for key in keys:
        for needle, what in _FOREIGN:
            if needle in key:
                return what
    return None


def _wrong_kind_message(label: str, kind: str, kinds: dict, weights: Weights) -> str:
    want = _KIND_NAMES[kind]
    if kinds:
        have = " and ".join(_KIND_NAMES[k] for k in kinds)
        return f"{label}: this file holds a {have}, not a {want}; load it with the matching loader"
    keys = list(weights.keys())
    if kind == "text_encoder" and keymap.find_prefix(keys, keymap.ANCHORS["text_encoder"]) is not None:
        return (f"{label}: a decoder-only language model but not Gemma-2 (no pre_feedforward_layernorm, or "
                f"Gemma-3 q/k norms); Sana needs Gemma-2-2B")
    what = _foreign(keys)
    if what:
        return f"{label}: this looks like {what}, not a {want}"
    return f"{label}: not a {want}; first keys: {_first(keys)}"


def detect(path) -> str:
    """What a file or folder holds: "transformer", "vae", "text_encoder" or "pipeline" (a diffusers
    pipeline folder, or one file holding several networks). TwigError if it is none of these."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise TwigError(f"not found: {path}")
    if os.path.isdir(path):
        if _is_pipeline_dir(path):
            return "pipeline"
        cfg_path = os.path.join(path, "config.json")
        if os.path.isfile(cfg_path):
            cfg = _read_json(cfg_path)
            kind = _config_kind(cfg)
            if kind is None:
                raise TwigError(f"{path}: {_config_name(cfg)} is not a Sana transformer, DC-AE or Gemma-2")
            return kind
        weights = _open_set(_pick_weight_set(path, None, None))
    else:
        weights = open_weights(path)
    kinds = classify(weights.keys())
    if len(kinds) > 1:
        return "pipeline"
    if kinds:
        return next(iter(kinds))
    keys = list(weights.keys())
    what = _foreign(keys)
    raise TwigError(f"{weights.label}: " + (f"this looks like {what}; " if what else "")
                    + f"not a Sana transformer, DC-AE or Gemma-2 file (first keys: {_first(keys)})")


# ==================================================================================================
# Filling a meta-device model


def _check_keys(model: nn.Module, got: Mapping[str, torch.Tensor], label: str, what: str, hint: str = ""):
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    mismatched = [f"{k} {tuple(got[k].shape)} in the file vs {want[k]} in the model"
                  for k in want if k in got and tuple(got[k].shape) != want[k]]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors ({_first(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors ({_first(unexpected)})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches ({_first(mismatched, 3)})")
        raise TwigError(f"{label}: does not match the {what} inferred from it: " + "; ".join(parts) + hint)


def _dominant_dtype(metas: Mapping[str, torch.Tensor]) -> torch.dtype:
    total: dict[torch.dtype, int] = {}
    for t in metas.values():
        if t.is_floating_point():
            total[t.dtype] = total.get(t.dtype, 0) + t.numel() * t.element_size()
    return max(total, key=total.get) if total else torch.float32


def _fill(model: nn.Module, tensors, names, dtype: torch.dtype, device, label: str, pop: bool = False,
          check: bool = True):
    """Assign every parameter/buffer of a meta-device model from ``tensors`` (read one at a time)."""
    device = torch.device(device)
    for name in names:
        try:
            t = tensors.pop(name) if pop else tensors[name]
        except TwigError:
            raise
        except Exception as e:  # e.g. an I/O error on a network drive
            raise TwigError(f"{label}: cannot read tensor {name!r}: {e}") from None
        if t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        t = t.to(device)
        mod_name, _, leaf = name.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        if leaf in mod._parameters:
            mod._parameters[leaf] = nn.Parameter(t, requires_grad=mod._parameters[leaf].requires_grad)
        else:
            mod._buffers[leaf] = t
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if check and left:
        raise TwigError(f"{label}: tensors left unloaded: {_first(left)}")  # pragma: no cover


# ==================================================================================================
# Transformer


def _transformer_config_from_diffusers(cfg: dict, label: str) -> TransformerConfig:
    """TransformerConfig from a diffusers ``SanaTransformer2DModel`` config.json."""
    try:
        heads, head_dim = int(cfg["num_attention_heads"]), int(cfg["attention_head_dim"])
        width = heads * head_dim
        cross_heads = int(cfg.get("num_cross_attention_heads", 20))
        cross_dim = int(cfg.get("cross_attention_head_dim", width // cross_heads))
        in_ch = int(cfg.get("in_channels", 32))
        out_ch = cfg.get("out_channels") or in_ch
        interp = cfg.get("interpolation_scale")
        qk = cfg.get("qk_norm")
    except (KeyError, TypeError, ValueError) as e:
        raise TwigError(f"{label}: config.json lacks or garbles {e}") from None
    unsupported = []
    if cross_heads * cross_dim != width or int(cfg.get("cross_attention_dim", width)) != width:
        unsupported.append(f"cross-attention width {cross_heads}x{cross_dim} != model width {width}")
    if cfg.get("guidance_embeds"):
        unsupported.append("guidance embedding (Sana Sprint)")
    if float(cfg.get("timestep_scale", 1.0)) != 1.0:
        unsupported.append(f"timestep_scale {cfg['timestep_scale']}")
    if cfg.get("norm_elementwise_affine"):
        unsupported.append("affine block norms")
    if qk not in (None, "rms_norm_across_heads"):
        unsupported.append(f"qk_norm {qk!r}")
    if unsupported:
        raise TwigError(f"{label}: unsupported transformer features: {'; '.join(unsupported)}")
    return TransformerConfig(
        in_channels=in_ch, out_channels=int(out_ch), width=width, depth=int(cfg.get("num_layers", 20)),
        heads=heads, cross_heads=cross_heads, caption_channels=int(cfg.get("caption_channels", 2304)),
        mlp_ratio=float(cfg.get("mlp_ratio", 2.5)), patch_size=int(cfg.get("patch_size", 1)),
        qkv_bias=bool(cfg.get("attention_bias", False)), qk_norm=qk is not None, pos_embed=interp is not None,
        pos_interpolation_scale=float(interp) if interp is not None else 1.0,
        norm_eps=float(cfg.get("norm_eps", 1e-6)), sample_size=int(cfg.get("sample_size", 32)),
    )


def _named_errors(label: str):
    """Re-raise TwigErrors from shape inference with the file name in front."""

    class _Ctx:
        def __enter__(self):
            return self

        def __exit__(self, typ, exc, tb):
            if isinstance(exc, TwigError) and label not in str(exc):
                raise TwigError(f"{label}: {exc}") from None
            return False

    return _Ctx()


def load_transformer(
    path,
    dtype=None,
    device="cpu",
    *,
    compute_dtype=None,
    pos_embed: bool | None = None,
    variant: str | None = None,
    config: TransformerConfig | None = None,
    **overrides,
):
    """Load a Sana/Twig transformer from any supported file or folder.

    ``dtype``: the weights' dtype in memory. None keeps the stored dtype (fp16 stays fp16); else
    "fp16"/"bf16"/"fp32"/"auto" or a torch.dtype. ``compute_dtype``: the dtype the model runs in (None: the
    weights' dtype); e.g. fp16-stored weights computing in fp32 take half the memory of an fp32 model. ``pos_embed`` forces the sin-cos positional embedding on/off (default: a diffusers
    config.json decides, else the rule in ``TransformerConfig.from_state_dict``: on for 2K/4K checkpoints).
    ``variant`` picks a diffusers weight variant ("fp16", "bf16"); by default the one matching ``dtype``, else
    the full-precision one. ``config`` replaces inference entirely; ``overrides`` set single config fields
    (e.g. ``cross_heads=``).
    """
    from .transformer import TwigTransformer

    dtype = resolve_dtype(dtype, device)
    compute_dtype = resolve_dtype(compute_dtype, device)
    src = _open_source(path, "transformer", variant, dtype)
    label = src.label
    diffusers_names = keymap.is_diffusers_transformer(src.weights.keys())
    metas = src.weights.meta_dict()
    ours_meta = keymap.diffusers_to_ours(metas) if diffusers_names else metas
    with _named_errors(label):
        if config is None:
            if src.config is not None:
                config = _transformer_config_from_diffusers(src.config, label)
                if pos_embed is not None:
                    config = config.replace(pos_embed=bool(pos_embed))
                if overrides:
                    config = config.replace(**overrides)
            else:
                config = TransformerConfig.from_state_dict(ours_meta, pos_embed=pos_embed, **overrides)
    for name in keymap.NVLABS_UNUSED:
        ours_meta.pop(name, None)
    with torch.device("meta"):
        model = TwigTransformer(config, compute_dtype=compute_dtype)
    hint = ""
    if any(k.startswith(("cfg_embedder", "logvar_linear", "time_embed.guidance")) for k in ours_meta):
        hint = " (guidance-embedded / Sana Sprint checkpoints are not supported)"
    _check_keys(model, ours_meta, label, f"transformer {_describe(config)}", hint)
    dtype = dtype or _dominant_dtype(ours_meta)
    names = list(model.state_dict().keys())
    if diffusers_names:
        _fill(model, keymap.diffusers_to_ours(src.weights), names, dtype, device, label, pop=True)
    else:
        _fill(model, src.weights, names, dtype, device, label)
    return model.eval()


def _describe(cfg: TransformerConfig) -> str:
    extra = []
    if cfg.qk_norm:
        extra.append("qk-norm")
    if cfg.pos_embed:
        extra.append(f"pos-embed {cfg.sample_size}x{cfg.sample_size}")
    return f"(width {cfg.width}, depth {cfg.depth}, {cfg.heads} heads, {cfg.cross_heads} cross heads" + \
        "".join(", " + e for e in extra) + ")"


# ==================================================================================================
# DC-AE


def _open_vae(path, variant, dtype):
    """A DC-AE source: (source, original MIT layout?, every tensor's meta under our names)."""
    src = _open_source(path, "vae", variant, dtype)
    original = keymap.is_dcae_original(src.weights.keys())
    metas = src.weights.meta_dict()
    return src, original, keymap.dcae_original_to_ours(metas) if original else metas


def _fill_vae(model, weights: Weights, original: bool, parts, dtype, device, label: str):
    """Read the named halves of a meta-device DC-AE ("encoder", "decoder") from a checked source."""
    for i, part in enumerate(parts):
        names = [n for n in model.state_dict() if n.startswith(part + ".")]
        tensors = weights
        if original:  # rename only this half's keys
            tensors = keymap.dcae_original_to_ours(PrefixedWeights(weights, part + ".", strip=False))
        _fill(model, tensors, names, dtype, device, label, pop=original, check=i == len(parts) - 1)


def _files_of(weights: Weights) -> list[str]:
    if isinstance(weights, PrefixedWeights):
        return _files_of(weights.base)
    if isinstance(weights, UnionWeights):
        return [f for part in weights.parts for f in _files_of(part)]
    return [weights.path]


def _stamp(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _read_deferred_encoder(path, variant, requested, stamps: dict, model, dtype, device):
    """``DCAE.defer_encoder``'s source: the encoder's tensors from the file(s) the decoder came from."""
    for f, stamp in stamps.items():
        now = _stamp(f)
        if now != stamp:
            why = "is gone" if now is None else "has changed"
            raise TwigError(f"{f}: the file {why} since the VAE was loaded, and its encoder is read from it on "
                            "first use (encode); load the VAE again")
    src, original, ours_meta = _open_vae(path, variant, requested)
    _check_keys(model, ours_meta, src.label, "DC-AE")
    _fill_vae(model, src.weights, original, ("encoder",), dtype, device, src.label)


def load_vae(path, dtype=None, device="cpu", *, compute_dtype=None, variant: str | None = None, config=None,
             lazy_encoder: bool = True, **overrides):
    """Load a DC-AE (diffusers ``AutoencoderDC`` or the original MIT-Han-Lab layout), file or folder.

    The architecture comes from a diffusers config.json when there is one, else from the tensor shapes
    (``DCAEConfig.from_state_dict``; ``overrides`` set fields such as ``scaling_factor``). ``dtype``: the
    weights' dtype in memory (None: as stored); ``compute_dtype``: the dtype it runs in (None: the weights').

    ``lazy_encoder`` (default): every key is checked now but only the decoder is read; the encoder (about half
    the weights) is read from the same file on first use, in the decoder's dtype and on its device at that
    time (see ``DCAE.defer_encoder``). A text-to-image run, which only decodes, never holds it. Until then
    ``state_dict()`` and ``parameters()`` cover the decoder only, i.e. what is in memory (what a host's memory
    accounting should count); ``model.load_encoder()`` reads it explicitly, e.g. before saving a state dict.
    The file must stay in place meanwhile (a TwigError naming it otherwise). False reads everything now.
    """
    from .dcae import DCAE, DCAEConfig

    requested = dtype = resolve_dtype(dtype, device)
    compute_dtype = resolve_dtype(compute_dtype, device)
    src, original, ours_meta = _open_vae(path, variant, dtype)
    label = src.label
    with _named_errors(label):
        if config is None:
            if src.config is not None:
                config = DCAEConfig.from_diffusers_config(src.config)
                if overrides:
                    config = config.replace(**overrides)
            else:
                config = DCAEConfig.from_state_dict(ours_meta, **overrides)
    with torch.device("meta"):
        model = DCAE(config, compute_dtype=compute_dtype)
    _check_keys(model, ours_meta, label, "DC-AE")
    dtype = dtype or _dominant_dtype(ours_meta)
    parts = ("encoder", "decoder")
    if lazy_encoder:
        stamps = {f: _stamp(f) for f in _files_of(src.weights)}
        model.defer_encoder(functools.partial(_read_deferred_encoder, os.fspath(path), variant, requested, stamps))
        parts = ("decoder",)
    _fill_vae(model, src.weights, original, parts, dtype, device, label)
    return model.eval()


# ==================================================================================================
# Gemma-2 text encoder

# gemma-2-2b(-it) values for what the weights do not show
_GEMMA2_DEFAULT_HEAD_DIM = 256


def gemma2_config_from_shapes(sd: Mapping[str, torch.Tensor], label: str = "Gemma-2 weights"):
    """A transformers ``Gemma2Config`` from a Gemma2Model state dict's shapes (keys without prefix).

    hidden size and vocabulary from ``embed_tokens``, layers from the indices, MLP width from ``gate_proj``.
    Head dim: 256 (every Gemma-2 up to 9B) when it divides both the q and k projections, else the largest
    common divisor of the two widths (one key/value head). ``query_pre_attn_scalar`` = head dim, as in
    gemma-2-2b; everything else (soft-caps 50/30, sliding window 4096, RoPE theta 10000, RMS eps 1e-6,
    GELU-tanh) is gemma-2-2b's, which are ``Gemma2Config``'s defaults.
    """
    from transformers import Gemma2Config

    def shape(key):
        if key not in sd:
            raise TwigError(f"{label}: missing {key!r}; not a Gemma-2 model")
        return tuple(sd[key].shape)

    vocab, hidden = shape("embed_tokens.weight")
    layers = sorted({int(k.split(".")[1]) for k in sd if k.startswith("layers.") and k.split(".")[1].isdigit()})
    if not layers or layers != list(range(layers[-1] + 1)):
        raise TwigError(f"{label}: Gemma-2 layers are not numbered 0..N-1 ({_first(layers)})")
    q_out = shape("layers.0.self_attn.q_proj.weight")[0]
    k_out = shape("layers.0.self_attn.k_proj.weight")[0]
    inter = shape("layers.0.mlp.gate_proj.weight")[0]
    hd = _GEMMA2_DEFAULT_HEAD_DIM
    if q_out % hd or k_out % hd:
        hd = math.gcd(q_out, k_out)
    return Gemma2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=len(layers),
        num_attention_heads=q_out // hd, num_key_value_heads=k_out // hd, head_dim=hd, query_pre_attn_scalar=hd,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, attn_implementation="eager",
    )


def _gemma2_from_weights(weights: Weights, config, dtype, device, label: str):
    """Build Gemma2Model on the meta device and assign its weights; non-persistent buffers (RoPE
    frequencies, embedding scale) come from a one-layer twin built for real."""
    from transformers import Gemma2Model

    # lm_head is tied to embed_tokens; spiece_model is the tokenizer riding along in ComfyUI files
    keys = [k for k in weights if k != "lm_head.weight" and k.rsplit(".", 1)[-1] != "spiece_model"]
    metas = {k: weights.meta(k) for k in keys}
    with torch.device("meta"):
        model = Gemma2Model(config)
    _check_keys(model, metas, label, "Gemma-2")
    dtype = dtype or _dominant_dtype(metas)
    _fill(model, weights, list(model.state_dict().keys()), dtype, device, label, check=False)
    small = {**config.to_dict(), "num_hidden_layers": 1, "vocab_size": 8, "intermediate_size": 8}
    if small.get("layer_types"):
        small["layer_types"] = small["layer_types"][:1]
    twin_cfg = type(config).from_dict(small)
    twin_cfg._attn_implementation = config._attn_implementation
    with torch.device("cpu"):
        twin = Gemma2Model(twin_cfg)
    twin_buffers = dict(twin.named_buffers())
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            src_name = re.sub(r"^layers\.\d+\.", "layers.0.", name)
            if src_name not in twin_buffers:
                raise TwigError(f"{label}: cannot rebuild buffer {name}")  # pragma: no cover
            mod_name, _, leaf = name.rpartition(".")
            mod = model.get_submodule(mod_name) if mod_name else model
            mod._buffers[leaf] = twin_buffers[src_name].clone().to(device)
    for mod_name, mod in model.named_modules():  # plain tensor attributes (some versions keep RoPE copies)
        for attr, value in list(vars(mod).items()):
            if torch.is_tensor(value) and value.is_meta:
                twin_mod = twin.get_submodule(re.sub(r"^layers\.\d+", "layers.0", mod_name)) if mod_name else twin
                setattr(mod, attr, getattr(twin_mod, attr).clone().to(device))
    return model.eval().requires_grad_(False)


# ---- tokenizer from sentencepiece bytes (no protobuf or sentencepiece package needed)


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = buf[i]
        i += 1
        out |= (b & 0x7F) << shift
        if b < 0x80:
            return out, i
        shift += 7


def _proto_fields(buf: bytes):
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, i = _varint(buf, i)
        elif wire == 1:
            val, i = buf[i:i + 8], i + 8
        elif wire == 2:
            ln, i = _varint(buf, i)
            val, i = buf[i:i + ln], i + ln
        elif wire == 5:
            val, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if i > n:
            raise ValueError("truncated")
        yield num, val


# sentencepiece ModelProto: 1 pieces {1 piece, 2 score, 3 type}, 2 trainer_spec {3 model_type, 35 byte_fallback},
# 3 normalizer_spec {1 name, 3 add_dummy_prefix, 4 remove_extra_whitespaces}. Piece types:
_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER, _SP_UNUSED, _SP_BYTE = 1, 2, 3, 4, 5, 6


def _parse_spiece(data: bytes):
    pieces, trainer, norm = [], {}, {}
    for num, val in _proto_fields(data):
        if num == 1:
            piece, score, typ = "", 0.0, _SP_NORMAL
            for f, v in _proto_fields(val):
                if f == 1:
                    piece = v.decode("utf-8")
                elif f == 2:
                    (score,) = struct.unpack("<f", v)
                elif f == 3:
                    typ = v
            pieces.append((piece, score, typ))
        elif num == 2:
            trainer.update(_proto_fields(val))
        elif num == 3:
            norm.update(_proto_fields(val))
    return pieces, trainer, norm


def tokenizer_from_spiece(data: bytes, label: str = "sentencepiece model"):
    """A transformers fast tokenizer equivalent to a Gemma sentencepiece BPE model given as bytes.

    The vocabulary and piece scores are read from the model; BPE merges are derived from them (every split
    of a piece into two pieces, ranked by the merged piece's score); spaces become "▁", unknown bytes fall
    back to <0xNN> pieces, user-defined pieces are kept whole, and <bos> is prepended.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    try:
        pieces, trainer, norm = _parse_spiece(bytes(data))
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise TwigError(f"{label}: not a readable sentencepiece model ({e})") from None
    if not pieces:
        raise TwigError(f"{label}: empty sentencepiece model")
    if trainer.get(3, 1) != 2:
        raise TwigError(f"{label}: not a BPE sentencepiece model (Gemma's is); pass a tokenizer folder instead")
    if norm.get(4, 1):
        raise TwigError(f"{label}: this sentencepiece model collapses whitespace (Gemma's does not); "
                        "pass a tokenizer folder")
    vocab: dict[str, int] = {}
    for i, (piece, _, _) in enumerate(pieces):
        vocab.setdefault(piece, i)
    ranked = sorted((i for i, (p, _, t) in enumerate(pieces) if t == _SP_NORMAL and len(p) > 1),
                    key=lambda i: (-pieces[i][1], i))
    merges = []
    for i in ranked:
        piece = pieces[i][0]
        local = sorted((vocab[piece[:k]], vocab[piece[k:]], piece[:k], piece[k:]) for k in range(1, len(piece))
                       if piece[:k] in vocab and piece[k:] in vocab)
        merges += [(a, b) for _, _, a, b in local]
    unk = next((p for p, _, t in pieces if t == _SP_UNKNOWN), "<unk>")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                               byte_fallback=bool(trainer.get(35, 0))))
    steps = [normalizers.Prepend("▁")] if norm.get(3, 1) else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")]) if steps else \
        normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p, _, t in pieces
                            if t in (_SP_UNKNOWN, _SP_CONTROL)])
    # user-defined pieces are matched whole in the normalized text, as sentencepiece does
    tok.add_tokens([AddedToken(p, special=False, normalized=True) for p, _, t in pieces if t == _SP_USER])
    bos = "<bos>" if "<bos>" in vocab else None
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    specials = {k: v for k, v in (("bos_token", bos), ("unk_token", unk)) if v}
    for attr, piece in (("eos_token", "<eos>"), ("pad_token", "<pad>"), ("mask_token", "<mask>")):
        if piece in vocab:
            specials[attr] = piece
    out = PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    out.padding_side = "right"
    return out


def _has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, n)) for n in ("tokenizer.json", "tokenizer.model"))


def _tokenizer_from_path(path: str):
    from transformers import AutoTokenizer

    if os.path.isdir(path):
        sub = os.path.join(path, "tokenizer")
        if _is_pipeline_dir(path) and os.path.isdir(sub):
            path = sub
        if any(os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.json", "tokenizer_config.json")):
            try:
                return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
            except Exception as e:
                if not os.path.isfile(os.path.join(path, "tokenizer.model")):
                    raise TwigError(f"{path}: cannot load the tokenizer: {e}") from None
        model_file = os.path.join(path, "tokenizer.model")
        if os.path.isfile(model_file):
            path = model_file
        else:
            raise TwigError(f"{path}: no tokenizer.json or tokenizer.model in this folder")
    if path.endswith(".json"):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_file=path, bos_token="<bos>", eos_token="<eos>",
                                       pad_token="<pad>", unk_token="<unk>")
    with open(path, "rb") as f:
        return tokenizer_from_spiece(f.read(), path)


def load_text_encoder(
    path,
    dtype=None,
    device="cpu",
    tokenizer_path=None,
    *,
    expected_width: int | None = None,
    variant: str | None = None,
    **kwargs,
):
    """Load Gemma-2 and its tokenizer as a :class:`twig_core.text.TextEncoder`.

    ``path``: a Hugging Face Gemma-2 folder, a diffusers pipeline folder (``text_encoder/`` + ``tokenizer/``),
    or a single file (ComfyUI style: weights, optionally under a prefix such as ``model.``, plus a
    ``spiece_model`` uint8 tensor with the sentencepiece tokenizer). ``tokenizer_path`` (a tokenizer folder,
    tokenizer.json or tokenizer.model) overrides the tokenizer found with the weights. ``dtype`` None: bf16
    on CUDA, fp32 elsewhere (Gemma-2 overflows in fp16). ``expected_width``: the transformer's caption
    width; a different hidden size is a TwigError. Other keyword arguments go to ``TextEncoder``.
    """
    from .text import TextEncoder, folder_settings

    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    path = os.fspath(path)
    if not os.path.exists(path):
        raise TwigError(f"not found: {path}")
    encoder = None
    if os.path.isdir(path):
        folder = _component_folder(path, "text_encoder")
        cfg_path = os.path.join(folder, "config.json")
        tok_dir = tokenizer_path
        if tok_dir is None and folder != path and os.path.isdir(os.path.join(path, "tokenizer")):
            tok_dir = os.path.join(path, "tokenizer")
        sibling = os.path.join(os.path.dirname(os.path.abspath(folder)), "tokenizer")
        if tok_dir is None and not _has_tokenizer(folder) and os.path.isdir(sibling):
            tok_dir = sibling  # text_encoder/ of a pipeline picked on its own
        if os.path.isfile(cfg_path):
            cfg = _read_json(cfg_path)
            if _config_kind(cfg) != "text_encoder":
                raise TwigError(f"{folder}: {_config_name(cfg)} is not Gemma-2 (Sana uses Gemma-2-2B)")
            _check_width(cfg.get("hidden_size"), expected_width, folder)
            sets = _weight_sets(folder)
            if variant is None and any(v is None for v, _ in sets) and (tok_dir is None or os.path.isdir(tok_dir)):
                encoder = TextEncoder.from_pretrained(folder, dtype, device, tokenizer_folder=tok_dir, **kwargs)
            else:
                from transformers import AutoConfig

                config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
                config._attn_implementation = "eager"
                weights = _open_set(_pick_weight_set(folder, variant, dtype))
                weights = _strip_gemma_prefix(weights)
                model = _gemma2_from_weights(weights, config, dtype, device, weights.label)
                tokenizer = _tokenizer_from_path(os.fspath(tok_dir) if tok_dir is not None else folder)
                encoder = TextEncoder(model, tokenizer, **{**folder_settings(folder), **kwargs})
        else:
            raise TwigError(f"{folder}: no config.json; a Gemma-2 folder needs one (or pick the single file)")
    else:
        base = open_weights(path)
        weights = _strip_gemma_prefix(base)
        with _named_errors(base.label):
            config = gemma2_config_from_shapes(weights.meta_dict(), base.label)
        _check_width(config.hidden_size, expected_width, base.label)
        if tokenizer_path is not None:
            tokenizer = _tokenizer_from_path(os.fspath(tokenizer_path))
        else:
            spiece = [k for k in base if k.split(".")[-1] == "spiece_model"]
            if spiece:
                tokenizer = tokenizer_from_spiece(base[spiece[0]].numpy().tobytes(), f"{base.label} [{spiece[0]}]")
            else:
                near = [os.path.join(os.path.dirname(path), n)
                        for n in ("tokenizer", "tokenizer.json", "tokenizer.model")]
                near = [n for n in near if os.path.exists(n)]
                if not near:
                    raise TwigError(
                        f"{base.label}: no tokenizer: the file has no 'spiece_model' tensor; pass tokenizer_path "
                        "(a Gemma-2 tokenizer folder, tokenizer.json or tokenizer.model)"
                    )
                tokenizer = _tokenizer_from_path(near[0])
        model = _gemma2_from_weights(weights, config, dtype, device, base.label)
        encoder = TextEncoder(model, tokenizer, **kwargs)
    _check_width(encoder.hidden_size, expected_width, path)
    return encoder


def _check_width(hidden, expected: int | None, label: str):
    """Checked before the weights are read, so a wrong Gemma costs no time."""
    if expected is not None and hidden is not None and int(hidden) != int(expected):
        raise TwigError(
            f"{label}: text encoder width {hidden} does not match the transformer's caption width "
            f"{expected} (Sana/Twig use Gemma-2-2B, width 2304)"
        )


def _strip_gemma_prefix(weights: Weights) -> Weights:
    kinds = classify(weights.keys())
    if "text_encoder" not in kinds:
        raise TwigError(_wrong_kind_message(weights.label, "text_encoder", kinds, weights))
    prefix = kinds["text_encoder"]
    return PrefixedWeights(weights, prefix) if prefix else weights


# ==================================================================================================
# Everything at once


@dataclass
class Parts:
    transformer: Any
    text_encoder: Any
    vae: Any


def load_parts(transformer, text_encoder=None, vae=None, dtype=None, device="cpu", weight_dtype=None) -> Parts:
    """Load the three networks. ``transformer`` may be a pipeline folder (or an all-in-one file), in which
    case a missing ``text_encoder``/``vae`` is taken from it. ``weight_dtype`` keeps the transformer's and the
    VAE's weights in that dtype ("stored": as in the file) while they compute in ``dtype``."""
    if transformer is None:
        raise TwigError("no transformer given (a checkpoint file, a diffusers folder or a pipeline folder)")
    dtype = resolve_dtype(dtype, device)
    whole = detect(transformer) == "pipeline"
    text_encoder = text_encoder if text_encoder is not None else (transformer if whole else None)
    vae = vae if vae is not None else (transformer if whole else None)
    if text_encoder is None:
        raise TwigError(f"{transformer}: holds no text encoder; give a Gemma-2 folder or file")
    if vae is None:
        raise TwigError(f"{transformer}: holds no VAE; give a DC-AE file or folder")
    kwargs = weight_dtype_kwargs(weight_dtype, dtype, device)
    model = load_transformer(transformer, device=device, **kwargs)
    te = load_text_encoder(text_encoder, dtype=_text_dtype(dtype, device), device=device,
                           expected_width=model.config.caption_channels)
    ae = load_vae(vae, device=device, **kwargs)
    return Parts(model, te, ae)


def load_pipeline(path, dtype=None, device="cpu") -> Parts:
    """A whole diffusers pipeline folder (or all-in-one file) as one thing."""
    if detect(path) != "pipeline":
        raise TwigError(f"{path}: not a pipeline folder (no model_index.json or transformer/ + vae/ subfolders)")
    return load_parts(path, dtype=dtype, device=device)
