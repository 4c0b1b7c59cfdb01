"""The key tables: one per network, mapping every published checkpoint layout onto our names.

Transformer (``TRANSFORMER_KEYS``): our transformer uses the original NVlabs names, so an NVlabs checkpoint
needs no renaming. A diffusers checkpoint splits the fused projections (``attn.qkv`` -> ``to_q/to_k/to_v``,
``cross_attn.kv_linear`` -> ``to_k/to_v``); each row says which diffusers tensors are concatenated (dim 0)
to make ours. ``{i}`` stands for the block index.

DC-AE (``DCAE_ORIGINAL_KEYS``): our autoencoder uses diffusers' ``AutoencoderDC`` names; the original
MIT-Han-Lab release (``encoder.project_in``, ``stages.N.op_list.M.main...``) fuses q/k/v into one 1x1 conv
and stores the attention projections as 1x1 convs. Each row lists the original name (with alternatives where
a residual wrapper or a different resampling layer changes it) and the names of ours it holds.

Container prefixes (``model.diffusion_model.``, ``first_stage_model.``, ``model.`` ...) are not part of the
tables: ``find_prefix`` locates the prefix in front of a network's anchor key, and the loader strips it.
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


# placeholder -> what it matches: block/stage/multiscale indices and parameter leaf names
_PLACEHOLDERS = {
    "i": r"\d+",
    "s": r"\d+",
    "b": r"\d+",
    "m": r"\d+",
    "p": r"weight|bias",
    "n": r"weight|bias|running_mean|running_var|num_batches_tracked",  # norms that may be BatchNorm
}


def _pattern(template: str) -> re.Pattern:
    rx = re.escape(template)
    for name, value in _PLACEHOLDERS.items():
        rx = rx.replace(r"\{" + name + r"\}", f"(?P<{name}>{value})")
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


# --------------------------------------------------------------------------------------------------
# DC-AE: original MIT-Han-Lab layout -> ours (diffusers AutoencoderDC names)


def _dcae_rows() -> list[tuple[tuple[str, ...], list[str], bool]]:
    """(original name alternatives, [our names the tensor is split into along dim 0], squeeze 1x1 conv)."""
    rows: list[tuple[tuple[str, ...], list[str], bool]] = [
        (("encoder.project_in.conv.{p}",), ["encoder.conv_in.{p}"], False),
        (("encoder.project_in.conv.conv.{p}",), ["encoder.conv_in.conv.{p}"], False),  # stage 0 without blocks
        (("encoder.project_out.main.op_list.0.conv.{p}", "encoder.project_out.op_list.0.conv.{p}"),
         ["encoder.conv_out.{p}"], False),
        (("decoder.project_in.main.conv.{p}", "decoder.project_in.conv.{p}"), ["decoder.conv_in.{p}"], False),
        (("decoder.project_out.op_list.0.{n}",), ["decoder.norm_out.{n}"], False),
        (("decoder.project_out.op_list.2.conv.{p}",), ["decoder.conv_out.{p}"], False),
        (("decoder.project_out.op_list.2.conv.conv.{p}",), ["decoder.conv_out.conv.{p}"], False),
    ]
    for side, blocks in (("encoder", "down_blocks"), ("decoder", "up_blocks")):
        o, b = f"{side}.stages.{{s}}.op_list.{{b}}", f"{side}.{blocks}.{{s}}.{{b}}"
        # the 2x resampling block: first alternative is the Sana release (stride-2 conv down, interpolate+conv up)
        resample = ((f"{o}.main.conv.{{p}}", f"{o}.main.conv.conv.{{p}}", f"{o}.conv.{{p}}", f"{o}.conv.conv.{{p}}")
                    if side == "encoder" else
                    (f"{o}.main.conv.conv.{{p}}", f"{o}.main.conv.{{p}}", f"{o}.conv.conv.{{p}}", f"{o}.conv.{{p}}"))
        rows += [
            # ResBlock
            ((f"{o}.main.conv1.conv.{{p}}",), [f"{b}.conv1.{{p}}"], False),
            ((f"{o}.main.conv2.conv.weight",), [f"{b}.conv2.weight"], False),
            ((f"{o}.main.conv2.norm.{{n}}",), [f"{b}.norm.{{n}}"], False),
            # EfficientViT block: multi-scale linear attention ...
            ((f"{o}.context_module.main.qkv.conv.weight",),
             [f"{b}.attn.to_q.weight", f"{b}.attn.to_k.weight", f"{b}.attn.to_v.weight"], True),
            ((f"{o}.context_module.main.aggreg.{{m}}.0.weight",), [f"{b}.attn.to_qkv_multiscale.{{m}}.proj_in.weight"],
             False),
            ((f"{o}.context_module.main.aggreg.{{m}}.1.weight",), [f"{b}.attn.to_qkv_multiscale.{{m}}.proj_out.weight"],
             False),
            ((f"{o}.context_module.main.proj.conv.weight",), [f"{b}.attn.to_out.weight"], True),
            ((f"{o}.context_module.main.proj.norm.{{n}}",), [f"{b}.attn.norm_out.{{n}}"], False),
            # ... and GLUMBConv
            ((f"{o}.local_module.main.inverted_conv.conv.{{p}}",), [f"{b}.conv_out.conv_inverted.{{p}}"], False),
            ((f"{o}.local_module.main.depth_conv.conv.{{p}}",), [f"{b}.conv_out.conv_depth.{{p}}"], False),
            ((f"{o}.local_module.main.point_conv.conv.weight",), [f"{b}.conv_out.conv_point.weight"], False),
            ((f"{o}.local_module.main.point_conv.norm.{{n}}",), [f"{b}.conv_out.norm.{{n}}"], False),
            (resample, [f"{b}.conv.{{p}}"], False),
        ]
    return rows


DCAE_ORIGINAL_KEYS = _dcae_rows()

_DCAE_ORIG = [(_pattern(alt), alts, ours, squeeze) for alts, ours, squeeze in DCAE_ORIGINAL_KEYS for alt in alts]
_DCAE_OURS_FIRST = [(_pattern(ours[0]), alts, ours, squeeze) for alts, ours, squeeze in DCAE_ORIGINAL_KEYS]


def is_dcae_original(keys) -> bool:
    return any(k.startswith(("encoder.project_in.", "decoder.project_in.", "encoder.stages.", "decoder.stages."))
               for k in keys)


def dcae_original_to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original-layout DC-AE state dict into ours (split fused qkv, squeeze 1x1 conv projections).

    Keys the table does not know keep their own name, so the caller's strict check reports them.
    """
    out: dict[str, torch.Tensor] = {}
    for key in sd:
        for rx, _alts, ours, squeeze in _DCAE_ORIG:
            m = rx.match(key)
            if m:
                value = sd[key]
                if squeeze:
                    value = value.reshape(value.shape[0], -1)
                parts = value.chunk(len(ours), 0) if len(ours) > 1 else (value,)
                for name, part in zip(ours, parts):
                    out[_fill(name, m)] = part
                break
        else:
            out[key] = sd[key]
    return out


