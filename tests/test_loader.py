"""twig_core.loader: every checkpoint layout round-trips bit-exactly, configs are inferred from shapes, and bad
files fail with one TwigError naming the file (CPU, tiny models)."""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import sys

import pytest
import torch
from safetensors.torch import save_file

from twig_core import keymap, loader
from twig_core.config import SANA_1600M, SANA_600M, TransformerConfig, cross_heads_for_width
from twig_core.dcae import DCAE, DCAE_F32C32_SANA, RES_BLOCK, VIT_BLOCK, DCAEConfig
from twig_core.errors import TwigError
from twig_core.transformer import TwigTransformer

# width 64 -> 2 linear heads of 32; the width rule gives 1 cross head (64-dim), as an NVlabs file implies
TINY = TransformerConfig(in_channels=8, out_channels=8, width=64, depth=2, heads=2, cross_heads=1,
                         caption_channels=48)


def randomize(model, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def ours(cfg=TINY, seed=0):
    return randomize(TwigTransformer(cfg), seed)


def nvlabs_sd(model, grid=None):
    """Our state dict in the NVlabs layout, with the two tensors inference ignores (as released files have);
    the pos_embed table spans the training grid (sample_size / patch_size)."""
    grid = grid or model.config.sample_size // model.config.patch_size
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["pos_embed"] = torch.randn(1, grid * grid, model.config.width)
    sd["y_embedder.y_embedding"] = torch.randn(300, model.config.caption_channels)
    return sd


def inputs(cfg, b=2, h=4, w=6, n=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.in_channels, h, w, generator=g)
    ctx = torch.randn(b, n, cfg.caption_channels, generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[0, 4:] = 0
    return x, torch.tensor([999.0, 321.5])[:b], ctx, mask


def run(model, cfg=None, dtype=torch.float32):
    x, t, ctx, mask = inputs(cfg or model.config)
    with torch.no_grad():
        return model(x.to(dtype), t, ctx.to(dtype), mask)


def diffusers_kwargs(cfg: TransformerConfig) -> dict:
    return dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_attention_heads=cfg.heads,
        attention_head_dim=cfg.head_dim, num_layers=cfg.depth, num_cross_attention_heads=cfg.cross_heads,
        cross_attention_head_dim=cfg.cross_head_dim, cross_attention_dim=cfg.width,
        caption_channels=cfg.caption_channels, mlp_ratio=cfg.mlp_ratio, attention_bias=cfg.qkv_bias,
        sample_size=cfg.sample_size, patch_size=cfg.patch_size, norm_eps=cfg.norm_eps,
        interpolation_scale=cfg.pos_interpolation_scale if cfg.pos_embed else None,
        qk_norm="rms_norm_across_heads" if cfg.qk_norm else None,
    )


def diffusers_twin(model):
    """diffusers' SanaTransformer2DModel holding exactly our model's weights."""
    from diffusers import SanaTransformer2DModel

    ref = SanaTransformer2DModel(**diffusers_kwargs(model.config)).eval()
    ref.load_state_dict(keymap.ours_to_diffusers(model.state_dict()), strict=True)
    return ref


def diffusers_run(ref, cfg):
    x, t, ctx, mask = inputs(cfg)
    with torch.no_grad():
        return ref(x, ctx, t, encoder_attention_mask=mask).sample


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# ---------------------------------------------------------------------------------------------------
# Transformer: NVlabs layout and prefixed single files


@pytest.mark.parametrize("fmt", ["pth", "pth-legacy", "pth-bare", "safetensors", "comfy-prefix", "ckpt-named-bin"])
def test_nvlabs_layouts_round_trip_bit_exact(tmp_path, fmt):
    model = ours()
    sd = nvlabs_sd(model)
    path = tmp_path / "twig.pth"
    if fmt == "pth":
        torch.save({"state_dict": sd}, path)
    elif fmt == "pth-legacy":
        torch.save({"state_dict": sd}, path, _use_new_zipfile_serialization=False)
    elif fmt == "pth-bare":
        torch.save(sd, path)
    elif fmt == "safetensors":
        path = tmp_path / "twig.safetensors"
        save_file(sd, path)
    elif fmt == "comfy-prefix":
        path = tmp_path / "twig_comfy.safetensors"
        save_file({"model.diffusion_model." + k: v for k, v in sd.items()}, path)
    elif fmt == "ckpt-named-bin":  # a safetensors file with the wrong extension is still read as safetensors
        path = tmp_path / "twig.bin"
        save_file(sd, path)
    assert loader.detect(path) == "transformer"
    got = loader.load_transformer(path)
    assert got.config == TINY
    assert torch.equal(run(got), run(model))
    assert not any(p.is_meta for p in got.parameters())


def test_fp16_file_stays_fp16_and_dtype_converts(tmp_path):
    model = ours().half()
    sd = nvlabs_sd(model)
    sd["pos_embed"] = sd["pos_embed"].half()
    torch.save({"state_dict": sd}, tmp_path / "twig_fp16.pth")
    kept = loader.load_transformer(tmp_path / "twig_fp16.pth")
    assert kept.dtype == torch.float16
    assert all(torch.equal(kept.state_dict()[k], v) for k, v in model.state_dict().items())
    wide = loader.load_transformer(tmp_path / "twig_fp16.pth", dtype="fp32")
    assert wide.dtype == torch.float32
    assert torch.equal(run(wide), run(model.float()))
    bf = loader.load_transformer(tmp_path / "twig_fp16.pth", dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in bf.parameters())


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", [TINY, TINY.replace(qk_norm=True, qkv_bias=True, pos_embed=True, patch_size=2)],
                         ids=["plain", "qknorm-pos-patch2"])
def test_half_stored_weights_compute_in_fp32(tmp_path, stored, cfg):
    """Weights kept in fp16/bf16 while computing in fp32 give exactly what the same weights widened to fp32
    give, and stay half-size in memory (the cast is per layer, never written back)."""
    model = ours(cfg).to(stored)
    sd = {k: v for k, v in nvlabs_sd(model).items()}
    save_file({k: v.to(stored) for k, v in sd.items()}, tmp_path / "half.safetensors")
    lean = loader.load_transformer(tmp_path / "half.safetensors", compute_dtype="fp32")
    wide = loader.load_transformer(tmp_path / "half.safetensors", dtype="fp32")
    assert lean.dtype == torch.float32 and lean.weight_dtype == stored
    out = run(lean)
    assert out.dtype == torch.float32
    assert torch.equal(out, run(wide))
    assert {p.dtype for p in lean.parameters()} == {stored}
    size = sum(p.numel() * p.element_size() for p in lean.parameters())
    assert size * 2 == sum(p.numel() * p.element_size() for p in wide.parameters())
    # and explicitly converting while keeping a separate compute dtype
    conv = loader.load_transformer(tmp_path / "half.safetensors", dtype="bf16", compute_dtype="fp32")
    assert conv.weight_dtype == torch.bfloat16 and run(conv).dtype == torch.float32


