"""Shared pytest fixtures: tiny random models built once per session, and the `gpu` marker."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub: never hit a hub

import sys
from pathlib import Path

# Make `tests.fixtures` importable however pytest was started (rootdir-relative imports).
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pytest  # noqa: E402

from tests.fixtures.tiny_models import make_tiny_model  # noqa: E402

TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped with a reason without one)")


def pytest_collection_modifyitems(config, items):
    gpu_items = [it for it in items if "gpu" in it.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU")
    for it in gpu_items:
        it.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """family -> folder of a tiny random model (llama, mistral, qwen2, qwen3), built once."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {fam: make_tiny_model(root / fam, family=fam, seed=i) for i, fam in enumerate(TINY_FAMILIES)}


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_dirs):
    """Folder of the tiny random Llama model."""
    return tiny_model_dirs["llama"]
