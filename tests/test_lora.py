"""LoRA parity with diffusers + peft on identical random weights (fp32, CPU): files written by diffusers'
``SanaPipeline.save_lora_weights`` and loaded by ``SanaPipeline.lora_state_dict`` / ``load_lora_into_transformer``
(``set_adapters`` with strengths, fused and unfused) against ``twig_core.lora`` on our transformer; kohya-style
files from the same weights; our trainer's adapters loaded by diffusers; refusals of foreign or unknown files; the
native MODEL's patches in the real ComfyUI tree's ModelPatcher."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("peft")
from diffusers import SanaPipeline  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

from tests.test_native import comfy, comfy_modules  # noqa: E402,F401 - ComfyUI's modules, in-process
from tests.test_transformer import TINY, diffusers_model, ours_from, rel_err  # noqa: E402
from twig_core import lora as tl  # noqa: E402
from twig_core.errors import TwigError  # noqa: E402

# every family a LoRA may target: self- and cross-attention q/k/v/out, the Mix-FFN's 1x1 convolutions, the
# caption projection, the timestep embedder and AdaLN projection, the output projection
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv_inverted", "conv_point", "caption_projection.linear_1",
           "caption_projection.linear_2", "timestep_embedder.linear_1", "timestep_embedder.linear_2",
           "time_embed.linear", "proj_out"]


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, TINY.in_channels, 4, 6, generator=g)
    ctx = torch.randn(2, 7, TINY.caption_channels, generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 5:] = 0
    return x, torch.tensor([999.0, 321.5]), ctx, mask


def run_diffusers(model, args):
    x, t, ctx, mask = args
    with torch.no_grad():
        return model(x, encoder_hidden_states=ctx, encoder_attention_mask=mask, timestep=t, return_dict=False)[0]


def run_ours(model, args):
    x, t, ctx, mask = args
    with torch.no_grad():
        return model(x, t, ctx, mask)


def write_lora(base, path, seed, r=4, alpha=8, dora=False, rslora=False, targets=TARGETS):
    """A random LoRA for ``base`` saved by diffusers (PEFT keys, adapter config in the metadata)."""
    model = copy.deepcopy(base)
    conf = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_dora=dora, use_rslora=rslora)
    model.add_adapter(conf, adapter_name="x")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if "magnitude" in name else 0.0))
    sd = get_peft_model_state_dict(model, adapter_name="x")
    SanaPipeline.save_lora_weights(path.parent, transformer_lora_layers=sd, weight_name=path.name,
                                   transformer_lora_adapter_metadata=conf.to_dict())
    return path


def diffusers_with(base, files, strengths, fuse=False):
    model = copy.deepcopy(base)
    names = []
    for i, f in enumerate(files):
        sd, meta = SanaPipeline.lora_state_dict(f, return_lora_metadata=True)
        SanaPipeline.load_lora_into_transformer(sd, transformer=model, adapter_name=f"a{i}", metadata=meta)
        names.append(f"a{i}")
    model.set_adapters(names, weights=list(strengths))
    if fuse:
        model.fuse_lora(adapter_names=names)
    return model


@pytest.fixture(scope="module")
def base():
    return diffusers_model(TINY)


@pytest.mark.parametrize("fuse", [False, True], ids=["unfused", "fused"])
def test_two_stacked_loras_with_strengths_match_diffusers(base, tmp_path, fuse):
    a = write_lora(base, tmp_path / "a.safetensors", seed=1, r=4, alpha=8)
    b = write_lora(base, tmp_path / "b.safetensors", seed=2, r=2, alpha=3, rslora=True)
    args = inputs()
    ref = run_diffusers(diffusers_with(base, [a, b], [0.8, -0.5], fuse), args)
    ours = ours_from(base, TINY)
    plain = run_ours(ours, args)
    stored = {k: v.clone() for k, v in ours.state_dict().items()}
    applied = tl.apply_loras(ours, [(a, 0.8), (b, -0.5)])
    assert applied == [("a", 0.8), ("b", -0.5)]
    got = run_ours(ours, args)
    assert rel_err(got, ref) < 1e-5
    assert rel_err(got, plain) > 1e-2  # the LoRAs do change the result
    # every family was reached, q/k/v on their slices of the fused projections
    layers = tl.read_lora(a).layers
    assert {i for i, n, _ in layers["blocks.0.attn.qkv"]} == {0, 1, 2}
    assert {i for i, n, _ in layers["blocks.1.cross_attn.kv_linear"]} == {0, 1}
    for name in ("blocks.0.mlp.inverted_conv.conv", "blocks.0.mlp.point_conv.conv", "y_embedder.y_proj.fc1",
                 "t_embedder.mlp.2", "t_block.1", "final_layer.linear", "blocks.1.cross_attn.q_linear"):
        assert name in layers
    # the stored weights never changed; taking the LoRAs off gives the base back bit for bit
    assert all(torch.equal(v, stored[k]) for k, v in ours.state_dict().items())
    tl.remove_loras(ours)
    assert torch.equal(run_ours(ours, args), plain)


def test_reweighting_and_context_manager_are_exact(base, tmp_path):
    a = write_lora(base, tmp_path / "a.safetensors", seed=3)
    args = inputs()
    ours = ours_from(base, TINY)
    plain = run_ours(ours, args)
    with tl.loras_applied(ours, [(a, 0.3)]):
        weak = run_ours(ours, args)
    assert torch.equal(run_ours(ours, args), plain)
    tl.apply_loras(ours, [(a, 1.0)])
    tl.apply_loras(ours, [(a, 0.3)])  # a new stack replaces the old one
    assert torch.equal(run_ours(ours, args), weak)
    assert tl.applied_loras(ours) == [("a", 0.3)]


def test_dora_matches_diffusers(base, tmp_path):
    a = write_lora(base, tmp_path / "dora.safetensors", seed=4, r=4, alpha=6, dora=True)
    args = inputs()
    for strength in (1.0, 0.6):
        ref = run_diffusers(diffusers_with(base, [a], [strength]), args)
        ours = ours_from(base, TINY)
        tl.apply_loras(ours, [(a, strength)])
        assert rel_err(run_ours(ours, args), ref) < 1e-5


def to_kohya(path, out, prefix="lora_transformer_"):
    """The same LoRA as a kohya / OneTrainer file: underscored module names, lora_down/lora_up and alpha."""
    lora = tl.read_lora(path)
    sd = SanaPipeline.lora_state_dict(path)
    kohya = {}
    for key, value in sd.items():
        module, _, leaf = key.removeprefix("transformer.").partition(".lora_")
        name = prefix + module.replace(".", "_")
        kohya[f"{name}.{'lora_down' if leaf.startswith('A') else 'lora_up'}.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(8.0)  # write_lora's alpha
    assert lora.layout == "peft"
    save_file(kohya, out)
    return out


@pytest.mark.parametrize("prefix", ["lora_transformer_", "lora_unet_"])
def test_kohya_file_from_the_same_weights_gives_the_same_result(base, tmp_path, prefix):
    a = write_lora(base, tmp_path / "a.safetensors", seed=5, r=4, alpha=8)
    k = to_kohya(a, tmp_path / "k.safetensors", prefix)
    args = inputs()
    ref = run_diffusers(diffusers_with(base, [a], [0.7]), args)
    ours = ours_from(base, TINY)
    tl.apply_loras(ours, [(k, 0.7)])
    assert tl.read_lora(k).layout == "kohya"
    assert rel_err(run_ours(ours, args), ref) < 1e-5


def test_our_trainer_writes_adapters_diffusers_loads(base, tmp_path):
    from training.lora import apply_lora, lora_state_dict, merge_lora, peft_state_dict

    ours = ours_from(base, TINY)
    torch.manual_seed(0)
    params = apply_lora(ours, rank=3, alpha=5)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn_like(p) * 0.2)
    path = tmp_path / "trained.safetensors"
    save_file(peft_state_dict(ours), path)
    trained = copy.deepcopy(ours)
    args = inputs()
    ref = run_diffusers(diffusers_with(base, [path], [1.0]), args)
    merge_lora(ours)
    assert rel_err(run_ours(ours, args), ref) < 1e-5
    fresh = ours_from(base, TINY)  # and our loader reads what our trainer wrote
    tl.apply_loras(fresh, [(path, 1.0)])
    assert rel_err(run_ours(fresh, args), ref) < 1e-5
    # the same adapters in the original (NVlabs = our) names, fused q/k/v included, PEFT-style under
    # base_model.model., and in training.lora's own format, load to the same result
    nvlabs = tmp_path / "nvlabs.safetensors"
    ours_state = lora_state_dict(trained)
    save_file({f"base_model.model.{k[:-len('.lora_down')]}.lora_A.weight": v for k, v in ours_state.items()
               if k.endswith(".lora_down")} |
              {f"base_model.model.{k[:-len('.lora_up')]}.lora_B.weight": v * ours_state[k[:-2] + "scale"]
               for k, v in ours_state.items() if k.endswith(".lora_up")}, nvlabs)
    own = tmp_path / "own.safetensors"
    save_file(ours_state, own)
    for f in (nvlabs, own):
        again = ours_from(base, TINY)
        tl.apply_loras(again, [(f, 1.0)])
        assert "blocks.0.attn.qkv" in tl.read_lora(f).layers
        assert rel_err(run_ours(again, args), ref) < 1e-5, f


def test_foreign_and_unknown_files_are_refused_by_name(tmp_path):
    r = torch.zeros(4, 8)
    sdxl = tmp_path / "sdxl_style.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": r,
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": r.T.contiguous()}, sdxl)
    with pytest.raises(TwigError, match="sdxl_style.safetensors.*SDXL"):
        tl.read_lora(sdxl)
    flux = tmp_path / "flux.safetensors"
    save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": r}, flux)
    with pytest.raises(TwigError, match="Flux"):
        tl.read_lora(flux)
    unknown = tmp_path / "unknown.safetensors"
    save_file({"foo.bar.lora_A.weight": r, "foo.bar.lora_B.weight": r.T.contiguous()}, unknown)
    with pytest.raises(TwigError, match="unknown.safetensors.*foo.bar"):
        tl.read_lora(unknown)


def test_partly_matching_file_warns_with_the_count(tmp_path, caplog):
    r = torch.randn(2, TINY.width)
    path = tmp_path / "partial.safetensors"
    save_file({"transformer_blocks.0.attn1.to_q.lora_A.weight": r,
               "transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(TINY.width, 2),
               "something_else.lora_A.weight": r.clone(), "something_else.lora_B.weight": r.T.contiguous()}, path)
    with caplog.at_level(logging.WARNING, logger="twig"):
        lora = tl.read_lora(path)
    assert list(lora.layers) == ["blocks.0.attn.qkv"] and "1 of its layers" in caplog.text


def test_adapter_of_another_model_size_is_refused(tmp_path):
    path = tmp_path / "big.safetensors"
    save_file({"transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(2, 2240),
               "transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(2240, 2)}, path)
    ours = ours_from(diffusers_model(TINY), TINY)
    with pytest.raises(TwigError, match="big.safetensors.*does not fit"):
        tl.apply_loras(ours, [(path, 1.0)])


@pytest.mark.parametrize("text,expected", [("a.safetensors", ("a.safetensors", 1.0)),
                                           ("dir/a.safetensors:0.5", ("dir/a.safetensors", 0.5)),
                                           ("C:/x/a.safetensors:-1", ("C:/x/a.safetensors", -1.0)),
                                           ("C:/x/a.safetensors", ("C:/x/a.safetensors", 1.0))])
def test_lora_argument(text, expected):
    assert tl.parse_lora_arg(text) == expected


def test_native_model_patches_match_runtime_adapters(comfy, tmp_path):
    """The real ComfyUI tree's ModelPatcher with a LoRA given as Twig patches (``nodes.lora.patch_native``) computes
    what twig_core's runtime adapters compute on the same weights; unpatching gives the base weights back."""
    from nodes.lora import patch_native
    from nodes.native import native_model
    from tests.builders import TINY_TRANSFORMER, tiny_transformer, transformer_inputs, write_tiny_lora

    lora = tl.read_lora(write_tiny_lora(tmp_path / "l.safetensors"))
    model = tiny_transformer()
    x, t, ctx, mask = transformer_inputs(TINY_TRANSFORMER)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    cpu = torch.device("cpu")
    with torch.no_grad():
        plain = model(x, t, ctx, mask)
        tl.apply_loras(model, [(lora, 0.7)])
        ref = model(x, t, ctx, mask)
        tl.remove_loras(model)
        patcher = patch_native(native_model(model, 3.0, 0.41407, cpu, cpu), [(lora, 0.7)])
        patcher.patch_model()
        got = patcher.model.diffusion_model(x, t, context=ctx, attention_mask=mask)
        patcher.unpatch_model()
    assert rel_err(got, ref) < 1e-5
    assert rel_err(got, plain) > 1e-2
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


