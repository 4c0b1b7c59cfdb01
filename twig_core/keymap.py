"""The key tables: one per network, mapping every published checkpoint layout onto our names.

Every table is a tuple of :class:`Row`, and one view, :class:`Renamed`, applies a table either way
(``"to_ours"`` or ``"from_ours"``), building each tensor when it is read (:func:`rename`: all of them at once). Names hold placeholders: ``{i}``/``{s}``/``{b}``/``{m}`` block, stage and
multi-scale indices, ``{p}`` weight or bias, ``{n}`` a norm's tensors (which may be BatchNorm's).

Transformer (``TRANSFORMER_KEYS``, theirs = diffusers ``SanaTransformer2DModel``): our transformer uses the
original NVlabs names, so an NVlabs checkpoint needs no renaming. diffusers splits the fused projections
(``attn.qkv`` -> ``to_q/to_k/to_v``, ``cross_attn.kv_linear`` -> ``to_k/to_v``).

DC-AE (``DCAE_ORIGINAL_KEYS``, theirs = the original MIT-Han-Lab release): our autoencoder uses diffusers'
``AutoencoderDC`` names; the original (``encoder.project_in``, ``stages.N.op_list.M.main...``) fuses q/k/v into
one 1x1 conv and stores the attention projections as 1x1 convs; a residual wrapper or another resampling
layer gives some tensors other names (the aliases; ``from_ours`` writes the Sana release's names).

Container prefixes (``model.diffusion_model.``, ``first_stage_model.``, ``model.`` ...) are not part of the
tables: ``find_prefix`` locates the prefix in front of a network's anchor key, and the loader strips it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Row:
    """One tensor under our name(s) and under another layout's name(s).

    When one side lists several names, the other side's single tensor is their concatenation along dim 0 (a
    fused projection). ``aliases``: other names the other layout may give its single tensor (read, never
    written). ``conv1x1``: theirs is a 1x1 convolution weight ``[out, in, 1, 1]``, ours the linear ``[out, in]``.
    A string stands for a one-name tuple.
    """

    ours: tuple[str, ...] | str
    theirs: tuple[str, ...] | str
    aliases: tuple[str, ...] = ()
    conv1x1: bool = False

    def __post_init__(self):
        for side in ("ours", "theirs"):
            if isinstance(getattr(self, side), str):
                object.__setattr__(self, side, (getattr(self, side),))
        if len(self.ours) > 1 and len(self.theirs) > 1 or self.aliases and len(self.theirs) > 1:
            raise ValueError(f"key table row {self}: one side must be a single tensor")


TRANSFORMER_KEYS: tuple[Row, ...] = (
    Row("x_embedder.proj.{p}", "patch_embed.proj.{p}"),
    Row("t_embedder.mlp.0.{p}", "time_embed.emb.timestep_embedder.linear_1.{p}"),
    Row("t_embedder.mlp.2.{p}", "time_embed.emb.timestep_embedder.linear_2.{p}"),
    Row("t_block.1.{p}", "time_embed.linear.{p}"),
    Row("y_embedder.y_proj.fc1.{p}", "caption_projection.linear_1.{p}"),
    Row("y_embedder.y_proj.fc2.{p}", "caption_projection.linear_2.{p}"),
    Row("attention_y_norm.weight", "caption_norm.weight"),
    Row("blocks.{i}.scale_shift_table", "transformer_blocks.{i}.scale_shift_table"),
    Row("blocks.{i}.attn.qkv.{p}", ("transformer_blocks.{i}.attn1.to_q.{p}",
                                    "transformer_blocks.{i}.attn1.to_k.{p}",
                                    "transformer_blocks.{i}.attn1.to_v.{p}")),
    Row("blocks.{i}.attn.proj.{p}", "transformer_blocks.{i}.attn1.to_out.0.{p}"),
    Row("blocks.{i}.attn.q_norm.weight", "transformer_blocks.{i}.attn1.norm_q.weight"),
    Row("blocks.{i}.attn.k_norm.weight", "transformer_blocks.{i}.attn1.norm_k.weight"),
    Row("blocks.{i}.cross_attn.q_linear.{p}", "transformer_blocks.{i}.attn2.to_q.{p}"),
    Row("blocks.{i}.cross_attn.kv_linear.{p}", ("transformer_blocks.{i}.attn2.to_k.{p}",
                                                "transformer_blocks.{i}.attn2.to_v.{p}")),
    Row("blocks.{i}.cross_attn.proj.{p}", "transformer_blocks.{i}.attn2.to_out.0.{p}"),
    Row("blocks.{i}.cross_attn.q_norm.weight", "transformer_blocks.{i}.attn2.norm_q.weight"),
    Row("blocks.{i}.cross_attn.k_norm.weight", "transformer_blocks.{i}.attn2.norm_k.weight"),
    Row("blocks.{i}.mlp.inverted_conv.conv.{p}", "transformer_blocks.{i}.ff.conv_inverted.{p}"),
    Row("blocks.{i}.mlp.depth_conv.conv.{p}", "transformer_blocks.{i}.ff.conv_depth.{p}"),
    Row("blocks.{i}.mlp.point_conv.conv.weight", "transformer_blocks.{i}.ff.conv_point.weight"),
    Row("final_layer.linear.{p}", "proj_out.{p}"),
    Row("final_layer.scale_shift_table", "scale_shift_table"),
)

# Gemma-2 as llama.cpp writes it to GGUF (theirs) vs transformers' Gemma2Model (ours). llama.cpp stores the
# RMSNorm weights as 1 + w (Gemma's norm scales by 1 + w); ``GEMMA_GGUF_NORM_OFFSET`` is that 1.
GEMMA_GGUF_KEYS: tuple[Row, ...] = (
    Row("embed_tokens.weight", "token_embd.weight"),
    Row("norm.weight", "output_norm.weight"),
    Row("layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    Row("layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight"),
    Row("layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight"),
    Row("layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight"),
    Row("layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    Row("layers.{i}.post_attention_layernorm.weight", "blk.{i}.post_attention_norm.weight"),
    Row("layers.{i}.pre_feedforward_layernorm.weight", "blk.{i}.ffn_norm.weight"),
    Row("layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
    Row("layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),
    Row("layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
    Row("layers.{i}.post_feedforward_layernorm.weight", "blk.{i}.post_ffw_norm.weight"),
)
GEMMA_GGUF_NORM_OFFSET = 1.0

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


def _fill(template: str, m: re.Match) -> str:
    out = template
    for name, value in m.groupdict().items():
        out = out.replace("{" + name + "}", value)
    return out


def is_diffusers_transformer(keys) -> bool:
    return any(k.startswith("transformer_blocks.") for k in keys)


# --------------------------------------------------------------------------------------------------
# DC-AE: original MIT-Han-Lab layout


def _dcae_rows() -> tuple[Row, ...]:
    rows = [
        Row("encoder.conv_in.{p}", "encoder.project_in.conv.{p}"),
        Row("encoder.conv_in.conv.{p}", "encoder.project_in.conv.conv.{p}"),  # stage 0 without blocks
        Row("encoder.conv_out.{p}", "encoder.project_out.main.op_list.0.conv.{p}",
            aliases=("encoder.project_out.op_list.0.conv.{p}",)),
        Row("decoder.conv_in.{p}", "decoder.project_in.main.conv.{p}", aliases=("decoder.project_in.conv.{p}",)),
        Row("decoder.norm_out.{n}", "decoder.project_out.op_list.0.{n}"),
        Row("decoder.conv_out.{p}", "decoder.project_out.op_list.2.conv.{p}"),
        Row("decoder.conv_out.conv.{p}", "decoder.project_out.op_list.2.conv.conv.{p}"),
    ]
    for side, blocks in (("encoder", "down_blocks"), ("decoder", "up_blocks")):
        o, b = f"{side}.stages.{{s}}.op_list.{{b}}", f"{side}.{blocks}.{{s}}.{{b}}"
        # the 2x resampling block: first name is the Sana release (stride-2 conv down, interpolate+conv up)
        resample = ((f"{o}.main.conv.{{p}}", f"{o}.main.conv.conv.{{p}}", f"{o}.conv.{{p}}", f"{o}.conv.conv.{{p}}")
                    if side == "encoder" else
                    (f"{o}.main.conv.conv.{{p}}", f"{o}.main.conv.{{p}}", f"{o}.conv.conv.{{p}}", f"{o}.conv.{{p}}"))
        rows += [
            # ResBlock
            Row(f"{b}.conv1.{{p}}", f"{o}.main.conv1.conv.{{p}}"),
            Row(f"{b}.conv2.weight", f"{o}.main.conv2.conv.weight"),
            Row(f"{b}.norm.{{n}}", f"{o}.main.conv2.norm.{{n}}"),
            # EfficientViT block: multi-scale linear attention ...
            Row((f"{b}.attn.to_q.weight", f"{b}.attn.to_k.weight", f"{b}.attn.to_v.weight"),
                f"{o}.context_module.main.qkv.conv.weight", conv1x1=True),
            Row(f"{b}.attn.to_qkv_multiscale.{{m}}.proj_in.weight", f"{o}.context_module.main.aggreg.{{m}}.0.weight"),
            Row(f"{b}.attn.to_qkv_multiscale.{{m}}.proj_out.weight", f"{o}.context_module.main.aggreg.{{m}}.1.weight"),
            Row(f"{b}.attn.to_out.weight", f"{o}.context_module.main.proj.conv.weight", conv1x1=True),
            Row(f"{b}.attn.norm_out.{{n}}", f"{o}.context_module.main.proj.norm.{{n}}"),
            # ... and GLUMBConv
            Row(f"{b}.conv_out.conv_inverted.{{p}}", f"{o}.local_module.main.inverted_conv.conv.{{p}}"),
            Row(f"{b}.conv_out.conv_depth.{{p}}", f"{o}.local_module.main.depth_conv.conv.{{p}}"),
            Row(f"{b}.conv_out.conv_point.weight", f"{o}.local_module.main.point_conv.conv.weight"),
            Row(f"{b}.conv_out.norm.{{n}}", f"{o}.local_module.main.point_conv.norm.{{n}}"),
            Row(f"{b}.conv.{{p}}", resample[0], aliases=resample[1:]),
        ]
    return tuple(rows)


DCAE_ORIGINAL_KEYS = _dcae_rows()


def is_dcae_original(keys) -> bool:
    return any(k.startswith(("encoder.project_in.", "decoder.project_in.", "encoder.stages.", "decoder.stages."))
               for k in keys)


# --------------------------------------------------------------------------------------------------
# Renaming


DIRECTIONS = ("to_ours", "from_ours")


@functools.lru_cache(maxsize=None)
def _rules(table: tuple[Row, ...], direction: str):
    """(pattern, names read, names written, read side is theirs, row), in table order: one rule per name a
    single tensor may have on the read side, one for the first name of a group (which brings its members)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"rename direction {direction!r}: use one of {DIRECTIONS}")
    to_ours = direction == "to_ours"
    rules = []
    for row in table:
        read, write = (row.theirs, row.ours) if to_ours else (row.ours, row.theirs)
        if len(read) > 1:
            rules.append((_pattern(read[0]), read, write, to_ours, row))
        else:
            for name in read + (row.aliases if to_ours else ()):
                rules.append((_pattern(name), (name,), write, to_ours, row))
    return tuple(rules)


