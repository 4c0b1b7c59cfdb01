"""Small weights: peak memory, load time and one transformer step per storage type, full-size architecture.

Writes a random 1600M transformer (NVlabs names, fp16 ``.safetensors``) into a temporary folder, converts it
with ``python -m twig_core convert`` to each ``--types`` entry (GGUF q8_0 / q6_k / q5_k_m / q4_k_m / q4_0 / f16, fp8
safetensors), then, per file, in a fresh subprocess: loads it, runs ``--steps`` CFG steps (batch 2) at
``--size`` pixels (1024 -> 1024 latent tokens, 512 -> 256), and reports peak resident memory (VmHWM), file size,
load and step seconds, what loading adds to resident memory at its peak as a multiple of the file's size,
and the relative error of the step's output against the fp16-stored model computing
in the same dtype (the ``stored`` row). The speed anchor is the same file held in bf16 (the ``bf16`` row, the
"bf16-stored path"); diffusers' SanaTransformer2DModel runs the same step shape on its own random weights beside them, in its own
process, in fp32 and cast to bf16; the faster of the two is the peer's best. Numbers go to
bench/RESULTS.md; the whole pipeline with small weights is ``bench/bench_pipeline.py --text-type q4_k_m
--transformer-type q8_0``.

    python bench/bench_small_weights.py [--size 512] [--types q8_0,q4_k_m,fp8] [--dtype fp32|bf16] [--dir DIR]
    python bench/bench_small_weights.py --demo-scores [--n 50] [--types q8_0,q4_k_m]

``--depth N`` builds fewer blocks (a quick check that the script runs; not a benchmark). ``--demo-scores``
measures fidelity where it matters: the embedded demo model's held-out pixel-evaluator scores (the first
``--n`` held-out compositions, English and Chinese prompts, 20 steps) with its transformer converted to each
type, against the original.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import current_rss_mib, peak_rss_mib  # noqa: E402


def write_checkpoint(path: str, depth: int) -> None:
    import torch
    from safetensors.torch import save_file

    from twig_core.config import TransformerConfig
    from twig_core.transformer import TwigTransformer

    torch.manual_seed(0)
    with torch.device("meta"):
        model = TwigTransformer(TransformerConfig(depth=depth))
    sd = {}
    for name, p in model.state_dict().items():
        fan_in = p[0].numel() if p.dim() > 1 else 1
        sd[name] = (torch.randn(p.shape) / max(1.0, fan_in) ** 0.5).half()
    save_file(sd, path)


def demo_scores(n: int, types: list[str]) -> None:
    import torch

    from training.evaluate import CATEGORIES
    from training.evaluate_demo import evaluate_demo
    from training.scenes import generate_records
    from twig_core.catalog import DEMO_DIR
    from twig_core.convert import convert
    from twig_core.loader import load_pipeline, load_transformer
    from twig_core.quant import quant_summary

    torch.manual_seed(0)
    _, held = generate_records(0, 400)  # the recipe's held-out split (it does not depend on the train count)
    parts = load_pipeline(DEMO_DIR, dtype=torch.float32)
    print("| transformer | " + " | ".join(f"{c} en/zh" for c in CATEGORIES) + " | largest change, points |")
    print("| --- " * (len(CATEGORIES) + 2) + "|")
    base = None
    with tempfile.TemporaryDirectory() as folder:
        for ty in ["original", *types]:
            if ty != "original":
                path = os.path.join(folder, f"demo_{ty}." + ("safetensors" if ty == "fp8" else "gguf"))
                convert(DEMO_DIR / "transformer", path, ty)
                parts.transformer = load_transformer(path, compute_dtype=torch.float32)
            s = evaluate_demo(parts, held, n=n)["summary"]
            cells = [100 * s[lang][c] for c in CATEGORIES for lang in ("en", "zh")]
            base = cells if base is None else base
            change = max((c - b for c, b in zip(cells, base)), key=abs)
            label = quant_summary(parts.transformer) or "fp32"
            print(f"| {ty} ({label}) | " + " | ".join(f"{cells[2 * i]:.1f} / {cells[2 * i + 1]:.1f}"
                                                    for i in range(len(CATEGORIES))) + f" | {change:+.1f} |",
                  flush=True)


def child(path: str, size: int, steps: int, dtype_name: str, out: str, weights: str | None = None,
          int8: bool = False) -> None:
    import torch

    from twig_core.loader import load_transformer
    from twig_core.quant import quant_summary

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    before = current_rss_mib()
    t0 = time.perf_counter()
    model = load_transformer(path, dtype=weights and getattr(torch, weights), compute_dtype=dtype, int8=int8)
    load_s = time.perf_counter() - t0
    load_mib = peak_rss_mib() - before  # what loading added at its peak (file pages mapped count as resident)
    g = torch.Generator().manual_seed(1)
    n = size // 32
    x = torch.randn(2, 32, n, n, generator=g)
    ctx = torch.randn(2, 300, 2304, generator=g)
    mask = torch.ones(2, 300, dtype=torch.long)
    t = torch.tensor([500.0, 500.0])
    times = []
    with torch.no_grad():
        for _ in range(steps):
            t1 = time.perf_counter()
            y = model(x, t, ctx, mask)
            times.append(time.perf_counter() - t1)
    torch.save(y.float(), out)
    print(json.dumps({"peak_mib": peak_rss_mib(), "load_mib": load_mib, "load_s": load_s, "step_s": min(times),
                      "stored": (quant_summary(model) or str(model.weight_dtype)) + (" + int8 products" if int8 else "")}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--types", default="q8_0,q4_k_m,q4_0,fp8")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--dir")
    ap.add_argument("--child", nargs=2)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    ap.add_argument("--int8", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--demo-scores", action="store_true")
    ap.add_argument("--n", type=int, default=50, help="held-out compositions for --demo-scores")
    ap.add_argument("--no-diffusers", action="store_true", help="leave out the diffusers row")
    a = ap.parse_args()
    if a.child:
        return child(a.child[0], a.size, a.steps, a.dtype, a.child[1], a.weights, a.int8)
    if a.demo_scores:
        return demo_scores(a.n, a.types.split(","))
    import torch

    folder = a.dir or tempfile.mkdtemp(prefix="twig_small_")
    try:
        src = os.path.join(folder, "twig_fp16.safetensors")
        if not os.path.exists(src):
            write_checkpoint(src, a.depth)
        files = {"stored": src, "bf16": src}
        for ty in a.types.split(","):
            dst = os.path.join(folder, f"twig_{ty}." + ("safetensors" if ty == "fp8" else "gguf"))
            if not os.path.exists(dst):
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-m", "twig_core", "convert", src, dst, "--type", ty], check=True,
                               cwd=ROOT, capture_output=True)
                print(f"convert {ty}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            files[ty] = dst
        if "q8_0" in files and a.dtype == "fp32":  # Q8_0 fed to the int8 products (the fast preset's weights)
            files["q8_0+int8"] = files["q8_0"]
        ref, rows = None, {}
        print(f"| type ({a.dtype} compute, {a.size}², batch 2) | file MiB | peak RSS MiB | load s | step s | "
              "step vs bf16 | rel. error vs stored | load peak / file |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for ty, path in files.items():
            out = os.path.join(folder, f"y_{ty}.pt")
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", path, out,
                                   "--size", str(a.size), "--steps", str(a.steps), "--dtype", a.dtype]
                                  + (["--weights", "bfloat16"] if ty == "bf16" else [])
                                  + (["--int8"] if ty.endswith("+int8") else []),
                                  capture_output=True, text=True, check=True, cwd=ROOT)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            rows[ty] = r
            y = torch.load(out, weights_only=True)
            ref = y if ref is None else ref
            r["err"] = float((y - ref).norm() / ref.norm())
            r["mib"] = os.path.getsize(path) / 2**20
        if not a.no_diffusers:  # same step shape, its own random weights, its own process, fp32 and bf16
            for dt in ("fp32", "bf16"):
                done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_transformer.py"), "--child",
                                       "diffusers", "--layers", str(a.depth), "--size", str(a.size), "--repeats",
                                       str(a.steps), "--weights", dt], capture_output=True, text=True, check=True,
                                      cwd=ROOT)
                r = json.loads(done.stdout.strip().splitlines()[-1])
                rows[f"diffusers {dt}"] = {"stored": dt, "peak_mib": r["rss_gib"] * 1024, "load_s": float("nan"),
                                           "step_s": r["time"], "err": float("nan"), "mib": float("nan"),
                                           "load_mib": float("nan")}
            best = min(("diffusers fp32", "diffusers bf16"), key=lambda k: rows[k]["step_s"])
            print(f"diffusers' fastest dtype here: {rows[best]['stored']} (the peer's best for the ratios)")
            for ty in ("q8_0", "q8_0+int8"):
                if ty in rows:
                    print(f"{ty} step vs diffusers' best: {rows[ty]['step_s'] / rows[best]['step_s']:.2f}x")
        for ty, r in rows.items():
            print(f"| {ty} ({r['stored']}) | {r['mib']:.0f} | {r['peak_mib']:.0f} | {r['load_s']:.1f} | "
                  f"{r['step_s']:.2f} | {r['step_s'] / rows['bf16']['step_s']:.2f}x | {r['err']:.4f} | "
                  f"{r['load_mib'] / r['mib']:.2f}x |")
    finally:
        if not a.dir:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