def test_load_parts_weight_dtype(tmp_path):
    from tests.builders import write_tiny_pipeline

    folder = write_tiny_pipeline(tmp_path / "pipe")
    parts = loader.load_parts(str(folder), weight_dtype="fp16")
    assert parts.transformer.weight_dtype == torch.float16 and parts.transformer.dtype == torch.float32
    assert next(parts.vae.parameters()).dtype == torch.float16 and parts.vae.dtype == torch.float32
    stored = loader.load_parts(str(folder), weight_dtype="stored")
    assert stored.transformer.weight_dtype == torch.float32


def test_mixed_dtype_file_uses_its_dominant_dtype(tmp_path):
    sd = nvlabs_sd(ours())
    sd = {k: (v if "scale_shift" in k else v.half()) for k, v in sd.items()}
    save_file(sd, tmp_path / "mixed.safetensors")
    got = loader.load_transformer(tmp_path / "mixed.safetensors")
    assert {p.dtype for p in got.parameters()} == {torch.float16}


@pytest.mark.parametrize("variant", ["qknorm", "qkvbias", "patch2", "wide-deep"])
def test_nvlabs_variants_infer_their_config(tmp_path, variant):
    cfg = {
        "qknorm": TINY.replace(qk_norm=True),
        "qkvbias": TINY.replace(qkv_bias=True),
        "patch2": TINY.replace(patch_size=2),
        "wide-deep": TINY.replace(width=96, heads=3, cross_heads=cross_heads_for_width(96), depth=3, mlp_ratio=3),
    }[variant]
    model = ours(cfg)
    save_file(nvlabs_sd(model), tmp_path / "m.safetensors")
    got = loader.load_transformer(tmp_path / "m.safetensors")
    assert got.config == cfg
    assert torch.equal(run(got), run(model))


def test_pos_embed_rule_and_parity_with_diffusers(tmp_path):
    """A 2K-style checkpoint (64x64 pos_embed grid) turns the sin-cos embedding on, recomputed for any size."""
    model = ours()
    save_file(nvlabs_sd(model, grid=64), tmp_path / "sana_2k.safetensors")
    got = loader.load_transformer(tmp_path / "sana_2k.safetensors")
    assert got.config.pos_embed and got.config.sample_size == 64 and got.config.pos_interpolation_scale == 1.0
    ref = diffusers_twin(got)  # diffusers with interpolation_scale=1.0, sample_size=64
    assert rel_err(run(got), diffusers_run(ref, got.config)) <= 1e-4
    assert not torch.equal(run(got), run(model))  # the embedding is really added

    save_file(nvlabs_sd(model, grid=128), tmp_path / "sana_4k.safetensors")
    cfg4k = loader.load_transformer(tmp_path / "sana_4k.safetensors").config
    assert cfg4k.pos_embed and cfg4k.sample_size == 128 and cfg4k.pos_interpolation_scale == 2.0

    save_file(nvlabs_sd(model, grid=16), tmp_path / "sana_512.safetensors")
    assert not loader.load_transformer(tmp_path / "sana_512.safetensors").config.pos_embed
    forced = loader.load_transformer(tmp_path / "sana_512.safetensors", pos_embed=True)
    assert forced.config.pos_embed and forced.config.sample_size == 16
    off = loader.load_transformer(tmp_path / "sana_2k.safetensors", pos_embed=False)
    assert torch.equal(run(off), run(model))


def test_overrides_and_explicit_config(tmp_path):
    model = ours(TINY.replace(cross_heads=2))
    save_file(nvlabs_sd(model), tmp_path / "m.safetensors")
    inferred = loader.load_transformer(tmp_path / "m.safetensors")
    assert inferred.config.cross_heads == 1 and not torch.equal(run(inferred), run(model))
    fixed = loader.load_transformer(tmp_path / "m.safetensors", cross_heads=2)
    assert torch.equal(run(fixed), run(model))
    explicit = loader.load_transformer(tmp_path / "m.safetensors", config=model.config)
    assert torch.equal(run(explicit), run(model))


