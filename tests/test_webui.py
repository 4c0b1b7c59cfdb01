"""The WebUI tab's engine (no gradio), its model pickers over WebUI-style folders, the extension's install.py,
and (when gradio is installed) the tab registering through stand-ins for the WebUI's modules."""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import types
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.builders import tiny_dcae
from tests.builders import DEMO_PROMPTS, tiny_native_transformer
from twig_core.errors import TwigError
from twig_core.catalog import DEMO_NAME
from twig_webui.engine import (FROM_MODEL, Engine, Interrupted, Settings, nearest_choice, native_size,
                               size_choices, split_prompt)
from twig_webui.host import Host, WebUIHost

ROOT = Path(__file__).resolve().parent.parent
PROMPT = DEMO_PROMPTS[0]


@pytest.fixture(scope="module")
def pipeline(tiny_pipeline) -> Path:
    return tiny_pipeline


def _engine(tmp_path, pipeline, **kw) -> Engine:
    return Engine(Host(tmp_path / "models", tmp_path / "out", device="cpu", extra_models=[str(pipeline)], **kw))


def test_generate_saves_pngs_with_webui_parameters(tmp_path, pipeline):
    engine = _engine(tmp_path, pipeline)
    seen = []
    s = Settings(prompt=PROMPT, negative="模糊", steps=2, seed=7, batch_size=2, size="160x96", model=str(pipeline))
    result = engine.run(s, lambda f, d: seen.append((f, d)))
    assert len(result.paths) == 2 and result.seed == 7 and (result.width, result.height) == (160, 96)
    for i, path in enumerate(result.paths):
        assert Path(path).parent.parent == tmp_path / "out"
        im = Image.open(path)
        assert im.size == (160, 96)
        params = im.text["parameters"]
        assert params.splitlines()[0] == PROMPT
        assert "Negative prompt: 模糊" in params
        assert "Steps: 2, Sampler: flow_dpmpp_2m, CFG scale: 4.5, Seed: 7, Size: 160x96" in params
        assert ("Batch pos: 1" in params) == (i == 1)
    assert result.infotext == Image.open(result.paths[0]).text["parameters"]
    assert [d for _, d in seen if d.startswith("step")][-1] == "step 2/2"
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] <= 1.0
    # the same seed gives the same pixels; files are numbered WebUI-style
    again = engine.run(s)
    assert Path(again.paths[0]).name.startswith("00002-7")
    a = torch.tensor(list(Image.open(result.paths[0]).getdata()))
    assert torch.equal(a, torch.tensor(list(Image.open(again.paths[0]).getdata())))
    # -1 = a random seed, written into the file
    r = engine.run(Settings(prompt="a red circle", steps=1, seed=-1, model=str(pipeline)))
    assert r.seed >= 0 and f"Seed: {r.seed}," in r.infotext


def test_native_size_and_aspect_bins(pipeline):
    assert native_size(str(pipeline)) == 128
    sizes = size_choices(128)
    assert sizes[0] == "128x128" and len(sizes) == len(set(sizes))
    for s in sizes:
        w, h = (int(v) for v in s.split("x"))
        assert w % 32 == 0 and h % 32 == 0
    big = size_choices(1024)
    assert big[0] == "1024x1024" and "1344x768" in big and "768x1344" in big
    assert nearest_choice(big, "1920x1080") == "1344x768"
    assert nearest_choice(big, "garbage") == "1024x1024"


def test_split_prompt_for_tipo():
    assert split_prompt("1girl, red hair, smile") == ("1girl, red hair, smile", "")
    assert split_prompt("a girl walking through a garden at dusk") == ("", "a girl walking through a garden at dusk")
    assert split_prompt(PROMPT) == ("", PROMPT)
    tags, text = split_prompt("1girl, solo, a girl sitting under a large old tree.")
    assert tags == "1girl, solo" and text == "a girl sitting under a large old tree."


