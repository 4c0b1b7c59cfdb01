"""Gemma tokenizers from files: a tokenizer folder, a tokenizer.json, or a sentencepiece model (a
tokenizer.model, or the ``spiece_model`` uint8 tensor that ComfyUI's single-file text encoders carry).

:func:`load_tokenizer` finds the tokenizer that goes with a text encoder the way
``twig_core.loader.load_text_encoder`` does, without reading the model's weights.

A sentencepiece model becomes a ``transformers`` fast tokenizer here, read with a small protobuf reader and
built with ``tokenizers``, so neither ``sentencepiece`` nor ``protobuf`` is needed. transformers' own converter
needs both (ComfyUI installs no ``protobuf``; protobuf 4.25 cannot load the schema sentencepiece 0.2.3 ships),
and transformers 5 reads a tokenizer.model by other means than 4.x. This one gives sentencepiece's ids on
every version (tests/test_loader.py compares).
"""

from __future__ import annotations

import os
import struct

from .errors import TwigError
from .layout import component_folder, is_pipeline_dir
from .weights import Weights, open_weights

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


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


def _put_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _put(num: int, value) -> bytes:
    """One protobuf field: bytes (length-delimited), float (32-bit) or int (varint)."""
    if isinstance(value, bytes):
        return _put_varint(num << 3 | 2) + _put_varint(len(value)) + value
    if isinstance(value, float):
        return _put_varint(num << 3 | 5) + struct.pack("<f", value)
    return _put_varint(num << 3) + _put_varint(int(value))


def spiece_from_pieces(pieces: list[tuple[str, float, int]], byte_fallback: bool = True,
                       dummy_prefix: bool = False) -> bytes:
    """A sentencepiece BPE model (the bytes ``tokenizer_from_spiece`` reads, as ComfyUI's ``spiece_model``
    tensors hold) from (piece, score, type) per id."""
    out = b"".join(_put(1, _put(1, p.encode("utf-8")) + _put(2, float(sc)) + _put(3, t)) for p, sc, t in pieces)
    out += _put(2, _put(3, 2) + _put(35, int(byte_fallback)))
    return out + _put(3, _put(1, b"identity") + _put(3, int(dummy_prefix)) + _put(4, 0))


def tokenizer_from_spiece(data: bytes, label: str = "sentencepiece model"):
    """A transformers fast tokenizer equivalent to a Gemma sentencepiece BPE model given as bytes.

    The vocabulary and piece scores are read from the model; BPE merges are derived from them (every split
    of a piece into two pieces, ranked by the merged piece's score); spaces become "▁", unknown bytes fall
    back to <0xNN> pieces, user-defined pieces are kept whole, and <bos> is prepended.
    """
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
    return tokenizer_from_pieces(pieces, bool(trainer.get(35, 0)), bool(norm.get(3, 1)))


