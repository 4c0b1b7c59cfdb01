"""The transformer's operations namespace (what a host's own layer classes plug into), and the native ComfyUI
glue (nodes/native.py) where it can be checked without ComfyUI installed."""

import types

import pytest
import torch

from tests.test_transformer import TINY, inputs
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

    x, t, ctx, mask = inputs(cfg)
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
