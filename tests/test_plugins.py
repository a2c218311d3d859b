import subprocess
import sys

import pytest

from dd2cli import hookimpl, plugins
from dd2cli.errors import PluginError, UnknownTeacherError
from dd2cli.teachers import Family, Variant


def _variant(name):
    return Variant(name=name, description="fake", loader=lambda v, w, d: None)


class FakeA:
    @hookimpl
    def dd2_register_teachers(self, register):
        register(Family(name="fake", description="a fake family", variants=(_variant("fake-1"), _variant("fake-2"))))


class FakeB:
    @hookimpl
    def dd2_register_teachers(self, register):
        register(Family(name="fake", description="same family name", variants=(_variant("fake-3"),)))


class FakeC:
    @hookimpl
    def dd2_register_teachers(self, register):
        register(Family(name="other", description="same variant name", variants=(_variant("fake-1"),)))


class Misspelled:
    @hookimpl
    def dd2_register_teacher(self, register):  # missing "s"
        pass


def test_no_autoload_in_tests():
    assert plugins.list_plugins() == []
    assert plugins.registry().variants == {}


def test_registration_and_lookup():
    plugins.register_plugin(FakeA(), name="fake-a")
    reg = plugins.registry()
    assert set(reg.variants) == {"fake-1", "fake-2"}
    assert reg.get("fake-2").family == "fake"
    assert reg.get("fake").name == "fake-1"  # a family name picks its first variant
    assert reg.families["fake"].plugin == "fake-a"
    info = plugins.list_plugins()
    assert [p.name for p in info] == ["fake-a"] and info[0].hooks == ("dd2_register_teachers",)


def test_unknown_teacher_lists_installed():
    plugins.register_plugin(FakeA(), name="fake-a")
    with pytest.raises(UnknownTeacherError,
                       match=r"No teacher 'vaar'\. Installed: fake-1, fake-2\. See 'dd2 teachers'"):
        plugins.get_variant("vaar")


@pytest.mark.parametrize("other", [FakeB, FakeC])
def test_duplicate_names_name_both_plugins(other):
    plugins.register_plugin(FakeA(), name="fake-a")
    plugins.register_plugin(other(), name="fake-other")
    with pytest.raises(PluginError) as exc:
        plugins.registry()
    assert "fake-a" in str(exc.value) and "fake-other" in str(exc.value)


def test_misspelled_hook_is_caught():
    with pytest.raises(PluginError, match="dd2_register_teacher"):
        plugins.register_plugin(Misspelled(), name="typo")


def test_env_var_selects_entry_points(monkeypatch):
    monkeypatch.setenv("DD2_LOAD_PLUGINS", "no-such-plugin")
    plugins.reset()
    with pytest.raises(PluginError, match="no-such-plugin"):
        plugins.get_plugin_manager()


def test_first_party_families_come_from_entry_points():
    """Installed dd2 registers var and llamagen through the same entry-point group as third parties."""
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="dd2")}
    assert names.get("var") == "dd2_var" and names.get("llamagen") == "dd2_llamagen"


def test_help_and_teachers_do_not_import_torch():
    code = ("import sys, os; os.environ.pop('DD2_LOAD_PLUGINS', None); from dd2cli.plugins import registry; "
            "from dd2cli.cli import app; r = registry(); "
            "assert 'var-d16' in r.variants and 'llamagen-b' in r.variants, sorted(r.variants); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    env = {k: v for k, v in __import__("os").environ.items() if k != "DD2_LOAD_PLUGINS"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
