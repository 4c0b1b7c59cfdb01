"""DC-AE parity with diffusers' AutoencoderDC on identical random weights (fp32, CPU), tiling, config inference."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderDC

from twig_core.dcae import (
    DCAE,
    DCAE_F32C32_SANA,
    RES_BLOCK,
    VIT_BLOCK,
    DCAEConfig,
    _run_tiled,
    auto_tile_size,
)
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


@pytest.mark.parametrize("shape", [(1, 5, 6, 7, 3), (2, 16, 9, 4, 24)])
def test_upsample_conv_equals_interpolate_then_conv(shape):
    from twig_core.dcae import _upsample_conv

    b, cin, h, w, cout = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, cin, h, w, generator=g)
    wt, bias = torch.randn(cout, cin, 3, 3, generator=g), torch.randn(cout, generator=g)
    want = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), wt, bias, padding=1)
    got = _upsample_conv(x, wt, bias)
    assert got.shape == want.shape and rel_err(got, want) <= 1e-5
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
            torch.testing.assert_close(_run_tiled(up, x, tile, overlap, 1, 8, 1, 3), full, atol=1e-5, rtol=1e-5)


def test_tiled_decode_matches_untiled():
    m = _local_tiny()
    z = torch.randn(2, 4, 56, 40)  # 3 x 2 tiles of 32 with overlap 20 (its middle half is the blend ramp)
    with torch.no_grad():
        full = m.decode(z)
        tiled = m.decode(z, tile_size=32, overlap=20)
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
    m = _local_tiny()
    z = torch.randn(1, 4, 20, 20, requires_grad=True)
    m.decode(z, tile_size=12).square().mean().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
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
