"""The transformer's blocks compiled with inductor (twig_core.compiled): when they are, that the compiled step
matches the eager one within the stated bound, and that a failed compilation falls back to eager once."""

from __future__ import annotations

import types

import pytest
import torch

from twig_core import compiled
from twig_core.presets import STEP_ERROR

from tests.builders import tiny_transformer

GRID = 32  # 32 x 32 latent = 1024 tokens, the least that compiles


def _inputs(model, b=2, grid=GRID, caption=12):
    """(latent, timesteps, caption cache) in ``model``'s dtype; the same values (bf16-representable) for any."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 32, grid, grid, generator=g).bfloat16().to(model.dtype)
    ctx = torch.randn(b, caption, model.config.caption_channels, generator=g).bfloat16().to(model.dtype)
    t = torch.full((b,), 700.0)
    return x, t, model.encode_caption(ctx, torch.ones(b, caption, dtype=torch.long))


def _model():
    return tiny_transformer(3).to(torch.bfloat16)


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(compiled, "_failed", False)
    monkeypatch.delenv(compiled.ENV, raising=False)


def test_rules_pick_cpu_bf16_sampling_of_large_pictures_only(monkeypatch):
    monkeypatch.setattr(compiled, "available", lambda: True)
    block = _model().blocks[0]
    tokens = torch.zeros(2, GRID * GRID, _model().config.width, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert compiled.wanted(block, tokens)
        assert not compiled.wanted(block, tokens.float())  # fp32: bound by its products
        assert not compiled.wanted(block, tokens[:, : compiled.MIN_TOKENS - 1])  # too small to pay
        monkeypatch.setenv(compiled.ENV, "off")
        assert not compiled.wanted(block, tokens)
        monkeypatch.delenv(compiled.ENV)
        host = types.SimpleNamespace(attn=types.SimpleNamespace(_weights=lambda layer, x: None))
        assert not compiled.wanted(host, tokens)  # a host's layers: left to the host
    with torch.enable_grad():
        assert not compiled.wanted(block, tokens)  # training and gradient checks stay eager
    monkeypatch.setattr(compiled, "available", lambda: False)
    with torch.inference_mode():
        assert not compiled.wanted(block, tokens)  # no C++ compiler


def test_available_needs_the_compiler_inductor_calls(monkeypatch):
    compiled.available.cache_clear()
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    try:
        assert not compiled.available()
    finally:
        compiled.available.cache_clear()


@pytest.mark.skipif(not compiled.available(), reason="no C++ compiler for inductor's CPU backend")
def test_compiled_step_keeps_the_balanced_bound(monkeypatch):
    """Compiled against eager bf16, and against fp32 as the preset's bound is stated (our fp32 is diffusers' fp32
    to 1e-5, tests/test_transformer.py)."""
    torch._dynamo.reset()
    full = tiny_transformer(3)
    model = _model()
    x, t, cache = _inputs(model)
    calls = []
    real = compiled._compiled_forward()
    monkeypatch.setattr(compiled, "_compiled_forward", lambda: lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode():
        reference = full(*_inputs(full))
        monkeypatch.setenv(compiled.ENV, "off")
        eager = model(x, t, cache).float()
        assert not calls
        monkeypatch.delenv(compiled.ENV)
        out = model(x, t, cache).float()
        again = model(x, t, cache).float()
    assert len(calls) == 2 * len(model.blocks)
    assert torch.equal(out, again)
    assert not compiled._failed

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    assert rel(out, eager) < STEP_ERROR["balanced"] / 2
    assert rel(out, reference) < STEP_ERROR["balanced"], (rel(out, reference), rel(eager, reference))


def test_compilation_failure_warns_once_and_runs_eager(monkeypatch):
    from torch._dynamo.exc import BackendCompilerFailed

    monkeypatch.setattr(compiled, "available", lambda: True)
    attempts = []

    def failing(*args):
        attempts.append(1)
        raise BackendCompilerFailed(lambda *a: None, RuntimeError("C++ compile error: cannot find g++"), None)

    monkeypatch.setattr(compiled, "_compiled_forward", lambda: failing)
    model = _model()
    x, t, cache = _inputs(model)
    with torch.inference_mode():
        monkeypatch.setenv(compiled.ENV, "off")
        eager = model(x, t, cache)
        monkeypatch.delenv(compiled.ENV)
        with pytest.warns(UserWarning, match="runs uncompiled.*BackendCompilerFailed"):
            out = model(x, t, cache)
        again = model(x, t, cache)
    assert attempts == [1]  # tried once, then every block eager for the rest of the process
    assert torch.equal(out, eager) and torch.equal(again, eager)


def test_errors_of_the_computation_are_not_taken_for_compile_failures(monkeypatch):
    monkeypatch.setattr(compiled, "available", lambda: True)

    def broken(*args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(compiled, "_compiled_forward", lambda: broken)
    model = _model()
    x, t, cache = _inputs(model)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="out of memory"):
        model(x, t, cache)
    assert not compiled._failed
