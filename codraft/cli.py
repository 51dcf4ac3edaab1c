"""The `codraft` command line. Each subcommand's options are a dataclass; tyro builds the parser.

    codraft run --preset smoke --out runs/smoke --set grpo.lr=3e-4 --set run.steps=4
    codraft config --preset default            # print the resolved config
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable

import tyro

from codraft.config import ConfigError
from codraft.configfile import load_config, section_fields
from codraft.registry import UnknownNameError

Overrides = Annotated[list[str], tyro.conf.UseAppendAction, tyro.conf.arg(metavar="SECTION.KEY=VALUE")]


@dataclass
class ConfigArgs:
    preset: str = "default"
    """Named preset underneath everything (see `codraft/presets/`)."""
    config: Path | None = None
    """TOML file layered over the preset."""
    set: Overrides = field(default_factory=list)
    """Override one key, e.g. `--set grpo.lr=3e-4` (repeatable)."""

    def load(self):
        return load_config(self.preset, self.config, self.set)


@dataclass
class RunArgs(ConfigArgs):
    """Run synchronous GRPO (with speculative rollouts and drafter co-training when configured)."""

    out: Path | None = None
    """Run directory (default: `output.dir` of the config)."""
    resume: Path | None = None
    """Continue the run in this directory from its last checkpoint (its config.toml; `--set run.steps=N` may extend it)."""


RESUMABLE_OVERRIDES = ("run.steps", "output.progress", "output.tensorboard")


def resume_config(args: RunArgs):
    from codraft.configfile import config_from_toml, load_config

    if not (args.resume / "config.toml").is_file():
        raise FileNotFoundError(f"--resume {args.resume}: no run there (config.toml missing)")
    bad = [o for o in args.set if o.split("=", 1)[0].strip() not in RESUMABLE_OVERRIDES]
    if bad or args.config or args.preset != "default":
        raise ConfigError(f"--resume keeps the run's own config; only {', '.join(RESUMABLE_OVERRIDES)} may be changed (got {bad or '--config/--preset'})")
    config_from_toml(args.resume / "config.toml")  # validates
    return load_config(preset=None, path=args.resume / "config.toml", overrides=args.set)


def cmd_run(args: RunArgs) -> int:
    from rich.console import Console
    from rich.table import Table

    from codraft.distributed import shutdown
    from codraft.runner import Run, summary_rows

    if args.resume:
        cfg, out = resume_config(args), args.resume
    else:
        cfg = args.load()
        out = args.out or Path(cfg.output.dir)
    if str(out) != cfg.output.dir:
        cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, dir=str(out)))
    run = Run(cfg, out, resume=args.resume is not None)
    finished = False
    try:
        records = run.train()
        finished = True
    finally:
        run.close()
        shutdown(drain=finished)  # leave the torchrun process group, if any
    if not run.is_main:
        return 0
    table = Table(title=f"codraft run: {out}")
    table.add_column("")
    table.add_column("value", justify="right")
    rows = summary_rows(records) + [(k, v) for k, v in run.controller.summary().items()]
    for label, value in rows:
        table.add_row(label, str(value))
    Console().print(table)
    return 0


@dataclass
class ShowConfigArgs(ConfigArgs):
    """Print the resolved configuration as TOML, or the documented fields of every section."""

    fields: bool = False
    """List each section's fields with type, default and help instead."""


def cmd_config(args: ShowConfigArgs) -> int:
    import tomli_w

    from codraft.config import Config
    from codraft.configfile import to_dict

    if args.fields:
        for section in dataclasses.fields(Config):
            print(f"[{section.name}]")
            for name, tp, default, doc in section_fields(section.type if isinstance(section.type, type) else type(getattr(Config(), section.name))):
                print(f"  {name}: {tp} = {default!r}\n      {doc}")
        return 0
    print(tomli_w.dumps(to_dict(args.load())))
    return 0


COMMANDS: dict[str, tuple[type, Callable[[Any], int]]] = {
    "run": (RunArgs, cmd_run),
    "config": (ShowConfigArgs, cmd_config),
}


def register_command(name: str, args_type: type, fn: Callable[[Any], int]) -> None:
    COMMANDS[name] = (args_type, fn)


def _load_commands() -> None:
    """Core subcommands, then those the plug-in package `analysis` registers (imported by name)."""
    import importlib

    import codraft.commands  # noqa: F401

    try:
        importlib.import_module("analysis")
    except ImportError as err:  # analysis is optional for running experiments
        print(f"codraft: analysis commands unavailable ({err})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the `codraft` command itself, not a call from Python
        from codraft.openmp import reexec_with_intel_openmp

        reexec_with_intel_openmp()
    _load_commands()
    argv = sys.argv[1:] if argv is None else argv
    subcommands = {name: Annotated[args_type, tyro.conf.subcommand(name, description=(args_type.__doc__ or "").strip())] for name, (args_type, _) in COMMANDS.items()}
    parsed = tyro.cli(tyro.conf.OmitSubcommandPrefixes[_union(list(subcommands.values()))], args=argv, prog="codraft")
    for name, (args_type, fn) in COMMANDS.items():
        if type(parsed) is args_type:
            try:
                return fn(parsed)
            except Exception as err:  # input errors and failures that say what to do: one clear line
                expected = (ConfigError, UnknownNameError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, ValueError)
                if os.environ.get("CODRAFT_DEBUG") or not (isinstance(err, expected) or getattr(err, "user_facing", False)):
                    raise
                print(f"codraft {name}: error: {err}", file=sys.stderr)
                return 2
    return 1


def _union(types: list[Any]) -> Any:
    import functools
    import operator

    return functools.reduce(operator.or_, types)


if __name__ == "__main__":
    sys.exit(main())
