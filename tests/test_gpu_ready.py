"""What a GPU would meet, checked on the CPU: no float64 and no host synchronisation inside a sampling step or a
decode on the model's device (the "meta" device stands in for it: it has no data, so any op that needs the host
to read values fails there), which networks sit on the device at each stage of a run (a ledger of the moves),
the dtype and device choices on mocked CUDA cards and Macs, the fp16 decode safeguards, the NCHW layout kept on
MPS, and TIPO's device-independent draws. ``bench/gpu_check.py`` runs the same on a real GPU."""

from __future__ import annotations

import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.builders import TINY_TRANSFORMER, tiny_dcae, write_tiny_pipeline
from twig_core import dcae_exec, devices, loader, ops, pipeline
from twig_core.transformer import CaptionCache, TwigTransformer

# ops that make the host wait for the device: a value read back (item/tolist), a data-dependent shape
HOST_SYNCS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
              "aten.unique.default", "aten._unique2.default", "aten.equal.default", "aten.is_nonzero.default"}


class OpLedger(TorchDispatchMode):
    """Every op with a tensor on ``device``: the float64 ones and the host syncs."""

    def __init__(self, device: str):
        super().__init__()
        self.device, self.float64, self.syncs, self.count = device, [], [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        if any(t.device.type == self.device for t in seen):
            self.count += 1
            if any(t.dtype == torch.float64 for t in seen if t.device.type == self.device):
                self.float64.append(str(func))
            if str(func) in HOST_SYNCS:
                self.syncs.append(str(func))
        return out


def _on_meta(cache: CaptionCache) -> CaptionCache:
    meta = lambda t: None if t is None else t.to("meta")  # noqa: E731
    return CaptionCache(None if cache.kv is None else [tuple(map(meta, kv)) for kv in cache.kv], meta(cache.bias),
                        meta(cache.y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_sampling_step_stays_on_the_device(dtype):
    """A 2K/4K-style transformer (sin-cos positions) steps on the device without float64 (MPS has none) and
    without reading anything back; the caption, encoded once per run, is prepared beforehand."""
    torch.manual_seed(0)
    model = TwigTransformer(TINY_TRANSFORMER.replace(pos_embed=True, pos_interpolation_scale=0.5)).eval().to(dtype)
    with torch.no_grad():
        cache = _on_meta(model.encode_caption(torch.randn(2, 7, 64), torch.tensor([[1] * 7, [1] * 4 + [0] * 3])))
    model = model.to("meta")
    x = torch.randn(2, 32, 6, 10, device="meta")
    for _ in range(2):  # the first step builds the positions (on the CPU), the second reuses them
        with torch.no_grad(), OpLedger("meta") as ledger:
            v = model(x, torch.full((2,), 500.0, device="meta"), cache)
        assert v.shape == x.shape and ledger.count > 50
        assert ledger.float64 == [] and ledger.syncs == []


@pytest.mark.parametrize("sampler", ["flow_dpmpp_2m", "flow_euler"])
def test_the_sampling_loop_stays_on_the_device(monkeypatch, sampler):
    """Whole sampling loops with CFG and an inpainting mask: the steps, the guidance, the sampler's updates and
    its NaN check run on the device with nothing read back (the check's flags are read once, after the loop)."""
    from twig_core import sampling

    torch.manual_seed(0)
    model = TwigTransformer(TINY_TRANSFORMER.replace(pos_embed=True)).eval()
    cond = types.SimpleNamespace(embeds=torch.randn(1, 7, 64), mask=torch.ones(1, 7, dtype=torch.long))
    uncond = types.SimpleNamespace(embeds=torch.randn(1, 7, 64), mask=torch.tensor([[1] * 3 + [0] * 4]))
    with torch.no_grad():  # once per run, before the steps: prepared on the CPU
        emb, mask = sampling._stack([sampling._expand(c, 2) for c in (uncond, cond)])
        cache = _on_meta(model.encode_caption(emb, mask))
    model = model.to("meta")
    monkeypatch.setattr(model, "encode_caption", lambda *a, **k: cache)
    finished = []
    monkeypatch.setattr(sampling._FiniteCheck, "finish", lambda self: finished.append(len(self.flags)))
    shape = (2, 32, 4, 6)
    orig, noise = torch.randn(shape, device="meta"), torch.randn(shape, device="meta")
    m = torch.rand(2, 1, 4, 6, device="meta")
    denoiser = sampling.make_denoiser(model, cond, uncond, 4.5, inpaint=(orig, noise, m))
    sigmas = sampling.flow_sigmas(4, 3.0, sampler, 1.0)
    with torch.no_grad(), OpLedger("meta") as ledger:
        x = sampling.sample(denoiser, noise, sigmas, sampler, callback=lambda state: None)
    assert x.device.type == "meta" and finished == [4]
    assert ledger.float64 == [] and ledger.syncs == []


@pytest.mark.parametrize("strategy,tile", [("plain", None), ("tiles", 2), ("blended", 2), ("banded", None),
                                           ("streamed", 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decode_stays_on_the_device(strategy, tile, dtype):
    vae = tiny_dcae().to("meta", dtype)
    with torch.no_grad(), OpLedger("meta") as ledger:
        out, run = dcae_exec.decode(vae, torch.randn(1, 32, 4, 4, device="meta"), strategy=strategy, tile_size=tile,
                                    band=64)  # small bands: the attention runs in bands too
    assert out.shape == (1, 3, 128, 128) and run.strategy == strategy
    if strategy == "banded":
        assert "attention bands" in run.kernels
    assert ledger.float64 == [] and ledger.syncs == []


def test_sin_cos_positions_match_the_float64_table_and_are_built_once():
    from twig_core.transformer import sincos_pos_embed

    sincos_pos_embed.cache_clear()
    model = TwigTransformer(TINY_TRANSFORMER.replace(pos_embed=True))
    a = model._positions(6, 10, torch.device("cpu"))
    assert a is model._positions(6, 10, torch.device("cpu")) and sincos_pos_embed.cache_info().misses == 1
    assert a.dtype == torch.float32 and a.shape == (60, 64)
    model.to("cpu")  # a move (offloading) drops the device copy; the CPU table stays cached
    assert "_held_positions" not in model.__dict__
    assert torch.equal(model._positions(6, 10, torch.device("cpu")), a) and sincos_pos_embed.cache_info().misses == 1
    # reference: numpy's float64 sin/cos of the same stretched grid (diffusers' get_2d_sincos_pos_embed layout)
    import numpy as np

    base, d = model.config.pos_base_size, 64
    omega = 1.0 / 10000 ** (np.arange(d // 4) / (d // 4))

    def axis(n):
        o = (np.arange(n) / (n / base))[:, None] * omega[None]
        return np.concatenate([np.sin(o), np.cos(o)], 1)

    ref = np.concatenate([np.broadcast_to(axis(10)[None], (6, 10, d // 2)),
                          np.broadcast_to(axis(6)[:, None], (6, 10, d // 2))], -1).reshape(60, d)
    torch.testing.assert_close(a, torch.from_numpy(ref).float())


# ---- which networks are on the device ----------------------------------------------------------------------

RUN_DEVICE = torch.device("cpu", 0)  # stands for the GPU: a distinct device argument, computing on the CPU


class DeviceLedger:
    """Where each network is, from the device each was loaded on and every ``.to()`` since, and which were on
    the device whenever one of them ran."""

    def __init__(self, monkeypatch):
        self.where, self.modules, self.stages = {}, {}, []
        real_to = torch.nn.Module.to
        ledger = self

        def to(module, *args, **kwargs):
            name = ledger.modules.get(id(module))
            dev = kwargs.get("device", args[0] if args else None)
            if name is not None and isinstance(dev, (str, torch.device)):
                ledger.where[name] = "device" if torch.device(dev) == RUN_DEVICE else "home"
            return real_to(module, *args, **kwargs)

        monkeypatch.setattr(torch.nn.Module, "to", to)
        for fn in ("load_transformer", "load_text_encoder", "load_vae"):
            real = getattr(loader, fn)

            def load(*args, _real=real, _fn=fn, **kwargs):
                net = _real(*args, **kwargs)
                name = _fn[5:]
                self.modules[id(net.model if name == "text_encoder" else net)] = name
                self.where[name] = "device" if torch.device(kwargs["device"]) == RUN_DEVICE else "home"
                return net

            monkeypatch.setattr(loader, fn, load)

    def watch(self, monkeypatch, parts):
        def stage(name, fn):
            def run(*args, **kwargs):
                self.stages.append((name, {k for k, v in self.where.items() if v == "device"}))
                return fn(*args, **kwargs)
            return run

        monkeypatch.setattr(parts.text_encoder, "encode", stage("text_encoder", parts.text_encoder.encode))
        monkeypatch.setattr(parts.transformer, "forward", stage("transformer", parts.transformer.forward))
        monkeypatch.setattr(dcae_exec, "decode", stage("vae", dcae_exec.decode))
        monkeypatch.setattr(dcae_exec, "encode", stage("vae", dcae_exec.encode))


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("gpu") / "pipe")


@pytest.mark.parametrize("img2img", [False, True])
def test_offloading_keeps_one_network_on_the_device(monkeypatch, pipeline_folder, img2img):
    ledger = DeviceLedger(monkeypatch)
    parts = loader.load_parts(str(pipeline_folder), device=RUN_DEVICE, offload="on")
    assert set(ledger.where.values()) == {"home"}  # loaded into CPU memory
    ledger.watch(monkeypatch, parts)
    image = torch.rand(1, 3, 64, 64) * 2 - 1 if img2img else None
    out = pipeline.generate(parts.transformer, parts.vae, parts.text_encoder, "a red circle", width=64, height=64,
                            steps=2, image=image, denoise=0.5, residency=parts.residency)
    assert out.shape == (1, 3, 64, 64)
    names = [n for n, _ in ledger.stages]
    # image to image encodes the picture first, so each network comes to the device once (the VAE twice)
    assert names[0] == ("vae" if img2img else "text_encoder") and names[-1] == "vae" and "transformer" in names
    for name, on_device in ledger.stages:
        assert on_device == {name}, (name, on_device)


def test_without_offloading_the_networks_stay_where_they_were_loaded(monkeypatch, pipeline_folder):
    ledger = DeviceLedger(monkeypatch)
    parts = loader.load_parts(str(pipeline_folder), device=RUN_DEVICE, offload="auto")  # auto: not on this device
    ledger.watch(monkeypatch, parts)
    pipeline.generate(parts.transformer, parts.vae, parts.text_encoder, "a red circle", width=64, height=64, steps=1,
                      residency=parts.residency)
    assert {frozenset(on) for _, on in ledger.stages} == {frozenset({"transformer", "text_encoder", "vae"})}


def test_command_line_offloads(monkeypatch, pipeline_folder, tmp_path):
    from twig_core.__main__ import main

    ledger = DeviceLedger(monkeypatch)
    real = loader.load_parts

    def load_parts(*args, **kwargs):
        parts = real(*args, **kwargs)
        ledger.watch(monkeypatch, parts)
        return parts

    monkeypatch.setattr(loader, "load_parts", load_parts)
    main(["generate", "--prompt", "a red circle", "--transformer", str(pipeline_folder), "--device", "cpu:0",
          "--offload", "on", "--keep-loaded", "--steps", "1", "--width", "64", "--height", "64",
          "--out", str(tmp_path / "x.png")])
    assert (tmp_path / "x.png").is_file() and ledger.stages
    for name, on_device in ledger.stages:
        assert on_device == {name}, (name, on_device)


def test_tab_offloads_through_tipo_generation_and_face_refine(monkeypatch, pipeline_folder, tmp_path):
    from tests.builders import save_tiny_tipo_folder
    from twig_core.face import detect as fdetect
    from twig_core.tipo import TipoModel
    from twig_webui.engine import Catalog, Engine, Settings
    from twig_webui.host import Host

    class OneFace(fdetect.Detector):
        name = "one-face"

        def detect(self, image, confidence=0.3):
            return [fdetect.Detection((16.0, 16.0, 48.0, 48.0), 0.9)]

    monkeypatch.setattr(fdetect, "get_detector", lambda spec, device=None: OneFace())
    monkeypatch.setattr(Catalog, "face_detectors", lambda self: {"one-face": "one-face"})
    monkeypatch.setattr(loader, "wants_offload", lambda choice, device: True)  # as on a small CUDA card
    ledger = DeviceLedger(monkeypatch)
    real_tipo = TipoModel.from_pretrained.__func__

    def tipo_from_pretrained(cls, *args, **kwargs):
        tipo = real_tipo(cls, *args, **kwargs)
        ledger.modules[id(tipo.model)] = "tipo"
        ledger.where["tipo"] = "device" if torch.device(kwargs["device"]) == RUN_DEVICE else "home"
        return tipo

    monkeypatch.setattr(TipoModel, "from_pretrained", classmethod(tipo_from_pretrained))
    real_load = Engine.load

    def load(self, *args, **kwargs):
        parts = real_load(self, *args, **kwargs)
        ledger.watch(monkeypatch, parts)
        return parts

    monkeypatch.setattr(Engine, "load", load)
    save_tiny_tipo_folder(tmp_path / "models" / "LLM" / "tiny-tipo")
    engine = Engine(Host(tmp_path / "models", tmp_path / "out", device="cpu:0", extra_models=[str(pipeline_folder)]))
    r = engine.run(Settings(prompt="1girl, red hair", steps=1, seed=5, size="64x64", model=str(pipeline_folder),
                            tipo=True, tipo_model="tiny-tipo/", tipo_length="very_short", tipo_max_tokens=8,
                            face=True, face_detector="one-face", face_denoise=0.5))
    assert "face refine: 1 face(s) with one-face" in r.notes
    names = [n for n, _ in ledger.stages]
    # prompt and negative, then again for the face; TIPO (loaded on the device) left it when Gemma-2 came
    assert names.count("text_encoder") == 4 and names[-1] == "vae" and ledger.where["tipo"] == "home"
    for name, on_device in ledger.stages:
        assert on_device == {name}, (name, on_device)


def test_offload_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    memory = {"total": 8 * 2**30}
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(total_memory=memory["total"]))
    assert devices.wants_offload("auto", "cuda") and devices.wants_offload("auto", "cuda:1")
    memory["total"] = 24 * 2**30
    assert not devices.wants_offload("auto", "cuda")
    assert not devices.wants_offload("auto", "mps") and not devices.wants_offload("auto", "cpu")
    assert devices.wants_offload("on", "cpu") and not devices.wants_offload("off", "cuda")
    with pytest.raises(devices.TwigError, match="offload 'sometimes'"):
        devices.wants_offload("sometimes", "cuda")


# ---- dtype and device choices on mocked machines ---------------------------------------------------------------

# card -> (CUDA compute capability or None, MPS available)
MACHINES = {"ampere": ((8, 6), False), "hopper": ((9, 0), False), "turing": ((7, 5), False),
            "volta": ((7, 0), False), "pascal": ((6, 1), False), "mac": (None, 14), "mac13": (None, 13),
            "cpu": (None, False)}
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# machine -> auto device, then auto dtype of (diffusion, vae, text, tipo)
WANT = {"ampere": ("cuda", (BF16, BF16, BF16, BF16)), "hopper": ("cuda", (BF16, BF16, BF16, BF16)),
        "turing": ("cuda", (F16, F32, F32, F16)), "volta": ("cuda", (F16, F32, F32, F16)),
        "pascal": ("cuda", (F16, F32, F32, F16)), "mac": ("mps", (F16, F32, BF16, F16)),
        "mac13": ("mps", (F16, F32, F32, F16)), "cpu": ("cpu", (F32, F32, F32, F32))}


def mock_machine(monkeypatch, name):
    capability, mps = MACHINES[name]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: capability is not None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    # current torch counts emulated bf16 as supported on every CUDA card: the rule must not ask it
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: capability is not None)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: bool(mps))
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: (mps or 0) >= major)


@pytest.mark.parametrize("machine", sorted(MACHINES))
def test_auto_device_and_dtypes_per_machine(monkeypatch, machine):
    mock_machine(monkeypatch, machine)
    device, dtypes = WANT[machine]
    assert devices.default_device().type == device and devices.pick_device("auto").type == device
    got = tuple(devices.resolve_dtype("auto", device, role) for role in ("diffusion", "vae", "text", "tipo"))
    assert got == dtypes
    # Gemma-2 never in fp16, whatever is asked
    assert devices.text_dtype(F16, device) == (BF16 if dtypes[2] == BF16 else F32)


@pytest.mark.parametrize("machine", ["turing", "mac13"])
def test_load_parts_keeps_the_vae_in_fp32_without_bf16(monkeypatch, machine):
    """load_parts resolves "auto" per network for the run device: half-precision transformer, fp32 DC-AE and
    Gemma-2 (loaded into CPU memory with offloading, so nothing needs the mocked device)."""
    mock_machine(monkeypatch, machine)
    seen = {}
    for fn in ("load_transformer", "load_text_encoder", "load_vae"):
        monkeypatch.setattr(loader, fn, lambda *a, _fn=fn, **k: seen.setdefault(_fn, k) and types.SimpleNamespace(
            config=types.SimpleNamespace(caption_channels=64)))
    monkeypatch.setattr(loader, "detect", lambda p: "pipeline")
    parts = loader.load_parts("pipe", dtype="auto", device=WANT[machine][0], offload="on")
    assert parts.residency.offload and parts.residency.device.type == WANT[machine][0]
    assert seen["load_transformer"]["dtype"] == F16 and seen["load_vae"]["dtype"] == F32
    assert seen["load_text_encoder"]["dtype"] == F32
    assert {k["device"] for k in seen.values()} == {"cpu"}


def test_text_encoder_without_a_dtype_follows_the_rule(monkeypatch, tmp_path):
    """gemma.load_text_encoder(dtype=None) asks the devices rule (no bf16 merely because the device is CUDA)."""
    from twig_core import gemma

    asked = []
    real = gemma.resolve_dtype
    monkeypatch.setattr(gemma, "resolve_dtype", lambda *a, **k: asked.append((a, k)) or real(*a, **k))
    write_tiny_pipeline(tmp_path / "p")
    te = gemma.load_text_encoder(tmp_path / "p", dtype=None, device="cpu")
    assert te.dtype == F32 and asked == [(("auto", torch.device("cpu")), {"role": "text"})]


def test_cache_clearing_and_out_of_memory_on_cuda_and_mps(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("cuda"))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: calls.append("mps"))
    devices.clear_cache()
    assert calls == ["cuda", "mps"]
    assert devices.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert devices.is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 17 GB)"))
    assert not devices.is_out_of_memory(RuntimeError("shape mismatch"))


# ---- fp16 DC-AE ------------------------------------------------------------------------------------------------


def test_fp16_decode_that_overflows_runs_again_in_fp32():
    """Activations past fp16's range: the decode notices the non-finite image and decodes again in fp32."""
    vae = tiny_dcae()
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(8e4)  # outputs of ~1e5: inf in fp16, finite in fp32
    vae = vae.half()
    z = torch.randn(1, 32, 2, 2)
    with torch.no_grad():
        out, run = dcae_exec.decode(vae, z)
        vae.compute_dtype = F32
        ref, ref_run = dcae_exec.decode(vae, z)
    assert not ref_run.widened and ref.abs().max() > 70000
    assert run.widened and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref)


def test_generate_and_face_refine_decode_through_the_out_of_memory_fallback(monkeypatch, pipeline_folder):
    """The command line, the tab and batch decode through pipeline.generate, face refine through its refiner:
    both reach dcae_exec.decode's retry with smaller tiles when the untiled decode runs out of memory."""
    from twig_core.face import refine as frefine
    from twig_core.face.refine import FaceJob

    untiled = []
    real = dict(dcae_exec.DECODE_STRATEGIES)

    def short_of_memory(name):
        def run(vae, z, r):
            if r.tile_size is None:
                untiled.append(name)
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return real[name](vae, z, r)
        return run

    for name in real:
        monkeypatch.setitem(dcae_exec.DECODE_STRATEGIES, name, short_of_memory(name))
    parts = loader.load_parts(str(pipeline_folder), dtype="fp32")
    out = pipeline.generate(parts.transformer, parts.vae, parts.text_encoder, "a red circle", width=256, height=256,
                            steps=1, tile_size=None)  # 8x8 latent px: retried with tiles of 4
    assert out.shape == (1, 3, 256, 256) and len(untiled) == 1
    cond = parts.text_encoder.encode(["a face"])
    refiner = frefine.TwigRefiner(parts.transformer, parts.vae, cond, steps=1, denoise=0.5)
    crop = torch.rand(1, 256, 256, 3)
    face = refiner(crop, torch.ones(1, 256, 256), FaceJob(0, 0, 0, None, None))
    assert face.shape == crop.shape and len(untiled) == 2


def test_decode_divides_by_the_scaling_factor_before_casting(monkeypatch):
    """The decode node (nodes/latent.py), the CLI and the tab hand model-space latents to dcae_exec.decode,
    which unscales in fp32 and only then casts to the VAE's compute dtype (one rounding, not two)."""
    seen = []
    monkeypatch.setitem(dcae_exec.DECODE_STRATEGIES, "banded", lambda vae, z, run: seen.append(z) or
                        torch.zeros(z.shape[0], 3, z.shape[2] * 32, z.shape[3] * 32, dtype=z.dtype))
    vae = tiny_dcae().half()
    latent = torch.randn(1, 32, 2, 2) * 3
    with torch.no_grad():
        dcae_exec.decode(vae, latent)
    assert torch.equal(seen[0], (latent / vae.scaling_factor).half())
    assert not torch.equal(seen[0], latent.half() / vae.scaling_factor)


def test_small_map_attention_forms_kq_in_fp32():
    """The N <= d path (tiny maps) in fp16 with values whose k.q products pass fp16's range: same result as
    the float64 formula."""
    attn = next(m for m in tiny_dcae().modules() if hasattr(m, "_quadratic"))
    d = attn.head_dim
    torch.manual_seed(0)
    qkv = torch.rand(1, 2, 3, d, d // 2, dtype=torch.float64) * 200  # [B, heads, (q,k,v), d, N], N < d
    q, k, v = qkv.unbind(2)
    s = k.clamp(min=0).transpose(-1, -2) @ q.clamp(min=0)
    ref = v @ (s / (s.sum(dim=2, keepdim=True) + attn.eps))
    out = attn._quadratic(qkv.half())
    assert out.dtype == F16
    torch.testing.assert_close(out.double(), ref, rtol=2e-3, atol=0.5)


@pytest.mark.parametrize("strategy,tile", [("plain", None), ("tiles", 2), ("blended", 2), ("banded", None),
                                           ("streamed", 2)])
def test_nchw_layout_on_mps_gives_the_same_decode(monkeypatch, strategy, tile):
    """MPS keeps contiguous NCHW (channels-last convolutions have had silent errors there): every strategy gives
    the channels-last result in that layout too (the CPU stands in for the NCHW device)."""
    vae = tiny_dcae()
    z = torch.randn(1, 32, 4, 4)
    with torch.no_grad():
        ref = dcae_exec.decode(vae, z, strategy=strategy, tile_size=tile)[0]
        monkeypatch.setattr(ops, "NCHW_DEVICES", frozenset({"cpu"}))
        assert ops.channels_last(torch.zeros(1, 8, 3, 3)).is_contiguous()
        out = dcae_exec.decode(vae, z, strategy=strategy, tile_size=tile)[0]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


# ---- TIPO ------------------------------------------------------------------------------------------------------


class RandomOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.default_generator = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if any(r in name for r in ("multinomial", "rand", "uniform", "exponential", "bernoulli", "normal")):
            if (kwargs or {}).get("generator") is None:
                self.default_generator.append(name)
        return func(*args, **(kwargs or {}))


def test_tipo_draws_from_its_own_cpu_generator():
    """No random op of a TIPO generation uses a default generator (the device's, on a GPU): the same seed draws
    the same tokens on any device."""
    from tests.builders import build_tiny_tipo, build_tiny_tipo_tokenizer
    from twig_core.tipo import TipoModel
    from twig_core.tipo.model import Sampling

    tok = build_tiny_tipo_tokenizer()
    tipo = TipoModel(build_tiny_tipo(tok), tok)
    with RandomOps() as rec:
        a = tipo.generate("1girl, red hair", seed=7, sampling=Sampling(max_new_tokens=8))
    assert rec.default_generator == []
    torch.manual_seed(99)
    assert tipo.generate("1girl, red hair", seed=7, sampling=Sampling(max_new_tokens=8)).text == a.text


# ---- on a real device (bench/gpu_check.py sets TWIG_TEST_DEVICE=cuda or mps) -----------------------------------

TEST_DEVICE = __import__("os").environ.get("TWIG_TEST_DEVICE")
on_device = pytest.mark.skipif(not TEST_DEVICE, reason="set TWIG_TEST_DEVICE=cuda (or mps) to run on a device")


def _half_for(device: str):
    """The half dtype "auto" picks for the transformer on that device (None on the CPU)."""
    dt = devices.resolve_dtype("auto", device, "diffusion")
    return None if dt == F32 else dt


@on_device
@pytest.mark.parametrize("pos_embed", [False, True])
def test_device_transformer_matches_the_cpu(pos_embed):
    torch.manual_seed(0)
    model = TwigTransformer(TINY_TRANSFORMER.replace(pos_embed=pos_embed)).eval()
    x, t, ctx = torch.randn(2, 32, 6, 10), torch.tensor([500.0, 20.0]), torch.randn(2, 7, 64)
    with torch.no_grad():
        ref = model(x, t, ctx)
        dev = model.to(TEST_DEVICE)
        out = dev(x.to(TEST_DEVICE), t.to(TEST_DEVICE), ctx.to(TEST_DEVICE)).cpu()
        torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
        half = _half_for(TEST_DEVICE)
        if half is not None:
            out = dev.to(half)(x.to(TEST_DEVICE), t.to(TEST_DEVICE), ctx.to(TEST_DEVICE, half)).float().cpu()
            assert (out - ref).abs().max() < 0.05 * ref.abs().max()


@on_device
@pytest.mark.parametrize("strategy,tile", [("plain", None), ("tiles", 2), ("blended", 2)])
def test_device_decode_matches_the_cpu(strategy, tile):
    vae = tiny_dcae()
    z = torch.randn(1, 32, 4, 4)
    with torch.no_grad():
        ref = dcae_exec.decode(vae, z, strategy=strategy, tile_size=tile)[0]
        out = dcae_exec.decode(vae.to(TEST_DEVICE), z.to(TEST_DEVICE), strategy=strategy, tile_size=tile)[0].cpu()
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)


@on_device
def test_device_generate_with_offloading_matches_the_cpu(pipeline_folder):
    args = dict(prompt="a red circle", width=64, height=64, steps=2, seed=3)
    cpu = loader.load_parts(str(pipeline_folder), dtype="fp32")
    ref = pipeline.generate(cpu.transformer, cpu.vae, cpu.text_encoder, **args)
    parts = loader.load_parts(str(pipeline_folder), dtype="fp32", device=TEST_DEVICE, offload="on")
    out = pipeline.generate(parts.transformer, parts.vae, parts.text_encoder, residency=parts.residency, **args)
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)


def _allocated(device: str) -> int:
    return torch.cuda.memory_allocated() if device == "cuda" else torch.mps.current_allocated_memory()


@on_device
def test_device_text_encoder_keeps_its_prefix_in_main_memory():
    """The instruction prefix's cache gives the CPU's conditioning on the device, and an encoder moved off the
    device (a host's offload) leaves none of its memory there."""
    from tests.builders import build_tiny_gemma2, build_tiny_gemma_tokenizer
    from twig_core.text import TextEncoder

    tok = build_tiny_gemma_tokenizer()
    enc = TextEncoder(build_tiny_gemma2(tok), tok)
    prompts = ["a red circle", "一只猫"]
    ref = [enc.encode(prompts).embeds for _ in range(2)]
    before = _allocated(TEST_DEVICE)
    enc.model.to(TEST_DEVICE)
    got = [enc.encode(prompts).embeds.cpu() for _ in range(2)]  # the prefix made, then reused
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    assert enc._prefix is not None and enc._prefix.hidden.device.type == "cpu"
    enc.model.to("cpu")
    assert _allocated(TEST_DEVICE) == before


def test_gpu_check_says_so_on_a_machine_without_a_gpu(monkeypatch, capsys):
    from bench.gpu_check import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert main([]) == 0
    assert "no CUDA or MPS device" in capsys.readouterr().out


def test_the_device_nan_check_names_the_first_bad_step():
    from twig_core import sampling

    check = sampling._FiniteCheck(types.SimpleNamespace(compute_dtype=F16))
    check.flags = [torch.tensor(True), torch.tensor(False), torch.tensor(False)]  # as left on a device
    with pytest.raises(devices.TwigError, match="NaN/inf at step 2; .*fp16"):
        check.finish()


@pytest.mark.parametrize("offload", [False, True])
def test_gpu_check_run_row(pipeline_folder, offload):
    """One row of the check's table, run on the CPU with the tiny pipeline (the device path is the same)."""
    from bench.gpu_check import _run

    p = str(pipeline_folder)
    seconds, peak, note = _run({"text": p, "vae": p}, p, torch.device("cpu"), 64, 1, offload)
    assert seconds > 0 and note == "float32/float32/float32"
