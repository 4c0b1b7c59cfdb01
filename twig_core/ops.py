"""Small numeric helpers shared by the transformer and the autoencoder, and the default operations namespace
(``Linear``, ``Conv2d``, ``weights``) the transformer builds its layers from."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import int8

# Products at least this large (multiply-adds, and rows) take the 1x1-convolution route on CPU (see ``dense``);
# below that (a handful of rows) torch would pick its slow reference convolution.
_CONV_ROUTE_MIN = 1 << 22
_CONV_ROUTE_MIN_ROWS = 64
# oneDNN's fp32 kernels outrun sgemm on AVX-512 CPUs; on AVX2 ones sgemm is as fast or faster (bench/RESULTS.md)
_CONV_ROUTE = torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x[..., in] @ weight[out, in]^T + bias`` computed in x's dtype (weights stored in another dtype are cast
    here, one layer at a time, so only one layer's widened copy exists at once).

    Large fp32 products on CPU run as a 1x1 convolution over a channels-last view of the tokens: that goes to
    oneDNN, whose fp32 kernels outrun the BLAS sgemm behind ``torch.mm`` on AVX-512 CPUs (bench/RESULTS.md;
    same result up to summation order). Elsewhere (GPU, bf16/fp16, small products, CPUs without AVX-512) this
    is ``F.linear``.
    A layer switched to int8 products gives an ``int8.Int8Weight``, multiplied by ``int8.dense``.
    """
    if isinstance(weight, int8.Int8Weight):
        return int8.dense(x, weight, bias)
    w = weight.to(x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    cout, cin = w.shape[0], w.shape[1]  # a Linear [out, in] or a 1x1 conv [out, in, 1, 1] weight
    rows = x.numel() // cin if cin else 0
    small = rows < _CONV_ROUTE_MIN_ROWS or rows * cin * cout < _CONV_ROUTE_MIN
    if x.device.type != "cpu" or x.dtype != torch.float32 or small or not _CONV_ROUTE:
        return F.linear(x, w.reshape(cout, cin), b)
    lead = x.shape[:-1]
    y = F.conv2d(x.reshape(1, 1, rows, cin).permute(0, 3, 1, 2), w.reshape(cout, cin, 1, 1), b)
    return y.permute(0, 2, 3, 1).reshape(*lead, cout)


# Gated-conv FFN hidden channels processed per chunk (at most this many; Sana 1600M's 5600 run as two of 2800).
FFN_CHUNK = 2800


def glu_conv_ffn(x: torch.Tensor, up_w: torch.Tensor, up_b: torch.Tensor | None, dw_w: torch.Tensor,
                 dw_b: torch.Tensor | None, down_w: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """The inverted bottleneck of Sana's Mix-FFN and DC-AE's GLUMBConv, over pixel-major x [B,H,W,C]:
    1x1 expand to value and gate halves, SiLU, depthwise conv, value * SiLU(gate), 1x1 project (no bias).
    Returns [B,H,W,C_out], contiguous. Weights are ``[out, in(, k, k)]`` tensors in any stored dtype.

    Every hidden channel is independent until the projection, so the expansion runs in chunks of channels
    (value and gate each in their own tensor) whose projections are summed: temporaries and per-call weight
    casts are a fraction of the layer's (``chunk``: at most this many hidden channels each, default FFN_CHUNK).
    Without autograd, activations and sums run in place.
    """
    dt = x.dtype
    inplace = not torch.is_grad_enabled()
    hidden = up_w.shape[0] // 2
    pieces = -(-hidden // max(1, chunk or FFN_CHUNK))
    step = -(-hidden // pieces)
    out = None
    for c0 in range(0, hidden, step):
        c1 = min(c0 + step, hidden)

        def branch(off):
            sl = slice(off + c0, off + c1)
            y = F.silu(dense(x, up_w[sl], None if up_b is None else up_b[sl]), inplace=inplace)
            # depthwise conv on a channels-last view (no copy into NCHW order); the result stays pixel-major
            y = F.conv2d(nchw(y), dw_w[sl].to(dt), None if dw_b is None else dw_b[sl].to(dt),
                         padding=dw_w.shape[-1] // 2, groups=c1 - c0)
            return nhwc(y)

        value, gate = branch(0), branch(hidden)
        value = value.mul_(F.silu(gate, inplace=True)) if inplace else value * F.silu(gate)
        part = dense(value, down_w[:, c0:c1])
        out = part if out is None else out.add_(part) if inplace else out + part
    return out


# Devices kept on contiguous NCHW: channels-last convolutions have had silent errors on Apple's MPS backend.
NCHW_DEVICES = frozenset({"mps"})


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """[B,C,H,W] stored pixel-major (NHWC). Convolutions keep this layout, and per-pixel channel work
    (1x1 products, channel norms) then reads contiguous rows. On NCHW_DEVICES: plain contiguous NCHW."""
    if x.device.type in NCHW_DEVICES:
        return x.contiguous()
    return x.contiguous(memory_format=torch.channels_last)


def nhwc(x: torch.Tensor) -> torch.Tensor:
    """[B,C,H,W] -> [B,H,W,C] view (contiguous when x is channels-last)."""
    return x.permute(0, 2, 3, 1)


def nchw(x: torch.Tensor) -> torch.Tensor:
    """[B,H,W,C] -> [B,C,H,W] view (channels-last when x is contiguous)."""
    return x.permute(0, 3, 1, 2)


def weights(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A layer's (weight, bias) for everything that computes with them (the layers' forward, fused q/k/v
    slices, the Mix-FFN's three convolutions). Here: the stored tensors, cast later by ``dense`` one slice at a
    time; a layer keeping its weight quantized (``twig_core.quant``) gives it widened to x's dtype on x's
    device; the layer's runtime adapters (``layer.twig_adapters``, LoRA: ``twig_core.lora``) are folded over a
    per-call copy. A host's operations namespace gives its own, so its layers cast (and stream) their weights."""
    if int8.wants(layer, x):  # packed on first use from the float weight below (``twig_core.int8``)
        return int8.Int8Weight(layer, lambda: _float_weight(layer, x)), layer.bias
    return _float_weight(layer, x), layer.bias


def _float_weight(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    w = layer.dequantized(x.dtype, x.device) if hasattr(layer, "dequantized") else layer.weight
    return with_adapters(layer, w, x.dtype)


def with_adapters(layer: nn.Module, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w`` with ``layer.twig_adapters`` folded over it in order (``w`` itself when there are none). A host's
    operations namespace calls this on the weight it cast, so LoRAs apply whichever layers carry them."""
    for adapter in getattr(layer, "twig_adapters", None) or ():
        w = adapter.apply(w, dtype)
    return w


class Linear(nn.Linear):
    """nn.Linear computing through ``dense``: in the input's dtype whatever its weights are stored in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense(x, *weights(self, x))


class Conv2d(nn.Conv2d):
    """nn.Conv2d computing in the input's dtype whatever its weights are stored in (cast per call, like
    ``dense``), so fp16/bf16-stored weights can run in fp32 without a widened copy of the whole model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = weights(self, x)
        return self._conv_forward(x, w.to(x.dtype), None if b is None else b.to(x.dtype))


class BatchNorm2d(nn.BatchNorm2d):
    """Inference-time BatchNorm computing in the input's dtype whatever its statistics are stored in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        dt = x.dtype
        return F.batch_norm(x, self.running_mean.to(dt), self.running_var.to(dt), self.weight.to(dt),
                            self.bias.to(dt), False, 0.0, self.eps)
