"""The core benchmarks in one run: a transformer CFG step and a DC-AE decode, twig_core vs diffusers.

    python bench/run_all.py                       # quick: 2 of 20 layers at 1024², decode at 512²
    python bench/run_all.py --layers 20 --decode-size 1024
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--size", type=int, default=1024, help="transformer image side")
    p.add_argument("--decode-size", type=int, default=512)
    a = p.parse_args()
    subprocess.run([sys.executable, str(HERE / "bench_transformer.py"), "--layers", str(a.layers), "--size",
                    str(a.size)], check=True)
    subprocess.run([sys.executable, str(HERE / "bench_dcae.py"), "--size", str(a.decode_size)], check=True)


if __name__ == "__main__":
    main()
