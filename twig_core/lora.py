"""LoRA files for the Twig transformer: read every published layout, map it onto our layers through the one key
table (``keymap.locate``), and apply it at run time as adapters on the layers.

Layouts, told apart by their keys: diffusers / PEFT (``[transformer.|base_model.model.]<module>.lora_A.weight`` /
``lora_B.weight``, optional ``<module>.alpha``, ``lora_magnitude_vector`` for DoRA, rank / alpha / rsLoRA in the
safetensors metadata ``lora_adapter_metadata`` as diffusers writes it); kohya / OneTrainer
(``lora_transformer_<module_with_underscores>.lora_down.weight`` / ``lora_up.weight`` / ``alpha``, also
``lora_unet_``); any of those over the original NVlabs names (= ours); the adapters ``training.lora`` saved
(``<module>.lora_down`` / ``lora_up`` / ``lora_scale``). Scaling is PEFT's: alpha / rank (alpha / sqrt(rank) for
rank-stabilized LoRA), alpha = rank when the file gives none. A LoRA on diffusers' ``to_q``/``to_k``/``to_v``
lands on its slice of our fused ``attn.qkv`` (``cross_attn.kv_linear``).

Applying: each targeted layer gets ``layer.twig_adapters``, a list of :class:`Adapter`; ``ops.weights`` folds
them over a per-call copy of the layer's weight, one layer at a time, so the stored weights never change (taking
a LoRA off, or changing its strength, gives the base model back bit for bit) and no second copy of the model is
kept. :func:`apply_loras` sets the whole stack; :func:`loras_applied` does it for a ``with`` block.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import TwigError
from .keymap import locate
from .weights import open_weights, shortlist

log = logging.getLogger("twig")

# containers in front of the module names (stripped repeatedly, longest first)
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "unet.",
             "lora_transformer_", "lora_unet_")
_LEAF = re.compile(r"^(?P<module>.+?)[._](?P<leaf>lora_A(?:\.default)?\.weight|lora_B(?:\.default)?\.weight"
                   r"|lora_down(?:\.weight)?|lora_up(?:\.weight)?|alpha|lora_scale"
                   r"|lora_magnitude_vector(?:\.default(?:\.weight)?)?)$")
_ROLE = {"lora_A": "down", "lora_down": "down", "lora_B": "up", "lora_up": "up", "alpha": "alpha",
         "lora_scale": "scale", "lora_magnitude_vector": "magnitude"}

# key families of LoRAs for other architectures, refused by name
_OTHER_MODELS = (
    ("Flux", ("single_transformer_blocks", "double_blocks", "single_blocks", "ff_context", "add_q_proj",
              "txt_mlp", "img_mlp")),
    ("SD3", ("joint_blocks", "context_block", "x_block")),
    ("SDXL / SD 1.x", ("down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks")),
)  # (text-encoder parts, "lora_te_...", are not a family: a Sana trainer may write them beside the transformer's)


@dataclass
class LoraWeights:
    """One layer's low-rank pair from a file: delta = scale * up @ down (DoRA: then renormalised per output
    row to ``magnitude``). down [rank, in(, kh, kw)], up [out, rank(, 1, 1)]."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float
    magnitude: torch.Tensor | None = None

    def delta(self, shape: torch.Size, dtype: torch.dtype, device=None) -> torch.Tensor:
        """scale * up @ down shaped like a weight of ``shape`` ([out, in(, kh, kw)]), on ``device`` (the weight's:
        a host may hand over a weight it just moved to the GPU)."""
        up, down = self.up.to(device, dtype).flatten(1), self.down.to(device, dtype).flatten(1)
        return (up @ down).reshape(shape) * self.scale


@dataclass
class LoraFile:
    """A LoRA file read and mapped onto our layers: ``layers`` maps our module name to its (part index, parts,
    weights) entries; ``unmatched`` holds the file's module names no table row knows."""

    path: str
    layers: dict[str, list[tuple[int, int, LoraWeights]]]
    unmatched: list[str] = field(default_factory=list)
    layout: str = ""

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.path))[0]


