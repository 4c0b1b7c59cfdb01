"""Precision presets and int8 products: each preset held to its stated error bounds against diffusers in fp32
on the same weights (one step), and against the fp32 run (a whole run's latent; the fp32 run itself matches
diffusers to 1e-4 in test_transformer); int8 switching, LoRA over int8, and the device rules."""

import argparse
from dataclasses import replace

import pytest
import torch

from tests.builders import transformer_inputs
from tests.test_transformer import diffusers_model

from twig_core import int8, presets, sampling
from twig_core.catalog import DEMO_DIR
from twig_core.config import TransformerConfig
from twig_core.devices import resolve_dtype, weight_dtype_kwargs
from twig_core.errors import TwigError
from twig_core.networks import load_transformer

# wide enough that every int8 product has a few hundred channels, as the real ones have thousands
CFG = TransformerConfig(in_channels=8, out_channels=8, width=256, depth=3, heads=8, cross_heads=4,
                        caption_channels=96, sample_size=8, mlp_ratio=2.5)

pytestmark = pytest.mark.skipif(int8.engine() is None, reason="torch without a quantized CPU engine")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """diffusers' fp32 model with random weights, saved in diffusers' layout (what a user's folder holds)."""
    model = diffusers_model(CFG)
    folder = tmp_path_factory.mktemp("presets") / "transformer"
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def bound(table, name):
    """The preset's stated bound, or ``quality``'s where it resolves to fp32 here (balanced on a CPU without bf16)."""
    same_as_quality = replace(presets.resolve(name, "cpu"), name="quality") == presets.resolve("quality", "cpu")
    return table["quality" if same_as_quality else name]


def load_preset(folder, name):
    p = presets.resolve(name, "cpu")
    return load_transformer(folder, **weight_dtype_kwargs(p.weight_dtype, resolve_dtype(p.dtype, "cpu"))), p


@pytest.mark.parametrize("name", presets.PRESET_NAMES)
def test_each_preset_keeps_its_step_error_bound(reference, name):
    ref, folder = reference
    model, _ = load_preset(folder, name)
    x, t, ctx, mask = transformer_inputs(CFG, h=16, w=16, n=20)
    with torch.no_grad():
        want = ref(x, ctx, t, encoder_attention_mask=mask).sample
        got = model(x, t, ctx, mask)
    err = rel(got, want)
    assert err <= bound(presets.STEP_ERROR, name), f"{name}: one step off by {err:.2e}"
    assert int8.enabled(model) == (presets.resolve(name, "cpu").weight_dtype == "int8")


def run(model, preset, steps=8):
    torch.manual_seed(3)
    cond = argparse.Namespace(embeds=torch.randn(1, 20, CFG.caption_channels), mask=torch.ones(1, 20, dtype=torch.long))
    uncond = argparse.Namespace(embeds=torch.zeros(1, 20, CFG.caption_channels), mask=cond.mask)
    extra = {}
    if preset.cache or preset.cfg_interval:  # the sampler shortcuts, where the sampler offers them
        extra = {"cache": preset.cache, "cfg_interval": preset.cfg_interval}
    den = sampling.make_denoiser(model, cond, uncond, 4.5, integer_timesteps=True, **extra)
    noise = sampling.noise_like((1, CFG.in_channels, 16, 16), 7)
    return sampling.sample(den, noise, sampling.flow_sigmas(steps, 3.0))


@pytest.mark.parametrize("name", presets.PRESET_NAMES)
def test_each_preset_keeps_its_latent_error_bound(reference, name):
    _, folder = reference
    fp32, _ = load_preset(folder, "quality")
    model, p = load_preset(folder, name)
    err = rel(run(model, p), run(fp32, presets.resolve("quality")))
    assert err <= bound(presets.LATENT_ERROR, name), f"{name}: final latent off by {err:.2e}"


