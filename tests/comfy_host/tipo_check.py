"""The TIPO node's part of the headless ComfyUI check, against a server started by run_check.sh (or by hand)
that already has client.py's tiny models.

    python tipo_check.py make-model COMFY_MODELS_DIR      # tiny TIPO LLaMA into COMFY_MODELS_DIR/LLM/
    python tipo_check.py check --url URL --output OUTPUT_DIR

``check`` verifies: TwigTIPO is in /object_info with the tiny model and "none (format only)" in its model list
(so the pack registered models/LLM) and a seed with control_after_generate; its help page is served; the graph
TwigTIPO -> Twig Text Encode -> Twig Sampler -> Twig VAE Decode -> SaveImage completes and writes the image,
with the expanded prompt (shown by PreviewAny) starting with the user's tags and longer than the user's prompt;
another seed gives another prompt and the first seed gives the first prompt again; "none (format only)" keeps
a Chinese sentence unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import client as C  # noqa: E402

TIPO_NAME = f"{C.PREFIX}_tipo/"
NO_MODEL = "none (format only)"


def tipo_inputs(seed: int, model: str = TIPO_NAME, tags: str = "1girl, red hair", nl: str = "") -> dict:
    return {"tags": tags, "nl_prompt": nl, "ban_tags": "", "format_preset": "tags first", "format": "",
            "width": 256, "height": 192, "seed": seed, "tag_length": "very_short", "nl_length": "very_short",
            "task": "auto", "temperature": 0.5, "top_p": 0.95, "top_k": 80, "min_p": 0.05, "max_new_tokens": 24,
            "model": model, "device": "cpu", "dtype": "fp32"}


def tipo_t2i_prompt(seed: int) -> dict:
    p = C.t2i_prompt(seed=0)
    p["40"] = {"class_type": "TwigTIPO", "inputs": tipo_inputs(seed)}
    p["41"] = {"class_type": "PreviewAny", "inputs": {"source": ["40", 0]}}
    p["42"] = {"class_type": "PreviewAny", "inputs": {"source": ["40", 1]}}
    p["4"]["inputs"]["positive"] = ["40", 0]
    p["8"]["inputs"]["filename_prefix"] = "twig_tipo"
    return p


def format_only_prompt() -> dict:
    return {
        "50": {"class_type": "TwigTIPO", "inputs": tipo_inputs(0, NO_MODEL, "1girl, cat", "一只猫在窗台上睡觉。")},
        "51": {"class_type": "PreviewAny", "inputs": {"source": ["50", 0]}},
    }


def _run(url: str, prompt: dict, what: str) -> dict:
    t0 = time.time()
    entry = C.wait_history(url, C.queue_prompt(url, prompt))
    if entry["status"]["status_str"] != "success":
        err = C.messages(entry).get("execution_error", {})
        raise C.CheckFailed(f"{what} failed in {err.get('node_type')}: {err.get('exception_type')}: "
                            f"{err.get('exception_message')}")
    C.log(f"{what}: completed in {time.time() - t0:.1f}s")
    return entry


def _text(entry: dict, node: str) -> str:
    return entry["outputs"][node]["text"][0]


def check(url: str, output_dir: str) -> None:
    info = C.get_json(url + "/object_info")
    C.expect("TwigTIPO" in info, "TwigTIPO in /object_info")
    req = info["TwigTIPO"]["input"]["required"]
    C.expect(TIPO_NAME in req["model"][0] and NO_MODEL in req["model"][0],
             f"TwigTIPO.model lists {TIPO_NAME} (models/LLM registered) and '{NO_MODEL}'")
    C.expect(req["seed"][1].get("control_after_generate") is True, "TwigTIPO seed has control_after_generate")
    status, body = C.get(url + "/extensions/twig/docs/TwigTIPO.md")
    C.expect(status == 200 and body.startswith(b"# Twig TIPO") and "Chinese".encode() in body,
             "help page served at /extensions/twig/docs/TwigTIPO.md (mentions Chinese passthrough)")

    first = _run(url, tipo_t2i_prompt(seed=5), "TIPO -> encode -> sample -> decode")
    prompt, user = _text(first, "41"), _text(first, "42")
    C.expect(user == "1girl,\n\nred hair", f"user_prompt is the formatted input: {user!r}")
    C.expect(prompt.startswith("1girl,\n\nred hair, ") and len(prompt) > len(user) + 10,
             f"expanded prompt keeps the user's tags first and adds more: {prompt[:80]!r}...")
    images = first["outputs"]["8"]["images"]
    path = os.path.join(output_dir, images[0].get("subfolder", ""), images[0]["filename"])
    C.expect(os.path.isfile(path), f"image written: {path}")
    from PIL import Image

    with Image.open(path) as im:
        C.expect(im.size == (256, 192), "image is 256x192")

    other = _text(_run(url, tipo_t2i_prompt(seed=6), "TIPO with seed 6"), "41")
    C.expect(other != prompt, "another seed gives another prompt")
    again = _text(_run(url, tipo_t2i_prompt(seed=5), "TIPO with seed 5 again"), "41")
    C.expect(again == prompt, "seed 5 again gives the same prompt")

    fmt = _text(_run(url, format_only_prompt(), "TIPO format only"), "51")
    C.expect(fmt == "1girl,\n\ncat,\n\n一只猫在窗台上睡觉。", f"format only keeps the Chinese sentence: {fmt!r}")


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-model")
    mk.add_argument("models_dir")
    ck = sub.add_parser("check")
    ck.add_argument("--url", default="http://127.0.0.1:8188")
    ck.add_argument("--output", required=True)
    a = ap.parse_args()
    if a.cmd == "make-model":
        sys.path.insert(0, C.REPO)
        from tests.builders import save_tiny_tipo_folder

        folder = os.path.join(a.models_dir, "LLM", TIPO_NAME.rstrip("/"))
        save_tiny_tipo_folder(folder)
        C.log(f"tiny TIPO model written to {folder}")
        return 0
    try:
        check(a.url, a.output)
    except C.CheckFailed as e:
        C.log(f"FAILED: {e}")
        return 1
    C.log("TIPO checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