@dataclass
class Adapter:
    """One LoRA's change to one layer: applied by ``ops.weights`` as ``apply(weight, dtype)``."""

    weights: LoraWeights
    index: int
    parts: int
    strength: float
    source: str

    def apply(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``w`` (never modified) with this adapter's change, as a new tensor in ``dtype``. Stacked adapters fold
        in order, so a DoRA adapter normalises the weight it is handed (PEFT normalises the base weight alone:
        the same when the DoRA LoRA is the only one on a layer, or comes first)."""
        out = w.to(dtype, copy=True)
        n = out.shape[0] // self.parts
        part = out[self.index * n:(self.index + 1) * n]
        calc = torch.promote_types(dtype, torch.float32)  # the delta is formed in at least fp32
        delta = self.weights.delta(part.shape, calc, part.device) * self.strength
        mag = self.weights.magnitude
        if mag is None:
            part.copy_(part.to(calc) + delta)
        else:  # DoRA (as PEFT): the norm of each output row of the changed weight is set to the magnitude
            merged = part.to(calc) + delta
            norm = merged.flatten(1).norm(dim=1)
            part.copy_(merged * (mag.reshape(-1).to(part.device, calc) / norm).view(-1, *[1] * (merged.ndim - 1)))
        return out


# ------------------------------------------------------------------------------------------------- reading


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _peft_metadata(weights) -> dict:
    """diffusers' adapter config (``lora_adapter_metadata``), its ``transformer.`` prefix taken off."""
    raw = getattr(weights, "metadata", {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return {k.split(".", 1)[1] if k.startswith("transformer.") else k: v for k, v in meta.items()}


def _pattern_value(patterns: dict, module: str, default):
    for pat, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{pat}$", module):
            return value
    return default


def _family(keys) -> str | None:
    for name, marks in _OTHER_MODELS:
        if any(m in k for k in keys for m in marks):
            return name
    return None


def read_lora(path: str | os.PathLike) -> LoraFile:
    """Read a LoRA file (safetensors, or a PyTorch file through ``torch.load(weights_only=True)``) and map its
    layers onto ours. Raises TwigError naming the file when nothing in it fits this model (naming the model a
    Flux / SD3 / SDXL LoRA is for); logs a warning with the count when only some of its layers fit."""
    path = os.fspath(path)
    weights = open_weights(path)
    keys = list(weights)
    family = _family(keys)
    if family:
        raise TwigError(f"{path}: this is a LoRA for {family}, not for Sana / Twig")
    meta = _peft_metadata(weights)
    rslora = bool(meta.get("use_rslora"))
    modules: dict[str, dict[str, torch.Tensor]] = {}
    stray = []
    layout = "peft"
    for key in keys:
        m = _LEAF.match(_strip(key))
        if not m:
            stray.append(key)
            continue
        leaf = m["leaf"].split(".")[0]
        layout = "kohya" if leaf in ("lora_down", "lora_up") and layout == "peft" else layout
        modules.setdefault(m["module"], {})[_ROLE[leaf]] = weights[key]
    layers: dict[str, list[tuple[int, int, LoraWeights]]] = {}
    unmatched = list(stray)
    for module, parts in modules.items():
        where = locate(module)
        if where is None or "down" not in parts or "up" not in parts:
            unmatched.append(module if where is None else f"{module} (lora_A/lora_B pair incomplete)")
            continue
        down, up = parts["down"].float(), parts["up"].float()
        rank = down.shape[0]
        if "scale" in parts:  # training.lora's own files carry the scale itself
            scale = float(parts["scale"])
        else:
            alpha = float(parts["alpha"]) if "alpha" in parts else float(
                _pattern_value(meta.get("alpha_pattern"), module, meta.get("lora_alpha", rank)))
            r = _pattern_value(meta.get("rank_pattern"), module, meta.get("r", rank)) if meta else rank
            scale = alpha / math.sqrt(r) if rslora else alpha / r
        mag = parts.get("magnitude")
        name, index, count = where
        layers.setdefault(name, []).append((index, count, LoraWeights(down, up, scale,
                                                                      None if mag is None else mag.float())))
    if not layers:
        raise TwigError(f"{path}: no layer of this LoRA fits the Sana / Twig transformer (first keys that match "
                        f"nothing: {shortlist(unmatched or keys)})")
    if unmatched:
        log.warning("[Twig] %s: %d of its layers match nothing in the Sana / Twig transformer and are left out "
                    "(%s)", path, len(unmatched), shortlist(unmatched, 3))
    return LoraFile(path, layers, unmatched, layout)


# ------------------------------------------------------------------------------------------------- applying


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``FILE[:STRENGTH]`` -> (file, strength); a Windows drive letter's colon is not a strength."""
    head, sep, tail = text.rpartition(":")
    if sep and head and not re.match(r"^[A-Za-z]$", head):
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0


# A1111's prompt syntax: <lora:NAME>, <lora:NAME:STRENGTH> (a third field, the text encoder's weight elsewhere, is
# ignored: Twig's LoRAs change the transformer only); <lyco:...> alike
_PROMPT_TAG = re.compile(r"<(?:lora|lyco):([^:>]+)(?::([^:>]*))?(?::[^>]*)?>", re.IGNORECASE)


def split_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """``"a cat <lora:pink:0.8>"`` -> (``"a cat"``, [("pink", 0.8)]): the prompt without its LoRA tags (for the text
    encoder) and the LoRAs it names."""
    found = []
    for m in _PROMPT_TAG.finditer(prompt):
        try:
            strength = float(m[2]) if m[2] not in (None, "") else 1.0
        except ValueError:
            raise TwigError(f"prompt tag {m[0]}: the strength must be a number") from None
        found.append((m[1].strip(), strength))
    text = _PROMPT_TAG.sub(" ", prompt)
    text = re.sub(r"\s*,(\s*,)+", ",", re.sub(r"[ \t]+", " ", text)).strip(" ,")
    return text, found


def adapters_of(model: nn.Module, lora: LoraFile, strength: float) -> list[tuple[nn.Module, Adapter]]:
    """One adapter per layer entry of ``lora``, checked against the model's weight shapes."""
    out = []
    for name, entries in lora.layers.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise TwigError(f"{lora.path}: the model has no layer '{name}'") from None
        shape = layer.weight.shape
        if getattr(layer, "groups", 1) > 1:  # PEFT's adapter there is a full convolution, not a weight change
            raise TwigError(f"{lora.path}: it adapts the depthwise convolution '{name}', which no weight change "
                            "can express (PEFT cannot merge it either); LoRAs on the other layers load")
        for index, parts, w in entries:
            rows = shape[0] // parts
            # down's input side may be [in] for a 1x1 convolution's [in, 1, 1] (files written from linear layers)
            if (w.up.shape[0] != rows or w.down[0].numel() != shape[1:].numel()
                    or w.up[0].numel() != w.down.shape[0]):
                raise TwigError(f"{lora.path}: the adapter for '{name}' (down {tuple(w.down.shape)}, up "
                                f"{tuple(w.up.shape)}) does not fit its weight {tuple(shape)}; is this LoRA for "
                                f"another model size?")
            out.append((layer, Adapter(w, index, parts, float(strength), lora.path)))
    return out


def remove_loras(model: nn.Module) -> None:
    """Take every adapter off ``model``: its layers compute with their stored weights again."""
    for m in model.modules():
        if getattr(m, "twig_adapters", None):
            m.twig_adapters = []


def apply_loras(model: nn.Module, loras) -> list[tuple[str, float]]:
    """Set the model's LoRA stack to ``loras``, (LoraFile or path, strength) pairs in order (replacing any
    stack before). Returns [(name, strength)] as applied, for metadata and info text."""
    pairs = [(lora if isinstance(lora, LoraFile) else read_lora(lora), float(s)) for lora, s in loras]
    planned = [a for lora, s in pairs for a in adapters_of(model, lora, s)]  # every file checked first
    remove_loras(model)
    for layer, adapter in planned:
        layer.twig_adapters = [*getattr(layer, "twig_adapters", []), adapter]
    return [(lora.name, s) for lora, s in pairs]


@contextlib.contextmanager
def loras_applied(model: nn.Module, loras):
    """``with loras_applied(model, [(path, 0.8)]):`` the model runs with those LoRAs, and without them after."""
    applied = apply_loras(model, loras)
    try:
        yield applied
    finally:
        remove_loras(model)


def applied_loras(model: nn.Module) -> list[tuple[str, float]]:
    """The LoRA stack on ``model``: [(name, strength)] in the order applied."""
    seen: dict[str, float] = {}
    for m in model.modules():
        for a in getattr(m, "twig_adapters", None) or ():
            seen.setdefault(a.source, a.strength)
    return [(os.path.splitext(os.path.basename(p))[0], s) for p, s in seen.items()]