def _plan(keys, table: tuple[Row, ...], direction: str) -> dict[str, tuple]:
    """new name -> (names read, part index, parts, row) for :class:`Renamed`; nothing is read. ``row`` None: a key
    the table does not know (or a group with a member missing) keeps its own name, so a strict load names it."""
    keys = list(keys)
    present = set(keys)
    plan: dict[str, tuple] = {}
    used: set[str] = set()
    for key in keys:
        for rx, read, write, _, row in _rules(tuple(table), direction):
            m = rx.match(key)
            if not m:
                continue
            names = tuple(_fill(n, m) for n in read) if len(read) > 1 else (key,)
            if any(n not in present for n in names):
                break
            for j, name in enumerate(write):
                plan[_fill(name, m)] = (names, j, len(write), row)
            used.update(names)
            break
    for key in keys:
        if key not in used and key not in plan:
            plan[key] = ((key,), 0, 1, None)
    return plan


class Renamed(Mapping):
    """``sd`` with every key in ``table`` renamed, ``"to_ours"`` or ``"from_ours"``, each tensor built only when
    asked for (fused tensors concatenated or split along dim 0, 1x1 convolution weights squeezed or unsqueezed),
    so a converter can read one tensor at a time. Keys the table does not know keep their own name."""

    def __init__(self, sd, table: tuple[Row, ...], direction: str):
        self.sd, self.from_theirs = sd, direction == "to_ours"
        self.plan = _plan(sd, table, direction)
        self._split = (None, None)  # the last tensor split into parts: its names and value, read once

    def __iter__(self):
        return iter(self.plan)

    def __len__(self):
        return len(self.plan)

    def release(self, name: str) -> None:
        """Pass ``release`` on to the source tensors ``name`` is built from, where the source has it."""
        if hasattr(self.sd, "release"):
            for n in self.plan[name][0]:
                self.sd.release(n)

    def __getitem__(self, name: str) -> torch.Tensor:
        names, part, parts, row = self.plan[name]
        if row is None:
            return self.sd[name]
        if parts > 1 and self._split[0] == names:
            value = self._split[1]
        else:
            value = torch.cat([self.sd[n] for n in names], 0) if len(names) > 1 else self.sd[names[0]]
            if row.conv1x1 and self.from_theirs:
                value = value.reshape(value.shape[0], -1)
            self._split = (names, value) if parts > 1 else (None, None)
        if parts > 1:
            value = value.chunk(parts, 0)[part]
            if part == parts - 1:
                self._split = (None, None)
        if row.conv1x1 and not self.from_theirs:
            value = value.reshape(*value.shape, 1, 1)
        return value.contiguous()