def _write_webui_models(models: Path, pipeline: Path) -> None:
    """A WebUI models/ folder: Twig files among SD files, a Gemma folder among CLIPs, a DC-AE among SD VAEs."""
    import shutil

    (models / "Twig").mkdir(parents=True)
    shutil.copytree(pipeline, models / "Twig" / "tiny")
    sd = models / "Stable-diffusion"
    sd.mkdir()
    save_file(tiny_native_transformer().state_dict(), str(sd / "twig_tiny.safetensors"))
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(sd / "sd15.safetensors"))
    (sd / "v1-5.ckpt").write_bytes(b"not ours")
    vae = models / "VAE"
    vae.mkdir()
    save_file(tiny_dcae().state_dict(), str(vae / "dcae_tiny.safetensors"))
    save_file({"encoder.down.0.block.0.conv1.weight": torch.zeros(4, 4, 3, 3)}, str(vae / "sd_vae.safetensors"))
    te = models / "text_encoder"
    te.mkdir()
    shutil.copytree(pipeline / "text_encoder", te / "tiny_gemma")
    for f in (pipeline / "tokenizer").iterdir():
        shutil.copy(f, te / "tiny_gemma" / f.name)
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(8, 4)}, str(te / "clip_l.safetensors"))


def test_pickers_list_only_twig_models_from_webui_folders(tmp_path, pipeline):
    models = tmp_path / "models"
    _write_webui_models(models, pipeline)
    engine = Engine(Host(models, tmp_path / "out", device="cpu"))
    cat = engine.catalog
    names = list(cat.models())
    assert "tiny/" in names and "twig_tiny.safetensors" in names
    assert not any("sd15" in n or "v1-5" in n for n in names)
    assert list(cat.text_encoders()) == [FROM_MODEL, "tiny_gemma/"]
    assert list(cat.vaes()) == [FROM_MODEL, "dcae_tiny.safetensors"]
    assert engine.native("twig_tiny.safetensors") == 1024  # no pos_embed in the file: the 1024 px default
    # separate files picked together
    r = engine.run(Settings(prompt="a blue square", steps=1, seed=1, model="twig_tiny.safetensors",
                            text_encoder="tiny_gemma/", vae="dcae_tiny.safetensors", size="128x128"))
    assert "Model: twig_tiny" in r.infotext
    # a transformer alone names the missing part and where it is looked for
    with pytest.raises(TwigError, match="text encoder.*text_encoder"):
        engine.run(Settings(prompt="x", steps=1, model="twig_tiny.safetensors"))
    with pytest.raises(TwigError, match="not found"):
        engine.run(Settings(prompt="x", steps=1, model="missing.safetensors"))


def test_errors_are_reported_as_twig_errors(tmp_path, pipeline):
    engine = _engine(tmp_path, pipeline)
    with pytest.raises(TwigError, match="prompt"):
        engine.run(Settings(prompt="  ", model=str(pipeline)))
    with pytest.raises(TwigError, match="multiple of 32"):
        engine.run(Settings(prompt="x", steps=1, size="100x128", model=str(pipeline)))
    with pytest.raises(TwigError, match="TIPO model"):
        engine.run(Settings(prompt="x", steps=1, tipo=True, model=str(pipeline)))
    assert not list((tmp_path / "out").rglob("*.png"))


def test_interrupt_button_and_host_interrupt_stop_the_run(tmp_path, pipeline):
    engine = _engine(tmp_path, pipeline)

    def press_at_step_2(fraction, desc):
        if desc == "step 2/20":
            engine.interrupt()

    with pytest.raises(Interrupted):
        engine.run(Settings(prompt=PROMPT, steps=20, seed=1, model=str(pipeline)), press_at_step_2)
    assert not list((tmp_path / "out").rglob("*.png"))
    # the flag is cleared for the next run
    assert engine.run(Settings(prompt=PROMPT, steps=1, seed=1, model=str(pipeline))).paths

    class Stopped(Host):
        def interrupted(self):
            return True

    with pytest.raises(Interrupted):
        Engine(Stopped(tmp_path / "m", tmp_path / "o", device="cpu", extra_models=[str(pipeline)])).run(
            Settings(prompt=PROMPT, steps=3, model=str(pipeline)))


