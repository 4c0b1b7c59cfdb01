"""The 256² demo model in one command: ``python -m training demo256 --work DIR``.

It runs the ``demo`` stages in the order that made twig_core/demo_model_256: a work folder seeded from the
shipped 128² model, its DC-AE's decoder tuned on 256² pictures, then five DiT cycles, each a fresh run (new
optimizer state, one cosine cycle) starting from the export of the one before; the last three draw the scenes with
the shapes the model found hardest more often (``--dit-focus``). Each cycle's export is DIR/cycleN (a pipeline
folder; its DiT's checkpoint, log and averaged weights are moved into DIR/cycleN/training once it is written), and
the last is scored by the eval stage. Every step resumes: rerun the command after a stop and finished cycles are
skipped, a cycle under way goes on from its checkpoint. About 9 h on an idle 2-core Xeon with AVX512 (the DiT at
1.2 s a step, OMP_NUM_THREADS=2); options after the work folder (e.g. ``--save-minutes``) go to every stage.
The shipped model then takes DIR/cycle5/transformer.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

# options of every step
COMMON = ("--size", "256", "--fp32", "--dit-restart", "none", "--dit-warmup", "100")
# the first step: seed, render the data, encode the 256² latents, tune the decoder at 256²
PREPARE = ("--stage", "seed", "data", "latents", "decoder", "--decoder-steps", "700")
# (steps, peak learning rate, --dit-focus) of each DiT cycle; the first starts from the 128² model's DiT
CYCLES = (
    (6000, 2e-4, ()),
    (4300, 1.5e-4, ()),
    (5500, 1.5e-4, ("star=3", "cross=2", "ring=2", "center=2")),
    (5000, 1.5e-4, ("star=3", "cross=3", "ring=2")),
    (3000, 1.5e-4, ("star=3", "cross=3", "ring=2", "diamond=2")),
)
# what a DiT run leaves in DIR/size256, kept with its cycle's export
DIT_FILES = ("dit.ckpt", "dit.log", "dit_ema.pt")


def main(argv) -> int:
    from .__main__ import main as demo

    p = argparse.ArgumentParser(prog="python -m training demo256", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="working folder (data, checkpoints, logs, each cycle's export)")
    a, extra = p.parse_known_args(argv)
    work = Path(a.work)
    base = ["demo", "--work", str(work), *extra, *COMMON]
    demo([*base, *PREPARE])
    prev = None
    for i, (steps, lr, focus) in enumerate(CYCLES, 1):
        out = work / f"cycle{i}"
        done, moving = out / "training", out / "training.partial"
        if not done.is_dir():
            if not moving.is_dir():  # the DiT run (or its resumption, or nothing left of it) and its export
                init = [] if prev is None else ["--dit-init", str(prev)]
                focus_args = ["--dit-focus", *focus] if focus else []
                demo([*base, "--stage", "dit", "--dit-steps", str(steps), "--lr", str(lr), *init, *focus_args])
                demo([*base, "--stage", "export", "--out", str(out)])
                moving.mkdir()
            for name in DIT_FILES:  # the next cycle starts afresh, from this export
                if (work / "size256" / name).exists():
                    shutil.move(str(work / "size256" / name), str(moving / name))
            moving.rename(done)
        prev = out
    demo([*base, "--stage", "eval", "--out", str(prev)])
    return 0
