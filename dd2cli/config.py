"""Typed, documented settings loaded from TOML with `--set key=value` overrides.

A settings class is a (nested) dataclass whose fields are declared with `setting(default, help)`.
Values are merged in this order, later wins:

    class defaults  <  plugin defaults for the teacher variant  <  --config FILE.toml  <  --set a.b=v

Unknown keys and wrong types are `ConfigError`s that name the key and list the valid ones. The
resolved settings are saved (`to_dict` → JSON) next to every output, and `from_dict` reads them
back, so a run can be resumed or reproduced exactly. `resolve_layers` also says which layer each
value came from (`dd2 distill --list-settings`).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping, TypeVar, get_args, get_origin

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

T = TypeVar("T")


def setting(default: Any, help: str) -> Any:
    """A documented dataclass field; mutable defaults (dataclass instances, lists) are copied."""
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        return dataclasses.field(default_factory=lambda d=default: dataclasses.replace(d), metadata={"help": help})
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints.get(f.name, f.type)
        out[f.name] = f
    return out


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return f"list of {_type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; convert int→float and list→tuple; raise ConfigError."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"Setting '{key}' must be {_type_name(tp)}, got {value!r}.")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"Setting '{key}' must be one of {_type_name(tp)}, got {value!r}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"Setting '{key}' must be a {_type_name(tp)}, got {value!r}.")
        args = [a for a in get_args(tp) if a is not Ellipsis]
        items = [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # (TOML reads inf and nan; no setting means either)
                raise ConfigError(f"Setting '{key}' must be a finite number, got {value!r}.")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, Mapping):
            return from_dict(tp, value, prefix=f"{key}.")
    else:  # pragma: no cover - a settings class used an unsupported annotation
        raise TypeError(f"unsupported settings type {tp!r} for {key}")
    raise ConfigError(f"Setting '{key}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__}).")


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build `cls` from a nested mapping; every key must exist and every value must type-check."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"Setting '{prefix.rstrip('.') or 'root'}' must be a table, got {data!r}.")
    fields = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            where = f" in [{prefix.rstrip('.')}]" if prefix else ""
            raise ConfigError(
                f"Unknown setting '{prefix}{key}'{where}; valid keys: {', '.join(fields)}."
            )
        kwargs[key] = _coerce(value, fields[key].type, prefix + key)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"Invalid settings{' in [' + prefix.rstrip('.') + ']' if prefix else ''}: {exc}.") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(settings: Any) -> dict[str, Any]:
    """Nested plain dict (tuples as lists) suitable for JSON/TOML."""
    out = {}
    for f in dataclasses.fields(settings):
        v = getattr(settings, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> dict[str, Any]:
    """`"stage2.lr=1e-4"` → `{"stage2": {"lr": 1e-4}}`; the value is read as TOML (bare words as strings)."""
    if "=" not in text:
        raise ConfigError(f"Override '{text}' is not of the form key=value (e.g. --set stage2.lr=1e-4).")
    key, raw = text.split("=", 1)
    key, raw = key.strip(), raw.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"Override '{text}' has an empty key; write it like --set stage2.lr=1e-4.")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as `uniform` is a string
    nested: dict[str, Any] = {}
    node = nested
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist.")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Config file {path} is not valid TOML ({exc}); fix the syntax at that line.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"Config file {path} is not a UTF-8 text file.") from None


#: the source of a value no layer set: the settings class's own default
DEFAULT_SOURCE = "dd2 default"


def _leaf_keys(data: Mapping[str, Any], known: set[str], prefix: str = "") -> Iterator[str]:
    """The dotted keys of `known` leaves that `data` sets; a table given for a leaf (a `dict` value) counts as it."""
    for key, value in data.items():
        path = prefix + key
        if isinstance(value, Mapping) and path not in known:
            yield from _leaf_keys(value, known, path + ".")
        else:
            yield path


def resolve_layers(cls: type[T], layers: Iterable[tuple[str, Mapping[str, Any]]]) -> tuple[T, dict[str, str]]:
    """Apply `(source, data)` layers in order (later wins) over the class defaults.

    Returns the settings and `{dotted key: source}` for every leaf: the last layer that set it, else
    `DEFAULT_SOURCE`. A layer that sets a key to the value it already had is still its source: that is
    where someone wrote it down.
    """
    sources = {key: DEFAULT_SOURCE for key, *_ in describe(cls)}
    known = set(sources)
    data: dict[str, Any] = {}
    for source, layer in layers:
        data = deep_merge(data, layer)
        for key in _leaf_keys(layer, known):
            if key in known:  # (an unknown key is left to `from_dict`, which refuses it and lists the valid ones)
                sources[key] = source
    return from_dict(cls, data), sources


def config_layers(config: str | Path | None = None, overrides: Iterable[str] = ()) -> list[tuple[str, dict]]:
    """The layers a TOML file and `--set` overrides add, named after where they come from."""
    layers: list[tuple[str, dict]] = []
    if config is not None:
        layers.append((Path(config).name, read_toml(config)))
    layers += [("--set", parse_override(text)) for text in overrides]
    return layers


def load_settings(cls: type[T], config: str | Path | None = None, overrides: Iterable[str] = (),
                  base: Mapping[str, Any] | None = None) -> T:
    """Defaults < `base` < TOML `config` < `overrides` (`["a.b=v", ...]`)."""
    return resolve_layers(cls, [("base", dict(base or {})), *config_layers(config, overrides)])[0]


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """`[(key, type, default, help), ...]` for every leaf setting (documentation, `--help`)."""
    rows = []
    instance = cls()
    for name, f in _fields(cls).items():
        value = getattr(instance, name)
        if dataclasses.is_dataclass(value):
            rows.extend(describe(type(value), f"{prefix}{name}."))
        else:
            rows.append((prefix + name, _type_name(f.type), value, f.metadata.get("help", "")))
    return rows
