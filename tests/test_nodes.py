"""ComfyUI nodes, called the way ComfyUI calls them, with tiny random models in a temporary model folder.

No ComfyUI here: the two host hooks the sampler uses (comfy.utils.ProgressBar and
comfy.model_management.throw_exception_if_processing_interrupted) get small stand-ins where a test needs them.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.builders import empty_latent as empty
from tests.builders import run_sampler
from twig_core import dcae_exec
from twig_core import loader  # noqa: F401  (a loader that fails to import fails the run, it is never skipped)
from twig_core.dcae import DCAE
from twig_core.text import Conditioning
from twig_core.transformer import TwigTransformer

import nodes
from nodes import host
from nodes.common import NodeError
from nodes.conditioning import TwigTextEncode
from nodes.latent import TwigEmptyLatent, TwigVAEDecode, TwigVAEEncode
from nodes.loaders import TwigModelLoader, TwigTextEncoderLoader, TwigUnloadModels, TwigVAELoader
from nodes.sampling import TwigSampler

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# ComfyUI-facing declarations


def test_mappings_docs_and_functions():
    assert set(nodes.NODE_CLASS_MAPPINGS) == set(nodes.NODE_DISPLAY_NAME_MAPPINGS)
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        assert name.startswith("Twig") and nodes.NODE_DISPLAY_NAME_MAPPINGS[name].startswith("Twig")
        assert callable(getattr(cls, cls.FUNCTION))
        assert isinstance(cls.RETURN_TYPES, tuple) and cls.CATEGORY.startswith("Twig")
        if hasattr(cls, "RETURN_NAMES"):
            assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
        doc = ROOT / "web" / "docs" / f"{name}.md"
        assert doc.is_file() and doc.read_text("utf-8").startswith("# "), f"missing help page {doc}"


def _check_input(node, name, spec):
    assert isinstance(spec, tuple) and 1 <= len(spec) <= 2, (node, name)
    kind, opts = spec[0], (spec[1] if len(spec) == 2 else {})
    assert isinstance(opts, dict), (node, name)
    if isinstance(kind, list):
        assert kind and all(isinstance(c, str) for c in kind), (node, name)
        if "default" in opts:
            assert opts["default"] in kind, (node, name)
        return
    assert isinstance(kind, str) and kind, (node, name)
    if kind in ("INT", "FLOAT"):
        lo, hi, default = opts["min"], opts["max"], opts["default"]
        assert lo <= default <= hi, (node, name)
        assert isinstance(default, int if kind == "INT" else (int, float)), (node, name)
        assert opts.get("step", 1) > 0
        if kind == "INT" and "step" in opts:
            assert (default - lo) % opts["step"] == 0 or default == lo, (node, name)
    elif kind == "BOOLEAN":
        assert isinstance(opts.get("default", False), bool)
    elif kind == "STRING":
        assert isinstance(opts.get("default", ""), str)
    else:
        assert kind.isupper(), (node, name)  # socket types: IMAGE, LATENT, TWIG_MODEL...


@pytest.mark.parametrize("with_models", [False, True])
def test_input_types_are_valid_for_comfyui(with_models, models_dir, monkeypatch):
    if not with_models:
        monkeypatch.setenv("TWIG_MODELS_DIR", str(models_dir / "nothing_here"))
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"}, name
        for section in ("required", "optional"):
            for inp, s in spec.get(section, {}).items():
                _check_input(name, inp, s)
    seed = TwigSampler.INPUT_TYPES()["required"]["seed"][1]
    assert seed["control_after_generate"] is True


def test_pack_imports_like_comfyui_loads_it():
    """ComfyUI imports the folder as a package under its folder name and reads the three exports."""
    spec = importlib.util.spec_from_file_location("twig_pack_under_test", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        assert module.WEB_DIRECTORY == "./web" and (ROOT / "web").is_dir()
        assert set(module.NODE_CLASS_MAPPINGS) == set(nodes.NODE_CLASS_MAPPINGS)
    finally:
        for k in [k for k in sys.modules if k == spec.name or k.startswith(spec.name + ".")]:
            del sys.modules[k]


# --------------------------------------------------------------------------------------------------
# Loaders


def test_loader_lists_files_and_diffusers_folders(models_dir):
    names = TwigModelLoader.INPUT_TYPES()["required"]["model_name"][0]
    assert "tiny_twig.safetensors" in names
    assert "tiny_gemma/" in TwigTextEncoderLoader.INPUT_TYPES()["required"]["text_encoder_name"][0]
    # files inside a diffusers folder are reached through the folder, not listed one by one
    assert not any(n.startswith("tiny_gemma/") and n != "tiny_gemma/" for n in
                   TwigTextEncoderLoader.INPUT_TYPES()["required"]["text_encoder_name"][0])
    assert "tiny_dcae.safetensors" in TwigVAELoader.INPUT_TYPES()["required"]["vae_model"][0]


@pytest.fixture(scope="module")
def pipeline_folder(models_dir):
    """A diffusers Sana pipeline folder (transformer/, vae/, text_encoder/, tokenizer/) in diffusion_models."""
    diffusers = pytest.importorskip("diffusers")
    from tests.builders import build_tiny_gemma2, build_tiny_gemma_tokenizer
    from tests.builders import TINY_DCAE, TINY_TRANSFORMER

    root = models_dir / "diffusion_models" / "tiny_sana_pipeline"
    c = TINY_TRANSFORMER
    torch.manual_seed(0)
    diffusers.SanaTransformer2DModel(
        in_channels=c.in_channels, out_channels=c.out_channels, num_attention_heads=c.heads,
        attention_head_dim=c.head_dim, num_layers=c.depth, num_cross_attention_heads=c.cross_heads,
        cross_attention_head_dim=c.cross_head_dim, cross_attention_dim=c.width, caption_channels=c.caption_channels,
        mlp_ratio=c.mlp_ratio, sample_size=c.sample_size, patch_size=c.patch_size,
    ).save_pretrained(root / "transformer")
    diffusers.AutoencoderDC(**TINY_DCAE.to_dict()).save_pretrained(root / "vae")
    tok = build_tiny_gemma_tokenizer()
    build_tiny_gemma2(tok).save_pretrained(root / "text_encoder")
    tok.save_pretrained(root / "tokenizer")
    (root / "model_index.json").write_text('{"_class_name": "SanaPipeline", "transformer": ["diffusers", '
                                           '"SanaTransformer2DModel"], "vae": ["diffusers", "AutoencoderDC"]}')
    return "tiny_sana_pipeline/"


def test_diffusers_pipeline_folder_is_selectable_in_all_three_loaders(pipeline_folder):
    name = pipeline_folder
    for cls, field in ((TwigModelLoader, "model_name"), (TwigVAELoader, "vae_model"),
                       (TwigTextEncoderLoader, "text_encoder_name")):
        names = cls.INPUT_TYPES()["required"][field][0]
        assert name in names, (cls.__name__, names)
        assert not any(n.startswith(name) and n != name for n in names)  # components are not listed apart
    (model,) = TwigModelLoader().load(name, "fp32")
    (vae,) = TwigVAELoader().load(name, "fp32")
    (te,) = TwigTextEncoderLoader().load(name, 300, "cpu", "fp32")
    assert model.peek().config.width == 64 and vae.peek().spatial_factor == 32
    out = TwigTextEncode().encode(te, "a cat", "")
    lat = TwigSampler().sample(model, out["result"][0], out["result"][1], empty(64, 64), 0, 2, 4.5,
                               "flow_euler", 3.0, 1.0)[0]
    (img,) = TwigVAEDecode().decode(lat, vae, 0)
    assert img.shape == (1, 64, 64, 3)


def test_loaders_share_one_copy_per_file_and_dtype(parts):
    model, te, vae = parts
    assert TwigModelLoader().load("tiny_twig.safetensors", "fp32")[0] is model
    bf16 = TwigModelLoader().load("tiny_twig.safetensors", "bf16")[0]
    assert bf16 is not model and bf16.peek().dtype == torch.bfloat16
    assert model.peek().dtype == torch.float32 and next(vae.peek().parameters()).dtype == torch.float32
    assert isinstance(model.peek(), TwigTransformer) and isinstance(vae.peek(), DCAE)
    assert te.max_tokens == 300 and te.model.load_device == torch.device("cpu")


def test_model_loader_weight_dtype_keeps_half_weights(parts, conds):
    """weight_dtype=fp16 keeps the transformer's weights in fp16 while sampling computes in fp32: the result is
    what an fp32 model holding the same fp16-rounded weights gives."""
    lean = TwigModelLoader().load("tiny_twig.safetensors", "fp32", "fp16")[0]
    assert lean is not parts[0] and lean.peek().weight_dtype == torch.float16 and lean.peek().dtype == torch.float32
    rounded = TwigModelLoader().load("tiny_twig.safetensors", "fp32", "same")[0]
    assert rounded is parts[0]
    ref = copy.deepcopy(rounded.peek())
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.half().float())
    ref_parts = (SimpleNamespace(get=lambda **_: ref, peek=lambda: ref, load_device=torch.device("cpu")),) + parts[1:]
    got = run_sampler((lean,) + parts[1:], conds, empty(64, 64))
    assert torch.equal(got["samples"], run_sampler(ref_parts, conds, empty(64, 64))["samples"])
    with pytest.raises(NodeError, match="weight_dtype 'fp8'"):
        TwigModelLoader().load("tiny_twig.safetensors", "fp32", "fp8")
    # the VAE loader takes the same choice; decoding still computes in fp32
    vae16 = TwigVAELoader().load("tiny_dcae.safetensors", "fp32", "bf16")[0]
    assert vae16 is not parts[2] and vae16.peek().dtype == torch.float32
    assert {p.dtype for p in vae16.peek().parameters()} == {torch.bfloat16}
    image = TwigVAEDecode().decode(got, vae16)[0]
    assert image.dtype == torch.float32 and torch.isfinite(image).all() and image.std() > 0


def test_missing_model_names_the_folder(models_dir):
    with pytest.raises(NodeError, match=r"Twig Model Loader: model 'nope.safetensors' not found.*diffusion_models"):
        TwigModelLoader().load("nope.safetensors", "auto")
    with pytest.raises(NodeError, match=r"models/vae"):
        TwigVAELoader().load("../diffusion_models/tiny_twig.safetensors", "auto")


def test_queued_workflow_with_missing_weights_names_their_folder(models_dir):
    """ComfyUI calls VALIDATE_INPUTS instead of its bare 'Value not in list' check for these inputs."""
    import inspect

    for node, name, folder in ((TwigModelLoader, "twig_v0_alpha.pth", "models/diffusion_models"),
                               (TwigTextEncoderLoader, "gemma-2-2b-it/", "models/text_encoders"),
                               (TwigVAELoader, "dc-ae-f32c32-sana-1.0-diffusers/", "models/vae")):
        arg = list(inspect.signature(node.VALIDATE_INPUTS).parameters)
        assert arg == [next(iter(node.INPUT_TYPES()["required"]))]  # the combo input's own name
        message = node.VALIDATE_INPUTS(name)
        assert isinstance(message, str) and name in message and folder in message, message
    assert TwigModelLoader.VALIDATE_INPUTS("tiny_twig.safetensors") is True
    assert TwigVAELoader.VALIDATE_INPUTS("tiny_dcae.safetensors") is True


def test_wrong_file_is_reported_with_its_name(models_dir):
    bad = models_dir / "vae" / "not_a_vae.safetensors"
    save_file({"foo": torch.zeros(3)}, str(bad))
    try:
        with pytest.raises(NodeError, match="Twig VAE Loader: .*"):
            TwigVAELoader().load("not_a_vae.safetensors", "fp32")
    finally:
        bad.unlink()


# --------------------------------------------------------------------------------------------------
# Text encode


def test_text_encode_outputs_and_report(conds, parts):
    pos, neg = conds
    assert isinstance(pos, Conditioning) and isinstance(neg, Conditioning)
    assert pos.embeds.shape == (1, 300, 64) and neg.embeds.shape == (1, 300, 64)
    assert pos.mask.shape == (1, 300) and pos.embeds.dtype == torch.float32
    assert torch.isfinite(pos.embeds).all() and not torch.equal(pos.embeds, neg.embeds)
    out = TwigTextEncode().encode(parts[1], "a cat", "")
    report = out["result"][2]
    assert out["ui"]["text"] == [report]
    assert "positive:" in report and "negative:" in report and "WARNING" not in report


def test_truncation_warns_with_numbers(parts, caplog):
    long_prompt = " ".join(f"word{i}" for i in range(400))
    out = TwigTextEncode().encode(parts[1], long_prompt, "")
    report = out["result"][2]
    assert "TRUNCATED" in report and "dropped from the end" in report
    assert any("tokens but only" in r.message for r in caplog.records)


def test_text_encoder_can_be_unloaded_after_encoding(parts, conds):
    te = parts[1]
    out = TwigTextEncode().encode(te, "一只可爱的小猫在窗台上睡觉, a cat on a sunny windowsill", "blurry, low quality", True)
    assert not te.model.loaded
    assert torch.equal(out["result"][0].embeds, conds[0].embeds)
    TwigTextEncode().encode(te, "again", "")  # loads again on demand
    assert te.model.loaded


# --------------------------------------------------------------------------------------------------
# Resolution / empty latent


def test_empty_latent_sizes(parts):
    lat, w, h = TwigEmptyLatent().generate("custom", 160, 96, 3)
    assert (w, h) == (160, 96) and lat["samples"].shape == (3, 32, 3, 5)
    lat, w, h = TwigEmptyLatent().generate("1344x768 (1.75:1)", 64, 64, 1)
    assert (w, h) == (1344, 768) and lat["samples"].shape == (1, 32, 24, 42)
    assert lat["samples"].dtype == torch.float32
    # a connected model scales the bins to its base size (tiny model: 32 latent px -> 1024, same table)
    _, w2, h2 = TwigEmptyLatent().generate("1344x768 (1.75:1)", 64, 64, 1, model=parts[0])
    assert (w2, h2) == (1344, 768)
    with pytest.raises(NodeError, match="multiple of 32"):
        TwigEmptyLatent().generate("custom", 100, 96, 1)


# --------------------------------------------------------------------------------------------------
# Sampler


def test_sampler_shapes_and_determinism(parts, conds):
    latent = empty(batch=2)
    a = run_sampler(parts, conds, latent, seed=5)
    b = run_sampler(parts, conds, latent, seed=5)
    c = run_sampler(parts, conds, latent, seed=6)
    assert a["samples"].shape == (2, 32, 3, 4) and a["samples"].dtype == torch.float32
    assert torch.isfinite(a["samples"]).all()
    assert torch.equal(a["samples"], b["samples"]) and not torch.equal(a["samples"], c["samples"])
    assert not torch.equal(a["samples"][0], a["samples"][1])
    e = run_sampler(parts, conds, latent, seed=5, sampler="flow_euler", cfg=1.0)
    assert torch.isfinite(e["samples"]).all() and not torch.equal(e["samples"], a["samples"])


def test_denoise_zero_returns_the_input_latent(parts, conds):
    init = {"samples": torch.randn(1, 32, 3, 4)}
    out = run_sampler(parts, conds, init, denoise=0.0)
    assert torch.equal(out["samples"], init["samples"])
    half = run_sampler(parts, conds, init, denoise=0.5)
    assert not torch.equal(half["samples"], init["samples"])


def test_noise_mask_keeps_unmasked_latents(parts, conds):
    init = torch.randn(1, 32, 3, 4)
    mask = torch.zeros(1, 1, 96, 128)  # pixel-space mask as ComfyUI's SetLatentNoiseMask stores it
    mask[..., :, 64:] = 1.0  # regenerate the right half
    out = run_sampler(parts, conds, {"samples": init, "noise_mask": mask}, denoise=0.8)
    s = out["samples"]
    assert torch.equal(s[..., :2], init[..., :2])
    assert not torch.equal(s[..., 2:], init[..., 2:])
    assert torch.equal(out["noise_mask"], mask)  # the mask rides along, as with ComfyUI's KSampler


def test_sampler_rejects_foreign_inputs_with_context(parts, conds):
    with pytest.raises(NodeError, match="Twig Sampler: .*shape"):
        run_sampler(parts, conds, {"samples": torch.zeros(1, 4, 8, 8)})
    with pytest.raises(NodeError, match="Twig Sampler: negative must come from Twig Text Encode"):
        TwigSampler().sample(parts[0], conds[0], "text", empty(), 0, 2, 4.5, "flow_euler", 3.0, 1.0)


# --------------------------------------------------------------------------------------------------
# Host hooks: progress, previews, cancel


class Interrupted(Exception):
    pass


@pytest.fixture
def fake_comfy(monkeypatch):
    """Stand-ins for comfy.utils.ProgressBar and comfy.model_management's interrupt check."""
    state = types.SimpleNamespace(interrupt=False, updates=[])
    mm = types.ModuleType("comfy.model_management")
    mm.InterruptProcessingException = Interrupted

    def throw_exception_if_processing_interrupted():
        if state.interrupt:
            state.interrupt = False
            raise Interrupted()

    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            state.updates.append((value, total, preview))

    utils.ProgressBar = ProgressBar
    comfy = types.ModuleType("comfy")
    comfy.model_management, comfy.utils = mm, utils
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    monkeypatch.setitem(sys.modules, "comfy.utils", utils)
    return state


