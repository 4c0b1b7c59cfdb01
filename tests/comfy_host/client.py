"""Drive a running ComfyUI over HTTP and check the Twig pack in it (used by run_check.sh).

    python client.py make-models COMFY_MODELS_DIR
    python client.py check --url http://127.0.0.1:8188 --log comfy.log --output OUTPUT_DIR [--pid PID]

``check`` verifies, in order: the server came up; the log shows the pack imported without "IMPORT FAILED";
every Twig node is in /object_info with the tiny models in its lists; the help pages are served; a
text-to-image prompt completes and writes a PNG; an interrupted long run stops in the sampler and the
next prompt still runs; after ComfyUI's /free (unload models + free node cache) a prompt runs again.
Only the standard library is used for HTTP; Pillow (a ComfyUI requirement) opens the image.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PREFIX = "twigcheck"
CLIENT_ID = "twig-check"
NAMES = {"model": f"{PREFIX}_twig.safetensors", "vae": f"{PREFIX}_dcae.safetensors", "text_encoder": f"{PREFIX}_gemma/"}


def log(msg: str) -> None:
    print(f"[check] {msg}", flush=True)


class CheckFailed(Exception):
    pass


def expect(cond, msg: str) -> None:
    if not cond:
        raise CheckFailed(msg)
    log(f"ok: {msg}")


# --------------------------------------------------------------------------------------------------
# HTTP


def get(url: str, timeout: float = 30):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        body = r.read()
        return r.status, body


def get_json(url: str):
    return json.loads(get(url)[1])


def post_json(url: str, payload: dict):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            body = r.read()
            return r.status, (json.loads(body) if body.strip() else None)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def wait_for_server(url: str, pid: int | None, timeout: float = 600) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pid is not None:
            try:
                os.kill(pid, 0)
            except OSError:
                raise CheckFailed("ComfyUI exited before it started serving (see its log)")
        try:
            get(url + "/system_stats", timeout=5)
            log(f"server up after {time.time() - t0:.0f}s")
            return
        except Exception:
            time.sleep(2)
    raise CheckFailed(f"ComfyUI did not answer within {timeout:.0f}s")


def queue_prompt(url: str, prompt: dict) -> str:
    status, body = post_json(url + "/prompt", {"prompt": prompt, "client_id": CLIENT_ID})
    if status != 200:
        raise CheckFailed(f"/prompt rejected the graph ({status}): {json.dumps(body)[:2000]}")
    return body["prompt_id"]


def wait_history(url: str, prompt_id: str, timeout: float = 600) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        hist = get_json(f"{url}/history/{prompt_id}")
        if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
            entry = hist[prompt_id]
            if entry["status"].get("status_str") in ("success", "error"):
                return entry
        time.sleep(0.5)
    raise CheckFailed(f"prompt {prompt_id} did not finish within {timeout:.0f}s")


def messages(entry: dict) -> dict:
    return {name: data for name, data in entry.get("status", {}).get("messages", [])}


# --------------------------------------------------------------------------------------------------
# Graphs (API format)


def t2i_prompt(seed: int = 0, width: int = 256, height: int = 192, steps: int = 4) -> dict:
    return {
        "1": {"class_type": "TwigModelLoader", "inputs": {"model_name": NAMES["model"], "dtype": "auto"}},
        "2": {"class_type": "TwigTextEncoderLoader",
              "inputs": {"text_encoder_name": NAMES["text_encoder"], "max_tokens": 300, "device": "cpu", "dtype": "auto"}},
        "3": {"class_type": "TwigVAELoader", "inputs": {"vae_model": NAMES["vae"], "dtype": "auto"}},
        "4": {"class_type": "TwigTextEncode",
              "inputs": {"text_encoder": ["2", 0], "positive": "一只可爱的小猫, a cat on a windowsill",
                         "negative": "blurry", "unload_after": False}},
        "5": {"class_type": "TwigEmptyLatent",
              "inputs": {"aspect_ratio": "custom", "width": width, "height": height, "batch_size": 1}},
        "6": {"class_type": "TwigSampler",
              "inputs": {"model": ["1", 0], "positive": ["4", 0], "negative": ["4", 1], "latent": ["5", 0],
                         "seed": seed, "steps": steps, "cfg": 4.5, "sampler": "flow_dpmpp_2m", "shift": 3.0,
                         "denoise": 1.0}},
        "7": {"class_type": "TwigVAEDecode", "inputs": {"samples": ["6", 0], "vae": ["3", 0], "tile_size": 0}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "twig_check"}},
    }


def inpaint_prompt(image_name: str, seed: int = 3) -> dict:
    """Image to image with a noise mask on the right half: LoadImage -> Twig VAE Encode -> Set Latent Noise Mask
    -> Twig Sampler (denoise 0.6) -> Twig VAE Decode -> SaveImage, with ComfyUI's own image and mask nodes."""
    p = t2i_prompt(seed)
    del p["5"]
    p["10"] = {"class_type": "LoadImage", "inputs": {"image": f"{image_name} [output]"}}
    p["11"] = {"class_type": "TwigVAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["3", 0], "tile_size": 0}}
    p["12"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 256, "height": 192}}
    p["13"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 128, "height": 192}}
    p["14"] = {"class_type": "MaskComposite", "inputs": {"destination": ["12", 0], "source": ["13", 0], "x": 128,
                                                         "y": 0, "operation": "add"}}
    p["15"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["11", 0], "mask": ["14", 0]}}
    p["6"]["inputs"].update(latent=["15", 0], denoise=0.6)
    p["8"]["inputs"]["filename_prefix"] = "twig_check_inpaint"
    return p


