"""Small numeric helpers shared by the transformer and the autoencoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Products at least this large (multiply-adds, and rows) take the 1x1-convolution route on CPU (see ``dense``);
# below that (a handful of rows) torch would pick its slow reference convolution.
_CONV_ROUTE_MIN = 1 << 22
_CONV_ROUTE_MIN_ROWS = 64


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x[..., in] @ weight[out, in]^T + bias`` computed in x's dtype (weights stored in another dtype are cast
    here, one layer at a time, so only one layer's widened copy exists at once).

    Large fp32 products on CPU run as a 1x1 convolution over a channels-last view of the tokens: that goes to
    oneDNN, whose fp32 kernels measured about 2x the BLAS sgemm behind ``torch.mm`` on AVX-512 CPUs (same
    result up to summation order). Elsewhere (GPU, bf16/fp16, small products) this is ``F.linear``.
    """
    w = weight.to(x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    cout, cin = w.shape[0], w.shape[1]  # a Linear [out, in] or a 1x1 conv [out, in, 1, 1] weight
    rows = x.numel() // cin if cin else 0
    small = rows < _CONV_ROUTE_MIN_ROWS or rows * cin * cout < _CONV_ROUTE_MIN
    if x.device.type != "cpu" or x.dtype != torch.float32 or small:
        return F.linear(x, w.reshape(cout, cin), b)
    lead = x.shape[:-1]
    y = F.conv2d(x.reshape(1, 1, rows, cin).permute(0, 3, 1, 2), w.reshape(cout, cin, 1, 1), b)
    return y.permute(0, 2, 3, 1).reshape(*lead, cout)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """[B,C,H,W] stored pixel-major (NHWC). Convolutions keep this layout, and per-pixel channel work
    (1x1 products, channel norms) then reads contiguous rows."""
    return x.contiguous(memory_format=torch.channels_last)


def nhwc(x: torch.Tensor) -> torch.Tensor:
    """[B,C,H,W] -> [B,H,W,C] view (contiguous when x is channels-last)."""
    return x.permute(0, 2, 3, 1)


def nchw(x: torch.Tensor) -> torch.Tensor:
    """[B,H,W,C] -> [B,C,H,W] view (channels-last when x is contiguous)."""
    return x.permute(0, 3, 1, 2)


class Linear(nn.Linear):
    """nn.Linear computing through ``dense``: in the input's dtype whatever its weights are stored in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense(x, self.weight, self.bias)


class Conv2d(nn.Conv2d):
    """nn.Conv2d computing in the input's dtype whatever its weights are stored in (cast per call, like
    ``dense``), so fp16/bf16-stored weights can run in fp32 without a widened copy of the whole model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias
        return self._conv_forward(x, self.weight.to(x.dtype), None if b is None else b.to(x.dtype))


class BatchNorm2d(nn.BatchNorm2d):
    """Inference-time BatchNorm computing in the input's dtype whatever its statistics are stored in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        dt = x.dtype
        return F.batch_norm(x, self.running_mean.to(dt), self.running_var.to(dt), self.weight.to(dt),
                            self.bias.to(dt), False, 0.0, self.eps)