def test_progress_with_latent_previews(parts, conds, fake_comfy):
    run_sampler(parts, conds, empty(), steps=4)
    assert [u[0] for u in fake_comfy.updates] == [1, 2, 3, 4]
    assert all(u[1] == 4 for u in fake_comfy.updates)
    fmt, img, size = fake_comfy.updates[-1][2]
    assert fmt == "JPEG" and isinstance(img, Image.Image) and img.mode == "RGB" and size == 512
    assert max(img.size) <= 512 and img.size[0] > img.size[1]  # 4x3 latent, landscape


def test_cancel_raises_host_interrupt_within_one_step_and_graph_stays_usable(parts, conds, fake_comfy):
    transformer = parts[0].get()
    calls = []

    def press_cancel_during_second_step(module, args, output):
        calls.append(1)
        if len(calls) == 2:
            fake_comfy.interrupt = True

    handle = transformer.register_forward_hook(press_cancel_during_second_step)
    try:
        with pytest.raises(Interrupted):  # the host's own exception type, not wrapped
            run_sampler(parts, conds, empty(), steps=10, seed=3)
    finally:
        handle.remove()
    assert len(calls) == 2  # stopped at the end of the step in which cancel was pressed
    # the same graph runs again and gives the result of an uninterrupted run
    again = run_sampler(parts, conds, empty(), steps=10, seed=3)
    fake_comfy.updates.clear()
    ref = run_sampler(parts, conds, empty(), steps=10, seed=3)
    assert torch.equal(again["samples"], ref["samples"])


