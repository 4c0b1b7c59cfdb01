"""Fixtures shared by several test modules: tiny random pipeline folders, written once per session.

The models themselves come from ``tests/builders.py``; a fixture here only writes one to a temporary folder.
"""

import pytest

from tests.builders import write_demo_pipeline, write_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """A random pipeline folder in the embedded demo model's layout (``write_tiny_pipeline``)."""
    return write_tiny_pipeline(tmp_path_factory.mktemp("twig") / "tiny_pipeline")


@pytest.fixture(scope="session")
def demo_standin(tmp_path_factory):
    """A stand-in for the embedded demo model's folder (``write_demo_pipeline``), for TWIG_DEMO_DIR."""
    return write_demo_pipeline(tmp_path_factory.mktemp("demo") / "demo_model")
