"""The real-size recipes in examples/configs load as valid settings on top of their variant's defaults."""

import importlib
from pathlib import Path

import pytest

from dd2cli import plugins
from dd2cli.config import load_settings
from dd2cli.settings import DistillSettings

CONFIGS = Path(__file__).parent.parent / "examples" / "configs"


@pytest.mark.parametrize("name, variant, head_only", [("var-d16", "var-d16", 2000), ("llamagen-l", "llamagen-l", 0)])
def test_recipe_loads_on_its_variant(name, variant, head_only):
    for family in ("var", "llamagen"):
        plugins.register_plugin(importlib.import_module(f"dd2_{family}"), name=family)
    defaults = dict(plugins.get_variant(variant).distill_defaults)
    settings = load_settings(DistillSettings, CONFIGS / f"{name}.toml", [], base=defaults)
    settings.validate()
    assert settings.stage1.head_only_steps == head_only
    assert settings.stage2.guidance_updates == 2 and settings.stage2.alpha == 1.0
    assert settings.stage2.batch_size == 512 and settings.precision == "bf16"


def test_the_exact_teacher_recipe_is_what_the_exact_family_ships():
    import dd2_exact

    plugins.register_plugin(dd2_exact, name="exact")
    from_file = load_settings(DistillSettings, CONFIGS / "exact-teacher.toml", [])
    shipped = load_settings(DistillSettings, None, [], base=dict(plugins.get_variant("exact-raster").distill_defaults))
    from_file.validate()
    assert from_file == shipped
    # and it differs from the engine's defaults where it matters
    assert from_file.flow_init.steps == 2400 and from_file.stage2.guidance_updates == 4
