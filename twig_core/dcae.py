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
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import TwigError
from .ops import BatchNorm2d, Conv2d, Linear, channels_last, dense, glu_conv_ffn, nchw, nhwc

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
# Building blocks. Shapes are [B,C,H,W]; DCAE runs them on channels-last (NHWC-stored) tensors, which every
# block keeps, so channel norms and 1x1 products read contiguous pixel rows.
# --------------------------------------------------------------------------------------------------------------


class ChannelRMSNorm(nn.Module):
    """RMSNorm over the channel axis of [B,C,H,W], with learned scale and shift; normalised in fp32."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        xf = nhwc(x).float()
        if torch.is_grad_enabled():
            y = F.rms_norm(xf, (x.shape[1],), eps=self.eps)
        else:  # sampling: three passes over the pixels (norm, scale, affine), overwriting x (always a temporary)
            ms = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[1])
            y = xf.mul_(ms.add_(self.eps).rsqrt_())
        y = y.to(x.dtype)  # no-op in fp32
        w, b = w.to(y.dtype), b.to(y.dtype)
        y = torch.addcmul(b, y, w, out=y) if not torch.is_grad_enabled() else y * w + b
        return nchw(y)


def _norm(kind: str, channels: int) -> nn.Module:
    return ChannelRMSNorm(channels) if kind == "rms_norm" else BatchNorm2d(channels, eps=1e-5)


def _pointwise(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Apply a Linear weight [out, in] over the channels of [B, in, H, W] (a 1x1 conv); channels-last out."""
    return nchw(dense(nhwc(x), weight))


