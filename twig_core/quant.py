"""Reduced-precision weights kept as stored and widened one layer at a time: GGUF block quantization (Q8_0,
Q4_0/Q4_1, Q5_0/Q5_1, Q4_K, Q5_K, Q6_K dequantized here in torch; other GGML types through the ``gguf``
package) and fp8 (float8_e4m3fn / e5m2, optionally with a scale).

A :class:`QTensor` is a quantized weight as read from a file: the raw blocks (uint8, one row of blocks per
row of the stored matrix), the GGML type name and the logical shape. Loading attaches it to its layer with
:func:`attach`: a Linear, Conv2d or Embedding then keeps the blocks (buffer ``qweight``) instead of a float
``weight`` and exposes ``dequantized(dtype)``, which ``twig_core.ops.weights`` and the layer's own forward
use, so the widened copy exists for one layer at a time. Any other parameter (norm weights, modulation
tables) given quantized is widened once at load. fp8 weights need nothing of this: ``dense`` and the layers
already cast stored dtypes per call (a per-tensor scale is folded in at load, see ``apply_fp8_scales``).

Block layouts (GGML's, little-endian; ``d``/``dmin`` fp16): Q8_0 = d + 32 int8; Q4_0 = d + 16 bytes of
nibbles (low nibbles are elements 0..15, high 16..31), value (q - 8)·d; Q4_1 = d, m + nibbles, q·d + m;
Q5_0/Q5_1 add a 32-bit mask of fifth bits (bit j for element j), offset 16 for Q5_0; K-quants cover 256
values: Q4_K/Q5_K = d, dmin, 12 bytes of eight 6-bit scales and mins, (Q5_K: 32 bytes of fifth bits,) 128
bytes of nibbles, value d·sc·q − dmin·m; Q6_K = 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8
scales, d, value d·sc·(q − 32). :func:`quantize_k` writes Q4_K/Q5_K/Q6_K blocks (the ``gguf`` package's
quantizer has none), for the converter.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import TwigError
from .weights import Weights

# GGML type name -> (values per block, bytes per block)
BLOCKS = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
}
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# fp8 weights ride in a QTensor too (raw = the float8 tensor itself, plus an optional scale)
FP8_TYPES = {name: getattr(torch, attr) for name, attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
             if hasattr(torch, attr)}
BLOCKS.update({name: (1, 1) for name in FP8_TYPES})


def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 at byte ``at`` of every block, as fp32 [n, 1]."""
    return b[:, at:at + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """16 bytes -> 32 values per block: low nibbles first, then high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], 1)


def _bits32(b: torch.Tensor, at: int) -> torch.Tensor:
    """The 32-bit little-endian mask at byte ``at`` as 32 bits per block (bit j for element j)."""
    qh = b[:, at:at + 4].contiguous().view(torch.int32)
    return ((qh >> torch.arange(32, dtype=torch.int32, device=b.device)) & 1).to(torch.uint8)


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 scale bytes -> eight 6-bit scales and eight 6-bit mins per block."""
    s = s.reshape(-1, 3, 4)
    a, m, md = s[:, 0], s[:, 1], s[:, 2]
    scales = torch.cat([a & 0x3F, (md & 0x0F) | ((a >> 2) & 0x30)], 1)
    mins = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], 1)
    return scales.float(), mins.float()


def _k_low(qs: torch.Tensor) -> torch.Tensor:
    """128 bytes of nibbles -> [n, 8, 32]: each 32-byte run gives a sub-block of low then one of high nibbles."""
    qs = qs.reshape(-1, 4, 1, 32)
    return torch.cat([qs & 0x0F, qs >> 4], 2).reshape(-1, 8, 32)


def _q8_0(b):
    return b[:, 2:].contiguous().view(torch.int8).float().mul_(_f16(b, 0))


def _q4_0(b):
    return _nibbles(b[:, 2:]).float().sub_(8).mul_(_f16(b, 0))


def _q4_1(b):
    return _nibbles(b[:, 4:]).float().mul_(_f16(b, 0)).add_(_f16(b, 2))


def _q5_0(b):
    return (_nibbles(b[:, 6:]) | (_bits32(b, 2) << 4)).float().sub_(16).mul_(_f16(b, 0))