# --------------------------------------------------------------------------------------------------
# VAE decode / encode


def test_decode_gives_comfy_images(parts):
    vae = parts[2]
    lat = {"samples": torch.randn(2, 32, 3, 4)}
    (img,) = TwigVAEDecode().decode(lat, vae, 0)
    assert img.shape == (2, 96, 128, 3) and img.dtype == torch.float32
    assert img.min() >= 0 and img.max() <= 1 and img.std() > 0
    (tiled,) = TwigVAEDecode().decode(lat, vae, 64)  # explicit 2x2-latent tiles: exact, no seams
    assert tiled.shape == img.shape
    torch.testing.assert_close(tiled, img, atol=1e-5, rtol=0)
    with pytest.raises(NodeError, match="not a multiple of 32"):
        TwigVAEDecode().decode(lat, vae, 48)


def test_decode_retries_with_tiles_when_memory_runs_short(parts, monkeypatch):
    vae = parts[2]
    dcae = vae.get()
    seen = []

    def flaky(real):
        def run(model, latent, run):
            seen.append(run.tile_size)
            if run.tile_size is None or run.tile_size > 4:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return real(model, latent, run)
        return run

    monkeypatch.setattr(dcae_exec, "DECODE_STRATEGIES", {k: flaky(f) for k, f in dcae_exec.DECODE_STRATEGIES.items()})
    (img,) = TwigVAEDecode().decode({"samples": torch.randn(1, 32, 8, 8)}, vae, 0)
    assert img.shape == (1, 256, 256, 3) and seen == [None, 4]
    assert dcae is vae.get()


