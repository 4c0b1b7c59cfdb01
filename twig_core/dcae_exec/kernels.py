"""How DC-AE's layers compute when a run asks for more than their reference ``forward``: the kernels.

``forward(m, x, run)`` is ``m(x)`` for any part of the network (a block, a stage, the whole encoder or
decoder) as a run computes it. The model's own forwards (twig_core/dcae.py) are the plain reference;
these give the same values while using less memory and fewer multiplications:

- without autograd, norms, activations and residual sums overwrite their temporaries;
- an interpolating up block convolves its source pixels with the four phase kernels of "nearest 2x, then
  3x3 conv" (no upsampled copy, 16 instead of 36 multiply-adds per pair; on CPU as Winograd F(4x4,2x2)),
  adding its shortcut as each phase is written (also as a row stream, for the banded and streamed decodes);
- on CPU a GLUMBConv runs its hidden channels in chunks whose temporaries stay about one decode band, and the
  streamed ResBlocks' 3x3 convolutions of 128 channels or more run as Winograd F(4x4,3x3).

Which of these apply is decided once per run by the entry (``dcae_exec.decode``/``encode``) and carried by
its ``Run``, which also records which kernels ran.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..dcae import (
    ChannelRMSNorm,
    Decoder,
    EfficientViTBlock,
    Encoder,
    GLUMBConv,
    MultiscaleLinearAttention,
    ResBlock,
    UpBlock,
    _pointwise,
)
from ..ops import channels_last, nchw, nhwc

# Row-band size (elements per batch item) of CPU decoding: bands of 8 MB in fp32 stay well inside the last-level
# cache and below glibc's mmap threshold, so their temporaries are reused instead of page-faulted in. A CPU
# GLUMBConv sizes its hidden-channel chunks to it as well.
CPU_BAND = 1 << 21
# The fewest hidden channels a GLUMBConv chunk holds.
FFN_MIN_CHUNK = 64


@dataclass
class Run:
    """How one encode or decode ran: what ``dcae_exec.decode``/``encode`` decided, and what happened.

    ``strategy``: the name it ran (see dcae_exec.DECODE_STRATEGIES / ENCODE_STRATEGIES); ``tile_size`` and
    ``overlap`` in latent pixels (None: untiled / not blended); ``band``: the row-band budget (elements per
    batch item) of the layers run in bands, None when none were; ``retries``: the tile sizes tried after
    running out of memory, in order; ``widened``: an fp16 decode overflowed and ran again in fp32. ``device``
    and ``inplace`` (no autograd) select the kernels;
    ``kernels`` maps the name of each special kernel that ran ("attention bands", "resblock bands", "resblock
    stream", "upsample bands", "upsample stream", "winograd 3x3", "direct 3x3": the streamed ResBlock convs,
    "winograd 2x2", "direct 2x2": the up blocks' folded convs) to the band heights (rows) it ran on, None where
    not known."""

    strategy: str
    device: str = "cpu"
    inplace: bool = True
    tile_size: int | None = None
    overlap: int | None = None
    band: int | None = None
    retries: list = field(default_factory=list)
    widened: bool = False
    kernels: dict = field(default_factory=dict)

    @property
    def cpu(self) -> bool:
        return self.device == "cpu"

    def ran(self, kernel: str, rows: int | None = None) -> None:
        self.kernels.setdefault(kernel, set()).add(rows)


def forward(m: nn.Module, x: torch.Tensor, run: Run) -> torch.Tensor:
    """m(x) computed by this run's kernels. With ``run.inplace`` x may be overwritten unless m is a whole
    encoder or decoder (their first layers never write into their input)."""
    if isinstance(m, nn.Sequential):
        for child in m:
            x = forward(child, x, run)
        return x
    if isinstance(m, Decoder):
        x = m.embed(x)
        for child in m.layers():
            x = forward(child, x, run)
        return x
    if isinstance(m, Encoder):
        for child in m.layers():
            x = forward(child, x, run)
        return m.project(x)
    if isinstance(m, EfficientViTBlock):
        return forward(m.conv_out, forward(m.attn, x, run), run)
    if isinstance(m, GLUMBConv):
        y = m.bottleneck(x, ffn_chunk(x, CPU_BAND, m.conv_point.weight.shape[1]) if run.cpu else None)
        return norm_(m.norm, y).add_(x) if run.inplace else x + m.norm(y)
    if isinstance(m, UpBlock):
        return upblock(m, x, run)
    if run.inplace:
        if isinstance(m, ResBlock):
            return norm_(m.norm, m.conv2(act_(m.act, m.conv1(x)))).add_(x)
        if isinstance(m, MultiscaleLinearAttention):
            return x + norm_(m.norm_out, _pointwise(m.attention(x), m.to_out.weight))
        if isinstance(m, ChannelRMSNorm):
            return norm_(m, x)
    return m(x)


def norm_(norm: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """norm(y); a ChannelRMSNorm overwrites y (a temporary) in three passes over its pixels."""
    if not isinstance(norm, ChannelRMSNorm):
        return norm(y)
    c = y.shape[1]
    yf = nhwc(y).float()
    ms = torch.linalg.vector_norm(yf, dim=-1, keepdim=True).square_().div_(c)
    out = yf.mul_(ms.add_(norm.eps).rsqrt_()).to(y.dtype)  # no-op in fp32
    w, b = norm.weight.to(out.dtype), norm.bias.to(out.dtype)
    return nchw(torch.addcmul(b, out, w, out=out))


def act_(act: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """act(y), overwriting y (a temporary) where the activation has an in-place form."""
    if isinstance(act, nn.SiLU):
        return F.silu(y, inplace=True)
    if isinstance(act, nn.ReLU):
        return F.relu(y, inplace=True)
    return act(y)


def ffn_chunk(x: torch.Tensor, band: int, hidden: int | None = None) -> int:
    """Hidden channels per GLUMBConv chunk on CPU: each chunk's map-sized temporaries hold about ``band``
    elements per batch item (cache-sized and reused by the allocator), at least FFN_MIN_CHUNK channels. When
    that splits the ``hidden`` channels, the largest multiple of FFN_MIN_CHUNK below it that divides them, if
    any: the chunks' products then have widths sgemm runs at full speed (bench/RESULTS.md)."""
    chunk = max(FFN_MIN_CHUNK, band // (x.numel() // x.shape[1]))
    if hidden is None or chunk >= hidden:
        return chunk
    fits = [c for c in range(FFN_MIN_CHUNK, chunk + 1, FFN_MIN_CHUNK) if hidden % c == 0]
    return fits[-1] if fits else chunk


def upblock(m: UpBlock, x: torch.Tensor, run: Run, rows: int | None = None) -> torch.Tensor:
    """m(x); an interpolating block's convolution runs as _upsample_conv (over bands of ``rows`` source rows),
    adding the shortcut as it writes when in place."""
    if m.interpolate:
        fused = m.shortcut and run.inplace and 4 % m.repeats == 0
        y = _upsample_conv(x, m.conv.weight, m.conv.bias, m.repeats if fused else None, rows, run)
        if fused or not m.shortcut:
            return y
    else:
        y = F.pixel_shuffle(m.conv(x), 2)
        if not m.shortcut:
            return y
    # pixel_shuffle(repeat_interleave(x)) added straight into y's pixel-major layout
    b, c, h, w = y.shape
    rep = nhwc(x).repeat_interleave(m.repeats, dim=-1).view(b, h // 2, w // 2, c, 2, 2)
    y = channels_last(y)
    yv = nhwc(y).view(b, h // 2, 2, w // 2, 2, c)
    src = rep.permute(0, 1, 4, 2, 5, 3)
    if not run.inplace:
        return nchw((yv + src).reshape(b, h, w, c))
    yv.add_(src)
    return y


# ---- rows of maps arriving in bands ----------------------------------------------------------------------------


def _rows(t: torch.Tensor, first: int, r0: int, r1: int, cols: int = 0) -> torch.Tensor:
    """Rows r0:r1 of a map of which ``t`` holds the rows from ``first`` on, zeros where t holds none, plus
    ``cols`` zero columns on each side; channels-last (a view of t when nothing is padded)."""
    a0, a1 = max(r0 - first, 0), min(r1 - first, t.shape[-2])
    top, bottom = a0 - (r0 - first), (r1 - first) - a1
    t = t[:, :, a0:a1]
    return channels_last(F.pad(t, (cols, cols, top, bottom))) if top or bottom or cols else t


def _bands(x: torch.Tensor, rows: int):
    """x's rows in consecutive bands of at most ``rows`` rows (views)."""
    for i in range(0, x.shape[-2], rows):
        yield x[:, :, i:i + rows]


def _append(held: torch.Tensor | None, band: torch.Tensor) -> torch.Tensor:
    """The rows of ``held`` followed by those of ``band`` (band itself when nothing is held)."""
    if held is None or held.shape[-2] == 0:
        return band
    return torch.cat([held, band], dim=2)


# ---- fused upsample-conv ---------------------------------------------------------------------------------------


def _upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   shortcut_repeats: int | None = None, rows: int | None = None,
                   run: Run | None = None) -> torch.Tensor:
    """conv3x3(nearest_upsample_2x(x)) without the upsampled input (see _upsample_stream), over bands of
    ``rows`` source rows (default: all at once). Returns a channels-last tensor. ``run`` records the kernel."""
    bsz, _, h, w = x.shape
    out = torch.empty(bsz, h, 2, w, 2, weight.shape[0], dtype=x.dtype, device=x.device)
    for _ in _upsample_stream(_bands(x, rows or h), h, weight, bias, shortcut_repeats, out, run):
        pass
    return nchw(out.view(bsz, 2 * h, 2 * w, -1))


def _upsample_stream(bands, h: int, weight: torch.Tensor, bias: torch.Tensor | None,
                     shortcut_repeats: int | None = None, out: torch.Tensor | None = None, run: Run | None = None):
    """conv3x3(nearest_upsample_2x(x)) for a map x of h rows arriving as consecutive row bands; yields the
    output as consecutive bands (twice their source rows), channels-last; into ``out`` ([B, h, 2, W, 2, Cout])
    when given.

    Output pixel (2i+a, 2j+b) sees only the 2x2 source pixels starting at padded position (i+a, j+b), with taps
    that are sums of the 3x3 taps landing on the same source pixel (rows: phase 0 -> (w0, w1+w2), phase 1 ->
    (w0+w1, w2); columns alike). So one 2x2 convolution of the padded source with the four phases' kernels
    stacked (4*Cout outputs) gives all outputs: 16 multiply-adds per source pixel and channel pair instead of 36.
    Row j of that convolution's result (padded rows j, j+1) feeds source rows j-1 and j, so the last result row
    of a band is kept for the next: none is computed twice, and only a band's worth of the 4*Cout-channel
    result exists at once.
    On CPU in fp32 that 2x2 convolution runs as Winograd F(4x4,2x2) (_winograd) unless its transformed kernels
    would exceed _WINOGRAD_UP_MAX elements.

    With ``shortcut_repeats`` (r dividing 4) it also adds UpBlock's shortcut, pixel_shuffle(x with each channel
    repeated r times): output channel c of phase k = 2a+b reads source channel (4c+k)//r, i.e. channels k//r,
    k//r + 4/r, ... of x, added as the phase is written (no repeated copy of x, no second pass)."""
    cout = weight.shape[0]
    held, first = None, 0  # source rows first.. held
    kept, done = None, 0  # result row ``done`` (the last one computed), source rows emitted: [0, done)
    kernels = b4 = wino = None
    for band in bands:
        if kernels is None:
            wt = weight.to(band.dtype)
            b4 = None if bias is None else bias.to(band.dtype).repeat(4)

            def fold(k, dim, phase):  # the 3 taps along ``dim`` folded to the 2 seen by this phase
                t0, t1, t2 = k.unbind(dim)
                return torch.stack([t0, t1 + t2] if phase == 0 else [t0 + t1, t2], dim)

            kernels = torch.cat([fold(fold(wt, 2, a), 3, b) for a in (0, 1) for b in (0, 1)])  # [4*Cout,Cin,2,2]
            cpu = run.cpu if run is not None else band.device.type == "cpu"
            if cpu and band.dtype == torch.float32 and 25 * kernels[:, :, 0, 0].numel() <= _WINOGRAD_UP_MAX:
                wino = _winograd_weight(kernels)
            if run is not None:
                run.ran("winograd 2x2" if wino is not None else "direct 2x2")
        held = _append(held, band)
        have = first + held.shape[-2]
        end = have if have < h else h + 1  # result rows up to end-1 need source rows up to end-1
        e0 = 0 if kept is None else done + 1
        if wino is None:
            res = nhwc(F.conv2d(_rows(held, first, e0 - 1, end, cols=1), kernels, b4))  # result rows e0..end-1
        else:
            res = _winograd(_rows(held, first, e0 - 1, end), wino, 2, cols=1)
            if b4 is not None:
                res.add_(b4)
        if kept is not None:
            res = torch.cat([kept, res], dim=1)  # result rows done..end-1
        i0, i1 = done, end - 1  # source rows whose outputs are complete
        if i1 > i0:
            w = held.shape[-1]
            dst = (out[:, i0:i1] if out is not None else
                   torch.empty(held.shape[0], i1 - i0, 2, w, 2, cout, dtype=held.dtype, device=held.device))
            src = nhwc(_rows(held, first, i0, i1))
            for a in (0, 1):
                for b in (0, 1):
                    k = 2 * a + b
                    phase = res[:, a:a + i1 - i0, b:b + w, k * cout:(k + 1) * cout]
                    if shortcut_repeats is None:
                        dst[:, :, a, :, b, :] = phase
                    else:
                        r = shortcut_repeats
                        torch.add(phase, src[..., k // r::4 // r][..., :cout], out=dst[:, :, a, :, b, :])
            yield nchw(dst.view(dst.shape[0], 2 * (i1 - i0), 2 * w, cout))
            del dst, src
        kept = res[:, -1:].clone() if end <= h else None
        done = i1
        del res
        held, first = held[:, :, done - first:], done  # the next result row reads source rows from done on


# ---- Winograd convolutions ------------------------------------------------------------------------------------

# Output tiles of 4x4 after the output transform: a 3x3 kernel takes 36 products per 16 outputs instead of 144
# (F(4x4,3x3)), the up blocks' 2x2 phase kernels 25 instead of 64 (F(4x4,2x2)). Used where the channel products
# (one batched matrix product) dominate and the transforms (1-D, along rows then columns, each one matrix product
# over a few tile rows) stay cheap: the CPU decode's ResBlocks of at least this many channels...
_WINOGRAD_MIN_CHANNELS = 128
# ... and its up blocks whose transformed 2x2 kernels (25 per pair of input and phase-output channels, against
# 4 taps) hold at most this many elements: 64 MB in fp32, up to 512 -> 256 channels; the wider, low-resolution
# up blocks keep the direct convolution.
_WINOGRAD_UP_MAX = 1 << 24
# Interpolation points of the Toom-Cook construction (plus the point at infinity), per kernel size. For 3 taps
# these are about 2.5x more accurate in fp32 than the common (0, +-1, +-2): relative error ~3e-6 of a
# convolution's largest output.
_WINOGRAD_POINTS = {3: (0.0, -1.0, 1.0, 0.5, -2.0), 2: (0.0, -1.0, 1.0, -2.0)}
# Transformed tiles (elements) computed at a time: a few tile rows, so that the transforms' temporaries (each up
# to 2.25x the input rows they cover) stay in the last-level cache instead of streaming through memory.
_WINOGRAD_CHUNK = 1 << 20
# ... but at least this many tiles, the rows of each frequency's channel product (fewer: the product streams the
# frequency's weights for too little work).
_WINOGRAD_MIN_TILES = 128


@functools.lru_cache(maxsize=None)
def _winograd_transforms(device: torch.device, r: int = 3) -> tuple:
    """(input transform B^T [n,n], output transform A^T [4,n], kernel transform G [n,r]) of F(4,r), n = r + 3,
    fp32; the 2-D transforms apply each along rows, then along columns. A^T and G follow from the points (G
    scaled by the Lagrange denominators); B^T is solved for from the defining identity A^T ((G g) * (B^T d)) =
    the 4 outputs of correlating the n inputs d with the r taps g, for all d and g."""
    m, n = 4, r + 3
    p = torch.tensor(_WINOGRAD_POINTS[r], dtype=torch.float64)
    at, g = torch.zeros(m, n, dtype=torch.float64), torch.zeros(n, r, dtype=torch.float64)
    for j in range(n - 1):
        others = torch.cat([p[:j], p[j + 1:]])
        at[:, j] = p[j] ** torch.arange(m)
        g[j] = p[j] ** torch.arange(r) / torch.prod(p[j] - others)
    at[m - 1, n - 1] = g[n - 1, r - 1] = 1.0
    # sum_j at[i,j] g[j,k] bt[j,l] = [l == i+k]: a linear system in the n*n entries of bt
    eqs = torch.einsum("ij,jk,jJ,lL->iklJL", at, g, torch.eye(n, dtype=torch.float64),
                       torch.eye(n, dtype=torch.float64)).reshape(m * r * n, n * n)
    rhs = torch.tensor([float(l == i + k) for i in range(m) for k in range(r) for l in range(n)], dtype=torch.float64)
    bt = torch.linalg.lstsq(eqs, rhs[:, None]).solution.view(n, n)
    return tuple(t.float().to(device) for t in (bt, at, g))


def _winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """A kernel [O, I, r, r] (r = 2 or 3) transformed for _winograd: [n*n, I, O], n = r + 3, frequency (column k,
    row l) at n*k + l."""
    o, i, r = weight.shape[:3]
    g = _winograd_transforms(weight.device, r)[2]
    return torch.einsum("li,kj,oxij->klxo", g, g, weight.float()).reshape(-1, i, o).contiguous()


def _winograd(x: torch.Tensor, wino: torch.Tensor, r: int, cols: int = 0) -> torch.Tensor:
    """The valid correlation of x [B, C, H, W] (fp32) plus ``cols`` zero columns on each side with the r x r
    kernel that ``wino`` (_winograd_weight) holds: pixel-major [B, H-r+1, W+2*cols-r+1, O], as Winograd
    F(4x4,rxr) over 4x4 output tiles, a few tile rows at a time (_WINOGRAD_CHUNK): the input transform along
    rows (windows of r+3 rows every 4), then along columns, each one matrix product over all those tiles, the
    frequencies' channel products as one batched product, the output transform along rows, then columns."""
    n = r + 3
    bt, at, _ = _winograd_transforms(x.device, r)
    b, c, h, w = x.shape
    o, rh, rw = wino.shape[-1], h - r + 1, w + 2 * cols - r + 1
    tr, tc = -(-rh // 4), -(-rw // 4)
    wp = 4 * tc + r - 1
    p = nhwc(F.pad(x, (cols, wp - w - cols, 0, 4 * tr + r - 1 - h))).contiguous()  # [B, 4tr+r-1, wp, C], zeros beyond
    sb, sh = p.stride()[:2]
    y = p.new_empty(b, tr, 4, tc, 4, o)
    step = max(-(-_WINOGRAD_MIN_TILES // (b * tc)), _WINOGRAD_CHUNK // (n * n * b * tc * max(c, o)))  # tile rows
    for i0 in range(0, tr, step):
        g = min(step, tr - i0)
        rows = p[:, 4 * i0:].as_strided((n, b, g, wp * c), (sh, sb, 4 * sh, 1)).reshape(n, -1)  # row j of each tile
        v = (bt @ rows).view(n, b, g, wp, c)  # [row freq, B, g, wp, C]
        del rows
        s = v.stride()
        tiles = v.as_strided((n, n, b, g, tc, c), (s[3], s[0], s[1], s[2], 4 * s[3], s[4])).reshape(n, -1)
        t = b * g * tc
        v = (bt @ tiles).view(n * n, t, c)  # [(column freq, row freq), T, C]: transformed input tiles
        del tiles
        prod = torch.bmm(v, wino)  # [n*n, T, O]
        del v
        z = torch.matmul(at, prod.view(n, n, t * o))  # [column freq, 4 rows, T*O]
        del prod
        z = (at @ z.view(n, -1)).view(4, 4, b, g, tc, o)  # [4 columns, 4 rows, B, g, tc, O]: output tiles
        y[:, i0:i0 + g].copy_(z.permute(2, 3, 1, 4, 0, 5))
        del z
    return y.view(b, 4 * tr, 4 * tc, o)[:, :rh, :rw]


def _conv3x3_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  wino: torch.Tensor | None = None) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=(0, 1)) for a window x [B, C, R+2, W] (channels-last, fp32): R rows.
    With ``wino`` (_winograd_weight(weight)) it runs as Winograd F(4x4,3x3) (_winograd)."""
    if wino is None:
        return F.conv2d(x, weight, bias, padding=(0, 1))
    y = _winograd(x, wino, 3, cols=1)
    if bias is not None:
        y.add_(bias)
    return channels_last(nchw(y))
