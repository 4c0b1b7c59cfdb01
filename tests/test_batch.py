"""Batch generation (``python -m twig_core batch``): prompt files, fixed seeds per row, the same files from one
process and from two under torchrun (gloo on CPU), resuming after a kill, malformed rows named by line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from twig_core import batch
from twig_core.errors import TwigError

ROOT = Path(__file__).resolve().parents[1]
STEPS = "4"

PROMPTS = [
    {"prompt": "a red circle on the left and a blue square on the right"},
    {"prompt": "左边一个红色的圆，右边一个蓝色的正方形", "seed": 5},
    {"prompt": "a green triangle at the top", "steps": 3},
    {"prompt": "two yellow circles", "count": 2},
    {"prompt": "a blue square in the centre", "cfg": 3.0},
    {"prompt": "上面一个绿色的三角形"},
    {"prompt": "a purple circle", "sampler": "flow_euler"},
    {"prompt": "three red squares", "name": "three"},
    {"prompt": "an orange circle at the bottom"},
    {"prompt": "一个蓝色的圆"},
    {"prompt": "a red circle", "negative": "blue"},
]  # 12 images


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def _env(threads: int = 1) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT), TWIG_DEMO_DIR=env.get("TWIG_DEMO_DIR", ""))
    if not env["TWIG_DEMO_DIR"]:
        del env["TWIG_DEMO_DIR"]
    return env


def _batch_cmd(prompts: Path, out: Path, *extra: str, procs: int = 1) -> list[str]:
    cli = ["-m", "twig_core", "batch", str(prompts), "--out", str(out), "--steps", STEPS, *extra]
    if procs == 1:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), *cli]


def _run(cmd, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _pngs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


# ---- prompt files ---------------------------------------------------------------------------------------------


def test_prompt_files_in_every_format_give_the_same_rows(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("# a comment\na red circle\n\n左边一个红色的圆\n", encoding="utf-8")
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,seed,count\na red circle,,1\n左边一个红色的圆,,\n", encoding="utf-8")
    jsonl = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a red circle"}, {"prompt": "左边一个红色的圆"}])
    defaults = batch.Defaults(seed=40, steps=7)
    got = [batch.read_jobs(p, defaults) for p in (text, csv, jsonl)]
    for jobs, bad in got:
        assert bad == []
        assert [(j.prompt, j.seed, j.steps) for j in jobs] == [("a red circle", 40, 7), ("左边一个红色的圆", 41, 7)]
    assert [j.line for j in got[0][0]] == [2, 4]  # lines of the file, comments and blanks skipped


def test_seeds_are_fixed_by_the_row_not_by_the_rows_around_it(tmp_path):
    rows = [{"prompt": "a"}, "{not json", {"prompt": "b", "count": 3}, {"prompt": "c", "seed": 9, "count": 2}]
    jobs, bad = batch.read_jobs(_write_jsonl(tmp_path / "p.jsonl", rows), batch.Defaults(seed=100))
    # row 1 is malformed, yet row 2 keeps seed 100 + 2: fixing row 1 later moves nobody
    assert [(j.row, j.k, j.seed, j.file) for j in jobs] == [
        (0, 0, 100, "00000.png"), (2, 0, 102, "00002_00.png"), (2, 1, 103, "00002_01.png"),
        (2, 2, 104, "00002_02.png"), (3, 0, 9, "00003_00.png"), (3, 1, 10, "00003_01.png")]
    assert [j.index for j in jobs] == list(range(6))
    assert [b.line for b in bad] == [2] and "not valid JSON" in bad[0].message


@pytest.mark.parametrize("row, words", [
    ({"prompt": "x", "steps": "many"}, "'steps' must be a whole number"),
    ({"prompt": "x", "cfg": [1]}, "'cfg' must be a number"),
    ({"prompt": "x", "colour": "red"}, "unknown field 'colour'"),
    ({"prompt": ""}, "no prompt"),
    ({"prompt": "x", "count": 0}, "count must be"),
    ({"prompt": "x", "name": "../escape"}, "not a plain file name"),
    ([1, 2], "must be a JSON object"),
    ({"prompt": "x", "cfg": -1}, "cfg must be between 0 and 30"),
    ({"prompt": "x", "cfg": 31}, "cfg must be between 0 and 30"),
    ({"prompt": "x", "steps": 0}, "steps must be a whole number 1 … 200"),
    ({"prompt": "x", "shift": 0}, "shift must be > 0"),
    ({"prompt": "x", "width": 100}, "width must be a positive multiple of 32"),
    ({"prompt": "x", "seed": -5}, "seed must be a whole number 0 …"),
])
def test_malformed_rows_are_named_by_line(tmp_path, row, words):
    jobs, bad = batch.read_jobs(_write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, row]))
    assert [j.prompt for j in jobs] == ["fine"]
    assert len(bad) == 1 and bad[0].line == 2 and words in str(bad[0]), bad


@pytest.mark.parametrize("defaults, words", [
    (batch.Defaults(cfg=-1.0), "cfg must be between 0 and 30"),
    (batch.Defaults(steps=0), "steps must be"),
    (batch.Defaults(shift=-3.0), "shift must be > 0"),
    (batch.Defaults(height=70), "height must be"),
    (batch.Defaults(seed=-1), "seed must be a whole number 0 …"),
])
def test_out_of_range_defaults_are_refused_before_reading(tmp_path, defaults, words):
    with pytest.raises(TwigError, match=words):
        batch.read_jobs(_write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}]), defaults)


def test_two_rows_writing_one_file_refuse_the_later_row(tmp_path):
    rows = [{"prompt": "a", "name": "same"}, {"prompt": "b", "name": "same"}]
    jobs, bad = batch.read_jobs(_write_jsonl(tmp_path / "p.jsonl", rows))
    assert [j.prompt for j in jobs] == ["a"] and bad[0].line == 2 and "also made by line 1" in bad[0].message


def test_unreadable_prompt_files_name_the_file(tmp_path):
    with pytest.raises(TwigError, match="nothing.jsonl"):
        batch.read_jobs(tmp_path / "nothing.jsonl")
    other = tmp_path / "p.yaml"
    other.write_text("prompt: x")
    with pytest.raises(TwigError, match=r"p\.yaml.*\.txt, \.jsonl or \.csv"):
        batch.read_jobs(other)
    headless = tmp_path / "p.csv"
    headless.write_text("text,seed\nx,1\n")
    with pytest.raises(TwigError, match="no 'prompt' column"):
        batch.read_jobs(headless)


def test_a_cut_png_is_not_complete(tmp_path):
    from PIL import Image

    path = tmp_path / "a.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(path)
    assert batch.is_complete(path)
    path.write_bytes(path.read_bytes()[:-30])
    assert not batch.is_complete(path)
    assert not batch.is_complete(tmp_path / "missing.png")


# ---- runs with the embedded demo model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The 12 images drawn by one process (one thread), the reference of the tests below."""
    base = tmp_path_factory.mktemp("batch")
    prompts = _write_jsonl(base / "prompts.jsonl", PROMPTS)
    out = base / "one"
    r = _run(_batch_cmd(prompts, out))
    assert r.returncode == 0, r.stderr
    return prompts, out


