"""DC-AE decode: Twig vs diffusers AutoencoderDC in fp32 and in bf16 (ratios to the faster of the two), Sana 1.0
f32c32 architecture, identical random weights.

    python bench/bench_dcae.py                 # 512x512 image (16x16 latent)
    python bench/bench_dcae.py --size 2048 --tile 16 --overlap 2 [--weight-dtype fp16]  # both tiled alike: diffusers' enable_tiling()
                                                                   # defaults are 512 px tiles every 448 px
    python bench/bench_dcae.py --size 1024 --device cuda
    python bench/bench_dcae.py --size 512 --tile 4 --check-untiled   # also: tiled vs our own untiled decode
    python bench/bench_dcae.py --products      # fp32 vs twig_core.int8 on the decode's matrix-product shapes

Each implementation runs in its own subprocess so that peak RSS (VmHWM) is its own. Weights are created
once (seeded), saved to a temporary safetensors file and loaded by both; twig_core's through
``loader.load_vae``, as users get it (the decoder only: the encoder is read on first encode).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import best_seconds, current_rss_mib, int8_weight, peak_rss_mib  # noqa: E402


def child(args) -> None:
    import torch
    from safetensors.torch import load

    from twig_core import dcae_exec
    from twig_core.dcae import DCAE_F32C32_SANA
    from twig_core.loader import load_vae

    torch.set_grad_enabled(False)
    if args.child == "ours":
        # as users load it: weights read into anonymous memory (held narrow with --weight-dtype fp16/bf16,
        # decoding in fp32); the encoder is read on first encode, so never here
        model = load_vae(args.weights, dtype=args.weight_dtype, compute_dtype="fp32")
        run = lambda z: dcae_exec.decode(model, z, tile_size=args.tile, overlap=args.overlap, raw=True)[0]  # noqa: E731
    else:
        from diffusers import AutoencoderDC

        sd = load(Path(args.weights).read_bytes())  # weights in anonymous memory, not lazily paged from a mmap
        with torch.device("meta"):
            model = AutoencoderDC(**DCAE_F32C32_SANA.to_dict())
        model.load_state_dict(sd, assign=True)
        del sd
        if args.tile:
            f, overlap = 32, args.overlap if args.overlap is not None else args.tile // 4
            model.enable_tiling(args.tile * f, args.tile * f, (args.tile - overlap) * f, (args.tile - overlap) * f)
        run = lambda z: model.decode(z).sample  # noqa: E731
    model = model.eval().to(args.device)
    latent = torch.load(args.latent, weights_only=True).to(args.device)
    if args.child == "diffusers" and args.diffusers_dtype == "bf16":  # a diffusers user's fast mode: all in bf16
        model, latent = model.to(torch.bfloat16), latent.to(torch.bfloat16)
    try:  # reset VmHWM so that the peak below is the decode's, not the weight loading's
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    loaded = current_rss_mib()
    times = []
    for _ in range(args.repeat):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = run(latent)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    torch.save(out.float().cpu(), args.out)
    res = dict(time=min(times), loaded_mib=loaded, peak_mib=peak_rss_mib())
    if args.device.startswith("cuda"):
        res["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(res))


def reference_flops(size: int) -> float:
    """Multiply-adds x2 of diffusers' decode at this size (its direct algorithm), counted on the meta device."""
    import torch
    from diffusers import AutoencoderDC
    from torch.utils.flop_counter import FlopCounterMode

    from twig_core.dcae import DCAE_F32C32_SANA

    with torch.device("meta"), torch.no_grad():
        model = AutoencoderDC(**DCAE_F32C32_SANA.to_dict()).eval()
        with FlopCounterMode(display=False) as counter:
            model.decode(torch.randn(1, 32, size // 32, size // 32))
    return counter.get_total_flops()


def conv_gflops() -> float:
    """fp32 rate of a 3x3 convolution typical of the decoder (256 channels at 256x256, channels-last, oneDNN):
    the machine's practical ceiling for this network."""
    import torch
    import torch.nn.functional as F

    x = torch.randn(1, 256, 256, 256).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3)
    with torch.no_grad():
        best = best_seconds(lambda: F.conv2d(x, w, padding=1))
    return 2 * 9 * 256 * 256 * 256 * 256 / best / 1e9


# (M, K, N) of the decode's channel products at 1024²: Winograd positions over tiles, EfficientViT 1x1 products
PRODUCT_SHAPES = ((16384, 512, 512), (16384, 512, 2048), (16384, 1024, 512), (8192, 128, 128), (8192, 256, 256),
                  (32768, 128, 128), (4096, 2048, 1024))


def products() -> None:
    """Whether int8 products would pay in the decode: sgemm against ``twig_core.int8.dense`` (per-token scale,
    the transformer's int8 route) at the decode's shapes, best of 3 each."""
    import torch

    from twig_core import int8

    print(f"matrix products, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    for m, k, n in PRODUCT_SHAPES:
        a, b = torch.randn(m, k), torch.randn(n, k)
        w = int8_weight(b)
        f, q = best_seconds(lambda: a @ b.t()), best_seconds(lambda: int8.dense(a, w, None))
        ops = 2 * m * k * n / 1e9
        print(f"  {m:6d} x {k:4d} x {n:4d}  fp32 {ops / f:5.0f} GFLOP/s  int8 {ops / q:5.0f} GOP/s  "
              f"int8 time / fp32 time {q / f:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512, help="image side in pixels (multiple of 32)")
    p.add_argument("--tile", type=int, default=None, help="decode tile size in latent px (default: untiled)")
    p.add_argument("--overlap", type=int, default=None, help="tile overlap in latent px (default: a quarter tile)")
    p.add_argument("--repeat", type=int, default=1, help="decodes per implementation; the best time is shown")
    p.add_argument("--device", default="cpu")
    p.add_argument("--weight-dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="twig_core's weights in memory (it always decodes in fp32; diffusers holds fp32)")
    p.add_argument("--ours-only", action="store_true", help="only twig_core (e.g. a 4096² completion check)")
    p.add_argument("--check-untiled", action="store_true",
                   help="with --tile: also decode untiled with twig_core (a third run, untiled memory) and print "
                        "how far the tiled decode is from it")
    p.add_argument("--no-bf16", action="store_true", help="skip diffusers in bf16 (slow on CPUs without native bf16)")
    p.add_argument("--products", action="store_true", help="only time fp32 against int8 matrix products at the "
                   "decode's shapes")
    p.add_argument("--child", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--diffusers-dtype", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--latent", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.products:
        return products()
    if args.size % 32:
        sys.exit(f"--size {args.size} is not a multiple of 32")

    import torch
    from safetensors.torch import save_file

    from twig_core.dcae import DCAE, DCAE_F32C32_SANA

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        model = DCAE(DCAE_F32C32_SANA)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "vae.safetensors")
        del model
        n = args.size // 32
        torch.save(torch.randn(1, 32, n, n, generator=torch.Generator().manual_seed(1)), tmp / "latent.pt")

        results = {}
        runs = ["ours"] if args.ours_only else ["ours", "diffusers"] + ([] if args.no_bf16 else ["diffusers-bf16"])
        if args.check_untiled and args.tile:
            runs.append("ours-untiled")
        for name in runs:
            child_name = name.split("-")[0]
            cmd = [sys.executable, __file__, "--child", child_name, "--weights", str(tmp / "vae.safetensors"),
                   "--latent", str(tmp / "latent.pt"), "--out", str(tmp / f"{name}.pt"), "--size", str(args.size),
                   "--repeat", str(args.repeat), "--device", args.device, "--weight-dtype", args.weight_dtype]
            if args.tile and name != "ours-untiled":
                cmd += ["--tile", str(args.tile)]
            if args.overlap is not None:
                cmd += ["--overlap", str(args.overlap)]
            if name == "diffusers-bf16":
                cmd += ["--diffusers-dtype", "bf16"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{name} failed:\n{proc.stderr}")
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])

        def rel_diff(a, b):
            a, b = torch.load(tmp / f"{a}.pt"), torch.load(tmp / f"{b}.pt")
            return ((a - b).abs().max() / b.abs().max()).item(), (a - b).abs().max().item()

        if not args.ours_only:
            diff = rel_diff("ours", "diffusers")[0]
        if "ours-untiled" in results:
            self_rel, self_abs = rel_diff("ours", "ours-untiled")

    tiling = f", tile {args.tile} latent px" if args.tile else ", untiled"
    print(f"DC-AE f32c32 decode, {args.size}x{args.size} ({args.size // 32}x{args.size // 32} latent{tiling}), "
          f"{args.device}, torch threads {torch.get_num_threads()}, twig_core weights {args.weight_dtype}, "
          f"{time.strftime('%Y-%m-%d')}")
    for name, r in results.items():
        extra = f", cuda peak {r['cuda_peak_mib']:.0f} MiB" if "cuda_peak_mib" in r else ""
        print(f"  {name:14s} {r['time']:8.3f} s   RSS after load {r['loaded_mib']:7.0f} MiB, "
              f"peak {r['peak_mib']:7.0f} MiB (+{r['peak_mib'] - r['loaded_mib']:.0f}){extra}")
    if "ours-untiled" in results:
        print(f"  ours tiled vs ours untiled: rel. max diff {self_rel:.2e}, max abs diff {self_abs:.2e}")
    if args.ours_only:
        return
    best = min((k for k in results if k.startswith("diffusers")), key=lambda k: results[k]["time"])
    ratio = results["ours"]["time"] / results[best]["time"]
    print(f"  time ratio ours/diffusers' best ({best}): {ratio:.2f}   output rel. max diff to diffusers fp32: {diff:.2e}"
          + ("  (diffusers blends overlapping tiles; ours decodes tiles exactly)" if args.tile else ""))
    mem = (results["ours"]["peak_mib"] - results["ours"]["loaded_mib"]) / max(
        1.0, results[best]["peak_mib"] - results[best]["loaded_mib"])
    print(f"  decode working memory ratio ours/{best}: {mem:.2f}   peak RSS ratio: "
          f"{results['ours']['peak_mib'] / results[best]['peak_mib']:.2f}")
    if args.device == "cpu":
        flops, rate = reference_flops(args.size), conv_gflops()
        bound = flops / (rate * 1e9)
        print(f"  bound: {flops / 1e12:.2f} TFLOP (diffusers' direct algorithm) at {rate:.0f} GFLOP/s (3x3 conv, "
              f"oneDNN, channels-last) = {bound:.1f} s; ours reaches {bound / results['ours']['time']:.0%} of it, "
              f"diffusers {bound / results['diffusers']['time']:.0%}")


if __name__ == "__main__":
    main()