def rename(sd, table: tuple[Row, ...], direction: str) -> dict[str, torch.Tensor]:
    """:class:`Renamed` read whole into a dict (each tensor of ``sd`` read once)."""
    return dict(Renamed(sd, table, direction).items())


def rename_keys(keys, table: tuple[Row, ...], direction: str) -> dict[str, str]:
    """new name -> old name for a table of one-to-one rows (no tensor is read); unknown keys keep theirs."""
    out = {}
    for key in keys:
        for rx, read, write, _, _ in _rules(tuple(table), direction):
            m = rx.match(key)
            if m and len(read) == 1 and len(write) == 1:
                out[_fill(write[0], m)] = key
                break
        else:
            out[key] = key
    return out


# Shorthands for the four renamings
diffusers_to_ours = functools.partial(rename, table=TRANSFORMER_KEYS, direction="to_ours")
ours_to_diffusers = functools.partial(rename, table=TRANSFORMER_KEYS, direction="from_ours")
dcae_original_to_ours = functools.partial(rename, table=DCAE_ORIGINAL_KEYS, direction="to_ours")
dcae_ours_to_original = functools.partial(rename, table=DCAE_ORIGINAL_KEYS, direction="from_ours")


# --------------------------------------------------------------------------------------------------
# Layers by module name (LoRA files name layers, not tensors)


