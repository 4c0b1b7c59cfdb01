"""Look at the pack in ComfyUI's own frontend with headless Chromium (optional part of run_check.sh).

    python browser_check.py --url http://127.0.0.1:8188 --out DIR [--chromium /usr/bin/chromium]

Builds the text-to-image graph in the page out of the Twig nodes (every Twig node must be creatable by
the frontend), queues it from the page, waits for the token report to appear on the Twig Text Encode node
(web/js/twig_token_report.js), saves a screenshot, and fails on page errors. Talks to Chromium over the
DevTools protocol with aiohttp (a ComfyUI requirement).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from client import NAMES, CheckFailed, expect, log

GRAPH_JS = """
(async () => {
  const app = window.comfyAPI.app.app;
  const LG = window.LiteGraph;
  app.graph.clear();
  const add = (type, x, y, values) => {
    const n = LG.createNode(type);
    if (!n) throw new Error("frontend cannot create node " + type);
    n.pos = [x, y];
    app.graph.add(n);
    for (const [k, v] of Object.entries(values || {})) {
      const w = n.widgets.find((w) => w.name === k);
      if (!w) throw new Error(type + " has no widget " + k);
      w.value = v;
    }
    return n;
  };
  const model = add("TwigModelLoader", 20, 20, {model_name: NAMES.model, dtype: "auto"});
  const te = add("TwigTextEncoderLoader", 20, 160, {text_encoder_name: NAMES.text_encoder, device: "cpu"});
  const vae = add("TwigVAELoader", 20, 360, {vae_model: NAMES.vae});
  const enc = add("TwigTextEncode", 380, 160, {positive: PROMPT, negative: "blurry"});
  const lat = add("TwigEmptyLatent", 380, 520, {aspect_ratio: "custom", width: 256, height: 192});
  const smp = add("TwigSampler", 820, 20, {steps: 4});
  const dec = add("TwigVAEDecode", 1180, 20, {});
  const save = add("PreviewImage", 1180, 200, {});
  add("TwigVAEEncode", 820, 560, {});
  add("TwigUnloadModels", 1180, 560, {});
  te.connect(0, enc, 0);
  model.connect(0, smp, 0); enc.connect(0, smp, 1); enc.connect(1, smp, 2); lat.connect(0, smp, 3);
  smp.connect(0, dec, 0); vae.connect(0, dec, 1); dec.connect(0, save, 0);
  // the encode and unload nodes are left unconnected: take them out of the run
  for (const n of app.graph._nodes) if (n.type === "TwigVAEEncode" || n.type === "TwigUnloadModels") n.mode = 2;
  app.graph.setDirtyCanvas(true, true);
  await app.queuePrompt(0, 1);
  return app.graph._nodes.map((n) => n.type);
})()
"""

READ_REPORT_JS = """
(() => {
  const app = window.comfyAPI.app.app;
  const n = app.graph._nodes.find((n) => n.type === "TwigTextEncode");
  const w = n && n.widgets.find((w) => w.name === "token_report_display");
  return w ? String(w.value) : null;
})()
"""


class Page:
    def __init__(self, ws):
        self.ws, self.next_id, self.events = ws, 0, []

    async def call(self, method, **params):
        self.next_id += 1
        my_id = self.next_id
        await self.ws.send_str(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            msg = json.loads((await self.ws.receive()).data)
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise CheckFailed(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    async def evaluate(self, expr, await_promise=False):
        r = await self.call("Runtime.evaluate", expression=expr, awaitPromise=await_promise, returnByValue=True)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise CheckFailed(f"page script failed: {d.get('exception', {}).get('description') or d.get('text')}")
        return r.get("result", {}).get("value")

    def errors(self):
        out = []
        for e in self.events:
            if e.get("method") == "Runtime.exceptionThrown":
                out.append(e["params"]["exceptionDetails"].get("exception", {}).get("description", "exception"))
            elif e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error":
                out.append(" ".join(str(a.get("value", a.get("description", ""))) for a in e["params"]["args"]))
        return out


@contextlib.asynccontextmanager
async def open_page(chromium: str, url: str, window: str = "1600,900"):
    """Headless Chromium on a free DevTools port with its page navigated to ``url``; yields a :class:`Page`.
    Chromium and its profile folder are removed on exit."""
    import aiohttp

    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    debug_port = port.getsockname()[1]
    port.close()
    profile = tempfile.mkdtemp(prefix="twig-chromium-")
    proc = subprocess.Popen(
        [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={debug_port}",
         f"--user-data-dir={profile}", f"--window-size={window}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(f"http://127.0.0.1:{debug_port}/json") as r:
                        targets = await r.json()
                    page_ws = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
                    break
                except Exception:
                    await asyncio.sleep(0.3)
            else:
                raise CheckFailed("headless Chromium did not start")
            async with session.ws_connect(page_ws, max_msg_size=0) as ws:
                page = Page(ws)
                await page.call("Runtime.enable")
                await page.call("Page.enable")
                await page.call("Page.navigate", url=url)
                yield page
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


async def screenshot(page: Page, out_dir: str, name: str) -> str:
    """Save the page as ``out_dir/name`` (PNG) and log where."""
    shot = await page.call("Page.captureScreenshot", format="png")
    path = os.path.join(out_dir, name)
    with open(path, "wb") as f:
        f.write(base64.b64decode(shot["data"]))
    log(f"screenshot: {path}")
    return path


async def run(url: str, out_dir: str, chromium: str) -> None:
    async with open_page(chromium, url) as page:
        t0 = time.time()
        while not await page.evaluate("!!(window.comfyAPI && window.comfyAPI.app && window.comfyAPI.app.app "
                                      "&& window.comfyAPI.app.app.graph && window.LiteGraph)"):
            if time.time() - t0 > 120:
                raise CheckFailed("ComfyUI's frontend did not load in the browser")
            await asyncio.sleep(0.5)
        await asyncio.sleep(3)  # extensions (ours included) register after the app object exists
        loaded = await page.evaluate("window.comfyAPI.app.app.extensions.map((e) => e.name)")
        expect("twig.TokenReport" in (loaded or []), "the frontend loaded web/js/twig_token_report.js")
        prompt = f"一只可爱的小猫, a cat on a windowsill, run {int(time.time())}"  # new text: not cached
        script = GRAPH_JS.replace("NAMES", json.dumps(NAMES)).replace("PROMPT", json.dumps(prompt))
        types = await page.evaluate(script, await_promise=True)
        expect(len(types) == 10, f"frontend created and queued a graph of Twig nodes: {sorted(set(types))}")
        t0 = time.time()
        report = None
        while report is None and time.time() - t0 < 180:
            await asyncio.sleep(1)
            report = await page.evaluate(READ_REPORT_JS)
        expect(report and "positive:" in report and "negative:" in report,
               f"token report shown on the Twig Text Encode node: {report!r}")
        await asyncio.sleep(3)  # let the preview image arrive
        await screenshot(page, out_dir, "comfyui_twig_graph.png")
        errors = [e for e in page.errors() if "twig" in e.lower() or "Twig" in e]
        expect(not errors, f"no page errors from the pack{'' if not errors else ': ' + ' | '.join(errors)}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "")
    a = ap.parse_args()
    if not a.chromium:
        log("no chromium found: browser check skipped")
        return 0
    try:
        asyncio.run(run(a.url, a.out, a.chromium))
    except CheckFailed as e:
        log(f"FAILED: {e}")
        return 1
    log("browser check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