def test_demo_model_is_the_default_when_installed(tmp_path, pipeline, monkeypatch):
    monkeypatch.setenv("TWIG_DEMO_DIR", str(pipeline))
    engine = Engine(Host(tmp_path / "models", tmp_path / "out", device="cpu"))
    assert engine.default_model() == DEMO_NAME
    r = engine.run(Settings(prompt=PROMPT, steps=1, seed=3))
    assert (r.width, r.height) == (128, 128) and "Model: Twig demo" in r.infotext


# --------------------------------------------------------------------------------------------------
# The WebUI side: stand-ins for its modules


@pytest.fixture
def webui(tmp_path, monkeypatch):
    """Stand-ins for the WebUI modules the extension touches: script_callbacks, shared (state, opts, cmd_opts),
    paths_internal, call_queue, devices, sd_models."""
    calls = {"tabs": [], "unloaded": 0, "lock": threading.Lock()}
    modules = types.ModuleType("modules")
    modules.__path__ = []
    sc = types.ModuleType("modules.script_callbacks")
    sc.on_ui_tabs = lambda cb, **kw: calls["tabs"].append(cb)
    state = types.SimpleNamespace(interrupted=False, job="", begin=lambda job="": calls.setdefault("began", job),
                                  end=lambda: calls.setdefault("ended", True))
    shared = types.ModuleType("modules.shared")
    shared.state = state
    shared.cmd_opts = types.SimpleNamespace(ckpt_dir=None, vae_dir=None, text_encoder_dir=None)
    shared.opts = types.SimpleNamespace(outdir_txt2img_samples=str(tmp_path / "outputs" / "txt2img-images"))
    paths = types.ModuleType("modules.paths_internal")
    paths.models_path = str(tmp_path / "models")
    cq = types.ModuleType("modules.call_queue")
    cq.queue_lock = calls["lock"]
    devices = types.ModuleType("modules.devices")
    devices.device = torch.device("cpu")
    sd_models = types.ModuleType("modules.sd_models")
    sd_models.unload_model_weights = lambda *a: calls.__setitem__("unloaded", calls["unloaded"] + 1)
    for name, mod in {"modules": modules, "modules.script_callbacks": sc, "modules.shared": shared,
                      "modules.paths_internal": paths, "modules.call_queue": cq, "modules.devices": devices,
                      "modules.sd_models": sd_models}.items():
        monkeypatch.setitem(sys.modules, name, mod)
        if "." in name:
            setattr(modules, name.split(".")[1], mod)
    calls["state"] = state
    return calls


