"""Batch generation: a prompt file in, one PNG per image out, split over the processes of a torch.distributed run.

``python -m twig_core batch PROMPTS --out DIR`` runs in one process, and the same command under
``torchrun --nproc_per_node N`` (or ``accelerate launch``) splits the work: every image has a fixed place in the
list, rank ``r`` of ``N`` draws images ``r, r + N, r + 2N, ...``. Nothing about an image depends on the process
that draws it, so the files are the same whatever N is (on the same device and preset, with the same threads per
process).

Prompt files:
- ``.txt``: one prompt a line; blank lines and lines starting with ``#`` are skipped.
- ``.jsonl``: one JSON object a line with ``prompt`` and any of the overrides below.
- ``.csv``: a header row naming the columns (``prompt`` and any overrides), then one row a prompt.

Overrides per row: ``negative``, ``seed``, ``width``, ``height``, ``steps``, ``cfg``, ``sampler``, ``shift``,
``count`` (images of the row), ``name`` (file stem), ``scene`` (JSONL only: a demo scene record, scored by
``--eval``). A row's seed is its ``seed`` if given, else the base seed plus the row number (rows numbered from 0
in file order, malformed rows included, so fixing one row never moves another's seed); image ``k`` of a row uses
that seed plus ``k`` (derived seeds wrap at 2**64, :func:`twig_core.sampling.offset_seed`).

Each image is written to a temporary name and renamed when complete, then recorded in the writing rank's
manifest (``manifest.rank{r}.jsonl``, one JSON line per image: parameters, file, seconds, rank). A run finds
finished images by opening them, so a crash or Ctrl-C loses at most the image in flight. When every rank is done,
rank 0 writes ``manifest.jsonl``, all images in list order.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import TwigError

FIELDS = {"prompt": str, "negative": str, "seed": int, "width": int, "height": int, "steps": int, "cfg": float,
          "sampler": str, "shift": float, "count": int, "name": str, "scene": dict, "check_background": bool,
          "loras": str}
MAX_COUNT = 10_000


@dataclass(frozen=True)
class Defaults:
    """Settings of rows that do not override them."""
    negative: str = ""
    seed: int = 0
    width: int | None = None
    height: int | None = None
    steps: int = 20
    cfg: float = 4.5
    sampler: str = "flow_dpmpp_2m"
    shift: float = 3.0
    count: int = 1
    loras: tuple = ()  # (file, strength) pairs for rows that name none


@dataclass(frozen=True)
class Job:
    """One image to draw."""
    index: int  # place in the whole list, which fixes the rank that draws it
    row: int  # row number (0-based, malformed rows included)
    line: int  # line of the prompt file (1-based)
    k: int  # image of the row
    file: str
    prompt: str
    negative: str
    seed: int
    width: int | None
    height: int | None
    steps: int
    cfg: float
    sampler: str
    shift: float
    scene: dict | None = field(default=None, compare=False)
    check_background: bool = True
    loras: tuple = ()  # (file, strength) pairs

    def params(self) -> dict:
        d = asdict(self)
        del d["index"], d["scene"], d["check_background"]
        return d


@dataclass
class BadRow:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


_KIND_WORDS = {int: "a whole number", float: "a number", str: "text", dict: "a JSON object", bool: "true or false"}


def _coerce(name: str, value: Any, where: str):
    """A row's field as its type; None for an empty cell."""
    kind = FIELDS.get(name)
    if kind is None:
        raise TwigError(f"{where}: unknown field {name!r} (known: {', '.join(FIELDS)})")
    if value is None or value == "":
        return None
    if name == "loras" and isinstance(value, list):  # JSONL: ["a.safetensors:0.8", ["b.safetensors", 0.5]]
        value = ", ".join(f"{v[0]}:{v[1]}" if isinstance(v, list) and len(v) == 2 else str(v) for v in value)
    ok = True
    try:
        if kind is bool:
            text = str(value).strip().lower()
            ok = isinstance(value, bool) or text in ("true", "false", "1", "0")
            value = value if isinstance(value, bool) else text in ("true", "1")
        elif isinstance(value, bool) or (kind is not str and kind is not dict and isinstance(value, (dict, list))):
            ok = False
        elif kind is int:
            if isinstance(value, float) and not value.is_integer():
                ok = False
            else:
                value = int(value.strip() if isinstance(value, str) else value)
        elif kind is float:
            value = float(value)
        else:
            ok = isinstance(value, kind)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise TwigError(f"{where}: field {name!r} must be {_KIND_WORDS[kind]}, got {value!r}")
    return value


