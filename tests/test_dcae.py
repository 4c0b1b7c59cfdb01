"""DC-AE parity with diffusers' AutoencoderDC on identical random weights (fp32, CPU), tiling, config inference."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderDC

from tests.builders import TINY_DCAE
from twig_core import dcae, dcae_exec
from twig_core.dcae import DCAE, DCAE_F32C32_SANA, RES_BLOCK, VIT_BLOCK, DCAEConfig
from twig_core.dcae_exec import auto_tile_size, kernels, strategies
from twig_core.dcae_exec.strategies import run_blended
from twig_core.errors import TwigError

# Sana-shaped, tiny: stride-2 conv down, interpolate up, RMSNorm + SiLU, two multiscale kernels on the last stage.
TINY = DCAEConfig(
    latent_channels=4,
    encoder_block_out_channels=(8, 16, 32, 32),
    decoder_block_out_channels=(8, 16, 32, 32),
    encoder_layers_per_block=(1, 1, 2, 2),
    decoder_layers_per_block=(1, 2, 2, 2),
    encoder_block_types=(RES_BLOCK, RES_BLOCK, VIT_BLOCK, VIT_BLOCK),
    decoder_block_types=(RES_BLOCK, RES_BLOCK, VIT_BLOCK, VIT_BLOCK),
    encoder_qkv_multiscales=((), (), (5,), (3, 5)),
    decoder_qkv_multiscales=((), (), (5,), (3, 5)),
    attention_head_dim=8,
    decoder_norm_types=("rms_norm",) * 4,
    decoder_act_fns=("silu",) * 4,
)
# "in/mix-1.0"-shaped, tiny: empty first stage, pixel (un)shuffle, BatchNorm + ReLU decoder stages.
TINY_MIX = DCAEConfig(
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
    decoder_conv_act_fn="silu",
)
# For tiling: small receptive field (3 stages), global attention present but its output projection is zeroed
# in the test, so the network is local and tiled == untiled is a well-posed check.
TINY_LOCAL = DCAEConfig(
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

# The published vae/config.json of dc-ae-f32c32-sana-1.0-diffusers (as used by the Sana pipelines).
SANA_VAE_CONFIG_JSON = {
    "_class_name": "AutoencoderDC",
    "attention_head_dim": 32,
    "decoder_act_fns": "silu",
    "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "decoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "decoder_layers_per_block": [3, 3, 3, 3, 3, 3],
    "decoder_norm_types": "rms_norm",
    "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "downsample_block_type": "Conv",
    "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "encoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "encoder_layers_per_block": [2, 2, 2, 3, 3, 3],
    "encoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "in_channels": 3,
    "latent_channels": 32,
    "scaling_factor": 0.41407,
    "upsample_block_type": "interpolate",
}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def diffusers_vae(cfg: DCAEConfig, seed=0) -> AutoencoderDC:
    """AutoencoderDC with the same architecture; our config fields are named like its arguments."""
    torch.manual_seed(seed)
    model = AutoencoderDC(**cfg.to_dict()).eval()
    # Norm weights start at 1 and biases at 0: perturb every 1-D tensor so scales and shifts are exercised.
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.ndim == 1 and t.is_floating_point():
                t.add_(0.2 * torch.randn_like(t)) if not name.endswith("running_var") else t.uniform_(0.5, 2.0)
    return model


def twin(cfg: DCAEConfig, seed=0):
    ref = diffusers_vae(cfg, seed)
    ours = DCAE(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def images(b, h, w, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


# ---- parity ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [TINY, TINY_MIX], ids=["sana-like", "mix-like"])
def test_tiny_parity(cfg):
    ours, ref = twin(cfg)
    f = cfg.spatial_factor
    with torch.no_grad():
        # 48x32 px keeps the deepest maps above head_dim positions (linear attention path);
        # 16x16 px makes the deepest 2x2 (quadratic path).
        for h, w in [(32, 48), (16, 16)]:
            x = images(2, h, w)
            z_ref = ref.encode(x).latent
            z = ours.encode_raw(x)
            assert z.shape == (2, cfg.latent_channels, h // f, w // f)
            assert rel_err(z, z_ref) <= 1e-4
            latent = torch.randn(2, cfg.latent_channels, h // f, w // f)
            y = ours.decode_raw(latent)
            assert y.shape == (2, 3, h, w)
            assert rel_err(y, ref.decode(latent).sample) <= 1e-4


@pytest.mark.parametrize("cfg", [TINY, TINY_MIX], ids=["sana-like", "mix-like"])
def test_training_path_parity_and_gradients(cfg):
    """With autograd on, the blocks take their out-of-place path: same outputs as diffusers, gradients everywhere."""
    ours, ref = twin(cfg)
    x = images(2, 32, 48)
    z = ours.encode_raw(x)
    with torch.no_grad():
        assert rel_err(z, ref.encode(x).latent) <= 1e-4
        latent = torch.randn(2, cfg.latent_channels, 32 // cfg.spatial_factor, 48 // cfg.spatial_factor)
        want = ref.decode(latent).sample
    y = ours.decode_raw(latent)
    assert rel_err(y, want) <= 1e-4
    (y.square().mean() + z.square().mean()).backward()
    missing = [n for n, p in ours.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("winograd", [True, False], ids=["winograd", "direct"])
@pytest.mark.parametrize("shape", [(1, 5, 6, 7, 3), (2, 16, 9, 4, 24)])
def test_upsample_conv_equals_interpolate_then_conv(shape, winograd, monkeypatch):
    """The up blocks' folded 2x2 phase convolution (on CPU as Winograd F(4x4,2x2) up to a kernel size, direct
    beyond) equals nearest 2x upsampling then the 3x3 convolution."""
    from twig_core.dcae_exec.kernels import Run, _upsample_conv

    monkeypatch.setattr(kernels, "_WINOGRAD_UP_MAX", 1 << 40 if winograd else 0)
    b, cin, h, w, cout = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, cin, h, w, generator=g)
    wt, bias = torch.randn(cout, cin, 3, 3, generator=g), torch.randn(cout, generator=g)
    want = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), wt, bias, padding=1)
    run = Run("banded")
    got = _upsample_conv(x, wt, bias, run=run)
    assert got.shape == want.shape and rel_err(got, want) <= 1e-5
    assert set(run.kernels) == {"winograd 2x2" if winograd else "direct 2x2"}
    assert rel_err(_upsample_conv(x, wt, None), want - bias[:, None, None]) <= 1e-5


@pytest.fixture(scope="module")
def sana_pair():
    return twin(DCAE_F32C32_SANA)


def test_sana_parity(sana_pair):
    ours, ref = sana_pair
    with torch.no_grad():
        x = images(1, 64, 64)
        z = ours.encode_raw(x)
        assert z.shape == (1, 32, 2, 2)
        assert rel_err(z, ref.encode(x).latent) <= 1e-4
        latent = torch.randn(1, 32, 2, 2, generator=torch.Generator().manual_seed(2))
        y = ours.decode_raw(latent)
        assert y.shape == (1, 3, 64, 64)
        assert rel_err(y, ref.decode(latent).sample) <= 1e-4


def test_sana_scaling(sana_pair):
    ours, _ = sana_pair
    assert ours.scaling_factor == 0.41407 and ours.spatial_factor == 32
    with torch.no_grad():
        x = images(1, 32, 32)
        torch.testing.assert_close(ours.encode(x), ours.encode_raw(x) * 0.41407)
        z = torch.randn(1, 32, 1, 1)
        torch.testing.assert_close(ours.decode(z), ours.decode_raw(z / 0.41407))


def test_state_dict_names_match_diffusers(sana_pair):
    ours, ref = sana_pair
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)


# ---- config inference --------------------------------------------------------------------------------------


def test_from_state_dict_sana_preset():
    with torch.device("meta"):
        sd = AutoencoderDC(**DCAE_F32C32_SANA.to_dict()).state_dict()
    cfg = DCAEConfig.from_state_dict(sd)
    assert cfg == DCAE_F32C32_SANA
    model = DCAE.from_state_dict(sd)  # meta tensors in, meta tensors out: no allocation
    assert model.config == DCAE_F32C32_SANA


@pytest.mark.parametrize("cfg", [TINY, TINY_MIX, TINY_LOCAL], ids=["sana-like", "mix-like", "local"])
def test_from_state_dict_tiny(cfg):
    ref = diffusers_vae(cfg)
    # The final activation is invisible in the weights, and so is the head dim without a multiscale branch
    # (TINY_MIX); everything else must come back exactly.
    hidden = dict(decoder_conv_act_fn=cfg.decoder_conv_act_fn)
    if cfg is TINY_MIX:
        assert DCAEConfig.from_state_dict(ref.state_dict(), **hidden).attention_head_dim == 32
        hidden["attention_head_dim"] = cfg.attention_head_dim
    assert DCAEConfig.from_state_dict(ref.state_dict(), **hidden) == cfg
    model = DCAE.from_state_dict(ref.state_dict(), **hidden)
    assert not model.training
    with torch.no_grad():
        x = images(1, 16, 16)
        assert rel_err(model.encode_raw(x), ref.encode(x).latent) <= 1e-4


def test_from_diffusers_config():
    assert DCAEConfig.from_diffusers_config(SANA_VAE_CONFIG_JSON) == DCAE_F32C32_SANA
    assert DCAEConfig.from_diffusers_config(TINY_MIX.to_dict()) == TINY_MIX


# ---- tiling --------------------------------------------------------------------------------------------


def _local_tiny():
    torch.manual_seed(0)
    m = DCAE(TINY_LOCAL).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
            if "attn.to_out" in name:
                p.zero_()  # attention is global; without it the network is local (receptive field ~5 latent px)
    return m


def test_tiling_blend_is_exact_for_a_pointwise_map():
    up = torch.nn.Sequential(torch.nn.Conv2d(4, 3, 1), torch.nn.Upsample(scale_factor=8))
    x = torch.randn(2, 4, 37, 23)
    with torch.no_grad():
        full = up(x)
        for tile, overlap in [(8, 2), (16, 4), (10, 9), (36, 0)]:
            torch.testing.assert_close(run_blended(up, x, tile, overlap, 1, 8, 1, 3), full, atol=1e-5, rtol=1e-5)


def _random(cfg, seed=0):
    """Our DC-AE with random weights; norm scales/shifts and BatchNorm statistics perturbed too."""
    torch.manual_seed(seed)
    m = DCAE(cfg).eval()
    with torch.no_grad():
        for name, t in m.state_dict().items():
            if t.ndim == 1 and t.is_floating_point():
                t.add_(0.2 * torch.randn_like(t)) if not name.endswith("running_var") else t.uniform_(0.5, 2.0)
    return m


def _max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("cfg", [TINY, TINY_MIX, TINY_DCAE], ids=["sana-like", "mix-like", "f32"])
def test_exact_tiled_decode_equals_untiled(cfg):
    """Attention runs on the whole latent, the local stages on tiles with their full reach as halo: every tile
    size gives the untiled decode (odd, non-square latent, batch 2, tiles that do not divide it). This is the
    tiled decode of GPUs and of autograd; a CPU decode streams instead (next test)."""
    m = _random(cfg)
    banded = set()
    z = torch.randn(2, cfg.latent_channels, 7, 5)
    with torch.no_grad():
        full = m.decode_raw(z)
        assert full.shape == (2, 3, 7 * cfg.spatial_factor, 5 * cfg.spatial_factor) and full.abs().max() > 0.5
        for tile in (1, 2, 3, 5, 7):
            tiled, run = dcae_exec.decode(m, z, "tiles", tile, raw=True)
            assert run.strategy == "tiles" and run.tile_size == tile
            banded |= run.kernels.get("attention bands", set())
            assert tiled.shape == full.shape
            assert _max_diff(tiled, full) <= 2e-5, tile
    assert banded  # small tiles also split the attention stages' maps into row bands


@pytest.mark.parametrize("cfg", [TINY, TINY_MIX, TINY_DCAE], ids=["sana-like", "mix-like", "f32"])
def test_streamed_decode_equals_plain(cfg):
    """A tiled decode on CPU streams the local stages band by band through all their layers (no tiles, no
    halo): for bands of four rows (the least it uses) and more it equals the layer-by-layer decode; ResBlocks
    and up blocks take their no-recompute paths, the output layers the generic one. (Their streams on bands of
    single rows are covered by test_banded_decode_equals_plain.)"""
    m = _random(cfg)
    z = torch.randn(2, cfg.latent_channels, 7, 5)
    plain = m.decoder(kernels.channels_last(z)).detach()
    assert strategies.decode_plan(m.decoder) is not None
    seen = set()
    with torch.no_grad():
        x, run = dcae_exec.decode(m, z, tile_size=2, raw=True)
        assert x.shape == plain.shape and x.is_contiguous() and _max_diff(x, plain) <= 2e-5
        assert run.strategy == "streamed"
        seen |= set(run.kernels)
        for budget in (1, 40, 300, 2000):
            x, run = dcae_exec.decode(m, z, "streamed", raw=True, band=budget)
            assert x.shape == plain.shape and _max_diff(x, plain) <= 2e-5, budget
            seen |= set(run.kernels)
    assert "resblock stream" in seen
    assert "upsample stream" in seen or not cfg.upsample_block_type == "interpolate"


@pytest.mark.parametrize("cfg", [TINY, TINY_MIX, TINY_DCAE], ids=["sana-like", "mix-like", "f32"])
def test_banded_decode_equals_plain(cfg):
    """The untiled CPU decode runs attention, ResBlocks (conv1 one row ahead of conv2, nothing recomputed) and
    the output layers over row bands, and adds up blocks' shortcuts as their phases are written: for any band
    height it equals the layer-by-layer decode with autograd on (which takes none of those paths)."""
    m = _random(cfg)
    rolled = set()
    z = torch.randn(2, cfg.latent_channels, 7, 5)
    plain = m.decoder(kernels.channels_last(z)).detach()
    with torch.no_grad():
        x, run = dcae_exec.decode(m, z, raw=True)
        assert _max_diff(x, plain) <= 2e-5 and run.strategy == "banded"
        for budget in (1, 40, 300, 2000):
            x, run = dcae_exec.decode(m, z, "banded", raw=True, band=budget)
            assert x.shape == plain.shape and _max_diff(x, plain) <= 2e-5, budget
            rolled |= run.kernels.get("resblock bands", set())
    assert 1 in rolled and max(rolled) > 1  # ResBlocks ran in bands of one row and of several


def test_winograd_conv_equals_direct():
    """The Winograd F(4x4,3x3) path of the ResBlocks' convolutions gives the direct convolution (to fp32
    rounding) for windows whose rows and columns are not multiples of the 4x4 tile, batch 2, with and without
    bias; so does F(4x4,2x2) (the up blocks' phase kernels), with and without zero columns added, whatever
    number of tile rows it takes at a time."""
    torch.manual_seed(0)
    for r in (2, 3):
        for cols, chunk in ((0, 1), (1, 1 << 20)):
            x = torch.randn(2, 24, 11, 9)
            weight = torch.randn(16, 24, r, r) / (r * r * 24) ** 0.5
            want = F.conv2d(F.pad(x, (cols, cols)).double(), weight.double()).permute(0, 2, 3, 1)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(kernels, "_WINOGRAD_MIN_TILES", chunk)
                mp.setattr(kernels, "_WINOGRAD_CHUNK", chunk)
                got = kernels._winograd(kernels.channels_last(x), kernels._winograd_weight(weight), r, cols)
            assert got.shape == want.shape and _max_diff(got.double(), want) <= 1e-5 * want.abs().max().item()
    for b, c, o, r, w in [(2, 24, 16, 7, 10), (1, 40, 40, 16, 32), (2, 8, 12, 1, 1), (1, 16, 16, 5, 4)]:
        x = kernels.channels_last(torch.randn(b, c, r + 2, w))
        weight, bias = torch.randn(o, c, 3, 3) / (9 * c) ** 0.5, torch.randn(o)
        for bb in (bias, None):
            want = F.conv2d(x.double(), weight.double(), None if bb is None else bb.double(), padding=(0, 1))
            got = kernels._conv3x3_rows(x, weight, bb, kernels._winograd_weight(weight))
            assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
            assert _max_diff(got.double(), want) <= 1e-5 * want.abs().max().item(), (b, c, o, r, w)


@pytest.mark.parametrize("cfg", [TINY, TINY_DCAE], ids=["sana-like", "f32"])
def test_banded_decode_with_winograd_resblocks(cfg, monkeypatch):
    """With every ResBlock taking the Winograd path (the real decoder's 128- to 512-channel stages do), the
    banded decode stays within fp32 rounding of the plain one."""
    m = _random(cfg)
    z = torch.randn(2, cfg.latent_channels, 7, 5)
    plain = m.decoder(kernels.channels_last(z)).detach()
    monkeypatch.setattr(kernels, "_WINOGRAD_MIN_CHANNELS", 1)
    used = set()
    with torch.no_grad():
        for budget in (40, 2000):
            x, run = dcae_exec.decode(m, z, "banded", raw=True, band=budget)
            assert _max_diff(x, plain) <= 2e-5 * plain.abs().max().item(), budget
            used |= set(run.kernels)
    assert "winograd 3x3" in used and "direct 3x3" not in used


def test_glumbconv_chunks_match_diffusers(monkeypatch):
    """On CPU a GLUMBConv runs its hidden channels in chunks sized by the map (temporaries about a decode band):
    whatever the chunking, the result is diffusers' GLUMBConv on the same weights."""
    from diffusers.models.autoencoders.autoencoder_dc import GLUMBConv as RefGLUMBConv

    torch.manual_seed(0)
    ref = RefGLUMBConv(48, 48, norm_type="rms_norm").eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    ours = dcae.GLUMBConv(48).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 48, 9, 7)  # 126 pixels, 192 hidden channels
    with torch.no_grad():
        want = ref(x)
    x = kernels.channels_last(x)
    run = kernels.Run("plain")  # on CPU, without autograd
    chunks = []
    for band in (kernels.CPU_BAND, 126 * 100, 126 * 64, 1):
        monkeypatch.setattr(kernels, "CPU_BAND", band)
        chunks.append((kernels.ffn_chunk(x, band), kernels.ffn_chunk(x, band, 192)))
        with torch.no_grad():
            assert _max_diff(kernels.forward(ours, x.clone(), run), want) <= 2e-5 * want.abs().max().item(), band
    # one chunk; 100 channels (two of 96), but 64 where 192 are split (a multiple of 64 dividing them); the floor
    assert chunks == [((1 << 21) // 126,) * 2, (100, 64), (64, 64), (64, 64)]
    assert kernels.ffn_chunk(x, 126 * 100, 200) == 100  # no multiple of 64 divides 200


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", [TINY, TINY_MIX], ids=["sana-like", "mix-like"])
def test_exact_tiled_decode_narrow_weights(cfg, dtype):
    m = _random(cfg).to(dtype)
    m.compute_dtype = torch.float32
    z = torch.randn(1, cfg.latent_channels, 6, 9)
    with torch.no_grad():
        full = m.decode(z)
        for tile in (2, 4):
            assert _max_diff(m.decode(z, tile_size=tile), full) <= 2e-5


def test_exact_tiled_decode_with_batch_statistics():
    """BatchNorm in training mode normalises with statistics over the whole map: those stages join the part
    that runs untiled, and tiling stays exact."""
    m = _random(TINY_MIX).train()
    plan = strategies.decode_plan(m.decoder)
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for t in plan.tail for x in t.modules())
    z = torch.randn(2, 4, 5, 6)
    with torch.no_grad():
        assert _max_diff(m.decode(z, tile_size=2), m.decode(z)) <= 2e-5


def test_decode_plan_of_the_sana_decoder():
    with torch.device("meta"):
        m = DCAE(DCAE_F32C32_SANA).eval()
    plan = strategies.decode_plan(m.decoder)
    # attention in the three lowest-resolution stages, then three ResBlock stages at 1/8, 1/4, 1/2 -> 1
    assert all(isinstance(x, (dcae.EfficientViTBlock, dcae.UpBlock)) for x in plan.head)
    assert sum(isinstance(x, dcae.EfficientViTBlock) for x in plan.head) == 9
    assert plan.scale == 8 and plan.halos[0] == 7 and plan.halos[-1] == 0
    assert not any(isinstance(x, dcae.EfficientViTBlock) for x in plan.tail)


@pytest.mark.parametrize("device", ["cpu", "cuda", "mps"])
@pytest.mark.parametrize("autograd", [False, True], ids=["no-grad", "autograd"])
def test_auto_strategy_per_device_and_grad_mode(device, autograd):
    """"auto": on CPU without autograd an untiled decode runs in bands and a tiled one streams; elsewhere whole
    maps or exact tiles; blended tiles when attention reaches the output; encodes blend their tiles."""
    with torch.device("meta"):
        m = DCAE(TINY).eval()
        blend_only = DCAE(TINY_LOCAL.replace(decoder_block_types=(VIT_BLOCK,) * 3)).eval()
    cpu_no_grad = device == "cpu" and not autograd
    assert dcae_exec.choose("decode", m, "auto", False, device, autograd) == ("banded" if cpu_no_grad else "plain")
    assert dcae_exec.choose("decode", m, "auto", True, device, autograd) == ("streamed" if cpu_no_grad else "tiles")
    assert dcae_exec.choose("decode", blend_only, "auto", True, device, autograd) == "blended"
    assert dcae_exec.choose("decode", blend_only, "auto", False, device, autograd) == ("banded" if cpu_no_grad else "plain")
    assert dcae_exec.choose("encode", m, "auto", False, device, autograd) == "plain"
    assert dcae_exec.choose("encode", m, "auto", True, device, autograd) == "blended"
    if autograd:
        with pytest.raises(TwigError, match="without autograd"):
            dcae_exec.choose("decode", m, "banded", False, device, autograd)
    with pytest.raises(TwigError, match="needs a tile_size"):
        dcae_exec.choose("decode", m, "tiles", False, device, autograd)
    with pytest.raises(TwigError, match="use 'blended'"):
        dcae_exec.choose("decode", blend_only, "tiles", True, device, autograd)
    with pytest.raises(TwigError, match="unknown strategy"):
        dcae_exec.choose("encode", m, "banded", False, device, autograd)


def test_auto_strategy_as_run():
    m = _random(TINY)
    z = torch.randn(1, 4, 3, 2, requires_grad=True)
    assert dcae_exec.decode(m, z)[1].strategy == "plain"
    assert dcae_exec.decode(m, z, tile_size=1)[1].strategy == "tiles"
    with torch.no_grad():
        assert dcae_exec.decode(m, z)[1].strategy == "banded"
        assert dcae_exec.decode(m, z, tile_size=1)[1].strategy == "streamed"
        assert dcae_exec.decode(m, z, "plain", 1)[1].strategy == "plain"


@pytest.mark.parametrize("device,retries", [("cpu", [20, 10, 5]), ("meta", [20, 10])], ids=["cpu", "other"])
def test_out_of_memory_retries_halve_tiles_down_to_the_floor(device, retries, monkeypatch, caplog):
    """Running out of memory retries with halved tiles down to a floor of 4 latent px on CPU and 8 on any other
    device (here the meta device); the Run reports the retries, and past the floor the error says what to do."""
    with torch.device(device):
        m = DCAE(TINY).eval()
        z = torch.randn(1, 4, 40, 24)  # untiled at first ("auto": at most 32x32 latent px)
    tried, fits = [], [retries[-1]]

    def short_of_memory(vae, x, run):
        tried.append(run.tile_size)
        if run.tile_size is None or run.tile_size > fits[0]:
            raise torch.OutOfMemoryError("out of memory (simulated)")
        return x.new_zeros(1, 3, 320, 192)

    monkeypatch.setattr(dcae_exec, "DECODE_STRATEGIES", {k: short_of_memory for k in dcae_exec.DECODE_STRATEGIES})
    with torch.no_grad(), caplog.at_level("WARNING", logger="twig"):
        out, run = dcae_exec.decode(m, z, tile_size="auto", label="Twig VAE Decode")
        assert out.shape == (1, 3, 320, 192) and tried == [None] + retries
        assert run.retries == retries and run.tile_size == retries[-1]
        assert run.strategy == ("streamed" if device == "cpu" else "tiles")
        assert f"Twig VAE Decode ran out of memory; retrying with tiles of {retries[-1]} latent px" in caplog.text
        tried.clear()
        fits[0] = 0
        with pytest.raises(TwigError, match="out of memory even with the smallest tiles; lower the batch size"):
            dcae_exec.decode(m, z, tile_size="auto")
        assert tried == [None] + retries  # nothing below the floor
        with pytest.raises(torch.OutOfMemoryError):
            dcae_exec.decode(m, z, retry=False)


@pytest.mark.parametrize("cfg", [TINY, TINY_MIX], ids=["sana-like", "mix-like"])
def test_exact_tiled_decode_needs_its_whole_halo(cfg):
    """The halo is the local part's reach, not more than needed: one pixel less changes the result by far more
    than the tolerance of the tests above."""
    m = _random(cfg)
    z = torch.randn(2, 4, 7, 5)
    plan = strategies.decode_plan(m.decoder)
    plan.halos[0] -= 1
    with torch.no_grad():
        full = m.decode_raw(z)
        run = kernels.Run("tiles", tile_size=2)
        assert _max_diff(strategies.decode_tiled(m.decoder, kernels.channels_last(z), run, plan), full) > 2e-4


def test_tiled_decode_blends_when_attention_reaches_the_output():
    """Attention in the highest-resolution stage leaves nothing local to tile: tiles are blended instead."""
    cfg = TINY_LOCAL.replace(decoder_block_types=(VIT_BLOCK,) * 3)
    torch.manual_seed(0)
    m = DCAE(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "decoder" in name and "attn.to_out" in name:
                p.zero_()  # without its attention the network is local, so blending can match untiled
    assert strategies.decode_plan(m.decoder) is None
    z = torch.randn(2, 4, 56, 40)  # 3 x 2 tiles of 32 with overlap 20 (its middle half is the blend ramp)
    with torch.no_grad():
        full = m.decode(z)
        tiled, run = dcae_exec.decode(m, z, tile_size=32, overlap=20)
    assert run.strategy == "blended" and (run.tile_size, run.overlap) == (32, 20)
    assert tiled.shape == full.shape == (2, 3, 224, 160)
    assert rel_err(tiled, full) <= 1e-2


def test_tiled_encode_matches_untiled():
    m = _local_tiny()
    x = images(2, 224, 160)
    with torch.no_grad():
        full = m.encode(x)
        tiled = m.encode(x, tile_size=128, overlap=80)  # pixels, multiples of the spatial factor (4)
    assert tiled.shape == full.shape == (2, 4, 56, 40)
    assert rel_err(tiled, full) <= 1e-2


def test_tiled_decode_backprop():
    m = _random(TINY)
    z = torch.randn(1, 4, 7, 6, requires_grad=True)
    m.decode(z).square().mean().backward()
    want = z.grad.clone()
    m.zero_grad()
    z.grad = None
    m.decode(z, tile_size=3).square().mean().backward()
    torch.testing.assert_close(z.grad, want, atol=1e-6, rtol=1e-4)  # exact tiling: the same gradients
    assert m.decoder.conv_in.weight.grad is not None


def test_auto_tile_size():
    assert auto_tile_size(32, 32) is None
    assert auto_tile_size(64, 64) == 32
    assert auto_tile_size(24, 48) == 32  # more than 32*32 latent pixels
    m = _local_tiny()
    with torch.no_grad():
        z = torch.randn(1, 4, 8, 8)
        torch.testing.assert_close(m.decode(z, tile_size="auto"), m.decode(z))


def test_dtype_in_dtype_out():
    m = _local_tiny().to(torch.bfloat16)
    x = images(1, 32, 32)
    with torch.no_grad():
        z = m.encode(x)
        y = m.decode(z)
    assert z.dtype == torch.float32 and y.dtype == torch.float32
    ref = _local_tiny().encode(x).detach()
    assert rel_err(z, ref) < 0.1


# ---- errors --------------------------------------------------------------------------------------------


def test_bad_inputs():
    m = DCAE(TINY).eval()  # spatial factor 8, latent channels 4
    with pytest.raises(TwigError, match="multiple of 8"):
        m.encode(images(1, 36, 32))
    with pytest.raises(TwigError, match="4 channels, expected 3"):
        m.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(TwigError, match=r"\[B,3,H,W\]"):
        m.encode(torch.zeros(3, 32, 32))
    with pytest.raises(TwigError, match="32 channels, expected 4"):
        m.decode(torch.zeros(1, 32, 4, 4))
    with pytest.raises(TwigError, match="latent must be"):
        m.decode(torch.zeros(4, 4, 4))
    with pytest.raises(TwigError, match="not a multiple of 8"):
        m.encode(images(1, 64, 64), tile_size=36)
    with pytest.raises(TwigError, match="overlap"):
        m.decode(torch.zeros(1, 4, 8, 8), tile_size=4, overlap=4)
    with pytest.raises(TwigError, match="tile_size"):
        m.decode(torch.zeros(1, 4, 8, 8), tile_size=0)


def test_bad_configs_and_state_dicts():
    with pytest.raises(TwigError, match="encoder_layers_per_block"):
        TINY.replace(encoder_layers_per_block=(1, 1, 1))
    with pytest.raises(TwigError, match="block type"):
        TINY.replace(decoder_block_types=("ResBlock", "ResBlock", "Transformer", "ResBlock"))
    with pytest.raises(TwigError, match="encoder.' and 'decoder"):
        DCAEConfig.from_state_dict({"x_embedder.weight": torch.zeros(1)})
    sd = diffusers_vae(TINY).state_dict()
    del sd["encoder.conv_out.weight"]
    with pytest.raises(TwigError, match="encoder.conv_out.weight"):
        DCAEConfig.from_state_dict(sd)
