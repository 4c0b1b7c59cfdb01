"""The Twig / Sana diffusion transformer (linear-attention DiT over a 32-channel DC-AE latent).

Reads top to bottom like the Sana paper:
  latent --patch embed (+ optional sin-cos positions)--> tokens
  sigma*1000 --sinusoid(256)--> MLP --> temb --SiLU, Linear--> 6 modulation vectors (AdaLN-single)
  Gemma hidden states --Linear, GELU(tanh), Linear--> RMSNorm --> caption tokens
  N x [ modulated LN -> ReLU linear self-attention (gated)
        softmax cross-attention to the caption (ungated)
        modulated LN -> Mix-FFN: 1x1 expand + SiLU, 3x3 depthwise, GLU, 1x1 project (gated) ]
  modulated LN (raw temb) -> Linear -> unpatchify -> velocity (noise - x0)

Layers come from an operations namespace (``twig_core.ops`` by default; a host may pass its own with ``Linear``,
``Conv2d`` and ``weights(layer, x)``, e.g. layers that cast or stream their weights on use). Parameters read
outside layers (modulation tables, norm weights) are brought to the activations' device and dtype where used.

Parameter names follow the original NVlabs checkpoints (``blocks.3.attn.qkv.weight`` ...), so an original
checkpoint is loaded without renaming; other formats are mapped onto these names by ``twig_core.loader``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import TransformerConfig
from .errors import TwigError
from . import compiled, ops
from .ops import dense, glu_conv_ffn
from .text import kept_length


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.weight.to(x.device, torch.float32)).to(dtype)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: [cos(t f), sin(t f)] in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


@functools.lru_cache(maxsize=4)
def sincos_pos_embed(width: int, h: int, w: int, base_size: int, scale: float) -> torch.Tensor:
    """2-D sin-cos positions [h*w, width] in fp32 on the CPU; coordinates are stretched so any grid spans the
    base grid. Computed in float64 on the CPU (MPS has no float64) once per grid size."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def axis(n: int) -> torch.Tensor:
        pos = torch.arange(n, dtype=torch.float64) / (n / base_size) / scale
        out = pos[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=-1)  # [n, width/2]

    ew = axis(w)[None, :, :].expand(h, w, -1)  # first half of channels: column coordinate
    eh = axis(h)[:, None, :].expand(h, w, -1)  # second half: row coordinate
    return torch.cat([ew, eh], dim=-1).reshape(h * w, width).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """x * (1 + scale) + shift; in place: one pass over x, written into x."""
    return torch.addcmul(shift, x, 1 + scale, out=x) if inplace else x * (1 + scale) + shift


