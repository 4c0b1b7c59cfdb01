"""Device and dtype choices (twig_core.devices): the names, what "auto" gives each network, the Gemma-2 fp16 rule,
weight-dtype arguments and the seed range, the same for the command line, the nodes and the tab."""

from __future__ import annotations

import types

import pytest
import torch

from twig_core import devices
from twig_core.errors import TwigError


def test_resolve_dtype():
    assert devices.resolve_dtype(None) is None
    assert devices.resolve_dtype("fp16") == torch.float16
    assert devices.resolve_dtype("bf16") == torch.bfloat16
    assert devices.resolve_dtype("auto", "cpu") == torch.float32
    assert devices.resolve_dtype(torch.float64) == torch.float64
    with pytest.raises(TwigError, match="unknown dtype"):
        devices.resolve_dtype("int4")
    assert devices.resolve_dtype("float16") == devices.resolve_dtype("half") == torch.float16
    with pytest.raises(TwigError, match="unknown role"):
        devices.resolve_dtype("auto", "cpu", role="unet")


@pytest.mark.parametrize("bf16", [True, False])
def test_auto_dtype_per_network(monkeypatch, bf16):
    monkeypatch.setattr(devices, "cuda_bf16", lambda *_: bf16)
    half = torch.bfloat16 if bf16 else torch.float16
    want = {  # role: (cuda, mps, cpu)
        None: (half, torch.float32, torch.float32),
        "diffusion": (half, torch.float16, torch.float32),
        "tipo": (half, torch.float16, torch.float32),
        "vae": (torch.bfloat16 if bf16 else torch.float32, torch.float32, torch.float32),
        # Gemma-2 overflows in fp16: auto never picks it
        "text": (torch.bfloat16 if bf16 else torch.float32, torch.float32, torch.float32),
    }
    for role, per_device in want.items():
        got = tuple(devices.resolve_dtype("auto", d, role) for d in ("cuda", "mps", "cpu"))
        assert got == per_device, role
    # a named choice is that dtype for every network
    assert {devices.resolve_dtype("fp16", "cuda", r) for r in devices.ROLES} == {torch.float16}


def test_text_encoder_never_runs_in_fp16(monkeypatch):
    monkeypatch.setattr(devices, "cuda_bf16", lambda *_: True)
    assert devices.text_dtype(torch.float16, "cuda") == torch.bfloat16
    assert devices.text_dtype(torch.float16, "cpu") == torch.float32
    monkeypatch.setattr(devices, "cuda_bf16", lambda *_: False)
    assert devices.text_dtype(torch.float16, "cuda") == torch.float32
    for dt in (torch.float32, torch.bfloat16, None):
        assert devices.text_dtype(dt, "cuda") is dt


def test_weight_dtype_kwargs():
    assert devices.weight_dtype_kwargs("same", torch.float32) == {"dtype": torch.float32}
    assert devices.weight_dtype_kwargs(None, None) == {"dtype": None}
    assert devices.weight_dtype_kwargs("fp16", torch.float32) == {"dtype": torch.float16, "compute_dtype": torch.float32}
    assert devices.weight_dtype_kwargs("stored", None, "cpu") == {"dtype": None, "compute_dtype": torch.float32}
    assert devices.weight_dtype_kwargs("stored", None, "cuda") == {"dtype": None, "compute_dtype": None}
    with pytest.raises(TwigError, match="weight_dtype 'fp8'"):
        devices.weight_dtype_kwargs("fp8", torch.float32)


def test_pick_device():
    assert devices.pick_device("cpu") == torch.device("cpu")
    assert devices.pick_device("cuda:1") == torch.device("cuda", 1)
    assert devices.pick_device("auto") == devices.pick_device(None) == devices.default_device()
    with pytest.raises(TwigError, match="unknown device 'gpu0'"):
        devices.pick_device("gpu0")


def test_every_front_end_offers_the_same_choices_and_seed_range():
    import argparse

    from nodes import face, loaders, sampling, tipo
    from twig_core.__main__ import _parser

    assert devices.MAX_SEED == 2**64 - 1
    for node, field in ((sampling.TwigSampler, "seed"), (face.TwigFaceRefine, "seed"), (tipo.TwigTIPO, "seed")):
        assert node.INPUT_TYPES()["required"][field][1]["max"] == devices.MAX_SEED
    for node in (loaders.TwigModelLoader, loaders.TwigTextEncoderLoader, loaders.TwigVAELoader, tipo.TwigTIPO):
        assert node.INPUT_TYPES()["required"]["dtype"][0] == list(devices.DTYPE_CHOICES)
    assert loaders.TwigModelLoader.INPUT_TYPES()["optional"]["weight_dtype"][0] == list(devices.WEIGHT_DTYPE_CHOICES)
    generate = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["generate"]
    options = {a.dest: a for a in generate._actions}
    assert tuple(options["dtype"].choices) == devices.DTYPE_CHOICES
    assert tuple(options["weight_dtype"].choices) == devices.WEIGHT_DTYPE_CHOICES


def test_node_dtype_choice_asks_comfyui_only_for_auto(monkeypatch):
    from nodes import host

    for role in ("diffusion", "vae", "text", "tipo"):
        assert host.pick_dtype("auto", torch.device("cpu"), role) == devices.resolve_dtype("auto", "cpu", role)
    mm = types.SimpleNamespace(unet_dtype=lambda device, supported_dtypes, model_params=0: torch.float16,
                               vae_dtype=lambda device, allowed_dtypes: torch.bfloat16)
    monkeypatch.setattr(host, "model_management", lambda: mm)
    assert host.pick_dtype("auto", torch.device("cpu"), "diffusion") == torch.float16
    assert host.pick_dtype("auto", torch.device("cpu"), "vae") == torch.bfloat16
    assert host.pick_dtype("auto", torch.device("cpu"), "text") == torch.float32
    assert host.pick_dtype("fp32", torch.device("cpu"), "diffusion") == torch.float32
