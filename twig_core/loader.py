"""Load every published Twig / Sana checkpoint layout, safely, with the config read from the weights: the public
entry that the command line, the ComfyUI nodes and the WebUI tab use.

``detect`` says which network a file or folder holds; ``load_transformer``, ``load_vae`` and
``load_text_encoder`` load one network, ``load_parts``/``load_pipeline`` all three. Behind it:

- ``twig_core.weights``: the file readers (safetensors, or ``torch.load(weights_only=True)``; never a pickle
  that builds objects);
- ``twig_core.layout``: diffusers folders, shards and variants, and which network a key set holds;
- ``twig_core.keymap``: the key tables between every layout and our names;
- ``twig_core.assign``: filling a meta-device model from checked weights;
- ``twig_core.networks`` (transformer, DC-AE), ``twig_core.gemma`` (Gemma-2) and ``twig_core.tokenizer``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .devices import WEIGHT_DTYPE_CHOICES, resolve_dtype, weight_dtype_kwargs  # noqa: F401  (re-exported)
from .devices import Deferred, Residency, wants_offload
from .devices import text_dtype as _text_dtype
from .errors import TwigError
from .gemma import gemma2_config_from_shapes, load_text_encoder
from .layout import KIND_NAMES, classify, component_folder, detect, open_source, pick_weight_set
from .networks import load_transformer, load_vae, read_transformer_config
from .tokenizer import load_tokenizer, tokenizer_from_spiece
from .weights import PrefixedWeights, SafetensorsFile, TorchFile, UnionWeights, Weights, open_weights

__all__ = [
    "detect",
    "classify",
    "load_transformer",
    "load_vae",
    "load_text_encoder",
    "load_tokenizer",
    "load_pipeline",
    "load_parts",
    "Parts",
    "resolve_dtype",
    "weight_dtype_kwargs",
    "WEIGHT_DTYPE_CHOICES",
    "open_weights",
    "Weights",
    "SafetensorsFile",
    "TorchFile",
    "UnionWeights",
    "PrefixedWeights",
    "gemma2_config_from_shapes",
    "tokenizer_from_spiece",
]


@dataclass
class Parts:
    """The three networks of a text-to-image run, and where they run (``residency.use(network)`` before each
    use puts it on the device, or loads it when it is a ``devices.Deferred``; see devices.Residency)."""

    transformer: Any
    text_encoder: Any
    vae: Any
    residency: Residency = field(default_factory=Residency)


def load_parts(transformer, text_encoder=None, vae=None, dtype=None, device="cpu", weight_dtype=None,
               offload=False, lazy=False) -> Parts:
    """Load the three networks. ``transformer`` may be a pipeline folder (or an all-in-one file), in which
    case a missing ``text_encoder``/``vae`` is taken from it. ``dtype`` is resolved per network for ``device``
    ("auto": see devices.resolve_dtype). ``weight_dtype`` keeps the transformer's and the VAE's weights in
    that dtype ("stored": as in the file) while they compute in ``dtype``. ``offload`` (devices.wants_offload:
    "auto", "on", "off"): the networks load into CPU memory and each goes to ``device`` only while it runs.

    ``lazy``: nothing is loaded now; each part is a ``devices.Deferred`` (the transformer's with its config)
    that ``parts.residency.use`` loads onto ``device`` when its stage comes and drops when the next one does,
    so a one-shot run holds one network at a time (``offload`` is then moot). Each path is checked now, so a
    wrong file fails before the first network loads."""
    if transformer is None:
        raise TwigError("no transformer given (a checkpoint file, a diffusers folder or a pipeline folder)")
    residency = Residency(device, wants_offload(offload, device) and not lazy)
    dtypes = {role: resolve_dtype(dtype, device, role) for role in ("diffusion", "vae", "text")}
    kind = detect(transformer)
    if kind not in ("pipeline", "transformer"):
        # checked before the missing parts: a VAE given as the transformer is not "a transformer without a VAE"
        raise TwigError(f"{transformer}: this is a {KIND_NAMES[kind]}, not a Sana/Twig transformer; give it as the "
                        f"{'VAE' if kind == 'vae' else 'text encoder'}, and as the transformer a Sana checkpoint "
                        "file, a diffusers transformer folder or a pipeline folder")
    if kind == "transformer" and os.path.isdir(transformer):
        pick_weight_set(component_folder(os.fspath(transformer), kind), None, None)  # a config.json and no weights
    whole = kind == "pipeline"
    text_encoder = text_encoder if text_encoder is not None else (transformer if whole else None)
    vae = vae if vae is not None else (transformer if whole else None)
    if text_encoder is None:
        raise TwigError(f"{transformer}: holds no text encoder; give a Gemma-2 folder or file")
    if vae is None:
        raise TwigError(f"{transformer}: holds no VAE; give a DC-AE file or folder")
    home = "cpu" if residency.offload else device
    transformer_kw = weight_dtype_kwargs(weight_dtype, dtypes["diffusion"], device)
    vae_kw = weight_dtype_kwargs(weight_dtype, dtypes["vae"], device, "vae")

    def transformer_():
        return load_transformer(transformer, device=home, **transformer_kw)

    text = _text_dtype(dtypes["text"], device)

    def text_encoder_(width):
        return load_text_encoder(text_encoder, dtype=text, device=home, expected_width=width)

    def vae_():
        return load_vae(vae, device=home, **vae_kw)

    if not lazy:
        model = transformer_()
        return Parts(model, text_encoder_(model.config.caption_channels), vae_(), residency)
    config = read_transformer_config(transformer, device=device, dtype=transformer_kw["dtype"])
    transformer_kw["config"] = config  # read once: the load builds this config without inferring it again
    open_source(text_encoder, "text_encoder")  # the right kind of file, headers only
    open_source(vae, "vae", dtype=vae_kw["dtype"])
    return Parts(Deferred("transformer", transformer_, config),
                 Deferred("text encoder", lambda: text_encoder_(config.caption_channels)),
                 Deferred("VAE", vae_), residency)


def load_pipeline(path, dtype=None, device="cpu", offload=False) -> Parts:
    """A whole diffusers pipeline folder (or all-in-one file) as one thing."""
    if detect(path) != "pipeline":
        raise TwigError(f"{path}: not a pipeline folder (no model_index.json or transformer/ + vae/ subfolders)")
    return load_parts(path, dtype=dtype, device=device, offload=offload)
