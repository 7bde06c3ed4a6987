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


@pytest.fixture(scope="session")
def default_model_cache(tmp_path_factory) -> Path:
    """Cache dir for the converted default model: $LORAPLEX_CACHE_DIR if set (kept across
    sessions), else a session temp dir."""
    env = os.environ.get("LORAPLEX_CACHE_DIR")
    return Path(env) if env else tmp_path_factory.mktemp("loraplex-cache")


@pytest.fixture(scope="session")
def default_model_dir(default_model_cache) -> Path:
    """The embedded default model (SmolLM2-135M-Instruct) as a HF folder. The GGUF conversion
    takes ~35 s on 2 cores: session scope, so every real_model test file shares one conversion."""
    from loraplex.model import default_model as dm

    return dm.ensure_default_model(default_model_cache, progress=True)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a module (`pytestmark = pytest.mark.usefixtures(...)`), then
    the previous count. On a shared 2-core box two intra-op threads spin-wait for each other
    whenever another process is busy (measured: a 16-token greedy loop on the default model took
    11 s with 2 threads against 1.1 s with 1; tiny GEMMs up to 300x slower); one is contention-proof."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
