"""Does ``torch.compile`` pay for the transformer? One CFG step (batch 2) eager against the same model with each
block's forward compiled (inductor), per precision, on this machine's device.

    python bench/bench_compile.py --layers 2 --size 1024 [--device cuda] [--dtypes fp32 int8 bf16]

Prints, per precision: the eager step, the compiled step (after its compilation, whose time is printed too),
their ratio and the compiled step's relative difference from the eager one. When inductor cannot run here (no
C compiler for the CPU backend, no Triton for CUDA) the row says why. Twig does not compile by default: the
result for this machine is in bench/RESULTS.md ("torch.compile").
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from twig_core.config import SANA_1600M  # noqa: E402
from twig_core.transformer import TwigTransformer  # noqa: E402


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def row(dtype: str, layers: int, size: int, device: str, repeats: int) -> str:
    torch.manual_seed(0)
    cfg = SANA_1600M.replace(depth=layers)
    compute = {"fp32": torch.float32, "int8": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    model = TwigTransformer(cfg).eval().to(device, compute)
    if dtype == "int8":
        from twig_core import int8

        if device != "cpu" or int8.engine() is None:
            return f"  {dtype:5s} skipped: int8 products run on CPUs with torch's quantized engine only"
        int8.enable(model)
    lat = size // 32
    x = torch.randn(2, cfg.in_channels, lat, lat, device=device, dtype=compute)
    ctx = torch.randn(2, 300, cfg.caption_channels, device=device, dtype=compute)
    t = torch.full((2,), 500.0, device=device)
    with torch.inference_mode():
        cache = model.encode_caption(ctx, torch.ones(2, 300, dtype=torch.long, device=device))
        ref = model(x, t, cache).float()
        eager = best_of(lambda: model(x, t, cache), repeats)
        for block in model.blocks:
            block.forward = torch.compile(block.forward, dynamic=False)
        start = time.perf_counter()
        try:
            out = model(x, t, cache).float()
        except Exception as e:  # noqa: BLE001 - inductor's failures (no compiler, no Triton) take many types
            return f"  {dtype:5s} eager {eager:7.2f}s  compiled: unavailable here ({type(e).__name__}: {str(e)[:80]})"
        first = time.perf_counter() - start
        compiled = best_of(lambda: model(x, t, cache), repeats)
    err = float((out - ref).norm() / ref.norm())
    return (f"  {dtype:5s} eager {eager:7.2f}s  compiled {compiled:7.2f}s  ratio {compiled / eager:.3f}  "
            f"first compiled step {first:6.1f}s  rel. diff {err:.1e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8", "bf16", "fp16"])
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    print(f"torch.compile vs eager, transformer CFG step (batch 2), 1600M width, {a.layers}/20 layers, {a.size}², "
          f"{a.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    for dtype in a.dtypes:
        print(row(dtype, a.layers, a.size, a.device, a.repeats), flush=True)


if __name__ == "__main__":
    main()
