"""Tests of the example plugin: the dd2 contract suite on the bundled teacher, plus plugin wiring.

Run (after `pip install -e examples/dd2-raster-digits`):
    python -m pytest examples/dd2-raster-digits/tests -q
"""

from __future__ import annotations

import importlib.metadata
import math

import pytest
import torch

import dd2_raster_digits
from dd2cli import SamplingSettings, check_teacher, load_digits_dataset, plugins


@pytest.fixture(scope="module")
def teacher():
    torch.set_num_threads(1)  # the model is tiny: one thread avoids contention overhead
    return dd2_raster_digits.VARIANT.load(device="cpu")


def test_contract_suite(teacher):
    check_teacher(teacher)


def test_samples_have_the_right_shape_and_range(teacher):
    labels = torch.arange(10)
    g = torch.Generator().manual_seed(0)
    tokens = teacher.sample(labels, teacher.spec.evaluation, generator=g)
    assert tokens.shape == (10, 64) and tokens.dtype == torch.long
    assert 0 <= int(tokens.min()) and int(tokens.max()) <= 16
    images = teacher.decode(tokens)
    assert images.shape == (10, 3, 8, 8) and images.dtype == torch.float32
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    # grey: the three channels are equal, and each pixel is level/16 of its token
    assert torch.equal(images[:, 0], images[:, 2])
    assert torch.allclose(images[:, 0].reshape(10, 64), tokens.float() / 16)


def test_encode_decode_round_trip(teacher):
    images, _ = load_digits_dataset(8, "heldout")
    ids = teacher.encode(images[:16])
    assert ids.shape == (16, 64)
    assert torch.allclose(teacher.decode(ids), images[:16], atol=0.5 / 16 + 1e-6)


def test_bundled_weights_model_the_digits(teacher):
    """The shipped weights are trained: held-out NLL far below uniform, and the label matters."""
    images, labels = load_digits_dataset(8, "heldout")
    ids = teacher.encode(images)
    with torch.no_grad():
        def nll(lab):
            logits = teacher.logits(ids, lab)
            return torch.nn.functional.cross_entropy(logits.reshape(-1, 17), ids.reshape(-1)).item()
        cond, uncond = nll(labels), nll(torch.full_like(labels, teacher.spec.null_class))
        wrong = nll((labels + 1) % 10)
    assert cond < 0.75 * math.log(17), f"held-out NLL {cond:.3f} is close to uniform: weights untrained?"
    assert cond < uncond < wrong, f"conditioning does not help: cond {cond:.3f} uncond {uncond:.3f} wrong {wrong:.3f}"


def test_filter_logits_top_k_top_p(teacher):
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = teacher.filter_logits(logits, SamplingSettings(top_k=2)).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    # HF top-p keeps the token that crosses the threshold: 0.5 + 0.3 >= 0.7
    kept = teacher.filter_logits(logits, SamplingSettings(top_p=0.7)).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.allclose(teacher.filter_logits(logits, SamplingSettings(temperature=2.0)), logits / 2)


def test_registration_through_the_hook(monkeypatch):
    monkeypatch.setenv(plugins.LOAD_ENV, "")  # no entry points: register this module by hand
    plugins.reset()
    try:
        plugins.register_plugin(dd2_raster_digits, name="raster")
        variant = plugins.get_variant("raster-digits")
        assert variant.family == "raster" and variant.image_size == 8
        assert variant.weights[0].bundled is not None and variant.weights[0].bundled.is_file()
        assert plugins.registry().families["raster"].plugin == "raster"
    finally:
        plugins.reset()


def test_entry_point_is_declared():
    names = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="dd2")}
    assert names.get("raster") == "dd2_raster_digits", "pip install -e examples/dd2-raster-digits first"


def test_plugin_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, dd2_raster_digits; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
