"""One CFG step (batch 2) of the full-width 1600M transformer: twig_core's presets vs diffusers in fp32 and in
bf16, side by side.

Each contender runs in its own subprocess (so peak RSS is its own) on random weights of the same architecture;
the parent prints every time, its ratio to diffusers' best (the faster of its fp32 and bf16 runs, measured in
the same run), and the fraction of the machine's measured matmul bounds (fp32 and int8) reached.
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

from bench.common import best_seconds, int8_weight, peak_rss_mib  # noqa: E402
from twig_core.config import SANA_1600M  # noqa: E402
from twig_core import presets  # noqa: E402


def flops_per_step(cfg, tokens: int, caption: int, batch: int = 2) -> float:
    d, h = cfg.width, cfg.mlp_hidden
    per_token = 2 * (6 * d * d + 3 * d * h) + 4 * caption * d + 4 * d * cfg.head_dim  # matmuls + attention
    return per_token * tokens * batch * cfg.depth


def int8_flops_per_step(cfg, tokens: int, batch: int = 2) -> float:
    """The multiply-adds of the step that the int8 weight choice runs in int8 (``twig_core.int8.TARGETS``)."""
    d, h = cfg.width, cfg.mlp_hidden
    return 2 * (5 * d * d + 3 * d * h) * tokens * batch * cfg.depth


def gemm_gflops(n_threads: int) -> dict[str, float]:
    """GEMM throughput of this machine on the step's biggest product (2048 x 2240 x 11200), three ways: fp32
    through the BLAS sgemm behind torch.mm and through oneDNN (a 1x1 convolution, as twig_core does), and int8
    through the packed kernels twig_core.int8 uses."""
    import torch.nn.functional as F

    from twig_core import int8

    torch.set_num_threads(n_threads)
    a, b = torch.randn(2048, 2240), torch.randn(11200, 2240)
    ways = {
        "sgemm": lambda: a @ b.t(),
        "oneDNN": lambda: F.conv2d(a.view(1, 1, 2048, 2240).permute(0, 3, 1, 2), b.view(11200, 2240, 1, 1)),
    }
    if int8.engine() is not None:
        w = int8_weight(b)
        ways["int8"] = lambda: int8.dense(a, w, None)
    return {name: 2 * 2048 * 2240 * 11200 / best_seconds(fn) / 1e9 for name, fn in ways.items()}


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
        elif weights == "bf16-compute":  # balanced on a CPU with native bf16: weights and products in bf16
            model = TwigTransformer(cfg).to(torch.bfloat16).eval()
            x, ctx, t = x.bfloat16(), ctx.bfloat16(), t.bfloat16()
        else:  # weights held in fp16/bf16, computing in fp32; never materialised in fp32 as a whole
            with torch.device("meta"):
                model = TwigTransformer(cfg, compute_dtype=torch.float32)
            held = {"fp16": "float16", "bf16": "bfloat16", "int8": "float16"}[weights]
            model = model.to(getattr(torch, held)).to_empty(device="cpu")
            with torch.no_grad():
                for prm in model.parameters():
                    prm.normal_(0.0, 0.02)
            model.eval()
            if weights == "int8":  # as load_transformer(..., int8=True) does: packs made on the first step
                from twig_core import int8

                int8.enable(model)
        with torch.inference_mode():  # as the sampler does: once per generation, not per step, without autograd
            cache = model.encode_caption(ctx, mask)

        def step():
            return model(x, t, cache)

    times = []
    with torch.inference_mode():
        start = time.perf_counter()
        step()  # warm-up (int8: makes the packs)
        first = time.perf_counter() - start
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    rss = peak_rss_mib() / 1024  # GiB
    return {"time": min(times), "rss_gib": rss, "first": first}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--size", type=int, default=1024, help="image side in pixels")
    p.add_argument("--caption", type=int, default=300)
    p.add_argument("--repeats", type=int, default=2, help="timed steps per process (the best counts)")
    p.add_argument("--rounds", type=int, default=2, help="processes per contender, run alternately")
    p.add_argument("--child", choices=["twig", "diffusers"])
    p.add_argument("--weights", default="fp32", choices=["fp32", "fp16", "bf16", "bf16-compute", "int8"],
                   help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.layers, a.size, a.caption, a.repeats, a.weights)))
        return
    res = {}
    # diffusers as a user runs it for speed (all fp32, or all bf16); twig's presets on this CPU
    runs = {"diffusers fp32": ("diffusers", "fp32"), "diffusers bf16": ("diffusers", "bf16"),
            "twig quality": ("twig", "fp32"), "twig fast (int8)": ("twig", "int8"),
            # balanced as presets.resolve picks it here: bf16 where the CPU multiplies it natively, else fp32 compute
            "twig balanced": ("twig", "bf16-compute" if presets.resolve("balanced").dtype == "bf16" else "fp16")}
    for _ in range(a.rounds):  # alternate the contenders, keep each one's best: shared machines drift
        for label, (which, weights) in runs.items():
            out = subprocess.run([sys.executable, __file__, "--child", which, "--layers", str(a.layers), "--size",
                                  str(a.size), "--caption", str(a.caption), "--repeats", str(a.repeats),
                                  "--weights", weights], check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            if label not in res or r["time"] < res[label]["time"]:
                res[label] = r
    cfg = SANA_1600M.replace(depth=a.layers)
    tokens = (a.size // 32) ** 2
    flops = flops_per_step(cfg, tokens, a.caption)
    flops8 = int8_flops_per_step(cfg, tokens)
    gemm = gemm_gflops(torch.get_num_threads())
    best_label = min(("diffusers fp32", "diffusers bf16"), key=lambda k: res[k]["time"])
    d = res[best_label]
    print(f"transformer CFG step (batch 2), 1600M width, {a.layers}/20 layers, {a.size}², caption {a.caption}, "
          f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}; diffusers' best here: {best_label}")
    for label, r in res.items():
        extra = f"  (first step {r['first']:.2f}s)" if "int8" in label else ""
        print(f"  {label:<18} {r['time']:7.2f}s  peak RSS {r['rss_gib']:6.2f} GiB   "
              f"ratio to diffusers' best: time {r['time'] / d['time']:.3f}  RSS {r['rss_gib'] / d['rss_gib']:.3f}{extra}")
    fp32_rate = max(gemm["sgemm"], gemm["oneDNN"]) * 1e9
    for name in ("sgemm", "oneDNN"):
        bound = flops / (gemm[name] * 1e9)
        print(f"  fp32 matmul bound at {gemm[name]:.0f} GFLOP/s ({name}): {bound:.2f}s; twig quality reaches "
              f"{bound / res['twig quality']['time']:.0%} of it, diffusers fp32 {bound / res['diffusers fp32']['time']:.0%}")
    if "int8" in gemm:
        bound = flops8 / (gemm["int8"] * 1e9) + (flops - flops8) / fp32_rate
        print(f"  int8 bound ({gemm['int8']:.0f} GOP/s int8 for {flops8 / flops:.0%} of the work, the rest at "
              f"{fp32_rate / 1e9:.0f} GFLOP/s): {bound:.2f}s; twig fast reaches {bound / res['twig fast (int8)']['time']:.0%}")
    if a.layers != 20:
        print("  per 20 layers (scaled): " + ", ".join(f"{k} {v['time'] * 20 / a.layers:.1f}s" for k, v in res.items()))


if __name__ == "__main__":
    main()