def _load_tab_script():
    """Load scripts/twig_tab.py the way the WebUI does: from its file path, as a plain module."""
    path = ROOT / "scripts" / "twig_tab.py"
    spec = importlib.util.spec_from_file_location("twig_tab_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_webui_host_reads_the_webui_folders_and_state(webui, tmp_path, pipeline):
    host = WebUIHost()
    assert host.folders("model")[:2] == [str(tmp_path / "models" / "Twig"), str(tmp_path / "models" / "Stable-diffusion")]
    assert host.folders("text_encoder")[0] == str(tmp_path / "models" / "text_encoder")
    assert host.folders("vae")[0] == str(tmp_path / "models" / "VAE")
    assert host.outdir() == str(tmp_path / "outputs" / "twig-images")
    assert host.device() == torch.device("cpu")
    sys.modules["modules.shared"].cmd_opts.ckpt_dir = str(tmp_path / "elsewhere")
    assert host.folders("model")[-1] == str(tmp_path / "elsewhere")

    _write_webui_models(tmp_path / "models", pipeline)
    engine = Engine(host)
    assert "tiny/" in engine.catalog.models()
    r = engine.run(Settings(prompt=PROMPT, steps=1, seed=5, model="tiny/"))
    assert Path(r.paths[0]).is_relative_to(tmp_path / "outputs" / "twig-images")
    assert webui["began"] == "twig" and webui["ended"] and not webui["lock"].locked()
    # the WebUI's own Interrupt button
    webui["state"].interrupted = True
    with pytest.raises(Interrupted):
        engine.run(Settings(prompt=PROMPT, steps=2, seed=5, model="tiny/"))


def test_tab_registers_and_builds(webui, tmp_path, pipeline):
    gr = pytest.importorskip("gradio", reason="gradio is not installed (pip install -r requirements-webui-test.txt)")
    (tmp_path / "models" / "Twig").mkdir(parents=True)
    import shutil

    shutil.copytree(pipeline, tmp_path / "models" / "Twig" / "tiny")
    module = _load_tab_script()
    assert webui["tabs"] == [module.on_ui_tabs]
    tabs = webui["tabs"][0]()
    assert len(tabs) == 1
    blocks, title, elem_id = tabs[0]
    assert isinstance(blocks, gr.Blocks) and title == "Twig" and elem_id == "twig"
    ids = {getattr(b, "elem_id", None) for b in blocks.blocks.values()}
    for needed in ("twig_prompt", "twig_negative", "twig_generate", "twig_interrupt", "twig_gallery", "twig_tipo",
                   "twig_face", "twig_size", "twig_steps", "twig_cfg", "twig_seed", "twig_sampler", "twig_model",
                   "twig_text_encoder", "twig_vae", "twig_status"):
        assert needed in ids, needed
    model = next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "twig_model")
    choices = [c[0] if isinstance(c, (tuple, list)) else c for c in model.choices]
    assert "tiny/" in choices


def test_tab_script_without_webui_does_not_register(monkeypatch):
    monkeypatch.setitem(sys.modules, "modules", None)
    module = _load_tab_script()
    assert module._register() is False


# --------------------------------------------------------------------------------------------------
# install.py


