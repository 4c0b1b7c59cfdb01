"""Project rules that are cheap to check and easy to break."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    command = next(line for line in ci.splitlines() if "pytest" in line and not line.startswith("#"))
    assert command.strip() in readme


def test_engine_never_imports_host_or_reference_code():
    # hosts, UIs, reference code, and the training recipe (which uses the engine, never the other way round)
    banned = re.compile(r"^\s*(import|from)\s+(comfy|folder_paths|gradio|diffusers|nodes|modules|twig_webui|training)\b",
                        re.M)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "twig_core").rglob("*.py") if banned.search(p.read_text("utf-8"))]
    assert offenders == []


def test_runtime_requirements_are_lower_bounds_without_test_tools():
    reqs = [l.split("#")[0].strip() for l in (ROOT / "requirements.txt").read_text().splitlines()]
    reqs = [r for r in reqs if r]
    names = {re.split(r"[<>=!~ ]", r)[0].lower() for r in reqs}
    assert names == {"torch", "transformers", "safetensors", "numpy", "pillow", "einops", "tqdm"}
    assert all("==" not in r and "<" not in r for r in reqs), reqs


def test_pickles_are_never_loaded_unsafely():
    unsafe = []
    for p in list((ROOT / "twig_core").rglob("*.py")) + list((ROOT / "nodes").rglob("*.py")):
        for line in p.read_text("utf-8").splitlines():
            if "torch.load(" in line and "weights_only=True" not in line:
                unsafe.append(f"{p.name}: {line.strip()}")
            if "trust_remote_code=True" in line:
                unsafe.append(f"{p.name}: {line.strip()}")
    assert unsafe == []
