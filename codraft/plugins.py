"""What drafter kinds, refresh policies and tasks have in common: each is one module holding a class
registered by name in a `Registry`, with a frozen `Config` dataclass of its own settings, set in
the run config as a free table (`drafter.args`, `controller.args`, `task.args`) and validated here
against that dataclass, with errors naming the full key.

    cls, settings = plugin_settings(DRAFTERS, "eagle3", {"draft_vocab_size": 64}, "drafter.args.")
    print(describe_plugins(DRAFTERS, "codraft run --set drafter.kind=<name> --set drafter.args.<field>=<value>"))
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any

from codraft.config import ConfigError
from codraft.configfile import from_dict, section_fields
from codraft.registry import Registry


def plugin_settings(registry: Registry, name: str, args: dict[str, Any] | None, prefix: str) -> tuple[type, Any]:
    """The registered class `name` and its `Config` built from `args` (unknown keys, wrong types and
    failed range checks raise ConfigError naming `<prefix><field>` and the plug-in)."""
    cls = registry.get(name)
    try:
        settings = from_dict(cls.Config, dict(args or {}), prefix=prefix)
        check = getattr(settings, "validate", None)
        if check is not None:
            check(prefix)
    except ConfigError as err:
        raise ConfigError(f"{err} ({registry.kind} {name!r})") from None
    return cls, settings


def field_lines(config_cls: type, prefix: str = "") -> list[str]:
    """One entry per field with type, default and help (nested config sections flattened to `section.field`)."""
    hints = typing.get_type_hints(config_cls)
    lines = []
    for name, type_name, default, doc in section_fields(config_cls):
        if dataclasses.is_dataclass(hints[name]):
            lines += field_lines(hints[name], prefix=f"{prefix}{name}.")
            continue
        lines.append(f"  {prefix}{name}: {type_name} = {default!r}\n      {doc}")
    return lines


def describe_plugins(registry: Registry, usage: str) -> str:
    """Every registered plug-in: name, one-line description, settings with type, default and help."""
    blocks = []
    for name in registry.names():
        cls = registry.get(name)
        fields = field_lines(cls.Config) or ["  (no settings)"]
        blocks.append("\n".join([f"{name}: {getattr(cls, 'description', '')}", *fields]))
    return "\n\n".join(blocks + [f"Use: {usage}"])
