"""Score a finished batch with the demo model's pixel evaluator: ``python -m training.score PROMPTS OUT``.

PROMPTS is the prompt file given to ``python -m twig_core batch`` (rows that carry a demo ``scene``, e.g. the
recipe's ``--stage prompts`` output), OUT the folder it drew into. Prints the accuracy of every evaluator category
(colour, count, shape, colour attribution, two objects, position, background) per prompt language; rows without a
scene and images not drawn yet are left out.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

from twig_core.batch import read_jobs

from .evaluate import CATEGORIES, aggregate, evaluate_image


def _language(text: str) -> str:
    return "zh" if any("\u4e00" <= ch <= "\u9fff" for ch in text) else "en"


def score(prompts: str | Path, out: str | Path) -> str:
    jobs, _ = read_jobs(prompts)
    results: dict[str, list] = {}
    for job in jobs:
        path = Path(out) / job.file
        if job.scene is None or not path.is_file():
            continue
        with Image.open(path) as im:
            res = evaluate_image(job.scene, im.convert("RGB"), job.check_background)
        results.setdefault(_language(job.prompt), []).append(res)
    if not results:
        return "nothing to score: no drawn row of the prompt file carries a 'scene'"
    langs = sorted(results)
    table = {lang: aggregate(results[lang]) for lang in langs}
    lines = [f"{'category':<12}" + "".join(f"{lang:>8}{'n':>6}" for lang in langs)]
    for cat in CATEGORIES:
        cells = []
        for lang in langs:
            acc, n = table[lang][cat]["accuracy"], table[lang][cat]["n"]
            cells.append(f"{'-' if n == 0 else f'{acc:.3f}':>8}{n:>6}")
        lines.append(f"{cat:<12}" + "".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    print(score(*args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
