"""How DC-AE runs over parts of a map: the strategies that ``dcae_exec.decode``/``encode`` choose between.

- banded (decode_banded): every decoder layer over row bands of its input map, written back into it, so no
  temporary spans a whole map (attention in two passes: key statistics over all bands, then each band's
  queries; ResBlocks with conv1 one row ahead of conv2, recomputing nothing);
- streamed (decode_streamed): the layers after the decoder's last attention block pass row bands from one to
  the next, so no high-resolution map exists except the output;
- exact tiles (decode_tiled): the same local layers on tiles of the intermediate map with their full reach as
  halo, so the tiles join into exactly the untiled result (see decode_plan);
- blended tiles (run_blended): any map on overlapping tiles whose results are blended, for an encoder and for
  a decoder whose attention reaches the output resolution.

All but blended tiles give the untiled result up to summation order.
"""

from __future__ import annotations

import functools

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..dcae import (
    _ACTS,
    ChannelRMSNorm,
    Decoder,
    EfficientViTBlock,
    GLUMBConv,
    MultiscaleLinearAttention,
    ResBlock,
    UpBlock,
    _pointwise,
)
from ..ops import channels_last
from .. import heap
from . import kernels
from .kernels import (
    Run,
    _append,
    _bands,
    _conv3x3_rows,
    _rows,
    _upsample_stream,
    _winograd_weight,
    act_,
    forward,
    norm_,
    upblock,
)

# ---- blended tiles -----------------------------------------------------------------------------------------------


