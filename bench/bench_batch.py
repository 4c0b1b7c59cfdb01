"""Batch throughput: images per second of ``python -m twig_core batch`` with one process and with N processes under
torchrun (gloo), each process one thread, on the embedded demo model; the files of both runs must be identical.

    python bench/bench_batch.py                  # 48 images, 20 steps, N = 2
    python bench/bench_batch.py --images 96 --procs 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ["circle", "square", "triangle"]
COLOURS = ["red", "blue", "green", "yellow"]
PLACES = ["on the left", "on the right", "at the top", "at the bottom"]


def prompts(n: int) -> list[dict]:
    return [{"prompt": f"a {COLOURS[i % 4]} {SHAPES[i % 3]} {PLACES[(i // 3) % 4]}"} for i in range(n)]


def run(prompt_file: Path, out: Path, steps: int, procs: int) -> float:
    cli = ["-m", "twig_core", "batch", str(prompt_file), "--out", str(out), "--steps", str(steps)]
    cmd = [sys.executable, *cli] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), *cli]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--procs", type=int, default=2)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        file = tmp / "prompts.jsonl"
        file.write_text("".join(json.dumps(r) + "\n" for r in prompts(a.images)), encoding="utf-8")
        one = run(file, tmp / "one", a.steps, 1)
        many = run(file, tmp / "many", a.steps, a.procs)
        same = all((tmp / "one" / f.name).read_bytes() == f.read_bytes() for f in (tmp / "many").glob("*.png"))
    print(f"{a.images} images, {a.steps} steps, 128², one thread per process (wall time incl. start-up and loading)")
    print(f"{'processes':<10}{'seconds':>10}{'images/s':>10}")
    print(f"{1:<10}{one:>10.1f}{a.images / one:>10.2f}")
    print(f"{a.procs:<10}{many:>10.1f}{a.images / many:>10.2f}")
    print(f"scaling {one / many:.2f}x with {a.procs} processes; identical files: {same}")


if __name__ == "__main__":
    main()
