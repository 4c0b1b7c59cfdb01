"""The Gemma-2 text encoder from files: its config inferred from tensor shapes, the model built on the meta
device and filled from the weights, with its tokenizer.

Understood: Hugging Face folders (read tensor by tensor like every other source, never through transformers' own
loader, which holds a file's tensors beside the converted model), diffusers pipeline folders (``text_encoder/`` +
``tokenizer/``), single files as ComfyUI ships them
(weights, optionally prefixed, plus a ``spiece_model`` uint8 tensor holding the sentencepiece model), and
llama.cpp Gemma-2 GGUF files (hyper-parameters and tokenizer from their metadata, see ``twig_core.gguf_io``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .assign import assign, check_keys, dominant_dtype, named_errors
from .devices import resolve_dtype
from .errors import TwigError
from .layout import (component_folder, config_kind, network_weights, open_set, pick_weight_set, read_json,
                     wrong_config)
from .tokenizer import file_tokenizer, read_tokenizer, tokenizer_dir
from .weights import Weights, open_weights, shortlist

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
        raise TwigError(f"{label}: Gemma-2 layers are not numbered 0..N-1 ({shortlist(layers)})")
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


def _gemma2_from_weights(src: GemmaSource, dtype, device):
    """Build Gemma2Model on the meta device and assign its weights; non-persistent buffers (RoPE
    frequencies, embedding scale) come from a one-layer twin built for real."""
    weights, config, label = src.weights, src.config, src.label
    model, metas = src.meta_model()
    dtype = dtype or dominant_dtype(metas)
    assign(model, weights, list(model.state_dict().keys()), dtype, device, label, check=False)
    small = {**config.to_dict(), "num_hidden_layers": 1, "vocab_size": 8, "intermediate_size": 8}
    if small.get("layer_types"):
        small["layer_types"] = small["layer_types"][:1]
    twin_cfg = type(config).from_dict(small)
    twin_cfg._attn_implementation = config._attn_implementation
    with torch.device("cpu"):
        twin = type(model)(twin_cfg)
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


@dataclass
class GemmaSource:
    """Gemma-2 found at a path, nothing built: its weights under ``Gemma2Model``'s names (``names``, read one at
    a time from ``weights``), config, tokenizer and the folder's prompt settings."""

    label: str
    weights: Weights
    config: Any = None
    tokenizer: Any = None
    settings: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        # lm_head is tied to embed_tokens; spiece_model is the tokenizer riding along in ComfyUI files
        return [k for k in self.weights if k != "lm_head.weight" and k.rsplit(".", 1)[-1] != "spiece_model"]

    def meta_model(self):
        """(Gemma2Model on the meta device, name -> meta tensor of the weights), every name and shape checked
        against the model first (TwigError naming the file)."""
        from transformers import Gemma2Model

        metas = {k: self.weights.meta(k) for k in self.names}
        with torch.device("meta"):
            model = Gemma2Model(self.config)
        check_keys(model, metas, self.label, "Gemma-2")
        return model, metas


def open_text_encoder(path, tokenizer_path=None, *, expected_width: int | None = None, variant: str | None = None,
                      dtype=None) -> GemmaSource:
    """Gemma-2 at ``path`` (see :func:`load_text_encoder`) as a :class:`GemmaSource`, its weights not read."""
    from .text import folder_settings

    path = os.fspath(path)
    if not os.path.exists(path):
        raise TwigError(f"not found: {path}")
    if os.path.isdir(path):
        folder = component_folder(path, "text_encoder")
        cfg_path = os.path.join(folder, "config.json")
        tok_dir = tokenizer_path if tokenizer_path is not None else tokenizer_dir(path, folder)
        if not os.path.isfile(cfg_path):
            raise TwigError(f"{folder}: no config.json; a Gemma-2 folder needs one (or pick the single file)")
        cfg = read_json(cfg_path)
        if config_kind(cfg) != "text_encoder":
            raise wrong_config(folder, cfg, "Gemma-2 (Sana uses Gemma-2-2B)")
        if cfg.get("model_type", "gemma2") != "gemma2":
            raise TwigError(f"{cfg_path}: model_type is {cfg['model_type']!r}, expected 'gemma2' (Sana uses "
                            "Gemma-2-2B-it)")
        _check_width(cfg.get("hidden_size"), expected_width, folder)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        config._attn_implementation = "eager"
        weights = network_weights(open_set(pick_weight_set(folder, variant, dtype)), "text_encoder")
        tokenizer = read_tokenizer(tok_dir if tok_dir is not None else folder)
        return GemmaSource(weights.label, weights, config, tokenizer, folder_settings(folder))
    base = open_weights(path)
    weights = network_weights(base, "text_encoder")
    with named_errors(base.label):
        config = gemma2_config_from_shapes(weights.meta_dict(), base.label)
    _gguf_hyperparameters(base, config)
    _check_width(config.hidden_size, expected_width, base.label)
    tokenizer = read_tokenizer(tokenizer_path) if tokenizer_path is not None else file_tokenizer(base)
    return GemmaSource(base.label, weights, config, tokenizer)


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
    tokenizer.json or tokenizer.model) overrides the tokenizer found with the weights. ``dtype`` None: "auto"
    for the text encoder (bf16 where the device computes it natively, else fp32: Gemma-2 overflows in fp16).
    ``expected_width``: the transformer's caption width; a different hidden size is a TwigError. Other keyword
    arguments go to ``TextEncoder``.
    """
    from .text import TextEncoder

    device = torch.device(device)
    dtype = resolve_dtype("auto" if dtype is None else dtype, device, role="text")
    src = open_text_encoder(path, tokenizer_path, expected_width=expected_width, variant=variant, dtype=dtype)
    model = _gemma2_from_weights(src, dtype, device)
    encoder = TextEncoder(model, src.tokenizer, **{**src.settings, **kwargs})
    _check_width(encoder.hidden_size, expected_width, os.fspath(path))
    return encoder


# llama.cpp's Gemma-2 GGUF metadata (under "gemma2.") -> Gemma2Config fields
_GGUF_HPARAMS = (("attention.head_count", "num_attention_heads"), ("attention.head_count_kv", "num_key_value_heads"),
                 ("attention.key_length", "head_dim"), ("attention.layer_norm_rms_epsilon", "rms_norm_eps"),
                 ("attention.sliding_window", "sliding_window"), ("attn_logit_softcapping", "attn_logit_softcapping"),
                 ("final_logit_softcapping", "final_logit_softcapping"), ("context_length", "max_position_embeddings"))


def _gguf_hyperparameters(weights, config) -> None:
    """What a llama.cpp Gemma-2 GGUF states about the model replaces what the shapes suggested."""
    field = getattr(weights, "field", None)
    if field is None:
        return
    for key, attr in _GGUF_HPARAMS:
        value = field(f"gemma2.{key}")
        if value is not None:
            setattr(config, attr, value)
    config.query_pre_attn_scalar = config.head_dim


def _check_width(hidden, expected: int | None, label: str):
    """Checked before the weights are read, so a wrong Gemma costs no time."""
    if expected is not None and hidden is not None and int(hidden) != int(expected):
        raise TwigError(
            f"{label}: text encoder width {hidden} does not match the transformer's caption width "
            f"{expected} (Sana/Twig use Gemma-2-2B, width 2304)"
        )
