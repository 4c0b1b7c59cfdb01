"""The transformer's blocks compiled with torch's inductor, where that pays: sampling on a CPU in bf16.

There the matrix products run at the AMX/AVX512-BF16 rate and the elementwise work between them (norms,
modulation, SiLU, the linear attention's copies) takes a large share of a step; inductor fuses it. Each call of
:func:`run_block` decides: the compiled block when every condition holds, else the plain module:

- no autograd (sampling; training and the tests' gradient checks stay eager),
- a CPU tensor in bf16 (fp32 is bound by its products; int8 runs packed kernels inductor cannot fuse),
- at least ``MIN_TOKENS`` image tokens (a 1024² picture; under that the compilation costs more than it saves),
- the transformer's own layers (``twig_core.ops``; a host's cast layers, as ComfyUI's, have their own compiler),
- a C++ compiler on the PATH (inductor's CPU backend builds C++), and ``TWIG_COMPILE`` is not ``off``.

One compiled function serves every block (the block is an argument; its weights are graph inputs, so LoRA
strengths and casts are seen as they change). The first compiled step takes a few seconds more (compilation;
inductor keeps the result in its on-disk cache for later processes). Caption length, batch and picture size each
compile once more when they first change; past torch's recompile limit the blocks run as plain modules.
When compilation fails (no usable compiler, an inductor error), a warning says so once and every block runs
eagerly from then on: compilation fails before the block runs, so nothing is computed twice.
Error: inductor reorders and fuses bf16 arithmetic, so a compiled step differs from the eager one by bf16's
rounding; it keeps ``balanced``'s stated bound against fp32 (``twig_core.presets``; tests/test_compiled.py).
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings

import torch

from . import ops

MIN_TOKENS = 1024
ENV = "TWIG_COMPILE"  # "off" turns compilation off; anything else (or unset) leaves it to the rules above

_failed = False


@functools.cache
def available() -> bool:
    """Whether this process can compile blocks at all: inductor, and the C++ compiler its CPU backend calls on the
    PATH."""
    try:
        from torch._inductor import config
    except ImportError:  # a torch build without inductor
        return False
    cxx = config.cpp.cxx[-1] if isinstance(config.cpp.cxx, tuple) else config.cpp.cxx
    return bool(cxx) and shutil.which(cxx) is not None


def wanted(block: torch.nn.Module, tokens: torch.Tensor) -> bool:
    """Whether ``block`` over ``tokens`` ([b, n, d]) runs compiled (the rules in the module's docstring)."""
    return (not _failed and not torch.is_grad_enabled() and tokens.device.type == "cpu"
            and tokens.dtype == torch.bfloat16 and tokens.shape[1] >= MIN_TOKENS
            and block.attn._weights is ops.weights and os.environ.get(ENV, "").lower() != "off" and available())


@functools.cache
def _compiled_forward():
    from .transformer import Block

    return torch.compile(Block.forward)


def _compile_failure(e: BaseException) -> bool:
    """Whether ``e`` is inductor or dynamo failing to compile (as opposed to an error of the computation)."""
    from torch._dynamo.exc import BackendCompilerFailed

    try:
        from torch._inductor.exc import InductorError
    except ImportError:  # older torch
        InductorError = BackendCompilerFailed
    return isinstance(e, (BackendCompilerFailed, InductorError))


def run_block(block: torch.nn.Module, tokens: torch.Tensor, *args) -> torch.Tensor:
    """``block(tokens, *args)``, compiled where :func:`wanted` says it pays."""
    global _failed
    if wanted(block, tokens):
        try:
            return _compiled_forward()(block, tokens, *args)
        except Exception as e:  # noqa: BLE001 - only compilation failures are caught; the rest re-raised below
            if not _compile_failure(e):
                raise
            _failed = True
            first_line = (str(e).strip().splitlines() or [""])[0][:200]
            warnings.warn(f"the transformer runs uncompiled: inductor could not compile it ({type(e).__name__}: "
                          f"{first_line})", stacklevel=2)
    return block(tokens, *args)
