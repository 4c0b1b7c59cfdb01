"""The example workflows (workflows/), the embedded-demo entry of the loaders and the token-count route.

Every workflow is checked in both forms without ComfyUI: node classes exist (the pack, or core ComfyUI's list
written down in workflows/comfy_core.py), widget values are valid for the nodes' INPUT_TYPES (with the model
files the workflows expect put in a temporary model folder), link types match at both ends, and the API form
equals the UI form converted the way ComfyUI's frontend converts it. The demo-model workflows are then run
from their API form through the pack's node functions on the CPU (core nodes like SaveImage replaced by
stand-ins), with a tiny random stand-in for the demo model.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

import nodes
from nodes import loaders, tokens
from nodes.latent import TwigEmptyLatent
from tests.builders import NATIVE, write_tiny_lora
from twig_core import catalog

ROOT = Path(__file__).resolve().parents[1]
WF_DIR = ROOT / "workflows"
sys.path.insert(0, str(WF_DIR))
import workflow_runner as runner  # noqa: E402  (workflows/workflow_runner.py, as build.py imports it)

_spec = importlib.util.spec_from_file_location("twig_workflow_build", WF_DIR / "build.py")
build = importlib.util.module_from_spec(_spec)  # workflows/build.py, under a name no installed package has
sys.modules[_spec.name] = build
_spec.loader.exec_module(build)
comfy_core = build.comfy_core

UI_FILES = sorted(WF_DIR.glob("*.json"))
NAMES = [p.stem for p in UI_FILES]
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")


@pytest.fixture(scope="module")
def model_env(tmp_path_factory, demo_standin):
    """A model folder holding (empty stand-ins of) the files the workflows name, and a tiny demo pipeline."""
    root = tmp_path_factory.mktemp("wf_models")
    (root / "diffusion_models").mkdir()
    (root / "diffusion_models" / build.TWIG).write_bytes(b"")
    for sub, name in (("text_encoders", build.GEMMA), ("vae", build.DCAE), ("LLM", build.TIPO)):
        folder = root / sub / name.rstrip("/")
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    write_tiny_lora(root / "loras" / build.DEMO_LORA)  # listed before the demo LoRA, which fits the real demo only
    mp = pytest.MonkeyPatch()
    mp.setenv("TWIG_MODELS_DIR", str(root))
    mp.setenv("TWIG_DEMO_DIR", str(demo_standin))
    mp.setattr(catalog, "DEMO_256_DIR", Path(demo_standin))  # both demo entries stand for the stand-in
    yield root, demo_standin
    mp.undo()


def load(name: str) -> tuple[dict, dict]:
    ui = json.loads((WF_DIR / f"{name}.json").read_text("utf-8"))
    api = json.loads((WF_DIR / "api" / f"{name}.json").read_text("utf-8"))
    return ui, api


def spec_of(class_type: str) -> dict:
    return build.node_spec(class_type)


# --------------------------------------------------------------------------------------------------
# The files


def test_the_set_of_workflows():
    assert set(NAMES) == {wf.name for wf in build.workflows()}
    assert len(NAMES) >= 7
    for name in NAMES:
        assert (WF_DIR / "api" / f"{name}.json").is_file(), name
        assert (WF_DIR / f"{name}.png").is_file(), name
    demos = [wf.name for wf in build.workflows() if wf.demo]
    assert demos, "at least one workflow runs on the embedded demo model"


def test_committed_files_are_what_the_generator_writes(model_env):
    """UI JSON, API JSON and the graphs inside the PNGs are generated from one definition and cannot drift."""
    assert build.check(build.workflows()) == []


@pytest.mark.parametrize("name", NAMES)
def test_png_carries_the_workflow_like_comfyui_pictures(name):
    ui, api = load(name)
    chunks = build.png_chunks(WF_DIR / f"{name}.png")
    assert json.loads(chunks["workflow"]) == ui
    assert json.loads(chunks["prompt"]) == api


def test_readme_has_the_workflow_table_nodes_and_model_folders():
    readme = (ROOT / "README.md").read_text("utf-8")
    section = readme.split("## Example workflows", 1)[1].split("\n## ", 1)[0]
    assert build.readme_table(build.workflows()) in section  # regenerate with: python workflows/build.py --readme-table
    for name in (build.TWIG, build.GEMMA, build.DCAE):
        assert "models/" in section and name in section
    node_section = readme.split("## Nodes", 1)[1].split("\n## ", 1)[0]
    for display in nodes.NODE_DISPLAY_NAME_MAPPINGS.values():
        assert display in node_section, display
    folders = readme.split("## Model folders", 1)[1].split("\n## ", 1)[0]
    for folder in ("models/LLM", "models/ultralytics/bbox"):
        assert folder in folders


# --------------------------------------------------------------------------------------------------
# UI form


def known_class(class_type: str) -> bool:
    return class_type in nodes.NODE_CLASS_MAPPINGS or class_type in comfy_core.CORE_NODES


def is_widget(s) -> bool:
    kind = s[0]
    opts = s[1] if len(s) > 1 and isinstance(s[1], dict) else {}
    return (isinstance(kind, (list, tuple)) or kind == comfy_core.INPUT_FILES or kind in ("INT", "FLOAT", "STRING", "BOOLEAN")) \
        and not opts.get("forceInput")


def widget_inputs(spec):
    for section in ("required", "optional"):
        for name, s in spec["input"].get(section, {}).items():
            if is_widget(s):
                opts = s[1] if len(s) > 1 and isinstance(s[1], dict) else {}
                control = bool(opts.get("control_after_generate")) or (s[0] == "INT" and name in ("seed", "noise_seed"))
                yield name, s, control


def check_value(where: str, s, value) -> None:
    kind = s[0]
    opts = s[1] if len(s) > 1 and isinstance(s[1], dict) else {}
    if kind == comfy_core.INPUT_FILES:
        assert value in comfy_core.SHIPPED_INPUTS, f"{where}: {value!r} is not a picture ComfyUI ships"
    elif isinstance(kind, (list, tuple)):
        assert value in kind, f"{where}: {value!r} not among {list(kind)[:8]}"
    elif kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {value!r} is not an INT"
        assert opts.get("min", -math.inf) <= value <= opts.get("max", math.inf), f"{where}: {value} out of range"
        step = opts.get("step")
        if step and step > 1:
            assert (value - opts.get("min", 0)) % step == 0, f"{where}: {value} is not on the {step} grid"
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {value!r}"
        assert opts.get("min", -math.inf) <= value <= opts.get("max", math.inf), f"{where}: {value} out of range"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), f"{where}: {value!r}"
    elif kind == "STRING":
        assert isinstance(value, str), f"{where}: {value!r}"
        if opts.get("dynamicPrompts"):
            # the frontend rewrites {a|b} choices and // comments in such prompts before queueing
            assert "{" not in value and "//" not in value and "/*" not in value, where
    else:
        raise AssertionError(f"{where}: {kind!r} is not a widget type")


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_is_valid_for_the_frontend(name, model_env):
    ui, _ = load(name)
    for key in ("last_node_id", "last_link_id", "nodes", "links", "version"):
        assert key in ui, key
    assert ui["version"] == 0.4
    by_id = {n["id"]: n for n in ui["nodes"]}
    assert len(by_id) == len(ui["nodes"]) and ui["last_node_id"] == max(by_id)
    links = {l[0]: l for l in ui["links"]}
    assert len(links) == len(ui["links"]) and ui["last_link_id"] == max(links, default=0)
    for n in ui["nodes"]:
        for key in ("id", "type", "pos", "size", "flags", "order", "mode", "properties"):
            assert key in n, (n["id"], key)
        assert known_class(n["type"]) or n["type"] in comfy_core.FRONTEND_ONLY, f"unknown node {n['type']}"
        if n["type"] in comfy_core.FRONTEND_ONLY:
            continue
        spec = spec_of(n["type"])
        where = f"{name}: node {n['id']} {n['type']}"
        # widgets_values: every widget in input order, a seed followed by its control value
        expected = []
        for wname, s, control in widget_inputs(spec):
            expected.append((wname, s))
            if control:
                expected.append((wname + ".control_after_generate", None))
        values = n.get("widgets_values", [])
        assert len(values) == len(expected), f"{where}: {len(values)} widget values for {[e[0] for e in expected]}"
        for (wname, s), value in zip(expected, values):
            if s is None:
                assert value in CONTROL_VALUES, f"{where}.{wname}: {value!r}"
            else:
                check_value(f"{where}.{wname}", s, value)
        # sockets: every required one connected; slot types are the declared ones
        declared = {k: (s, sec == "optional") for sec in ("required", "optional") for k, s in spec["input"].get(sec, {}).items()}
        for slot, inp in enumerate(n.get("inputs", [])):
            s, optional = declared[inp["name"]]
            if "widget" in inp:
                assert inp["widget"] == {"name": inp["name"]} and is_widget(s), where
            else:
                assert not is_widget(s) and inp["type"] == s[0], f"{where}.{inp['name']}"
            if inp.get("link") is not None:
                link = links[inp["link"]]
                assert link[3] == n["id"] and link[4] == slot, f"{where}.{inp['name']}: link {link} does not end here"
        socket_names = {i["name"] for i in n.get("inputs", [])}
        for k, (s, optional) in declared.items():
            if not is_widget(s):
                assert k in socket_names, f"{where}: socket {k} missing"
                if not optional:
                    inp = next(i for i in n["inputs"] if i["name"] == k)
                    assert inp.get("link") is not None, f"{where}: required input {k} not connected"
        outputs = n.get("outputs", [])
        assert [o["type"] for o in outputs] == list(spec["output"]), where
        for slot, out in enumerate(outputs):
            for lid in out.get("links") or []:
                assert links[lid][1] == n["id"] and links[lid][2] == slot, f"{where}: output link {lid}"


@pytest.mark.parametrize("name", NAMES)
def test_every_link_type_matches_both_ends(name):
    ui, _ = load(name)
    by_id = {n["id"]: n for n in ui["nodes"]}
    for lid, src, sslot, dst, dslot, typ in ui["links"]:
        out = by_id[src]["outputs"][sslot]
        inp = by_id[dst]["inputs"][dslot]
        assert out["type"] == typ, (lid, out, typ)
        assert inp["type"] in (typ, "*"), (lid, inp, typ)
        assert lid in (out.get("links") or []) and inp["link"] == lid, lid
        declared_out = spec_of(by_id[src]["type"])["output"][sslot]
        assert declared_out == typ, (lid, declared_out)
        spec_in = spec_of(by_id[dst]["type"])["input"]
        s = {**spec_in.get("required", {}), **spec_in.get("optional", {})}[inp["name"]]
        assert s[0] in (typ, "*"), (lid, inp["name"], s[0], typ)


def ui_to_api(ui: dict) -> dict:
    """What ComfyUI's frontend queues for a UI workflow (graphToPrompt): frontend-only nodes dropped, widget
    values by name (control_after_generate values skipped), then links as [origin id, origin slot]."""
    links = {l[0]: l for l in ui["links"]}
    out = {}
    for n in sorted(ui["nodes"], key=lambda n: n["order"]):
        if n["type"] in comfy_core.FRONTEND_ONLY or n.get("mode", 0) in (2, 4):
            continue
        spec = spec_of(n["type"])
        inputs, values = {}, list(n.get("widgets_values", []))
        for wname, _, control in widget_inputs(spec):
            inputs[wname] = values.pop(0)
            if control:
                values.pop(0)
        for inp in n.get("inputs", []):
            if inp.get("link") is not None:
                link = links[inp["link"]]
                inputs[inp["name"]] = [str(link[1]), link[2]]
        title = n.get("title") or spec["display_name"]
        out[str(n["id"])] = {"inputs": inputs, "class_type": n["type"], "_meta": {"title": title}}
    return out


@pytest.mark.parametrize("name", NAMES)
def test_api_form_equals_the_ui_form_converted(name):
    ui, api = load(name)
    assert ui_to_api(ui) == api


# --------------------------------------------------------------------------------------------------
# API form (what POST /prompt checks)


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_is_accepted_like_post_prompt(name, model_env):
    _, api = load(name)
    outputs = 0
    for nid, entry in api.items():
        ct = entry["class_type"]
        assert known_class(ct), ct
        spec = spec_of(ct)
        outputs += bool(spec["output_node"])
        for section in ("required", "optional"):
            for k, s in spec["input"].get(section, {}).items():
                if k not in entry["inputs"]:
                    assert section == "optional", f"{nid} {ct}: required input {k} missing"
                    continue
                v = entry["inputs"][k]
                if runner.is_link(v):
                    src = api[v[0]]
                    out_types = spec_of(src["class_type"])["output"]
                    assert v[1] < len(out_types), (nid, k)
                    assert s[0] in (out_types[v[1]], "*"), f"{nid} {ct}.{k}: {out_types[v[1]]} into {s[0]}"
                else:
                    check_value(f"{name} {nid} {ct}.{k}", s, v)
    assert outputs >= 1, "ComfyUI refuses a prompt without an output node"
    runner.dependency_order(api)  # no cycles, no dangling links


# --------------------------------------------------------------------------------------------------
# The embedded demo model in the loaders


def test_demo_entry_is_listed_first_only_when_the_demo_folder_exists(model_env, monkeypatch, tmp_path):
    for cls, field in ((loaders.TwigModelLoader, "model_name"), (loaders.TwigTextEncoderLoader, "text_encoder_name"),
                       (loaders.TwigVAELoader, "vae_model")):
        names = cls.INPUT_TYPES()["required"][field][0]
        assert names[0] == catalog.DEMO_NAME and names.count(catalog.DEMO_NAME) == 1, names
    monkeypatch.setenv("TWIG_DEMO_DIR", str(tmp_path / "nothing"))
    assert catalog.demo_dir() is None
    assert catalog.DEMO_NAME not in loaders.TwigModelLoader.INPUT_TYPES()["required"]["model_name"][0]
    with pytest.raises(Exception, match="not in this install"):
        loaders.TwigModelLoader().load(catalog.DEMO_NAME, "fp32")


def test_demo_entry_defaults_to_the_package_folder(monkeypatch):
    from twig_core.catalog import DEMO_DIR

    monkeypatch.delenv("TWIG_DEMO_DIR", raising=False)
    expected = str(DEMO_DIR) if (DEMO_DIR / "model_index.json").is_file() else None
    assert catalog.demo_dir() == expected


def test_demo_entry_loads_in_all_three_loaders_and_sizes_the_empty_latent(model_env):
    (model,) = loaders.TwigModelLoader().load(catalog.DEMO_NAME, "auto")
    (te,) = loaders.TwigTextEncoderLoader().load(catalog.DEMO_NAME, 300, "default", "auto")
    (vae,) = loaders.TwigVAELoader().load(catalog.DEMO_NAME, "auto")
    assert Path(model.path) == model_env[1] and Path(te.model.path) == model_env[1] and Path(vae.path) == model_env[1]
    assert te.model.peek().instruction == ""  # the demo's text encoder folder turns Sana's instruction off
    latent, w, h = TwigEmptyLatent().generate(build.SQUARE, 1024, 1024, 1, model)
    assert (w, h) == (NATIVE, NATIVE) and latent["samples"].shape == (1, 32, 4, 4)


# --------------------------------------------------------------------------------------------------
# Demo workflows, run through the node functions


def host_only_names() -> list[str]:
    """Workflows with core nodes the runner has no stand-in for (core samplers and VAE nodes on the native outputs):
    they run only inside ComfyUI, where tests/comfy_host/workflows_check.py runs every workflow."""
    return [name for name in NAMES if any(e["class_type"] not in nodes.NODE_CLASS_MAPPINGS
                                          and e["class_type"] not in runner.STANDINS for e in load(name)[1].values())]


def test_only_the_native_workflows_need_the_host():
    assert host_only_names() == sorted(n for n in NAMES if "_native_" in n) and host_only_names()


def demo_workflow_names() -> list[str]:
    out = []
    for name in NAMES:
        _, api = load(name)
        loader_values = [e["inputs"].get(f) for e in api.values() for ct, (f, _) in runner.LOADER_FIELDS.items()
                         if e["class_type"] == ct and ct != "TwigTIPO"]
        if loader_values and all(v in catalog.DEMO_NAMES for v in loader_values) and name not in host_only_names():
            out.append(name)
    return out


def test_demo_workflows_are_the_ones_marked_demo():
    assert sorted(demo_workflow_names()) == sorted(wf.name for wf in build.workflows() if wf.demo)


@pytest.mark.parametrize("name", demo_workflow_names())
def test_demo_workflow_runs_on_cpu_and_makes_images(name, model_env):
    _, api = load(name)
    runner.SaveImage.saved = []
    results, ui = runner.execute(api, nodes.NODE_CLASS_MAPPINGS)
    saves = [nid for nid, e in api.items() if e["class_type"] == "SaveImage"]
    assert saves and all(nid in ui and ui[nid]["images"] for nid in saves)
    assert len(runner.SaveImage.saved) == len(saves)
    for prefix, images in runner.SaveImage.saved:
        assert images.shape == (1, NATIVE, NATIVE, 3), (prefix, images.shape)
        assert torch.isfinite(images).all() and 0 <= images.min() and images.max() <= 1
        assert images.std() > 0, f"{prefix}: a flat image"
    encodes = [nid for nid, e in api.items() if e["class_type"] == "TwigTextEncode"]
    for nid in encodes:  # the token report reaches the frontend as the node's ui text
        assert ui[nid]["text"][0].startswith("positive: ")


def test_same_workflow_same_pictures(model_env):
    name = demo_workflow_names()[0]
    _, api = load(name)
    pictures = []
    for _ in range(2):
        runner.SaveImage.saved = []
        runner.execute(api, nodes.NODE_CLASS_MAPPINGS)
        pictures.append([img for _, img in runner.SaveImage.saved])
    for a, b in zip(*pictures):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# Token count route


def test_token_count_matches_encoding_and_never_loads_weights(model_env, monkeypatch):
    from twig_core import loader as twig_loader
    from twig_core.text import TextEncoder

    demo = model_env[1]
    full = twig_loader.load_text_encoder(str(demo))  # reference counts, with the weights
    tokens._CACHE.clear()

    def no_weights(*a, **k):
        raise AssertionError("the token count must not load Gemma weights")

    import transformers

    monkeypatch.setattr(twig_loader, "load_text_encoder", no_weights)
    monkeypatch.setattr(transformers.Gemma2Model, "from_pretrained", no_weights)
    monkeypatch.setattr(TextEncoder, "from_pretrained", no_weights)
    from twig_core import gemma

    monkeypatch.setattr(gemma, "_gemma2_from_weights", no_weights)  # where every Gemma-2 gets its weights
    long_zh = build.ZH_LONG_PROMPT
    for prompt, n in ((build.DEMO_EN, 300), (build.DEMO_ZH, 300), (long_zh, 300), (long_zh, 1200), ("", 300)):
        got = tokens.count(catalog.DEMO_NAME, n, prompt, "blurry")
        ref = full.token_report(prompt, n, use_instruction=True)
        neg = full.token_report("blurry", n, use_instruction=False)
        assert got == {"max_tokens": n, "positive": {"tokens": ref.prompt_tokens, "kept": ref.kept_tokens},
                       "negative": {"tokens": neg.prompt_tokens, "kept": neg.kept_tokens}}
    short = tokens.count(catalog.DEMO_NAME, 300, long_zh)
    assert short["positive"]["kept"] < short["positive"]["tokens"]  # 300 cuts the long prompt
    assert len(tokens._CACHE) == 1  # one tokenizer, reused


def test_token_count_for_a_gemma_folder_and_a_single_file(model_env, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from tests.builders import save_tiny_gemma2_folder
    from twig_core.text import COMPLEX_HUMAN_INSTRUCTION

    root = tmp_path / "models"
    folder = root / "text_encoders" / "gemma_folder"
    model, tok = save_tiny_gemma2_folder(folder)
    single = root / "text_encoders" / "single" / "gemma.safetensors"
    single.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(single))
    tok.save_pretrained(single.parent)  # tokenizer.json beside the file
    monkeypatch.setenv("TWIG_MODELS_DIR", str(root))
    tokens._CACHE.clear()
    a = tokens.count("gemma_folder/", 300, "a cat on a windowsill")
    b = tokens.count("single/gemma.safetensors", 300, "a cat on a windowsill")
    assert a == b and a["positive"]["tokens"] > 3
    assert tokens.cached_tokenizer(str(folder)).instruction == "\n".join(COMPLEX_HUMAN_INSTRUCTION)
    with pytest.raises(LookupError):
        tokens.count("missing/", 300, "x")
    with pytest.raises(Exception, match="max_tokens"):
        tokens.count("gemma_folder/", 5000, "x")


class _FakeResponse:
    def __init__(self, text, status=200, content_type=None):
        self.text, self.status, self.content_type = text, status, content_type


class _FakeRequest:
    def __init__(self, body):
        self._body = body

    async def json(self):
        if isinstance(self._body, Exception):
            raise self._body
        return self._body


def test_route_handler_answers_and_registers_inside_comfyui(model_env, monkeypatch):
    fake_aiohttp = types.ModuleType("aiohttp")
    fake_aiohttp.web = types.SimpleNamespace(Response=_FakeResponse)
    monkeypatch.setitem(sys.modules, "aiohttp", fake_aiohttp)

    def call(body):
        r = asyncio.run(tokens.handle(_FakeRequest(body)))
        return r.status, json.loads(r.text)

    status, body = call({"text_encoder": catalog.DEMO_NAME, "max_tokens": 1200, "positive": build.DEMO_ZH})
    assert status == 200 and body["max_tokens"] == 1200 and body["positive"]["tokens"] > 0
    assert call({"text_encoder": "nope/", "positive": "x"})[0] == 404
    assert call({"text_encoder": catalog.DEMO_NAME, "max_tokens": "many"})[0] == 400
    assert call(ValueError("not json"))[0] == 400
    assert call(["a list"])[0] == 400

    # registration: only where ComfyUI's PromptServer exists, once
    monkeypatch.setattr(tokens, "_REGISTERED", False)
    monkeypatch.delitem(sys.modules, "server", raising=False)
    assert tokens.register_routes() is False
    added = []

    class Routes:
        def post(self, path):
            return lambda fn: added.append((path, fn)) or fn

    fake_server = types.ModuleType("server")
    fake_server.PromptServer = types.SimpleNamespace(instance=types.SimpleNamespace(routes=Routes()))
    monkeypatch.setitem(sys.modules, "server", fake_server)
    assert tokens.register_routes() is True and tokens.register_routes() is True
    assert added == [("/twig/token_count", tokens.handle)]


# --------------------------------------------------------------------------------------------------
# Every workflow's graph, run on the tiny test models at small sizes


SMALL = {
    "TwigEmptyLatent": {"aspect_ratio": "custom", "width": 128, "height": 96},
    "ImageScale": {"width": 256, "height": 192},
    "TwigSampler": {"steps": 3},
    "TwigFaceRefine": {"steps": 2},
    "TwigTIPO": {"max_new_tokens": 32},
    "TwigVAEEncode": {"tile_size": 128},
    "TwigVAEDecode": {"tile_size": 128},
}


@pytest.fixture(scope="module")
def tiny_names(model_env, tmp_path_factory):
    from PIL import Image

    from tests.builders import save_tiny_tipo_folder, write_model_folders

    root = model_env[0]
    names = write_model_folders(root, "wf_tiny")
    save_tiny_tipo_folder(root / "LLM" / "wf_tiny_tipo")
    names["tipo"] = "wf_tiny_tipo/"
    inputs = tmp_path_factory.mktemp("comfy_input")
    Image.new("RGB", (200, 160), (90, 140, 230)).save(inputs / build.INPUT_IMAGE)  # stands for ComfyUI's example.png
    return names, inputs


@pytest.mark.parametrize("name", [n for n in NAMES if n not in demo_workflow_names() + host_only_names()])
def test_workflow_graph_runs_on_tiny_models(name, tiny_names, monkeypatch):
    names, inputs = tiny_names
    monkeypatch.setattr(runner.LoadImage, "input_dir", str(inputs))
    _, api = load(name)
    small = runner.with_models(api, names, **SMALL)
    runner.SaveImage.saved = []
    results, ui = runner.execute(small, nodes.NODE_CLASS_MAPPINGS)
    assert runner.SaveImage.saved, "no image saved"
    for prefix, images in runner.SaveImage.saved:
        assert images.ndim == 4 and images.shape[-1] == 3 and torch.isfinite(images).all(), prefix
    for nid, e in small.items():
        if e["class_type"] == "TwigTIPO":
            assert ui[nid]["text"][0].startswith("1girl,")  # shown on the node by web/js/twig_tipo_prompt.js


# --------------------------------------------------------------------------------------------------
# With the trained demo model in the checkout: the demo workflow draws the colours its prompts ask for


def _packaged_demo() -> bool:
    from twig_core.catalog import DEMO_DIR, is_pipeline_folder

    return is_pipeline_folder(str(DEMO_DIR))


# workflow: (its English prompt, the objects it names as shape, colour, place; picture size; what is guarded)
DEMO_DRAWS = {
    # the 128² weights get colours right; position and count are not learned well enough yet (README, "Embedded
    # demo model"), so only colour is guarded
    "demo_text_to_image": ("a red circle on the left and a blue square on the right",
                           [("circle", "red", "left"), ("square", "blue", "right")], 128, ("color",)),
    # the 256² model draws shapes: each object in its shape, colour and place, from the shape classifier
    "demo_256_text_to_image": ("a yellow triangle on the left and a blue square on the right",
                               [("triangle", "yellow", "left"), ("square", "blue", "right")], 256,
                               ("color", "shape", "position")),
}


@pytest.mark.parametrize("name", sorted(DEMO_DRAWS))
def test_demo_workflow_draws_its_prompt_with_the_trained_demo_model(name, monkeypatch):
    from training.evaluate import evaluate_image
    from training.scenes import Background, Group, Scene

    prompt, objects, size, guarded = DEMO_DRAWS[name]
    monkeypatch.delenv("TWIG_DEMO_DIR", raising=False)
    monkeypatch.setattr(catalog, "DEMO_256_DIR", Path(catalog.__file__).parent / "demo_model_256")  # the shipped one
    folder = catalog.DEMO_256_DIR if size == 256 else catalog.DEMO_DIR
    if not catalog.is_pipeline_folder(str(folder)):
        pytest.skip(f"{folder.name} (a trained demo model) is not in this checkout")
    _, api = load(name)
    runner.SaveImage.saved = []
    runner.execute(api, nodes.NODE_CLASS_MAPPINGS)
    scene = Scene(kind="pair_position", groups=[Group(shape, color, position=place) for shape, color, place in objects],
                  background=Background(["white"]))
    assert [e["inputs"]["positive"] for e in api.values() if e["class_type"] == "TwigTextEncode"][0] == prompt
    saved = runner.SaveImage.saved
    assert len(saved) == 2
    for prefix, images in saved:  # English, then Chinese: the same scene
        assert tuple(images.shape[1:3]) == (size, size), prefix  # the model's own size from the 1024² choice
        result = evaluate_image(scene, images[0].numpy(), check_background=False)
        assert all(result[k] for k in guarded), (prefix, result)


@pytest.mark.skipif(not _packaged_demo(), reason="twig_core/demo_model (the trained demo model) is not in this checkout")
def test_demo_lora_workflow_draws_pink_only_with_the_lora(monkeypatch, tmp_path):
    """The demo model has no picture for "pink" / "粉色": the same seed draws pink pixels only with the demo LoRA
    (trained here, ``python -m training demo --stage lora``), in both languages."""
    monkeypatch.delenv("TWIG_DEMO_DIR", raising=False)
    monkeypatch.setenv("TWIG_MODELS_DIR", str(tmp_path))  # the shipped demo LoRA, not a stand-in
    _, api = load("demo_lora")
    runner.SaveImage.saved = []
    runner.execute(api, nodes.NODE_CLASS_MAPPINGS)
    from training.lora_demo import pink_pixels

    counts = {prefix: int(pink_pixels(images[0])) for prefix, images in runner.SaveImage.saved}
    assert set(counts) == {f"twig_demo_{lang}_{kind}" for lang in ("en", "zh") for kind in ("base", "lora")}
    for lang in ("en", "zh"):
        assert counts[f"twig_demo_{lang}_base"] <= 20 and counts[f"twig_demo_{lang}_lora"] >= 300, counts