def _q5_1(b):
    return (_nibbles(b[:, 8:]) | (_bits32(b, 4) << 4)).float().mul_(_f16(b, 0)).add_(_f16(b, 2))


def _q4_k(b):
    sc, mn = _k_scales(b[:, 4:16])
    return _k_low(b[:, 16:]).float().mul_((_f16(b, 0) * sc)[..., None]).sub_((_f16(b, 2) * mn)[..., None])


def _q5_k(b):
    sc, mn = _k_scales(b[:, 4:16])
    qh = b[:, 16:48].reshape(-1, 1, 32) >> torch.arange(8, dtype=torch.uint8, device=b.device).reshape(1, 8, 1)
    q = (_k_low(b[:, 48:]) | ((qh & 1) << 4)).float()
    return q.mul_((_f16(b, 0) * sc)[..., None]).sub_((_f16(b, 2) * mn)[..., None])


def _q6_k(b):
    shifts = torch.tensor([0, 4], dtype=torch.uint8, device=b.device).reshape(1, 1, 2, 1)
    low = ((b[:, :128].reshape(-1, 2, 1, 64) >> shifts) & 0x0F).reshape(-1, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).reshape(1, 1, 4, 1)
    high = ((b[:, 128:192].reshape(-1, 2, 1, 32) >> shifts) & 0x03).reshape(-1, 8, 32)
    q = (low | (high << 4)).float().sub_(32).reshape(-1, 16, 16)
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    return q.mul_((_f16(b, 208) * scales)[..., None])


_KERNELS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q4_K": _q4_k,
            "Q5_K": _q5_k, "Q6_K": _q6_k}


def dequantize(raw: torch.Tensor, qtype: str, shape, dtype: torch.dtype = torch.float32,
               scale: torch.Tensor | None = None) -> torch.Tensor:
    """Raw GGML blocks (uint8, any leading shape, whole blocks) -> a ``dtype`` tensor of ``shape``. fp8:
    ``raw`` is the float8 tensor, times ``scale`` (one value, or one per output row) when given."""
    shape = tuple(shape)
    if qtype in FP8_TYPES:
        w = raw.reshape(shape).to(torch.float32 if scale is not None else dtype)
        if scale is None:
            return w
        s = scale.to(w.device, torch.float32)
        return (w * (s.reshape(-1, *[1] * (len(shape) - 1)) if s.numel() > 1 else s.reshape(()))).to(dtype)
    if qtype in FLOAT_TYPES:
        return raw.contiguous().view(FLOAT_TYPES[qtype]).reshape(shape).to(dtype)
    if qtype not in BLOCKS:
        raise TwigError(f"GGML type {qtype} is not supported")
    size = BLOCKS[qtype][1]
    blocks = raw.reshape(-1, size)
    kernel = _KERNELS.get(qtype)
    if kernel is not None:
        values = kernel(blocks)
    else:  # the rarer types: the gguf package's own (numpy) dequantization
        import numpy as np
        from gguf import GGMLQuantizationType, quants

        values = torch.from_numpy(np.ascontiguousarray(quants.dequantize(
            blocks.cpu().numpy(), GGMLQuantizationType[qtype]))).to(blocks.device)
    return values.reshape(shape).to(dtype)


def _fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float16).reshape(-1, 1).view(torch.uint8)


