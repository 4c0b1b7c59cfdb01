"""DC-AE, the deep-compression autoencoder of Sana (f32c32: 32x downsampling, 32 latent channels).

Structure (from the DC-AE paper and the released configs), encoder then decoder:

    encoder:  conv_in 3x3 -> stages 0..n-1 (blocks, then a 2x down block between stages)
              -> conv_out 3x3 to latent channels, plus a channel-averaging shortcut
    decoder:  conv_in 3x3 from latent channels, plus a channel-repeating shortcut
              -> stages n-1..0 (a 2x up block into the stage, then blocks)
              -> RMSNorm -> ReLU -> conv_out 3x3 to RGB

Blocks are either a ResBlock (conv3x3, act, conv3x3 w/o bias, norm, residual) or an EfficientViT block
(multi-scale ReLU linear attention, residual; then GLUMBConv, residual). Down/up blocks add a parameter-free
shortcut (pixel-unshuffle + channel mean / channel repeat + pixel-shuffle) to a conv path.

Parameter names equal those of diffusers' ``AutoencoderDC`` so a diffusers ``vae/`` folder loads with
``load_state_dict(strict=True)``. Everything runs channels-first; pointwise projections stored as Linear
weights are applied as 1x1 convolutions.

Latents outside this module are model-space: ``encode`` returns ``raw * scaling_factor`` and ``decode``
divides by it first. ``encode_raw``/``decode_raw`` skip the scaling.

This module is the network as the paper draws it; every ``forward`` here is the plain reference. How the maps
are cut into tiles or row bands, and the faster kernels computing the same values, are in ``dcae_exec``, which
``DCAE.encode``/``decode`` run through.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import TwigError
from .ops import BatchNorm2d, Conv2d, Linear, dense, glu_conv_ffn, nchw, nhwc

RES_BLOCK = "ResBlock"
VIT_BLOCK = "EfficientViTBlock"
_BLOCK_TYPES = (RES_BLOCK, VIT_BLOCK)
_NORM_TYPES = ("rms_norm", "batch_norm")
_ACTS = {"silu": nn.SiLU, "swish": nn.SiLU, "relu": nn.ReLU, "relu6": nn.ReLU6, "gelu": nn.GELU, "mish": nn.Mish}


# --------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------


def _sana_types() -> tuple:
    return (RES_BLOCK,) * 3 + (VIT_BLOCK,) * 3


def _sana_scales() -> tuple:
    return ((), (), (), (5,), (5,), (5,))


@dataclass(frozen=True)
class DCAEConfig:
    """DC-AE hyper-parameters. Defaults are Sana 1.0's ``dc-ae-f32c32-sana-1.0``.

    Per-stage tuples run from the highest resolution (stage 0) to the lowest. ``downsample_block_type`` is
    "conv" (stride-2 conv) or "pixel_unshuffle"; ``upsample_block_type`` is "interpolate" (nearest 2x, conv)
    or "pixel_shuffle". The encoder always uses RMSNorm + SiLU; the decoder's norm/act are per stage.
    """

    in_channels: int = 3
    latent_channels: int = 32
    encoder_block_out_channels: tuple = (128, 256, 512, 512, 1024, 1024)
    decoder_block_out_channels: tuple = (128, 256, 512, 512, 1024, 1024)
    encoder_layers_per_block: tuple = (2, 2, 2, 3, 3, 3)
    decoder_layers_per_block: tuple = (3, 3, 3, 3, 3, 3)
    encoder_block_types: tuple = field(default_factory=_sana_types)
    decoder_block_types: tuple = field(default_factory=_sana_types)
    encoder_qkv_multiscales: tuple = field(default_factory=_sana_scales)
    decoder_qkv_multiscales: tuple = field(default_factory=_sana_scales)
    attention_head_dim: int = 32
    downsample_block_type: str = "conv"
    upsample_block_type: str = "interpolate"
    decoder_norm_types: tuple = ("rms_norm",) * 6
    decoder_act_fns: tuple = ("silu",) * 6
    encoder_out_shortcut: bool = True
    decoder_in_shortcut: bool = True
    decoder_conv_act_fn: str = "relu"
    scaling_factor: float = 0.41407

    def __post_init__(self):
        n = len(self.encoder_block_out_channels)
        if n < 1 or len(self.decoder_block_out_channels) != n:
            raise TwigError(
                f"DCAEConfig: encoder_block_out_channels ({n} stages) and decoder_block_out_channels "
                f"({len(self.decoder_block_out_channels)} stages) must have the same, non-zero length"
            )
        per_stage = (
            "encoder_layers_per_block", "decoder_layers_per_block", "encoder_block_types", "decoder_block_types",
            "encoder_qkv_multiscales", "decoder_qkv_multiscales", "decoder_norm_types", "decoder_act_fns",
        )
        for name in per_stage:
            if len(getattr(self, name)) != n:
                raise TwigError(f"DCAEConfig.{name} has {len(getattr(self, name))} entries, expected {n} (one per stage)")
        for name in ("encoder_block_types", "decoder_block_types"):
            bad = [t for t in getattr(self, name) if t not in _BLOCK_TYPES]
            if bad:
                raise TwigError(f"DCAEConfig.{name}: unknown block type(s) {bad}; expected one of {_BLOCK_TYPES}")
        bad = [t for t in self.decoder_norm_types if t not in _NORM_TYPES]
        if bad:
            raise TwigError(f"DCAEConfig.decoder_norm_types: unknown norm(s) {bad}; expected one of {_NORM_TYPES}")
        bad = [a for a in (*self.decoder_act_fns, self.decoder_conv_act_fn) if a not in _ACTS]
        if bad:
            raise TwigError(f"DCAEConfig: unknown activation(s) {bad}; expected one of {sorted(_ACTS)}")
        if self.downsample_block_type not in ("conv", "pixel_unshuffle"):
            raise TwigError(f"DCAEConfig.downsample_block_type={self.downsample_block_type!r}: use 'conv' or 'pixel_unshuffle'")
        if self.upsample_block_type not in ("interpolate", "pixel_shuffle"):
            raise TwigError(f"DCAEConfig.upsample_block_type={self.upsample_block_type!r}: use 'interpolate' or 'pixel_shuffle'")
        for side in ("encoder", "decoder"):
            layers = getattr(self, f"{side}_layers_per_block")
            if any(l == 0 for l in layers[1:]):
                raise TwigError(f"DCAEConfig.{side}_layers_per_block={layers}: only the first stage may have 0 layers")
            if n > 1 and layers[0] == 0 and layers[1] == 0:
                raise TwigError(f"DCAEConfig.{side}_layers_per_block={layers}: stages 0 and 1 cannot both be empty")

    @property
    def num_stages(self) -> int:
        return len(self.encoder_block_out_channels)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent pixel along each side (32 for f32c32)."""
        return 2 ** (self.num_stages - 1)

    def replace(self, **changes) -> "DCAEConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    # ---- construction from other descriptions -----------------------------------------------------------

    @classmethod
    def from_diffusers_config(cls, cfg: Mapping) -> "DCAEConfig":
        """Build from a diffusers ``AutoencoderDC`` ``config.json`` dict (strings broadcast to every stage)."""
        n = len(cfg.get("encoder_block_out_channels", cfg.get("block_out_channels", (0,) * 6)))

        def per_stage(key, default):
            v = cfg.get(key, default)
            if isinstance(v, str):
                return (v,) * n
            return tuple(v)

        out = dict(
            in_channels=int(cfg.get("in_channels", 3)),
            latent_channels=int(cfg.get("latent_channels", 32)),
            encoder_block_out_channels=tuple(cfg.get("encoder_block_out_channels", cfg.get("block_out_channels"))),
            decoder_block_out_channels=tuple(cfg.get("decoder_block_out_channels", cfg.get("block_out_channels"))),
            encoder_layers_per_block=tuple(cfg["encoder_layers_per_block"]),
            decoder_layers_per_block=tuple(cfg["decoder_layers_per_block"]),
            encoder_block_types=per_stage("encoder_block_types", RES_BLOCK),
            decoder_block_types=per_stage("decoder_block_types", RES_BLOCK),
            encoder_qkv_multiscales=tuple(tuple(s) for s in cfg.get("encoder_qkv_multiscales", ((),) * n)),
            decoder_qkv_multiscales=tuple(tuple(s) for s in cfg.get("decoder_qkv_multiscales", ((),) * n)),
            attention_head_dim=int(cfg.get("attention_head_dim", 32)),
            # diffusers treats every value other than these two exactly as the stride-2 conv / interpolate path.
            downsample_block_type="pixel_unshuffle" if cfg.get("downsample_block_type") == "pixel_unshuffle" else "conv",
            upsample_block_type="interpolate" if cfg.get("upsample_block_type") == "interpolate" else "pixel_shuffle",
            decoder_norm_types=per_stage("decoder_norm_types", "rms_norm"),
            decoder_act_fns=per_stage("decoder_act_fns", "silu"),
            encoder_out_shortcut=bool(cfg.get("encoder_out_shortcut", True)),
            decoder_in_shortcut=bool(cfg.get("decoder_in_shortcut", True)),
            decoder_conv_act_fn=str(cfg.get("decoder_conv_act_fn", "relu")),
            scaling_factor=float(cfg.get("scaling_factor", 1.0)),
        )
        return cls(**out)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], **overrides) -> "DCAEConfig":
        """Infer the architecture from a diffusers-named state dict (keys ``encoder.*`` / ``decoder.*``).

        Shapes give channels, layers, block types, multiscale kernels, head dim, down/up block types and
        decoder norm types. Not visible in the weights, so taken from the released configs unless overridden:
        decoder activations (ReLU where a stage uses BatchNorm, SiLU elsewhere), ``decoder_conv_act_fn``
        ("relu"), the shortcuts (on), ``scaling_factor`` (0.41407) and, when no EfficientViT block has a
        multiscale branch (whose grouped conv reveals it), ``attention_head_dim`` (32). A stage with no layers
        is unused by the network: its width is set to half of stage 1's, its types to stage 1's.
        """
        try:
            return cls(**{**_infer_config(sd), **overrides})
        except KeyError as e:
            raise TwigError(f"DC-AE state dict: missing tensor {e.args[0]!r}; is this a diffusers AutoencoderDC (vae/) file?") from None