def test_encode_gives_model_space_latents(parts):
    vae = parts[2]
    img = torch.rand(2, 100, 130, 3)  # not multiples of 32: centre-cropped to 96x128
    (lat,) = TwigVAEEncode().encode(img, vae, 0)
    s = lat["samples"]
    assert s.shape == (2, 32, 3, 4) and s.dtype == torch.float32 and torch.isfinite(s).all()
    dcae = vae.get()
    with torch.no_grad():
        ref = dcae.encode(img[:, 2:98, 1:129].permute(0, 3, 1, 2) * 2 - 1)
    torch.testing.assert_close(s, ref)
    with pytest.raises(NodeError, match=r"Twig VAE Encode: pixels must be an IMAGE"):
        TwigVAEEncode().encode(torch.rand(3, 64, 64), vae, 0)


def test_vae_reads_its_encoder_on_first_encode_and_the_host_counts_it(models_dir, monkeypatch):
    """The DC-AE holds its decoder only until something encodes. The host's model manager (a stand-in that
    measures a model as comfy.model_management.module_size does, from its state_dict) sees the decoder
    only while decoding, and the whole model once the Encode node has read the encoder."""
    cpu = torch.device("cpu")
    mm = types.ModuleType("comfy.model_management")
    mm.current_loaded_models = []
    mp = types.ModuleType("comfy.model_patcher")

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device):
            self.model = model
            self.size = sum(t.nelement() * t.element_size() for t in model.state_dict().values())

        def detach(self):
            pass

    class LoadedModel:
        def __init__(self, patcher):
            self.model = patcher

        def model_unload(self):
            pass

    def load_models_gpu(patchers, memory_required=0, force_full_load=False):
        for p in patchers:
            if not any(m.model is p for m in mm.current_loaded_models):
                mm.current_loaded_models.append(LoadedModel(p))

    mm.load_models_gpu, mp.ModelPatcher = load_models_gpu, ModelPatcher
    comfy = types.ModuleType("comfy")
    comfy.model_management, comfy.model_patcher = mm, mp
    for name, mod in (("comfy", comfy), ("comfy.model_management", mm), ("comfy.model_patcher", mp)):
        monkeypatch.setitem(sys.modules, name, mod)

    path = str(models_dir / "vae" / "tiny_dcae.safetensors")
    vae = host.ManagedModel("vae", path, lambda dev: loader.load_vae(path, device=dev).requires_grad_(False),
                            cpu, cpu, torch.float32)
    eager = loader.load_vae(path, lazy_encoder=False)
    whole = sum(t.nelement() * t.element_size() for t in eager.state_dict().values())
    decoder = sum(t.nelement() * t.element_size() for t in eager.decoder.state_dict().values())
    TwigVAEDecode().decode({"samples": torch.randn(1, 32, 2, 2)}, vae, 0)
    assert not vae.peek().encoder_loaded
    assert [m.model.size for m in mm.current_loaded_models] == [decoder]
    img = torch.rand(1, 64, 96, 3)
    (lat,) = TwigVAEEncode().encode(img, vae, 0)
    assert vae.peek().encoder_loaded and not any(p.requires_grad for p in vae.peek().parameters())
    assert [m.model.size for m in mm.current_loaded_models] == [whole]  # registered anew, the old one gone
    with torch.no_grad():
        torch.testing.assert_close(lat["samples"], eager.encode(img.permute(0, 3, 1, 2) * 2 - 1))
    TwigVAEDecode().decode({"samples": torch.randn(1, 32, 2, 2)}, vae, 0)
    assert len(mm.current_loaded_models) == 1