def long_run_prompt(seed: int = 1) -> dict:
    """A sampler run long enough to interrupt (many steps on a large latent), ending in the unload node."""
    p = t2i_prompt(seed)
    p["5"]["inputs"].update(width=2048, height=2048, batch_size=2)
    p["6"]["inputs"]["steps"] = 200
    del p["7"], p["8"]
    p["9"] = {"class_type": "TwigUnloadModels", "inputs": {"latent": ["6", 0]}}
    return p


# --------------------------------------------------------------------------------------------------
# Checks


def check_import(log_path: str) -> None:
    text = open(log_path, encoding="utf-8", errors="replace").read()
    failed = [l.strip() for l in text.splitlines() if "IMPORT FAILED" in l]
    ours = [l for l in failed if "custom_nodes" in l or "twig" in l.lower()]
    others = [l for l in failed if l not in ours]
    if others:  # ComfyUI's own optional extras (torchaudio, torchvision-based nodes) on a minimal install
        log(f"note: ComfyUI's own extras that did not import here: {' | '.join(others)}")
    expect(not ours, f"no 'IMPORT FAILED' for custom nodes in the ComfyUI log{'' if not ours else ': ' + ' | '.join(ours)}")
    listed = [l for l in text.splitlines() if "custom_nodes" in l and l.rstrip().endswith(("/twig", "\\twig"))]
    expect(listed, f"the pack is listed among the imported custom nodes: {listed[0].strip() if listed else ''}")


def check_object_info(url: str) -> None:
    sys.path.insert(0, REPO)
    from nodes import NODE_CLASS_MAPPINGS  # the pack's own list, imported here without ComfyUI

    info = get_json(url + "/object_info")
    missing = [n for n in NODE_CLASS_MAPPINGS if n not in info]
    expect(not missing, f"all {len(NODE_CLASS_MAPPINGS)} Twig nodes in /object_info{'' if not missing else ', missing ' + str(missing)}")
    for node, field, name in (("TwigModelLoader", "model_name", NAMES["model"]),
                              ("TwigTextEncoderLoader", "text_encoder_name", NAMES["text_encoder"]),
                              ("TwigVAELoader", "vae_model", NAMES["vae"])):
        choices = info[node]["input"]["required"][field][0]
        expect(name in choices, f"{node}.{field} lists {name}")
    seed = info["TwigSampler"]["input"]["required"]["seed"][1]
    expect(seed.get("control_after_generate") is True, "TwigSampler seed has control_after_generate")
    status, body = get(url + "/extensions/twig/docs/TwigSampler.md")
    expect(status == 200 and body.startswith(b"# Twig Sampler"), "help page served at /extensions/twig/docs/TwigSampler.md")


class WebSocketListener:
    """Collects what ComfyUI sends to our client id over /ws (aiohttp is a ComfyUI requirement)."""

    def __init__(self, url: str):
        import threading

        self.url = url.replace("http://", "ws://") + f"/ws?clientId={CLIENT_ID}"
        self.json: list[dict] = []
        self.binary: list[bytes] = []
        self._ready = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        if not self._ready.wait(30):
            raise CheckFailed("could not open ComfyUI's websocket")
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join(10)

    def _run(self):
        import asyncio

        import aiohttp

        async def listen():
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(self.url) as ws:
                    self._ready.set()
                    while not self._stop:
                        try:
                            msg = await ws.receive(timeout=0.5)
                        except asyncio.TimeoutError:
                            continue
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            self.json.append(json.loads(msg.data))
                        elif msg.type == aiohttp.WSMsgType.BINARY:
                            self.binary.append(bytes(msg.data))
                        elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                            return

        asyncio.run(listen())