def _records(path: Path, text: str) -> list[tuple[int, dict | BadRow]]:
    """(line, fields or BadRow) for every prompt row of the file, in order."""
    suffix = path.suffix.lower()
    out: list[tuple[int, dict | BadRow]] = []
    if suffix == ".jsonl":
        for n, raw in enumerate(text.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                out.append((n, BadRow(n, f"not valid JSON ({e.msg} at column {e.colno})")))
                continue
            out.append((n, obj if isinstance(obj, dict) else BadRow(n, "a row must be a JSON object")))
    elif suffix == ".csv":
        reader = csv.reader(io.StringIO(text))
        header = None
        for row in reader:
            n = reader.line_num
            if not any(c.strip() for c in row):
                continue
            if header is None:
                header = [c.strip() for c in row]
                if "prompt" not in header:
                    raise TwigError(f"{path}: the CSV header (line {n}) has no 'prompt' column: {header}")
                continue
            if len(row) > len(header):
                out.append((n, BadRow(n, f"{len(row)} cells, the header names {len(header)}")))
                continue
            out.append((n, dict(zip(header, row))))
    elif suffix in (".txt", ""):
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if line and not line.startswith("#"):
                out.append((n, {"prompt": line}))
    else:
        raise TwigError(f"{path}: unknown prompt file type {suffix!r}; use .txt, .jsonl or .csv")
    return out


def _loras(text: str) -> tuple:
    """A row's ``loras``: "FILE[:STRENGTH], ..." -> ((file, strength), ...)."""
    from .lora import parse_lora_arg

    return tuple(parse_lora_arg(part.strip()) for part in text.split(",") if part.strip())


def read_jobs(path: str | os.PathLike, defaults: Defaults = Defaults()) -> tuple[list[Job], list[BadRow]]:
    """Every image the prompt file asks for, in order, and the rows that could not be read.

    Settings outside the nodes' ranges (:func:`twig_core.sampling.check_settings`) make a row bad; in ``defaults``
    they raise TwigError before the file is read."""
    from .sampling import check_settings, offset_seed

    check_settings(steps=defaults.steps, cfg=defaults.cfg, shift=defaults.shift, width=defaults.width,
                   height=defaults.height, seed=defaults.seed)
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TwigError(f"prompt file {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise TwigError(f"prompt file {path}: not UTF-8 text (byte {e.start})") from None
    jobs: list[Job] = []
    bad: list[BadRow] = []
    for row, (line, rec) in enumerate(_records(path, text)):
        if isinstance(rec, BadRow):
            bad.append(rec)
            continue
        where = f"{path.name} line {line}"
        try:
            values = {k: _coerce(k, v, where) for k, v in rec.items()}
            values = {k: v for k, v in values.items() if v is not None}
            prompt = values.get("prompt")
            if not prompt or not prompt.strip():
                raise TwigError(f"{where}: no prompt")
            count = values.get("count", defaults.count)
            if not 1 <= count <= MAX_COUNT:
                raise TwigError(f"{where}: count must be 1 … {MAX_COUNT}, got {count}")
            seed = values.get("seed", offset_seed(defaults.seed, row))
            stem = values.get("name") or f"{row:05d}"
            if any(c in stem for c in "/\\\0") or stem in (".", ".."):
                raise TwigError(f"{where}: name {stem!r} is not a plain file name")
            try:
                check_settings(steps=values.get("steps", defaults.steps), cfg=values.get("cfg", defaults.cfg),
                               shift=values.get("shift", defaults.shift), width=values.get("width", defaults.width),
                               height=values.get("height", defaults.height), seed=seed)
            except TwigError as e:
                raise TwigError(f"{where}: {e}") from None
            for k in range(count):
                jobs.append(Job(
                    index=len(jobs), row=row, line=line, k=k,
                    file=f"{stem}.png" if count == 1 else f"{stem}_{k:02d}.png",
                    prompt=prompt, negative=values.get("negative", defaults.negative), seed=offset_seed(seed, k),
                    width=values.get("width", defaults.width), height=values.get("height", defaults.height),
                    steps=values.get("steps", defaults.steps), cfg=values.get("cfg", defaults.cfg),
                    sampler=values.get("sampler", defaults.sampler), shift=values.get("shift", defaults.shift),
                    scene=values.get("scene"), check_background=values.get("check_background", True),
                    loras=_loras(values["loras"]) if "loras" in values else tuple(defaults.loras),
                ))
        except TwigError as e:
            bad.append(BadRow(line, str(e).removeprefix(f"{where}: ")))
    # two rows writing one file: the later row is refused, the first keeps its images
    first_line: dict[str, int] = {}
    kept = []
    for j in jobs:
        owner = first_line.setdefault(j.file, j.line)
        if owner == j.line:
            kept.append(j)
        elif not any(b.line == j.line for b in bad):
            bad.append(BadRow(j.line, f"file name {j.file} is also made by line {owner}"))
    bad_lines = {b.line for b in bad}
    jobs = [j for j in kept if j.line not in bad_lines]
    jobs = [Job(**{**asdict(j), "index": i}) for i, j in enumerate(jobs)]
    bad.sort(key=lambda b: b.line)
    return jobs, bad


def is_complete(path: Path) -> bool:
    """A whole, readable PNG (a half-written or damaged file is not)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 - any unreadable file is simply not done
        return False


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _drop_stale(path: Path) -> None:
    """Remove temporary files a stopped run left beside ``path``."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


# ---- the distributed run -------------------------------------------------------------------------------------


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    started: bool = False  # we called init_process_group (so we also tear it down)

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()


def join_world(device: str | None = None) -> World:
    """Join the process group torchrun (or accelerate) set up through the environment; one process without it."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch
    import torch.distributed as dist

    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    started = False
    if not dist.is_initialized():
        cuda = (device or "auto") in ("auto", "cuda") and torch.cuda.is_available()
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        started = True
    return World(rank, size, local, started)


def leave_world(world: World) -> None:
    if world.started:
        import torch.distributed as dist

        dist.destroy_process_group()


class Counter:
    """Images finished by all ranks together, read by rank 0 for the progress bar (the process group's store)."""

    KEY = "twig_batch_done"

    def __init__(self, world: World):
        self.store = None
        if world.size > 1:
            try:
                from torch.distributed import distributed_c10d

                self.store = distributed_c10d._get_default_store()
            except Exception:  # noqa: BLE001 - progress then counts this rank only
                self.store = None
        self.world = world
        self.local = 0

    def add(self, n: int = 1) -> int:
        self.local += n
        if self.store is None:
            return self.local * self.world.size if self.world.size > 1 else self.local
        return int(self.store.add(self.KEY, n))


def _progress_bar(total: int, initial: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # transformers brings tqdm; this is only a fallback
        return None
    return tqdm(total=total, initial=initial, unit="img", disable=not enabled, dynamic_ncols=True)


Draw = Callable[[Job], Any]  # a job -> PIL image (and pnginfo) — see make_drawer


def run(jobs: list[Job], out: str | os.PathLike, draw: Callable[[Job], tuple], world: World | None = None,
        log: Callable[[str], None] | None = None) -> dict:
    """Draw this rank's share of ``jobs`` into ``out``, skipping complete files; returns counts.

    ``draw(job)`` returns ``(PIL image, pnginfo)``. Rank 0 shows one bar for all ranks and, once every rank has
    finished, writes ``manifest.jsonl``."""
    world = world or World()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mine = [j for j in jobs if j.index % world.size == world.rank]
    done_before = sum(1 for j in jobs if is_complete(out / j.file))
    todo = [j for j in mine if not is_complete(out / j.file)]
    counter = Counter(world)
    bar = _progress_bar(len(jobs), done_before, enabled=world.rank == 0)
    manifest = out / f"manifest.rank{world.rank}.jsonl"
    drawn = 0
    try:
        with open(manifest, "a", encoding="utf-8") as mf:
            for job in todo:
                target = out / job.file
                _drop_stale(target)
                t0 = time.perf_counter()
                image, info = draw(job)
                tmp = _temp_name(target)
                image.save(tmp, format="PNG", pnginfo=info)
                # the record first, then the rename: a stop in between leaves a record of a missing image
                # (redrawn next time; manifest.jsonl lists present images only), never an unrecorded image
                mf.write(json.dumps({**job.params(), "seconds": round(time.perf_counter() - t0, 3),
                                     "rank": world.rank}, ensure_ascii=False) + "\n")
                mf.flush()
                os.replace(tmp, target)
                drawn += 1
                total = counter.add(1)
                if bar is not None:
                    bar.n = min(len(jobs), done_before + total)
                    bar.refresh()
    finally:
        if bar is not None and world.size == 1:
            bar.close()
    world.barrier()
    if world.rank == 0:
        if bar is not None:
            bar.n = sum(1 for j in jobs if is_complete(out / j.file))
            bar.close()
        write_manifest(out, jobs)
    return {"drawn": drawn, "skipped": len(mine) - len(todo), "mine": len(mine), "total": len(jobs)}


def write_manifest(out: Path, jobs: list[Job]) -> Path:
    """``manifest.jsonl``: the newest record of every image of ``jobs`` that exists, in list order."""
    latest: dict[str, dict] = {}
    for part in sorted(out.glob("manifest.rank*.jsonl")):
        for raw in part.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if isinstance(rec, dict) and "file" in rec:
                latest[rec["file"]] = rec
    path = out / "manifest.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for j in jobs:
            rec = latest.get(j.file)
            if rec is not None and (out / j.file).exists():
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


# ---- drawing with loaded models -------------------------------------------------------------------------------


def drawer(parts, *, max_length: int = 300, tile_size="auto", model_name: str = "Twig",
           on_step: Callable[[dict], None] | None = None, lora_root: str | os.PathLike | None = None,
           cache: float = 0.0, cfg_interval: tuple[float, float] | None = None) -> Callable[[Job], tuple]:
    """``draw(job) -> (PIL image, pnginfo)`` over models loaded once (``loader.Parts``), one image a call. A job's
    LoRAs are applied for its image (files read once; a name that is no file is looked for in ``lora_root`` and
    among the demo LoRAs, ``catalog.find_lora``). ``cache`` and ``cfg_interval`` (``pipeline.sample_latents``)
    hold for every row."""
    from . import catalog
    from . import image as img
    from .lora import apply_loras, read_lora
    from .pipeline import generate

    native = parts.transformer.config.sample_size * 32
    files: dict[str, Any] = {}

    def lora_file(name: str):
        if name not in files:
            files[name] = read_lora(catalog.find_lora(name, [] if lora_root is None else [str(lora_root)]))
        return files[name]

    def draw(job: Job):
        width, height = job.width or native, job.height or native
        loras = apply_loras(parts.transformer, [(lora_file(f), s) for f, s in job.loras])
        pixels = generate(parts.transformer, parts.vae, parts.text_encoder, job.prompt, job.negative, width=width,
                          height=height, batch_size=1, steps=job.steps, cfg=job.cfg, seed=job.seed,
                          sampler=job.sampler, shift=job.shift, max_length=max_length, tile_size=tile_size,
                          callback=on_step, residency=parts.residency, cache=cache, cfg_interval=cfg_interval)
        info = img.png_info(job.prompt, job.negative, job.steps, job.cfg, job.seed, job.sampler, width, height,
                            model=model_name, loras=loras)
        return img.model_to_pil(pixels)[0], info

    return draw


# ---- scoring --------------------------------------------------------------------------------------------------


def evaluate(prompts: str | os.PathLike, out: str | os.PathLike) -> str:
    """Score what a batch drew with the demo model's pixel evaluator (``python -m training.score``, a program of
    the repository's training recipe, which the engine never imports): a table per prompt language."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    if not (root / "training" / "score.py").is_file():
        raise TwigError(f"--eval needs the repository's training/ folder beside twig_core/ ({root})")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "training.score", str(prompts), str(out)], cwd=root, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise TwigError(f"--eval: scoring failed: {done.stderr.strip()[-2000:]}")
    return done.stdout.rstrip("\n")