def _infer_config(sd: Mapping[str, torch.Tensor]) -> dict:
    keys = list(sd.keys())
    if not any(k.startswith("encoder.") for k in keys) or not any(k.startswith("decoder.") for k in keys):
        raise TwigError("DC-AE state dict: expected keys under 'encoder.' and 'decoder.' (diffusers AutoencoderDC names)")

    def shape(k):
        return tuple(sd[k].shape)

    def stage_blocks(prefix: str) -> dict[int, dict[int, set]]:
        # stage -> block index -> set of the block's direct child names
        out: dict[int, dict[int, set]] = {}
        for k in keys:
            if k.startswith(prefix):
                parts = k[len(prefix):].split(".")
                out.setdefault(int(parts[0]), {}).setdefault(int(parts[1]), set()).add(parts[2])
        return out

    def describe(side: str, stages: dict, n: int):
        layers, types, chans, scales, norms = [], [], [], [], []
        head_dim = None
        resample_shapes = {}
        for i in range(n):
            blocks = stages.get(i, {})
            count, btype, ch, sc, norm = 0, RES_BLOCK, None, (), "rms_norm"
            for j in sorted(blocks):
                children = blocks[j]
                p = f"{side}.{'down' if side == 'encoder' else 'up'}_blocks.{i}.{j}"
                if "conv1" in children:
                    count, btype = count + 1, RES_BLOCK
                    ch = shape(f"{p}.conv1.weight")[0]
                    norm = "batch_norm" if f"{p}.norm.running_mean" in sd else "rms_norm"
                elif "attn" in children:
                    count, btype = count + 1, VIT_BLOCK
                    ch = shape(f"{p}.attn.to_q.weight")[1]
                    ks, m = [], 0
                    while f"{p}.attn.to_qkv_multiscale.{m}.proj_in.weight" in sd:
                        ks.append(shape(f"{p}.attn.to_qkv_multiscale.{m}.proj_in.weight")[-1])
                        head_dim = shape(f"{p}.attn.to_qkv_multiscale.{m}.proj_out.weight")[1]
                        m += 1
                    sc = tuple(ks)
                    norm = "batch_norm" if f"{p}.attn.norm_out.running_mean" in sd else "rms_norm"
                else:  # the stage's down/up block: just a conv
                    resample_shapes[i] = shape(f"{p}.conv.weight")
            layers.append(count)
            types.append(btype)
            chans.append(ch)
            scales.append(sc)
            norms.append(norm)
        # A stage without layers has no weights to look at; it is described like the stage after it.
        for i in reversed(range(n - 1)):
            if layers[i] == 0:
                types[i], scales[i], norms[i] = types[i + 1], scales[i + 1], norms[i + 1]
        return layers, types, chans, scales, norms, head_dim, resample_shapes

    enc_stages = stage_blocks("encoder.down_blocks.")
    dec_stages = stage_blocks("decoder.up_blocks.")
    n = max(max(enc_stages, default=-1), max(dec_stages, default=-1)) + 1
    if n < 1:
        raise TwigError("DC-AE state dict: no encoder.down_blocks / decoder.up_blocks tensors found")

    e_layers, e_types, e_ch, e_sc, _, e_hd, e_res = describe("encoder", enc_stages, n)
    d_layers, d_types, d_ch, d_sc, d_norms, d_hd, d_res = describe("decoder", dec_stages, n)
    for ch in (e_ch, d_ch):
        if ch[0] is None and n > 1:
            ch[0] = max(1, (ch[1] or 2) // 2)  # unused by a stage without layers

    if e_layers[0] > 0:
        in_channels = shape("encoder.conv_in.weight")[1]
    else:
        in_channels = shape("encoder.conv_in.conv.weight")[1]
    latent_channels = shape("encoder.conv_out.weight")[0]

    # A down block's conv outputs C[i+1] (stride-2 conv) or C[i+1]/4 (then pixel-unshuffle); with an empty
    # stage 0 the input conv is such a block too (into C[1]). Likewise an up block's conv outputs C[i]
    # (interpolate first) or 4*C[i] (then pixel-shuffle).
    if e_res:
        i, s = min(e_res.items())
        down = "conv" if s[0] == e_ch[i + 1] else "pixel_unshuffle"
    elif e_layers[0] == 0:
        down = "conv" if shape("encoder.conv_in.conv.weight")[0] == e_ch[1] else "pixel_unshuffle"
    else:
        down = "conv"
    if d_res:
        i, s = min(d_res.items())
        up = "interpolate" if s[0] == d_ch[i] else "pixel_shuffle"
    elif d_layers[0] == 0:
        up = "interpolate" if shape("decoder.conv_out.conv.weight")[0] == in_channels else "pixel_shuffle"
    else:
        up = "interpolate"

    head_dim = e_hd or d_hd or 32
    return dict(
        in_channels=in_channels,
        latent_channels=latent_channels,
        encoder_block_out_channels=tuple(e_ch),
        decoder_block_out_channels=tuple(d_ch),
        encoder_layers_per_block=tuple(e_layers),
        decoder_layers_per_block=tuple(d_layers),
        encoder_block_types=tuple(e_types),
        decoder_block_types=tuple(d_types),
        encoder_qkv_multiscales=tuple(e_sc),
        decoder_qkv_multiscales=tuple(d_sc),
        attention_head_dim=head_dim,
        downsample_block_type=down,
        upsample_block_type=up,
        decoder_norm_types=tuple(d_norms),
        decoder_act_fns=tuple("relu" if nt == "batch_norm" else "silu" for nt in d_norms),
    )


DCAE_F32C32_SANA = DCAEConfig()
PRESETS = {"dc-ae-f32c32-sana-1.0": DCAE_F32C32_SANA}


# --------------------------------------------------------------------------------------------------------------
# Building blocks. Shapes are [B,C,H,W]; the model keeps channels-last (NHWC-stored) tensors, so channel norms and
# 1x1 products read contiguous pixel rows.
# --------------------------------------------------------------------------------------------------------------


class ChannelRMSNorm(nn.Module):
    """RMSNorm over the channel axis of [B,C,H,W], with learned scale and shift; normalised in fp32."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(nhwc(x).float(), (x.shape[1],), eps=self.eps).to(x.dtype)
        return nchw(y * self.weight.to(y.dtype) + self.bias.to(y.dtype))


def _norm(kind: str, channels: int) -> nn.Module:
    return ChannelRMSNorm(channels) if kind == "rms_norm" else BatchNorm2d(channels, eps=1e-5)


def _pointwise(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Apply a Linear weight [out, in] over the channels of [B, in, H, W] (a 1x1 conv); channels-last out."""
    return nchw(dense(nhwc(x), weight))


class ResBlock(nn.Module):
    def __init__(self, channels: int, norm: str = "rms_norm", act: str = "silu"):
        super().__init__()
        self.conv1 = Conv2d(channels, channels, 3, 1, 1)
        self.act = _ACTS[act]()
        self.conv2 = Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.norm = _norm(norm, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.conv2(self.act(self.conv1(x))))


class MultiscaleQKV(nn.Module):
    """Aggregates q/k/v over a k x k neighbourhood: depthwise k x k conv, then a 1x1 conv within each head."""

    def __init__(self, channels: int, groups: int, kernel_size: int):
        super().__init__()
        self.proj_in = Conv2d(channels, channels, kernel_size, 1, kernel_size // 2, groups=channels, bias=False)
        self.proj_out = Conv2d(channels, channels, 1, 1, 0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.proj_in(x))


class MultiscaleLinearAttention(nn.Module):
    """ReLU linear attention over all positions, with extra q/k/v "scales" from local aggregation.

    Heads come from the fused qkv tensor [q | k | v] (each ``heads*head_dim`` channels) cut into consecutive
    groups of ``3*head_dim`` channels, each group read as (q, k, v) of one head -- so a head's q, k and v do
    not come from to_q, to_k and to_v respectively. Each aggregation scale adds the same number of heads.
    """

    eps = 1e-15

    def __init__(self, channels: int, head_dim: int, kernel_sizes: tuple, norm: str = "rms_norm"):
        super().__init__()
        self.head_dim = head_dim
        heads = channels // head_dim
        inner = heads * head_dim
        self.to_q = Linear(channels, inner, bias=False)
        self.to_k = Linear(channels, inner, bias=False)
        self.to_v = Linear(channels, inner, bias=False)
        self.to_qkv_multiscale = nn.ModuleList(MultiscaleQKV(3 * inner, 3 * heads, k) for k in kernel_sizes)
        self.to_out = Linear(inner * (1 + len(kernel_sizes)), channels, bias=False)
        self.norm_out = _norm(norm, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm_out(_pointwise(self.attention(x), self.to_out.weight))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Every head's attention output at x's positions, [B, heads*d, H, W] (before the output projection)."""
        b, _, h, w = x.shape
        qkv = self.heads(self.qkv(x))
        if h * w > self.head_dim:
            q, k, v = qkv.unbind(2)
            out = self.attend(q, self.key_stats(k, v)).to(x.dtype)
        else:
            out = self._quadratic(qkv)
        return out.reshape(b, -1, h, w)

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """Fused q/k/v plus the multiscale aggregates, [B, 3*inner*(1+scales), H, W] channels-last."""
        qkv = _pointwise(x, torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight]))
        return torch.cat([qkv] + [agg(qkv) for agg in self.to_qkv_multiscale], dim=1)

    def heads(self, qkv: torch.Tensor, roles: int = 3) -> torch.Tensor:
        b, _, h, w = qkv.shape
        return qkv.reshape(b, -1, roles, self.head_dim, h * w)  # [B, heads, roles (q,k,v), d, N]

    @staticmethod
    def key_stats(k: torch.Tensor, v: torch.Tensor) -> tuple:
        """(sum_m v_m k_m^T [B,h,d,d], sum_m k_m^T [B,h,1,d]) over the positions of k, v [B,h,d,N], in fp32;
        sums over disjoint sets of positions add up to the sums over their union."""
        k, v = F.relu(k.float()), v.float()
        return v @ k.transpose(-1, -2), k.sum(dim=-1, keepdim=True).transpose(-1, -2)

    def attend(self, q: torch.Tensor, stats: tuple) -> torch.Tensor:
        # out_n = sum_m v_m (k_m . q_n) / (sum_m k_m . q_n + eps), associated as (v k^T) q: O(N d^2), in fp32.
        q = F.relu(q.float())
        vk, ks = stats
        return (vk @ q) / (ks @ q + self.eps)  # [B, h, d, N]

    def _quadratic(self, qkv: torch.Tensor) -> torch.Tensor:
        # Same quantity via the N x N score matrix; cheaper when N <= d (tiny feature maps).
        # In fp32 like the linear path: k^T q sums d products of unbounded ReLU activations, past fp16's range.
        q, k, v = (t.float() for t in qkv.unbind(2))
        scores = F.relu(k).transpose(-1, -2) @ F.relu(q)  # [B, h, N_keys, N_queries]
        scores = scores / (scores.sum(dim=2, keepdim=True) + self.eps)
        return (v @ scores).to(qkv.dtype)


class GLUMBConv(nn.Module):
    """Inverted bottleneck with a gated depthwise conv: 1x1 up (x8), SiLU, 3x3 depthwise, x*SiLU(gate), 1x1 down."""

    def __init__(self, channels: int, expand: int = 4):
        super().__init__()
        hidden = channels * expand
        self.conv_inverted = Conv2d(channels, 2 * hidden, 1)
        self.conv_depth = Conv2d(2 * hidden, 2 * hidden, 3, 1, 1, groups=2 * hidden)
        self.conv_point = Conv2d(hidden, channels, 1, bias=False)
        self.norm = ChannelRMSNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.bottleneck(x))

    def bottleneck(self, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """The block without norm and residual; ``chunk``: hidden channels per piece (see ops.glu_conv_ffn)."""
        up, dw = self.conv_inverted, self.conv_depth
        return nchw(glu_conv_ffn(nhwc(x), up.weight, up.bias, dw.weight, dw.bias, self.conv_point.weight, chunk))


class EfficientViTBlock(nn.Module):
    def __init__(self, channels: int, head_dim: int, kernel_sizes: tuple, norm: str = "rms_norm"):
        super().__init__()
        self.attn = MultiscaleLinearAttention(channels, head_dim, kernel_sizes, norm)
        self.conv_out = GLUMBConv(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.attn(x))


class DownBlock(nn.Module):
    """2x downsampling: a conv path (stride-2 conv, or conv then pixel-unshuffle) plus, optionally, a
    parameter-free shortcut (pixel-unshuffle, then the mean over groups of consecutive channels)."""

    def __init__(self, cin: int, cout: int, pixel_unshuffle: bool, shortcut: bool = True):
        super().__init__()
        self.pixel_unshuffle = pixel_unshuffle
        self.shortcut = shortcut
        self.group = cin * 4 // cout
        self.conv = Conv2d(cin, cout // 4 if pixel_unshuffle else cout, 3, 1 if pixel_unshuffle else 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.pixel_unshuffle:
            y = F.pixel_unshuffle(y, 2)
        if self.shortcut:
            s = F.pixel_unshuffle(x, 2)
            y = y + s.unflatten(1, (-1, self.group)).mean(dim=2)
        return y


class UpBlock(nn.Module):
    """2x upsampling: a conv path (nearest 2x then conv, or conv then pixel-shuffle) plus, optionally, a
    parameter-free shortcut (repeat each channel, then pixel-shuffle)."""

    def __init__(self, cin: int, cout: int, interpolate: bool, shortcut: bool = True):
        super().__init__()
        self.interpolate = interpolate
        self.shortcut = shortcut
        self.repeats = cout * 4 // cin
        self.conv = Conv2d(cin, cout if interpolate else cout * 4, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.interpolate:
            y = self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        else:
            y = F.pixel_shuffle(self.conv(x), 2)
        if self.shortcut:
            y = y + F.pixel_shuffle(x.repeat_interleave(self.repeats, dim=1), 2)
        return y


def _block(kind: str, channels: int, head_dim: int, scales: tuple, norm: str, act: str) -> nn.Module:
    if kind == RES_BLOCK:
        return ResBlock(channels, norm, act)
    return EfficientViTBlock(channels, head_dim, scales, norm)


class Encoder(nn.Module):
    def __init__(self, cfg: DCAEConfig):
        super().__init__()
        ch, layers, n = cfg.encoder_block_out_channels, cfg.encoder_layers_per_block, cfg.num_stages
        unshuffle = cfg.downsample_block_type == "pixel_unshuffle"
        if layers[0] > 0:
            self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, 1, 1)
        else:  # stage 0 is empty: the input conv downsamples straight to stage 1's width
            self.conv_in = DownBlock(cfg.in_channels, ch[1], unshuffle, shortcut=False)
        stages = []
        for i in range(n):
            mods = [
                _block(cfg.encoder_block_types[i], ch[i], cfg.attention_head_dim, cfg.encoder_qkv_multiscales[i],
                       "rms_norm", "silu")
                for _ in range(layers[i])
            ]
            if i < n - 1 and layers[i] > 0:
                mods.append(DownBlock(ch[i], ch[i + 1], unshuffle))
            stages.append(nn.Sequential(*mods))
        self.down_blocks = nn.ModuleList(stages)
        self.conv_out = Conv2d(ch[-1], cfg.latent_channels, 3, 1, 1)
        self.out_shortcut = cfg.encoder_out_shortcut
        self.out_group = ch[-1] // cfg.latent_channels

    def layers(self) -> list:
        """Every module before ``project``, in the order they run: conv_in, then the stages from the highest
        resolution to the lowest (each its blocks, then its down block)."""
        return [self.conv_in] + [m for stage in self.down_blocks for m in stage]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The output conv (plus shortcut): the lowest-resolution stage's width -> latent channels."""
        y = self.conv_out(x)
        if self.out_shortcut:
            y = y + x.unflatten(1, (-1, self.out_group)).mean(dim=2)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.layers():
            x = m(x)
        return self.project(x)


class Decoder(nn.Module):
    def __init__(self, cfg: DCAEConfig):
        super().__init__()
        ch, layers, n = cfg.decoder_block_out_channels, cfg.decoder_layers_per_block, cfg.num_stages
        interp = cfg.upsample_block_type == "interpolate"
        self.conv_in = Conv2d(cfg.latent_channels, ch[-1], 3, 1, 1)
        self.in_shortcut = cfg.decoder_in_shortcut
        self.in_repeats = ch[-1] // cfg.latent_channels
        stages = []
        for i in range(n):
            mods = [UpBlock(ch[i + 1], ch[i], interp)] if (i < n - 1 and layers[i] > 0) else []
            mods += [
                _block(cfg.decoder_block_types[i], ch[i], cfg.attention_head_dim, cfg.decoder_qkv_multiscales[i],
                       cfg.decoder_norm_types[i], cfg.decoder_act_fns[i])
                for _ in range(layers[i])
            ]
            stages.append(nn.Sequential(*mods))
        self.up_blocks = nn.ModuleList(stages)  # indexed by stage; run from the last to the first
        out_ch = ch[0] if layers[0] > 0 else ch[1]
        self.norm_out = ChannelRMSNorm(out_ch)
        self.conv_act = _ACTS[cfg.decoder_conv_act_fn]()
        if layers[0] > 0:
            self.conv_out = Conv2d(out_ch, cfg.in_channels, 3, 1, 1)
        else:  # stage 0 is empty: the output conv upsamples straight to pixels
            self.conv_out = UpBlock(out_ch, cfg.in_channels, interp, shortcut=False)

    def embed(self, z: torch.Tensor) -> torch.Tensor:
        """The input conv (plus shortcut): latent -> the lowest-resolution stage's width."""
        x = self.conv_in(z)
        if self.in_shortcut:
            x = x + z.repeat_interleave(self.in_repeats, dim=1)
        return x

    def layers(self) -> list:
        """Every module after ``embed``, in the order they run: the stages from the lowest resolution to the
        highest (each its up block, then its blocks), then norm_out, the activation and conv_out."""
        return [m for stage in reversed(self.up_blocks) for m in stage] + [self.norm_out, self.conv_act, self.conv_out]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.embed(z)
        for m in self.layers():
            x = m(x)
        return x



TileSize = Union[int, str, None]


# --------------------------------------------------------------------------------------------------------------
# The autoencoder
# --------------------------------------------------------------------------------------------------------------


class DCAE(nn.Module):
    """DC-AE encoder + decoder. Images are [B,3,H,W] in [-1,1]; latents are model-space (scaled).

    Computation runs on the module's device in ``dtype`` (``compute_dtype``, else the weights' dtype); results
    come back on the input's device in the input's dtype.

    The encoder may be deferred (``defer_encoder``; ``loader.load_vae`` does so by default): until something
    reads ``self.encoder`` (``encode``, ``encode_raw``, ``load_encoder()``) the model holds the decoder only, and
    ``parameters()``, ``state_dict()``, ``.to()`` and the like cover the decoder only, i.e. what is in memory.
    """

    def __init__(self, config: DCAEConfig = DCAE_F32C32_SANA, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        # None: compute in the weights' dtype; else weights may stay stored in fp16/bf16 (half the memory)
        # while every layer computes in this dtype, casting its own weights as it runs.
        self.compute_dtype = compute_dtype
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self._encoder_source = None  # see defer_encoder
        self._encoder_grad = True  # the last requires_grad_ flag, for an encoder read later

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], strict: bool = True, **config_overrides) -> "DCAE":
        """Build with the config inferred from ``sd`` (diffusers names) and load it without random init.
        The tensors of ``sd`` are used in place (no copy); the model is returned in eval mode."""
        cfg = DCAEConfig.from_state_dict(sd, **config_overrides)
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict(sd, strict=strict, assign=True)
        return model.eval()

    # ---- deferred encoder ------------------------------------------------------------------------------

    def defer_encoder(self, source) -> "DCAE":
        """Drop the encoder until something needs it. ``source(model, dtype, device)`` is then called once,
        with the meta-device encoder in place, to fill ``model.encoder``'s weights in ``dtype`` on ``device``:
        the decoder's weight dtype and device at that moment, so ``.to()``/``.half()`` made before still hold."""
        del self.encoder
        self._encoder_source = source
        return self

    @property
    def encoder_loaded(self) -> bool:
        return self.__dict__.get("_encoder_source") is None

    def load_encoder(self) -> Encoder:
        """The encoder, its weights read first if they were deferred."""
        source = self.__dict__.get("_encoder_source")
        if source is not None:
            ref = self._param()
            with torch.device("meta"):
                enc = Encoder(self.config)
            rest = dict(self._modules)
            self._modules.clear()
            self._modules.update(encoder=enc, **rest)  # the order of an eagerly built model
            self._encoder_source = None
            try:
                source(self, ref.dtype, ref.device)
            except BaseException:
                del self._modules["encoder"]  # no meta tensors left behind; a later call tries again
                self._encoder_source = source
                raise
            enc.train(self.training).requires_grad_(self._encoder_grad)
        return self._modules["encoder"]

    def __getattr__(self, name: str):
        if name == "encoder" and self.__dict__.get("_encoder_source") is not None:
            return self.load_encoder()
        return super().__getattr__(name)

    def requires_grad_(self, requires_grad: bool = True) -> "DCAE":
        self._encoder_grad = requires_grad
        return super().requires_grad_(requires_grad)

    def load_state_dict(self, state_dict, *args, **kwargs):
        if not self.encoder_loaded and any(k.startswith("encoder.") for k in state_dict):
            self.load_encoder()  # read, then overwritten: simpler than a second way to build it
        return super().load_state_dict(state_dict, *args, **kwargs)

    def extra_repr(self) -> str:
        return "" if self.encoder_loaded else "encoder: not loaded yet (read on first encode)"

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def spatial_factor(self) -> int:
        return self.config.spatial_factor

    def _param(self) -> torch.Tensor:
        return self.decoder.conv_in.weight

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in."""
        return self.compute_dtype or self._param().dtype

    # ---- encode / decode ---------------------------------------------------------------------------------
    # The whole network on the input, run by dcae_exec (which also validates the input once and picks how the
    # maps are cut: tiles, row bands; see there). Works under torch.no_grad/inference_mode and with autograd.

    def encode_raw(self, images: torch.Tensor, tile_size: TileSize = None, overlap: Optional[int] = None) -> torch.Tensor:
        """Images [B,3,H,W] in [-1,1] -> unscaled latent [B,C,H/f,W/f]. tile_size/overlap in pixels
        (multiples of the spatial factor; overlap defaults to a quarter tile); 'auto' tiles above 1024² px."""
        return self._encode(images, tile_size, overlap, raw=True)

    def decode_raw(self, latent: torch.Tensor, tile_size: TileSize = None, overlap: Optional[int] = None) -> torch.Tensor:
        """Unscaled latent [B,C,h,w] -> images [B,3,h*f,w*f], roughly [-1,1], not clamped. tile_size and
        overlap in latent pixels ('auto' tiles above 32x32); tiled or not, the result is the untiled one unless
        attention reaches the output resolution (then tiles are blended over ``overlap``)."""
        from . import dcae_exec

        return dcae_exec.decode(self, latent, tile_size=tile_size, overlap=overlap, raw=True, retry=False)[0]

    def encode(self, images: torch.Tensor, tile_size: TileSize = None, overlap: Optional[int] = None) -> torch.Tensor:
        """Images [B,3,H,W] in [-1,1] -> model-space latent (raw * scaling_factor)."""
        return self._encode(images, tile_size, overlap, raw=False)

    def decode(self, latent: torch.Tensor, tile_size: TileSize = None, overlap: Optional[int] = None) -> torch.Tensor:
        """Model-space latent -> images [B,3,H,W] in about [-1,1] (caller clamps)."""
        from . import dcae_exec

        return dcae_exec.decode(self, latent, tile_size=tile_size, overlap=overlap, retry=False)[0]

    def _encode(self, images, tile_size, overlap, raw: bool) -> torch.Tensor:
        from . import dcae_exec

        f = self.spatial_factor
        for name, px in (("tile_size", tile_size), ("overlap", overlap)):
            if isinstance(px, int) and not isinstance(px, bool) and px % f:
                raise TwigError(f"DCAE.encode: {name} {px} px is not a multiple of {f}")
        tile = tile_size // f if isinstance(tile_size, int) and not isinstance(tile_size, bool) else tile_size
        overlap = overlap // f if isinstance(overlap, int) and not isinstance(overlap, bool) else overlap
        return dcae_exec.encode(self, images, tile_size=tile, overlap=overlap, raw=raw, retry=False)[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction: decode(encode(images))."""
        return self.decode(self.encode(images))
