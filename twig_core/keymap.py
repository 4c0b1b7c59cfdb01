"""The one table that maps checkpoint names onto ours.

Our transformer uses the original NVlabs names, so an NVlabs checkpoint needs no renaming. A diffusers
checkpoint splits the fused projections (``attn.qkv`` -> ``to_q/to_k/to_v``, ``cross_attn.kv_linear`` ->
``to_k/to_v``); each row below says which diffusers tensors are concatenated (dim 0) to make ours.
``{i}`` stands for the block index.
"""

from __future__ import annotations

import re

import torch

# (our name, [diffusers names concatenated along dim 0])
TRANSFORMER_KEYS: list[tuple[str, list[str]]] = [
    ("x_embedder.proj.{p}", ["patch_embed.proj.{p}"]),
    ("t_embedder.mlp.0.{p}", ["time_embed.emb.timestep_embedder.linear_1.{p}"]),
    ("t_embedder.mlp.2.{p}", ["time_embed.emb.timestep_embedder.linear_2.{p}"]),
    ("t_block.1.{p}", ["time_embed.linear.{p}"]),
    ("y_embedder.y_proj.fc1.{p}", ["caption_projection.linear_1.{p}"]),
    ("y_embedder.y_proj.fc2.{p}", ["caption_projection.linear_2.{p}"]),
    ("attention_y_norm.weight", ["caption_norm.weight"]),
    ("blocks.{i}.scale_shift_table", ["transformer_blocks.{i}.scale_shift_table"]),
    ("blocks.{i}.attn.qkv.{p}", ["transformer_blocks.{i}.attn1.to_q.{p}", "transformer_blocks.{i}.attn1.to_k.{p}",
                                 "transformer_blocks.{i}.attn1.to_v.{p}"]),
    ("blocks.{i}.attn.proj.{p}", ["transformer_blocks.{i}.attn1.to_out.0.{p}"]),
    ("blocks.{i}.attn.q_norm.weight", ["transformer_blocks.{i}.attn1.norm_q.weight"]),
    ("blocks.{i}.attn.k_norm.weight", ["transformer_blocks.{i}.attn1.norm_k.weight"]),
    ("blocks.{i}.cross_attn.q_linear.{p}", ["transformer_blocks.{i}.attn2.to_q.{p}"]),
    ("blocks.{i}.cross_attn.kv_linear.{p}", ["transformer_blocks.{i}.attn2.to_k.{p}",
                                             "transformer_blocks.{i}.attn2.to_v.{p}"]),
    ("blocks.{i}.cross_attn.proj.{p}", ["transformer_blocks.{i}.attn2.to_out.0.{p}"]),
    ("blocks.{i}.cross_attn.q_norm.weight", ["transformer_blocks.{i}.attn2.norm_q.weight"]),
    ("blocks.{i}.cross_attn.k_norm.weight", ["transformer_blocks.{i}.attn2.norm_k.weight"]),
    ("blocks.{i}.mlp.inverted_conv.conv.{p}", ["transformer_blocks.{i}.ff.conv_inverted.{p}"]),
    ("blocks.{i}.mlp.depth_conv.conv.{p}", ["transformer_blocks.{i}.ff.conv_depth.{p}"]),
    ("blocks.{i}.mlp.point_conv.conv.weight", ["transformer_blocks.{i}.ff.conv_point.weight"]),
    ("final_layer.linear.{p}", ["proj_out.{p}"]),
    ("final_layer.scale_shift_table", ["scale_shift_table"]),
]

# Tensors present in original checkpoints that inference does not use: the positional table (recomputed for
# each resolution) and the learned null caption (only used for caption dropout in training).
NVLABS_UNUSED = ("pos_embed", "y_embedder.y_embedding")


def _pattern(template: str) -> re.Pattern:
    rx = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(rx + "$")


_DIFFUSERS_FIRST = [(_pattern(srcs[0]), ours, srcs) for ours, srcs in TRANSFORMER_KEYS]
_OURS = [(_pattern(ours), ours, srcs) for ours, srcs in TRANSFORMER_KEYS]


def _fill(template: str, m: re.Match) -> str:
    out = template
    for name, value in m.groupdict().items():
        out = out.replace("{" + name + "}", value)
    return out


def is_diffusers_transformer(keys) -> bool:
    return any(k.startswith("transformer_blocks.") for k in keys)


def diffusers_to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and fuse) a diffusers SanaTransformer2DModel state dict into our names.

    Keys the table does not know are returned under their own name, so the caller's strict load reports them.
    """
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key in sd:
        for rx, ours, srcs in _DIFFUSERS_FIRST:
            m = rx.match(key)
            if m:
                names = [_fill(s, m) for s in srcs]
                missing = [n for n in names if n not in sd]
                if missing:
                    out[key] = sd[key]  # let the strict load name it
                    break
                out[_fill(ours, m)] = sd[names[0]] if len(names) == 1 else torch.cat([sd[n] for n in names], 0)
                used.update(names)
                break
    for key in sd:
        if key not in used and key not in out:
            out[key] = sd[key]
    return out


def ours_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``diffusers_to_ours``: split the fused projections back into diffusers names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        for rx, ours, srcs in _OURS:
            m = rx.match(key)
            if m:
                parts = value.chunk(len(srcs), 0) if len(srcs) > 1 else (value,)
                for s, part in zip(srcs, parts):
                    out[_fill(s, m)] = part.contiguous()
                break
        else:
            out[key] = value
    return out
