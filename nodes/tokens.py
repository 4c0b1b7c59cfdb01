"""Live prompt token counts for the frontend: ``POST /twig/token_count`` on ComfyUI's server.

The Twig Text Encode node shows "812 / 1200" under its prompts while you type (web/js/twig_token_count.js).
Counting needs only the text encoder's tokenizer, never the Gemma weights: ``twig_core.tokenizer.load_tokenizer``
finds it as the text encoder loader does (folder, pipeline, or the sentencepiece tensor inside a single file);
it is read once and kept, keyed by path and modification time.
Counts are those of :meth:`twig_core.text.TextEncoder.token_report`, so they match what encoding reports.

Request JSON: ``{"text_encoder": <loader choice>, "max_tokens": 300..1200, "positive": str, "negative": str}``.
Answer: ``{"max_tokens": n, "positive": {"tokens": t, "kept": k}, "negative": {...}}``, or ``{"error": msg}``
with status 404 (no such text encoder) or 400 (bad request, or no tokenizer with it).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections import OrderedDict

from twig_core.errors import TwigError
from twig_core.layout import component_folder
from twig_core.text import MAX_LENGTH_LIMIT, MIN_MAX_LENGTH, SANA_MAX_LENGTH, TextEncoder, folder_settings
from twig_core.tokenizer import load_tokenizer

from . import host, loaders

ROUTE = "/twig/token_count"
MAX_TEXT = 200_000  # characters per prompt; far beyond 1200 tokens
_CACHE: "OrderedDict[tuple, TextEncoder]" = OrderedDict()
_CACHE_SIZE = 4
_LOCK = threading.Lock()


def tokenizer_only(path: str) -> TextEncoder:
    """A TextEncoder without a model (tokenizer and prompt settings only) for the text encoder at ``path``."""
    settings = folder_settings(component_folder(path, "text_encoder")) if os.path.isdir(path) else {}
    return TextEncoder(None, load_tokenizer(path), **settings)


def cached_tokenizer(path: str) -> TextEncoder:
    stamp = []
    for p in (path, os.path.join(path, "tokenizer"), os.path.join(path, "text_encoder")):
        try:
            st = os.stat(p)
            stamp.append((st.st_mtime_ns, st.st_size))
        except OSError:
            stamp.append(None)
    key = (os.path.abspath(path), tuple(stamp))
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    enc = tokenizer_only(path)
    with _LOCK:
        _CACHE[key] = enc
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return enc


def count(text_encoder: str, max_tokens, positive: str = "", negative: str = "") -> dict:
    """The answer of the route for one request (TwigError on bad input)."""
    try:
        n = int(max_tokens)
    except (TypeError, ValueError):
        raise TwigError(f"max_tokens must be a whole number, got {max_tokens!r}") from None
    if not MIN_MAX_LENGTH <= n <= MAX_LENGTH_LIMIT:
        raise TwigError(f"max_tokens must be between {MIN_MAX_LENGTH} and {MAX_LENGTH_LIMIT}, got {n}")
    for name, text in (("positive", positive), ("negative", negative)):
        if not isinstance(text, str):
            raise TwigError(f"{name} must be a string")
        if len(text) > MAX_TEXT:
            raise TwigError(f"{name} is longer than {MAX_TEXT} characters")
    if not isinstance(text_encoder, str) or not text_encoder:
        raise LookupError("no text encoder selected")
    try:
        path = loaders.resolve(text_encoder, loaders.TEXT_FOLDERS, loaders.MODEL_FOLDERS)
    except TwigError as e:
        raise LookupError(str(e)) from None
    enc = cached_tokenizer(path)
    out: dict = {"max_tokens": n}
    for name, text, instruction in (("positive", positive, True), ("negative", negative, False)):
        r = enc.token_report(text, n, use_instruction=instruction)
        out[name] = {"tokens": r.prompt_tokens, "kept": r.kept_tokens}
    return out


def _json_response(web, payload: dict, status: int = 200):
    return web.Response(text=json.dumps(payload), status=status, content_type="application/json")


async def handle(request):
    """aiohttp handler for ``POST /twig/token_count``."""
    import asyncio

    from aiohttp import web

    try:
        body = await request.json()
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
    except Exception as e:  # noqa: BLE001
        return _json_response(web, {"error": f"bad request: {e}"}, 400)
    args = (body.get("text_encoder"), body.get("max_tokens", SANA_MAX_LENGTH), body.get("positive", ""),
            body.get("negative", ""))
    try:
        result = await asyncio.get_running_loop().run_in_executor(None, lambda: count(*args))
    except LookupError as e:
        return _json_response(web, {"error": str(e)}, 404)
    except TwigError as e:
        return _json_response(web, {"error": str(e)}, 400)
    except Exception as e:  # noqa: BLE001 - the tokenizer failed; say why, keep the server up
        host.log.warning("[Twig] token count failed: %s", e)
        return _json_response(web, {"error": f"{type(e).__name__}: {e}"}, 500)
    return _json_response(web, result)


_REGISTERED = False


def register_routes() -> bool:
    """Add the route to ComfyUI's server when running inside ComfyUI (a no-op elsewhere); True if added."""
    global _REGISTERED
    if _REGISTERED:
        return True
    server = sys.modules.get("server")
    prompt_server = getattr(getattr(server, "PromptServer", None), "instance", None)
    routes = getattr(prompt_server, "routes", None)
    if routes is None:
        return False
    routes.post(ROUTE)(handle)
    _REGISTERED = True
    return True
