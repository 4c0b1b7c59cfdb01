"""The transformer's operations namespace (what a host's own layer classes plug into), and the ComfyUI glue
(nodes/native.py, nodes/host.py): without ComfyUI, then inside the real ComfyUI tree's model management and
samplers (imported on the CPU): low-VRAM placement, memory estimates, dtypes, and Twig's samplers in core lists."""

import importlib
import os
import sys
import types

import pytest
import torch

from tests.builders import empty_latent as empty
from tests.builders import run_sampler, transformer_inputs
from tests.test_transformer import TINY
from twig_core import ops
from twig_core.errors import TwigError
from twig_core.transformer import TwigTransformer


def recording_ops():
    """A stand-in host namespace: layers that cast their weights on use (like ComfyUI's manual-cast ops) and count
    how often that happens, through their forward or through ``weights``."""
    calls = {"forward": 0, "weights": 0}

    def cast(layer, x):
        return layer.weight.to(x.dtype), None if layer.bias is None else layer.bias.to(x.dtype)

    class Linear(torch.nn.Linear):
        def forward(self, x):
            calls["forward"] += 1
            return torch.nn.functional.linear(x, *cast(self, x))

    class Conv2d(torch.nn.Conv2d):
        def forward(self, x):
            calls["forward"] += 1
            return self._conv_forward(x, *cast(self, x))

    def weights(layer, x):
        calls["weights"] += 1
        return cast(layer, x)

    return types.SimpleNamespace(Linear=Linear, Conv2d=Conv2d, weights=weights), calls