def test_one_process_draws_every_row_and_records_it(one_process):
    prompts, out = one_process
    files = _pngs(out)
    assert len(files) == 12 and "three.png" in files and "00003_01.png" in files
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["file"] for r in records] == [j.file for j in batch.read_jobs(prompts)[0]]
    zh = next(r for r in records if r["file"] == "00001.png")
    assert zh["prompt"] == "左边一个红色的圆，右边一个蓝色的正方形" and zh["seed"] == 5 and zh["rank"] == 0
    assert all(r["seconds"] > 0 for r in records)
    assert len(set(files.values())) == 12  # distinct seeds and prompts, distinct pictures


def test_two_processes_under_torchrun_write_the_same_files(one_process, tmp_path):
    prompts, reference = one_process
    out = tmp_path / "two"
    r = _run(_batch_cmd(prompts, out, procs=2))
    assert r.returncode == 0, r.stderr[-3000:]
    assert _pngs(out) == _pngs(reference)
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(records) == 12 and {r["rank"] for r in records} == {0, 1}
    for rank in (0, 1):  # each rank wrote only its own share
        mine = (out / f"manifest.rank{rank}.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(mine) == 6 and all(json.loads(line)["rank"] == rank for line in mine)


def test_a_killed_run_resumes_without_duplicates_or_gaps(one_process, tmp_path):
    prompts, reference = one_process
    out = tmp_path / "resumed"
    slow = [sys.executable, "-m", "twig_core", "batch", str(prompts), "--out", str(out), "--steps", "40"]
    proc = subprocess.Popen(slow, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / "manifest.rank0.jsonl"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            if manifest.is_file() and len(manifest.read_text(encoding="utf-8").splitlines()) >= 3:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the first run drew nothing in time")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    first = len(manifest.read_text(encoding="utf-8").splitlines())
    assert 3 <= first < 12
    present = {p.name for p in out.glob("*.png")}
    assert all(batch.is_complete(out / name) for name in present)  # nothing half-written under a final name
    # the same set, at the reference's steps: the 40-step images already there are kept as they are
    r = _run(_batch_cmd(prompts, out))
    assert r.returncode == 0, r.stderr
    files = _pngs(out)
    assert set(files) == set(_pngs(reference))
    own_steps = {j.file for j in batch.read_jobs(prompts)[0] if j.row == 2}  # the row that sets its own steps
    for name, data in files.items():
        assert (data == reference_bytes(reference, name)) == (name not in present or name in own_steps), name
    lines = manifest.read_text(encoding="utf-8").splitlines()
    drawn_again = [json.loads(line)["file"] for line in lines[first:]]
    assert sorted(drawn_again) == sorted(set(files) - present)  # each missing image once, no finished one twice
    final = [json.loads(line)["file"] for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(final) == sorted(files)


def reference_bytes(folder: Path, name: str) -> bytes:
    return (folder / name).read_bytes()


def test_a_malformed_row_is_reported_by_line_and_the_rest_still_run(tmp_path):
    prompts = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a red circle"}, '{"prompt": "broken"',
                                                 {"prompt": "一个蓝色的圆", "steps": "x"}, {"prompt": "a blue square"}])
    out = tmp_path / "out"
    r = _run(_batch_cmd(prompts, out))
    assert r.returncode == 1
    assert "p.jsonl line 2: not valid JSON" in r.stderr and "p.jsonl line 3: field 'steps'" in r.stderr
    assert sorted(_pngs(out)) == ["00000.png", "00003.png"]


def test_eval_scores_rows_that_carry_a_demo_scene(tmp_path):
    from training.evaluate import CATEGORIES, batch_rows
    from training.scenes import generate_records

    _, held = generate_records(0, 2)
    rows = batch_rows(held)
    assert [r["name"] for r in rows] == [f"{held[0]['id']}_en", f"{held[0]['id']}_zh", f"{held[1]['id']}_en",
                                         f"{held[1]['id']}_zh"]
    prompts = _write_jsonl(tmp_path / "heldout.jsonl", rows + [{"prompt": "no scene here"}])
    r = _run(_batch_cmd(prompts, tmp_path / "out", "--eval"))
    assert r.returncode == 0, r.stderr
    table = r.stdout.strip().splitlines()
    assert table[0].split() == ["category", "en", "n", "zh", "n"]
    scored = {line.split()[0]: line.split()[1:] for line in table[1:]}
    assert set(scored) == set(CATEGORIES)
    assert scored["color"][1] == "2" and scored["color"][3] == "2"  # two scenes per language; the plain row is not scored
    assert all(0 <= float(v) <= 1 for row in scored.values() for v in row[0::2] if v != "-")