def tokenizer_from_pieces(pieces: list[tuple[str, float, int]], byte_fallback: bool, dummy_prefix: bool):
    """The fast tokenizer of a sentencepiece BPE vocabulary given as (piece, score, type) per id (types as in
    sentencepiece: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte), as a sentencepiece model
    or a GGUF file's ``tokenizer.ggml.*`` metadata lists them."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

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
                               byte_fallback=byte_fallback))
    steps = [normalizers.Prepend("▁")] if dummy_prefix else []
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


def has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, n)) for n in TOKENIZER_FILES)


def read_tokenizer(path):
    """The tokenizer in a tokenizer folder (or a pipeline folder's ``tokenizer/``), a tokenizer.json or a
    sentencepiece tokenizer.model."""
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if os.path.isdir(path):
        sub = os.path.join(path, "tokenizer")
        if is_pipeline_dir(path) and os.path.isdir(sub):
            path = sub
        model_file = os.path.join(path, "tokenizer.model")
        # a tokenizer_config.json alone is no tokenizer (transformers would build one with an empty vocabulary)
        if not any(os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.json", "tokenizer.model")):
            raise TwigError(f"{path}: no tokenizer.json or tokenizer.model in this folder")
        if any(os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.json", "tokenizer_config.json")):
            try:
                return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
            except Exception as e:
                if not os.path.isfile(model_file):
                    raise TwigError(f"{path}: cannot load the tokenizer: {e}") from None
        path = model_file
    if path.endswith(".json"):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_file=path, bos_token="<bos>", eos_token="<eos>",
                                       pad_token="<pad>", unk_token="<unk>")
    with open(path, "rb") as f:
        return tokenizer_from_spiece(f.read(), path)


def tokenizer_dir(path: str, folder: str) -> str | None:
    """Where the tokenizer of the text encoder folder ``folder`` (picked as ``path``: itself or the pipeline
    folder holding it) lives when not in ``folder`` itself: the pipeline's ``tokenizer/``, or the one beside a
    pipeline's ``text_encoder/`` picked on its own. None: in ``folder``."""
    if folder != path and os.path.isdir(os.path.join(path, "tokenizer")):
        return os.path.join(path, "tokenizer")
    sibling = os.path.join(os.path.dirname(os.path.abspath(folder)), "tokenizer")
    if not has_tokenizer(folder) and os.path.isdir(sibling):
        return sibling
    return None


def file_tokenizer(weights: Weights):
    """The tokenizer of a single-file text encoder: a GGUF file's ``tokenizer.ggml.*`` metadata, its
    ``spiece_model`` tensor, else a tokenizer folder, tokenizer.json or tokenizer.model beside the file."""
    field = getattr(weights, "field", None)
    tokens = field("tokenizer.ggml.tokens") if field is not None else None
    if tokens:
        if field("tokenizer.ggml.model") not in ("llama", None):
            raise TwigError(f"{weights.label}: tokenizer model {field('tokenizer.ggml.model')!r} is not "
                            "sentencepiece BPE (Gemma's); pass a tokenizer folder")
        scores = field("tokenizer.ggml.scores") or [0.0] * len(tokens)
        types = field("tokenizer.ggml.token_type") or [1] * len(tokens)
        pieces = list(zip(tokens, (float(x) for x in scores), (int(x) for x in types)))
        return tokenizer_from_pieces(pieces, any(t == _SP_BYTE for _, _, t in pieces),
                                     bool(field("tokenizer.ggml.add_space_prefix", False)))
    spiece = [k for k in weights if k.split(".")[-1] == "spiece_model"]
    if spiece:
        return tokenizer_from_spiece(weights[spiece[0]].numpy().tobytes(), f"{weights.label} [{spiece[0]}]")
    near = [os.path.join(os.path.dirname(weights.label), n) for n in ("tokenizer", *TOKENIZER_FILES)]
    near = [n for n in near if os.path.exists(n)]
    if not near:
        raise TwigError(
            f"{weights.label}: no tokenizer: the file has no 'spiece_model' tensor; pass tokenizer_path "
            "(a Gemma-2 tokenizer folder, tokenizer.json or tokenizer.model)"
        )
    return read_tokenizer(near[0])


def load_tokenizer(path):
    """The tokenizer of the text encoder at ``path``, found as ``load_text_encoder`` finds it, without reading
    the model: a Gemma-2 folder or a pipeline folder (``tokenizer/`` inside or beside), a single weight file
    (``spiece_model`` tensor or a tokenizer beside it), or a tokenizer folder, tokenizer.json or
    tokenizer.model itself."""
    path = os.fspath(path)
    if os.path.isdir(path):
        folder = component_folder(path, "text_encoder")
        return read_tokenizer(tokenizer_dir(path, folder) or folder)
    if not os.path.isfile(path):
        raise TwigError(f"not found: {path}")
    if path.endswith((".json", ".model")):
        return read_tokenizer(path)
    return file_tokenizer(open_weights(path))