def _k_affine(sub: torch.Tensor, levels: int, refine: int = 2):
    """Eight 32-value sub-blocks per block [n, 8, 32] as d·sc·q − dmin·m with 6-bit sc, m: (q, d, dmin, sc, m).
    Starts from each sub-block's range, then ``refine`` times fits scale and min to the chosen q by least squares
    and quantizes again."""
    lo = sub.amin(-1).clamp(max=0)
    scale, mins = (sub.amax(-1) - lo) / levels, -lo
    for r in range(refine + 1):
        d = (scale.amax(-1, keepdim=True) / 63).half().float()
        dmin = (mins.amax(-1, keepdim=True) / 63).half().float()
        sc = torch.where(d > 0, scale / d.clamp_min(1e-30), 0).round().clamp(0, 63)
        mn = torch.where(dmin > 0, mins / dmin.clamp_min(1e-30), 0).round().clamp(0, 63)
        step = (d * sc)[..., None]
        q = torch.where(step > 0, (sub + (dmin * mn)[..., None]) / step.clamp_min(1e-30), 0).round().clamp(0, levels)
        if r == refine:
            break
        n, sq, sx = sub.shape[-1], q.sum(-1), sub.sum(-1)
        det = n * (q * q).sum(-1) - sq * sq
        fit = torch.where(det > 0, (n * (q * sub).sum(-1) - sq * sx) / det.clamp_min(1e-30), scale)
        scale = fit.clamp_min(0)
        mins = torch.where(det > 0, (scale * sq - sx) / n, mins).clamp_min(0)
    return q.to(torch.uint8), d, dmin, sc.to(torch.uint8), mn.to(torch.uint8)


def _k_scale_bytes(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins -> the 12 bytes ``_k_scales`` reads."""
    a = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    m = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    md = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return torch.cat([a, m, md], 1)


def _k_nibble_bytes(q: torch.Tensor) -> torch.Tensor:
    """[n, 8, 32] values of 4 bits -> 128 bytes (sub-blocks 2c and 2c+1 share bytes 32c..32c+31)."""
    q = q.reshape(-1, 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def quantize_k(x: torch.Tensor, qtype: str) -> torch.Tensor:
    """A float matrix (rows a multiple of 256 values) as Q4_K, Q5_K or Q6_K blocks, uint8 [rows, bytes]: plain
    round-to-nearest with each sub-block's own range (no search for the best scales, as llama.cpp does)."""
    rows = x.shape[0]
    v = x.detach().to("cpu", torch.float32).reshape(-1, 256)
    if qtype in ("Q4_K", "Q5_K"):
        q, d, dmin, sc, mn = _k_affine(v.reshape(-1, 8, 32), 15 if qtype == "Q4_K" else 31)
        parts = [_fp16_bytes(d), _fp16_bytes(dmin), _k_scale_bytes(sc, mn)]
        if qtype == "Q5_K":
            bits = (q >> 4) << torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)
            parts.append(bits.sum(1, dtype=torch.uint8))
        parts.append(_k_nibble_bytes(q & 0x0F))
    elif qtype == "Q6_K":
        sub = v.reshape(-1, 16, 16)
        scale = sub.abs().amax(-1) / 31
        d = (scale.amax(-1, keepdim=True) / 127).half().float()
        sc = torch.where(d > 0, scale / d.clamp_min(1e-30), 0).round().clamp(-128, 127)
        step = (d * sc)[..., None]
        q = (torch.where(step != 0, sub / torch.where(step != 0, step, 1), 0).round() + 32).clamp(0, 63)
        q = q.to(torch.uint8).reshape(-1, 256)
        low = (q & 0x0F).reshape(-1, 2, 2, 64)
        high = (q >> 4).reshape(-1, 2, 4, 32)
        ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
        qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(-1, 64)
        parts = [ql, qh, sc.to(torch.int8).view(torch.uint8), _fp16_bytes(d)]
    else:
        raise TwigError(f"no K-quant quantizer for {qtype}")
    return torch.cat(parts, 1).reshape(rows, -1)


