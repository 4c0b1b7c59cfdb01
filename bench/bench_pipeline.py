"""Peak memory of the whole 1024² pipeline with full-size weights, each network loaded only while it is needed.

Writes random full-size weights into a temporary folder (about 10 GB): a Gemma-2-2B text encoder (2.6B, bf16
safetensors, HF folder layout; the tokenizer is the demo model's, since only the weights' size matters here),
the 1600M transformer as the fp16 NVlabs ``.pth`` Twig v0 alpha ships, and the DC-AE f32c32 (fp32
safetensors). A fresh process then runs prompt encoding (Gemma in bf16) -> sampling (weights kept in fp16,
computing in fp32) -> decoding (fp32), releasing each network before loading the next, and prints each
stage's peak resident memory (VmHWM, reset between stages), how the largest resident size sampled in the stage
splits into anonymous memory and mapped file pages (a GGUF's blocks are mapped), and the overall peak.

    python bench/bench_pipeline.py [--steps 2] [--size 1024] [--dir DIR --keep]
    python bench/bench_pipeline.py --text-type q4_k_m --transformer-type q8_0   # small weights

``--text-type`` / ``--transformer-type`` first convert Gemma / the transformer with ``python -m twig_core
convert`` (GGUF or fp8; kept in ``--dir`` for the next run) and run the pipeline on those files instead.

Peak memory does not depend on the step count (each step reuses the same buffers); times are printed too.
Targets (full-size weights, 1024²): overall peak RSS <= 6 GB; <= 2.5 GB with Q4_K_M Gemma and a Q8_0 transformer.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import current_rss_mib, peak_rss_mib, write_full_size  # noqa: E402


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class _Split(threading.Thread):
    """Reads /proc/self/status every 20 ms and keeps the largest VmRSS seen with its split: anonymous memory
    (RssAnon) and file pages mapped (RssFile: the memory-mapped GGUF and the shared libraries)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = (0, 0, 0)

    def sample(self) -> bool:
        try:
            with open("/proc/self/status") as f:
                v = {k: int(rest.split()[0]) / 2**20 for k, _, rest in (line.partition(":") for line in f)
                     if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem")}
        except OSError:
            return False
        if v.get("VmRSS", 0) > self.peak[0]:
            self.peak = (v["VmRSS"], v.get("RssAnon", 0), v.get("RssFile", 0) + v.get("RssShmem", 0))
        return True

    def run(self):
        while self.sample():
            time.sleep(0.02)


def child(paths: dict[str, str], size: int, steps: int, text_dtype: str = "bf16") -> dict:
    import torch

    from twig_core import dcae_exec, loader
    from twig_core.pipeline import sample_latents
    from twig_core.quant import quant_summary

    torch.set_grad_enabled(False)
    stages = {}
    split = _Split()
    split.sample()
    split.start()

    def stage(name, t0):
        gc.collect()
        stages[name] = {"peak_gib": peak_rss_mib() / 1024, "after_gib": current_rss_mib() / 1024,
                        "seconds": time.perf_counter() - t0, "anon_gib": split.peak[1], "file_gib": split.peak[2]}
        _reset_peak()
        split.peak = (0, 0, 0)

    stages["start"] = {"peak_gib": peak_rss_mib() / 1024, "after_gib": current_rss_mib() / 1024, "seconds": 0.0,
                       "anon_gib": split.peak[1], "file_gib": split.peak[2]}
    _reset_peak()
    split.peak = (0, 0, 0)
    t0 = time.perf_counter()
    te = loader.load_text_encoder(paths["text"], dtype={"bf16": torch.bfloat16, "fp32": torch.float32}[text_dtype])
    text_weights = quant_summary(te.model).split(" ")[0] or "bf16"
    prompt = "a red fox standing in fresh snow at dawn, soft light, detailed fur; 一只站在雪地里的红狐狸"
    cond, uncond = te.encode([prompt]), te.encode([""], use_instruction=False)
    del te
    stage(f"text encoder ({text_weights} weights, {text_dtype} compute)", t0)
    t0 = time.perf_counter()
    model = loader.load_transformer(paths["transformer"], compute_dtype=torch.float32)
    weights = quant_summary(model).split(" ")[0] or str(model.weight_dtype).replace("torch.", "")
    latent = sample_latents(model, cond, uncond, width=size, height=size, steps=steps, seed=0)
    del model, cond, uncond
    stage(f"transformer ({weights} weights, fp32 compute, {steps} steps)", t0)
    t0 = time.perf_counter()
    vae = loader.load_vae(paths["vae"])
    image = dcae_exec.decode(vae, latent.to(torch.float32), tile_size="auto")[0]
    del vae
    stage("DC-AE decode (fp32)", t0)
    return {"stages": stages, "image": list(image.shape)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where to write the weights (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the weights")
    ap.add_argument("--text-type", default=None, help="convert Gemma to this type first (e.g. q4_k_m)")
    ap.add_argument("--text-dtype", default="bf16", choices=["bf16", "fp32"],
                    help="Gemma's compute dtype (fp32 for quantized weights on a CPU without bf16 instructions)")
    ap.add_argument("--transformer-type", default=None, help="convert the transformer to this type first (e.g. q8_0)")
    ap.add_argument("--write", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.write:
        print(json.dumps(write_full_size(a.write)))
        return
    if a.child:
        print(json.dumps(child(json.loads(a.child), a.size, a.steps, a.text_dtype)))
        return
    folder = a.dir or tempfile.mkdtemp(prefix="twig_bench_pipeline_")
    os.makedirs(folder, exist_ok=True)
    try:
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--write", folder], capture_output=True,
                             text=True, check=True, cwd=ROOT)
        paths = json.loads(out.stdout.strip().splitlines()[-1])
        for role, ty in (("text", a.text_type), ("transformer", a.transformer_type)):
            if ty:
                dst = os.path.join(folder, f"{role}_{ty}." + ("safetensors" if ty == "fp8" else "gguf"))
                if not os.path.isfile(dst):
                    subprocess.run([sys.executable, "-m", "twig_core", "convert", paths[role], dst, "--type", ty],
                                   check=True, cwd=ROOT)
                paths[role] = dst
        print(f"full-size weights ready in {time.perf_counter() - t0:.0f}s in {folder}")
        for role in ("text", "transformer"):
            if os.path.isfile(paths[role]):
                print(f"  {role}: {os.path.basename(paths[role])}, {os.path.getsize(paths[role]) / 2**30:.2f} GiB")
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(paths), "--size",
                               str(a.size), "--steps", str(a.steps), "--text-dtype", a.text_dtype],
                              capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            sys.exit(f"pipeline failed:\n{proc.stderr[-4000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"whole pipeline, {a.size}x{a.size}, CPU, {time.strftime('%Y-%m-%d')}, image {res['image']}")
        for name, r in res["stages"].items():
            print(f"  {name:<52} peak RSS {r['peak_gib']:5.2f} GiB (anon {r['anon_gib']:4.2f} + file "
                  f"{r['file_gib']:4.2f})   after {r['after_gib']:5.2f} GiB   {r['seconds']:6.1f} s")
        peak = max(r["peak_gib"] for r in res["stages"].values())
        target = "2.5" if a.text_type or a.transformer_type else "6"
        print(f"  overall peak RSS {peak:.2f} GiB ({peak * 2**30 / 1e9:.2f} GB); target <= {target} GB")
    finally:
        if not a.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