def gated_add(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """x + gate * y; in place: one pass, written into x."""
    return x.addcmul_(y, gate) if inplace else x + gate * y


class LinearAttention(nn.Module):
    """ReLU linear attention: out = (v k^T) q / (sum(k) . q + eps), accumulated in fp32.

    q, k and v are each copied once into fp32 heads-major order (the dtype and the layout in one pass); v gets a
    column of ones, so ``k^T [v, 1]`` holds ``v k^T`` and ``sum(k)`` together and one product with q gives the
    numerator and the denominator."""

    def __init__(self, cfg: TransformerConfig, operations=ops):
        super().__init__()
        d = cfg.width
        self.heads = cfg.heads
        self.qkv = operations.Linear(d, 3 * d, bias=cfg.qkv_bias)
        self.proj = operations.Linear(d, d)
        self._weights = operations.weights
        self.q_norm = RMSNorm(d) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads
        c = d // h
        wq, bq = self._weights(self.qkv, x)
        # q, k and v as three products (each its own contiguous tensor; a third of the weight cast at a time)
        q, k, v = (dense(x, wq[i * d:(i + 1) * d], None if bq is None else bq[i * d:(i + 1) * d]) for i in range(3))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        f32 = dict(dtype=torch.float32, device=x.device)
        qh, kh = torch.empty(b, h, n, c, **f32), torch.empty(b, h, n, c, **f32)
        vh = torch.empty(b, h, n, c + 1, **f32)
        for src, dst in ((q, qh), (k, kh), (v, vh[..., :c])):
            dst.copy_(src.view(b, n, h, c).transpose(1, 2))
        qh, kh = F.relu_(qh), F.relu_(kh)
        vh[..., c].fill_(1.0)
        num = qh @ (kh.transpose(-1, -2) @ vh)  # [b,h,n,c+1]: (v k^T) q and, last, sum(k) . q
        if torch.is_grad_enabled() or torch.compiler.is_compiling():  # (compiled: fused into one kernel)
            out = (num[..., :c] / (num[..., c:] + 1e-15)).transpose(1, 2).reshape(b, n, d).to(x.dtype)
        else:  # divided straight into token order
            out = torch.empty(b, n, h, c, dtype=x.dtype, device=x.device)
            torch.div(num[..., :c], num[..., c:].add_(1e-15), out=out.transpose(1, 2))
        out = self.proj(out.view(b, n, d))
        if out.dtype == torch.float16:
            out = out.clamp(-65504, 65504)
        return out


class CrossAttention(nn.Module):
    """Softmax attention from image tokens to caption tokens, masked by the caption's attention mask."""

    def __init__(self, cfg: TransformerConfig, operations=ops):
        super().__init__()
        d = cfg.width
        self.heads = cfg.cross_heads
        self.q_linear = operations.Linear(d, d)
        self.kv_linear = operations.Linear(d, 2 * d)
        self.proj = operations.Linear(d, d)
        self.q_norm = RMSNorm(d) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d) if cfg.qk_norm else None

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the caption, [b,h,m,c] each. They do not change between sampling steps."""
        b, m, d = context.shape
        k, v = self.kv_linear(context).chunk(2, dim=-1)
        if self.k_norm is not None:
            k = self.k_norm(k)
        h = self.heads
        return k.view(b, m, h, d // h).transpose(1, 2), v.view(b, m, h, d // h).transpose(1, 2)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor | None):
        b, n, d = x.shape
        q = self.q_linear(x)
        if self.q_norm is not None:
            q = self.q_norm(q)
        h = self.heads
        q = q.view(b, n, h, d // h).transpose(1, 2)
        k, v = kv
        if k.shape[0] != b:  # one caption shared by a batch of latents
            k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
            bias = None if bias is None else bias.expand(b, -1, -1, -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [b,h,n,c]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class MixFFN(nn.Module):
    """1x1 conv expand + SiLU, 3x3 depthwise conv, GLU gate with SiLU, 1x1 conv project.

    The 1x1 convolutions are stored as conv weights (checkpoint layout) but run as token-wise matmuls;
    only the depthwise 3x3 needs the spatial layout.
    """

    def __init__(self, cfg: TransformerConfig, operations=ops):
        super().__init__()
        d, hidden = cfg.width, cfg.mlp_hidden
        self.inverted_conv = _ConvHolder(operations, d, 2 * hidden, 1, bias=True)
        self.depth_conv = _ConvHolder(operations, 2 * hidden, 2 * hidden, 3, bias=True, groups=2 * hidden)
        self.point_conv = _ConvHolder(operations, hidden, d, 1, bias=False)
        self._weights = operations.weights

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b, n, d = x.shape
        (up_w, up_b), (dw_w, dw_b), (down_w, _) = (
            self._weights(h.conv, x) for h in (self.inverted_conv, self.depth_conv, self.point_conv))
        y = glu_conv_ffn(x.reshape(b, *hw, d), up_w, up_b, dw_w, dw_b, down_w)
        return y.view(b, n, -1)


class _ConvHolder(nn.Module):
    """Holds a conv under the name ``conv`` so parameter names match the original checkpoints."""

    def __init__(self, operations, cin: int, cout: int, k: int, bias: bool, groups: int = 1):
        super().__init__()
        self.conv = operations.Conv2d(cin, cout, k, padding=k // 2, bias=bias, groups=groups)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig, operations=ops):
        super().__init__()
        d = cfg.width
        self.eps = cfg.norm_eps
        self.attn = LinearAttention(cfg, operations)
        self.cross_attn = CrossAttention(cfg, operations)
        self.mlp = MixFFN(cfg, operations)
        self.scale_shift_table = nn.Parameter(torch.randn(6, d) / d**0.5)

    def forward(self, x, t6, kv, bias, hw):
        b, n, d = x.shape
        table = self.scale_shift_table.to(t6.device, t6.dtype)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (table[None] + t6.view(b, 6, d)).chunk(6, dim=1)
        # sampling: the same arithmetic, updating the token tensor (owned by TwigTransformer.forward) in place
        ip = not torch.is_grad_enabled() and x.dtype == t6.dtype
        y = modulate(F.layer_norm(x, (d,), eps=self.eps), shift_a, scale_a, ip).to(x.dtype)
        x = gated_add(x, self.attn(y), gate_a, ip)
        ca = self.cross_attn(x, kv, bias)
        x = x.add_(ca) if ip else x + ca
        y = modulate(F.layer_norm(x, (d,), eps=self.eps), shift_m, scale_m, ip).to(x.dtype)
        return gated_add(x, self.mlp(y, hw), gate_m, ip)


class TimestepEmbedder(nn.Module):
    def __init__(self, d: int, operations=ops):
        super().__init__()
        self.mlp = nn.Sequential(operations.Linear(256, d), nn.SiLU(), operations.Linear(d, d))

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(timestep_embedding(t).to(dtype))


class CaptionProjection(nn.Module):
    def __init__(self, cin: int, d: int, operations=ops):
        super().__init__()
        self.fc1 = operations.Linear(cin, d)
        self.fc2 = operations.Linear(d, d)

    def forward(self, y):
        return self.fc2(F.gelu(self.fc1(y), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    def __init__(self, cin: int, d: int, operations=ops):
        super().__init__()
        self.y_proj = CaptionProjection(cin, d, operations)

    def forward(self, y):
        return self.y_proj(y)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: TransformerConfig, operations=ops):
        super().__init__()
        p = cfg.patch_size
        self.proj = operations.Conv2d(cfg.in_channels, cfg.width, p, stride=p)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()  # [b, n, d], token-major


class FinalLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig, operations=ops):
        super().__init__()
        d = cfg.width
        self.eps = cfg.norm_eps
        self.linear = operations.Linear(d, cfg.patch_size**2 * cfg.out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, d) / d**0.5)

    def forward(self, x, temb):
        shift, scale = (self.scale_shift_table.to(temb.device, temb.dtype)[None] + temb[:, None]).chunk(2, dim=1)
        x = modulate(F.layer_norm(x, (x.shape[-1],), eps=self.eps), shift, scale)
        return self.linear(x.to(temb.dtype))


@dataclass
class CaptionCache:
    """Everything derived from the caption alone: reused unchanged by every sampling step."""

    kv: list[tuple[torch.Tensor, torch.Tensor]] | None  # per block, keys and values [b,h,m,c]; None: per step
    bias: torch.Tensor | None  # additive attention bias [b,1,1,m], None when nothing is masked
    y: torch.Tensor | None = None  # the projected caption [b,m,d] (kept when the keys/values are not)

    @property
    def batch(self) -> int:
        return self.y.shape[0] if self.kv is None else self.kv[0][0].shape[0]

    def block_kv(self, i: int, block: "Block") -> tuple[torch.Tensor, torch.Tensor]:
        return block.cross_attn.context_kv(self.y) if self.kv is None else self.kv[i]


class TwigTransformer(nn.Module):
    def __init__(self, cfg: TransformerConfig, compute_dtype: torch.dtype | None = None, operations=ops):
        super().__init__()
        missing = [n for n in ("Linear", "Conv2d", "weights") if not hasattr(operations, n)]
        if missing:
            raise TwigError(f"operations namespace {getattr(operations, '__name__', operations)!r} lacks "
                            f"{', '.join(missing)} (see twig_core.ops for what the transformer needs)")
        self.config = cfg
        # None: compute in the weights' dtype. Otherwise weights may stay stored in fp16/bf16 (half the
        # memory) while every layer computes in this dtype, casting its own weights as it runs.
        self.compute_dtype = compute_dtype
        d = cfg.width
        self.x_embedder = PatchEmbed(cfg, operations)
        self.t_embedder = TimestepEmbedder(d, operations)
        self.t_block = nn.Sequential(nn.SiLU(), operations.Linear(d, 6 * d))
        self.y_embedder = CaptionEmbedder(cfg.caption_channels, d, operations)
        self.attention_y_norm = RMSNorm(d, eps=1e-5)
        self.blocks = nn.ModuleList(Block(cfg, operations) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg, operations)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in."""
        return self.compute_dtype or self.final_layer.linear.weight.dtype

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.final_layer.linear.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.final_layer.linear.weight.device

    def _apply(self, fn, *args, **kwargs):
        # moved or cast (.to, .half ...): drop the device copy of the positions, not to hold memory where the
        # model no longer is (offloading); the next step copies the CPU table again
        self.__dict__.pop("_held_positions", None)
        return super()._apply(fn, *args, **kwargs)

    def _positions(self, gh: int, gw: int, device: torch.device) -> torch.Tensor:
        """The sin-cos positions of a gh x gw grid on ``device``, kept for the next step (the last grid only)."""
        cfg, key = self.config, (gh, gw, device)
        held = self.__dict__.get("_held_positions")
        if held is None or held[0] != key:
            pos = sincos_pos_embed(cfg.width, gh, gw, cfg.pos_base_size, cfg.pos_interpolation_scale)
            held = self.__dict__["_held_positions"] = (key, pos.to(device))
        return held[1]

    def encode_caption(self, context: torch.Tensor, mask: torch.Tensor | None = None,
                       keep_kv: bool | None = None) -> CaptionCache:
        """Project the text-encoder states and precompute every block's cross-attention keys and values
        (``keep_kv``; by default unless the weights are stored narrower than the compute dtype).
        Positions that ``mask`` drops in every row at the end are cut off first: cross-attention gives them no
        weight, so the picture is the same and a short prompt padded to 300 tokens costs its own length."""
        cfg = self.config
        if context.ndim != 3 or context.shape[-1] != cfg.caption_channels:
            raise TwigError(
                f"caption embeddings have shape {tuple(context.shape)}; this model expects "
                f"[batch, tokens, {cfg.caption_channels}] (is the text encoder the right one for this model?)"
            )
        keep = None
        if mask is not None:
            keep = mask.to(torch.bool)
            if keep.shape != context.shape[:2]:
                raise TwigError(f"caption mask shape {tuple(mask.shape)} does not match embeddings {tuple(context.shape[:2])}")
            if not keep.any(dim=1).all():
                raise TwigError("caption mask hides every token of a prompt; at least the first token must be kept")
            used = kept_length(keep)
            context, keep = context[:, :used], keep[:, :used]
        y = self.attention_y_norm(self.y_embedder(context.to(self.dtype)))
        bias = None
        if keep is not None:
            if not keep.all():
                bias = torch.zeros(keep.shape, dtype=y.dtype, device=y.device)
                bias.masked_fill_(~keep, -10000.0)
                bias = bias[:, None, None, :]
        if keep_kv is None:
            # weights held narrower than the compute dtype mean memory matters more than speed: keep only the
            # projected caption and compute each block's keys/values as it runs (a small part of a step; see
            # bench/RESULTS.md)
            keep_kv = self.weight_dtype.itemsize >= self.dtype.itemsize
        if not keep_kv:
            return CaptionCache(None, bias, y)
        return CaptionCache([blk.cross_attn.context_kv(y) for blk in self.blocks], bias)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | CaptionCache,
        context_mask: torch.Tensor | None = None,
        step_cache=None,
    ) -> torch.Tensor:
        """x: [b,C,h,w] latent; t: [b] timesteps (sigma*1000); context: caption states or a CaptionCache.
        step_cache: a ``twig_core.step_cache.StepCache`` that runs the blocks and may skip all but block 0.

        Returns the flow velocity (noise - x0), [b,C,h,w].
        """
        cfg = self.config
        b, c, h, w = x.shape
        p = cfg.patch_size
        if c != cfg.in_channels:
            raise TwigError(f"latent has {c} channels; this model expects {cfg.in_channels}")
        if h % p or w % p:
            raise TwigError(f"latent size {h}x{w} is not divisible by the patch size {p}")
        cache = context if isinstance(context, CaptionCache) else self.encode_caption(context, context_mask)
        if cache.batch not in (1, b):
            raise TwigError(f"caption batch {cache.batch} does not match latent batch {b}")
        gh, gw = h // p, w // p
        dtype = self.dtype
        tokens = self.x_embedder(x.to(dtype))
        if cfg.pos_embed:
            tokens = (tokens.float() + self._positions(gh, gw, x.device)[None]).to(dtype)
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(b)
        temb = self.t_embedder(t, dtype)
        t6 = self.t_block(temb)

        def run_block(i: int, tokens: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
            """Block i over ``tokens``: the whole batch, or only the batch rows ``rows`` (indices) when given."""
            blk = self.blocks[i]
            mod, kv, bias = t6, cache.block_kv(i, blk), cache.bias
            if rows is not None:
                mod = t6[rows]
                if cache.batch > 1:
                    kv = tuple(part[rows] for part in kv)
                    bias = None if bias is None else bias[rows]
            return compiled.run_block(blk, tokens, mod, kv, bias, (gh, gw))

        if step_cache is None:
            for i in range(len(self.blocks)):
                tokens = run_block(i, tokens)
        else:
            tokens = step_cache.run(tokens, run_block, len(self.blocks))
        out = self.final_layer(tokens, temb)  # [b, gh*gw, p*p*C]
        out = out.view(b, gh, gw, p, p, cfg.out_channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, cfg.out_channels, h, w)
