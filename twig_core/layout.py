"""Where the networks are in a file or folder: diffusers layouts and format detection, in one place.

- Folders: a component folder (``config.json`` + weights), a whole pipeline folder (``model_index.json`` with
  ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``), sharded weights with an index json, and
  ``fp16``/``bf16`` variants (``diffusion_pytorch_model.fp16.safetensors``,
  ``...fp16-00001-of-00002.safetensors`` + ``...safetensors.index.fp16.json``).
- Formats: ``classify`` tells which Sana-family networks a key set holds and under which container prefix
  (``model.diffusion_model.``, ``first_stage_model.`` ...), from each network's anchor key in
  ``twig_core.keymap``; ``detect`` answers for a path; a wrong pick gets a message naming what the file is
  (other Sana networks or well-known foreign ones: SD UNets, Flux, T5, CLIP ...).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from . import keymap
from .errors import TwigError
from .weights import PrefixedWeights, UnionWeights, Weights, open_weights, shortlist

# ==================================================================================================
# Folders: diffusers components, pipelines, shards and variants

_COMPONENT_DIRS = {"transformer": "transformer", "vae": "vae", "text_encoder": "text_encoder"}
_CLASS_KINDS = {"SanaTransformer2DModel": "transformer", "AutoencoderDC": "vae"}
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model")


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TwigError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise TwigError(f"{path}: expected a JSON object")
    return data


def is_pipeline_dir(path: str) -> bool:
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return True
    return sum(os.path.isdir(os.path.join(path, d)) for d in _COMPONENT_DIRS.values()) >= 2


def _names(cfg: dict) -> tuple[str, str, list[str]]:
    """A config's ``_class_name``, ``model_type`` and ``architectures``, whatever odd values it holds."""
    text = [cfg.get(k) if isinstance(cfg.get(k), str) else "" for k in ("_class_name", "model_type")]
    archs = cfg.get("architectures")
    return text[0], text[1], [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []


def config_kind(cfg: dict) -> str | None:
    cls, model_type, archs = _names(cfg)
    if cls in _CLASS_KINDS:
        return _CLASS_KINDS[cls]
    if model_type == "gemma2" or any("Gemma2" in a for a in archs):
        return "text_encoder"
    return None


def config_name(cfg: dict) -> str:
    cls, model_type, archs = _names(cfg)
    return cls or model_type or ",".join(archs) or "?"


def wrong_config(folder: str, cfg: dict, wanted: str) -> TwigError:
    """The error for a folder whose config.json names another model than ``wanted``, or none at all."""
    if config_name(cfg) == "?":
        return TwigError(f"{os.path.join(folder, 'config.json')}: names no model (no \"_class_name\", \"model_type\" "
                         f"or \"architectures\"), so it cannot be {wanted}; a Gemma-2 config says \"model_type\": "
                         f"\"gemma2\", a diffusers one its \"_class_name\"")
    return TwigError(f"{folder}: {config_name(cfg)} is not {wanted}")


_SHARD = re.compile(r"^(?P<stem>.+?)(?:\.(?P<v>[A-Za-z0-9_]+))?-(?P<i>\d+)-of-(?P<n>\d+)\.(?P<ext>safetensors|bin)$")


def weight_sets(folder: str) -> dict[tuple[str | None, str], list[str] | str]:
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


def pick_weight_set(folder: str, variant: str | None, dtype: torch.dtype | None) -> list[str] | str:
    sets = weight_sets(folder)
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
            names = shortlist(os.path.basename(f) for f in files)
            raise TwigError(f"{folder}: several weight files ({names}); pick one file")
        raise TwigError(
            f"{folder}: no weights found (looked for diffusion_pytorch_model[.variant].safetensors, "
            "model[.variant].safetensors, their sharded *.index[.variant].json forms, and .bin)"
        )
    variants = sorted({v for v, _ in sets}, key=lambda v: (v is not None, v or ""))
    if variant is not None:
        if variant not in variants:
            raise TwigError(f"{folder}: no '{variant}' variant; found {shortlist(v or 'default' for v in variants)}")
        order = [variant]
    else:
        wanted = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype)
        order = ([wanted] if wanted in variants else []) + [v for v in variants if v != wanted]
    for v in order:
        for ext in ("safetensors", "bin"):
            if (v, ext) in sets:
                return sets[(v, ext)]
    raise TwigError(f"{folder}: no usable weights")  # pragma: no cover