def run_to_image(url: str, output_dir: str, prompt: dict, what: str, size=(256, 192)) -> str:
    t0 = time.time()
    entry = wait_history(url, queue_prompt(url, prompt))
    if entry["status"]["status_str"] != "success":
        err = messages(entry).get("execution_error", {})
        raise CheckFailed(f"{what} failed in {err.get('node_type')}: {err.get('exception_type')}: {err.get('exception_message')}")
    image = entry["outputs"]["8"]["images"][0]
    path = os.path.join(output_dir, image.get("subfolder", ""), image["filename"])
    expect(os.path.isfile(path), f"{what}: completed in {time.time() - t0:.1f}s and wrote {path}")
    from PIL import Image

    with Image.open(path) as im:
        expect(im.size == size and im.mode == "RGB", f"{what}: image is {size[0]}x{size[1]} RGB")
    return image["filename"]


def check_t2i(url: str, output_dir: str, seed: int, what: str, watch: bool = False) -> None:
    t0 = time.time()
    if watch:
        with WebSocketListener(url) as ws:
            pid = queue_prompt(url, t2i_prompt(seed))
            entry = wait_history(url, pid)
            time.sleep(1.0)  # let the last messages arrive
        steps = [m["data"]["value"] for m in ws.json if m.get("type") == "progress" and m["data"].get("node") == "6"]
        expect(steps == [1, 2, 3, 4], f"{what}: sampler progress over the websocket: {steps}")
        jpegs = [b for b in ws.binary if b[8:10] == b"\xff\xd8"]
        expect(len(jpegs) == 4, f"{what}: {len(jpegs)} JPEG latent previews received over the websocket")
    else:
        pid = queue_prompt(url, t2i_prompt(seed))
        entry = wait_history(url, pid)
    msgs = messages(entry)
    if entry["status"]["status_str"] != "success":
        err = msgs.get("execution_error", {})
        raise CheckFailed(f"{what} failed in {err.get('node_type')}: {err.get('exception_type')}: {err.get('exception_message')}")
    images = entry["outputs"]["8"]["images"]
    path = os.path.join(output_dir, images[0].get("subfolder", ""), images[0]["filename"])
    expect(os.path.isfile(path), f"{what}: completed in {time.time() - t0:.1f}s and wrote {path}")
    from PIL import Image

    with Image.open(path) as im:
        expect(im.size == (256, 192) and im.mode == "RGB", f"{what}: image is 256x192 RGB")


def same_pixels(a: str, b: str) -> bool:
    from PIL import Image

    with Image.open(a) as x, Image.open(b) as y:
        return x.size == y.size and x.convert("RGB").tobytes() == y.convert("RGB").tobytes()


def check_missing_weights(url: str) -> None:
    """A shared workflow whose weights are not installed: /prompt refuses it naming the folder of each file."""
    prompt = t2i_prompt()
    prompt["1"]["inputs"]["model_name"] = "twig_v0_alpha.pth"
    prompt["3"]["inputs"]["vae_model"] = "dc-ae-f32c32-sana-1.0-diffusers/"
    status, body = post_json(url + "/prompt", {"prompt": prompt, "client_id": CLIENT_ID})
    text = json.dumps(body)
    expect(status == 400 and "twig_v0_alpha.pth" in text and "models/diffusion_models" in text
           and "models/vae" in text, f"a graph naming missing weights is refused with their folders ({status})")


def check_interrupt(url: str) -> None:
    pid = queue_prompt(url, long_run_prompt())
    t0 = time.time()
    while time.time() - t0 < 120:  # wait until the sampler is running (progress messages start)
        queue = get_json(url + "/queue")
        if any(item[1] == pid for item in queue.get("queue_running", [])):
            break
        time.sleep(0.2)
    time.sleep(4.0)  # loaders and text encode done; sampler in its loop
    t_int = time.time()
    post_json(url + "/interrupt", {})
    entry = wait_history(url, pid, timeout=300)
    took = time.time() - t_int
    msgs = messages(entry)
    expect("execution_interrupted" in msgs, f"long run interrupted (stopped {took:.1f}s after /interrupt)")
    expect(msgs["execution_interrupted"].get("node_type") == "TwigSampler",
           f"interrupt landed in {msgs['execution_interrupted'].get('node_type')}")


