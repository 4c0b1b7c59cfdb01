"""Transformer parity with diffusers' SanaTransformer2DModel on identical random weights (fp32, CPU)."""

import pytest
import torch

from tests.builders import transformer_inputs
from diffusers import SanaTransformer2DModel

from twig_core.config import SANA_1600M, SANA_600M, TransformerConfig
from twig_core.errors import TwigError
from twig_core.keymap import diffusers_to_ours, ours_to_diffusers
from twig_core.transformer import TwigTransformer


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def diffusers_model(cfg: TransformerConfig, seed=0):
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in cfg.to_diffusers_config().items() if not k.startswith("_")}
    model = SanaTransformer2DModel(**kwargs).eval()
    # randomise every parameter (diffusers zero-initialises some) so each path is exercised
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return model


def ours_from(model, cfg):
    ours = TwigTransformer(cfg).eval()
    ours.load_state_dict(diffusers_to_ours(model.state_dict()), strict=True)
    return ours


TINY = TransformerConfig(in_channels=8, out_channels=8, width=64, depth=2, heads=4, cross_heads=2,
                         caption_channels=48, sample_size=8)


@pytest.mark.parametrize(
    "cfg",
    [
        TINY,
        TINY.replace(patch_size=2),
        TINY.replace(qk_norm=True),
        TINY.replace(pos_embed=True, pos_interpolation_scale=0.5, sample_size=4),
        TINY.replace(qkv_bias=True),
    ],
    ids=["plain", "patch2", "qknorm", "posembed", "qkvbias"],
)
def test_tiny_parity(cfg):
    ref = diffusers_model(cfg)
    ours = ours_from(ref, cfg)
    x, t, ctx, mask = transformer_inputs(cfg)
    with torch.no_grad():
        want = ref(x, ctx, t, encoder_attention_mask=mask).sample
        got = ours(x, t, ctx, mask)
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-4


def test_caption_cache_equals_direct_call():
    ref = diffusers_model(TINY)
    ours = ours_from(ref, TINY)
    x, t, ctx, mask = transformer_inputs(TINY)
    with torch.no_grad():
        direct = ours(x, t, ctx, mask)
        cache = ours.encode_caption(ctx, mask)
        cached = ours(x, t, cache)
        lazy = ours.encode_caption(ctx, mask, keep_kv=False)
        per_step = ours(x, t, lazy)
    assert torch.equal(direct, cached) and torch.equal(direct, per_step)
    assert cache.kv is not None and lazy.kv is None and lazy.batch == cache.batch == 2
    ours.half().compute_dtype = torch.float32  # narrow weights: keys/values are not kept by default
    assert ours.encode_caption(ctx, mask).kv is None


def test_padding_every_prompt_shares_is_cut_off():
    """Positions masked in every row at the end (a short prompt padded to 300 tokens) are dropped before the
    caption's projection; diffusers attends over all of them (at zero weight): the same prediction."""
    ref = diffusers_model(TINY)
    ours = ours_from(ref, TINY)
    x, t, ctx, mask = transformer_inputs(TINY, n=40)
    mask[:, 12:] = 0  # both prompts end by token 12; row 0 by token 7
    ctx[:, 12:] = 1e3 * torch.randn_like(ctx[:, 12:])  # whatever the padding holds
    with torch.no_grad():
        want = ref(x, ctx, t, encoder_attention_mask=mask).sample
        got = ours(x, t, ctx, mask)
        cache = ours.encode_caption(ctx, mask)
    assert rel_err(got, want) <= 1e-4
    assert cache.kv[0][0].shape[2] == 12 and cache.bias.shape[-1] == 12
    full = torch.ones_like(mask)
    full[0, 7:] = 0
    with torch.no_grad():
        assert ours.encode_caption(ctx, full).kv[0][0].shape[2] == 40  # row 1 keeps every token: nothing cut