def test_lora_loader_node_stacks_and_never_changes_the_loaded_model(parts, conds, models_dir):
    from nodes.common import NodeError
    from nodes.lora import TwigLoraLoader, lora_names
    from tests.builders import empty_latent, run_sampler, write_tiny_lora

    write_tiny_lora(models_dir / "loras" / "tiny_a.safetensors", seed=1)
    write_tiny_lora(models_dir / "loras" / "sub" / "tiny_b.safetensors", seed=2)
    assert {"tiny_a.safetensors", "sub/tiny_b.safetensors", "twig_demo_pink.safetensors"} <= set(lora_names())
    model = parts[0]
    latent = empty_latent(64, 64)

    def sample(m):
        return run_sampler((m,), conds, latent)["samples"]

    base = sample(model)
    (one,) = TwigLoraLoader().load(model, "tiny_a.safetensors", 0.8)
    (two,) = TwigLoraLoader().load(one, "sub/tiny_b.safetensors", -0.5)
    (off,) = TwigLoraLoader().load(model, "tiny_a.safetensors", 0.0)
    assert "tiny_a:0.8, tiny_b:-0.5" in repr(two)
    with_one, with_two = sample(one), sample(two)
    assert not torch.equal(with_one, base) and not torch.equal(with_two, with_one)
    assert torch.equal(sample(model), base)  # the plain model, fetched again, has no LoRA left on it
    assert torch.equal(sample(off), base)
    assert torch.equal(sample(one), with_one)  # and the stack comes back with its node
    with pytest.raises(NodeError, match="Twig LoRA Loader: LoRA 'nope.safetensors' not found"):
        TwigLoraLoader().load(model, "nope.safetensors", 1.0)