class QTensor:
    """A quantized weight: ``raw`` blocks (uint8 [rows, bytes per row]), the GGML type name, the logical
    shape. Enough of a tensor's interface for the loaders (``shape``, ``to(device)``, ``torch.cat`` along
    dim 0 of the same type, which fused projections need)."""

    dtype = torch.uint8  # what it occupies; never counted as a float weight
    release = None  # for blocks read from a mapped file: drops their pages (gguf_io.MappedPages)

    def __init__(self, raw: torch.Tensor, qtype: str, shape, scale: torch.Tensor | None = None):
        self.raw, self.qtype, self.shape, self.scale = raw, qtype, torch.Size(shape), scale
        values, size = BLOCKS[qtype]
        if raw.numel() * values != math.prod(self.shape) * size:
            raise TwigError(f"{qtype} data of {raw.numel()} bytes cannot hold a tensor of shape {tuple(shape)}")

    def __repr__(self):
        return f"QTensor({self.qtype}, {tuple(self.shape)})"

    @property
    def device(self):
        return self.raw.device

    def numel(self) -> int:
        return math.prod(self.shape)

    def is_floating_point(self) -> bool:
        return False

    def contiguous(self):
        return self

    def to(self, device=None, *args, **kwargs):
        if isinstance(device, torch.dtype):  # a dtype asks for the widened values
            return self.dequantize(device)
        scale = None if self.scale is None else self.scale.to(device)
        return QTensor(self.raw.to(device), self.qtype, self.shape, scale)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.raw, self.qtype, self.shape, dtype, self.scale)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.cat and not kwargs.get("dim", args[1] if len(args) > 1 else 0):
            parts = args[0]
            if all(isinstance(p, QTensor) and p.qtype == parts[0].qtype and p.shape[1:] == parts[0].shape[1:]
                   and p.scale is None and p.qtype not in FP8_TYPES for p in parts):
                raw = torch.cat([p.raw.reshape(p.shape[0], -1) for p in parts], 0)
                return QTensor(raw, parts[0].qtype, (sum(p.shape[0] for p in parts), *parts[0].shape[1:]))
            parts = [p.dequantize() if isinstance(p, QTensor) else p for p in parts]
            return torch.cat(parts, 0)
        raise TwigError(f"{func.__name__} is not available on quantized weights")


# --------------------------------------------------------------------------------------------------
# Layers holding quantized weights


class QuantizedLayer:
    """Mixed in front of a Linear, Conv2d or Embedding class whose ``weight`` is kept as GGML blocks
    (buffer ``qweight``); ``dequantized(dtype)`` widens it for one call. ``weight`` still answers (fp32,
    widened on each read) for code that inspects it."""

    qtype: str
    qshape: torch.Size
    wide_dtype: torch.dtype  # the dtype the rest of the model is stored in (Embedding outputs it)

    def dequantized(self, dtype: torch.dtype, device=None) -> torch.Tensor:
        """The weight widened to ``dtype``; with ``device``, the blocks move there first and are widened there
        (a host that leaves some layers on its offload device streams their blocks, not widened copies).
        Blocks mapped from a GGUF file then leave the resident set (``qrelease``, see gguf_io.MappedPages)."""
        scale = getattr(self, "qscale", None)
        if device is None:
            w = dequantize(self.qweight, self.qtype, self.qshape, dtype, scale)
        else:
            scale = None if scale is None else scale.to(device)
            w = dequantize(self.qweight.to(device), self.qtype, self.qshape, dtype, scale)
        release = getattr(self, "qrelease", None)
        if release is not None:  # blocks mapped from a file: their pages leave the resident set until next call
            release()
        return w

    def stored(self) -> QTensor:
        """The weight as stored (shared, not copied), e.g. to give it to another layer."""
        return QTensor(self.qweight, self.qtype, self.qshape, getattr(self, "qscale", None))

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized(self.wide_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from . import ops

        if isinstance(self, nn.Embedding):
            rows = self.qweight[x.reshape(-1)]
            scale = getattr(self, "qscale", None)
            if scale is not None and scale.numel() > 1:
                scale = scale.reshape(-1)[x.reshape(-1)]
            out = dequantize(rows, self.qtype, (rows.shape[0], self.qshape[1]), self.wide_dtype, scale)
            out = out.reshape(*x.shape, self.qshape[1])
            embed_scale = getattr(self, "embed_scale", None)  # scaled word embeddings (Gemma's)
            return out if embed_scale is None else out * embed_scale.to(out.dtype)
        w, b = ops.weights(self, x)
        b = None if b is None else b.to(x.device)
        if isinstance(self, nn.Conv2d):
            return self._conv_forward(x, w.to(x.dtype), None if b is None else b.to(x.dtype))
        return ops.dense(x, w, b)


_CLASSES: dict[type, type] = {}


def _quantized_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Quantized{cls.__name__}", (QuantizedLayer, cls), {"__module__": __name__})
    return _CLASSES[cls]


def keeps_quantized(module: nn.Module, leaf: str, q: QTensor) -> bool:
    """Whether :func:`attach` keeps ``q`` quantized in ``module.<leaf>``: the weight of a Linear, Conv2d or
    Embedding (row blocks must not straddle the Embedding's rows), not a float GGML type."""
    rows_ok = not isinstance(module, nn.Embedding) or q.shape[-1] % BLOCKS[q.qtype][0] == 0
    return leaf == "weight" and isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)) \
        and q.qtype not in FLOAT_TYPES and rows_ok


