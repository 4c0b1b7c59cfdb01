"""The converter behind ``python -m twig_core convert IN OUT --type ...``: any transformer or Gemma-2 the loader
reads (NVlabs .pth, diffusers folders, single files, GGUF, fp8) into a GGUF file or an fp8 safetensors file.
Nothing is built: the source is found and every name and shape checked against the architecture its config
implies (``networks.open_transformer``, ``gemma.open_text_encoder``: a wrong or partial file gets the loader's
error before anything is written), then each tensor is read from the source files, encoded and written before
the next (GGUF: ``gguf_io.write_gguf``; fp8: ``weights.write_safetensors``). The transformer's weights are what
the loaded model would hold (stored dtype, unified to the dominant one; quantized sources widened as their layers
widen them, ``assign.widened``).

GGUF (``q8_0``, ``q6_k``, ``q5_k_m``, ``q5_0``, ``q4_k_m``, ``q4_0``, ``f16``, ``bf16``): BF16, Q8_0, Q5_0 and Q4_0
blocks come from the ``gguf`` package's quantizer; it has none for K-quants, so Q4_K/Q5_K/Q6_K blocks come from
``twig_core.quant.quantize_k`` (each sub-block's scale and min fitted by least squares; llama.cpp's
``llama-quantize`` searches more and is a little more accurate). The ``_m`` mixes follow llama.cpp's idea: Q4_K (Q5_K) everywhere, Q6_K for the tensors
that matter most (``MORE_BITS``: Gemma's attn_v, ffn_down and token embedding; the transformer's Mix-FFN
output convolution). What stays wide, as the GGUF community does for DiTs (``gguf_io.pick_type``): every
1-D tensor (norms, biases) and every tensor of at most 1024 values in F32, the transformer's modulation tables
(``scale_shift_table``) in F32, rows a block does not divide (the 3x3 depthwise convolutions) in F16.
1x1 convolution weights are stored as matrices with their 4-D shape in ``comfy.gguf.orig_shape.<name>``;
for K-quants, a matrix whose rows 256 does not divide (Sana's width 2240, Mix-FFN 5600) is stored as rows of
256 with its shape there too (ComfyUI-GGUF's convention; the loader widens whole layers, so rows may straddle).
Metadata: ``general.architecture`` "sana" plus ``twig.diffusers_config`` (the transformer's config as JSON),
or "gemma2" with llama.cpp's names, hyper-parameters and tokenizer (``tokenizer.ggml.*``: pieces, scores
ranked like the BPE merges, types), so the file needs nothing beside it.

fp8 (``fp8``): matrices and 1x1 convolutions in float8_e4m3fn with one scale per output row
(``X.scale_weight``, ComfyUI's ``scaled_fp8`` layout, with the ``scaled_fp8`` marker); everything else in fp32.
Gemma-2 goes out as ComfyUI's single text-encoder files do: ``model.``-prefixed names and the tokenizer as a
``spiece_model`` tensor (a sentencepiece model built from the same pieces and scores as the GGUF metadata).
"""

from __future__ import annotations

import functools
import json
import math
import os

import torch

from . import keymap
from .errors import TwigError
from .gguf_io import ARCHITECTURES, CONFIG_KEY, pick_type, write_gguf
from .quant import QTensor
from .tokenizer import spiece_from_pieces
from .weights import write_safetensors

TYPES = {"q8_0": "Q8_0", "q6_k": "Q6_K", "q5_k_m": "Q5_K", "q5_0": "Q5_0", "q4_k_m": "Q4_K", "q4_0": "Q4_0",
         "f16": "F16", "bf16": "BF16", "fp8": "fp8"}
K_TYPES = ("Q4_K", "Q5_K", "Q6_K")
MORE_BITS = ("attn_v.", "ffn_down.", "token_embd.", "mlp.point_conv.")  # Q6_K in the _k_m mixes
WIDE = {"transformer": ("scale_shift_table",), "text_encoder": ()}
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value


def _widened(t):
    """A read weight as a plain tensor (a QTensor or fp8 weight widened to fp32)."""
    return t.dequantize() if isinstance(t, QTensor) else t