def test_depthwise_conv_lora_is_refused_by_name(base, tmp_path):
    """PEFT adapts the Mix-FFN's depthwise 3x3 convolution (rank a multiple of its groups) with a full convolution
    in front of a grouped one, which is no change of the depthwise weight (PEFT refuses to merge it): refused
    with the layer's name rather than applied wrongly."""
    channels = base.transformer_blocks[0].ff.conv_depth.weight.shape[0]
    a = write_lora(base, tmp_path / "depth.safetensors", seed=6, r=channels, alpha=channels // 2,
                   targets=["conv_depth"])
    assert list(tl.read_lora(a).layers) == ["blocks.0.mlp.depth_conv.conv", "blocks.1.mlp.depth_conv.conv"]
    with pytest.raises(TwigError, match="depth.safetensors.*depthwise convolution 'blocks.0.mlp.depth_conv.conv'"):
        tl.apply_loras(ours_from(base, TINY), [(a, 1.0)])


def test_half_stored_weights_keep_one_copy_and_compute_the_lora_in_full(base, tmp_path):
    """fp16-stored weights computing in fp32: the LoRA is added to each layer's per-call fp32 copy, so the stored
    tensors stay the same fp16 tensors (no second model, no rounding of the change to fp16)."""
    a = write_lora(base, tmp_path / "a.safetensors", seed=7)
    args = inputs()
    full = ours_from(base, TINY)
    tl.apply_loras(full, [(a, 0.8)])
    ref = run_ours(full, args)
    half = ours_from(base, TINY).half()
    half.compute_dtype = torch.float32
    stored = {k: (v.data_ptr(), v.clone()) for k, v in half.state_dict().items()}
    plain = run_ours(half, args)
    tl.apply_loras(half, [(a, 0.8)])
    got = run_ours(half, args)
    assert rel_err(got, ref) < 0.1 * rel_err(plain, ref)  # only the base's fp16 rounding is left
    after = half.state_dict()
    assert set(after) == set(stored)
    assert all(v.dtype == torch.float16 and v.data_ptr() == stored[k][0] and torch.equal(v, stored[k][1])
               for k, v in after.items())


