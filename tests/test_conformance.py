"""The teacher contract over the whole registry (the pattern of timm's tests/test_models.py).

Parametrised from the registry `dd2` builds out of the installed ``dd2`` entry points (the conftest turns
autoloading off, so this module loads them itself), every registered variant is covered one way or another:

- a variant whose weights ship with its plugin (`var-digits`, `llamagen-digits`, `raster-digits` when the
  example plugin is installed) is loaded as users load it and must pass `dd2cli.testing.check_teacher`;
- a variant that needs downloaded weights (`var-d16`, `llamagen-b`, ...) is listed too: loading it without
  its files must be a `MissingWeightsError` of one sentence naming the file and the `--weights` option;
- each family with such variants is checked on random miniatures instead: small random-weight
  checkpoints written in the official file layouts and read back by the family's strict loaders.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Callable

import pytest
import torch

from dd2cli import MissingWeightsError, Variant, check_teacher, plugins, write_json


def _installed_registry() -> plugins.TeacherRegistry:
    """The registry as the `dd2` command builds it: every installed ``dd2`` entry point."""
    plugins.reset()
    try:
        for ep in importlib.metadata.entry_points(group=plugins.ENTRY_POINT_GROUP):
            plugins.register_plugin(ep.load(), name=ep.name)
        return plugins.registry()
    finally:
        plugins.reset()


def _bundled(variant: Variant) -> bool:
    return all(w.bundled is not None for w in variant.weights)


REGISTRY = _installed_registry()
BUNDLED = sorted(name for name, v in REGISTRY.variants.items() if _bundled(v))
DOWNLOAD_ONLY = sorted(name for name, v in REGISTRY.variants.items() if not _bundled(v))


@pytest.fixture
def installed() -> plugins.TeacherRegistry:
    """The installed entry points, registered in this test's fresh plugin manager."""
    for ep in importlib.metadata.entry_points(group=plugins.ENTRY_POINT_GROUP):
        plugins.register_plugin(ep.load(), name=ep.name)
    return plugins.registry()


# ---- random miniatures of the real families, in the official checkpoint layouts ---------------------

def _var_miniature(official: str, shared_aln: bool) -> Callable[[Path], object]:
    """VAR-d2 (width 64·depth, as the released configs) with raw `.pth` state dicts, as the released files.

    Loaded through the registered variant `official` (its loader and sampling settings); only the network
    sizes shrink, through the family's `config` option.
    """

    def build(tmp_path: Path):
        from dd2_var.config import VARConfig, VQVAEConfig
        from dd2_var.teacher import new_teacher

        patch_nums = (1, 2, 3, 4) if shared_aln else (1, 2, 4)
        var_cfg = VARConfig(depth=2, width=128, num_heads=2, num_classes=10, vocab_size=64, z_channels=8,
                            patch_nums=patch_nums, shared_aln=shared_aln)
        vae_cfg = VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                              patch_nums=patch_nums)
        random = new_teacher(var_cfg, vae_cfg, seed=0)  # lively random weights
        files = {"var": tmp_path / "var_d2.pth", "vae": tmp_path / "vae_mini.pth"}
        torch.save(random.var.state_dict(), files["var"])
        torch.save(random.vae.state_dict(), files["vae"])
        write_json(tmp_path / "var_mini.json", {"var": var_cfg.to_dict(), "vae": vae_cfg.to_dict()})
        variant = REGISTRY.get(official)
        mini = dataclasses.replace(variant, name=f"{official}-mini", image_size=vae_cfg.image_size,
                                   options={**variant.options, "config": str(tmp_path / "var_mini.json")})
        teacher = mini.load(weights=files)
        assert teacher.var.cfg == var_cfg and teacher.spec.evaluation == variant.options["evaluation"]
        return teacher

    return build