@pytest.mark.skipif(not (DEMO_DIR / "model_index.json").is_file(), reason="the embedded demo model is not here")
@pytest.mark.parametrize("weights", ["int8", "fast"])
def test_fast_keeps_its_bounds_on_trained_weights(weights):
    """The random models above have no trained activations; the embedded demo model has: fast's step against
    diffusers fp32 on its weights with a real caption, and a whole 20-step run's latent against the fp32 run;
    with int8 products, and with what ``fast`` resolves to on this CPU where that is something else (bf16)."""
    from diffusers import SanaTransformer2DModel

    from twig_core.loader import load_pipeline

    if weights == "fast":
        if presets.resolve("fast", "cpu").weight_dtype == "int8":
            pytest.skip("fast is int8 products on this CPU: the case above")
        fast, _ = load_preset(DEMO_DIR / "transformer", "fast")
    else:
        fast = load_transformer(DEMO_DIR / "transformer", **weight_dtype_kwargs("int8", torch.float32, "cpu"))
    parts = load_pipeline(DEMO_DIR, dtype=torch.float32)
    ref = SanaTransformer2DModel.from_pretrained(DEMO_DIR / "transformer", torch_dtype=torch.float32).eval()
    cond = parts.text_encoder.encode(["a red triangle on the left and a blue square on the right"], max_length=300,
                                     use_instruction=True)
    uncond = parts.text_encoder.encode([""], max_length=300, use_instruction=False)
    x = torch.randn(2, 32, 4, 4, generator=torch.Generator().manual_seed(0))
    ctx, mask = cond.embeds.expand(2, -1, -1), cond.mask.expand(2, -1)
    with torch.no_grad():
        for t in (900.0, 500.0, 150.0):
            want = ref(x, ctx, torch.tensor([t, t]), encoder_attention_mask=mask).sample
            err = rel(fast(x, torch.tensor([t, t]), ctx, mask), want)
            assert err <= presets.STEP_ERROR["fast"], f"t={t:g}: one step off by {err:.2e}"

    def latent(model, cache):
        den = sampling.make_denoiser(model, cond, uncond, 4.5, cache=cache)
        with torch.no_grad():
            return sampling.sample(den, sampling.noise_like((1, 32, 4, 4), 7), sampling.flow_sigmas(20, 3.0))

    err = rel(latent(fast, presets.resolve("fast").cache), latent(parts.transformer, 0.0))
    assert err <= presets.LATENT_ERROR["fast"], f"final latent off by {err:.2e}"


def test_int8_switches_off_exactly_and_rebuilds_packs_for_loras(reference, tmp_path):
    _, folder = reference
    model = load_transformer(folder, dtype=torch.float16, compute_dtype=torch.float32)
    x, t, ctx, mask = transformer_inputs(CFG, h=16, w=16, n=20)
    with torch.no_grad():
        plain = model(x, t, ctx, mask)
        assert int8.enable(model) == CFG.depth * len(int8.TARGETS)
        quick = model(x, t, ctx, mask)
        assert int8.memory_bytes(model) > 0
        assert 0 < rel(quick, plain) <= presets.STEP_ERROR["fast"]
        # a weight change on one int8 layer (what a LoRA does) reaches the int8 product; taking it off restores
        layer = model.blocks[0].mlp.inverted_conv.conv

        class Shift:  # the interface of twig_core.lora.Adapter that ops.weights folds: apply(w, dtype), strength
            strength = 1.0

            def apply(self, w, dtype):
                return -3.0 * w.to(dtype)

        layer.twig_adapters = [Shift()]
        shifted_int8 = model(x, t, ctx, mask)
        int8.enable(model, False)
        shifted_float = model(x, t, ctx, mask)
        int8.enable(model)
        change, follow = rel(shifted_float, plain), rel(shifted_int8, shifted_float)
        assert change > 2 * follow and follow <= presets.STEP_ERROR["fast"]  # int8 follows the change
        layer.twig_adapters = []
        assert torch.equal(model(x, t, ctx, mask), quick)
        int8.enable(model, False)
        assert not int8.enabled(model) and torch.equal(model(x, t, ctx, mask), plain)


def test_int8_pictures_do_not_depend_on_what_ran_before(reference):
    """The smoothing and packs come from a fixed calibration step when int8 is switched on, not from the first
    real input: a model that computed other inputs first gives the same output, bit for bit."""
    _, folder = reference
    a = load_transformer(folder, **weight_dtype_kwargs("int8", torch.float32, "cpu"))
    b = load_transformer(folder, **weight_dtype_kwargs("int8", torch.float32, "cpu"))
    x, t, ctx, mask = transformer_inputs(CFG, h=16, w=16, n=20)
    other = transformer_inputs(CFG, h=8, w=24, n=7, seed=5)
    with torch.no_grad():
        a(*other)
        a(other[0] * 10, other[1], other[2], other[3])
        assert torch.equal(a(x, t, ctx, mask), b(x, t, ctx, mask))