def dcae_ours_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``dcae_original_to_ours``, writing the layout of the Sana DC-AE release (shortcuts on,
    stride-2 conv downsampling, interpolate+conv upsampling)."""
    out: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for key in sd:
        if key in done:
            continue
        for rx, alts, ours, squeeze in _DCAE_OURS_FIRST:
            m = rx.match(key)
            if m:
                names = [_fill(n, m) for n in ours]
                value = torch.cat([sd[n] for n in names], 0) if len(names) > 1 else sd[key]
                if squeeze:
                    value = value.reshape(*value.shape, 1, 1)
                out[_fill(alts[0], m)] = value.contiguous()
                done.update(names)
                break
        else:
            out[key] = sd[key]
    return out


# --------------------------------------------------------------------------------------------------
# Anchors: one key every checkpoint of a network holds, used to find the network (and any container
# prefix in front of it) inside a file.

ANCHORS: dict[str, tuple[str, ...]] = {
    "transformer": ("x_embedder.proj.weight", "patch_embed.proj.weight"),
    "vae": ("decoder.conv_in.weight", "decoder.project_in.main.conv.weight", "decoder.project_in.conv.weight"),
    "text_encoder": ("layers.0.self_attn.q_proj.weight",),
}


def find_prefix(keys, anchors) -> str | None:
    """The shortest prefix P such that P + anchor is a key (P is "" or ends with "."), or None."""
    best = None
    for key in keys:
        for anchor in anchors:
            if key.endswith(anchor):
                prefix = key[: len(key) - len(anchor)]
                if (prefix == "" or prefix.endswith(".")) and (best is None or len(prefix) < len(best)):
                    best = prefix
    return best
