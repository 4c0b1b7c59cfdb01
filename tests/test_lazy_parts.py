"""One-shot generation loads each network only for its stage: the picture is the one a run with everything loaded
draws, bit for bit; at most one network is alive while any of them runs; a wrong file fails before any loads."""

import gc
import weakref

import pytest
import torch
from PIL import Image

from tests.builders import write_model_folders, write_tiny_lora
from twig_core import dcae_exec, loader, pipeline
from twig_core.__main__ import main
from twig_core.text import TextEncoder

NETWORKS = {"load_transformer": "transformer", "load_text_encoder": "text_encoder", "load_vae": "vae"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    names = write_model_folders(root)
    lora = write_tiny_lora(root / "style.safetensors", seed=1)
    return ["--transformer", str(root / "diffusion_models" / names["model"]),
            "--text-encoder", str(root / "text_encoders" / names["text_encoder"]),
            "--vae", str(root / "vae" / names["vae"]), "--lora", f"{lora}:0.8",
            "--steps", "2", "--seed", "5", "--width", "96", "--height", "64", "--negative", "blurry"]


class Census:
    """Weak references to every network the loader builds, and which of them are alive whenever one runs."""

    def __init__(self, monkeypatch):
        self.refs, self.stages = [], []
        for fn, name in NETWORKS.items():
            def load(*args, _real=getattr(loader, fn), _name=name, **kwargs):
                net = _real(*args, **kwargs)
                self.refs.append((_name, weakref.ref(net.model if _name == "text_encoder" else net)))
                return net

            monkeypatch.setattr(loader, fn, load)
        self._stage(monkeypatch, TextEncoder, "encode", "text_encoder")
        self._stage(monkeypatch, pipeline, "sample_latents", "transformer")
        self._stage(monkeypatch, dcae_exec, "encode", "vae")
        self._stage(monkeypatch, dcae_exec, "decode", "vae")

    def _stage(self, monkeypatch, owner, attr, name):
        real = getattr(owner, attr)

        def run(*args, **kwargs):
            gc.collect()
            self.stages.append((name, sorted(n for n, ref in self.refs if ref() is not None)))
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, attr, run)


def _pixels(path):
    return torch.tensor(list(Image.open(path).getdata()))


def test_lazy_generation_draws_the_eager_picture_and_holds_one_network_at_a_time(models, tmp_path, monkeypatch):
    census = Census(monkeypatch)
    first = tmp_path / "first.png"
    assert main(["generate", "--prompt", "a red circle", *models, "--keep-loaded", "--out", str(first)]) == 0
    # everything loaded first: all three are alive at every stage (what the census must catch)
    assert census.stages and all(alive == ["text_encoder", "transformer", "vae"] for _, alive in census.stages)
    runs = {}
    for mode in ("eager", "lazy"):  # image to image: VAE encode, text, transformer, VAE decode
        census.stages.clear()
        out = tmp_path / f"{mode}.png"
        extra = ["--keep-loaded"] if mode == "eager" else []
        assert main(["generate", "--prompt", "a blue square", *models, *extra, "--image", str(first),
                     "--denoise", "0.7", "--out", str(out)]) == 0
        runs[mode] = (out, list(census.stages))
    assert torch.equal(_pixels(runs["eager"][0]), _pixels(runs["lazy"][0]))
    assert Image.open(runs["eager"][0]).text["parameters"] == Image.open(runs["lazy"][0]).text["parameters"]
    assert "LoRA: style:0.8" in Image.open(runs["lazy"][0]).text["parameters"]
    stages = runs["lazy"][1]
    assert [name for name, _ in stages] == ["vae", "text_encoder", "text_encoder", "transformer", "vae"]
    for name, alive in stages:
        assert alive == [name], stages

    census.stages.clear()  # text to image, lazy: the same picture as the first (eager) run
    again = tmp_path / "again.png"
    assert main(["generate", "--prompt", "a red circle", *models, "--out", str(again)]) == 0
    assert torch.equal(_pixels(first), _pixels(again))
    assert [(name, alive) for name, alive in census.stages] == [
        ("text_encoder", ["text_encoder"]), ("text_encoder", ["text_encoder"]), ("transformer", ["transformer"]),
        ("vae", ["vae"])]


def test_lazy_parts_know_the_transformer_config_without_loading(models, monkeypatch):
    calls = []
    for fn in NETWORKS:
        real = getattr(loader, fn)
        monkeypatch.setattr(loader, fn, lambda *a, _real=real, _fn=fn, **k: calls.append(_fn) or _real(*a, **k))
    parts = loader.load_parts(models[1], models[3], models[5], lazy=True)
    assert calls == []
    config = parts.transformer.config
    assert parts.residency.use(parts.transformer).config == config and calls == ["load_transformer"]


@pytest.mark.parametrize("wrong", ["missing", "transformer", "text_encoder"])
def test_a_wrong_vae_fails_before_any_network_loads(models, tmp_path, capsys, monkeypatch, wrong):
    loads = []
    for fn in NETWORKS:
        monkeypatch.setattr(loader, fn, lambda *a, _fn=fn, **k: loads.append(_fn))
    vae = {"missing": str(tmp_path / "nope.safetensors"), "transformer": models[1], "text_encoder": models[3]}[wrong]
    args = list(models)
    args[args.index("--vae") + 1] = vae
    assert main(["generate", "--prompt", "x", *args, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert vae.rstrip("/") in err and loads == []
    if wrong != "missing":
        assert "VAE" in err or "DC-AE" in err