TORCHVISION_STUB = {
    "__init__.py": '''"""Stand-in for torchvision where no build exists for this torch; only import-time names are provided."""
__version__ = "0.0.0"
from . import io, transforms  # noqa: E402,F401


def __getattr__(name):
    raise AttributeError(f"torchvision.{name} is not available (stand-in package)")
''',
    "transforms/__init__.py": '''import enum


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


from . import functional, v2  # noqa: E402,F401


def __getattr__(name):
    raise AttributeError(f"torchvision.transforms.{name} is not available (stand-in package)")
''',
    "transforms/functional.py": '''from torchvision.transforms import InterpolationMode  # noqa: F401


def pil_to_tensor(*args, **kwargs):
    raise NotImplementedError("torchvision stand-in: pil_to_tensor is not available")


def __getattr__(name):
    raise AttributeError(f"torchvision.transforms.functional.{name} is not available (stand-in package)")
''',
    "transforms/v2/__init__.py": "from . import functional  # noqa: F401\n",
    "io.py": '''import enum


class ImageReadMode(enum.Enum):
    UNCHANGED = 0
    GRAY = 1
    GRAY_ALPHA = 2
    RGB = 3
    RGB_ALPHA = 4


def decode_image(*args, **kwargs):
    raise NotImplementedError("torchvision stand-in: decode_image is not available")


def __getattr__(name):
    raise AttributeError(f"torchvision.io.{name} is not available (stand-in package)")
''',
}
TORCHVISION_STUB["transforms/v2/functional.py"] = TORCHVISION_STUB["transforms/functional.py"]


def write_torchvision_stub(folder: str) -> str:
    """Write the stand-in under ``folder`` if torchvision cannot be imported; returns the folder or ""."""
    try:
        import torchvision  # noqa: F401

        return ""
    except Exception:
        pass
    for rel, text in TORCHVISION_STUB.items():
        path = os.path.join(folder, "torchvision", rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return folder


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-models")
    mk.add_argument("models_dir")
    tv = sub.add_parser("torchvision-stub")
    tv.add_argument("folder")
    ck = sub.add_parser("check")
    ck.add_argument("--url", default="http://127.0.0.1:8188")
    ck.add_argument("--log", required=True)
    ck.add_argument("--output", required=True)
    ck.add_argument("--pid", type=int)
    a = ap.parse_args()

    if a.cmd == "torchvision-stub":
        print(write_torchvision_stub(a.folder))
        return 0
    if a.cmd == "make-models":
        sys.path.insert(0, REPO)
        from tests.builders import write_model_folders

        names = write_model_folders(a.models_dir, PREFIX)
        log(f"tiny models written under {a.models_dir}: {names}")
        return 0

    try:
        wait_for_server(a.url, a.pid)
        check_import(a.log)
        check_object_info(a.url)
        check_missing_weights(a.url)
        check_t2i(a.url, a.output, seed=0, what="text-to-image", watch=True)
        first = sorted(f for f in os.listdir(a.output) if f.startswith("twig_check_") and f.endswith(".png"))[0]
        run_to_image(a.url, a.output, inpaint_prompt(first), "image-to-image inpaint (right half masked)")
        from face_check import check_face_refine  # text-to-image -> face refine, and a photo through the face nodes

        check_face_refine(a.url, a.output)
        check_interrupt(a.url)
        check_t2i(a.url, a.output, seed=1, what="text-to-image after the interrupt")
        status, _ = post_json(a.url + "/free", {"unload_models": True, "free_memory": True})
        expect(status == 200, "/free (unload models, free node cache) accepted")
        time.sleep(2)
        check_t2i(a.url, a.output, seed=2, what="text-to-image after /free")
        again = run_to_image(a.url, a.output, t2i_prompt(0), "text-to-image seed 0 again, after the interrupt and /free")
        expect(same_pixels(os.path.join(a.output, first), os.path.join(a.output, again)),
               f"the same prompt after an interrupt and /free gives the first picture pixel for pixel ({again})")
    except CheckFailed as e:
        log(f"FAILED: {e}")
        return 1
    log("all ComfyUI checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
