"""Analysis of run outputs (reads only what runs wrote) and projections; registers its `codraft` subcommands:
`project`, `sweep`, `report` and `compare-rewards`."""
from codraft.cli import register_command

from analysis.compare_rewards import CompareArgs, cmd_compare
from analysis.projection import ProjectArgs, project
from analysis.report import ReportArgs, cmd_report
from analysis.sweep import SweepArgs, cmd_sweep

register_command("project", ProjectArgs, project)
register_command("sweep", SweepArgs, cmd_sweep)
register_command("report", ReportArgs, cmd_report)
register_command("compare-rewards", CompareArgs, cmd_compare)