def _tile_starts(length: int, tile: int, overlap: int) -> list:
    """Start offsets of tiles of size ``tile`` covering ``length``, adjacent tiles overlapping >= ``overlap``,
    spread evenly so that the first starts at 0 and the last ends at ``length``."""
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [k * (length - tile) // (n - 1) for k in range(n)]


def _blend_ramp(size: int, ramp_start: bool, ramp_end: bool, overlap: float, device) -> torch.Tensor:
    """1-D blending weight of one tile. On a side shared with a neighbour the weight is ~0 over the outer quarter
    of the overlap (where the tile's border effects live), rises linearly across the middle half and is 1 beyond;
    a side on the image border keeps weight 1. A small floor keeps every covered pixel's weight sum positive."""
    pos = torch.arange(size, device=device, dtype=torch.float32) + 0.5
    w = torch.ones(size, device=device)
    margin, width = overlap / 4, max(overlap / 2, 1e-6)
    if ramp_start:
        w = torch.minimum(w, ((pos - margin) / width).clamp(1e-6, 1))
    if ramp_end:
        w = torch.minimum(w, ((size - pos - margin) / width).clamp(1e-6, 1))
    return w


def run_blended(fn, x: torch.Tensor, tile: int, overlap: int, unit: int, up: int, down: int, out_ch: int):
    """Apply ``fn`` (a fully convolutional map resizing by up/down) to overlapping tiles of ``x`` and blend the
    results linearly into one output, accumulated in fp32. tile/overlap count blocks of ``unit`` input pixels;
    tiles start on that grid."""
    b, _, h, w = x.shape
    ys = [s * unit for s in _tile_starts(h // unit, tile, overlap)]
    xs = [s * unit for s in _tile_starts(w // unit, tile, overlap)]
    tile, overlap = tile * unit, overlap * unit
    oh, ow = h * up // down, w * up // down
    out = torch.zeros(b, out_ch, oh, ow, device=x.device, dtype=torch.float32)
    wsum = torch.zeros(1, 1, oh, ow, device=x.device, dtype=torch.float32)
    o_out = overlap * up / down
    for y0 in ys:
        th = min(tile, h - y0)
        for x0 in xs:
            tw = min(tile, w - x0)
            y = fn(x[:, :, y0:y0 + th, x0:x0 + tw]).float()
            py, px = y0 * up // down, x0 * up // down
            ph, pw = y.shape[-2:]
            wy = _blend_ramp(ph, y0 > 0, y0 + th < h, o_out, x.device)
            wx = _blend_ramp(pw, x0 > 0, x0 + tw < w, o_out, x.device)
            wt = wy[:, None] * wx[None, :]
            out[:, :, py:py + ph, px:px + pw] += y * wt
            wsum[:, :, py:py + ph, px:px + pw] += wt
    return out / wsum


# ---- exact tiled decoding ------------------------------------------------------------------------------------
#
# Attention (EfficientViT blocks) mixes all positions, but only in the decoder's low-resolution stages; what
# follows the last attention block (up blocks, ResBlocks, norm_out, conv_out) is local: each output pixel
# depends on a bounded window of that intermediate map. So the decoder runs the global part on the whole
# latent (in row bands, to bound its temporaries) and the local part on tiles of the intermediate map that
# carry a halo of the local part's reach; cropping the halo leaves exactly the pixels of an untiled decode.


class _NotLocal(Exception):
    """Raised by ``_reach`` for a module whose output at a pixel can depend on far-away pixels."""


def _conv_reach(conv: nn.Conv2d, h: int) -> int:
    k, d = conv.kernel_size, conv.dilation
    r = d[0] * (k[0] // 2)
    if conv.stride != (1, 1) or k[0] != k[1] or k[0] % 2 == 0 or d[0] != d[1] or tuple(conv.padding) != (r, r):
        raise _NotLocal(conv)
    return h + r


def _reach(m: nn.Module, h: int) -> int:
    """Halo (in m's input pixels) needed around a region of m's input for m's outputs to be exact over that
    region grown by ``h`` output pixels on every side. Raises _NotLocal for attention, BatchNorm in training
    mode (batch statistics) and anything not known to be local."""
    if isinstance(m, nn.Sequential):
        for child in reversed(m):
            h = _reach(child, h)
        return h
    if isinstance(m, ResBlock):
        return _conv_reach(m.conv1, _reach(m.norm, _conv_reach(m.conv2, h)))
    if isinstance(m, GLUMBConv):
        return _conv_reach(m.conv_depth, h)
    if isinstance(m, UpBlock):
        r = _conv_reach(m.conv, 0)
        # interpolate: the conv runs on the 2x-upsampled map; pixel_shuffle: on the source, before the shuffle
        return -(-(h + r) // 2) if m.interpolate else -(-h // 2) + r
    if isinstance(m, nn.Conv2d):
        return _conv_reach(m, h)
    if isinstance(m, ChannelRMSNorm) or isinstance(m, tuple(_ACTS.values())):
        return h
    if isinstance(m, nn.BatchNorm2d) and not m.training:
        return h
    raise _NotLocal(m)


def _upscale(m: nn.Module) -> int:
    """Output pixels per input pixel along each side."""
    if isinstance(m, nn.Sequential):
        return math.prod(_upscale(c) for c in m)
    return 2 if isinstance(m, UpBlock) else 1


def _is_local(m: nn.Module) -> bool:
    try:
        _reach(m, 0)
        return True
    except _NotLocal:
        return False


@dataclass
class DecodePlan:
    """How the decoder splits for exact tiling: ``head`` runs on the whole map (after ``Decoder.embed``),
    ``tail`` on tiles; ``halos[j]`` is the halo ``tail[j]`` needs around a tile in its input pixels
    (``halos[0]``: the halo of the tiles cut from the intermediate map), ``halos[-1]`` is 0; ``scale`` is the
    tail's upsampling (intermediate map -> pixels)."""

    head: list
    tail: list
    halos: list
    scale: int


def decode_plan(decoder: Decoder) -> Optional[DecodePlan]:
    """Split after the last module that is not local (in practice: the last attention block). None when the
    tail would not upsample, i.e. attention reaches the output resolution and there is nothing worth tiling."""
    layers = decoder.layers()
    split = len(layers)
    while split > 0 and _is_local(layers[split - 1]):
        split -= 1
    tail = layers[split:]
    scale = math.prod(_upscale(m) for m in tail)
    if scale == 1:
        return None
    halos = [0] * (len(tail) + 1)
    for j in reversed(range(len(tail))):
        halos[j] = _reach(tail[j], halos[j + 1])
    return DecodePlan(layers[:split], tail, halos, scale)


def _spans(length: int, tile: int) -> list:
    """ceil(length / tile) consecutive spans covering [0, length), as even as possible (each <= tile)."""
    n = -(-length // tile)
    return [(k * length // n, (k + 1) * length // n) for k in range(n)]


def _window(c0: int, c1: int, halo: int, length: int) -> tuple:
    return max(c0 - halo, 0), min(c1 + halo, length)


# A tile is cropped to the halo the next layer needs only when that sheds at least this fraction of its pixels;
# below that, computing the extra border is cheaper than copying the tile.
_CROP_MIN = 0.05
# Output bands of a streamed CPU decode between two trims of the C heap (heap.trim): each trim hands back
# the arena's free pages, which the next bands fault in again, so trimming every band cost several percent.
_TRIM_EVERY = 8


def _band_rows(x: torch.Tensor, budget: int) -> int:
    """Rows per band of x such that a band holds about ``budget`` elements per batch item."""
    _, c, _, w = x.shape
    return max(1, budget // max(1, c * w))


def _banded(m: nn.Module, x: torch.Tensor, rows: int, run: Run) -> torch.Tensor:
    """m(x) for a local m, computed over bands of ``rows`` rows of x (see _stream). When m keeps the shape,
    results overwrite x one band late (by then the stream has copied the halo rows it still reads): x must be a
    temporary. Otherwise they go into a new output. ResBlocks write each band at once (see _resblock_banded);
    interpolating up blocks fill their own output (see kernels._upsample_conv)."""
    if isinstance(m, ResBlock):
        return _resblock_banded(m, x, rows, run)
    if isinstance(m, UpBlock) and m.interpolate:
        run.ran("upsample bands", rows)
        return upblock(m, x, run, rows)
    out, pending, i = None, None, 0
    for y in _stream(m, _bands(x, rows), x.shape[-2], run):
        if y.shape[1] == x.shape[1] and y.shape[-1] == x.shape[-1]:
            if pending is not None:
                x[:, :, pending[0]:pending[0] + pending[1].shape[-2]] = pending[1]
            pending = (i, y)
        else:
            if out is None:
                s = y.shape[-1] // x.shape[-1]
                out = channels_last(y.new_empty(y.shape[0], y.shape[1], x.shape[-2] * s, y.shape[-1]))
            out[:, :, i:i + y.shape[-2]] = y
        i += y.shape[-2]
        del y
    if out is None:
        x[:, :, pending[0]:pending[0] + pending[1].shape[-2]] = pending[1]
        return x
    return out


def _resblock_banded(m: ResBlock, x: torch.Tensor, rows: int, run: Run) -> torch.Tensor:
    """m(x) over bands of ``rows`` rows (see _resblock_stream), written into x (a temporary) band by band: x's
    rows are overwritten only once every conv1 row that reads them is done."""
    run.ran("resblock bands", rows)
    i = 0
    for y in _resblock_stream(m, _bands(x, rows), x.shape[-2], run):
        x[:, :, i:i + y.shape[-2]] = y
        i += y.shape[-2]
    return x


def _resblock_stream(m: ResBlock, bands, h: int, run: Run):
    """m over a map of h rows arriving as consecutive row bands; yields the output as consecutive bands. conv1
    runs one row ahead of conv2 and the two rows of its output that the next band's conv2 also reads are kept,
    so no row is computed twice."""
    held, first = None, 0  # input rows from ``first``
    acts, a_first = None, 0  # act(conv1) rows from ``a_first``
    done1 = done2 = 0  # conv1 rows computed, output rows emitted
    w1 = u1 = u2 = None
    for band in bands:
        if w1 is None:
            dt = band.dtype
            w1, w2 = m.conv1.weight.to(dt), m.conv2.weight.to(dt)
            b1 = None if m.conv1.bias is None else m.conv1.bias.to(dt)
            if run.cpu and dt == torch.float32 and band.shape[1] >= kernels._WINOGRAD_MIN_CHANNELS:
                u1, u2 = _winograd_weight(w1), _winograd_weight(w2)
            run.ran("resblock stream")
            run.ran("winograd 3x3" if u1 is not None else "direct 3x3")
        held = _append(held, band)
        have = first + held.shape[-2]
        e1 = h if have == h else have - 1  # conv1 row i reads input rows i-1..i+1
        if e1 > done1:
            y = _conv3x3_rows(_rows(held, first, done1 - 1, e1 + 1), w1, b1, u1)
            acts = _append(acts, act_(m.act, y))
            done1 = e1
        e2 = h if done1 == h else done1 - 1  # conv2 row i reads conv1 rows i-1..i+1
        if e2 > done2:
            y = norm_(m.norm, _conv3x3_rows(_rows(acts, a_first, done2 - 1, e2 + 1), w2, None, u2))
            yield y.add_(_rows(held, first, done2, e2))
            del y
            done2 = e2
        keep = max(min(done1 - 1, done2), first)
        held, first = held[:, :, keep - first:], keep
        if acts is not None:
            keep = max(done2 - 1, a_first)
            acts, a_first = acts[:, :, keep - a_first:], keep


@functools.lru_cache(maxsize=64)
def _role_rows(rows: int, head_dim: int, roles: tuple) -> torch.Tensor:
    """The fused q/k/v projection rows that belong to ``roles`` (0: q, 1: k, 2: v), built once on the CPU: no
    data-dependent op (``isin``, ``nonzero``) on the model's device, where it would wait for the device."""
    role = torch.arange(rows) // head_dim % 3
    return torch.nonzero(torch.isin(role, torch.tensor(roles))).flatten()


def _qkv(attn: MultiscaleLinearAttention, x: torch.Tensor, roles: tuple) -> torch.Tensor:
    """attn.qkv(x), only the channels that the heads read in ``roles`` (0: q, 1: k, 2: v): the fused projection
    rows of those roles, then each multiscale aggregate over just those channels (whole 1x1 groups)."""
    w = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight])
    idx = _role_rows(w.shape[0], attn.head_dim, tuple(roles)).to(w.device, non_blocking=True)
    qkv = _pointwise(x, w[idx])
    aggs = []
    for agg in attn.to_qkv_multiscale:
        pi, po, n, dt = agg.proj_in, agg.proj_out, len(idx), qkv.dtype
        y = F.conv2d(qkv, pi.weight[idx].to(dt), None, 1, pi.padding, 1, n)
        aggs.append(F.conv2d(y, po.weight[idx].to(dt), None, 1, 0, 1, n // po.weight.shape[1]))
    return torch.cat([qkv] + aggs, dim=1)


def _attention_banded(attn: MultiscaleLinearAttention, x: torch.Tensor, rows: int, run: Run) -> torch.Tensor:
    """attn(x) over bands of rows, in place on x (a temporary): one pass sums the key statistics over all
    positions from each band's keys and values, a second computes each band's queries and output."""
    r = max((agg.proj_in.kernel_size[0] // 2 for agg in attn.to_qkv_multiscale), default=0)
    h = x.shape[-2]
    rows = max(rows, r)
    run.ran("attention bands", rows)
    bands = [(i0, min(i0 + rows, h)) for i0 in range(0, h, rows)]

    def band_heads(i0, i1, roles):  # [B, heads, roles, d, N] over rows i0:i1
        a0, a1 = _window(i0, i1, r, h)
        return attn.heads(_qkv(attn, x[:, :, a0:a1], roles)[:, :, i0 - a0:i1 - a0], len(roles))

    stats = None
    for i0, i1 in bands:
        part = attn.key_stats(*band_heads(i0, i1, (1, 2)).unbind(2))
        stats = part if stats is None else tuple(s.add_(p) for s, p in zip(stats, part))
        del part
    pending = None
    for i0, i1 in bands:
        out = attn.attend(band_heads(i0, i1, (0,))[:, :, 0], stats).to(x.dtype)
        out = _pointwise(out.reshape(x.shape[0], -1, i1 - i0, x.shape[-1]), attn.to_out.weight)
        y = x[:, :, i0:i1] + norm_(attn.norm_out, out)
        del out
        if pending is not None:
            x[:, :, pending[0]:pending[1]] = pending[2]
        pending = (i0, i1, y)
    x[:, :, pending[0]:pending[1]] = pending[2]
    return x


def _head_step(m: nn.Module, x: torch.Tensor, budget: int, run: Run) -> torch.Tensor:
    """m(x) for one module of the head. Without autograd, a map of more than ``budget`` elements per batch
    item is done in row bands of about that size (attention: see _attention_banded), so that no temporary
    spans the whole map."""
    rows = _band_rows(x, budget)
    if not run.inplace or x.shape[-2] <= rows:
        return forward(m, x, run)
    if isinstance(m, EfficientViTBlock) and _is_local(m.attn.norm_out) and _is_local(m.conv_out):
        if x.shape[-2] * x.shape[-1] > m.attn.head_dim:  # else forward uses its N x N form; keep that
            x = _attention_banded(m.attn, x, rows, run)
            return _banded(m.conv_out, x, rows, run)
    elif _is_local(m):
        return _banded(m, x, rows, run)
    return forward(m, x, run)


def decode_banded(decoder: Decoder, z: torch.Tensor, run: Run) -> torch.Tensor:
    """decoder(z) without autograd, exactly (up to summation order), with every layer run over row bands of
    about ``run.band`` elements per batch item (see _head_step): no temporary the size of a whole feature map."""
    x = decoder.embed(z)
    for m in decoder.layers():
        x = _head_step(m, x, run.band, run)
    return x


def _recut(bands, budget: int):
    """The rows of ``bands`` again, in bands of about ``budget`` elements per batch item and at least 4 rows (a
    whole Winograd tile: wide maps would otherwise get bands of one or two rows)."""
    for band in bands:
        yield from _bands(band, max(4, _band_rows(band, budget)))


def _stream(m: nn.Module, bands, h: int, run: Run):
    """m (a local module) over a map of h rows arriving as consecutive row bands, yielding its output as
    consecutive row bands. ResBlocks and interpolating up blocks compute no row twice (_resblock_stream,
    kernels._upsample_stream); any other local module runs on each band with the halo rows it reaches
    (recomputed by the next band)."""
    if isinstance(m, ResBlock):
        yield from _resblock_stream(m, bands, h, run)
        return
    if isinstance(m, UpBlock) and m.interpolate and (not m.shortcut or 4 % m.repeats == 0):
        run.ran("upsample stream")
        yield from _upsample_stream(bands, h, m.conv.weight, m.conv.bias, m.repeats if m.shortcut else None, run=run)
        return
    r, s = _reach(m, 0), _upscale(m)
    held, first, done = None, 0, 0  # input rows from ``first``; output emitted for input rows [0, done)
    for band in bands:
        held = _append(held, band)
        have = first + held.shape[-2]
        end = h if have == h else have - r
        if end > done:
            a0, a1 = max(done - r, 0), min(end + r, h)
            yield forward(m, held[:, :, a0 - first:a1 - first], run)[:, :, (done - a0) * s:(end - a0) * s]
            done = end
        keep = max(done - r, first)
        held, first = held[:, :, keep - first:], keep


def decode_streamed(decoder: Decoder, z: torch.Tensor, run: Run) -> torch.Tensor:
    """decoder(z) without autograd, exactly (up to summation order): the head (see decode_plan) on the whole map
    in row bands of about ``run.band`` elements per batch item (see _head_step), then the tail streamed: each
    of its layers takes the previous one's output band by band and passes its own on (see _stream), so the
    tail needs no whole-map tensor, no tiles and no halo work, at any size. Every tail layer holds a band or
    two at once: half-size bands (at least 4 rows) bound that, for a lower peak at about the same speed. On CPU
    the C heap's free memory goes back to the system every _TRIM_EVERY output bands (heap.trim): the layers'
    band-sized temporaries, freed in between longer-lived ones, otherwise stay resident in malloc's arena."""
    plan = decode_plan(decoder)
    x = decoder.embed(z)
    for m in plan.head:
        x = _head_step(m, x, run.band, run)
    h = x.shape[-2]
    bands = iter([x])  # each stream cuts its input into bands
    for m in plan.tail:
        bands = _stream(m, _recut(bands, max(1, run.band // 2)), h, run)
        h *= _upscale(m)
    out, i = None, 0
    for n, y in enumerate(bands, 1):
        if out is None:
            out = y.new_empty(y.shape[0], y.shape[1], h, y.shape[-1])
        out[:, :, i:i + y.shape[-2]] = y
        i += y.shape[-2]
        del y
        if run.cpu and n % _TRIM_EVERY == 0:
            heap.trim()
    return out


def _tail_tile(plan: DecodePlan, x: torch.Tensor, ys: tuple, xs: tuple, run: Run) -> torch.Tensor:
    """The decoder's output over the tile ys x xs (spans of the intermediate map x), from a window of x. After
    each layer the window shrinks to the halo the layers left need (see _CROP_MIN)."""
    h, w = x.shape[-2:]
    (a0, a1), (b0, b1) = _window(*ys, plan.halos[0], h), _window(*xs, plan.halos[0], w)
    t = x[:, :, a0:a1, b0:b1].clone(memory_format=torch.channels_last)  # own copy: norms work in place
    scale = 1
    for j, m in enumerate(plan.tail):
        t = forward(m, t, run)
        s, halo, last = _upscale(m), plan.halos[j + 1], j == len(plan.tail) - 1
        scale, h, w, a0, a1, b0, b1 = scale * s, h * s, w * s, a0 * s, a1 * s, b0 * s, b1 * s
        c0, c1 = _window(ys[0] * scale, ys[1] * scale, halo, h)
        d0, d1 = _window(xs[0] * scale, xs[1] * scale, halo, w)
        if last or (c1 - c0) * (d1 - d0) <= (1 - _CROP_MIN) * (a1 - a0) * (b1 - b0):
            t = t[:, :, c0 - a0:c1 - a0, d0 - b0:d1 - b0]
            t = t if last else channels_last(t)
            a0, a1, b0, b1 = c0, c1, d0, d1
    return t


def tile_band(decoder: Decoder, plan: DecodePlan, tile: int) -> int:
    """The head's row-band budget for exact tiles of ``tile`` latent pixels: a band's map-sized temporaries hold
    a quarter of the elements of one output-resolution feature map of a tile (an attention block keeps about a
    dozen such temporaries at once, a ResBlock on a tile three maps), so the tile size bounds the memory of
    both parts."""
    up = math.prod(_upscale(m) for m in plan.head)  # intermediate pixels per latent pixel
    return (tile * up * plan.scale) ** 2 * decoder.norm_out.weight.shape[0] // 4


def decode_tiled(decoder: Decoder, z: torch.Tensor, run: Run, plan: DecodePlan | None = None) -> torch.Tensor:
    """decoder(z), exactly (up to summation order), with the tail run on tiles of ``run.tile_size`` latent
    pixels and the head on the whole map, in row bands where its maps are large (of tile_band elements, noted
    as ``run.band``). ``plan``: decode_plan(decoder) unless given."""
    plan = plan or decode_plan(decoder)
    tile = run.tile_size
    band = tile_band(decoder, plan, tile)
    run.band = band if run.inplace else None  # with autograd the head runs on whole maps
    up = math.prod(_upscale(m) for m in plan.head)
    s = plan.scale
    x = decoder.embed(z)
    for m in plan.head:
        x = _head_step(m, x, band, run)
    b, _, h, w = x.shape
    out = None
    for y0, y1 in _spans(z.shape[-2], tile):
        for x0, x1 in _spans(z.shape[-1], tile):
            t = _tail_tile(plan, x, (y0 * up, y1 * up), (x0 * up, x1 * up), run)
            if out is None:
                out = t.new_empty(b, t.shape[1], h * s, w * s)
            out[:, :, y0 * up * s:y1 * up * s, x0 * up * s:x1 * up * s] = t
            del t
    return out
