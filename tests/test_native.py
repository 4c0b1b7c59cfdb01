"""The transformer's operations namespace (what a host's own layer classes plug into), and the native ComfyUI
glue (nodes/native.py) where it can be checked without ComfyUI installed."""

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