def _install_module():
    spec = importlib.util.spec_from_file_location("twig_install_under_test", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_install_plan_installs_only_missing_and_never_torch(monkeypatch):
    inst = _install_module()
    reqs = inst.requirements()
    names = [n for n, _, _ in reqs]
    assert "torch" in names and "transformers" in names
    versions = {"torch": None, "transformers": "4.30.2", "safetensors": None, "numpy": "1.26.2"}
    install, warnings = inst.plan(reqs, lambda n: versions.get(n, "99.0"))
    assert not any(line.startswith("torch") for line in install)
    assert any(line.startswith("safetensors") for line in install)
    assert not any(line.startswith(("numpy", "transformers")) for line in install)
    assert len(warnings) == 1 and "transformers>=4.44" in warnings[0]

    ran = []
    launch = types.ModuleType("launch")
    launch.is_installed = lambda name: name != "einops"
    launch.run_pip = lambda cmd, desc=None: ran.append(cmd)
    monkeypatch.setitem(sys.modules, "launch", launch)
    inst.main()
    assert ran == ['install "einops>=0.6"']


# --------------------------------------------------------------------------------------------------
# TIPO and face refine switches


def test_tipo_switch_expands_the_prompt(tmp_path, pipeline):
    import json

    from tests.builders import save_tiny_tipo_folder

    save_tiny_tipo_folder(tmp_path / "models" / "LLM" / "tiny-tipo")
    engine = _engine(tmp_path, pipeline)
    assert list(engine.catalog.tipo_models()) == ["tiny-tipo/"]
    r = engine.run(Settings(prompt="1girl, red hair", steps=1, seed=5, tipo=True, tipo_model="tiny-tipo/",
                            tipo_length="very_short", tipo_max_tokens=48, model=str(pipeline)))
    assert r.prompt != "1girl, red hair" and "red hair" in r.prompt
    im = Image.open(r.paths[0])
    assert im.text["parameters"].startswith(r.prompt + "\n")
    assert json.loads(im.text["twig"])["tipo"]["user_prompt"] == "1girl, red hair"
    # a Chinese sentence is passed through unchanged
    r2 = engine.run(Settings(prompt=PROMPT, steps=1, seed=5, tipo=True, tipo_model="tiny-tipo/",
                             tipo_length="very_short", tipo_max_tokens=48, model=str(pipeline)))
    assert PROMPT in r2.prompt


def test_face_refine_switch_changes_only_around_the_face(tmp_path, pipeline, monkeypatch):
    import json

    import numpy as np

    from twig_core.face import detect as fdetect
    from twig_webui.engine import Catalog

    class OneFace(fdetect.Detector):
        name = "one-face"

        def detect(self, image, confidence=0.3):
            return [fdetect.Detection((48.0, 40.0, 80.0, 72.0), 0.9)]

    monkeypatch.setattr(fdetect, "get_detector", lambda spec, device=None: OneFace())
    monkeypatch.setattr(Catalog, "face_detectors", lambda self: {"one-face": "one-face"})
    engine = _engine(tmp_path, pipeline)
    s = Settings(prompt=PROMPT, steps=2, seed=3, model=str(pipeline))
    plain = engine.run(s)
    s.face, s.face_detector, s.face_denoise = True, "one-face", 0.5
    refined = engine.run(s)
    assert "face refine: 1 face(s) with one-face" in refined.notes
    a = np.asarray(Image.open(plain.paths[0]), dtype=np.int16)
    b = np.asarray(Image.open(refined.paths[0]), dtype=np.int16)
    changed = np.abs(a - b).max(-1) > 0
    assert changed[40:72, 48:80].any()
    assert not changed[:, :30].any() and not changed[:, 100:].any() and not changed[:25].any()
    assert json.loads(Image.open(refined.paths[0]).text["twig"])["face_refine"]["detector"] == "one-face"
    # no face: the image is kept, and the note says so
    monkeypatch.setattr(OneFace, "detect", lambda self, image, confidence=0.3: [])
    none = engine.run(s)
    assert any("no face found" in n for n in none.notes)
    assert np.array_equal(np.asarray(Image.open(none.paths[0])), np.asarray(Image.open(plain.paths[0])))


def test_install_script_outside_the_webui_does_nothing(tmp_path):
    """ComfyUI-Manager runs install.py too; without the WebUI's launch module it must exit cleanly."""
    import subprocess

    r = subprocess.run([sys.executable, str(ROOT / "install.py")], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ""}, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "nothing to do" in r.stdout


def test_lora_prompt_tags_apply_loras_from_the_lora_folder(tmp_path, pipeline):
    """A1111's ``<lora:NAME:STRENGTH>``: read from the tab's LoRA folder, taken out of the prompt before encoding,
    listed in the info text; the next prompt without it draws with the model as loaded."""
    from tests.builders import write_tiny_lora

    write_tiny_lora(tmp_path / "models" / "Lora" / "tiny_style.safetensors")
    engine = _engine(tmp_path, pipeline)

    def pixels(r):
        return torch.tensor(list(Image.open(r.paths[0]).getdata()))

    base = engine.run(Settings(prompt=PROMPT, steps=2, seed=4, model=str(pipeline)))
    tagged = engine.run(Settings(prompt=f"{PROMPT} <lora:tiny_style:0.8>", steps=2, seed=4, model=str(pipeline)))
    assert tagged.prompt == PROMPT and tagged.infotext.splitlines()[0] == PROMPT
    assert "LoRA: tiny_style:0.8" in tagged.infotext and "LoRA: tiny_style:0.8" in tagged.notes
    assert not torch.equal(pixels(tagged), pixels(base))
    assert torch.equal(pixels(engine.run(Settings(prompt=PROMPT, steps=2, seed=4, model=str(pipeline)))), pixels(base))
    with pytest.raises(TwigError, match="LoRA 'missing' not found"):
        engine.run(Settings(prompt="x <lora:missing>", steps=1, model=str(pipeline)))