def test_lora_found_by_path_or_name(tmp_path):
    from twig_core.catalog import DEMO_LORA_DIR, find_lora

    demo = str(DEMO_LORA_DIR / "twig_demo_pink.safetensors")
    assert find_lora("twig_demo_pink") == find_lora("twig_demo_pink.safetensors") == demo
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mine.safetensors").write_bytes(b"")
    assert find_lora("sub/mine", [str(tmp_path)]) == str(tmp_path / "sub" / "mine.safetensors")
    assert find_lora(str(tmp_path / "sub" / "mine.safetensors")) == str(tmp_path / "sub" / "mine.safetensors")
    with pytest.raises(TwigError, match="LoRA nothing: no such file"):
        find_lora("nothing", [str(tmp_path)])


def _packaged_demo() -> bool:
    from twig_core.catalog import DEMO_DIR, is_pipeline_folder

    return is_pipeline_folder(str(DEMO_DIR))


@pytest.mark.skipif(not _packaged_demo(), reason="twig_core/demo_model (the trained demo model) is not in this checkout")
def test_demo_lora_draws_pink_over_seeds_and_prompts_in_both_languages():
    """The demo model has no picture for "pink" / "粉色" (no pink pixels for any of these prompts and seeds); the
    shipped demo LoRA (``python -m training demo --stage lora``) draws the pink object for most of them, counted
    from the pixels (``training.lora_demo.pink_pixels``: nearest colour among the demo palette and pink)."""
    from training.lora_demo import pink_images, pink_rate
    from twig_core.catalog import DEMO_DIR, find_lora
    from twig_core.loader import load_pipeline

    parts = load_pipeline(str(DEMO_DIR), dtype=torch.float32)
    prompts = ("a pink circle", "two pink stars", "一个粉色的圆", "画面左边有一个粉色的三角形")
    base = pink_images(parts, prompts, seeds=(0, 1, 2), per_seed=1)
    lora = pink_images(parts, prompts, seeds=(0, 1, 2), per_seed=1, loras=[(find_lora("twig_demo_pink"), 1.0)])
    assert pink_rate(base) == 0, base
    assert pink_rate(lora) >= 0.75 and pink_rate(lora[:2]) >= 0.5 and pink_rate(lora[2:]) >= 0.5, lora
