"""Test setup of the first-party families' tests (`plugins/*/tests`): no entry-point autoloading, one torch thread.

Nothing here comes from the host's `tests/`, so `pytest plugins/dd2_var/tests` runs on its own.
"""

import os
import tempfile

# Before dd2cli.plugins is used: each test registers the plugins it needs (`plugins.register_plugin`).
os.environ["DD2_LOAD_PLUGINS"] = ""
# Never the Hugging Face hub, never the user's hub cache: official files are only ever found or reported missing.
os.environ["DD2_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = os.path.join(tempfile.mkdtemp(prefix="dd2-tests-hub-"), "hub")
# What dd2 caches (fitted adapters, reference statistics) goes to a temporary folder, never the user's.
os.environ["DD2_CACHE_DIR"] = tempfile.mkdtemp(prefix="dd2-tests-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models on a shared 2-core machine run many times faster on one thread.
torch.set_num_threads(1)

from dd2cli import plugins  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_plugins(monkeypatch):
    """Every test starts with an empty plugin manager and registry."""
    monkeypatch.setenv("DD2_LOAD_PLUGINS", "")
    plugins.reset()
    yield
    plugins.reset()
