"""int8 matrix products for the transformer's large layers on CPU (the ``int8`` weight choice, :func:`enable`).

A layer switched on with :func:`enable` hands ``ops.dense`` an :class:`Int8Weight` instead of a float tensor: a
view of the layer's weight (and of any row or column slice the caller takes, as the fused q/k/v and the Mix-FFN's
channel chunks do) that ``dense`` multiplies through torch's quantized CPU kernels (fbgemm / the x86 engine):
the weight, smoothed (input channels rescaled as SmoothQuant does, from the activations of one fixed
calibration step run when int8 is switched on, so that outlier channels of the activations move into the
weights), quantized once per output channel to int8 (symmetric, scale = max |w| / 127) and packed, the
activations divided by the same smoothing, each row (token) scaled to a maximum of 1 and quantized per call
(dynamic, with a zero point chosen per call, to 7 bits: the u8·s8 kernels add pairs of products in 16 bits, which
full 8-bit activations overflow — that saturation made a step's error twice as large on random weights),
products summed in int32, scaled back to fp32 row by row, bias added in fp32. The per-row scaling makes the
kernels' one activation scale in effect one per token: tokens differ enough (the trained demo transformer's
Mix-FFN projection) that one scale over the tensor gave the demo transformer's step about twice the error.

Packs are made on first use from the layer's float weight as ``ops.weights`` would give it (GGUF/fp8 storage
widened, LoRA adapters folded) and kept on the layer, one per slice; a changed LoRA stack (adapters or strengths)
rebuilds them, as does a host replacing or patching the weight. The layer's own stored weight is left as it is, so switching int8 off gives the float model back
exactly. Error: each product's relative error is about 1.5-2.5% on Gaussian inputs; the preset table (``twig_core.presets``) states and tests what that makes of a step and of a whole run.

Only CPU fp32 activations take this route; anything else (a GPU, bf16/fp16 compute, torch builds without the
quantized engines) computes in float as before.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from .errors import TwigError
from . import heap

# torch's quantized CPU engines able to run the packed int8 products, preferred first
ENGINES = ("x86", "fbgemm")


def engine() -> str | None:
    """The quantized engine int8 products run on here, or None when this torch build has none."""
    supported = torch.backends.quantized.supported_engines
    if not hasattr(torch.ops.quantized, "linear_dynamic"):
        return None
    return next((e for e in ENGINES if e in supported), None)


@contextlib.contextmanager
def _engine():
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine()
    try:
        with warnings.catch_warnings():  # quantized tensors are marked for a future rework; the ops still run
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.backends.quantized.engine = old


# The transformer layers that compute in int8 (inside every block): self-attention's q/k/v and projection,
# cross-attention's query, the Mix-FFN's 1x1 expansion and projection (about 89% of a block's multiply-adds at
# 1024² with a 300-token caption).
# Cross-attention's output projection stays float: its input, a softmax average of the caption's values, has
# a few large entries that one 8-bit scale over the tensor resolves badly (alone it gave 20x the error of all the
# others together on random weights). So do the depthwise convolution, norms, modulation, embedders, the final
# layer and the caption keys/values (computed once a generation).
TARGETS = ("attn.qkv", "attn.proj", "cross_attn.q_linear", "mlp.inverted_conv.conv", "mlp.point_conv.conv")


def _require_engine(on: bool) -> None:
    if on and engine() is None:
        raise TwigError("int8 weights need torch's quantized CPU engine (x86 or fbgemm), which this torch build "
                        "lacks; choose fp16, bf16 or same")


def require_cpu_fp32(label: str, device, dtype: torch.dtype) -> None:
    """TwigError naming ``label`` unless a network on ``device`` computing in ``dtype`` can take int8 products."""
    if torch.device(device).type != "cpu" or dtype != torch.float32:
        raise TwigError(f"{label}: int8 products run on the CPU computing in fp32, not on {device} in "
                        f"{str(dtype).removeprefix('torch.')}")


def _switch(layer: nn.Module, on: bool, source: nn.Module | None = None) -> None:
    """Mark ``layer`` to compute in int8 (taking over ``source``'s smoothing and packs when given) or in float
    again (its packs and smoothing dropped)."""
    if on:
        layer._twig_int8 = dict(getattr(source, "_twig_int8", {}))
        layer._twig_smooth = dict(getattr(source, "_twig_smooth", {}))
    else:
        for name in ("_twig_int8", "_twig_smooth"):
            layer.__dict__.pop(name, None)


def enable(model: nn.Module, on: bool = True, like: nn.Module | None = None) -> int:
    """Switch the int8 products of ``model``'s target layers on (or off, dropping their packs). Returns how many
    layers were switched. ``like``: a model with the same layers and weights whose smoothing and packs to take
    over instead of calibrating again (a host's rebuild of the same transformer). Raises TwigError when turning
    on where this torch has no quantized CPU engine."""
    _require_engine(on)
    count = 0
    for i, block in enumerate(getattr(model, "blocks", ())):
        for name in TARGETS:
            _switch(block.get_submodule(name), on, None if like is None else like.blocks[i].get_submodule(name))
            count += 1
    if on and count and like is None:
        calibrate(model)
    return count


# The calibration input: one small latent of fixed noise at the middle of the schedule, a fixed caption.
CALIBRATION_SIDE, CALIBRATION_CAPTION, CALIBRATION_SEED = 8, 16, 0


@torch.no_grad()
def calibrate(model: nn.Module) -> None:
    """Run ``model`` once on a fixed small input so every int8 layer fixes its smoothing scales and makes its
    packs from that input's activations (the same for every run: images do not depend on what ran before),
    without its LoRA stack (the base weights calibrate; adding or removing a LoRA keeps the smoothing)."""
    cfg = model.config
    g = torch.Generator().manual_seed(CALIBRATION_SEED)
    side = CALIBRATION_SIDE * cfg.patch_size
    x = torch.randn(1, cfg.in_channels, side, side, generator=g)
    ctx = torch.randn(1, CALIBRATION_CAPTION, cfg.caption_channels, generator=g)
    device = next(model.parameters(), torch.empty(0)).device
    if device.type != "cpu":
        return  # int8 products run on the CPU only; a model elsewhere calibrates when it computes there
    stacks = {m: m.__dict__.pop("twig_adapters") for m in model.modules() if "twig_adapters" in m.__dict__}
    try:
        model(x.to(device), torch.tensor([500.0], device=device), ctx.to(device))
    finally:
        for m, stack in stacks.items():
            m.twig_adapters = stack


def enabled(model: nn.Module) -> bool:
    return any(hasattr(m, "_twig_int8") for m in model.modules())


def wants(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``layer`` computes ``x`` in int8 (switched on, CPU fp32 activations)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and getattr(layer, "_twig_int8", None) is not None


def _source_key(layer: nn.Module) -> tuple:
    """What the packs were made from: the LoRA stack (adapters and strengths), the weight tensor itself (a host
    that patches weights, as ComfyUI's model patcher does, replaces or changes it) and a host's weight functions."""
    w = getattr(layer, "_parameters", {}).get("weight")
    return (tuple((id(a), a.strength) for a in getattr(layer, "twig_adapters", None) or ()),
            None if w is None else (id(w), w._version),
            tuple(map(id, getattr(layer, "weight_function", None) or ())))


class Int8Weight:
    """A layer's weight (or a slice of it) to be multiplied in int8: what ``ops.weights`` gives for a switched-on
    layer. Slicing takes rows (``w[a:b]``) or input columns (``w[:, a:b]``); ``dense`` calls :meth:`packed`."""

    __slots__ = ("layer", "float_weight", "rows", "cols")

    def __init__(self, layer: nn.Module, float_weight, rows: slice = slice(None), cols: slice = slice(None)):
        self.layer, self.float_weight, self.rows, self.cols = layer, float_weight, rows, cols

    @property
    def shape(self) -> tuple[int, ...]:
        full = getattr(self.layer, "qshape", None) or self.layer.weight.shape
        r = range(full[0])[self.rows]
        c = range(full[1])[self.cols]
        return (len(r), len(c), *full[2:])

    def __getitem__(self, index) -> "Int8Weight":
        if self.rows != slice(None) or self.cols != slice(None):
            raise TwigError("an int8 weight is sliced once (rows or columns)")
        if isinstance(index, slice):
            return Int8Weight(self.layer, self.float_weight, index, self.cols)
        if isinstance(index, tuple) and len(index) == 2 and index[0] == slice(None) and isinstance(index[1], slice):
            return Int8Weight(self.layer, self.float_weight, self.rows, index[1])
        raise TwigError(f"an int8 weight takes a row or column slice, not {index!r}")

    def _key(self):
        r, c = self.rows, self.cols
        return (r.start, r.stop, r.step, c.start, c.stop, c.step)

    def packed(self, x: torch.Tensor):
        """(packed int8 weight, smoothing) of this slice (``dense`` adds the bias), made once and kept on the layer
        until what it is made from changes."""
        cache = self.layer._twig_int8
        source = _source_key(self.layer)
        if cache.get("source") != source:
            cache.clear()
            cache["source"] = source
        key = self._key()
        hit = cache.get(key)
        if hit is None:
            w = self.float_weight()[self.rows]
            w = w[:, self.cols].float()
            w = w.reshape(w.shape[0], w.shape[1])
            smooth = self.layer._twig_smooth.get(key)
            if smooth is None:  # fixed once, from the first activations this slice sees (the calibration's)
                smooth = self.layer._twig_smooth[key] = smoothing(x, w)
            # held: one byte a weight, fp64 scale and int64 zero point per channel, fp32 smoothing
            held = w.numel() + 16 * w.shape[0] + 4 * w.shape[1]
            hit = cache[key] = (pack(w * smooth), smooth, held)
            del w
            heap.trim()  # the widened and smoothed copies' memory goes back to the system now
        return hit[0], hit[1]


def smoothing(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per input channel j, s_j = sqrt(max|x_j| / max|w_j|) (SmoothQuant's balance): the product is computed as
    (x / s) @ (w * s)^T, which moves activation outliers (channels far larger than the rest, as the Mix-FFN's
    gated hidden layer has) into the weights, where each output channel has its own scale."""
    ax = x.reshape(-1, x.shape[-1]).abs().amax(0).float().clamp_min(1e-5)
    aw = w.abs().amax(0).clamp_min(1e-5)
    return (ax / aw).sqrt_().clamp_(1e-3, 1e3)


def pack(w: torch.Tensor):
    """``w`` [out, in] quantized per output channel to int8 and packed for ``linear_dynamic``."""
    scale = (w.abs().amax(dim=1).double() / 127.0).clamp_min(1e-12)
    zero = torch.zeros(w.shape[0], dtype=torch.long)
    with _engine():
        q = torch.quantize_per_channel(w.float().contiguous(), scale, zero, 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(q, None)


def dense(x: torch.Tensor, w: Int8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ w^T + bias`` through the int8 kernels (x: CPU fp32 [..., in]), one activation scale per row."""
    packed, smooth = w.packed(x)
    lead = x.shape[:-1]
    x = (x / smooth).reshape(-1, x.shape[-1])
    size = x.abs().amax(1, keepdim=True).clamp_min_(1e-12)  # every row to a maximum of 1
    with _engine():
        y = torch.ops.quantized.linear_dynamic(x.div_(size), packed, True)  # 7-bit
    y = y.mul_(size) if bias is None else torch.addcmul(bias.float(), y, size)
    return y.view(*lead, y.shape[-1])


def memory_bytes(model: nn.Module) -> int:
    """Bytes held by the packs made so far (one byte a weight, plus the per-channel scales and smoothing)."""
    return sum(v[2] for m in model.modules() for k, v in (getattr(m, "_twig_int8", None) or {}).items()
               if k != "source")
