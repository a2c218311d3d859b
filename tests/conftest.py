"""Test setup: no entry-point autoloading; the synthetic teacher is registered by fixtures only."""

import os
import sys
import tempfile
from pathlib import Path

# Before dd2cli.plugins is used: tests decide which plugins exist.
os.environ["DD2_LOAD_PLUGINS"] = ""
# Tests never reach the Hugging Face hub (tests/test_downloads.py serves it on loopback) and never see the
# user's hub cache.
os.environ["DD2_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = os.path.join(tempfile.mkdtemp(prefix="dd2-tests-hub-"), "hub")
# What dd2 caches (reference statistics, fitted adapters) goes to a temporary folder, never the user's.
os.environ["DD2_CACHE_DIR"] = tempfile.mkdtemp(prefix="dd2-tests-cache-")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models on a shared 2-core machine run many times faster on one thread.
torch.set_num_threads(1)

from dd2cli import plugins  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run where CUDA is, and are skipped (with the reason) everywhere else."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_plugins(monkeypatch):
    """Every test starts with an empty plugin manager and registry."""
    monkeypatch.setenv("DD2_LOAD_PLUGINS", "")
    plugins.reset()
    yield
    plugins.reset()


@pytest.fixture
def synthetic_plugin():
    from synthetic import SyntheticPlugin

    plugins.register_plugin(SyntheticPlugin(), name="synthetic")
    return plugins.registry()


@pytest.fixture
def synthetic_teacher():
    from synthetic import SyntheticTeacher

    return SyntheticTeacher().eval()