def test_head_counts_of_a_non_standard_width_come_from_a_config_beside_or_an_override(tmp_path):
    """A 64-wide model with 4x16 linear heads (and 4x16 cross heads): the NVlabs file cannot say so, the width
    rule guesses 2x32 and warns naming the file; a config.json beside it or heads= gives diffusers' output."""
    import warnings

    from diffusers import SanaTransformer2DModel

    cfg = TINY.replace(heads=4, cross_heads=4)
    model = ours(cfg)
    ref = diffusers_twin(model)
    path = tmp_path / "m.safetensors"
    save_file(nvlabs_sd(model), path)
    with pytest.warns(UserWarning, match=r"m\.safetensors: width 64 is not a published Sana size.*guessed 2 linear"):
        guessed = loader.load_transformer(path)
    assert rel_err(run(guessed), diffusers_run(ref, cfg)) > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fixed = loader.load_transformer(path, heads=4, cross_heads=4)
        (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 4, "attention_head_dim": 16,
                                                          "cross_attention_head_dim": 16}))
        beside = loader.load_transformer(path)
    for got in (fixed, beside):
        assert (got.config.heads, got.config.cross_heads) == (4, 4)
        assert rel_err(run(got), diffusers_run(ref, cfg)) <= 1e-4
    assert isinstance(ref, SanaTransformer2DModel)
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 5}))
    with pytest.raises(TwigError, match=r"config\.json: num_attention_heads 5 does not fit the weights' width 64"):
        loader.load_transformer(path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(TwigError, match="heads=3 does not divide the model width 64"):
        loader.load_transformer(path, heads=3)


# ---------------------------------------------------------------------------------------------------
# Transformer: diffusers folders and diffusers' own converter


DIFF_CFG = TINY.replace(cross_heads=2)  # config.json states the cross heads, overriding the width rule


@pytest.mark.parametrize("layout", ["plain", "sharded", "fp16-variant", "fp16-sharded", "bin"])
def test_diffusers_folders(tmp_path, layout):
    model = ours(DIFF_CFG)
    ref = diffusers_twin(model)
    folder = tmp_path / "transformer"
    kwargs = {}
    if layout in ("sharded", "fp16-sharded"):
        kwargs["max_shard_size"] = "60KB"
    if layout.startswith("fp16"):
        kwargs["variant"] = "fp16"
        ref = ref.half()
    ref.save_pretrained(folder, safe_serialization=layout != "bin", **kwargs)
    names = sorted(os.listdir(folder))
    if layout == "sharded":
        assert "diffusion_pytorch_model.safetensors.index.json" in names
    if layout == "fp16-sharded":
        assert "diffusion_pytorch_model.safetensors.index.fp16.json" in names
        assert any(n.startswith("diffusion_pytorch_model.fp16-00001-of-") for n in names)
    if layout == "fp16-variant":
        assert "diffusion_pytorch_model.fp16.safetensors" in names
    assert loader.detect(folder) == "transformer"
    got = loader.load_transformer(folder)
    assert got.config == DIFF_CFG
    if layout.startswith("fp16"):
        assert got.dtype == torch.float16
        assert all(torch.equal(got.state_dict()[k], v.half()) for k, v in model.state_dict().items())
    else:
        assert torch.equal(run(got), run(model))  # bit-exact round trip of our weights
        assert rel_err(run(got), diffusers_run(ref, DIFF_CFG)) <= 1e-4  # and diffusers' outputs


def test_variant_choice(tmp_path):
    model = ours(DIFF_CFG)
    ref = diffusers_twin(model)
    folder = tmp_path / "transformer"
    ref.save_pretrained(folder)
    ref.half().save_pretrained(folder, variant="fp16")
    assert loader.load_transformer(folder).dtype == torch.float32  # default: the full-precision set
    assert loader.load_transformer(folder, dtype="fp16").dtype == torch.float16  # the matching variant
    assert loader.load_transformer(folder, variant="fp16").dtype == torch.float16
    with pytest.raises(TwigError, match="bf16"):
        loader.load_transformer(folder, variant="bf16")


def test_diffusers_single_file_with_config_beside_it(tmp_path):
    model = ours(DIFF_CFG)
    diffusers_twin(model).save_pretrained(tmp_path)
    got = loader.load_transformer(tmp_path / "diffusion_pytorch_model.safetensors")
    assert got.config == DIFF_CFG and torch.equal(run(got), run(model))


def test_diffusers_single_file_converter_agrees(tmp_path):
    """diffusers' own from_single_file on our NVlabs-layout file gives the outputs our loader gives."""
    from diffusers import SanaTransformer2DModel

    model = ours(DIFF_CFG)
    path = tmp_path / "nvlabs.safetensors"
    save_file(nvlabs_sd(model), path)
    cfg_dir = tmp_path / "config"
    SanaTransformer2DModel(**diffusers_kwargs(DIFF_CFG)).save_config(cfg_dir)
    ref = SanaTransformer2DModel.from_single_file(str(path), config=str(cfg_dir), local_files_only=True).eval()
    got = loader.load_transformer(path, cross_heads=2)
    assert rel_err(run(got), diffusers_run(ref, DIFF_CFG)) <= 1e-4
    assert torch.equal(run(got), run(model))


# ---------------------------------------------------------------------------------------------------
# Config inference at full size (meta tensors: shapes only)


def meta_sd(cfg, grid=32):
    with torch.device("meta"):
        sd = dict(TwigTransformer(cfg).state_dict())
        sd["pos_embed"] = torch.empty(1, grid * grid, cfg.width)
        sd["y_embedder.y_embedding"] = torch.empty(300, cfg.caption_channels)
    return sd


@pytest.mark.parametrize("name,cfg,grid", [
    ("1600M", SANA_1600M, 32),
    ("600M", SANA_600M, 32),
    ("1600M-512px", SANA_1600M.replace(sample_size=16), 16),
    ("sana1.5-1600M", SANA_1600M.replace(qk_norm=True), 32),
    ("sana1.5-4.8B", SANA_1600M.replace(depth=60, qk_norm=True), 32),
    ("1600M-2K", SANA_1600M.replace(pos_embed=True, sample_size=64), 64),
    ("1600M-4K", SANA_1600M.replace(pos_embed=True, sample_size=128, pos_interpolation_scale=2.0), 128),
    ("600M-patch2", SANA_600M.replace(patch_size=2, sample_size=64), 32),
    ("non-preset", TransformerConfig(width=1536, depth=12, heads=48, cross_heads=24, caption_channels=1024,
                                     in_channels=16, out_channels=16, mlp_ratio=3), 32),
])
def test_config_inference_full_size(name, cfg, grid):
    assert TransformerConfig.from_state_dict(meta_sd(cfg, grid)) == cfg
    assert loader.classify(meta_sd(cfg, grid)) == {"transformer": ""}


def test_config_inference_from_diffusers_names_full_size():
    from diffusers import SanaTransformer2DModel

    with torch.device("meta"):
        ref = SanaTransformer2DModel(**diffusers_kwargs(SANA_1600M))
    metas = keymap.diffusers_to_ours(dict(ref.state_dict()))
    assert TransformerConfig.from_state_dict(metas) == SANA_1600M
    assert loader.classify({"model.diffusion_model." + k: v for k, v in ref.state_dict().items()}) == {
        "transformer": "model.diffusion_model."}


def test_dcae_variant_inference_full_size():
    with torch.device("meta"):
        sd = dict(DCAE(DCAE_F32C32_SANA).state_dict())
    assert DCAEConfig.from_state_dict(sd) == DCAE_F32C32_SANA
    original = keymap.dcae_ours_to_original(sd)
    assert keymap.is_dcae_original(original)
    assert DCAEConfig.from_state_dict(keymap.dcae_original_to_ours(original)) == DCAE_F32C32_SANA
    assert loader.classify(original) == {"vae": ""}
    assert loader.classify({"first_stage_model." + k: v for k, v in sd.items()}) == {"vae": "first_stage_model."}


# ---------------------------------------------------------------------------------------------------
# DC-AE

TINY_AE = DCAEConfig(
    latent_channels=4,
    encoder_block_out_channels=(8, 16, 16),
    decoder_block_out_channels=(8, 16, 16),
    encoder_layers_per_block=(1, 1, 1),
    decoder_layers_per_block=(1, 1, 1),
    encoder_block_types=(RES_BLOCK, RES_BLOCK, VIT_BLOCK),
    decoder_block_types=(RES_BLOCK, RES_BLOCK, VIT_BLOCK),
    encoder_qkv_multiscales=((), (), (5,)),
    decoder_qkv_multiscales=((), (), (5,)),
    attention_head_dim=8,
    decoder_norm_types=("rms_norm",) * 3,
    decoder_act_fns=("silu",) * 3,
)


# the other DC-AE family: empty first stage, pixel (un)shuffle resampling, BatchNorm decoder stages
TINY_AE_MIX = DCAEConfig(
    latent_channels=4,
    encoder_block_out_channels=(8, 16, 32, 32),
    decoder_block_out_channels=(8, 16, 32, 32),
    encoder_layers_per_block=(0, 1, 2, 1),
    decoder_layers_per_block=(0, 2, 1, 1),
    encoder_block_types=(RES_BLOCK, RES_BLOCK, RES_BLOCK, VIT_BLOCK),
    decoder_block_types=(RES_BLOCK, RES_BLOCK, RES_BLOCK, VIT_BLOCK),
    encoder_qkv_multiscales=((),) * 4,
    decoder_qkv_multiscales=((),) * 4,
    attention_head_dim=8,
    downsample_block_type="pixel_unshuffle",
    upsample_block_type="pixel_shuffle",
    decoder_norm_types=("batch_norm", "batch_norm", "rms_norm", "rms_norm"),
    decoder_act_fns=("relu", "relu", "silu", "silu"),
)


def tiny_ae(seed=0, cfg=TINY_AE):
    ae = randomize(DCAE(cfg), seed, scale=0.1)
    with torch.no_grad():
        for name, b in ae.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                b.copy_(torch.rand(b.shape) + (0.5 if name.endswith("var") else -0.5))
    return ae


def ae_out(ae):
    g = torch.Generator().manual_seed(3)
    f = ae.spatial_factor
    img = torch.rand(1, 3, 2 * f, 2 * f, generator=g) * 2 - 1
    with torch.no_grad():
        return ae.encode(img), ae.decode(torch.randn(1, 4, 2, 2, generator=g))


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", [TINY_AE, TINY_AE_MIX], ids=["sana", "mix"])
def test_dcae_half_stored_weights_compute_in_fp32(tmp_path, cfg, stored):
    """DC-AE weights kept in fp16/bf16 while encoding/decoding in fp32 equal the same weights widened to fp32
    (to the last bit or so: vectorised kernels may round a freshly cast operand's tail differently) and stay
    narrow (RMSNorm, BatchNorm, 1x1 products and the folded upsample all cast per call)."""
    ae = tiny_ae(cfg=cfg)
    save_file({k: v.to(stored) for k, v in ae.state_dict().items()}, tmp_path / "ae_half.safetensors")
    lean = loader.load_vae(tmp_path / "ae_half.safetensors", compute_dtype="fp32")
    wide = loader.load_vae(tmp_path / "ae_half.safetensors", dtype="fp32")
    assert lean.dtype == torch.float32 and {p.dtype for p in lean.parameters()} == {stored}
    got, want = ae_out(lean), ae_out(wide)
    assert all(g.dtype == torch.float32 and rel_err(g, w) <= 1e-6 for g, w in zip(got, want))
    assert {p.dtype for p in lean.parameters()} == {stored}


@pytest.mark.parametrize("cfg", [TINY_AE, TINY_AE_MIX], ids=["sana", "mix"])
def test_dcae_original_table_matches_diffusers_converter(cfg):
    from diffusers.loaders.single_file_utils import convert_autoencoder_dc_checkpoint_to_diffusers

    sd = {k: v.clone() for k, v in tiny_ae(cfg=cfg).state_dict().items()}
    original = keymap.dcae_ours_to_original(sd)
    assert "decoder.project_in.main.conv.weight" in original
    back = convert_autoencoder_dc_checkpoint_to_diffusers(dict(original))
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    ours_back = keymap.dcae_original_to_ours(original)
    assert set(ours_back) == set(sd) and all(torch.equal(ours_back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("table, full", [
    (keymap.TRANSFORMER_KEYS, lambda: ours(TINY.replace(qkv_bias=True, qk_norm=True)).state_dict()),
    (keymap.DCAE_ORIGINAL_KEYS, lambda: tiny_ae().state_dict()),
    (keymap.DCAE_ORIGINAL_KEYS, lambda: tiny_ae(cfg=TINY_AE_MIX).state_dict()),
], ids=["transformer", "dcae", "dcae-mix"])
def test_rename_round_trips_every_table(table, full):
    """rename both ways over a full state dict is the identity (keys, order, values), every one of our keys is
    in the table, and an unknown key passes through untouched."""
    sd = {k: v.clone() for k, v in full().items()}
    sd["not.in.the.table"] = torch.arange(3.0)
    theirs = keymap.rename(sd, table, "from_ours")
    assert theirs["not.in.the.table"] is sd["not.in.the.table"]
    assert not set(theirs) & (set(sd) - {"not.in.the.table"})  # every one of our names was renamed
    back = keymap.rename(theirs, table, "to_ours")
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) and back[k].shape == sd[k].shape for k in sd)
    with pytest.raises(ValueError, match="direction"):
        keymap.rename(sd, table, "sideways")


@pytest.mark.parametrize("fmt", ["diffusers-file", "original-file", "prefixed-original", "diffusers-folder", "pth"])
def test_dcae_formats(tmp_path, fmt):
    from diffusers import AutoencoderDC

    ae = tiny_ae()
    sd = ae.state_dict()
    path = tmp_path / "ae.safetensors"
    if fmt == "diffusers-file":
        save_file(dict(sd), path)
    elif fmt == "original-file":
        save_file(keymap.dcae_ours_to_original(sd), path)
    elif fmt == "prefixed-original":
        save_file({"vae." + k: v for k, v in keymap.dcae_ours_to_original(sd).items()}, path)
    elif fmt == "pth":
        path = tmp_path / "ae.pth"
        torch.save({"state_dict": dict(sd)}, path)
    else:
        ref = AutoencoderDC(**TINY_AE.to_dict())
        ref.load_state_dict(sd)
        path = tmp_path / "vae"
        ref.save_pretrained(path)
    assert loader.detect(path) == "vae"
    got = loader.load_vae(path)
    assert got.config == TINY_AE
    for a, b in zip(ae_out(got), ae_out(ae)):
        assert torch.equal(a, b)


def test_dcae_original_layout_other_family(tmp_path):
    ae = tiny_ae(cfg=TINY_AE_MIX)
    save_file(keymap.dcae_ours_to_original(ae.state_dict()), tmp_path / "dc_ae_f32.safetensors")
    # without multi-scale kernels the head dim is invisible in the weights (released DC-AEs use 32)
    got = loader.load_vae(tmp_path / "dc_ae_f32.safetensors", attention_head_dim=8)
    assert got.config == TINY_AE_MIX
    for a, b in zip(ae_out(got), ae_out(ae)):
        assert torch.equal(a, b)


def _save_ae(ae, path, layout="diffusers", dtype=None):
    sd = {k: v if dtype is None else v.to(dtype) for k, v in ae.state_dict().items()}
    if layout == "original":
        sd = keymap.dcae_ours_to_original(sd)
    if path.suffix == ".pth":
        torch.save(sd, path)
    else:
        save_file(sd, path)
    return path


@pytest.fixture
def reads(monkeypatch):
    """Names of the tensors read from weight files, in order."""
    seen = []
    for cls in (loader.SafetensorsFile, loader.TorchFile):
        def read(self, key, real=cls.__getitem__):
            seen.append(key)
            return real(self, key)
        monkeypatch.setattr(cls, "__getitem__", read)
    return seen


@pytest.mark.parametrize("name,layout", [("ae.safetensors", "diffusers"), ("ae.safetensors", "original"),
                                         ("ae.pth", "original")])
def test_dcae_encoder_is_read_on_first_encode(tmp_path, reads, name, layout):
    """load_vae reads the decoder only; the first encode reads the encoder's tensors (and nothing else) and
    gives exactly what an eagerly loaded model gives."""
    ae = tiny_ae()
    path = _save_ae(ae, tmp_path / name, layout)
    eager = loader.load_vae(path, lazy_encoder=False)
    assert eager.encoder_loaded
    reads.clear()
    lazy = loader.load_vae(path)
    assert reads and all(k.startswith("decoder.") for k in reads)  # the encoder half is never read
    assert not lazy.encoder_loaded and "not loaded yet" in repr(lazy)
    decoder_keys = [k for k in eager.state_dict() if k.startswith("decoder.")]
    assert list(lazy.state_dict()) == decoder_keys  # what is in memory: no meta tensors, nothing unread
    assert all(not p.is_meta for p in lazy.parameters()) and all(not b.is_meta for b in lazy.buffers())
    assert sum(p.numel() for p in lazy.parameters()) == sum(p.numel() for p in eager.decoder.parameters())
    g = torch.Generator().manual_seed(5)
    latent = torch.randn(1, 4, 2, 2, generator=g)
    with torch.no_grad():
        assert torch.equal(lazy.decode(latent), eager.decode(latent))
        assert not lazy.encoder_loaded  # decoding does not read it
        reads.clear()
        img = torch.rand(1, 3, 2 * ae.spatial_factor, 2 * ae.spatial_factor, generator=g) * 2 - 1
        assert torch.equal(lazy.encode(img), eager.encode(img))
    assert lazy.encoder_loaded and reads and all(k.startswith("encoder.") for k in reads)
    assert list(lazy.state_dict()) == list(eager.state_dict())  # same names, same order as eager
    assert all(torch.equal(a, b) for a, b in zip(lazy.state_dict().values(), eager.state_dict().values()))
    reads.clear()
    with torch.no_grad():
        lazy.encode(img)
    assert reads == []  # read once


def test_dcae_lazy_encoder_follows_moves_and_modes(tmp_path):
    """.to()/.half()/eval()/requires_grad_ before the first encode work, and the encoder is read the way they
    left the decoder: its dtype and device, the training flag, the requires_grad flag; compute_dtype holds."""
    ae = tiny_ae()
    path = _save_ae(ae, tmp_path / "ae.safetensors")
    lazy = loader.load_vae(path, compute_dtype="fp32")
    eager = loader.load_vae(path, compute_dtype="fp32", lazy_encoder=False)
    for m in (lazy, eager):
        m.to("cpu").half().requires_grad_(False).train().eval()
    assert not lazy.encoder_loaded and lazy.dtype == torch.float32
    img = torch.rand(1, 3, 2 * ae.spatial_factor, 2 * ae.spatial_factor) * 2 - 1
    got = lazy.encode(img)
    assert got.dtype == torch.float32 and torch.equal(got, eager.encode(img))
    enc = lazy.encoder
    assert {p.dtype for p in enc.parameters()} == {torch.float16}
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.training
    # a plain dtype change (weights and compute alike), and a training-mode model
    lazy = loader.load_vae(path).to(torch.bfloat16).train()
    eager = loader.load_vae(path, lazy_encoder=False).to(torch.bfloat16).train()
    img = img.to(torch.bfloat16)
    assert torch.equal(lazy.encode(img), eager.encode(img))
    assert {p.dtype for p in lazy.encoder.parameters()} == {torch.bfloat16}
    assert lazy.encoder.training and all(p.requires_grad for p in lazy.encoder.parameters())


def test_dcae_lazy_encoder_from_half_file_computing_in_fp32(tmp_path):
    ae = tiny_ae()
    path = _save_ae(ae, tmp_path / "ae.safetensors", dtype=torch.float16)
    lazy = loader.load_vae(path, compute_dtype="fp32")
    eager = loader.load_vae(path, compute_dtype="fp32", lazy_encoder=False)
    for a, b in zip(ae_out(lazy), ae_out(eager)):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    assert {p.dtype for p in lazy.parameters()} == {torch.float16}


def test_dcae_lazy_encoder_file_gone_or_changed(tmp_path):
    """A file deleted or replaced after loading: a TwigError naming it on encode (an encoder from another file
    would not match the decoder), decoding still works and no meta tensor is left in the model."""
    ae = tiny_ae()
    path = _save_ae(ae, tmp_path / "ae.safetensors")
    lazy = loader.load_vae(path)
    img = torch.rand(1, 3, 2 * ae.spatial_factor, 2 * ae.spatial_factor) * 2 - 1
    path.unlink()
    with pytest.raises(TwigError, match=f"{path}: the file is gone since the VAE was loaded"):
        lazy.encode(img)
    assert not lazy.encoder_loaded and all(not t.is_meta for t in lazy.state_dict().values())
    with torch.no_grad():
        assert torch.isfinite(lazy.decode(torch.randn(1, 4, 2, 2))).all()
    _save_ae(tiny_ae(seed=1), path)  # another model under the same name
    with pytest.raises(TwigError, match=f"{path}: the file has changed"):
        lazy.encode(img)
    assert not lazy.encoder_loaded


def test_dcae_lazy_encoder_keys_checked_at_load_and_state_dict(tmp_path):
    ae = tiny_ae()
    sd = dict(ae.state_dict())
    del sd["encoder.down_blocks.0.0.conv2.weight"]
    save_file(sd, tmp_path / "broken.safetensors")
    with pytest.raises(TwigError, match=r"broken\.safetensors: .*missing 1 tensors \(encoder.down_blocks.0.0.conv2"):
        loader.load_vae(tmp_path / "broken.safetensors")
    # load_state_dict with encoder keys on a model that has not read its encoder yet
    lazy = loader.load_vae(_save_ae(ae, tmp_path / "ae.safetensors"))
    other = tiny_ae(seed=2)
    lazy.load_state_dict(other.state_dict())
    assert lazy.encoder_loaded
    for a, b in zip(ae_out(lazy), ae_out(other)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------
# Gemma-2 text encoder

SP_CORPUS = [
    "A small, fluffy white cat curled up in a round shape, sleeping peacefully on a warm sunny windowsill.",
    "A bustling city street scene at dusk, featuring glowing street lamps and a double-decker bus.",
    "an oil painting of a lighthouse on a rocky coast during a storm",
    "一只可爱的小猫在窗台上睡觉，阳光温暖，窗外开满了红色的花。",
    "繁华的城市街道，黄昏时分，路灯闪烁。",
] * 8
SP_PROBES = ["A cat sleeping on a lamp", "小猫 zebra! 🐱", "  two  spaces   then three", "line\n\nbreak",
             "<start_of_turn>user hi<end_of_turn>", "Ünïcödé ß", ""]


@pytest.fixture(scope="module")
def spiece():
    """(sentencepiece bytes, processor): a Gemma-like BPE model (byte fallback, no dummy prefix)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_CORPUS), model_writer=buf, vocab_size=420, model_type="bpe", byte_fallback=True,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", add_dummy_prefix=False, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_by_whitespace=False, character_coverage=1.0, minloglevel=2,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>", "\n\n", "▁▁"], control_symbols=["<mask>"],
    )
    data = buf.getvalue()
    return data, spm.SentencePieceProcessor(model_proto=data)


@pytest.fixture(scope="module")
def gemma(spiece):
    from tests.builders import tiny_gemma2_config
    from transformers import Gemma2Model

    torch.manual_seed(0)
    model = Gemma2Model(tiny_gemma2_config(spiece[1].get_piece_size())).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
    return model


def comfy_gemma_file(path, model, data, prefix="model.", dtype=None):
    sd = {prefix + k: (v.to(dtype) if dtype else v).clone() for k, v in model.state_dict().items()}
    sd["spiece_model"] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    save_file(sd, path)


def test_tokenizer_from_spiece_matches_sentencepiece(spiece):
    data, sp = spiece
    tok = loader.tokenizer_from_spiece(data)
    for text in SP_PROBES:
        assert tok(text)["input_ids"] == [2] + sp.encode(text), text
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
    assert tok.decode(tok("小猫 zebra! 🐱")["input_ids"], skip_special_tokens=True) == "小猫 zebra! 🐱"


@pytest.mark.parametrize("prefix", ["model.", "", "text_encoders.gemma2_2b.transformer.model."])
def test_comfy_gemma_single_file(tmp_path, spiece, gemma, prefix):
    from twig_core.text import TextEncoder

    data, sp = spiece
    path = tmp_path / "gemma_2_2b_fp16.safetensors"
    comfy_gemma_file(path, gemma, data, prefix)
    assert loader.detect(path) == "text_encoder"
    te = loader.load_text_encoder(path)
    assert te.hidden_size == 64 and te.dtype == torch.float32
    ids = torch.tensor([[2] + sp.encode(SP_PROBES[1]) + [0] * 3])
    mask = (ids != 0).long()
    mask[0, 0] = 1
    with torch.no_grad():
        want = gemma(input_ids=ids, attention_mask=mask).last_hidden_state
        got = te.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(got, want)
    ref = TextEncoder(gemma, loader.tokenizer_from_spiece(data))
    a, b = te.encode(SP_PROBES[:3], max_length=16), ref.encode(SP_PROBES[:3], max_length=16)
    assert torch.equal(a.embeds, b.embeds) and torch.equal(a.mask, b.mask)


def test_comfy_gemma_fp16_file_and_dtype(tmp_path, spiece, gemma):
    path = tmp_path / "gemma_fp16.safetensors"
    comfy_gemma_file(path, gemma, spiece[0], dtype=torch.float16)
    assert loader.load_text_encoder(path).dtype == torch.float32  # Gemma-2 overflows in fp16: fp32 on CPU
    assert loader.load_text_encoder(path, dtype="bf16").dtype == torch.bfloat16


def test_gemma_hf_folder_and_tokenizer_path(tmp_path, spiece, gemma):
    from tests.builders import save_tiny_gemma2_folder

    model, tokenizer = save_tiny_gemma2_folder(tmp_path / "gemma")
    assert loader.detect(tmp_path / "gemma") == "text_encoder"
    te = loader.load_text_encoder(tmp_path / "gemma")
    ref = loader.load_text_encoder(tmp_path / "gemma", tokenizer_path=tmp_path / "gemma")
    # the same weights as a single file without spiece_model, tokenizer from the folder
    save_file({"model." + k: v.clone() for k, v in model.state_dict().items()}, tmp_path / "g.safetensors")
    single = loader.load_text_encoder(tmp_path / "g.safetensors", tokenizer_path=tmp_path / "gemma")
    a, b, c = (x.encode(["a cyberpunk cat", "一只小猫"], max_length=12) for x in (te, ref, single))
    assert torch.equal(a.embeds, b.embeds) and torch.equal(a.embeds, c.embeds)
    with pytest.raises(TwigError, match="no tokenizer"):
        loader.load_text_encoder(tmp_path / "g.safetensors")


def test_gemma_folder_with_only_a_bf16_variant(tmp_path):
    from tests.builders import save_tiny_gemma2_folder
    from twig_core.text import TextEncoder

    model, tokenizer = save_tiny_gemma2_folder(tmp_path / "ref")
    folder = tmp_path / "gemma_bf16"
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(folder, variant="bf16")
    tokenizer.save_pretrained(folder)
    assert not any(n.startswith("model.safetensors") for n in os.listdir(folder))
    te = loader.load_text_encoder(folder)
    assert te.dtype == torch.float32
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    ref = TextEncoder(model, tokenizer)
    a, b = te.encode(["a cat", "小猫"], max_length=10), ref.encode(["a cat", "小猫"], max_length=10)
    assert torch.equal(a.embeds, b.embeds)


def test_text_encoder_of_the_wrong_width(tmp_path, spiece, gemma):
    path = tmp_path / "gemma.safetensors"
    comfy_gemma_file(path, gemma, spiece[0])
    with pytest.raises(TwigError, match=r"gemma\.safetensors.*width 64.*2304"):
        loader.load_text_encoder(path, expected_width=2304)


def test_not_gemma2(tmp_path):
    from transformers import LlamaConfig, LlamaModel

    llama = LlamaModel(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1))
    save_file({"model." + k: v.clone() for k, v in llama.state_dict().items()}, tmp_path / "llama.safetensors")
    with pytest.raises(TwigError, match=r"llama\.safetensors.*not Gemma-2"):
        loader.load_text_encoder(tmp_path / "llama.safetensors")


def test_a_config_json_naming_no_model_says_what_is_missing(tmp_path):
    folder = tmp_path / "gemma"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    words = r"gemma[/\\]config\.json: names no model \(no \"_class_name\", \"model_type\" or \"architectures\"\)"
    with pytest.raises(TwigError, match=words + r", so it cannot be Gemma-2.*\"model_type\": \"gemma2\""):
        loader.load_text_encoder(folder)
    with pytest.raises(TwigError, match=words):
        loader.detect(folder)


# ---------------------------------------------------------------------------------------------------
# A pipeline folder picked as one thing


def test_pipeline_folder(tmp_path, spiece, gemma):
    from diffusers import AutoencoderDC
    from tests.builders import save_tiny_gemma2_folder

    cfg = DIFF_CFG.replace(caption_channels=64)
    model = ours(cfg)
    root = tmp_path / "Twig_pipeline"
    diffusers_twin(model).save_pretrained(root / "transformer", max_shard_size="100KB")
    ae = tiny_ae()
    ref_ae = AutoencoderDC(**TINY_AE.to_dict())
    ref_ae.load_state_dict(ae.state_dict())
    ref_ae.save_pretrained(root / "vae")
    gem, tok = save_tiny_gemma2_folder(root / "text_encoder")
    tok.save_pretrained(root / "tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        os.remove(root / "text_encoder" / name)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "SanaPipeline"}))
    assert loader.detect(root) == "pipeline"
    parts = loader.load_pipeline(root)
    assert torch.equal(run(parts.transformer), run(model))
    assert all(torch.equal(a, b) for a, b in zip(ae_out(parts.vae), ae_out(ae)))
    assert parts.text_encoder.hidden_size == 64
    # components can be picked from the pipeline root too
    assert loader.load_vae(root).config == TINY_AE
    assert loader.load_transformer(root).config == cfg
    parts = loader.load_parts(root / "transformer", root / "text_encoder", root)
    assert parts.text_encoder.hidden_size == 64
    # a transformer expecting 48-wide captions refuses this 64-wide Gemma
    save_file(nvlabs_sd(ours()), tmp_path / "other.safetensors")
    with pytest.raises(TwigError, match=r"width 64 does not match the transformer's caption width 48"):
        loader.load_parts(tmp_path / "other.safetensors", root, root)
    # the same sub-folders without model_index.json (copied out of a pipeline): each network is still found
    os.remove(root / "model_index.json")
    assert loader.load_vae(root).config == TINY_AE
    assert loader.load_transformer(root).config == cfg
    assert loader.load_parts(root, root, root).text_encoder.hidden_size == 64


# ---------------------------------------------------------------------------------------------------
# Safety and errors


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.parametrize("how", ["torch-zip", "raw-pickle"])
def test_code_running_pickle_is_refused(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"state_dict": {"x_embedder.proj.weight": torch.zeros(1)}, "extra": _Evil(str(marker))}
    if how == "torch-zip":
        torch.save(payload, path)
    else:
        path = tmp_path / "evil.ckpt"
        path.write_bytes(pickle.dumps(payload, protocol=2))
    assert not marker.exists()
    for fn in (loader.load_transformer, loader.detect, loader.load_vae):
        with pytest.raises(TwigError, match=r"evil\.(pth|ckpt).*refused"):
            fn(path)
    assert not marker.exists()


@pytest.mark.parametrize("zip_format", [True, False])
def test_pytorch_file_named_safetensors_loads_by_its_bytes(tmp_path, zip_format):
    sd = nvlabs_sd(ours())
    save_file(sd, tmp_path / "real.safetensors")
    renamed = tmp_path / "renamed.safetensors"
    torch.save(sd, renamed, _use_new_zipfile_serialization=zip_format)
    want = loader.load_transformer(tmp_path / "real.safetensors").state_dict()
    got = loader.load_transformer(renamed).state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    # the renamed file still goes through the safe reader: a code-running pickle is refused, naming the file
    marker = tmp_path / "pwned"
    torch.save({"state_dict": sd, "extra": _Evil(str(marker))}, tmp_path / "evil.safetensors",
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(TwigError, match=r"evil\.safetensors.*refused"):
        loader.load_transformer(tmp_path / "evil.safetensors")
    assert not marker.exists()


def test_truncated_and_corrupt_files(tmp_path):
    sd = nvlabs_sd(ours())
    save_file(sd, tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(TwigError, match=r"cut\.safetensors.*truncated"):
        loader.load_transformer(tmp_path / "cut.safetensors")
    (tmp_path / "header.safetensors").write_bytes(data[:8] + b"{garbage" + data[16:])
    with pytest.raises(TwigError, match=r"header\.safetensors.*corrupt"):
        loader.load_transformer(tmp_path / "header.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(data[:5])
    with pytest.raises(TwigError, match=r"tiny\.safetensors"):
        loader.detect(tmp_path / "tiny.safetensors")
    torch.save({"state_dict": sd}, tmp_path / "ok.pth")
    pth = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(pth[: len(pth) // 2])
    with pytest.raises(TwigError, match=r"cut\.pth.*truncated or corrupt"):
        loader.load_transformer(tmp_path / "cut.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(TwigError, match=r"empty\.pth.*empty"):
        loader.load_transformer(tmp_path / "empty.pth")
    (tmp_path / "text.pth").write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(TwigError, match=r"text\.pth.*not a safetensors or PyTorch"):
        loader.load_transformer(tmp_path / "text.pth")
    with pytest.raises(TwigError, match="not found"):
        loader.load_transformer(tmp_path / "nope.safetensors")


def _unpadded_safetensors(path, entries):
    """A safetensors file of ``entries`` (name, tag, tensor), in that order, packed without padding: the header
    and each tensor end wherever their bytes do, so an offset can fall on an odd byte."""
    header, blobs, at = {}, [], 0
    for name, tag, t in entries:
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": tag, "shape": list(t.shape), "data_offsets": [at, at + len(raw)]}
        blobs.append(raw)
        at += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (len(text) % 2)  # even: the data starts on an even byte, the bytes after the 1-byte tensor on an odd one
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_large_safetensors_tensors_are_private_mappings_of_their_bytes(tmp_path):
    """A tensor of at least MAP_MIN_BYTES comes as a copy-on-write mapping of its bytes: equal to what was saved,
    resident as the file's pages (no copy beside the page cache), a write to it stays in this process, and the
    mapping ends with the tensor. One whose bytes start off its dtype's alignment is read into memory instead."""
    from tests.builders import mapped_rss_kib
    from twig_core.weights import MAP_MIN_BYTES, open_weights

    g = torch.Generator().manual_seed(0)
    big = torch.randn(MAP_MIN_BYTES // 2 + 7, generator=g).to(torch.bfloat16)
    small = torch.randn(5, generator=g)
    path = tmp_path / "w.safetensors"
    save_file({"big": big, "small": small}, path)
    before = path.read_bytes()
    w = open_weights(path)
    t = w["big"]
    assert torch.equal(t, big) and torch.equal(w["small"], small)
    assert mapped_rss_kib(path) >= big.numel() * 2 // 1024 - 8  # its pages are the file's
    with torch.no_grad():
        t.add_(1)
    assert path.read_bytes() == before and torch.equal(w["big"], big)
    del t
    assert mapped_rss_kib(path) == 0, "the mapping outlived its tensor"
    odd = tmp_path / "odd.safetensors"
    _unpadded_safetensors(odd, [("flag", "U8", torch.ones(1, dtype=torch.uint8)), ("big", "BF16", big)])
    t = open_weights(odd)["big"]
    assert torch.equal(t, big) and t.data_ptr() % 2 == 0 and mapped_rss_kib(odd) == 0


def test_bf16_gemma_loads_as_views_of_its_file_and_computes_as_when_read(tmp_path, spiece, gemma, monkeypatch):
    """A bf16 Gemma-2 loaded in bf16 keeps its large weights as mappings of the file (nothing copied), and gives
    exactly the hidden states of the same file read into memory."""
    from twig_core import weights

    data, sp = spiece
    path = tmp_path / "gemma_bf16.safetensors"
    comfy_gemma_file(path, gemma, data, dtype=torch.bfloat16)
    ids = torch.tensor([[2] + sp.encode(SP_PROBES[1])])
    out = {}
    for limit in (0, 1 << 62):  # every tensor mapped; none
        monkeypatch.setattr(weights, "MAP_MIN_BYTES", limit)
        te = loader.load_text_encoder(path, dtype="bf16")
        w = te.model.layers[0].mlp.up_proj.weight
        with torch.no_grad():
            out[limit] = te.model(input_ids=ids).last_hidden_state
            w.add_(1)
        if sys.platform.startswith("linux"):
            from tests.builders import mapped_rss_kib

            assert (mapped_rss_kib(path) > 0) == (limit == 0)  # a host patching a weight in place changes this model only
        del te, w
    assert torch.equal(out[0], out[1 << 62])
    monkeypatch.setattr(weights, "MAP_MIN_BYTES", 0)
    assert torch.equal(loader.load_text_encoder(path, dtype="bf16").model(input_ids=ids).last_hidden_state, out[0])


def test_wrong_network_for_the_loader(tmp_path, spiece, gemma):
    save_file(dict(tiny_ae().state_dict()), tmp_path / "vae.safetensors")
    save_file(nvlabs_sd(ours()), tmp_path / "dit.safetensors")
    comfy_gemma_file(tmp_path / "te.safetensors", gemma, spiece[0])
    with pytest.raises(TwigError, match=r"vae\.safetensors.*DC-AE.*not a Sana/Twig transformer"):
        loader.load_transformer(tmp_path / "vae.safetensors")
    with pytest.raises(TwigError, match=r"dit\.safetensors.*transformer.*not a DC-AE"):
        loader.load_vae(tmp_path / "dit.safetensors")
    with pytest.raises(TwigError, match=r"te\.safetensors.*Gemma-2.*not a Sana/Twig transformer"):
        loader.load_transformer(tmp_path / "te.safetensors")
    with pytest.raises(TwigError, match=r"vae\.safetensors.*not a Gemma-2"):
        loader.load_text_encoder(tmp_path / "vae.safetensors")
    sd_unet = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}
    save_file(sd_unet, tmp_path / "sd15.safetensors")
    with pytest.raises(TwigError, match=r"sd15\.safetensors.*Stable Diffusion UNet"):
        loader.detect(tmp_path / "sd15.safetensors")
    # a folder whose config.json names another network
    from diffusers import AutoencoderDC

    AutoencoderDC(**TINY_AE.to_dict()).save_pretrained(tmp_path / "vae_dir")
    with pytest.raises(TwigError, match=r"vae_dir.*DC-AE.*not a Sana/Twig transformer"):
        loader.load_transformer(tmp_path / "vae_dir")


def test_missing_unexpected_and_mismatched_keys(tmp_path):
    sd = nvlabs_sd(ours())
    gone = dict(sd)
    del gone["blocks.1.cross_attn.proj.weight"]
    save_file(gone, tmp_path / "missing.safetensors")
    with pytest.raises(TwigError, match=r"missing\.safetensors.*missing 1 tensors \(blocks\.1\.cross_attn\.proj\.w"):
        loader.load_transformer(tmp_path / "missing.safetensors")
    extra = dict(sd)
    extra["cfg_embedder.mlp.0.weight"] = torch.zeros(64, 256)
    save_file(extra, tmp_path / "extra.safetensors")
    with pytest.raises(TwigError, match=r"extra\.safetensors.*unexpected tensors \(cfg_embedder\.mlp.*Sprint"):
        loader.load_transformer(tmp_path / "extra.safetensors")
    bad = dict(sd)
    bad["blocks.1.attn.proj.weight"] = torch.zeros(64, 32)
    save_file(bad, tmp_path / "shape.safetensors")
    with pytest.raises(TwigError, match=r"shape\.safetensors.*attn\.proj\.weight \(64, 32\) in the file vs \(64, 64\)"):
        loader.load_transformer(tmp_path / "shape.safetensors")
    holes = {k: v for k, v in sd.items() if not k.startswith("blocks.0.")}
    save_file(holes, tmp_path / "holes.safetensors")
    with pytest.raises(TwigError, match=r"holes\.safetensors.*lack blocks \[0\] of 2"):
        loader.load_transformer(tmp_path / "holes.safetensors")


def test_broken_shards(tmp_path):
    model = ours(DIFF_CFG)
    folder = tmp_path / "transformer"
    diffusers_twin(model).save_pretrained(folder, max_shard_size="60KB")
    shards = sorted(n for n in os.listdir(folder) if "-of-" in n)
    assert len(shards) >= 2
    os.remove(folder / shards[-1])
    with pytest.raises(TwigError, match=rf"index\.json.*missing.*{shards[-1]}"):
        loader.load_transformer(folder)
    # an index naming a tensor its shard does not hold (mixed downloads)
    diffusers_twin(model).save_pretrained(folder, max_shard_size="60KB")
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    index["weight_map"]["transformer_blocks.9.attn1.to_q.weight"] = shards[0]
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(TwigError, match=r"index\.json.*transformer_blocks\.9\.attn1\.to_q\.weight"):
        loader.load_transformer(folder)



def test_load_parts_says_what_the_transformer_path_really_is(tmp_path):
    import shutil

    from tests.builders import write_tiny_pipeline

    root = write_tiny_pipeline(tmp_path / "pipe")
    for part, words in (("vae", "DC-AE autoencoder (VAE), not a Sana/Twig transformer; give it as the VAE"),
                        ("text_encoder", "Gemma-2 text encoder, not a Sana/Twig transformer; give it as the text")):
        for others in ((), (root, root)):  # alone (as the command line's --transformer) or with the other parts
            with pytest.raises(TwigError) as e:
                loader.load_parts(root / part, *others)
            assert str(root / part) in str(e.value) and words in str(e.value)
            assert "holds no text encoder" not in str(e.value)
    # a folder with a config.json and no weights
    for part, words in (("vae", "not a Sana/Twig transformer"), ("transformer", "no weights found")):
        only = tmp_path / f"{part}_config_only"
        only.mkdir()
        shutil.copy(root / part / "config.json", only / "config.json")
        with pytest.raises(TwigError) as e:
            loader.load_parts(only)
        assert str(only) in str(e.value) and words in str(e.value) and "holds no text encoder" not in str(e.value)