def _gguf_plan(shapes: dict, read, qtype: str, wide, orig_shapes: dict) -> list:
    """(name, stored shape, GGML type, read) per tensor for ``gguf_io.write_gguf``, from shapes alone (nothing is
    read here; ``read(name)`` is called when the writer reaches the tensor)."""
    plan = []
    for name, shape in shapes.items():
        shape = stored = tuple(int(d) for d in shape)
        if len(shape) == 4 and shape[2:] == (1, 1):  # a 1x1 convolution: a matrix, its shape in the metadata
            orig_shapes[name] = shape
            stored = shape[:2]
        mixed = qtype in ("Q4_K", "Q5_K") and any(part in name for part in MORE_BITS)
        want = "Q6_K" if mixed else qtype
        n = math.prod(stored)
        if want in K_TYPES and len(stored) == 2 and stored[-1] % 256 and n % 256 == 0:
            # rows a K-quant block does not divide (Sana's 2240, 5600): rows of 256, the shape in the metadata
            orig_shapes[name] = shape
            stored = (n // 256, 256)
        plan.append((name, stored, pick_type(name, stored, want, wide), functools.partial(read, name)))
    return plan


def _gemma_metadata(cfg, tokenizer) -> dict:
    arch = ARCHITECTURES["text_encoder"]
    meta = {
        f"{arch}.context_length": int(cfg.max_position_embeddings),
        f"{arch}.embedding_length": int(cfg.hidden_size),
        f"{arch}.block_count": int(cfg.num_hidden_layers),
        f"{arch}.feed_forward_length": int(cfg.intermediate_size),
        f"{arch}.attention.head_count": int(cfg.num_attention_heads),
        f"{arch}.attention.head_count_kv": int(cfg.num_key_value_heads),
        f"{arch}.attention.key_length": int(cfg.head_dim),
        f"{arch}.attention.value_length": int(cfg.head_dim),
        f"{arch}.attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
        f"{arch}.attention.sliding_window": int(cfg.sliding_window or 0),
        f"{arch}.attn_logit_softcapping": float(cfg.attn_logit_softcapping or 0.0),
        f"{arch}.final_logit_softcapping": float(cfg.final_logit_softcapping or 0.0),
    }
    meta.update(tokenizer_metadata(tokenizer, cfg.vocab_size))
    return meta


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
    """llama.cpp's ``tokenizer.ggml.*`` keys for a Gemma-style BPE fast tokenizer: pieces by id, types
    (control for special tokens, byte for <0xNN>, unknown for the unk token), scores minus the rank of the
    merge that makes each piece (what sentencepiece BPE stores, and what ``tokenizer_from_pieces`` ranks by)."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    merges = backend["model"].get("merges") or []
    pieces = [f"[PAD{i}]" for i in range(vocab_size)]
    for piece, i in tokenizer.get_vocab().items():
        if i < vocab_size:
            pieces[i] = piece
    rank = {}
    for r, m in enumerate(merges):
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        rank.setdefault(a + b, r)
    special = set(tokenizer.all_special_ids) | {t["id"] for t in backend.get("added_tokens", []) if t.get("special")}
    unk = tokenizer.unk_token_id
    types, scores = [], []
    for i, p in enumerate(pieces):
        byte = len(p) == 6 and p.startswith("<0x") and p.endswith(">")
        types.append(2 if i == unk else 3 if i in special or p.startswith("[PAD") else 6 if byte else 1)
        scores.append(-float(rank[p]) if p in rank else (0.0 if len(p) == 1 else -1e9))
    out = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": pieces, "tokenizer.ggml.scores": scores,
           "tokenizer.ggml.token_type": types, "tokenizer.ggml.add_space_prefix": False,
           "tokenizer.ggml.add_bos_token": True}
    for key, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                     ("padding", tokenizer.pad_token_id), ("unknown", unk)):
        if tid is not None:
            out[f"tokenizer.ggml.{key}_token_id"] = int(tid)
    return out


def convert(src, out, type_name: str) -> str:
    """Convert the transformer or Gemma-2 at ``src`` into ``out``; returns a one-line summary."""
    from .gemma import open_text_encoder
    from .layout import detect
    from .networks import open_transformer

    if type_name not in TYPES:
        raise TwigError(f"--type {type_name!r}: use one of {', '.join(TYPES)}")
    qtype = TYPES[type_name]
    src, out = os.fspath(src), os.fspath(out)
    kind = detect(src)
    if kind == "pipeline":
        raise TwigError(f"{src}: a whole pipeline; convert its transformer/ or text_encoder/ folder")
    if kind not in WIDE:
        raise TwigError(f"{src}: a DC-AE; only the transformer and Gemma-2 are converted (the VAE is small)")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    # nothing built: every name and shape checked first, then each tensor read, encoded and written before the next
    if kind == "transformer":  # weights as the loaded model holds them (stored dtype; quantized ones widened)
        t = open_transformer(src)
        meta = {CONFIG_KEY: json.dumps(t.config.to_diffusers_config())}
        shapes = {n: tuple(v.shape) for n, v in t.model.state_dict().items()}
        read = t.read
        if qtype == "fp8":
            return _write_fp8(shapes, read, out, meta)
    else:
        g = open_text_encoder(src)
        g.meta_model()  # a file that is not a whole Gemma-2 is refused before anything is written
        if qtype == "fp8":  # ComfyUI's single-file layout: "model." names and the tokenizer as spiece_model
            pieces = _pieces(tokenizer_metadata(g.tokenizer, g.config.vocab_size))
            spiece = torch.frombuffer(bytearray(spiece_from_pieces(pieces)), dtype=torch.uint8)
            shapes = {"model." + n: tuple(g.weights.meta(n).shape) for n in g.names}
            return _write_fp8(shapes, lambda name: _widened(g.weights[name[len("model."):]]), out, {},
                              {"spiece_model": spiece})
        meta = _gemma_metadata(g.config, g.tokenizer)
        names = keymap.rename_keys(g.names, keymap.GEMMA_GGUF_KEYS, "from_ours")
        shapes = {new: g.weights.meta(old).shape for new, old in names.items()}

        def read(name):
            old = names[name]
            t = _widened(g.weights[old])
            return t.float() + keymap.GEMMA_GGUF_NORM_OFFSET if old.endswith("norm.weight") else t
    orig_shapes: dict = {}
    plan = _gguf_plan(shapes, read, qtype, WIDE[kind], orig_shapes)
    write_gguf(out, ARCHITECTURES[kind], plan, meta, orig_shapes)
    return f"{out}: {kind} as GGUF {qtype} ({os.path.getsize(out) / 2**20:.1f} MiB)"


def _pieces(meta: dict) -> list[tuple[str, float, int]]:
    return list(zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"], meta["tokenizer.ggml.token_type"]))


def _write_fp8(shapes: dict, read, out: str, metadata: dict, extra: dict | None = None) -> str:
    """fp8 safetensors from ``shapes`` (name -> shape of a float weight) and ``read(name)``, written one tensor at
    a time (``weights.write_safetensors``): whether a weight goes fp8 with a per-row scale follows from its name
    and shape alone. A scale is written before its weight (safetensors' order), so such a weight is read twice,
    its scale kept meanwhile. ``extra``: tensors written as they are (Gemma's ``spiece_model``)."""
    fp8 = getattr(torch, "float8_e4m3fn", None)
    if fp8 is None:
        raise TwigError("this torch has no float8_e4m3fn (torch >= 2.1 needed for fp8)")
    scales: dict[str, torch.Tensor] = {}

    def wide(name):
        return read(name).detach().float().cpu()

    def scale(name):
        shape = shapes[name]
        if name not in scales:
            lo, hi = torch.aminmax(wide(name).reshape(shape[0], -1), dim=1)  # the largest |w| per row, no |w| copy
            scales[name] = torch.maximum(hi, -lo).clamp_min(1e-12) / FP8_MAX
        return scales[name]

    def narrow(name):
        t, s = wide(name), scale(name)
        del scales[name]
        return (t / s.reshape(-1, *[1] * (t.dim() - 1))).to(fp8)

    entries = []
    for name, shape in shapes.items():
        shape = tuple(int(d) for d in shape)
        if name.endswith(".weight") and len(shape) in (2, 4) and shape[2:] in ((), (1, 1)) \
                and not any(w in name for w in WIDE["transformer"]) and math.prod(shape) > 1024:
            entries.append((name, fp8, shape, functools.partial(narrow, name)))
            entries.append((name[: -len("weight")] + "scale_weight", torch.float32, shape[:1],
                            functools.partial(scale, name)))
        else:
            entries.append((name, torch.float32, shape, lambda name=name: wide(name).contiguous()))
    for name, t in (extra or {}).items():
        entries.append((name, t.dtype, tuple(t.shape), lambda t=t: t.contiguous()))
    entries.append(("scaled_fp8", fp8, (0,), lambda: torch.zeros(0, dtype=fp8)))
    tmp = out + ".part"
    write_safetensors(tmp, entries, metadata)
    os.replace(tmp, out)
    return f"{out}: fp8 e4m3fn with per-row scales ({os.path.getsize(out) / 2**20:.1f} MiB)"