def attach(module: nn.Module, leaf: str, q: QTensor, wide_dtype: torch.dtype, device) -> None:
    """Put quantized ``q`` in ``module.<leaf>``: kept quantized where :func:`keeps_quantized` says so, else
    widened to ``wide_dtype`` now."""
    if not keeps_quantized(module, leaf, q):
        t = q.dequantize(wide_dtype).to(device)
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(t, requires_grad=False)
        else:
            module._buffers[leaf] = t
        return
    module._parameters.pop("weight", None)
    if not isinstance(module, QuantizedLayer):
        module.__class__ = _quantized_class(type(module))
    raw = q.raw.to(device)
    module.register_buffer("qweight", raw.reshape(q.shape[0], -1) if isinstance(module, nn.Embedding) else raw)
    if q.scale is not None:
        module.register_buffer("qscale", q.scale.to(device))
    module.qtype, module.qshape, module.wide_dtype, module.qrelease = q.qtype, q.shape, wide_dtype, q.release


def quant_summary(model: nn.Module) -> str:
    """'Q8_0 x140, Q4_K x20' style count of a model's quantized (and fp8) layers; '' when there are none."""
    counts: dict[str, int] = {}
    for m in model.modules() if isinstance(model, nn.Module) else ():
        if isinstance(m, QuantizedLayer):
            counts[m.qtype] = counts.get(m.qtype, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


# --------------------------------------------------------------------------------------------------
# fp8 checkpoints


def _fp8_name(dtype: torch.dtype) -> str | None:
    return next((k for k, v in FP8_TYPES.items() if v == dtype), None)


def fp8_view(weights):
    """``weights`` with its float8 tensors read as QTensors (kept fp8 in their layers), ComfyUI's
    ``scaled_fp8`` layout understood: an ``X.weight`` with an ``X.scale_weight`` (one value or one per output
    row) means weight × scale; the scale tensors, ``X.scale_input`` and the ``scaled_fp8`` marker are not
    weights of the network. A mapping without float8 tensors is returned as it is."""
    metas = {k: weights.meta(k) for k in weights}
    if not any(_fp8_name(m.dtype) for m in metas.values()):
        return weights
    return Fp8Weights(weights, metas)


class Fp8Weights(Weights):
    """See :func:`fp8_view`."""

    _AUX = (".scale_weight", ".scale_input")

    def __init__(self, base, metas):
        self.base, self.label, self.path, self._metas = base, base.label, getattr(base, "path", None), metas
        self._keys = dict.fromkeys(k for k in metas
                                   if not k.endswith(self._AUX) and k.rsplit(".", 1)[-1] != "scaled_fp8")

    @property
    def embedded_config(self):
        """The transformer config our converter writes into fp8 files' metadata, if any."""
        import json

        from .gguf_io import CONFIG_KEY

        text = (getattr(self.base, "metadata", None) or {}).get(CONFIG_KEY)
        return json.loads(text) if text else None

    @property
    def _index(self):
        return self._keys

    def meta(self, key):
        m = self._metas[key]
        return torch.empty(m.shape, dtype=torch.uint8, device="meta") if _fp8_name(m.dtype) else m

    def file_of(self, key):
        return self.base.file_of(key)

    def release(self, key):
        self.base.release(key)

    def __getitem__(self, key):
        if key not in self._metas or key.endswith(self._AUX):
            raise KeyError(key)
        t = self.base[key]
        name = _fp8_name(t.dtype)
        if name is None:
            return t
        stem = key[: -len("weight")] if key.endswith("weight") else None
        scale = self.base[stem + "scale_weight"] if stem is not None and stem + "scale_weight" in self._metas else None
        return QTensor(t, name, t.shape, scale)