def test_full_width_layer_parity():
    """One block of the real 1600M width (2240, 70 heads x 32, cross 20 x 112, Mix-FFN 5600)."""
    cfg = SANA_1600M.replace(depth=1)
    ref = diffusers_model(cfg)
    ours = ours_from(ref, cfg)
    x, t, ctx, mask = transformer_inputs(cfg, h=8, w=8, n=10)  # 128 token rows: the oneDNN route of ``dense``
    with torch.no_grad():
        want = ref(x, ctx, t, encoder_attention_mask=mask).sample
        got = ours(x, t, ctx, mask)
    assert rel_err(got, want) <= 1e-4


def test_key_table_round_trip_is_lossless():
    ref = diffusers_model(TINY.replace(qk_norm=True))
    sd = ref.state_dict()
    back = ours_to_diffusers(diffusers_to_ours(sd))
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_presets_have_the_published_sizes():
    def count(cfg):
        with torch.device("meta"):
            return sum(p.numel() for p in TwigTransformer(cfg).parameters())

    assert 1.55e9 < count(SANA_1600M) < 1.65e9
    assert 0.55e9 < count(SANA_600M) < 0.65e9
    assert SANA_1600M.head_dim == 32 and SANA_1600M.cross_head_dim == 112 and SANA_1600M.mlp_hidden == 5600


def test_bad_inputs_raise_clear_errors():
    model = TwigTransformer(TINY).eval()
    x, t, ctx, mask = transformer_inputs(TINY)
    with pytest.raises(TwigError, match="channels"):
        model(x[:, :3], t, ctx, mask)
    with pytest.raises(TwigError, match="caption embeddings"):
        model(x, t, ctx[..., :10], mask)
    with pytest.raises(TwigError, match="hides every token"):
        model(x, t, ctx, torch.zeros_like(mask))


@pytest.mark.parametrize("route", ["linear", "conv"])
def test_sampling_and_training_paths_agree_with_diffusers(monkeypatch, route):
    """Both matmul routes of ``dense`` (F.linear, 1x1 convolution) and both block paths (in-place when no
    gradient is wanted, out-of-place for training) give diffusers' output; gradients reach every weight."""
    import twig_core.ops as tr

    if route == "conv":
        monkeypatch.setattr(tr, "_CONV_ROUTE_MIN", 0)
        monkeypatch.setattr(tr, "_CONV_ROUTE_MIN_ROWS", 1)
        monkeypatch.setattr(tr, "_CONV_ROUTE", True)
    cfg = TINY.replace(qk_norm=False)
    ref = diffusers_model(cfg)
    ours = ours_from(ref, cfg)
    x, t, ctx, mask = transformer_inputs(cfg)
    with torch.no_grad():
        want = ref(x, ctx, t, encoder_attention_mask=mask).sample
        sampled = ours(x, t, ctx, mask)
    trained = ours(x, t, ctx, mask)
    assert rel_err(sampled, want) <= 1e-4 and rel_err(trained, want) <= 1e-4
    trained.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in ours.named_parameters()), \
        [n for n, p in ours.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]


@pytest.mark.parametrize("conv_route", [True, False])
def test_dense_routes_agree(monkeypatch, conv_route):
    import twig_core.ops as tr
    from twig_core.ops import dense

    monkeypatch.setattr(tr, "_CONV_ROUTE", conv_route)  # on AVX-512 CPUs, else F.linear throughout

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 100, 96, generator=g)
    w, b = torch.randn(200, 96, generator=g), torch.randn(200, generator=g)
    want = torch.nn.functional.linear(x, w, b)
    got = dense(x, w, b)  # 300 rows x 96 x 200 is over the threshold: the 1x1 convolution route where taken
    assert got.shape == want.shape and got.is_contiguous()
    assert rel_err(got, want) <= 1e-5
    assert rel_err(dense(x, w.half()), torch.nn.functional.linear(x, w.half().float())) <= 1e-5
    assert torch.equal(dense(x[:1, :2], w, b), torch.nn.functional.linear(x[:1, :2], w, b))  # 2 rows: F.linear