def _act(act: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """``act(y)``; without autograd it overwrites y where the activation has an in-place form (y: a temporary)."""
    if not torch.is_grad_enabled() and isinstance(act, (nn.SiLU, nn.ReLU)):
        return F.silu(y, inplace=True) if isinstance(act, nn.SiLU) else F.relu(y, inplace=True)
    return act(y)


def _residual(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x + y; without autograd it adds into y (a temporary)."""
    return x + y if torch.is_grad_enabled() else y.add_(x)


class ResBlock(nn.Module):
    def __init__(self, channels: int, norm: str = "rms_norm", act: str = "silu"):
        super().__init__()
        self.conv1 = Conv2d(channels, channels, 3, 1, 1)
        self.act = _ACTS[act]()
        self.conv2 = Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.norm = _norm(norm, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _residual(self.norm(self.conv2(_act(self.act, self.conv1(x)))), x)


class MultiscaleQKV(nn.Module):
    """Aggregates q/k/v over a k x k neighbourhood: depthwise k x k conv, then a 1x1 conv within each head."""

    def __init__(self, channels: int, groups: int, kernel_size: int):
        super().__init__()
        self.proj_in = Conv2d(channels, channels, kernel_size, 1, kernel_size // 2, groups=channels, bias=False)
        self.proj_out = Conv2d(channels, channels, 1, 1, 0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor, channels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``channels``: when given, x holds only these of the module's channels (whole 1x1 groups, ascending)
        and only their outputs are computed."""
        if channels is None:
            return self.proj_out(self.proj_in(x))
        pi, po, n, dt = self.proj_in, self.proj_out, len(channels), x.dtype
        y = F.conv2d(x, pi.weight[channels].to(dt), None, 1, pi.padding, 1, n)
        return F.conv2d(y, po.weight[channels].to(dt), None, 1, 0, 1, n // po.weight.shape[1])


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
        n = x.shape[-2] * x.shape[-1]
        qkv = self.heads(self.qkv(x))
        if n > self.head_dim:
            q, k, v = qkv.unbind(2)
            out = self.attend(q, self.key_stats(k, v)).to(x.dtype)
        else:
            out = self._quadratic(qkv)
        return self.finish(x, out)

    # The pieces of forward, also run separately over row bands (see _attention_banded): only key_stats sums
    # over all positions; the rest is per pixel apart from the multiscale kernels' reach.

    def qkv_weight(self, roles: tuple = (0, 1, 2)) -> tuple:
        """(fused projection weight, its rows' indices or None for all) for the qkv channels that the heads
        read in ``roles`` (0: q, 1: k, 2: v)."""
        w = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])
        if tuple(roles) == (0, 1, 2):
            return w, None
        role = torch.arange(w.shape[0], device=w.device) // self.head_dim % 3
        idx = torch.nonzero(torch.isin(role, torch.tensor(roles, device=w.device))).flatten()
        return w[idx], idx

    def qkv(self, x: torch.Tensor, weight: Optional[tuple] = None) -> torch.Tensor:
        """Fused q/k/v plus the multiscale aggregates, [B, 3*inner*(1+scales), H, W] channels-last; with
        ``weight`` from qkv_weight(roles), only the channels of those roles."""
        w, idx = weight or self.qkv_weight()
        qkv = _pointwise(x, w)
        return torch.cat([qkv] + [agg(qkv, idx) for agg in self.to_qkv_multiscale], dim=1)

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

    def finish(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x + norm(to_out(out)) for the attention output ``out`` [B, heads, d, N] at x's positions."""
        b, _, h, w = x.shape
        out = _pointwise(out.reshape(b, -1, h, w), self.to_out.weight)
        return x + self.norm_out(out)

    def _quadratic(self, qkv: torch.Tensor) -> torch.Tensor:
        # Same quantity via the N x N score matrix; cheaper when N <= d (tiny feature maps).
        q, k, v = qkv.unbind(2)
        q, k = F.relu(q), F.relu(k)
        scores = (k.transpose(-1, -2) @ q).float()  # [B, h, N_keys, N_queries]
        scores = scores / (scores.sum(dim=2, keepdim=True) + self.eps)
        return v @ scores.to(v.dtype)


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
        up, dw = self.conv_inverted, self.conv_depth
        # On CPU each chunk's temporaries stay about the size of a decode band (cache-sized, reused by the
        # allocator): the 512-channel stage's GLUMBConv ran 1.5x faster in chunks of ~400 than in one of 2048.
        chunk = max(64, _UNTILED_BAND // (x.numel() // x.shape[1])) if x.device.type == "cpu" else None
        y = glu_conv_ffn(nhwc(x), up.weight, up.bias, dw.weight, dw.bias, self.conv_point.weight, chunk)
        return _residual(self.norm(nchw(y)), x)


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


def _upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   shortcut_repeats: int | None = None, rows: int | None = None) -> torch.Tensor:
    """conv3x3(nearest_upsample_2x(x)) without the upsampled input (see _upsample_stream), over bands of
    ``rows`` source rows (default: all at once). Returns a channels-last tensor."""
    bsz, _, h, w = x.shape
    out = torch.empty(bsz, h, 2, w, 2, weight.shape[0], dtype=x.dtype, device=x.device)
    for _ in _upsample_stream(_bands(x, rows or h), h, weight, bias, shortcut_repeats, out):
        pass
    return nchw(out.view(bsz, 2 * h, 2 * w, -1))


def _upsample_stream(bands, h: int, weight: torch.Tensor, bias: torch.Tensor | None,
                     shortcut_repeats: int | None = None, out: torch.Tensor | None = None):
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

    With ``shortcut_repeats`` (r dividing 4) it also adds UpBlock's shortcut, pixel_shuffle(x with each channel
    repeated r times): output channel c of phase k = 2a+b reads source channel (4c+k)//r, i.e. channels k//r,
    k//r + 4/r, ... of x, added as the phase is written (no repeated copy of x, no second pass)."""
    cout = weight.shape[0]
    held, first = None, 0  # source rows first.. held
    kept, done = None, 0  # result row ``done`` (the last one computed), source rows emitted: [0, done)
    kernels = b4 = None
    for band in bands:
        if kernels is None:
            wt = weight.to(band.dtype)
            b4 = None if bias is None else bias.to(band.dtype).repeat(4)

            def fold(k, dim, phase):  # the 3 taps along ``dim`` folded to the 2 seen by this phase
                t0, t1, t2 = k.unbind(dim)
                return torch.stack([t0, t1 + t2] if phase == 0 else [t0 + t1, t2], dim)

            kernels = torch.cat([fold(fold(wt, 2, a), 3, b) for a in (0, 1) for b in (0, 1)])  # [4*Cout,Cin,2,2]
        held = _append(held, band)
        have = first + held.shape[-2]
        end = have if have < h else h + 1  # result rows up to end-1 need source rows up to end-1
        e0 = 0 if kept is None else done + 1
        res = nhwc(F.conv2d(_rows(held, first, e0 - 1, end, cols=1), kernels, b4))  # result rows e0..end-1
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


class UpBlock(nn.Module):
    """2x upsampling: a conv path (nearest 2x then conv, or conv then pixel-shuffle) plus, optionally, a
    parameter-free shortcut (repeat each channel, then pixel-shuffle)."""

    def __init__(self, cin: int, cout: int, interpolate: bool, shortcut: bool = True):
        super().__init__()
        self.interpolate = interpolate
        self.shortcut = shortcut
        self.repeats = cout * 4 // cin
        self.conv = Conv2d(cin, cout if interpolate else cout * 4, 3, 1, 1)

    def forward(self, x: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """``rows``: run an interpolating block's convolution over bands of that many source rows."""
        if self.interpolate:
            fused = self.shortcut and not torch.is_grad_enabled() and 4 % self.repeats == 0
            y = _upsample_conv(x, self.conv.weight, self.conv.bias, self.repeats if fused else None, rows)
            if fused:
                return y
        else:
            y = F.pixel_shuffle(self.conv(x), 2)
        if self.shortcut:
            # pixel_shuffle(repeat_interleave(x)) written straight into y's pixel-major layout
            b, c, h, w = y.shape
            rep = nhwc(x).repeat_interleave(self.repeats, dim=-1).view(b, h // 2, w // 2, c, 2, 2)
            y = channels_last(y)
            yv = nhwc(y).view(b, h // 2, 2, w // 2, 2, c)
            src = rep.permute(0, 1, 4, 2, 5, 3)
            if torch.is_grad_enabled():
                y = nchw((yv + src).reshape(b, h, w, c))
            else:
                yv.add_(src)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for stage in self.down_blocks:
            x = stage(x)
        y = self.conv_out(x)
        if self.out_shortcut:
            y = y + x.unflatten(1, (-1, self.out_group)).mean(dim=2)
        return y


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


# --------------------------------------------------------------------------------------------------------------
# Tiling
# --------------------------------------------------------------------------------------------------------------

TileSize = Union[int, str, None]


def auto_tile_size(latent_height: int, latent_width: int, max_side: int = 32) -> Optional[int]:
    """Decode tile size (latent px) for a latent of this size: None (untiled) up to ``max_side**2`` latent
    pixels (1024x1024 px for f32), else ``max_side``. For encoding, multiply by ``spatial_factor``."""
    if latent_height * latent_width <= max_side * max_side:
        return None
    return max_side


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


def _run_tiled(fn, x: torch.Tensor, tile: int, overlap: int, unit: int, up: int, down: int, out_ch: int):
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


def decode_plan(decoder: "Decoder") -> Optional[DecodePlan]:
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


def _band_rows(x: torch.Tensor, budget: int) -> int:
    """Rows per band of x such that a band holds about ``budget`` elements per batch item."""
    _, c, _, w = x.shape
    return max(1, budget // max(1, c * w))


def _banded(m: nn.Module, x: torch.Tensor, rows: int) -> torch.Tensor:
    """m(x) for a local m, computed over bands of ``rows`` rows of x (see _stream). When m keeps the shape,
    results overwrite x one band late (by then the stream has copied the halo rows it still reads): x must be a
    temporary. Otherwise they go into a new output. ResBlocks write each band at once (see _resblock_banded);
    interpolating up blocks fill their own output (see _upsample_conv)."""
    if isinstance(m, ResBlock):
        return _resblock_banded(m, x, rows)
    if isinstance(m, UpBlock) and m.interpolate:
        return m(x, rows)
    out, pending, i = None, None, 0
    for y in _stream(m, _bands(x, rows), x.shape[-2]):
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


# Winograd F(4x4, 3x3): each 6x6 input tile, transformed, times the transformed 3x3 kernel (a 6x6 array) gives a
# 4x4 output tile after the output transform: 36 products per 16 outputs instead of 144. Used for the CPU decode's
# widest ResBlocks, where the 36 channel products (grouped 1x1 convolutions) dominate and the transforms (small
# matrix products over each tile) stay cheap; on fewer channels the transforms outweigh the saving.
_WINOGRAD_MIN_CHANNELS = 256
# Interpolation points of the Toom-Cook construction (plus the point at infinity). These are about 2.5x more
# accurate in fp32 than the common (0, +-1, +-2): relative error ~3e-6 of a 3x3 convolution's largest output.
_WINOGRAD_POINTS = (0.0, -1.0, 1.0, 0.5, -2.0)
# Transformed kernels up to this many elements (16 MB in fp32: 256 channels) run as one grouped convolution;
# larger ones (512 channels: 38 MB) one frequency at a time, measured 1.5x faster there (and 0.7x below).
_WINOGRAD_GROUPED_MAX = 1 << 22


@functools.lru_cache(maxsize=None)
def _winograd_transforms(device: torch.device) -> tuple:
    """(input transform [36,36], output transform [16,36], kernel transform [36,9]) of F(4x4,3x3), fp32: the 2-D
    transforms are Kronecker products of the 1-D ones, A^T [4,6], G [6,3] and B^T [6,6]. A^T and G follow from
    the points (G scaled by the Lagrange denominators); B^T is solved for from the defining identity
    A^T ((G g) * (B^T d)) = the 4 outputs of correlating the 6 inputs d with the 3 taps g, for all d and g."""
    m, r, n = 4, 3, 6
    p = torch.tensor(_WINOGRAD_POINTS, dtype=torch.float64)
    at, g = torch.zeros(m, n, dtype=torch.float64), torch.zeros(n, r, dtype=torch.float64)
    for j in range(n - 1):
        others = torch.cat([p[:j], p[j + 1:]])
        at[:, j] = p[j] ** torch.arange(m)
        g[j] = p[j] ** torch.arange(r) / torch.prod(p[j] - others)
    at[m - 1, n - 1] = g[n - 1, r - 1] = 1.0
    # sum_j at[i,j] g[j,k] bt[j,l] = [l == i+k]: a linear system in the 36 entries of bt
    eqs = torch.einsum("ij,jk,jJ,lL->iklJL", at, g, torch.eye(n, dtype=torch.float64),
                       torch.eye(n, dtype=torch.float64)).reshape(m * r * n, n * n)
    rhs = torch.tensor([float(l == i + k) for i in range(m) for k in range(r) for l in range(n)], dtype=torch.float64)
    bt = torch.linalg.lstsq(eqs, rhs[:, None]).solution.view(n, n)
    return tuple(torch.kron(t, t).float().to(device) for t in (bt, at, g))


def _winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 kernel [O, I, 3, 3] transformed for _conv3x3_rows: [36*O, I, 1, 1], group k holding frequency k."""
    o, i = weight.shape[:2]
    kg = _winograd_transforms(weight.device)[2]
    return (weight.float().reshape(o * i, 9) @ kg.T).T.reshape(36 * o, i, 1, 1).contiguous()


def _conv3x3_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  wino: torch.Tensor | None = None) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=(0, 1)) for a window x [B, C, R+2, W] (channels-last, fp32): R rows.
    With ``wino`` (_winograd_weight(weight)) it runs as Winograd F(4x4,3x3) over 4x4 output tiles."""
    if wino is None:
        return F.conv2d(x, weight, bias, padding=(0, 1))
    bt, at, _ = _winograd_transforms(x.device)
    b, c, h, w = x.shape
    o, r = weight.shape[0], h - 2
    tr, tc = -(-r // 4), -(-w // 4)
    p = nhwc(channels_last(F.pad(x, (1, 1 + 4 * tc - w, 0, 4 * tr - r))))  # [B, 4tr+2, 4tc+2, C], zeros beyond
    sb, sh, sw, sc = p.stride()
    tiles = p.as_strided((b, tr, tc, 6, 6, c), (sb, 4 * sh, 4 * sw, sh, sw, sc)).reshape(-1, 36, c)
    t = tiles.shape[0]
    v = torch.matmul(bt, tiles)  # [T, 36, C]: transformed input tiles
    del tiles
    vc = nchw(v.view(1, t, 1, 36 * c))
    if wino.numel() <= _WINOGRAD_GROUPED_MAX:  # the 36 products as one grouped 1x1 convolution
        prod = nhwc(F.conv2d(vc, wino, groups=36)).view(t, 36, o)
    else:  # one at a time, so that one frequency's weights stay in cache
        prod = v.new_empty(t, 36, o)
        for k in range(36):
            prod[:, k] = nhwc(F.conv2d(vc[:, k * c:(k + 1) * c], wino[k * o:(k + 1) * o])).view(t, o)
    del v, vc
    y = torch.matmul(at, prod)  # [T, 16, O]: output tiles
    del prod
    y = y.view(b, tr, tc, 4, 4, o).permute(0, 1, 3, 2, 4, 5).reshape(b, 4 * tr, 4 * tc, o)
    if bias is not None:
        y.add_(bias)
    y = nchw(y)[:, :, :r, :w]
    return y if (r, w) == (4 * tr, 4 * tc) else channels_last(y)


def _resblock_banded(m: ResBlock, x: torch.Tensor, rows: int) -> torch.Tensor:
    """m(x) over bands of ``rows`` rows (see _resblock_stream), written into x (a temporary) band by band: x's
    rows are overwritten only once every conv1 row that reads them is done."""
    i = 0
    for y in _resblock_stream(m, _bands(x, rows), x.shape[-2]):
        x[:, :, i:i + y.shape[-2]] = y
        i += y.shape[-2]
    return x


def _resblock_stream(m: ResBlock, bands, h: int):
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
            if band.device.type == "cpu" and dt == torch.float32 and band.shape[1] >= _WINOGRAD_MIN_CHANNELS:
                u1, u2 = _winograd_weight(w1), _winograd_weight(w2)
        held = _append(held, band)
        have = first + held.shape[-2]
        e1 = h if have == h else have - 1  # conv1 row i reads input rows i-1..i+1
        if e1 > done1:
            y = _conv3x3_rows(_rows(held, first, done1 - 1, e1 + 1), w1, b1, u1)
            acts = _append(acts, _act(m.act, y))
            done1 = e1
        e2 = h if done1 == h else done1 - 1  # conv2 row i reads conv1 rows i-1..i+1
        if e2 > done2:
            y = m.norm(_conv3x3_rows(_rows(acts, a_first, done2 - 1, e2 + 1), w2, None, u2))
            yield y.add_(_rows(held, first, done2, e2))
            del y
            done2 = e2
        keep = max(min(done1 - 1, done2), first)
        held, first = held[:, :, keep - first:], keep
        if acts is not None:
            keep = max(done2 - 1, a_first)
            acts, a_first = acts[:, :, keep - a_first:], keep


def _attention_banded(attn: MultiscaleLinearAttention, x: torch.Tensor, rows: int) -> torch.Tensor:
    """attn(x) over bands of rows, in place on x (a temporary): one pass sums the key statistics over all
    positions from each band's keys and values, a second computes each band's queries and output."""
    r = max((agg.proj_in.kernel_size[0] // 2 for agg in attn.to_qkv_multiscale), default=0)
    h = x.shape[-2]
    rows = max(rows, r)
    bands = [(i0, min(i0 + rows, h)) for i0 in range(0, h, rows)]

    def band_heads(i0, i1, weight, roles):  # [B, heads, roles, d, N] over rows i0:i1
        a0, a1 = _window(i0, i1, r, h)
        return attn.heads(attn.qkv(x[:, :, a0:a1], weight)[:, :, i0 - a0:i1 - a0], roles)

    stats, weight = None, attn.qkv_weight((1, 2))
    for i0, i1 in bands:
        part = attn.key_stats(*band_heads(i0, i1, weight, 2).unbind(2))
        stats = part if stats is None else tuple(s.add_(p) for s, p in zip(stats, part))
        del part
    pending, weight = None, attn.qkv_weight((0,))
    for i0, i1 in bands:
        out = attn.attend(band_heads(i0, i1, weight, 1)[:, :, 0], stats).to(x.dtype)
        y = attn.finish(x[:, :, i0:i1], out)
        del out
        if pending is not None:
            x[:, :, pending[0]:pending[1]] = pending[2]
        pending = (i0, i1, y)
    x[:, :, pending[0]:pending[1]] = pending[2]
    return x


def _head_step(m: nn.Module, x: torch.Tensor, budget: int) -> torch.Tensor:
    """m(x) for one module of the head. Without autograd, a map of more than ``budget`` elements per batch
    item is done in row bands of about that size (attention: see _attention_banded), so that no temporary
    spans the whole map."""
    rows = _band_rows(x, budget)
    if torch.is_grad_enabled() or x.shape[-2] <= rows:
        return m(x)
    if isinstance(m, EfficientViTBlock) and _is_local(m.attn.norm_out) and _is_local(m.conv_out):
        if x.shape[-2] * x.shape[-1] > m.attn.head_dim:  # else forward uses its N x N form; keep that
            x = _attention_banded(m.attn, x, rows)
            return _banded(m.conv_out, x, rows)
    elif _is_local(m):
        return _banded(m, x, rows)
    return m(x)


# Row-band size (elements per batch item) of an untiled CPU decode: bands of 8 MB in fp32 stay well inside the
# last-level cache and below glibc's mmap threshold, so their temporaries are reused instead of page-faulted in.
_UNTILED_BAND = 1 << 21


def decode_banded(decoder: "Decoder", z: torch.Tensor, budget: int = _UNTILED_BAND) -> torch.Tensor:
    """decoder(z) without autograd, exactly (up to summation order), with every layer run over row bands (see
    _head_step): no temporary the size of a whole feature map."""
    x = decoder.embed(z)
    for m in decoder.layers():
        x = _head_step(m, x, budget)
    return x


def _recut(bands, budget: int):
    """The rows of ``bands`` again, in bands of about ``budget`` elements per batch item and at least 4 rows (a
    whole Winograd tile: wide maps would otherwise get bands of one or two rows)."""
    for band in bands:
        yield from _bands(band, max(4, _band_rows(band, budget)))


def _stream(m: nn.Module, bands, h: int):
    """m (a local module) over a map of h rows arriving as consecutive row bands, yielding its output as
    consecutive row bands. ResBlocks and interpolating up blocks compute no row twice (_resblock_stream,
    _upsample_stream); any other local module runs on each band with the halo rows it reaches (recomputed by
    the next band)."""
    if isinstance(m, ResBlock):
        yield from _resblock_stream(m, bands, h)
        return
    if isinstance(m, UpBlock) and m.interpolate and (not m.shortcut or 4 % m.repeats == 0):
        yield from _upsample_stream(bands, h, m.conv.weight, m.conv.bias, m.repeats if m.shortcut else None)
        return
    r, s = _reach(m, 0), _upscale(m)
    held, first, done = None, 0, 0  # input rows from ``first``; output emitted for input rows [0, done)
    for band in bands:
        held = _append(held, band)
        have = first + held.shape[-2]
        end = h if have == h else have - r
        if end > done:
            a0, a1 = max(done - r, 0), min(end + r, h)
            yield m(held[:, :, a0 - first:a1 - first])[:, :, (done - a0) * s:(end - a0) * s]
            done = end
        keep = max(done - r, first)
        held, first = held[:, :, keep - first:], keep


def decode_streamed(decoder: "Decoder", z: torch.Tensor, plan: DecodePlan, budget: int = _UNTILED_BAND,
                    tail_budget: int | None = None) -> torch.Tensor:
    """decoder(z) without autograd, exactly (up to summation order): the head on the whole map in row bands of
    about ``budget`` elements per batch item (see _head_step), then the tail streamed: each of its layers takes
    the previous one's output band by band and passes its own on (see _stream), so the tail needs no whole-map
    tensor, no tiles and no halo work, at any size. Every tail layer holds a band or two at once: bands of
    ``tail_budget`` elements (default ``budget``; at least 4 rows) bound that. Measured at 2048²: half-size
    tail bands peak at 1.9 GB in 68-72 s, full-size ones at 2.3 GB in 65 s."""
    x = decoder.embed(z)
    for m in plan.head:
        x = _head_step(m, x, budget)
    h = x.shape[-2]
    tail_budget = tail_budget or budget
    bands = iter([x])  # each stream cuts its input into bands
    for m in plan.tail:
        bands = _stream(m, _recut(bands, tail_budget), h)
        h *= _upscale(m)
    out, i = None, 0
    for y in bands:
        if out is None:
            out = y.new_empty(y.shape[0], y.shape[1], h, y.shape[-1])
        out[:, :, i:i + y.shape[-2]] = y
        i += y.shape[-2]
    return out


def _tail_tile(plan: DecodePlan, x: torch.Tensor, ys: tuple, xs: tuple) -> torch.Tensor:
    """The decoder's output over the tile ys x xs (spans of the intermediate map x), from a window of x. After
    each layer the window shrinks to the halo the layers left need (see _CROP_MIN)."""
    h, w = x.shape[-2:]
    (a0, a1), (b0, b1) = _window(*ys, plan.halos[0], h), _window(*xs, plan.halos[0], w)
    t = x[:, :, a0:a1, b0:b1].clone(memory_format=torch.channels_last)  # own copy: norms work in place
    scale = 1
    for j, m in enumerate(plan.tail):
        t = m(t)
        s, halo, last = _upscale(m), plan.halos[j + 1], j == len(plan.tail) - 1
        scale, h, w, a0, a1, b0, b1 = scale * s, h * s, w * s, a0 * s, a1 * s, b0 * s, b1 * s
        c0, c1 = _window(ys[0] * scale, ys[1] * scale, halo, h)
        d0, d1 = _window(xs[0] * scale, xs[1] * scale, halo, w)
        if last or (c1 - c0) * (d1 - d0) <= (1 - _CROP_MIN) * (a1 - a0) * (b1 - b0):
            t = t[:, :, c0 - a0:c1 - a0, d0 - b0:d1 - b0]
            t = t if last else channels_last(t)
            a0, a1, b0, b1 = c0, c1, d0, d1
    return t


def decode_tiled(decoder: "Decoder", z: torch.Tensor, tile: int, plan: DecodePlan) -> torch.Tensor:
    """decoder(z), exactly (up to summation order), with the tail run on tiles of ``tile`` latent pixels.

    The head runs on the whole map, in row bands where its maps are large: a band's map-sized temporaries
    hold a quarter of the elements of one output-resolution feature map of a tile (an attention block keeps
    about a dozen such temporaries at once, a ResBlock on a tile three maps), so the tile size bounds the
    memory of both parts."""
    up = math.prod(_upscale(m) for m in plan.head)  # intermediate pixels per latent pixel
    s = plan.scale
    budget = (tile * up * s) ** 2 * decoder.norm_out.weight.shape[0] // 4
    x = decoder.embed(z)
    for m in plan.head:
        x = _head_step(m, x, budget)
    b, _, h, w = x.shape
    out = None
    for y0, y1 in _spans(z.shape[-2], tile):
        for x0, x1 in _spans(z.shape[-1], tile):
            t = _tail_tile(plan, x, (y0 * up, y1 * up), (x0 * up, x1 * up))
            if out is None:
                out = t.new_empty(b, t.shape[1], h * s, w * s)
            out[:, :, y0 * up * s:y1 * up * s, x0 * up * s:x1 * up * s] = t
            del t
    return out


# --------------------------------------------------------------------------------------------------------------
# The autoencoder
# --------------------------------------------------------------------------------------------------------------


class DCAE(nn.Module):
    """DC-AE encoder + decoder. Images are [B,3,H,W] in [-1,1]; latents are model-space (scaled).

    Computation runs on the module's device in ``dtype`` (``compute_dtype``, else the weights' dtype); results come back on the input's
    device in the input's dtype.
    Works under torch.no_grad/inference_mode and with autograd alike.

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

    # ---- checks ----------------------------------------------------------------------------------------

    def _check_images(self, images: torch.Tensor):
        f, c = self.spatial_factor, self.config.in_channels
        if not torch.is_tensor(images) or images.ndim != 4:
            got = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise TwigError(f"DCAE.encode: images must be a tensor [B,{c},H,W], got {got}")
        if images.shape[1] != c:
            raise TwigError(f"DCAE.encode: images have {images.shape[1]} channels, expected {c} (shape [B,{c},H,W])")
        h, w = images.shape[-2:]
        if h % f or w % f or h == 0 or w == 0:
            raise TwigError(
                f"DCAE.encode: image size {w}x{h} is not a multiple of {f}; crop or pad to "
                f"{max(f, w // f * f)}x{max(f, h // f * f)}"
            )

    def _check_latent(self, latent: torch.Tensor):
        c = self.config.latent_channels
        if not torch.is_tensor(latent) or latent.ndim != 4:
            got = tuple(latent.shape) if torch.is_tensor(latent) else type(latent).__name__
            raise TwigError(f"DCAE.decode: latent must be a tensor [B,{c},h,w], got {got}")
        if latent.shape[1] != c:
            raise TwigError(f"DCAE.decode: latent has {latent.shape[1]} channels, expected {c}")
        if latent.shape[-1] == 0 or latent.shape[-2] == 0:
            raise TwigError(f"DCAE.decode: empty latent {tuple(latent.shape)}")

    @staticmethod
    def _tiling(tile_size: TileSize, overlap: Optional[int], unit: int, what: str, h: int, w: int):
        """Validate and convert tile/overlap to units of ``unit``; None means untiled."""
        if tile_size == "auto":
            t = auto_tile_size(h // unit, w // unit)
            tile_size = None if t is None else t * unit
        if tile_size is None:
            return None
        if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size <= 0:
            raise TwigError(f"DCAE.{what}: tile_size must be a positive int, 'auto' or None, got {tile_size!r}")
        if tile_size % unit:
            raise TwigError(f"DCAE.{what}: tile_size {tile_size} px is not a multiple of {unit}")
        if overlap is None:
            overlap = tile_size // 4 // unit * unit
        if not isinstance(overlap, int) or overlap < 0 or overlap >= tile_size or overlap % unit:
            raise TwigError(
                f"DCAE.{what}: overlap must be an int in [0, tile_size) and a multiple of {unit}, got {overlap!r}"
            )
        return tile_size // unit, overlap // unit

    # ---- public API ------------------------------------------------------------------------------------

    def encode_raw(self, images: torch.Tensor, tile_size: TileSize = None, overlap: Optional[int] = None) -> torch.Tensor:
        """Images [B,3,H,W] in [-1,1] -> unscaled latent [B,C,H/f,W/f]. tile_size/overlap in pixels
        (multiples of the spatial factor; overlap defaults to a quarter tile); 'auto' uses auto_tile_size."""
        self._check_images(images)
        f = self.spatial_factor
        tiling = self._tiling(tile_size, overlap, f, "encode", *images.shape[-2:])
        p = self._param()
        x = channels_last(images.to(p.device, self.dtype))
        if tiling is None:
            z = self.encoder(x)
        else:
            t, o = tiling  # latent px; tiles start on the f-pixel grid so tile latents line up exactly
            z = _run_tiled(self.encoder, x, t, o, f, 1, f, self.config.latent_channels)
        return z.to(images.device, images.dtype).contiguous()

    def decode_raw(self, latent: torch.Tensor, tile_size: TileSize = None, overlap: Optional[int] = None) -> torch.Tensor:
        """Unscaled latent [B,C,h,w] -> images [B,3,h*f,w*f], roughly [-1,1], not clamped. tile_size in latent
        pixels ('auto' uses auto_tile_size): each tile gives tile_size*f output pixels a side, equal to an
        untiled decode (see decode_plan); overlap is used only where attention reaches the output resolution
        and tiles are blended instead (latent pixels, default a quarter tile). On CPU without autograd a tiled
        decode streams the local stages instead (decode_streamed): the same result, whatever the tile size, with
        no whole high-resolution map and no halo work. (Untiled, every layer runs over row bands of whole maps,
        see decode_banded: at 1024² as fast as a stream with the same bands, in 0.8x its working memory.)"""
        self._check_latent(latent)
        tiling = self._tiling(tile_size, overlap, 1, "decode", *latent.shape[-2:])
        p = self._param()
        z = channels_last(latent.to(p.device, self.dtype))
        banded = z.device.type == "cpu" and not torch.is_grad_enabled()
        plan = None if tiling is None else decode_plan(self.decoder)
        if tiling is None:
            x = decode_banded(self.decoder, z) if banded else self.decoder(z)
        elif plan is not None and banded:  # instead of tiles: no halo work, and half-size bands bound the memory
            x = decode_streamed(self.decoder, z, plan, tail_budget=_UNTILED_BAND // 2)
        elif plan is not None:
            x = decode_tiled(self.decoder, z, tiling[0], plan)
        else:
            t, o = tiling
            x = _run_tiled(self.decoder, z, t, o, 1, self.spatial_factor, 1, self.config.in_channels)
        return x.to(latent.device, latent.dtype).contiguous()

    def encode(self, images: torch.Tensor, tile_size: TileSize = None, overlap: Optional[int] = None) -> torch.Tensor:
        """Images [B,3,H,W] in [-1,1] -> model-space latent (raw * scaling_factor)."""
        return self.encode_raw(images, tile_size, overlap) * self.scaling_factor

    def decode(self, latent: torch.Tensor, tile_size: TileSize = None, overlap: Optional[int] = None) -> torch.Tensor:
        """Model-space latent -> images [B,3,H,W] in about [-1,1] (caller clamps)."""
        self._check_latent(latent)
        return self.decode_raw(latent / self.scaling_factor, tile_size, overlap)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction: decode(encode(images))."""
        return self.decode(self.encode(images))

