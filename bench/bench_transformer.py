"""One CFG step (batch 2) of the full-width 1600M transformer: twig_core vs diffusers, side by side.

Each implementation runs in its own subprocess (so peak RSS is its own) on identical random weights,
and the parent prints both times, their ratio, and the fraction of the machine's measured sgemm bound.
Fewer layers than 20 may be used for speed (--layers); the ratio is per layer, and the result says so.

    python bench/bench_transformer.py --layers 2 --size 1024
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.common import peak_rss_mib  # noqa: E402
from twig_core.config import SANA_1600M  # noqa: E402


def flops_per_step(cfg, tokens: int, caption: int, batch: int = 2) -> float:
    d, h = cfg.width, cfg.mlp_hidden
    per_token = 2 * (6 * d * d + 3 * d * h) + 4 * caption * d + 4 * d * cfg.head_dim  # matmuls + attention
    return per_token * tokens * batch * cfg.depth


def gemm_gflops(n_threads: int) -> dict[str, float]:
    """fp32 GEMM throughput of this machine on the step's biggest product (2048 x 2240 x 11200), two ways:
    the BLAS sgemm behind torch.mm, and oneDNN (reached through a 1x1 convolution, as twig_core does)."""
    import torch.nn.functional as F

    torch.set_num_threads(n_threads)
    a, b = torch.randn(2048, 2240), torch.randn(11200, 2240)
    ways = {
        "sgemm": lambda: a @ b.t(),
        "oneDNN": lambda: F.conv2d(a.view(1, 1, 2048, 2240).permute(0, 3, 1, 2), b.view(11200, 2240, 1, 1)),
    }
    out = {}
    for name, fn in ways.items():
        fn()
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        out[name] = 2 * 2048 * 2240 * 11200 / best / 1e9
    return out


def child(which: str, layers: int, size: int, caption: int, repeats: int, weights: str = "fp32") -> dict:
    cfg = SANA_1600M.replace(depth=layers)
    torch.manual_seed(0)
    lat = size // 32
    x = torch.randn(2, 32, lat, lat)
    ctx = torch.randn(2, caption, cfg.caption_channels)
    mask = torch.ones(2, caption, dtype=torch.long)
    t = torch.tensor([500.0, 500.0])
    if which == "diffusers":
        from diffusers import SanaTransformer2DModel

        model = SanaTransformer2DModel(num_layers=layers).eval()
        if weights == "bf16":  # what a diffusers user does for speed: the whole model and its inputs in bf16
            model = model.to(torch.bfloat16)
            x, ctx, t = x.bfloat16(), ctx.bfloat16(), t.bfloat16()

        def step():
            return model(x, ctx, t, encoder_attention_mask=mask).sample
    else:
        from twig_core.transformer import TwigTransformer

        if weights == "fp32":
            model = TwigTransformer(cfg).eval()
        else:  # weights held in fp16/bf16, computing in fp32; never materialised in fp32 as a whole
            with torch.device("meta"):
                model = TwigTransformer(cfg, compute_dtype=torch.float32)
            model = model.to(getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[weights])).to_empty(device="cpu")
            with torch.no_grad():
                for prm in model.parameters():
                    prm.normal_(0.0, 0.02)
            model.eval()
        with torch.inference_mode():  # as the sampler does: once per generation, not per step, without autograd
            cache = model.encode_caption(ctx, mask)

        def step():
            return model(x, t, cache)

    times = []
    with torch.inference_mode():
        step()  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    rss = peak_rss_mib() / 1024  # GiB
    return {"time": min(times), "rss_gib": rss}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--size", type=int, default=1024, help="image side in pixels")
    p.add_argument("--caption", type=int, default=300)
    p.add_argument("--repeats", type=int, default=2, help="timed steps per process (the best counts)")
    p.add_argument("--rounds", type=int, default=2, help="processes per contender, run alternately")
    p.add_argument("--child", choices=["twig", "diffusers"])
    p.add_argument("--weights", default="fp32", choices=["fp32", "fp16", "bf16"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.layers, a.size, a.caption, a.repeats, a.weights)))
        return
    res = {}
    runs = {"diffusers": ("diffusers", "fp32"), "twig": ("twig", "fp32"), "twig fp16 weights": ("twig", "fp16")}
    for _ in range(a.rounds):  # alternate the contenders, keep each one's best: shared machines drift
        for label, (which, weights) in runs.items():
            out = subprocess.run([sys.executable, __file__, "--child", which, "--layers", str(a.layers), "--size",
                                  str(a.size), "--caption", str(a.caption), "--repeats", str(a.repeats),
                                  "--weights", weights], check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            if label not in res or r["time"] < res[label]["time"]:
                res[label] = r
    cfg = SANA_1600M.replace(depth=a.layers)
    flops = flops_per_step(cfg, (a.size // 32) ** 2, a.caption)
    gemm = gemm_gflops(torch.get_num_threads())
    d = res["diffusers"]
    print(f"transformer CFG step (batch 2), 1600M width, {a.layers}/20 layers, {a.size}², caption {a.caption}, "
          f"fp32 compute, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    for label, r in res.items():
        print(f"  {label:<18} {r['time']:7.2f}s  peak RSS {r['rss_gib']:6.2f} GiB   "
              f"ratio to diffusers: time {r['time'] / d['time']:.3f}  RSS {r['rss_gib'] / d['rss_gib']:.3f}")
    t = res["twig"]["time"]
    for name, gf in gemm.items():
        bound = flops / (gf * 1e9)
        print(f"  matmul bound at {gf:.0f} GFLOP/s ({name}): {bound:.2f}s; twig reaches {bound / t:.0%} of it, "
              f"diffusers {bound / d['time']:.0%}")
    if a.layers != 20:
        print(f"  per 20 layers (scaled): diffusers {d['time'] * 20 / a.layers:.1f}s, twig {t * 20 / a.layers:.1f}s")


if __name__ == "__main__":
    main()
