"""One command that checks Twig on a CUDA or Apple MPS machine and prints one table.

    python bench/gpu_check.py [--size 1024] [--steps 20] [--cap-gib 6] [--presets 1600M,600M] [--dir DIR --keep]

1. the device parity tests (``tests/test_gpu_ready.py`` with ``TWIG_TEST_DEVICE`` set: the transformer, each
   decode strategy and an offloaded generation against the CPU, plus the CPU-side proofs);
2. per transformer preset, a ``size``² image end to end (Gemma-2-2B, the transformer, DC-AE f32c32: random
   full-size weights written once to ``--dir``, loaded through ``loader.load_parts`` with "auto" dtypes) with
   the networks kept on the device: seconds and peak device memory;
3. the same with offloading (each network on the device only while it runs) under a device-memory cap of
   ``--cap-gib`` (``torch.cuda.set_per_process_memory_fraction``; CUDA only), the small-card case.

Without a CUDA or MPS device it says so and exits 0. Results go to bench/RESULTS.md with the card's name.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROMPT = "a red fox standing in fresh snow at dawn, soft light, detailed fur"


def _transformer_file(folder: str, preset: str) -> str:
    """A random fp16 NVlabs-style ``.pth`` of a preset (the format Twig v0 alpha ships)."""
    import torch

    from twig_core.config import PRESETS
    from twig_core.transformer import TwigTransformer

    path = os.path.join(folder, f"twig_{preset}_fp16.pth")
    if not os.path.isfile(path):
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in TwigTransformer(PRESETS[preset]).state_dict().items()}
        g = torch.Generator().manual_seed(0)
        torch.save({"state_dict": {k: (torch.randn(s, generator=g) * 0.02).half() for k, s in shapes.items()}}, path)
    return path


def _memory(device):
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    if device.type == "mps":  # no peak counter on MPS: what the driver holds after the run
        return torch.mps.driver_allocated_memory() / 2**30
    return float("nan")


def _run(paths: dict, transformer: str, device, size: int, steps: int, offload: bool) -> tuple[float, float, str]:
    """(seconds, peak device GiB, note) of one generation."""
    import gc

    import torch

    from twig_core import devices, loader
    from twig_core.pipeline import generate

    parts = loader.load_parts(transformer, paths["text"], paths["vae"], dtype="auto", device=device,
                              offload="on" if offload else "off")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        image = generate(parts.transformer, parts.vae, parts.text_encoder, PROMPT, width=size, height=size,
                         steps=steps, seed=0, residency=parts.residency)
    seconds = time.perf_counter() - t0
    peak = _memory(device)
    note = f"{str(parts.transformer.dtype)[6:]}/{str(parts.vae.dtype)[6:]}/{str(parts.text_encoder.dtype)[6:]}"
    if not torch.isfinite(image).all():
        note += " NON-FINITE"
    del parts, image
    gc.collect()
    devices.clear_cache()
    return seconds, peak, note


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cap-gib", type=float, default=6.0, help="device memory cap of the offload run (CUDA)")
    p.add_argument("--presets", default="1600M,600M")
    p.add_argument("--dir", help="where the random weights go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the weights in --dir for the next run")
    p.add_argument("--skip-tests", action="store_true")
    a = p.parse_args(argv)

    import torch

    from bench.common import write_full_size
    from twig_core import devices

    device = devices.default_device()
    if device.type == "cpu":
        print("gpu_check: no CUDA or MPS device here; nothing to check (the CPU-side proofs are "
              "tests/test_gpu_ready.py)")
        return 0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "Apple MPS"
    print(f"gpu_check on {name}; torch {torch.__version__}", flush=True)
    rows = []
    if not a.skip_tests:
        t0 = time.perf_counter()
        test = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu_ready.py"]
        rc = subprocess.call(test, cwd=ROOT, env={**os.environ, "TWIG_TEST_DEVICE": device.type})
        rows.append(("parity tests on the device", "pass" if rc == 0 else f"FAIL (pytest rc {rc})",
                     f"{time.perf_counter() - t0:.1f}", ""))
    folder = a.dir or tempfile.mkdtemp(prefix="twig_gpu_check_")
    os.makedirs(folder, exist_ok=True)
    try:
        paths = write_full_size(folder)
        for preset in [s.strip() for s in a.presets.split(",") if s.strip()]:
            transformer = paths["transformer"] if preset == "1600M" else _transformer_file(folder, preset)
            for offload in (False, True):
                label = f"{preset} {a.size}² {a.steps} steps" + (" offload" if offload else "")
                capped = offload and device.type == "cuda"
                if capped:
                    total = torch.cuda.get_device_properties(device).total_memory
                    torch.cuda.set_per_process_memory_fraction(min(1.0, a.cap_gib * 2**30 / total), device)
                    label += f", cap {a.cap_gib:g} GiB"
                try:
                    seconds, peak, note = _run(paths, transformer, device, a.size, a.steps, offload)
                    rows.append((label, note, f"{seconds:.1f}", f"{peak:.2f}"))
                except Exception as e:  # noqa: BLE001 - a row of the table, not the end of the check
                    rows.append((label, f"FAIL {type(e).__name__}: {str(e)[:80]}", "", ""))
                finally:
                    if capped:
                        torch.cuda.set_per_process_memory_fraction(1.0, device)
                    devices.clear_cache()
    finally:
        if not a.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"\n| check ({name}) | result (dtypes: transformer/VAE/text) | seconds | peak device GiB |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 1 if any("FAIL" in r[1] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
