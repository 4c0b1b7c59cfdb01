"""The example workflows (workflows/) in a real ComfyUI, against a server started by run_check.sh (or by hand) that
has client.py's tiny models.

    python workflows_check.py make-models COMFY_MODELS_DIR DEMO_DIR
        tiny TIPO model into COMFY_MODELS_DIR/LLM; when the pack carries no demo model (twig_core/demo_model), a
        tiny stand-in pipeline into DEMO_DIR. Prints the folder to start ComfyUI with as TWIG_DEMO_DIR, or "".
    python workflows_check.py check --url URL --output OUTPUT_DIR
    python workflows_check.py browser --url URL --out DIR [--chromium PATH]

``check`` POSTs every API workflow (workflows/api/*.json) to /prompt and waits for it: the demo-model workflows
exactly as committed; the others with the loaders switched to the tiny models (their real weights are not here),
everything else as committed (sizes, steps, the 2048² tiles, example.png, the opencv_haar detector) but the tiny
TIPO model's answer length. It reports
which completed, checks image sizes, the TIPO node's expanded prompt in the history, the token-count route, and
that ComfyUI lists the UI workflows as this pack's templates.

``browser`` opens ComfyUI's frontend in headless Chromium and, for every UI workflow: loads it (and its PNG, the
way a dropped file is read), converts it with the frontend's own graphToPrompt and compares that with the
committed API form; reads the live token count under the demo prompts; runs the TIPO workflow (tiny models) and
waits for the expanded prompt to show on the node; runs the demo workflow and saves a screenshot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import client as C  # noqa: E402

sys.path.insert(0, C.REPO)
sys.path.insert(0, os.path.join(C.REPO, "workflows"))
from workflow_runner import with_models  # noqa: E402
from twig_core.catalog import DEMO_NAME, DEMO_NAMES  # noqa: E402

WF_DIR = os.path.join(C.REPO, "workflows")
TIPO_NAME = f"{C.PREFIX}_tipo/"
PACK = "twig"  # the folder name run_check.sh links the pack under
TINY = {"model": C.NAMES["model"], "text_encoder": C.NAMES["text_encoder"], "vae": C.NAMES["vae"], "tipo": TIPO_NAME}
TINY_OVERRIDES = {"TwigTIPO": {"max_new_tokens": 48}}
EXPECTED_SIZE = {"demo_native_text_to_image": (128, 128), "demo_native_image_to_image": (128, 128),
                 "demo_text_to_image": (128, 128), "demo_image_to_image": (128, 128), "large_2048_tiled": (2048, 2048),
                 "demo_256_text_to_image": (256, 256),
                 "image_to_image": (768, 768), "text_to_image": (1024, 1024)}


def names() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(os.path.join(WF_DIR, "api")) if f.endswith(".json"))


def load(name: str, api: bool) -> dict:
    path = os.path.join(WF_DIR, "api" if api else "", f"{name}.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def is_demo(api: dict) -> bool:
    values = [e["inputs"].get(f) for e in api.values()
              for ct, f in (("TwigModelLoader", "model_name"), ("TwigTextEncoderLoader", "text_encoder_name"),
                            ("TwigVAELoader", "vae_model")) if e["class_type"] == ct]
    return bool(values) and all(v in DEMO_NAMES for v in values)


def prepared(name: str) -> tuple[dict, str]:
    api = load(name, api=True)
    if is_demo(api):
        return api, "as committed"
    # the tiny random TIPO model rarely stops by itself: cap its answer so the run takes seconds, not minutes
    return with_models(api, TINY, **TINY_OVERRIDES), "loaders switched to the tiny models"


# --------------------------------------------------------------------------------------------------
# API


def check_templates(url: str) -> None:
    listed = C.get_json(url + "/workflow_templates").get(PACK, [])
    C.expect(sorted(listed) == names(), f"ComfyUI lists the pack's {len(listed)} UI workflows as templates")
    status, body = C.get(f"{url}/api/workflow_templates/{PACK}/demo_text_to_image.json")
    C.expect(status == 200 and json.loads(body) == load("demo_text_to_image", api=False),
             "template demo_text_to_image.json served as committed")
    thumbs = [n for n in names() if C.get(f"{url}/api/workflow_templates/{PACK}/{n}.jpg")[1][:3] == b"\xff\xd8\xff"]
    C.expect(thumbs == names(), f"template thumbnails (<workflow>.jpg, what the template browser loads) served for "
                                f"{len(thumbs)} of {len(names())} workflows")


def check_token_route(url: str) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("twig_workflow_build", os.path.join(WF_DIR, "build.py"))
    build = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    ZH_LONG_PROMPT = build.ZH_LONG_PROMPT

    for name in (C.NAMES["text_encoder"], DEMO_NAME):
        status, body = C.post_json(url + "/twig/token_count", {"text_encoder": name, "max_tokens": 300,
                                                              "positive": ZH_LONG_PROMPT, "negative": "blurry"})
        C.expect(status == 200 and body["positive"]["tokens"] > body["positive"]["kept"] > 0
                 and body["negative"]["tokens"] > 0,
                 f"POST /twig/token_count with {name}: positive {body.get('positive')}, negative {body.get('negative')}")
    status, body = C.post_json(url + "/twig/token_count", {"text_encoder": "no_such_model/", "positive": "x"})
    C.expect(status == 404 and "not found" in body["error"], f"unknown text encoder answered 404: {body}")


def run_workflow(url: str, output_dir: str, name: str, info: dict) -> dict:
    api, how = prepared(name)
    for nid, e in api.items():
        if e["class_type"] in ("TwigFaceRefine", "TwigFaceDetect"):
            det = e["inputs"]["detector"]
            if det not in info[e["class_type"]]["input"]["required"]["detector"][0]:
                return {"name": name, "status": "skipped", "why": f"detector {det} is not installed in this ComfyUI"}
    t0 = time.time()
    entry = C.wait_history(url, C.queue_prompt(url, api), timeout=1800)
    took = time.time() - t0
    if entry["status"]["status_str"] != "success":
        err = C.messages(entry).get("execution_error", {})
        raise C.CheckFailed(f"{name} failed in {err.get('node_type')}: {err.get('exception_type')}: "
                            f"{err.get('exception_message')}")
    from PIL import Image

    sizes = []
    for nid, e in api.items():
        if e["class_type"] != "SaveImage":
            continue
        images = entry["outputs"][nid]["images"]
        path = os.path.join(output_dir, images[0].get("subfolder", ""), images[0]["filename"])
        with Image.open(path) as im:
            sizes.append(im.size)
    if name in EXPECTED_SIZE:
        C.expect(all(s == EXPECTED_SIZE[name] for s in sizes), f"{name}: images are {sizes}")
    tipo = [nid for nid, e in api.items() if e["class_type"] == "TwigTIPO"]
    for nid in tipo:
        text = entry["outputs"][nid]["text"][0]
        C.expect(text.startswith("1girl,") and "red hair" in text, f"{name}: TIPO's expanded prompt in the history "
                                                                   f"for the frontend: {text[:60]!r}...")
    C.expect(True, f"{name} ({how}): completed in {took:.1f}s, images {sizes}")
    return {"name": name, "status": "completed", "how": how, "seconds": round(took, 1), "images": sizes}


def check(url: str, output_dir: str) -> list[dict]:
    info = C.get_json(url + "/object_info")
    for cls, field in (("TwigModelLoader", "model_name"), ("TwigTextEncoderLoader", "text_encoder_name"),
                       ("TwigVAELoader", "vae_model")):
        choices = info[cls]["input"]["required"][field][0]
        C.expect(choices and choices[0] == DEMO_NAME, f"{cls}.{field} lists '{DEMO_NAME}' first")
    check_templates(url)
    check_token_route(url)
    report = [run_workflow(url, output_dir, name, info) for name in names()]
    return report


# --------------------------------------------------------------------------------------------------
# Browser

LOAD_AND_CONVERT_JS = """
(async () => {
  const app = window.comfyAPI.app.app;
  await app.loadGraphData(WORKFLOW, true, true, NAME);
  await new Promise((r) => setTimeout(r, 300));
  const p = await app.graphToPrompt();
  return p.output;
})()
"""

OVERLAPS_JS = """
(() => {
  // nodes of the loaded graph whose boxes (title bar included, grown to the frontend's own minimum) overlap
  const T = window.LiteGraph.NODE_TITLE_HEIGHT;
  const boxes = window.comfyAPI.app.app.graph._nodes.map((n) => {
    const min = n.computeSize ? n.computeSize() : [0, 0];
    const w = Math.max(n.size[0], min[0]), h = Math.max(n.size[1], min[1]);
    return [n.title || n.type, n.pos[0], n.pos[1] - T, n.pos[0] + w, n.pos[1] + h];
  });
  const out = [];
  for (let i = 0; i < boxes.length; i++)
    for (let j = i + 1; j < boxes.length; j++) {
      const a = boxes[i], b = boxes[j];
      if (a[1] < b[3] && b[1] < a[3] && a[2] < b[4] && b[2] < a[4]) out.push(a[0] + " / " + b[0]);
    }
  return out;
})()
"""

DROP_PNG_JS = """
(async () => {
  const app = window.comfyAPI.app.app;
  app.graph.clear();
  const r = await fetch(URL);
  const blob = await r.blob();
  await app.handleFile(new File([blob], NAME + ".png", {type: "image/png"}));
  await new Promise((r) => setTimeout(r, 500));
  const p = await app.graphToPrompt();
  return p.output;
})()
"""

TOKEN_TEXT_JS = """
(() => {
  const app = window.comfyAPI.app.app;
  return app.graph._nodes.filter((n) => n.type === "TwigTextEncode")
    .map((n) => { const w = n.widgets.find((w) => w.name === "twig_token_count"); return w ? String(w.value) : null; });
})()
"""

SET_AND_QUEUE_JS = """
(async () => {
  const app = window.comfyAPI.app.app;
  const set = VALUES;  // {node type: {widget: value}}
  for (const n of app.graph._nodes) {
    for (const [k, v] of Object.entries(set[n.type] || {})) {
      const w = n.widgets.find((w) => w.name === k);
      if (w) w.value = v;
    }
  }
  await app.queuePrompt(0, 1);
  return true;
})()
"""

EXPANDED_JS = """
(() => {
  const app = window.comfyAPI.app.app;
  const n = app.graph._nodes.find((n) => n.type === "TwigTIPO");
  const w = n && n.widgets.find((w) => w.name === "expanded_prompt");
  return w ? String(w.value) : null;
})()
"""

IMAGES_JS = """
(() => window.comfyAPI.app.app.graph._nodes.filter((n) => n.type === "SaveImage").map((n) => (n.imgs || []).length))()
"""

SAVED_JS = """
(() => {
  const app = window.comfyAPI.app.app;
  const w = app.graph.serialize();
  return w.nodes.filter((n) => n.type === "TwigTextEncode" || n.type === "TwigTIPO").map((n) => n.widgets_values.length);
})()
"""


def js(template: str, **values) -> str:
    for k, v in values.items():
        template = template.replace(k, json.dumps(v))
    return template


async def wait_for(page, expr, ok, timeout, what):
    t0 = time.time()
    value = None
    while time.time() - t0 < timeout:
        value = await page.evaluate(expr)
        if ok(value):
            return value
        await asyncio.sleep(1)
    raise C.CheckFailed(f"{what}: gave up after {timeout}s (last value {value!r})")


async def browser(url: str, out_dir: str, chromium: str) -> None:
    from browser_check import open_page, screenshot

    async with open_page(chromium, url, window="1800,1000") as page:
        await wait_for(page, "!!(window.comfyAPI && window.comfyAPI.app && window.comfyAPI.app.app "
                             "&& window.comfyAPI.app.app.graph && window.LiteGraph)", bool, 120, "frontend load")
        await asyncio.sleep(3)
        loaded = await page.evaluate("window.comfyAPI.app.app.extensions.map((e) => e.name)")
        for ext in ("twig.TokenCount", "twig.TipoPrompt"):
            C.expect(ext in (loaded or []), f"the frontend loaded the extension {ext}")
        for name in names():
            ui, api = load(name, api=False), load(name, api=True)
            got = await page.evaluate(js(LOAD_AND_CONVERT_JS, WORKFLOW=ui, NAME=name), await_promise=True)
            C.expect(got == api, f"{name}: the frontend loads the UI JSON and converts it to the committed API JSON"
                     + ("" if got == api else f"\n  got {json.dumps(got)[:1500]}"))
            crowded = await page.evaluate(OVERLAPS_JS)
            C.expect(not crowded, f"{name}: no two nodes overlap in the frontend ({'; '.join(crowded or [])})")
            got = await page.evaluate(js(DROP_PNG_JS, URL=f"/api/workflow_templates/{PACK}/{name}.png", NAME=name),
                                      await_promise=True)
            C.expect(got == api, f"{name}: dropping {name}.png loads the same graph")
            counts = await page.evaluate(SAVED_JS)
            ui_counts = [len(n["widgets_values"]) for n in ui["nodes"] if n["type"] in ("TwigTextEncode", "TwigTIPO")]
            C.expect(counts == ui_counts, f"{name}: saving again keeps the widget values as committed "
                                          f"(display widgets are not saved): {counts}")

        # live token count on the demo workflow, then run it
        await page.evaluate(js(LOAD_AND_CONVERT_JS, WORKFLOW=load("demo_text_to_image", False),
                               NAME="demo_text_to_image"), await_promise=True)
        texts = await wait_for(page, TOKEN_TEXT_JS, lambda v: v and all(t and re.match(r"tokens: \d+ / 300", t) for t in v),
                               30, "live token count under the demo prompts")
        C.expect(True, f"live token count under both demo prompts: {texts}")
        await asyncio.sleep(1)
        await screenshot(page, out_dir, "comfyui_demo_workflow_loaded.png")
        await page.evaluate(js(SET_AND_QUEUE_JS, VALUES={}), await_promise=True)
        await wait_for(page, IMAGES_JS, lambda v: v and all(x > 0 for x in v), 600, "demo workflow images")
        C.expect(True, "demo workflow queued from the page shows its images")
        await asyncio.sleep(2)
        await screenshot(page, out_dir, "comfyui_demo_workflow.png")

        # TIPO workflow with the tiny models: the expanded prompt appears on the TIPO node
        await page.evaluate(js(LOAD_AND_CONVERT_JS, WORKFLOW=load("tipo_text_to_image", False),
                               NAME="tipo_text_to_image"), await_promise=True)
        tiny = {"TwigModelLoader": {"model_name": TINY["model"]},
                "TwigTextEncoderLoader": {"text_encoder_name": TINY["text_encoder"]},
                "TwigVAELoader": {"vae_model": TINY["vae"]},
                "TwigTIPO": {"model": TIPO_NAME, **TINY_OVERRIDES["TwigTIPO"]}}
        await page.evaluate(js(SET_AND_QUEUE_JS, VALUES=tiny), await_promise=True)
        text = await wait_for(page, EXPANDED_JS, lambda v: bool(v), 900, "expanded prompt on the TIPO node")
        C.expect(text.startswith("1girl,") and "red hair" in text, f"TIPO node shows the expanded prompt: {text[:70]!r}...")
        await wait_for(page, IMAGES_JS, lambda v: v and all(x > 0 for x in v), 900, "TIPO workflow image")
        await screenshot(page, out_dir, "comfyui_tipo_workflow.png")
        errors = [e for e in page.errors() if "twig" in e.lower()]
        C.expect(not errors, f"no page errors from the pack{'' if not errors else ': ' + ' | '.join(errors)}")


# --------------------------------------------------------------------------------------------------


def make_models(models_dir: str, demo_dir: str) -> str:
    from tests.builders import save_tiny_tipo_folder
    from twig_core.catalog import DEMO_DIR, is_pipeline_folder

    save_tiny_tipo_folder(os.path.join(models_dir, "LLM", TIPO_NAME.rstrip("/")))
    if is_pipeline_folder(str(DEMO_DIR)):
        return ""
    from tests.builders import write_demo_pipeline

    write_demo_pipeline(demo_dir)
    return demo_dir


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-models")
    mk.add_argument("models_dir")
    mk.add_argument("demo_dir")
    ck = sub.add_parser("check")
    ck.add_argument("--url", default="http://127.0.0.1:8188")
    ck.add_argument("--output", required=True)
    br = sub.add_parser("browser")
    br.add_argument("--url", required=True)
    br.add_argument("--out", required=True)
    br.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "")
    a = ap.parse_args()
    sys.path.insert(0, WF_DIR)
    if a.cmd == "make-models":
        import contextlib

        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the folder name
            folder = make_models(a.models_dir, a.demo_dir)
        print(folder)
        return 0
    try:
        if a.cmd == "check":
            report = check(a.url, a.output)
            C.log("workflows in ComfyUI:")
            for r in report:
                detail = f"{r['how']}, {r['seconds']}s, images {r['images']}" if r["status"] == "completed" else r["why"]
                C.log(f"  {r['name']}: {r['status']} ({detail})")
            if any(r["status"] != "completed" for r in report):
                C.log("note: skipped workflows did not run (see why above)")
        else:
            if not a.chromium:
                C.log("no chromium found: browser check of the workflows skipped")
                return 0
            asyncio.run(browser(a.url, a.out, a.chromium))
    except C.CheckFailed as e:
        C.log(f"FAILED: {e}")
        return 1
    C.log(f"workflow {a.cmd} passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
