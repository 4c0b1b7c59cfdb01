"""Fixtures shared by several test modules: tiny random pipeline folders, written once per session, and the
node tests' tiny models loaded through the Twig loader nodes (once per module).

The models themselves come from ``tests/builders.py``; a fixture here only writes one to a temporary folder or
loads it.
"""

import os

import pytest

from tests.builders import write_demo_pipeline, write_model_folders, write_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """A random pipeline folder in the embedded demo model's layout (``write_tiny_pipeline``)."""
    return write_tiny_pipeline(tmp_path_factory.mktemp("twig") / "tiny_pipeline")


@pytest.fixture(scope="session")
def demo_standin(tmp_path_factory):
    """A stand-in for the embedded demo model's folder (``write_demo_pipeline``), for TWIG_DEMO_DIR."""
    return write_demo_pipeline(tmp_path_factory.mktemp("demo") / "demo_model")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_model_folders(root, "tiny")
    old = os.environ.get("TWIG_MODELS_DIR")
    os.environ["TWIG_MODELS_DIR"] = str(root)
    yield root
    if old is None:
        os.environ.pop("TWIG_MODELS_DIR", None)
    else:
        os.environ["TWIG_MODELS_DIR"] = old


@pytest.fixture(scope="module")
def parts(models_dir):
    from nodes.loaders import TwigModelLoader, TwigTextEncoderLoader, TwigVAELoader

    (model,) = TwigModelLoader().load("tiny_twig.safetensors", "fp32")
    (te,) = TwigTextEncoderLoader().load("tiny_gemma/", 300, "cpu", "fp32")
    (vae,) = TwigVAELoader().load("tiny_dcae.safetensors", "fp32")
    return model, te, vae


@pytest.fixture(scope="module")
def conds(parts):
    from nodes.conditioning import TwigTextEncode

    _, te, _ = parts
    out = TwigTextEncode().encode(te, "一只可爱的小猫在窗台上睡觉, a cat on a sunny windowsill", "blurry, low quality")
    return out["result"][0], out["result"][1]