def test_host_operations_build_every_layer_and_cast_every_weight_read():
    """With a host namespace every Linear/Conv2d is the host's class, the fused q/k/v and the Mix-FFN weights are
    fetched through its ``weights`` (so a casting/streaming layer is never bypassed), and the output equals the
    default namespace's on the same fp16-stored weights computing in fp32."""
    torch.manual_seed(0)
    cfg = TINY.replace(qk_norm=False)
    ref = TwigTransformer(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    ref = ref.half()
    ref.compute_dtype = torch.float32
    host_ops, calls = recording_ops()
    ours = TwigTransformer(cfg, compute_dtype=torch.float32, operations=host_ops).eval().half()
    ours.load_state_dict(ref.state_dict(), strict=True)

    layers = [m for m in ours.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert layers and all(isinstance(m, (host_ops.Linear, host_ops.Conv2d)) for m in layers)
    assert not any(type(m) in (ops.Linear, ops.Conv2d) for m in ours.modules())

    x, t, ctx, mask = transformer_inputs(cfg)
    with torch.no_grad():
        want, got = ref(x, t, ctx, mask), ours(x, t, ctx, mask)
    # per block: q/k/v (1) + the Mix-FFN's three convolutions (3) go through ``weights``
    assert calls["weights"] == 4 * cfg.depth
    # every other layer runs its own forward: patch embed, 2 timestep, t_block, 2 caption, final, and per block
    # attn.proj + q/kv/proj of the cross-attention
    assert calls["forward"] == 7 + 4 * cfg.depth
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_default_operations_read_stored_weights_unchanged():
    layer = ops.Linear(4, 3)
    w, b = ops.weights(layer, torch.zeros(1, 4, dtype=torch.float64))
    assert w is layer.weight and b is layer.bias


def test_incomplete_operations_namespace_is_named():
    with pytest.raises(TwigError, match="lacks weights"):
        TwigTransformer(TINY, operations=types.SimpleNamespace(Linear=ops.Linear, Conv2d=ops.Conv2d))


# --------------------------------------------------------------------------------------------------
# Native nodes, outside ComfyUI: what does not need comfy.* (the model itself is checked in the real host by
# tests/comfy_host/native_check.py)

def test_native_conditioning_carries_states_and_mask_padded_to_one_length(conds):
    from nodes.native import to_native
    from twig_core.text import Conditioning

    pos, neg = conds
    short = Conditioning(neg.embeds[:, :5], neg.mask[:, :5])
    (p,), (n,) = to_native(pos, short)
    assert p[0].shape == pos.embeds.shape and p[0].dtype == torch.float32
    torch.testing.assert_close(p[0], pos.embeds.float(), rtol=0, atol=0)
    assert torch.equal(p[1]["attention_mask"], pos.mask)
    # the shorter one is padded with masked zeros: same length, so ComfyUI batches them without repeating tokens
    assert n[0].shape == p[0].shape and torch.equal(n[0][:, 5:], torch.zeros_like(n[0][:, 5:]))
    assert n[1]["attention_mask"][:, :5].equal(short.mask) and not n[1]["attention_mask"][:, 5:].any()


def test_native_vae_decodes_and_encodes_like_the_twig_vae_nodes(parts, conds):
    from nodes.latent import TwigVAEDecode, TwigVAEEncode
    from nodes.native import NativeDCAE, TwigToNativeVAE

    _, _, vae = parts
    (native,) = TwigToNativeVAE().convert(vae)
    assert isinstance(native, NativeDCAE) and native.spacial_compression_decode() == 32 and native.latent_channels == 32
    latent = run_sampler(parts, conds, empty(), steps=2)
    want = TwigVAEDecode().decode(latent, vae)[0]
    raw = latent["samples"] / native.scale  # ComfyUI's latents are unscaled
    torch.testing.assert_close(native.decode(raw), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(native.decode_tiled(raw, tile_x=2, tile_y=2, overlap=1), want, rtol=0, atol=1e-4)
    enc = native.encode(want)
    torch.testing.assert_close(enc * native.scale, TwigVAEEncode().encode(want, vae)[0]["samples"], rtol=0, atol=1e-5)


def test_native_nodes_refuse_other_inputs_by_name(parts):
    from nodes.common import NodeError
    from nodes.native import TwigToNativeModel, TwigToNativeVAE

    model, _, vae = parts
    with pytest.raises(NodeError, match="Twig Model Loader"):
        TwigToNativeModel().convert(vae)
    with pytest.raises(NodeError, match="Twig VAE Loader"):
        TwigToNativeVAE().convert(model)


def test_flow_sigmas_node_gives_the_twig_schedule():
    from nodes.native import TwigFlowSigmas
    from twig_core.sampling import flow_sigmas

    (s,) = TwigFlowSigmas().sigmas(8, "flow_euler", 3.0, 1.0)
    assert s.dtype == torch.float32 and torch.equal(s, flow_sigmas(8, 3.0, "flow_euler").float())


def test_missing_comfy_names_are_reported_by_name():
    from nodes.common import NodeError
    from nodes.native import comfy_name

    with pytest.raises(NodeError, match="comfy.no_such_module"):
        comfy_name("comfy.no_such_module", "X")
    with pytest.raises(NodeError, match=r"torch\.no_such_name"):
        comfy_name("torch", "no_such_name")


# --------------------------------------------------------------------------------------------------
# Inside ComfyUI's own model management and samplers: the real ComfyUI tree CI lays out beside the repository
# (0.3.64, see tests/comfy_host/ci.sh), imported on the CPU. A "GPU" for placement checks is the meta device:
# weights ComfyUI loads there lose their values, so those tests check where tensors are and which device every
# operation runs on, never values; the parity tests run on the CPU with real values.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFY_ROOTS = [os.environ.get("TWIG_COMFYUI"), os.path.join(REPO, "..", "shared", "comfyui"),
               os.path.join(REPO, "..", "..", "shared", "comfyui")]
COMFY_MODULES = ("comfy.model_management", "comfy.model_patcher", "comfy.ops", "comfy.model_base", "comfy.samplers",
                 "comfy.sample", "comfy.sampler_helpers", "comfy.latent_formats", "comfy.supported_models_base",
                 "comfy.conds", "comfy.utils", "comfy.k_diffusion.sampling")


@pytest.fixture(scope="module")
def comfy_modules(tmp_path_factory):
    """ComfyUI's modules imported once (CPU mode; stand-ins for torchvision and torchsde where missing, as the
    real-host check does), then taken out of sys.modules again: a test gets them only through ``comfy``."""
    import nodes.native  # noqa: F401 - the pack's nodes package, before ComfyUI's nodes.py is on the path

    root = next((os.path.abspath(p) for p in COMFY_ROOTS
                 if p and os.path.isfile(os.path.join(p, "comfy", "model_management.py"))), None)
    if root is None:
        pytest.skip("no ComfyUI source tree beside the repository (set TWIG_COMFYUI)")
    sys.path.insert(0, os.path.join(REPO, "tests", "comfy_host"))
    try:
        from client import write_torchvision_stub
    finally:
        sys.path.pop(0)
    before, path = dict(sys.modules), list(sys.path)
    stubs = write_torchvision_stub(str(tmp_path_factory.mktemp("stubs")))
    sys.path[:0] = [p for p in (root, stubs) if p]
    for k in [k for k in sys.modules if k == "comfy" or k.startswith("comfy.")]:
        del sys.modules[k]  # another test's stand-ins
    try:
        try:
            import torchsde  # noqa: F401
        except ImportError:  # only ComfyUI's SDE samplers use it
            sys.modules["torchsde"] = types.ModuleType("torchsde")
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # this torch has no CUDA
        try:
            for name in COMFY_MODULES:
                importlib.import_module(name)
        except ImportError as e:
            pytest.skip(f"ComfyUI's modules need {e.name} (requirements-test.txt)")
        # ComfyUI's own modules only: with folder_paths the loaders would look in ComfyUI's model folders
        loaded = {k: v for k, v in sys.modules.items() if before.get(k) is not v and k != "folder_paths"}
    finally:
        for k in [k for k in sys.modules if before.get(k) is not sys.modules[k]]:
            del sys.modules[k]
        sys.modules.update(before)
        sys.path[:] = path
    return root, loaded


@pytest.fixture
def comfy(comfy_modules, monkeypatch):
    """ComfyUI's modules in sys.modules for one test (so nodes.host finds them as it does inside ComfyUI), with a
    fresh list of loaded models."""
    root, loaded = comfy_modules
    for name, module in loaded.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.syspath_prepend(root)
    mm = loaded["comfy.model_management"]
    monkeypatch.setattr(mm, "current_loaded_models", [])
    return loaded


def fake_gpu(monkeypatch, mm, state: str, free: int):
    """ComfyUI in --lowvram ("LOW_VRAM") or --novram ("NO_VRAM") with ``free`` bytes free on the fake GPU and no
    reserves of its own (so what it keeps free is exactly what the caller asks for)."""
    monkeypatch.setattr(mm, "vram_state", getattr(mm.VRAMState, state))
    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: (free, free) if torch_free_too else free)
    monkeypatch.setattr(mm, "minimum_inference_memory", lambda: 0)
    monkeypatch.setattr(mm, "extra_reserved_memory", lambda: 0)
    monkeypatch.setattr(mm, "MIN_WEIGHT_MEMORY_RATIO", 0.0)
    return torch.device("meta")


class DeviceLedger(torch.overrides.TorchFunctionMode):
    """Every torch operation's tensor arguments: an operation that mixes a CPU tensor (not a 0-d scalar) with one on
    ``device`` is recorded; moving and casting calls (``to``, ``copy_`` ...) are how weights get there, and pass."""

    MOVES = {"to", "copy_", "_to_copy", "empty_like", "cuda", "type", "__get__", "__set__"}

    def __init__(self, device):
        super().__init__()
        self.device, self.mixed, self.calls = torch.device(device), [], 0

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name not in self.MOVES:
            self.calls += 1
            flat = [a for a in list(args) + list(kwargs.values()) for a in (a if isinstance(a, (list, tuple)) else [a])]
            devices = {t.device.type for t in flat if torch.is_tensor(t) and t.ndim > 0}
            if len(devices) > 1:
                self.mixed.append(name)
        return func(*args, **(kwargs or {}))


def big_managed_transformer(load_device):
    """A ManagedModel over a random transformer larger than the 128 MiB ComfyUI always grants a partially loaded
    model (fp32, ~57M parameters), its weights on the CPU."""
    from nodes import host
    from twig_core.config import TransformerConfig

    cfg = TransformerConfig(width=1024, depth=3, heads=32, cross_heads=8, caption_channels=256)
    torch.manual_seed(0)
    model = TwigTransformer(cfg).eval().requires_grad_(False)
    return host.ManagedModel("transformer", "big_twig.safetensors", lambda dev: model, load_device,
                             torch.device("cpu"), torch.float32), cfg


def placement(transformer):
    """(cast-layer weights on the load device, those left on the CPU)."""
    layers = [m for m in transformer.modules() if hasattr(m, "comfy_cast_weights")]
    on = sum(1 for m in layers if m.weight.device.type != "cpu")
    return on, len(layers) - on


def run_on(transformer, device, cfg):
    x, t, ctx, _ = (a.to(device) for a in transformer_inputs(cfg))
    ledger = DeviceLedger(device)
    with torch.no_grad(), ledger:
        out = transformer(x, t, ctx)  # no mask: checking one reads a value, which the meta device has not
    return out, ledger


def test_lowvram_loads_the_transformer_partially_by_the_estimate_and_computes_on_the_gpu(comfy, monkeypatch):
    """--lowvram: the transformer is built from ComfyUI's cast layers, so ComfyUI loads what fits beside the
    memory estimate and leaves the rest to stream; the Twig sampler then computes on the load device (where a
    plain module registered with force_full_load used to be loaded whole, or left on the CPU)."""
    from twig_core import memory

    mm = comfy["comfy.model_management"]
    gpu = fake_gpu(monkeypatch, mm, "LOW_VRAM", free=1 << 30)
    calls = []
    real_load = mm.load_models_gpu

    def spy(models, memory_required=0, force_full_load=False, **kw):
        calls.append((memory_required, force_full_load))
        return real_load(models, memory_required=memory_required, force_full_load=force_full_load, **kw)

    monkeypatch.setattr(mm, "load_models_gpu", spy)

    # a small run: nothing to keep free beyond the weights, so ComfyUI loads every layer
    managed, cfg = big_managed_transformer(gpu)
    small = memory.step_bytes(cfg, (1, 32, 8, 8), 4)
    transformer = managed.get(memory_required=small)
    assert calls[-1] == (small, False)
    on, off = placement(transformer)
    assert off == 0 and on > 0 and transformer.device == gpu

    # a 4096² CFG run needs more than the free gigabyte minus the weights: ComfyUI keeps layers off the device
    managed, cfg = big_managed_transformer(gpu)
    large = memory.step_bytes(cfg, (1, 32, 128, 128), 4)
    assert large > (1 << 30) - 128 * 2**20
    transformer = managed.get(memory_required=large)
    assert calls[-1] == (large, False)
    on, off = placement(transformer)
    assert on > 0 and off > 0, "partially loaded"
    assert transformer.final_layer.linear.weight.device.type in ("cpu", "meta") and transformer.device == gpu
    out, ledger = run_on(transformer, gpu, cfg)
    assert out.device == gpu and ledger.calls > 50 and not ledger.mixed, ledger.mixed


def test_novram_streams_every_layer_and_still_computes_on_the_gpu(comfy, monkeypatch):
    """--novram: ComfyUI loads nothing of the transformer up front; every cast layer streams its weight to the GPU
    when it runs, and the sampler's inputs go there too (they used to stay with the weights, on the CPU)."""
    mm = comfy["comfy.model_management"]
    gpu = fake_gpu(monkeypatch, mm, "NO_VRAM", free=8 << 30)
    managed, cfg = big_managed_transformer(gpu)
    transformer = managed.get()
    on, off = placement(transformer)
    assert on == 0 and off > 0 and transformer.device == gpu
    out, ledger = run_on(transformer, gpu, cfg)
    assert out.device == gpu and not ledger.mixed, ledger.mixed


def test_a_network_comfy_cannot_stream_runs_where_comfy_left_it_and_says_so(comfy, monkeypatch, models_dir, caplog):
    from nodes import host
    from twig_core import loader

    mm = comfy["comfy.model_management"]
    gpu = fake_gpu(monkeypatch, mm, "NO_VRAM", free=8 << 30)
    path = str(models_dir / "vae" / "tiny_dcae.safetensors")
    vae = host.ManagedModel("vae", path, lambda dev: loader.load_vae(path, device=dev), gpu, torch.device("cpu"),
                            torch.float32)
    with caplog.at_level("WARNING", logger="twig"):
        dcae = vae.get(memory_required=123)
    assert next(dcae.parameters()).device.type == "cpu"
    assert "kept the vae tiny_dcae.safetensors on cpu" in caplog.text


def test_twig_sampler_inside_comfy_runs_comfys_cast_layers_with_the_step_estimate(comfy, monkeypatch, parts, conds):
    """Inside ComfyUI the Twig Sampler's transformer is the one rebuilt from ComfyUI's manual-cast layers, is
    registered without force_full_load and with twig_core.memory's estimate for this latent, and gives the same
    latent as outside ComfyUI (plain torch layers) on the same weights."""
    from nodes import host
    from nodes.native import NativeTwigTransformer
    from nodes.sampling import TwigSampler
    from twig_core import memory

    mm = comfy["comfy.model_management"]
    calls = []
    real_load = mm.load_models_gpu
    monkeypatch.setattr(mm, "load_models_gpu", lambda models, memory_required=0, force_full_load=False, **kw: (
        calls.append((memory_required, force_full_load)),
        real_load(models, memory_required=memory_required, force_full_load=force_full_load, **kw))[1])
    plain = parts[0]
    cpu = torch.device("cpu")
    managed = host.ManagedModel("transformer", plain.path, plain._load_fn, cpu, cpu, torch.float32)
    latent = empty(w=128, h=96, batch=2)
    pos, neg = conds
    got = TwigSampler().sample(managed, pos, neg, latent, 5, 3, 4.5, "flow_dpmpp_2m", 3.0, 1.0)[0]["samples"]
    transformer = managed.peek()
    assert isinstance(transformer, NativeTwigTransformer) and transformer.device == cpu
    assert all(hasattr(m, "comfy_cast_weights") for m in transformer.modules() if isinstance(m, torch.nn.Linear))
    tokens = max(pos.embeds.shape[1], neg.embeds.shape[1])
    assert calls == [(memory.step_bytes(transformer.config, (2, transformer.config.in_channels, 3, 4), 4,
                                        caption_tokens=tokens), False)]
    want = run_sampler(parts, conds, latent, seed=5, steps=3)["samples"]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_twig_lora_loader_inside_comfy_applies_through_comfys_cast_layers(comfy, parts, conds, tmp_path):
    """Inside ComfyUI the transformer is rebuilt from ComfyUI's cast layers: a Twig LoRA Loader stack still lands
    on every layer (their own forward and the weights read directly) and gives the latent the same stack gives on
    plain torch layers; the plain model fetched again has no LoRA left."""
    from nodes import host
    from nodes.lora import LoraModel
    from nodes.sampling import TwigSampler
    from tests.builders import write_tiny_lora
    from nodes.native import NativeTwigTransformer
    from twig_core.lora import read_lora

    files = [(read_lora(write_tiny_lora(tmp_path / f"l{i}.safetensors", seed=i)), s) for i, s in ((1, 0.8), (2, -0.5))]
    plain = parts[0]
    cpu = torch.device("cpu")
    managed = host.ManagedModel("transformer", plain.path, plain._load_fn, cpu, cpu, torch.float32)
    latent = empty(w=64, h=64)
    pos, neg = conds

    def sample(model):
        return TwigSampler().sample(model, pos, neg, latent, 5, 3, 4.5, "flow_dpmpp_2m", 3.0, 1.0)[0]["samples"]

    base = sample(managed)
    got = sample(LoraModel(managed, files))
    want = run_sampler((LoraModel(plain, files),), conds, latent, seed=5, steps=3)["samples"]
    assert isinstance(managed.peek(), NativeTwigTransformer) and not isinstance(plain.peek(), NativeTwigTransformer)
    assert not torch.equal(got, base)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert torch.equal(sample(managed), base)


@pytest.mark.parametrize("name", ["flow_dpmpp_2m", "flow_euler"])
def test_twig_samplers_and_schedules_in_comfy_lists_match_twig_sampler(comfy, parts, conds, name):
    """Twig's samplers registered with ComfyUI: SamplerCustom's way (the KSAMPLER with Twig Flow Sigmas) and core
    KSampler's way (sampler and scheduler twig_<name>, 20 steps) give Twig Sampler's latent on the same weights,
    seed and CFG 4.5, up to fp32 rounding (ComfyUI mixes guidance on x0, Twig on the velocity)."""
    from nodes.native import (TwigFlowSigmas, _dcae_scale, comfy_sampler_name, native_model, register_samplers,
                              to_native)
    from twig_core import memory
    from twig_core.sampling import noise_like

    samplers, sample = comfy["comfy.samplers"], comfy["comfy.sample"]
    register_samplers(samplers, comfy["comfy.k_diffusion.sampling"])
    key = comfy_sampler_name(name)
    assert key in samplers.KSampler.SAMPLERS and key in samplers.KSAMPLER_NAMES
    assert key in samplers.KSampler.SCHEDULERS and register_samplers(samplers, comfy["comfy.k_diffusion.sampling"]) == []
    cpu = torch.device("cpu")
    transformer = parts[0].peek()
    patcher = native_model(transformer, 3.0, _dcae_scale(), cpu, cpu)
    # what ComfyUI frees before sampling (both CFG halves in one batch): twig_core.memory's estimate
    shape = (2, transformer.config.in_channels, 3, 4)
    assert patcher.model.memory_required(shape) == memory.step_bytes(transformer.config, shape, 4, cfg=False)
    positive, negative = to_native(*conds)
    latent = empty(w=128, h=96)
    seed, steps, cfg = 7, 20, 4.5
    want = run_sampler(parts, conds, latent, seed=seed, steps=steps, cfg=cfg, sampler=name)["samples"]
    noise = noise_like(latent["samples"].shape, seed)
    zeros = torch.zeros_like(noise)

    (sigmas,) = TwigFlowSigmas().sigmas(steps, name, 3.0, 1.0)
    custom = sample.sample_custom(patcher, noise, cfg, samplers.sampler_object(key), sigmas, positive, negative,
                                  zeros, disable_pbar=True, seed=seed)
    ksampler = sample.sample(patcher, noise, steps, cfg, key, key, positive, negative, zeros, denoise=1.0,
                             disable_pbar=True, seed=seed)
    # ComfyUI's latents are the raw ones. Measured 1.4e-6 on latents up to ~3; starting from sigmas[0] * noise as
    # ComfyUI would gives 1e-3, feeding unfloored timesteps to the DPM-Solver 1e-2
    scale = _dcae_scale()
    torch.testing.assert_close(custom * scale, want, rtol=0, atol=1e-4)
    torch.testing.assert_close(ksampler * scale, want, rtol=0, atol=1e-4)


def test_model_loader_auto_dtype_asks_comfy_for_this_model_size_and_its_compute_dtype(comfy, monkeypatch, models_dir):
    """"auto" inside ComfyUI: the weight dtype from unet_dtype for this file's parameter count (not 0, which
    turns off ComfyUI's narrower storage on small cards) and the compute dtype from unet_manual_cast: here a card
    with neither fast fp16 nor bf16 (Pascal-like) keeps fp16 weights and computes in fp32."""
    from nodes.loaders import TwigModelLoader

    mm = comfy["comfy.model_management"]
    seen = {}

    def unet_dtype(device=None, model_params=0, supported_dtypes=(), weight_dtype=None):
        seen["params"] = model_params
        return torch.float16

    monkeypatch.setattr(mm, "unet_dtype", unet_dtype)
    monkeypatch.setattr(mm, "should_use_fp16", lambda *a, **k: False)
    monkeypatch.setattr(mm, "should_use_bf16", lambda *a, **k: False)
    (model,) = TwigModelLoader().load("tiny_twig.safetensors", "auto")
    transformer = model.peek()
    assert seen["params"] == sum(p.numel() for p in transformer.parameters())
    assert transformer.weight_dtype == torch.float16 and transformer.dtype == torch.float32


def allocation_peak(fn) -> int:
    """Peak bytes live at once (beyond what existed before) while ``fn`` runs on the CPU, from the profiler's
    allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.time_range.start, e.cpu_memory_usage) for e in prof.events()
                    if e.cpu_memory_usage and not e.cpu_children)
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("width,heads,hw", [(256, 8, (32, 32)), (512, 16, (16, 24))])
def test_step_memory_estimate_covers_a_measured_transformer_call(width, heads, hw, monkeypatch):
    """twig_core.memory.step_bytes (what ComfyUI is asked to keep free) is at least what one CFG call really
    allocates, measured by torch's profiler on the CPU, and not more than twice that. Measured on the route of
    ``dense`` with the larger temporaries (the 1x1-convolution one AVX-512 CPUs take)."""
    import twig_core.ops
    from twig_core import memory
    from twig_core.config import TransformerConfig

    monkeypatch.setattr(twig_core.ops, "_CONV_ROUTE", True)
    cfg = TransformerConfig(width=width, depth=2, heads=heads, cross_heads=4, caption_channels=64)
    torch.manual_seed(0)
    model = TwigTransformer(cfg).eval()
    x, t, ctx = torch.randn(2, 32, *hw), torch.tensor([500.0, 500.0]), torch.randn(2, 30, 64)
    with torch.no_grad():
        cache = model.encode_caption(ctx)
        peak = allocation_peak(lambda: model(x, t, cache))
    estimate = memory.step_bytes(cfg, (1, 32, *hw), 4, cfg=True, caption_tokens=30)
    assert peak <= estimate <= 2 * peak, (peak, estimate)


def test_vae_memory_estimate_follows_the_decode_plan(parts):
    """The DC-AE estimate a decode node passes (host.vae_memory_required): untiled up to 1024² as dcae_exec's
    automatic choice decodes, per tile (with its overlap) above, per tile for an explicit tile size, in the
    VAE's compute dtype; an encode counts the encoder's full-resolution width."""
    from nodes import host
    from twig_core import memory

    vae = parts[2].peek()
    f, c_dec, c_enc = vae.spatial_factor, vae.config.decoder_block_out_channels[0], vae.config.encoder_block_out_channels[0]
    assert host.vae_memory_required(vae, (1, 32, 32, 32)) == 1024 * 1024 * c_dec * 4 * 5
    assert host.vae_memory_required(vae, (1, 32, 64, 64)) == memory.vae_bytes((1, 32, 40, 40), 4, c_dec, f)
    assert host.vae_memory_required(vae, (1, 32, 64, 64), tile_size=8 * f) == memory.vae_bytes((1, 32, 10, 10), 4, c_dec, f)
    assert host.vae_memory_required(vae, (1, 32, 4, 4), encode=True) == memory.vae_bytes((1, 32, 4, 4), 4, c_enc, f)


def test_a_comfy_without_scheduler_registry_gets_the_samplers_and_a_pointer_to_flow_sigmas(caplog):
    """An older or newer ComfyUI without ``SCHEDULER_HANDLERS``: the samplers are still added, no scheduler is,
    and the log names the way that always works (Twig Flow Sigmas with SamplerCustom)."""
    from nodes.native import register_samplers

    samplers = types.SimpleNamespace(KSAMPLER_NAMES=["euler"], SAMPLER_NAMES=["euler", "ddim"], SCHEDULER_NAMES=["simple"])
    k_diffusion = types.SimpleNamespace()
    with caplog.at_level("WARNING", logger="twig"):
        added = register_samplers(samplers, k_diffusion)
    assert added == ["sampler twig_flow_dpmpp_2m", "sampler twig_flow_euler"]
    assert samplers.SAMPLER_NAMES[-2:] == ["twig_flow_dpmpp_2m", "twig_flow_euler"] and samplers.SCHEDULER_NAMES == ["simple"]
    assert callable(k_diffusion.sample_twig_flow_dpmpp_2m)
    assert "no scheduler list" in caplog.text and "Twig Flow Sigmas" in caplog.text


def test_native_lora_on_a_quantized_transformer_is_refused_by_name(comfy, tmp_path):
    """ComfyUI's LoRA patches address "<layer>.weight"; a GGUF transformer's layers hold "qweight" blocks. A LoRA
    put on that native MODEL is refused naming the node and the stored types, not dropped silently; the same
    LoRA on the same model stored in fp32 is applied."""
    from safetensors.torch import save_file

    from nodes.common import NodeError
    from nodes.lora import patch_native
    from nodes.native import _dcae_scale, native_model
    from tests.builders import tiny_transformer, write_tiny_lora
    from twig_core.convert import convert
    from twig_core.loader import load_transformer
    from twig_core.lora import read_lora

    pytest.importorskip("gguf")
    save_file(tiny_transformer().state_dict(), str(tmp_path / "t.safetensors"))
    convert(tmp_path / "t.safetensors", tmp_path / "t.gguf", "q8_0")
    lora = [(read_lora(write_tiny_lora(tmp_path / "l.safetensors")), 1.0)]
    cpu = torch.device("cpu")
    quantized = native_model(load_transformer(tmp_path / "t.gguf", dtype=torch.float32), 3.0, _dcae_scale(), cpu, cpu)
    with pytest.raises(NodeError, match=r"Twig LoRA Loader \(native MODEL\).*Q8_0 x\d+"):
        patch_native(quantized, lora)
    plain = native_model(load_transformer(tmp_path / "t.safetensors", dtype=torch.float32), 3.0, _dcae_scale(), cpu,
                         cpu)
    assert patch_native(plain, lora).patches


def test_int8_products_inside_comfy_follow_its_cast_layers_and_loras(comfy, parts, conds, tmp_path):
    """A transformer loaded with int8 products keeps them when rebuilt from ComfyUI's cast layers: the Twig
    Sampler's latent stays within the fast preset's bound of the fp32 one, a Twig LoRA stack reaches the int8
    products (packs rebuilt), and taking it off gives the int8 latent back exactly."""
    from nodes import host
    from nodes.lora import LoraModel
    from nodes.sampling import TwigSampler
    from tests.builders import write_tiny_lora
    from twig_core import int8, loader, presets
    from twig_core.lora import read_lora

    if int8.engine() is None:
        pytest.skip("torch without a quantized CPU engine")
    plain = parts[0]
    cpu = torch.device("cpu")
    quick = host.ManagedModel("transformer", plain.path, lambda device: loader.load_transformer(
        plain.path, device=device, dtype=torch.float16, compute_dtype=torch.float32, int8=True),
        cpu, cpu, torch.float32)
    latent = empty(w=64, h=64)
    pos, neg = conds

    def sample(model):
        return TwigSampler().sample(model, pos, neg, latent, 5, 3, 4.5, "flow_dpmpp_2m", 3.0, 1.0)[0]["samples"]

    want = run_sampler(parts, conds, latent, seed=5, steps=3)["samples"]
    got = sample(quick)
    assert int8.enabled(quick.peek()) and int8.memory_bytes(quick.peek()) > 0
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert 0 < rel(got, want) <= presets.LATENT_ERROR["fast"]
    files = [(read_lora(write_tiny_lora(tmp_path / "l.safetensors", seed=1)), 1.0)]
    with_lora = sample(LoraModel(quick, files))
    lora_fp32 = run_sampler((LoraModel(plain, files),), conds, latent, seed=5, steps=3)["samples"]
    assert rel(with_lora, lora_fp32) <= presets.LATENT_ERROR["fast"] < rel(lora_fp32, want)
    assert torch.equal(sample(quick), got)
