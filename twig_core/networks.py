"""Loading the transformer and the DC-AE from any supported file or folder, with the config read from them.

- Transformer: NVlabs originals (``.pth`` with a ``state_dict`` entry, as Twig v0 alpha ships, or the same
  keys in ``.safetensors``; fused ``attn.qkv`` / ``cross_attn.kv_linear``; the unused ``pos_embed`` table and
  ``y_embedder.y_embedding`` null caption are dropped after ``pos_embed`` has told the training grid);
  diffusers ``SanaTransformer2DModel`` files and folders; ComfyUI single files with a container prefix such
  as ``model.diffusion_model.``.
- DC-AE: diffusers ``AutoencoderDC`` files/folders and the original MIT-Han-Lab layout, with any prefix; the
  encoder can be left on disk until first used (``DCAE.defer_encoder``).

``open_transformer`` finds and checks a transformer without reading it (what ``load_transformer`` fills and
the converter streams from). Each config comes from a diffusers ``config.json`` when there is one, else from the
tensor shapes (``TransformerConfig.from_state_dict``, ``DCAEConfig.from_state_dict``); names go through
``twig_core.keymap``.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from . import keymap
from .assign import assign, check_keys, dominant_dtype, named_errors, widened
from .config import CROSS_HEADS_BY_WIDTH, TransformerConfig, heads_from_config
from .devices import resolve_dtype
from .errors import TwigError
from .layout import config_kind, open_source, read_json
from .weights import PrefixedWeights, UnionWeights, Weights


@dataclass
class TransformerSource:
    """A transformer found at a path, nothing read: the checked model on the meta device, ``tensors`` (our name
    -> the stored tensor, read when asked for; a diffusers layout renamed as it is read) and ``dtype`` (the
    weights' dtype in memory: the one asked for, else the file's dominant float dtype)."""

    label: str
    config: TransformerConfig
    model: torch.nn.Module
    tensors: Mapping
    dtype: torch.dtype
    _last: str | None = None

    def names(self) -> list[str]:
        return list(self.model.state_dict())

    def read(self, name: str) -> torch.Tensor:
        """One weight as the loaded model computes with it (``assign.widened``), read now; the tensor read before
        it is released (``Weights.release``: a mapped file's pages leave the resident set), so reading them
        one by one holds one at a time."""
        if self._last is not None and hasattr(self.tensors, "release"):
            self.tensors.release(self._last)
        self._last = name
        return widened(self.model, name, self.tensors[name], self.dtype)


def open_transformer(path, dtype=None, device="cpu", *, compute_dtype=None, pos_embed: bool | None = None,
                     variant: str | None = None, config: TransformerConfig | None = None,
                     **overrides) -> TransformerSource:
    """The transformer at ``path`` (arguments as :func:`load_transformer`) built on the meta device, every name
    and shape checked against the architecture its config implies, no tensor read."""
    from .transformer import TwigTransformer

    dtype = resolve_dtype(dtype, device)
    compute_dtype = resolve_dtype(compute_dtype, device)
    src, config, ours_meta, diffusers_names = _open_transformer(path, variant, dtype, pos_embed, config, overrides)
    label = src.label
    try:
        with torch.device("meta"):
            model = TwigTransformer(config, compute_dtype=compute_dtype)
    except (RuntimeError, ValueError, TypeError, OverflowError) as e:  # a garbled config.json or override
        raise TwigError(f"{label}: cannot build a transformer {_describe(config)}: {e}") from None
    hint = ""
    if any(k.startswith(("cfg_embedder", "logvar_linear", "time_embed.guidance")) for k in ours_meta):
        hint = " (guidance-embedded / Sana Sprint checkpoints are not supported)"
    check_keys(model, ours_meta, label, f"transformer {_describe(config)}", hint)
    tensors = keymap.Renamed(src.weights, keymap.TRANSFORMER_KEYS, "to_ours") if diffusers_names else src.weights
    return TransformerSource(label, config, model, tensors, dtype or dominant_dtype(ours_meta))


def load_transformer(path, dtype=None, device="cpu", *, compute_dtype=None, pos_embed: bool | None = None,
                     variant: str | None = None, config: TransformerConfig | None = None, int8: bool = False,
                     **overrides):
    """Load a Sana/Twig transformer from any supported file or folder.

    ``dtype``: the weights' dtype in memory. None keeps the stored dtype (fp16 stays fp16); else
    "fp16"/"bf16"/"fp32"/"auto" or a torch.dtype. ``compute_dtype``: the dtype the model runs in (None: the
    weights' dtype); e.g. fp16-stored weights computing in fp32 take half the memory of an fp32 model.
    ``pos_embed`` forces the sin-cos positional embedding on/off (default: a diffusers config.json decides,
    else the rule in ``TransformerConfig.from_state_dict``: on for 2K/4K checkpoints).
    ``variant`` picks a diffusers weight variant ("fp16", "bf16"); by default the one matching ``dtype``, else
    the full-precision one. ``config`` replaces inference entirely; ``overrides`` set single config fields
    (e.g. ``cross_heads=``). ``int8``: the blocks' large products run in int8 on the CPU (``twig_core.int8``;
    the weights stay as loaded, computing in fp32 elsewhere).
    """
    src = open_transformer(path, dtype, device, compute_dtype=compute_dtype, pos_embed=pos_embed, variant=variant,
                           config=config, **overrides)
    model = src.model
    assign(model, src.tensors, src.names(), src.dtype, device, src.label)
    if int8:
        from . import int8 as int8_products

        int8_products.require_cpu_fp32(src.label, device, model.dtype)
        int8_products.enable(model)
    return model.eval()


def read_transformer_config(path, dtype=None, device="cpu", *, pos_embed: bool | None = None,
                            variant: str | None = None, config: TransformerConfig | None = None, **overrides):
    """The config :func:`load_transformer` would build for the same arguments (checked against the tensor
    shapes), read from the file's header and shapes without reading the weights."""
    return _open_transformer(path, variant, resolve_dtype(dtype, device), pos_embed, config, overrides)[1]


def _open_transformer(path, variant, dtype, pos_embed, config, overrides):
    """(source, config, every tensor's meta under our names less NVlabs' unused ones, diffusers names?)."""
    src = open_source(path, "transformer", variant, dtype)
    label = src.label
    diffusers_names = keymap.is_diffusers_transformer(src.weights.keys())
    metas = src.weights.meta_dict()
    ours_meta = keymap.rename(metas, keymap.TRANSFORMER_KEYS, "to_ours") if diffusers_names else metas
    guess = False  # config inferred from tensor shapes: head counts are not among them
    with named_errors(label):
        if config is None:
            if src.config is not None:
                config = TransformerConfig.from_diffusers_config(src.config, label)
                if pos_embed is not None:
                    config = config.replace(pos_embed=bool(pos_embed))
                if overrides:
                    config = config.replace(**overrides)
            else:
                config = TransformerConfig.from_state_dict(ours_meta, pos_embed=pos_embed, **overrides)
                guess = True
    if guess:
        config = _heads_beside(path, config, overrides)
    _check_fits(config, ours_meta, label)
    for name in keymap.NVLABS_UNUSED:
        ours_meta.pop(name, None)
    return src, config, ours_meta, diffusers_names


def _check_fits(config: TransformerConfig, meta: dict, label: str) -> None:
    """Refuse a config (config.json or overrides) that contradicts the weights before a model is built from it:
    a garbled depth or width would otherwise build a model of any size."""
    for field in ("heads", "cross_heads"):
        n = getattr(config, field)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1 or config.width % n:
            raise TwigError(f"{label}: {field}={n!r} does not divide the model width {config.width}")
    has = {"depth": len({k.split(".")[1] for k in meta if k.startswith("blocks.")})}
    if "x_embedder.proj.weight" in meta:
        has["width"] = meta["x_embedder.proj.weight"].shape[0]
    for field, n in has.items():
        if getattr(config, field) != n:
            raise TwigError(f"{label}: the config says {field} {getattr(config, field)!r}, the weights have {n}")


def _heads_beside(path, config: TransformerConfig, overrides: dict) -> TransformerConfig:
    """Head counts are not stored in NVlabs weights: take them from a ``config.json`` beside the file (diffusers
    keys, see ``heads_from_config``) unless given as ``overrides``; warn, naming the file, when a width that is
    no published Sana size leaves them guessed (32-dim linear heads, ``cross_heads_for_width``)."""
    path = os.fspath(path)
    cfg_path = os.path.join(os.path.dirname(path) if os.path.isfile(path) else path, "config.json")
    stated = {}
    if os.path.isfile(cfg_path):
        cfg = read_json(cfg_path)
        if config_kind(cfg) in (None, "transformer"):  # not a VAE's or Gemma's config sharing the folder
            stated = heads_from_config(cfg, config.width, cfg_path)
    stated = {k: v for k, v in stated.items() if k not in overrides}
    guessed = [k for k in ("heads", "cross_heads") if k not in stated and k not in overrides]
    if guessed and config.width not in CROSS_HEADS_BY_WIDTH:
        warnings.warn(f"{path}: width {config.width} is not a published Sana size and the file does not store its "
                      f"attention heads; guessed {config.heads} linear heads and {config.cross_heads} cross heads. "
                      "If the output looks wrong, put a config.json beside it (num_attention_heads, "
                      "num_cross_attention_heads) or pass heads= / cross_heads=", stacklevel=4)
    return config.replace(**stated) if stated else config


def _describe(cfg: TransformerConfig) -> str:
    extra = []
    if cfg.qk_norm:
        extra.append("qk-norm")
    if cfg.pos_embed:
        extra.append(f"pos-embed {cfg.sample_size}x{cfg.sample_size}")
    return f"(width {cfg.width}, depth {cfg.depth}, {cfg.heads} heads, {cfg.cross_heads} cross heads" + \
        "".join(", " + e for e in extra) + ")"


# --------------------------------------------------------------------------------------------------
# DC-AE


def _open_vae(path, variant, dtype):
    """A DC-AE source: (source, original MIT layout?, every tensor's meta under our names)."""
    src = open_source(path, "vae", variant, dtype)
    original = keymap.is_dcae_original(src.weights.keys())
    metas = src.weights.meta_dict()
    return src, original, keymap.rename(metas, keymap.DCAE_ORIGINAL_KEYS, "to_ours") if original else metas


def _fill_vae(model, weights: Weights, original: bool, parts, dtype, device, label: str):
    """Read the named halves of a meta-device DC-AE ("encoder", "decoder") from a checked source."""
    for i, part in enumerate(parts):
        names = [n for n in model.state_dict() if n.startswith(part + ".")]
        tensors = weights
        if original:  # rename only this half's keys
            tensors = keymap.rename(PrefixedWeights(weights, part + ".", strip=False), keymap.DCAE_ORIGINAL_KEYS,
                                   "to_ours")
        assign(model, tensors, names, dtype, device, label, pop=original, check=i == len(parts) - 1)


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
    check_keys(model, ours_meta, src.label, "DC-AE")
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
    try:
        with named_errors(label):
            if config is None:
                if src.config is not None:
                    config = DCAEConfig.from_diffusers_config(src.config)
                    if overrides:
                        config = config.replace(**overrides)
                else:
                    config = DCAEConfig.from_state_dict(ours_meta, **overrides)
        # a garbled layer count would build a model of any size: each layer holds at least one tensor
        layers = sum(config.encoder_layers_per_block) + sum(config.decoder_layers_per_block)
        if layers > len(ours_meta):
            raise TwigError(f"{label}: the config asks for {layers} layers; the weights hold {len(ours_meta)} tensors")
        with torch.device("meta"):
            model = DCAE(config, compute_dtype=compute_dtype)
    except TwigError:
        raise
    except (KeyError, TypeError, ValueError, OverflowError, AttributeError, ZeroDivisionError, IndexError,
            RuntimeError) as e:  # a garbled config.json or override
        raise TwigError(f"{label}: config.json lacks or garbles {type(e).__name__}: {e}") from None
    check_keys(model, ours_meta, label, "DC-AE")
    dtype = dtype or dominant_dtype(ours_meta)
    parts = ("encoder", "decoder")
    if lazy_encoder:
        stamps = {f: _stamp(f) for f in _files_of(src.weights)}
        model.defer_encoder(functools.partial(_read_deferred_encoder, os.fspath(path), variant, requested, stamps))
        parts = ("decoder",)
    _fill_vae(model, src.weights, original, parts, dtype, device, label)
    return model.eval()
