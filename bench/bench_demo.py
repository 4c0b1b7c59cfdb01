"""Speed of a demo-sized pipeline, prompt to pixels: one picture (text encoding, 20 sampling steps with CFG,
decode), best of several runs, for each pipeline folder given (the shipped embedded model by default; a 256²
one from ``python -m training demo --size 256 --stage export``).

    python bench/bench_demo.py [FOLDER[:SIZE] ...] [--repeat 3] [--steps 20]

SIZE is the picture side (default 128). The demo model's target: at most 1 s per picture on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "a red triangle on the left and a blue square on the right"


def main(argv=None) -> None:
    import torch

    from twig_core.catalog import DEMO_DIR
    from twig_core.loader import load_pipeline
    from twig_core.pipeline import generate

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="*", default=[f"{DEMO_DIR}:128"], help="pipeline folder[:picture side]")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args(argv)
    print(f"demo pipelines, prompt -> pixels, {a.steps} steps, CFG 4.5, cpu, {torch.get_num_threads()} torch threads, "
          f"{time.strftime('%Y-%m-%d')}")
    for spec in a.folders:
        folder, _, size = spec.rpartition(":") if spec.rsplit(":", 1)[-1].isdigit() else (spec, "", "128")
        parts = load_pipeline(folder, dtype=torch.float32)
        best = float("inf")
        for _ in range(a.repeat):
            start = time.perf_counter()
            with torch.no_grad():
                generate(parts.transformer, parts.vae, parts.text_encoder, PROMPT, width=int(size), height=int(size),
                         steps=a.steps, cfg=4.5, seed=1)
            best = min(best, time.perf_counter() - start)
        print(f"  {folder} at {size}²: {best:.3f} s per picture (best of {a.repeat})")


if __name__ == "__main__":
    main()