def test_int8_is_for_the_cpu_in_fp32(reference):
    _, folder = reference
    with pytest.raises(TwigError, match="int8 products run on the CPU computing in fp32"):
        load_transformer(folder, dtype=torch.float16, compute_dtype=torch.bfloat16, int8=True)
    # a GPU or the VAE: "int8" means "same"
    assert weight_dtype_kwargs("int8", torch.bfloat16, "cuda") == {"dtype": torch.bfloat16}
    assert weight_dtype_kwargs("int8", torch.float32, "cpu", "vae") == {"dtype": torch.float32}
    assert weight_dtype_kwargs("int8", None, "cpu")["int8"] is True


def test_presets_resolve_per_device(monkeypatch):
    from twig_core import presets as P

    monkeypatch.setattr(P, "cpu_bf16", lambda: False)
    monkeypatch.setattr(P, "cpu_amx", lambda: False)
    assert (P.resolve("balanced", "cpu").dtype, P.resolve("balanced", "cpu").weight_dtype) == ("fp32", "same")
    assert P.resolve("fast", "cpu").weight_dtype == "int8"
    monkeypatch.setattr(P, "cpu_bf16", lambda: True)
    assert P.resolve("balanced", "cpu").dtype == "bf16"
    assert P.resolve("fast", "cpu").weight_dtype == "int8"  # AVX512-BF16 without AMX: int8 products stay
    monkeypatch.setattr(P, "cpu_amx", lambda: True)  # AMX: bf16 products beat torch's int8 route
    fast = P.resolve("fast", "cpu")
    assert (fast.dtype, fast.weight_dtype, fast.cache) == ("bf16", "same", P.FAST_CACHE)
    monkeypatch.setattr(P, "cuda_bf16", lambda dev=None: False)
    assert P.resolve("balanced", "cuda").dtype == "fp16" and P.resolve("fast", "cuda").weight_dtype == "same"
    monkeypatch.setattr(P, "cuda_bf16", lambda dev=None: True)
    assert P.resolve("balanced", "cuda").dtype == "auto"
    assert P.resolve("quality", "cuda").dtype == "fp32"
    with pytest.raises(TwigError, match="unknown preset 'turbo'"):
        P.resolve("turbo")


def test_cli_preset_fills_only_what_is_unset():
    from twig_core.__main__ import _apply_preset, _parser

    fast = presets.resolve("fast", "cpu")
    a = _parser().parse_args(["generate", "--prompt", "x", "--preset", "fast"])
    _apply_preset(a, torch.device("cpu"))
    assert (a.dtype, a.weight_dtype) == (fast.dtype, fast.weight_dtype)
    a = _parser().parse_args(["generate", "--prompt", "x", "--preset", "fast", "--weight-dtype", "same"])
    _apply_preset(a, torch.device("cpu"))
    assert a.weight_dtype == "same"
    a = _parser().parse_args(["generate", "--prompt", "x"])
    _apply_preset(a, torch.device("cpu"))
    assert (a.dtype, a.weight_dtype) == (presets.resolve(presets.DEFAULT_PRESET).dtype,
                                        presets.resolve(presets.DEFAULT_PRESET).weight_dtype)


def test_int8_products_over_a_q8_0_gguf(reference, tmp_path):
    """GGUF Q8_0 weights feed the int8 products (widened once to make the packs, whose pages are then released):
    one step stays within the fast preset's bound of diffusers fp32, and of the Q8_0 model computing in fp32."""
    pytest.importorskip("gguf")
    from twig_core.convert import convert

    ref, folder = reference
    out = tmp_path / "t.q8_0.gguf"
    convert(folder, out, "q8_0")
    floating = load_transformer(out, **weight_dtype_kwargs("same", torch.float32, "cpu"))
    quick = load_transformer(out, **weight_dtype_kwargs("int8", torch.float32, "cpu"))
    assert int8.enabled(quick) and not int8.enabled(floating)
    x, t, ctx, mask = transformer_inputs(CFG, h=16, w=16, n=20)
    with torch.no_grad():
        want = ref(x, ctx, t, encoder_attention_mask=mask).sample
        q8 = floating(x, t, ctx, mask)
        got = quick(x, t, ctx, mask)
        again = quick(x, t, ctx, mask)
    assert torch.equal(got, again)  # the packs are kept
    assert rel(got, q8) <= presets.STEP_ERROR["fast"] and rel(got, want) <= presets.STEP_ERROR["fast"]


