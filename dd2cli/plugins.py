"""Plugin discovery: entry-point group ``dd2``, pluggy, and the teacher registry.

Nothing is loaded at import time; the first call to `get_plugin_manager()` or `registry()`
loads the entry points (unless ``DD2_LOAD_PLUGINS`` says otherwise).

``DD2_LOAD_PLUGINS``: unset → load every installed ``dd2`` entry point; empty string → load none
(tests use this and register fakes); ``"var,llamagen"`` → load only those entry-point names.
"""

from __future__ import annotations

import importlib.metadata
import os
import types
from dataclasses import dataclass, replace
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError, UnknownTeacherError
from .teachers import Family, Variant

ENTRY_POINT_GROUP = "dd2"
LOAD_ENV = "DD2_LOAD_PLUGINS"

_pm: pluggy.PluginManager | None = None
_registry: "TeacherRegistry | None" = None


def _new_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("dd2")
    pm.add_hookspecs(hookspecs)
    wanted = os.environ.get(LOAD_ENV)
    if wanted is None:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    elif wanted.strip():
        names = {n.strip() for n in wanted.split(",") if n.strip()}
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in names and not pm.has_plugin(ep.name):
                pm.register(ep.load(), name=ep.name)
                names.discard(ep.name)
        if names:
            raise PluginError(
                f"{LOAD_ENV} names plugin(s) {', '.join(sorted(names))} that are not installed; "
                f"unset {LOAD_ENV} or name installed ones (see 'dd2 plugins')."
            )
    _check(pm)
    return pm


def _check(pm: pluggy.PluginManager) -> None:
    """A misspelled hook (an implementation without a spec) is an error, not a silent no-op."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        plugin = pm.get_name(exc.plugin) if exc.plugin is not None else "?"
        raise PluginError(
            f"Plugin '{plugin}' implements a hook dd2 does not define ({exc}); "
            f"check the spelling against dd2cli.hookspecs."
        ) from None


def get_plugin_manager() -> pluggy.PluginManager:
    global _pm
    if _pm is None:
        _pm = _new_plugin_manager()
    return _pm


def register_plugin(plugin: Any, name: str | None = None) -> None:
    """Register a plugin object by hand (tests, notebooks); invalidates the teacher registry."""
    global _registry
    pm = get_plugin_manager()
    pm.register(plugin, name=name)
    _check(pm)
    _registry = None


def unregister_plugin(name: str) -> None:
    global _registry
    pm = get_plugin_manager()
    plugin = pm.get_plugin(name)
    if plugin is not None:
        pm.unregister(plugin)
    _registry = None


def reset() -> None:
    """Forget loaded plugins (tests)."""
    global _pm, _registry
    _pm = None
    _registry = None


@dataclass(frozen=True)
class PluginInfo:
    name: str
    hooks: tuple[str, ...]
    version: str | None
    distribution: str | None


def list_plugins() -> list[PluginInfo]:
    pm = get_plugin_manager()
    dists = {id(p): d for p, d in pm.list_plugin_distinfo()}
    out = []
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin) or repr(plugin)
        hooks = tuple(sorted(h.name for h in pm.get_hookcallers(plugin) or []))
        dist = dists.get(id(plugin))
        out.append(PluginInfo(
            name=name,
            hooks=hooks,
            version=dist.version if dist is not None else None,
            distribution=dist.metadata["name"] if dist is not None else None,
        ))
    return sorted(out, key=lambda p: p.name)


class TeacherRegistry:
    """Families and variants registered by all plugins, with the plugin that registered each."""

    def __init__(self) -> None:
        self.families: dict[str, Family] = {}
        self.variants: dict[str, Variant] = {}
        #: family -> the top-level Python package of the plugin that registered it (bundles may only name
        #: factories inside it)
        self.packages: dict[str, str] = {}

    def add(self, family: Family, plugin: str, package: str = "") -> None:
        if not isinstance(family, Family):
            raise PluginError(
                f"Plugin '{plugin}' registered {type(family).__name__}, not a dd2cli.teachers.Family."
            )
        if family.name in self.families:
            other = self.families[family.name].plugin
            raise PluginError(
                f"Teacher family '{family.name}' is registered by both plugin '{other}' and plugin "
                f"'{plugin}'; uninstall one of them."
            )
        variants = tuple(replace(v, family=family.name) for v in family.variants)
        for v in variants:
            if v.name in self.variants:
                other = self.families[self.variants[v.name].family].plugin
                raise PluginError(
                    f"Teacher variant '{v.name}' is registered by both plugin '{other}' and plugin "
                    f"'{plugin}'; uninstall one of them."
                )
        family = replace(family, variants=variants, plugin=plugin)
        self.families[family.name] = family
        self.packages[family.name] = package
        for v in variants:
            self.variants[v.name] = v

    def get(self, name: str) -> Variant:
        """The variant called `name` (a family name alone picks its first variant)."""
        if name in self.variants:
            return self.variants[name]
        if name in self.families and self.families[name].variants:
            return self.families[name].variants[0]
        installed = ", ".join(sorted(self.variants)) or "none"
        raise UnknownTeacherError(f"No teacher '{name}'. Installed: {installed}. See 'dd2 teachers'.")


def registry() -> TeacherRegistry:
    """The teacher registry, built on first use by calling every plugin's hook."""
    global _registry
    if _registry is None:
        pm = get_plugin_manager()
        reg = TeacherRegistry()
        # Call each implementation on its own so that a conflict can name both plugins.
        for impl in reversed(pm.hook.dd2_register_teachers.get_hookimpls()):
            families: list[Family] = []
            impl.function(register=families.append)
            for fam in families:
                reg.add(fam, impl.plugin_name, _package_of(impl.plugin))
        _registry = reg
    return _registry


def _package_of(plugin: Any) -> str:
    """The top-level package a plugin object comes from (a module, or an instance of a class)."""
    module = plugin.__name__ if isinstance(plugin, types.ModuleType) else type(plugin).__module__
    return module.split(".")[0]


def distribution_of(family: str) -> str | None:
    """The installed distribution (pip package) whose plugin registered `family`, if known."""
    fam = registry().families.get(family)
    if fam is None:
        return None
    return next((p.distribution for p in list_plugins() if p.name == fam.plugin), None)


def get_variant(name: str) -> Variant:
    return registry().get(name)