@functools.lru_cache(maxsize=None)
def _module_rules(table: tuple[Row, ...]):
    """(pattern, our module template, part index, parts) for every module name a row's weight may have, ours and
    theirs, with "." or "_" between the parts of a name (kohya-style files join them with "_")."""
    rules = []
    for row in table:
        ours = row.ours[0]
        if len(row.ours) > 1 or not ours.endswith((".{p}", ".weight")):
            continue
        strip = lambda name: name.rsplit(".", 1)[0]  # noqa: E731 - the module of a weight name
        names = [(ours, 0, 1)] + [(t, j, len(row.theirs)) for j, t in enumerate(row.theirs)]
        names += [(a, 0, 1) for a in row.aliases]
        for name, index, parts in names:
            rx = _pattern(strip(name)).pattern.replace(r"\.", "[._]")
            rules.append((re.compile(rx), strip(ours), index, parts))
    return tuple(rules)


def locate(module: str, table: tuple[Row, ...] = TRANSFORMER_KEYS) -> tuple[str, int, int] | None:
    """Where a layer named in any layout of ``table`` (ours, theirs, or either with "_" for ".") lives in our
    model: (our module name, part index, parts), the part being the slice of a fused weight's output rows
    (``to_k`` is part 1 of 3 of ``attn.qkv``); None when no row names it."""
    for rx, ours, index, parts in _module_rules(tuple(table)):
        m = rx.match(module)
        if m:
            return _fill(ours, m), index, parts
    return None


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
