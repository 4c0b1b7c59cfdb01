"""The standalone Twig tab in a real browser: Debian's Chromium, headless, driven by Playwright.

Starts ``python -m twig_webui`` on a free localhost port with the embedded demo model (or, until it is
installed, a tiny random pipeline folder of the same layout), types a Chinese prompt, presses Generate, waits
for the image in the gallery, fetches that image's URL from inside the page and reads the PNG's
"parameters" text chunk (prompt and seed must be there, byte-identical to the saved file); then starts a long
run, waits for its progress text, presses Interrupt and expects "Interrupted" with nothing saved; then checks
that an error is shown in the page. A screenshot is saved to ``$TWIG_TEST_ARTIFACTS`` (default
``tests/artifacts/``) and its path printed.

Needs: ``apt-get install chromium`` (``fonts-wqy-microhei`` for Chinese glyphs in the screenshot) and
``pip install -r requirements-webui-test.txt``; skipped otherwise, unless ``TWIG_REQUIRE_BROWSER=1`` (CI), which
turns a missing piece into a failure.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("TWIG_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPT = "左边一个红色的圆，右边一个蓝色的正方形"
SEED = 1234
STEPS = 4


def _requirements() -> str | None:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    for module, what in (("playwright", "playwright"), ("gradio", "gradio")):
        try:
            __import__(module)
        except ImportError:
            return f"{what} is not installed (pip install -r requirements-webui-test.txt)"
    return None


_MISSING = _requirements()
if _MISSING and os.environ.get("TWIG_REQUIRE_BROWSER"):  # CI sets it: a missing browser fails, never skips
    raise RuntimeError(f"TWIG_REQUIRE_BROWSER is set but {_MISSING}")
if _MISSING:
    pytestmark = [pytest.mark.browser, pytest.mark.skip(reason=_MISSING)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _artifacts() -> Path:
    out = Path(os.environ.get("TWIG_TEST_ARTIFACTS") or ROOT / "tests" / "artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def model(request) -> Path:
    from twig_core.catalog import demo_dir

    demo = demo_dir()
    return Path(demo) if demo else request.getfixturevalue("tiny_pipeline")


@pytest.fixture(scope="module")
def server(tmp_path_factory, model):
    """The standalone app on a free port; yields (url, output folder); stopped afterwards."""
    work = tmp_path_factory.mktemp("webui_server")
    port = _free_port()
    outdir = work / "outputs"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT),
           "GRADIO_TEMP_DIR": str(work / "gradio_tmp"), "NO_PROXY": "127.0.0.1,localhost"}
    log = open(work / "server.log", "w+", encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, "-m", "twig_webui", "--model", str(model), "--models-dir", str(work / "models"),
         "--outdir", str(outdir), "--port", str(port), "--device", "cpu"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"the standalone app exited with {proc.returncode}:\n{log.read()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"the standalone app did not answer on {url} within 120 s:\n{log.read()}")
            time.sleep(0.5)
        yield url, outdir
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:  # Playwright gives the browser a fresh, empty profile of its own
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1280, "height": 1100})
        pg.set_default_timeout(60_000)
        pg.goto(server[0], wait_until="domcontentloaded")
        pg.wait_for_selector("#twig_prompt textarea")
        yield pg
        browser.close()


def _set_number(page, selector: str, value) -> None:
    box = page.locator(selector).first
    box.fill(str(value))
    box.press("Enter")


FETCH_BASE64 = """async (src) => {
    const r = await fetch(src);
    const bytes = new Uint8Array(await r.arrayBuffer());
    let s = "";
    for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    return btoa(s);
}"""


def test_chinese_prompt_generates_an_image_with_png_info(page, server):
    url, outdir = server
    started = time.monotonic()
    page.fill("#twig_prompt textarea", PROMPT)
    _set_number(page, "#twig_steps input[type=number]", STEPS)
    _set_number(page, "#twig_seed input", SEED)
    page.click("#twig_generate")
    page.wait_for_selector("#twig_gallery img", timeout=180_000)
    page.wait_for_function("document.querySelector('#twig_status').innerText.includes('seed')")
    seconds = time.monotonic() - started
    status = page.inner_text("#twig_status")
    assert f"seed {SEED}" in status, status

    src = page.locator("#twig_gallery img").first.get_attribute("src")
    data = base64.b64decode(page.evaluate(FETCH_BASE64, src))
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    params = image.text.get("parameters", "")
    assert params.splitlines()[0] == PROMPT, params
    assert f"Seed: {SEED}," in params and f"Steps: {STEPS}," in params, params
    saved = sorted(Path(outdir).rglob("*.png"))
    assert len(saved) == 1 and saved[0].read_bytes() == data  # served as saved: no re-encoding
    assert PROMPT in page.inner_text("#twig_info")

    shot = _artifacts() / "webui_generate.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot: {shot} (generated in {seconds:.1f}s, image at {src})")


def test_progress_shows_and_interrupt_stops_a_long_run(page, server):
    url, outdir = server
    before = sorted(Path(outdir).rglob("*.png"))
    page.fill("#twig_prompt textarea", "a green triangle above a yellow circle")
    _set_number(page, "#twig_steps input[type=number]", 100)
    _set_number(page, "#twig_batch input[type=number]", 8)
    page.click("#twig_generate")
    # gradio shows the engine's progress text ("step i/100") while the run goes on
    page.wait_for_function("/step \\d+\\/100/.test(document.body.innerText)", timeout=120_000)
    page.click("#twig_interrupt")
    page.wait_for_function("document.querySelector('#twig_status').innerText.includes('Interrupted')",
                           timeout=120_000)
    assert sorted(Path(outdir).rglob("*.png")) == before  # nothing saved
    _set_number(page, "#twig_steps input[type=number]", STEPS)
    _set_number(page, "#twig_batch input[type=number]", 1)


def test_errors_show_in_the_page(page, server):
    page.fill("#twig_prompt textarea", "")
    page.click("#twig_generate")
    page.wait_for_function("document.querySelector('#twig_status').innerText.includes('Error')")
    assert "write a prompt" in page.inner_text("#twig_status")
    shot = _artifacts() / "webui_error.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot: {shot}")
