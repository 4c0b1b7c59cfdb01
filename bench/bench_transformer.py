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


def sgemm_gflops(n_threads: int) -> float:
    torch.set_num_threads(n_threads)
    a, b = torch.randn(2048, 2240), torch.randn(2240, 11200)
    a @ b
    t = time.perf_counter()
    reps = 3
    for _ in range(reps):
        a @ b
    return 2 * 2048 * 2240 * 11200 * reps / (time.perf_counter() - t) / 1e9


def child(which: str, layers: int, size: int, caption: int, repeats: int) -> dict:
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

        def step():
            return model(x, ctx, t, encoder_attention_mask=mask).sample
    else:
        from twig_core.transformer import TwigTransformer

        model = TwigTransformer(cfg).eval()
        cache = model.encode_caption(ctx, mask)  # computed once per generation, not per step

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
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", choices=["twig", "diffusers"])
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.layers, a.size, a.caption, a.repeats)))
        return
    res = {}
    for which in ("diffusers", "twig"):
        out = subprocess.run([sys.executable, __file__, "--child", which, "--layers", str(a.layers), "--size",
                              str(a.size), "--caption", str(a.caption), "--repeats", str(a.repeats)],
                             check=True, capture_output=True, text=True).stdout
        res[which] = json.loads(out.strip().splitlines()[-1])
    cfg = SANA_1600M.replace(depth=a.layers)
    flops = flops_per_step(cfg, (a.size // 32) ** 2, a.caption)
    gflops = sgemm_gflops(torch.get_num_threads())
    bound = flops / (gflops * 1e9)
    d, t = res["diffusers"], res["twig"]
    print(f"transformer CFG step, 1600M width, {a.layers}/20 layers, {a.size}², caption {a.caption}, fp32, "
          f"{torch.get_num_threads()} threads")
    print(f"  diffusers {d['time']:.2f}s  peak RSS {d['rss_gib']:.2f} GiB")
    print(f"  twig      {t['time']:.2f}s  peak RSS {t['rss_gib']:.2f} GiB")
    print(f"  ratio twig/diffusers: time {t['time'] / d['time']:.3f}  RSS {t['rss_gib'] / d['rss_gib']:.3f}")
    print(f"  matmul bound {bound:.2f}s at {gflops:.0f} GFLOP/s sgemm; twig reaches {bound / t['time']:.0%} of it")
    print(f"  per 20 layers (scaled): diffusers {d['time'] * 20 / a.layers:.1f}s, twig {t['time'] * 20 / a.layers:.1f}s")


if __name__ == "__main__":
    main()
