"""Configs in and out: dictionaries and TOML files to typed `Config`, `--set` overrides, presets.

A run's configuration is built from a named preset (`codraft/presets/<name>.toml`), then an
optional TOML file, then `--set section.key=value` overrides, in that order. Every key is checked
against the dataclasses of `codraft.config`: an unknown key or a value of the wrong type raises
`ConfigError` naming the key and the closest valid ones.
"""
from __future__ import annotations

import dataclasses
import difflib
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import TypeAdapter, ValidationError

from codraft.config import ADDED_FIELDS, Config, ConfigError, validate

PRESET_DIR = Path(__file__).parent / "presets"


RENAMED = {"enforce_eager": 'engine_mode ("eager", "compiled" or "auto"; enforce_eager = true was "eager")'}
"""Keys of earlier versions -> what replaced them (named in the unknown-key error)."""


def _closest(name: str, options: list[str]) -> str:
    if name in RENAMED:
        return f"; it was replaced by {RENAMED[name]}"
    near = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
    return f"; did you mean {', '.join(repr(n) for n in near)}?" if near else f"; valid keys: {', '.join(options)}"


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def check_value(key: str, tp: Any, value: Any) -> Any:
    """Validate `value` against the annotation `tp`; ints are accepted where floats are expected."""
    try:
        return TypeAdapter(tp).validate_python(value, strict=True)
    except ValidationError:
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if typing.get_origin(tp) is tuple and isinstance(value, list):
            return check_value(key, tp, tuple(value))
        raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})") from None


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from nested `data`, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = prefix + key
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'{_closest(key, names)}")
        tp = hints[key]
        kwargs[key] = from_dict(tp, value, full + ".") if _is_dataclass_type(tp) else check_value(full, tp, value)
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a TOML-ready nested dict (tuples become lists)."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def _parse_value(text: str) -> Any:
    """A `--set` value: a TOML literal if it parses as one (numbers, booleans, arrays, quoted strings), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_override(data: dict[str, Any], override: str) -> dict[str, Any]:
    """Apply one `section.key=value` override to a nested dict, checking the key path exists."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form section.key=value")
    path, text = override.split("=", 1)
    parts = path.strip().split(".")
    cls: Any = Config
    for i, part in enumerate(parts):
        if not _is_dataclass_type(cls):
            if typing.get_origin(cls) is dict:  # free-form table (a plug-in's own config), checked later
                break
            raise ConfigError(f"config key '{'.'.join(parts[:i])}' is a value, not a section")
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            raise ConfigError(f"unknown config key '{'.'.join(parts[: i + 1])}'{_closest(part, names)}")
        cls = typing.get_type_hints(cls)[part]
    if _is_dataclass_type(cls):
        raise ConfigError(f"config key '{path}' is a section; set one of its keys, e.g. '{path}.{dataclasses.fields(cls)[0].name}=...'")
    nested: dict[str, Any] = _parse_value(text.strip())
    for part in reversed(parts):
        nested = {part: nested}
    return _merge(data, nested)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def read_preset(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset's settings. A preset may start from another one: a top-level `inherit = "<preset>"`
    key layers its tables over that preset's."""
    if name not in preset_names():
        raise ConfigError(f"unknown preset {name!r}{_closest(name, preset_names())}")
    if name in seen:
        raise ConfigError(f"presets inherit from each other in a cycle: {' -> '.join(seen + (name,))}")
    data = read_toml(PRESET_DIR / f"{name}.toml")
    parent = data.pop("inherit", None)
    return _merge(read_preset(parent, seen + (name,)), data) if parent else data


def read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None


def load_config(preset: str | None = "default", path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Preset, then file, then `section.key=value` overrides; validated against `Config`."""
    data: dict[str, Any] = read_preset(preset) if preset else {}
    if path:
        data = _merge(data, read_toml(Path(path)))
    for override in overrides:
        data = apply_override(data, override)
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


def write_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as TOML (atomically)."""
    from codraft.io import atomic_write_text

    atomic_write_text(path, tomli_w.dumps(to_dict(cfg)))


def config_from_toml(path: Path, overrides: list[str] = ()) -> Config:
    """Read a resolved config written by `write_config` (no preset underneath), then `overrides`. A
    field the file predates (`ADDED_FIELDS`) takes the value the run ran with, not today's default."""
    written = read_toml(Path(path))
    absent = [f"{key}={value}" for key, value in ADDED_FIELDS.items() if key.split(".", 1)[1] not in written.get(key.split(".", 1)[0], {})]
    return load_config(preset=None, path=path, overrides=[*absent, *overrides])


def section_fields(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, docstring) per field of a config dataclass, for help output."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):  # a subclass's docstring wins
        docs.update(_field_docs(klass))
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out.append((f.name, _type_name(hints[f.name]), default, docs.get(f.name, "")))
    return out


def _field_docs(cls: type) -> dict[str, str]:
    """The string literal under each annotated field in `cls`'s own source."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = str(nxt.value.value)  # type: ignore[union-attr]
    except (OSError, TypeError, SyntaxError):
        pass
    return docs