def open_set(weight_set: list[str] | str) -> Weights:
    if isinstance(weight_set, str):  # an index json
        index = read_json(weight_set)
        wmap = index.get("weight_map")
        if not isinstance(wmap, dict) or not wmap:
            raise TwigError(f"{weight_set}: no weight_map in this index")
        folder = os.path.dirname(weight_set)
        odd = [f for f in wmap.values() if not isinstance(f, str) or os.path.basename(f) != f or f in ("", ".", "..")]
        if odd:
            raise TwigError(f"{weight_set}: weight_map names {odd[0]!r}, not a shard file beside the index")
        files = sorted(set(wmap.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise TwigError(f"{weight_set}: shard files missing: {shortlist(missing)}")
        parts = [open_weights(os.path.join(folder, f)) for f in files]
        union = UnionWeights(parts, weight_set)
        absent = [k for k, f in wmap.items() if k not in union or union.file_of(k) != os.path.join(folder, f)]
        if absent:
            raise TwigError(
                f"{weight_set}: the index lists tensors its shards do not hold: {shortlist(absent)} "
                "(incomplete download or mixed variants?)"
            )
        return union
    if len(weight_set) == 1:
        return open_weights(weight_set[0])
    return UnionWeights([open_weights(f) for f in weight_set], f"{weight_set[0]} (+{len(weight_set) - 1} shards)")


@dataclass
class Source:
    """One network's weights found at a path, with the config.json that describes them, if any."""

    weights: Weights  # prefix stripped
    label: str  # for messages
    config: dict | None  # a diffusers/transformers config.json, when there is one
    folder: str | None


def component_folder(path: str, kind: str) -> str:
    """The folder holding network ``kind``: ``path`` itself, or its diffusers sub-folder (``text_encoder/`` …) in
    a pipeline folder, or in a folder that holds only the pipeline's sub-folders (no model_index.json, no
    config.json of its own)."""
    sub = os.path.join(path, _COMPONENT_DIRS[kind])
    if os.path.isdir(sub) and (is_pipeline_dir(path) or (not os.path.isfile(os.path.join(path, "config.json"))
                                                         and os.path.isfile(os.path.join(sub, "config.json")))):
        return sub
    return path


def open_source(path, kind: str, variant=None, dtype=None) -> Source:
    """The network ``kind`` in a file, a component folder or a pipeline folder (weight set picked by
    ``variant``, else the one matching ``dtype``); TwigError when the path holds something else."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise TwigError(f"not found: {path}")
    config = None
    folder = None
    if os.path.isdir(path):
        folder = component_folder(path, kind)
        cfg_path = os.path.join(folder, "config.json")
        if os.path.isfile(cfg_path):
            config = read_json(cfg_path)
            got = config_kind(config)
            if got is not None and got != kind:
                raise TwigError(f"{folder}: this folder holds a {KIND_NAMES[got]} ({config_name(config)}), "
                                f"not a {KIND_NAMES[kind]}")
            if got is None and "_class_name" in config:
                raise TwigError(f"{folder}: {config['_class_name']} is not a Sana-family {KIND_NAMES[kind]}")
        weights = open_set(pick_weight_set(folder, variant, dtype))
    else:
        weights = open_weights(path)
        config = getattr(weights, "embedded_config", None)  # a GGUF written by our converter carries it
        # a diffusers component file picked on its own: use the config.json beside it when it matches
        cfg_path = os.path.join(os.path.dirname(path), "config.json")
        if config is None and os.path.isfile(cfg_path):
            try:
                cfg = read_json(cfg_path)
            except TwigError:
                cfg = None
            if cfg is not None and config_kind(cfg) == kind:
                config = cfg
    return Source(network_weights(weights, kind), weights.label, config, folder)


# ==================================================================================================
# What a set of keys is

KIND_NAMES = {
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


def wrong_kind_message(label: str, kind: str, kinds: dict, weights: Weights) -> str:
    want = KIND_NAMES[kind]
    if kinds:
        have = " and ".join(KIND_NAMES[k] for k in kinds)
        return f"{label}: this file holds a {have}, not a {want}; load it with the matching loader"
    keys = list(weights.keys())
    if kind == "text_encoder" and keymap.find_prefix(keys, keymap.ANCHORS["text_encoder"]) is not None:
        return (f"{label}: a decoder-only language model but not Gemma-2 (no pre_feedforward_layernorm, or "
                f"Gemma-3 q/k norms); Sana needs Gemma-2-2B")
    what = _foreign(keys)
    if what:
        return f"{label}: this looks like {what}, not a {want}"
    return f"{label}: not a {want}; first keys: {shortlist(keys)}"


def detect(path) -> str:
    """What a file or folder holds: "transformer", "vae", "text_encoder" or "pipeline" (a diffusers
    pipeline folder, or one file holding several networks). TwigError if it is none of these."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise TwigError(f"not found: {path}")
    if os.path.isdir(path):
        if is_pipeline_dir(path):
            return "pipeline"
        cfg_path = os.path.join(path, "config.json")
        if os.path.isfile(cfg_path):
            cfg = read_json(cfg_path)
            kind = config_kind(cfg)
            if kind is None:
                raise wrong_config(path, cfg, "a Sana transformer, DC-AE or Gemma-2")
            return kind
        weights = open_set(pick_weight_set(path, None, None))
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
                    + f"not a Sana transformer, DC-AE or Gemma-2 file (first keys: {shortlist(keys)})")


def network_weights(weights: Weights, kind: str) -> Weights:
    """The part of ``weights`` holding the network ``kind``, its container prefix removed; TwigError naming
    what the file holds otherwise."""
    kinds = classify(weights.keys())
    if kind not in kinds:
        raise TwigError(wrong_kind_message(weights.label, kind, kinds, weights))
    prefix = kinds[kind]
    return PrefixedWeights(weights, prefix) if prefix else weights
