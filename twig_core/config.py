"""Model configuration: a small dataclass per network, plus the published presets.

Configs are normally inferred from a checkpoint's tensor shapes (see ``TransformerConfig.from_state_dict``);
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


SANA_1600M = TransformerConfig()
SANA_600M = TransformerConfig(width=1152, depth=28, heads=36, cross_heads=16)
PRESETS = {"1600M": SANA_1600M, "600M": SANA_600M}
