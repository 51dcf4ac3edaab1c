"""What a `codraft` subcommand is: a name, an options dataclass (tyro builds the parser from it) and
a function. Core commands live in `codraft.commands`; other packages add theirs through the
entry-point group `codraft.commands` (see `codraft.cli`), so the core imports none of them.

    COMMAND = Command("sweep", SweepArgs, cmd_sweep)      # in the plug-in package
    # pyproject.toml: [project.entry-points."codraft.commands"] sweep = "analysis.sweep:COMMAND"
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, NamedTuple

import tyro

Overrides = Annotated[list[str], tyro.conf.UseAppendAction, tyro.conf.arg(metavar="SECTION.KEY=VALUE")]


class Command(NamedTuple):
    name: str
    args_type: type
    """A dataclass; its docstring is the command's help, its fields the options."""
    fn: Callable[[Any], int]
    """Runs the command; returns the exit status."""


def command_table(commands: Iterable[Command]) -> dict[str, Command]:
    """Commands by name; a name given twice is an error naming both sources."""
    table: dict[str, Command] = {}
    for cmd in commands:
        if cmd.name in table:
            first = table[cmd.name]
            raise ValueError(f"codraft command {cmd.name!r} is defined twice: by {first.fn.__module__} and by {cmd.fn.__module__}")
        table[cmd.name] = cmd
    return table


@dataclass
class ConfigArgs:
    preset: str = "default"
    """Named preset underneath everything (see `codraft/presets/`)."""
    config: Path | None = None
    """TOML file layered over the preset."""
    set: Overrides = field(default_factory=list)
    """Override one key, e.g. `--set grpo.lr=3e-4` (repeatable)."""

    def load(self):
        from codraft.configfile import load_config

        return load_config(self.preset, self.config, self.set)
