"""Model configuration: a small dataclass per network, plus the published presets.

Configs are normally inferred from a checkpoint's tensor shapes (see ``TransformerConfig.from_state_dict``) or
read from a diffusers config.json (``TransformerConfig.from_diffusers_config``);
the presets exist for building random models in tests and benchmarks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class TransformerConfig:
    in_channels: int = 32
    out_channels: int = 32
    width: int = 2240  # hidden size D
    depth: int = 20  # number of blocks
    heads: int = 70  # linear self-attention heads (head dim = width // heads)
    cross_heads: int = 20  # softmax cross-attention heads (head dim = width // cross_heads)
    caption_channels: int = 2304  # text encoder width (Gemma-2-2B)
    mlp_ratio: float = 2.5  # Mix-FFN hidden = mlp_ratio * width (the GLU doubles it)
    patch_size: int = 1
    qkv_bias: bool = False
    qk_norm: bool = False  # Sana 1.5: RMSNorm over q and k (across heads)
    pos_embed: bool = False  # 2K/4K variants add a sin-cos positional embedding
    pos_interpolation_scale: float = 1.0
    norm_eps: float = 1e-6
    sample_size: int = 32  # native latent size (1024 px / 32); the positional grid spans it

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def cross_head_dim(self) -> int:
        return self.width // self.cross_heads

    @property
    def pos_base_size(self) -> int:
        return self.sample_size // self.patch_size

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    def replace(self, **changes) -> "TransformerConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_diffusers_config(self) -> dict:
        """The equivalent diffusers ``SanaTransformer2DModel`` config.json (read back by the loader)."""
        return {
            "_class_name": "SanaTransformer2DModel", "in_channels": self.in_channels,
            "out_channels": self.out_channels, "num_attention_heads": self.heads, "attention_head_dim": self.head_dim,
            "num_layers": self.depth, "num_cross_attention_heads": self.cross_heads,
            "cross_attention_head_dim": self.cross_head_dim, "cross_attention_dim": self.width,
            "caption_channels": self.caption_channels, "mlp_ratio": self.mlp_ratio, "attention_bias": self.qkv_bias,
            "sample_size": self.sample_size, "patch_size": self.patch_size, "norm_eps": self.norm_eps,
            "interpolation_scale": self.pos_interpolation_scale if self.pos_embed else None,
            "qk_norm": "rms_norm_across_heads" if self.qk_norm else None,
        }

    @classmethod
    def from_diffusers_config(cls, cfg: dict, label: str = "config.json") -> "TransformerConfig":
        """The config of a diffusers ``SanaTransformer2DModel`` config.json (the inverse of
        ``to_diffusers_config``); TwigError naming ``label`` for a missing field or a feature Twig lacks."""
        from .errors import TwigError

        try:
            heads, head_dim = int(cfg["num_attention_heads"]), int(cfg["attention_head_dim"])
            width = heads * head_dim
            cross_heads = int(cfg.get("num_cross_attention_heads", 20))
            cross_dim = int(cfg.get("cross_attention_head_dim", width // cross_heads))
            in_ch = int(cfg.get("in_channels", 32))
            out_ch = cfg.get("out_channels") or in_ch
            interp = cfg.get("interpolation_scale")
            qk = cfg.get("qk_norm")
            unsupported = []
            if cross_heads * cross_dim != width or int(cfg.get("cross_attention_dim", width)) != width:
                unsupported.append(f"cross-attention width {cross_heads}x{cross_dim} != model width {width}")
            if cfg.get("guidance_embeds"):
                unsupported.append("guidance embedding (Sana Sprint)")
            if float(cfg.get("timestep_scale", 1.0)) != 1.0:
                unsupported.append(f"timestep_scale {cfg['timestep_scale']}")
            if cfg.get("norm_elementwise_affine"):
                unsupported.append("affine block norms")
            if qk not in (None, "rms_norm_across_heads"):
                unsupported.append(f"qk_norm {qk!r}")
            if unsupported:
                raise TwigError(f"{label}: unsupported transformer features: {'; '.join(unsupported)}")
            return cls(
                in_channels=in_ch, out_channels=int(out_ch), width=width, depth=int(cfg.get("num_layers", 20)),
                heads=heads, cross_heads=cross_heads, caption_channels=int(cfg.get("caption_channels", 2304)),
                mlp_ratio=float(cfg.get("mlp_ratio", 2.5)), patch_size=int(cfg.get("patch_size", 1)),
                qkv_bias=bool(cfg.get("attention_bias", False)), qk_norm=qk is not None, pos_embed=interp is not None,
                pos_interpolation_scale=float(interp) if interp is not None else 1.0,
                norm_eps=float(cfg.get("norm_eps", 1e-6)), sample_size=int(cfg.get("sample_size", 32)),
            )
        except TwigError:
            raise
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError, ZeroDivisionError) as e:
            raise TwigError(f"{label}: config.json lacks or garbles {e}") from None

    @classmethod
    def from_state_dict(cls, sd, pos_embed: bool | None = None, **overrides) -> "TransformerConfig":
        """Infer the architecture from a state dict in our (NVlabs) names; only shapes are read, so meta
        tensors do. ``pos_embed`` forces the positional embedding on/off; ``overrides`` set any field.

        - width, in_channels, patch_size: ``x_embedder.proj.weight`` [D, C, p, p]; out_channels from
          ``final_layer.linear``; caption_channels from ``y_embedder.y_proj.fc1``; mlp_ratio from the Mix-FFN
          ``inverted_conv`` (2 * hidden); depth from the block indices (which must run 0..depth-1).
        - heads: every Sana model uses 32-dim linear-attention heads (NVlabs ``linear_head_dim = 32``), so
          heads = width / 32.
        - cross_heads: not visible in the weights. The released models use 20 heads at width 2240 (1600M,
          Sana 1.5 4.8B: 112-dim heads) and 16 at width 1152 (600M: 72-dim heads); other widths take the first
          of the head dims 72, 112, 64, 32 that divides the width. A diffusers config.json states it and wins.
        - qkv_bias / qk_norm: presence of ``blocks.0.attn.qkv.bias`` / ``blocks.0.attn.q_norm.weight``.
        - pos_embed: NVlabs checkpoints always carry a ``pos_embed`` table [1, g*g, D] of the training grid,
          whether or not the model adds it. The released configs switch it on (``use_pe``) only for the 2K and
          4K models (g = 64, 128) and off for 512/1024 (g = 16, 32), so the rule is: on when g > 32, with
          interpolation scale max(g // 64, 1) (2K: 1.0, 4K: 2.0, as in diffusers' conversion) and
          sample_size = g * patch_size. Without a ``pos_embed`` tensor it is off.
        """
        from .errors import TwigError

        def shape(key):
            if key not in sd:
                raise TwigError(f"transformer weights lack {key!r}; cannot infer the model size")
            return tuple(sd[key].shape)

        width, in_channels, p, _ = shape("x_embedder.proj.weight")
        indices = sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit()})
        if not indices:
            raise TwigError("transformer weights have no blocks.N.* tensors")
        depth = indices[-1] + 1
        if indices != list(range(depth)):
            missing = sorted(set(range(depth)) - set(indices))
            raise TwigError(f"transformer weights lack blocks {missing[:5]} of {depth}")
        if width % 32:
            raise TwigError(f"transformer width {width} is not a multiple of the 32-dim attention heads")
        out_channels = shape("final_layer.linear.weight")[0] // (p * p)
        caption_channels = shape("y_embedder.y_proj.fc1.weight")[1]
        hidden2 = shape("blocks.0.mlp.inverted_conv.conv.weight")[0]
        mlp_ratio = hidden2 / 2 / width
        if int(width * mlp_ratio) != hidden2 // 2:  # float round-off: aim inside [hidden, hidden + 1)
            mlp_ratio = (hidden2 // 2 + 0.25) / width
        fields = dict(
            in_channels=in_channels, out_channels=out_channels, width=width, depth=depth, heads=width // 32,
            cross_heads=cross_heads_for_width(width), caption_channels=caption_channels,
            mlp_ratio=int(mlp_ratio) if mlp_ratio == int(mlp_ratio) else mlp_ratio, patch_size=p,
            qkv_bias="blocks.0.attn.qkv.bias" in sd, qk_norm="blocks.0.attn.q_norm.weight" in sd,
            pos_embed=False, pos_interpolation_scale=1.0, sample_size=32,
        )
        if "pos_embed" in sd:
            n = shape("pos_embed")[-2]
            g = int(round(n**0.5))
            if g * g == n:
                fields.update(sample_size=g * p, pos_interpolation_scale=float(max(g // 64, 1)), pos_embed=g > 32)
        if pos_embed is not None:
            fields["pos_embed"] = bool(pos_embed)
        fields.update(overrides)
        cfg = cls(**fields)
        if cfg.mlp_hidden * 2 != hidden2:
            raise TwigError(f"Mix-FFN width {hidden2} is not 2 * mlp_ratio * width for width {width}")
        return cfg


# Cross-attention heads of the released models, by width (NVlabs ``num_heads``); see from_state_dict.
CROSS_HEADS_BY_WIDTH = {2240: 20, 1152: 16}
CROSS_HEAD_DIM_FALLBACK = (72, 112, 64, 32)


def heads_from_config(cfg: dict, width: int, label: str) -> dict:
    """The head counts a config.json states, in diffusers' keys (``num_attention_heads`` or
    ``attention_head_dim``; ``num_cross_attention_heads`` or ``cross_attention_head_dim``), as
    ``TransformerConfig`` fields for a model of ``width``; TwigError naming ``label`` when they do not fit."""
    from .errors import TwigError

    keys = {"heads": ("num_attention_heads", "attention_head_dim"),
            "cross_heads": ("num_cross_attention_heads", "cross_attention_head_dim")}
    out = {}
    for field, (count, dim) in keys.items():
        key = count if count in cfg else dim if dim in cfg else None
        if key is None:
            continue
        value = cfg[key]
        n = value if key == count else (width // value if isinstance(value, int) and value > 0 else None)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1 or width % n or (key == dim and n * value != width):
            raise TwigError(f"{label}: {key} {value!r} does not fit the weights' width {width}")
        out[field] = n
    return out


def cross_heads_for_width(width: int) -> int:
    if width in CROSS_HEADS_BY_WIDTH:
        return CROSS_HEADS_BY_WIDTH[width]
    for dim in CROSS_HEAD_DIM_FALLBACK:
        if width % dim == 0:
            return width // dim
    return 1


SANA_1600M = TransformerConfig()
SANA_600M = TransformerConfig(width=1152, depth=28, heads=36, cross_heads=16)
PRESETS = {"1600M": SANA_1600M, "600M": SANA_600M}