def _llamagen_miniature(tmp_path: Path):
    """A 2-layer GPT (4x4 tokens) and a small VQ, saved as the official `.pt` files ({"model": state})."""
    from dd2_llamagen.gpt import GPTConfig, LlamaGenGPT
    from dd2_llamagen.teacher import load_from_checkpoints
    from dd2_llamagen.vq import VQConfig, VQModel

    gpt_cfg = GPTConfig(dim=64, n_layer=2, n_head=2, vocab_size=64, block_size=16, num_classes=10)
    vq_cfg = VQConfig(codebook_size=64, ch=32, ch_mult=(1, 1, 2), z_channels=32, num_res_blocks=1)
    torch.manual_seed(0)
    torch.save({"model": LlamaGenGPT(gpt_cfg).state_dict()}, tmp_path / "c2i_mini.pt")
    torch.save({"model": VQModel(vq_cfg).state_dict()}, tmp_path / "vq_mini.pt")
    return load_from_checkpoints(tmp_path / "c2i_mini.pt", tmp_path / "vq_mini.pt", gpt_cfg, vq_cfg,
                                 variant="llamagen-mini")


#: family -> {miniature id: builder(tmp_path) -> Teacher}; the layouts of every download-only variant
MINIATURES: dict[str, dict[str, Callable[[Path], object]]] = {
    "var": {"var-d16-mini": _var_miniature("var-d16", shared_aln=False),  # the layout of var-d16 ... var-d30
            "var-d36-mini": _var_miniature("var-d36", shared_aln=True)},  # shared AdaLN (ada_gss)
    "llamagen": {"llamagen-mini": _llamagen_miniature},
}
MINIATURE_CASES = [(name, build) for family in sorted(REGISTRY.families) for name, build in
                   MINIATURES.get(family, {}).items()]


# ---- the registry itself ------------------------------------------------------------------------------

def test_the_registry_holds_the_installed_families():
    assert {"var", "llamagen"} <= set(REGISTRY.families)
    assert {"var-digits", "llamagen-digits"} <= set(BUNDLED)
    assert {"var-d16", "var-d36", "llamagen-b", "llamagen-3b"} <= set(DOWNLOAD_ONLY)
    if importlib.util.find_spec("dd2_raster_digits") is not None:
        assert "raster-digits" in BUNDLED
    assert sorted(BUNDLED + DOWNLOAD_ONLY) == sorted(REGISTRY.variants)


def test_every_family_is_checked_offline():
    """A family passes the contract offline: a bundled variant, or miniatures when it has download-only ones."""
    for name, family in REGISTRY.families.items():
        variants = [v.name for v in family.variants]
        needs_download = [v for v in variants if v in DOWNLOAD_ONLY]
        if needs_download:
            assert MINIATURES.get(name), (f"family '{name}' has download-only variants {needs_download} but no "
                                          f"random miniature in MINIATURES")
        assert MINIATURES.get(name) or any(v in BUNDLED for v in variants), (
            f"family '{name}' has neither a bundled variant nor a random miniature to check the contract on")


# ---- the contract on every variant that loads offline ----------------------------------------------------

@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_variant_passes_the_contract(installed, name):
    variant = installed.get(name)
    teacher = variant.load(device="cpu")
    assert teacher.variant_name == name
    check_teacher(teacher, batch_size=2, seed=0, variant=variant)


@pytest.mark.parametrize("name, build", MINIATURE_CASES, ids=[name for name, _ in MINIATURE_CASES])
def test_random_miniature_passes_the_contract(tmp_path, name, build):
    check_teacher(build(tmp_path), batch_size=2, seed=0)


@pytest.mark.parametrize("name", DOWNLOAD_ONLY)
def test_download_only_variant_without_weights_is_one_clear_error(installed, tmp_path, name):
    variant = installed.get(name)
    with pytest.raises(MissingWeightsError) as info:
        variant.load(weights_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message and ". " not in message and message.endswith("."), message  # one sentence
    assert f"'{name}'" in message
    for missing in (w for w in variant.weights if w.bundled is None):  # every missing file, not just the first
        assert missing.filename in message and f"--weights {missing.key}=PATH" in message
        if missing.url:
            assert missing.url in message


@pytest.mark.parametrize("name", sorted(REGISTRY.variants))
def test_distill_defaults_are_valid_engine_settings(name):
    from dd2cli.config import load_settings
    from dd2cli.settings import DistillSettings

    variant = REGISTRY.variants[name]
    settings = load_settings(DistillSettings, base=dict(variant.distill_defaults))  # unknown keys, types, ranges
    settings.validate()
    assert variant.features in ("inception", "digits")