def test_tab_takes_the_presets_sampler_shortcuts_unless_set():
    from twig_webui.engine import Engine, Settings

    engine = Engine.__new__(Engine)  # only the host's device is asked
    engine.host = argparse.Namespace(device=lambda: torch.device("cpu"))
    fast = presets.resolve("fast")
    assert engine.shortcuts(Settings(prompt="x", dtype="fast")) == {"cache": fast.cache, "cfg_interval": fast.cfg_interval}
    assert engine.shortcuts(Settings(prompt="x", dtype="fast", cache=0.05)) == {"cache": 0.05, "cfg_interval": None}
    assert engine.shortcuts(Settings(prompt="x", dtype="quality")) == {"cache": 0.0, "cfg_interval": None}
    assert engine.shortcuts(Settings(prompt="x", dtype="fp32")) == {"cache": 0.0, "cfg_interval": None}


def test_cli_fast_preset_sets_the_cache_unless_given():
    from twig_core.__main__ import _apply_preset, _parser

    a = _parser().parse_args(["generate", "--prompt", "x", "--preset", "fast"])
    _apply_preset(a, torch.device("cpu"))
    assert a.cache == presets.FAST_CACHE > 0
    a = _parser().parse_args(["generate", "--prompt", "x", "--preset", "fast", "--cache", "0"])
    _apply_preset(a, torch.device("cpu"))
    assert a.cache == 0


# Gemma-2 for the text-encoder bounds: the tiny one of the other tests and a wider one (hundreds of channels a
# product, four layers), each saved as a Hugging Face folder; the reference is transformers' own fp32 Gemma2Model.
GEMMAS = {"tiny": {}, "wide": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64)}
TEXT_PROMPTS = ("A small, fluffy white cat curled up on a windowsill", "a red bus in the rain; 一辆红色的公共汽车", "")


@pytest.fixture(scope="module", params=sorted(GEMMAS))
def gemma(request, tmp_path_factory):
    from tests.builders import save_tiny_gemma2_folder
    from twig_core.text import TextEncoder

    folder = tmp_path_factory.mktemp("gemma") / request.param
    model, tokenizer = save_tiny_gemma2_folder(folder, seed=1, **GEMMAS[request.param])
    return folder, TextEncoder(model, tokenizer)


def text_states(encoder):
    """Every prompt's final states over its kept tokens (mask), positive (with Sana's instruction) and negative."""
    out = []
    for prompt in TEXT_PROMPTS:
        for instruction in (True, False):
            c = encoder.encode(prompt, 300, use_instruction=instruction)
            out.append(c.embeds[c.mask.bool()])
    return out


def load_text_preset(folder, name):
    """Gemma-2 as load_parts loads it for the preset on the CPU."""
    from twig_core.gemma import load_text_encoder

    p = presets.resolve(name, "cpu")
    return load_text_encoder(folder, dtype=resolve_dtype(p.dtype, "cpu", "text"))


@pytest.mark.parametrize("name", presets.PRESET_NAMES)
def test_each_preset_keeps_its_text_error_bound(gemma, name):
    folder, ref = gemma
    encoder = load_text_preset(folder, name)
    errors = [rel(g, w) for g, w in zip(text_states(encoder), text_states(ref))]
    assert max(errors) <= presets.TEXT_ERROR[name], f"{name}: final states off by {max(errors):.2e}"


def test_the_int8_choice_packs_the_transformer_and_leaves_gemma_in_float(tiny_pipeline):
    """``fast`` on a CPU: the transformer's products in int8, Gemma-2 exactly as in ``quality``, loaded at once
    or for its stage only."""
    from twig_core import loader

    ref = loader.load_parts(tiny_pipeline, dtype="fp32", weight_dtype="same")
    for lazy in (False, True):
        parts = loader.load_parts(tiny_pipeline, dtype="fp32", weight_dtype="int8", lazy=lazy)
        transformer = parts.transformer.get() if lazy else parts.transformer
        encoder = parts.text_encoder.get() if lazy else parts.text_encoder
        assert int8.enabled(transformer) and not int8.enabled(encoder.model), lazy
        assert all(type(m) is torch.nn.Linear for n, m in encoder.model.named_modules() if n.endswith("_proj"))
        assert all(torch.equal(g, w) for g, w in zip(text_states(encoder), text_states(ref.text_encoder)))