def test_text_to_image_graph_end_to_end(parts, conds):
    model, _, vae = parts
    latent, w, h = TwigEmptyLatent().generate("custom", 64, 64, 1)
    out = TwigSampler().sample(model, conds[0], conds[1], latent, 0, 2, 4.5, "flow_dpmpp_2m", 3.0, 1.0)[0]
    (img,) = TwigVAEDecode().decode(out, vae, 0)
    assert img.shape == (1, 64, 64, 3)


def test_sampler_node_fewer_evaluations_options(parts, conds):
    """The optional inputs at their defaults give the plain run; set, they change it; a reversed range is refused."""
    model = parts[0]
    latent, _, _ = TwigEmptyLatent().generate("custom", 64, 64, 1)
    args = (model, conds[0], conds[1], latent, 0, 4, 4.5, "flow_dpmpp_2m", 3.0, 1.0)
    plain = TwigSampler().sample(*args)[0]["samples"]
    assert torch.equal(TwigSampler().sample(*args, 0.0, 0.0, 1.0)[0]["samples"], plain)
    assert not torch.equal(TwigSampler().sample(*args, 1.0, 0.5, 1.0)[0]["samples"], plain)
    with pytest.raises(NodeError, match="cfg_sigma_min"):
        TwigSampler().sample(*args, 0.0, 0.8, 0.2)


