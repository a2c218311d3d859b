"""The bundled `var-digits` teacher: loads with no download, passes the contract, reconstructs
held-out digits and samples digits of the requested class."""

import pytest
import torch

import dd2_var
from dd2cli import check_teacher, load_digits_classifier, load_digits_dataset, plugins, read_json


@pytest.fixture(scope="module")
def digits():
    plugins.reset()
    plugins.register_plugin(dd2_var, name="var")
    teacher = plugins.get_variant("var-digits").load()
    plugins.reset()
    return teacher


def test_bundled_files_are_small_and_described():
    variant = dd2_var.family().variants[-1]
    assert variant.name == "var-digits"
    total = sum(w.bundled.stat().st_size for w in variant.weights)
    assert total < 8 * 2**20, f"bundled weights are {total / 2**20:.1f} MiB"
    config = read_json(dd2_var.DIGITS_CONFIG)
    assert config["var"]["vocab_size"] == config["vae"]["vocab_size"]
    assert config["training"]["total_seconds"] > 0 and "heldout_recon_mse" in config["metrics"]


def test_contract_suite_on_var_digits(digits):
    assert digits.variant_name == "var-digits"
    assert digits.spec.image_size == 16 and digits.spec.num_classes == 10
    assert digits.spec.evaluation.top_k == dd2_var.DIGITS_TOP_K < digits.spec.vocab_size
    check_teacher(digits, batch_size=2, seed=0)


def test_encode_decode_reconstructs_heldout_digits(digits):
    images, labels = load_digits_dataset(16, "heldout")
    recon = digits.decode(digits.encode(images))
    mse = torch.mean((recon - images) ** 2).item()
    assert mse < 0.01, f"held-out reconstruction MSE {mse:.4f}"
    # reconstructions keep their identity for the shipped classifier
    clf = load_digits_classifier()
    assert (clf.predict(recon) == labels).float().mean().item() > 0.95


def test_samples_are_digits_of_the_requested_class(digits):
    labels = torch.arange(10).repeat_interleave(5)
    tokens = digits.sample(labels, digits.spec.evaluation, generator=torch.Generator().manual_seed(0))
    images = digits.decode(tokens)
    accuracy = (load_digits_classifier().predict(images) == labels).float().mean().item()
    assert accuracy >= 0.9, f"class consistency {accuracy:.2f}"
    # and they are not all the same image: the sampler really samples
    assert torch.unique(tokens, dim=0).shape[0] > 40


def test_identity_records_the_bundled_weights(digits):
    ident = digits.identity()
    assert ident["teacher"] == "var-digits"
    assert {k: v["file"] for k, v in ident["weights"].items()} == {
        "var": "var_digits_transformer.safetensors", "vae": "var_digits_vae.safetensors"}
