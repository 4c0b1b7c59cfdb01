"""The model catalog (twig_core.catalog): what a file or folder holds, the names the pickers show, the embedded
demo model, and that the nodes and the WebUI tab list and find the same things from the same folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nodes import host
from nodes.loaders import MODEL_FOLDERS, TwigModelLoader, TwigTextEncoderLoader, TwigVAELoader
from tests.builders import write_model_folders, write_tiny_pipeline
from twig_core import catalog
from twig_webui.engine import Engine
from twig_webui.host import Host


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """models/: a transformer file, a text encoder folder and a VAE file (write_model_folders), plus in
    diffusion_models a pipeline folder, a diffusers transformer folder, a diffusers VAE folder, a damaged GGUF
    file and another model's checkpoint."""
    root = tmp_path_factory.mktemp("catalog") / "models"
    write_model_folders(root, "tiny")
    dm = root / "diffusion_models"
    pipe = write_tiny_pipeline(dm / "tiny_pipe")
    shutil.copytree(pipe / "transformer", dm / "tiny_diffusers_transformer")
    shutil.copytree(pipe / "vae", dm / "tiny_diffusers_vae")
    (dm / "other.gguf").write_bytes(b"GGUF" + bytes(12))
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(dm / "sd15.safetensors"))
    return root


def test_kind_classifies_files_and_folders(models, tmp_path):
    dm = models / "diffusion_models"
    assert catalog.kind(str(dm / "tiny_twig.safetensors")) == "transformer"
    assert catalog.kind(str(dm / "tiny_diffusers_transformer")) == "transformer"
    assert catalog.kind(str(dm / "tiny_pipe")) == "pipeline"
    assert catalog.kind(str(dm / "tiny_diffusers_vae")) == "vae"
    assert catalog.kind(str(models / "vae" / "tiny_dcae.safetensors")) == "vae"
    assert catalog.kind(str(models / "text_encoders" / "tiny_gemma")) == "text_encoder"
    assert catalog.kind(str(dm / "sd15.safetensors")) is None
    assert catalog.kind(str(dm / "other.gguf")) is None
    assert catalog.kind(str(tmp_path / "missing.safetensors")) is None


def test_listing_names_folders_then_files(models):
    dm = str(models / "diffusion_models")
    names = list(catalog.listing([dm]))
    assert names == ["tiny_diffusers_transformer/", "tiny_diffusers_vae/", "tiny_pipe/", "other.gguf",
                     "sd15.safetensors", "tiny_twig.safetensors"]  # no files inside folders
    classified = catalog.listing([dm], kinds=("transformer", "pipeline"))
    assert list(classified) == ["tiny_diffusers_transformer/", "tiny_pipe/", "tiny_twig.safetensors"]
    assert classified["tiny_pipe/"] == str(models / "diffusion_models" / "tiny_pipe")
    # pipeline folders found elsewhere serve the text encoder and VAE pickers too
    vae = catalog.listing([str(models / "vae")], pipeline_roots=[dm])
    assert list(vae) == ["tiny_dcae.safetensors", "tiny_pipe/"]
    assert catalog.find("tiny_pipe/", [str(models / "vae")], [dm]) == str(models / "diffusion_models" / "tiny_pipe")
    assert catalog.find("tiny_twig.safetensors", [str(models / "vae")], [dm]) is None  # only pipelines from there
    assert catalog.find("../vae/tiny_dcae.safetensors", [dm]) is None  # no way out of the model folder
    assert catalog.find("", [dm]) is None


def test_demo_location(monkeypatch, tmp_path, models):
    pipe = str(models / "diffusion_models" / "tiny_pipe")
    monkeypatch.setenv("TWIG_DEMO_DIR", pipe)
    assert catalog.demo_dir() == pipe and catalog.find(catalog.DEMO_NAME, []) == pipe
    monkeypatch.setattr(catalog, "DEMO_256_DIR", tmp_path / "no_256")
    assert list(catalog.with_demo({"a": "b"})) == [catalog.DEMO_NAME, "a"]
    with pytest.raises(Exception, match="not in this install.*no_256"):
        catalog.find(catalog.DEMO_256_NAME, [])
    monkeypatch.setattr(catalog, "DEMO_256_DIR", Path(pipe))  # the 256² model listed after the 128² one
    assert list(catalog.with_demo({"a": "b"})) == [catalog.DEMO_NAME, catalog.DEMO_256_NAME, "a"]
    assert catalog.find(catalog.DEMO_256_NAME, []) == pipe
    monkeypatch.setenv("TWIG_DEMO_DIR", str(tmp_path / "nothing"))
    assert catalog.demo_dir() is None and list(catalog.with_demo({"a": "b"})) == [catalog.DEMO_256_NAME, "a"]
    with pytest.raises(Exception, match="not in this install.*nothing"):
        catalog.find(catalog.DEMO_NAME, [])
    monkeypatch.undo()
    monkeypatch.delenv("TWIG_DEMO_DIR", raising=False)
    packaged = {catalog.DEMO_NAME: catalog.DEMO_DIR, catalog.DEMO_256_NAME: catalog.DEMO_256_DIR}
    assert catalog.demos() == {k: str(v) for k, v in packaged.items() if catalog.is_pipeline_folder(str(v))}
    assert catalog.DEMO_DIR == Path(catalog.__file__).parent / "demo_model"
    assert catalog.DEMO_256_DIR == Path(catalog.__file__).parent / "demo_model_256"


@pytest.mark.parametrize("demo", [True, False])
def test_nodes_and_tab_list_and_find_the_same_models(models, tmp_path, monkeypatch, demo):
    """One models/ folder holding only Twig's models: the nodes' loaders and the tab's pickers agree, demo first."""
    only_twig = tmp_path / "models"
    for sub in ("diffusion_models", "text_encoders", "vae"):
        shutil.copytree(models / sub, only_twig / sub, ignore=shutil.ignore_patterns("sd15*", "*.gguf", "*_vae"))
    monkeypatch.setenv("TWIG_MODELS_DIR", str(only_twig))
    pipe = str(only_twig / "diffusion_models" / "tiny_pipe")
    monkeypatch.setenv("TWIG_DEMO_DIR", pipe if demo else str(tmp_path / "nothing"))
    monkeypatch.setattr(catalog, "DEMO_256_DIR", Path(pipe) if demo else tmp_path / "nothing")
    tab = Engine(Host(only_twig, tmp_path / "out", device="cpu")).catalog

    node_names = TwigModelLoader.INPUT_TYPES()["required"]["model_name"][0]
    assert node_names == list(tab.models())
    assert (node_names[:2] == [catalog.DEMO_NAME, catalog.DEMO_256_NAME]) == demo
    for name in node_names:
        assert host.resolve_model(name, MODEL_FOLDERS) == tab.resolve("model", name)
    te_names = TwigTextEncoderLoader.INPUT_TYPES()["required"]["text_encoder_name"][0]
    assert "tiny_gemma/" in te_names and "tiny_gemma/" in tab.text_encoders()
    assert host.resolve_model("tiny_gemma/", ["text_encoders"]) == tab.resolve("text_encoder", "tiny_gemma/")
    vae_names = TwigVAELoader.INPUT_TYPES()["required"]["vae_model"][0]
    assert "tiny_dcae.safetensors" in vae_names and "tiny_dcae.safetensors" in tab.vaes()