def test_unload_node_releases_models_and_they_reload(parts, conds):
    model, te, vae = parts
    lat = {"samples": torch.zeros(1, 32, 2, 2)}
    assert TwigUnloadModels().unload(lat)[0] is lat
    assert not model.loaded and not vae.loaded and not te.model.loaded
    out = run_sampler(parts, conds, empty(), steps=2)
    assert torch.isfinite(out["samples"]).all() and model.loaded


def test_face_refine_getters_give_comfy_the_memory_each_use_needs(parts):
    """Face Refine fetches the transformer and DC-AE per face through getters that pass ComfyUI the memory a step
    on the crop's latent and the crop's encode/decode need (twig_core.memory, host.vae_memory_required)."""
    from nodes.face import transformer_getter, vae_getter
    from twig_core import memory

    asked = []

    class Recording:
        def __init__(self, obj):
            self.obj = obj

        def peek(self):
            return self.obj

        def release(self):
            pass

        def get(self, memory_required=0):
            asked.append(memory_required)
            return self.obj

    transformer, vae = parts[0].peek(), parts[2].peek()
    shape = (1, vae.config.latent_channels, 3, 2)
    assert transformer_getter(Recording(transformer))(latent_shape=shape, cfg=True) is transformer
    assert vae_getter(Recording(vae))(pixels=(96, 64), encode=True) is vae
    assert vae_getter(Recording(vae))(latent_shape=shape) is vae
    assert vae_getter(Recording(vae))() is vae  # reading attributes only: nothing to estimate
    assert asked == [memory.step_bytes(transformer.config, shape, transformer.dtype.itemsize, cfg=True),
                     host.vae_memory_required(vae, shape, encode=True), host.vae_memory_required(vae, shape), 0]
    assert all(n > 0 for n in asked[:3])


def test_no_twig_input_takes_the_frontends_asset_browser_path():
    """ComfyUI's frontend (1.27) treats inputs named ckpt_name, lora_name and vae_name as asset-browser candidates
    and throws while loading a workflow when any core loader it expects failed to import: the node then comes back
    as an unknown type. Twig nodes name their file inputs otherwise."""
    frontend_whitelist = {"ckpt_name", "lora_name", "vae_name"}
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        names = {k for group in spec.values() for k in group}
        assert not names & frontend_whitelist, f"{name}: {sorted(names & frontend_whitelist)}"
