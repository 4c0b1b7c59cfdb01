"""Peak memory of loading a full-size (1.6B, fp16) Twig/Sana transformer with twig_core.loader.

Writes random 1600M fp16 weights in the NVlabs layout as ``.pth`` ({"state_dict": ...}, as Twig v0 alpha
ships) and as ``.safetensors`` into a temporary folder (~3.2 GB each), then loads each file in a fresh
subprocess and reports the peak resident memory (VmHWM) against the file size. After loading, every
weight is read once (a checksum), so memory-mapped weights count as resident too.

    python bench/bench_load.py [--dir DIR] [--keep] [--baseline]

``--text-encoder FOLDER`` measures a Gemma-2 folder instead, loaded in bf16 as the bf16 presets do: its large
tensors mapped from the file (what the loader does) and, for comparison, read into memory (``MAP_MIN_BYTES``
raised past every tensor); the file should be in the page cache (run it twice), else the first reader pays the disk.

``--convert`` also loads with ``dtype=bf16`` (a tensor-by-tensor conversion). ``--baseline`` also measures the
naive way (``torch.load`` without mmap / ``safetensors.load_file``, then
``load_state_dict`` into a randomly initialised model) for comparison. Target: loader peak <= 1.2x file size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _rss_now_kb() -> int:
    return _status_kb("VmRSS")


def _peak_kb() -> int:
    # VmHWM is this process's own high-water mark; ru_maxrss can carry the spawning parent's over exec
    return _status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(path: str, mode: str) -> None:
    import torch

    from twig_core import loader
    from twig_core.config import TransformerConfig
    from twig_core.transformer import TwigTransformer

    base = _rss_now_kb()
    t0 = time.perf_counter()
    if mode.startswith("te-"):
        from twig_core import weights

        if mode == "te-read":
            weights.MAP_MIN_BYTES = 1 << 62
        model = loader.load_text_encoder(path, dtype=torch.bfloat16).model
    elif mode == "loader":
        model = loader.load_transformer(path)
    elif mode == "to-bf16":
        model = loader.load_transformer(path, dtype=torch.bfloat16)
    else:  # naive: read everything, then copy into a randomly initialised model
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        sd.pop("pos_embed")
        sd.pop("y_embedder.y_embedding")
        model = TwigTransformer(TransformerConfig()).half()
        model.load_state_dict(sd)
        del sd
    load_s = time.perf_counter() - t0
    after_load = _rss_now_kb()
    with torch.no_grad():
        # touch every weight, in small chunks so the check itself adds no memory
        checksum = sum(float(c.float().sum()) for p in model.parameters() for c in p.reshape(-1).split(1 << 20))
    print(json.dumps({
        "peak_kb": _peak_kb(), "base_kb": base, "load_s": load_s,
        "after_load_kb": after_load, "after_touch_kb": _rss_now_kb(),
        "dtype": str(model.dtype), "params": sum(p.numel() for p in model.parameters()), "checksum": checksum,
    }))


def write_files(folder: str) -> dict[str, str]:
    """Random weights, written in a subprocess so this process stays small while it measures."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--write", folder], capture_output=True,
                         text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _write(folder: str) -> dict[str, str]:
    import torch
    from safetensors.torch import save_file

    from twig_core.config import SANA_1600M
    from twig_core.transformer import TwigTransformer

    paths = {"pth": os.path.join(folder, "twig_1600M_fp16.pth"),
             "safetensors": os.path.join(folder, "twig_1600M_fp16.safetensors")}
    if all(os.path.isfile(p) for p in paths.values()):
        return paths  # written by an earlier --keep run
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in TwigTransformer(SANA_1600M).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(s, generator=g) * 0.02).half() for k, s in shapes.items()}
    sd["pos_embed"] = torch.zeros(1, 32 * 32, SANA_1600M.width, dtype=torch.float16)
    sd["y_embedder.y_embedding"] = torch.zeros(300, SANA_1600M.caption_channels, dtype=torch.float16)
    torch.save({"state_dict": sd}, paths["pth"])
    save_file(sd, paths["safetensors"])
    return paths


def measure(path: str, mode: str) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", path, "--mode", mode],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=None, help="where to write the files (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the files")
    ap.add_argument("--baseline", action="store_true", help="also measure naive full-read loading")
    ap.add_argument("--convert", action="store_true", help="also measure loading with conversion to bf16")
    ap.add_argument("--text-encoder", default=None, metavar="FOLDER",
                    help="measure this Gemma-2 folder in bf16, mapped and read, instead of the transformer files")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="loader", help=argparse.SUPPRESS)
    ap.add_argument("--write", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.write:
        print(json.dumps(_write(a.write)))
        return
    if a.child:
        child(a.child, a.mode)
        return
    if a.text_encoder:
        print(f"{'reader':<10}{'load s':>8}{'peak RSS GB':>13}{'after reading every weight GB':>31}")
        for mode in ("te-read", "te-mapped", "te-read", "te-mapped"):
            r = measure(a.text_encoder, mode)
            print(f"{mode[3:]:<10}{r['load_s']:>8.1f}{r['peak_kb'] * 1024 / 1e9:>13.2f}"
                  f"{r['after_touch_kb'] * 1024 / 1e9:>31.2f}")
        return
    folder = a.dir or tempfile.mkdtemp(prefix="twig_bench_load_")
    os.makedirs(folder, exist_ok=True)
    try:
        t0 = time.perf_counter()
        paths = write_files(folder)
        print(f"1600M fp16 files ready in {time.perf_counter() - t0:.0f}s to {folder}")
        modes = ["loader"] + (["to-bf16"] if a.convert else []) + (["naive"] if a.baseline else [])
        print(f"{'file':<13}{'mode':<8}{'size GB':>9}{'peak RSS GB':>13}{'peak/size':>11}"
              f"{'(peak-base)/size':>18}{'load s':>8}  dtype")
        for fmt, path in paths.items():
            size = os.path.getsize(path)
            for mode in modes:
                r = measure(path, mode)
                peak, base = r["peak_kb"] * 1024, r["base_kb"] * 1024
                print(f"{fmt:<13}{mode:<8}{size / 1e9:>9.2f}{peak / 1e9:>13.2f}{peak / size:>11.2f}"
                      f"{(peak - base) / size:>18.2f}{r['load_s']:>8.1f}  {r['dtype']}  "
                      f"(RSS GB: {base / 1e9:.2f} before, {r['after_load_kb'] * 1024 / 1e9:.2f} after load, "
                      f"{r['after_touch_kb'] * 1024 / 1e9:.2f} after reading every weight)")
    finally:
        if not a.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
