"""The frontend extension's pure logic (web/js/twig_logic.js), tested with node's built-in test runner, and the
extension files' basic shape (ComfyUI imports every web/js/*.js file as an ES module)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JS = ROOT / "web" / "js"


def test_node_test_runner_passes():
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the web/js/*.test.mjs tests need Node.js 18 or newer")
    files = sorted(str(p) for p in JS.glob("*.test.mjs"))
    assert files
    run = subprocess.run([node, "--test", *files], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert re.search(r"^# fail 0$", run.stdout, re.M), run.stdout[-2000:]


def test_extensions_are_es_modules_comfyui_can_import():
    assert '"type": "module"' in (JS / "package.json").read_text("utf-8")  # node reads twig_logic.js as ESM too
    for path in JS.glob("*.js"):
        text = path.read_text("utf-8")
        for spec in re.findall(r'from\s+"([^"]+)"', text):
            assert spec.startswith(("./", "../../../scripts/")), (path.name, spec)
            if spec.startswith("./"):
                assert (JS / spec[2:]).is_file(), (path.name, spec)
        if "registerExtension" in text:
            assert re.search(r'name:\s*"twig\.', text), path.name
    assert not list(JS.glob("*.test.js")), "tests must be .mjs: ComfyUI loads every .js file in the browser"
