"""The `codraft` command line. Each subcommand's options are a dataclass; tyro builds the parser.

    codraft run --preset smoke --out runs/smoke --set grpo.lr=3e-4 --set run.steps=4
    codraft config --preset default            # print the resolved config
    python -m codraft.cli policies             # the same as `codraft policies`

Subcommands: the core ones (`codraft.commands`), plus those other installed packages declare in
the entry-point group `codraft.commands` (the analysis package's `sweep`, `report`, `project`,
`compare-rewards`). A name defined twice is an error.
"""
from __future__ import annotations

import functools
import importlib.metadata
import logging
import operator
import os
import sys
import traceback
from typing import Annotated

import tyro

from codraft.cliargs import Command, command_table
from codraft.config import ConfigError
from codraft.registry import UnknownNameError

ENTRY_POINT_GROUP = "codraft.commands"
# errors that say what to do in one line; anything else is a bug and shows its traceback
EXPECTED = (ConfigError, UnknownNameError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, ValueError)


def plugin_commands() -> list[Command]:
    """Commands other packages declare (entry points of group `codraft.commands`: a Command or a list of them)."""
    found: list[Command] = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = ep.load()
        except ImportError as err:  # an optional package that cannot be imported here
            logging.getLogger(__name__).warning("codraft: command %r unavailable (%s)", ep.name, err)
            continue
        found += list(loaded) if isinstance(loaded, (list, tuple)) and not isinstance(loaded, Command) else [loaded]
    return found


def commands() -> dict[str, Command]:
    from codraft.commands import CORE_COMMANDS

    return command_table([*CORE_COMMANDS, *plugin_commands()])


def setup_logging() -> None:
    """codraft's own messages (`logging.getLogger("codraft...")`) on stderr, one plain line each."""
    logger = logging.getLogger("codraft")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("CODRAFT_LOG_LEVEL", "INFO"))
        logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    from_shell = argv is None  # the `codraft` command itself, not a call from Python
    if from_shell:
        from codraft.openmp import reexec_with_intel_openmp

        reexec_with_intel_openmp()
    setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    table = commands()
    subcommands = [Annotated[c.args_type, tyro.conf.subcommand(c.name, description=(c.args_type.__doc__ or "").strip())] for c in table.values()]
    parsed = tyro.cli(tyro.conf.OmitSubcommandPrefixes[functools.reduce(operator.or_, subcommands)], args=argv, prog="codraft")
    cmd = next(c for c in table.values() if type(parsed) is c.args_type)
    try:
        code = cmd.fn(parsed)
    except Exception as err:
        expected = isinstance(err, EXPECTED) or getattr(err, "user_facing", False)
        if expected and not os.environ.get("CODRAFT_DEBUG"):
            print(f"codraft {cmd.name}: error: {err}", file=sys.stderr)
            code = 2
        elif from_shell and left_torchrun_group():
            traceback.print_exc()  # what Python would print, before the exit below
            code = 1
        else:
            raise
    if from_shell and left_torchrun_group():
        from codraft.process_exit import exit_skipping_finalization

        exit_skipping_finalization(code)
    return code


def left_torchrun_group() -> bool:
    """Whether this process joined a torchrun process group and has left it: it then exits without
    interpreter finalization (codraft.process_exit says why). Read from
    sys.modules, so that commands that never train import no torch."""
    distributed = sys.modules.get("codraft.distributed")
    return distributed is not None and distributed.left_group()


if __name__ == "__main__":
    sys.exit(main())
