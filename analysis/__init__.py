"""Analysis of run outputs (reads only what runs wrote) and projections; registers its `codraft` subcommands."""
from codraft.cli import register_command

from analysis.projection import ProjectArgs, project

register_command("project", ProjectArgs, project)
