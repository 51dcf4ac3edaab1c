"""The command line: subcommands found through entry points, refused when defined twice, the same
table from `python -m codraft.cli` and `codraft`, a failed step that leaves its traceback, and the
exit of a torchrun rank that has left its group."""
import dataclasses
import subprocess
import sys

import pytest

from codraft.cli import commands, main
from codraft.cliargs import Command, command_table
from conftest import child_env


def test_core_and_analysis_commands_are_found():
    names = set(commands())
    assert {"run", "config", "check-lossless", "policies", "drafters", "tasks"} <= names
    assert {"sweep", "report", "project", "compare-rewards"} <= names  # entry points of group codraft.commands


def test_a_command_defined_twice_is_refused():
    @dataclasses.dataclass
    class A:
        """a"""

    def one(args):
        return 0

    with pytest.raises(ValueError, match="'run' is defined twice"):
        command_table([Command("run", A, one), Command("run", A, one)])


def test_plugin_command_clashing_with_a_core_one_is_refused(monkeypatch):
    import codraft.cli as cli

    monkeypatch.setattr(cli, "plugin_commands", lambda: [Command("policies", object, print)])
    with pytest.raises(ValueError, match="'policies' is defined twice"):
        cli.commands()


def test_module_cli_and_console_script_print_the_same_policies():
    module = subprocess.run([sys.executable, "-m", "codraft.cli", "policies"], capture_output=True, text=True, timeout=300)
    script = subprocess.run([sys.executable, "-m", "codraft", "policies"], capture_output=True, text=True, timeout=300)
    assert module.returncode == 0 and script.returncode == 0, module.stderr + script.stderr
    assert module.stdout == script.stdout and "every_n:" in module.stdout


def test_failed_step_writes_its_traceback_to_error_log(tiny_overrides, tiny_policy_dir, tmp_path, monkeypatch, capsys):
    """The one-line message names DIR/error.log, which holds the full traceback."""
    from codraft.reference_engine import ReferenceEngine

    def broken_generate(self, *args, **kwargs):
        raise RuntimeError("engine died")

    monkeypatch.setattr(ReferenceEngine, "generate", broken_generate)
    out = tmp_path / "run"
    overrides = [a for o in tiny_overrides + ["rollout.backend=reference", "run.eval_every=0"] for a in ("--set", o)]
    code = main(["run", "--preset", "smoke", *overrides, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"traceback in {out / 'error.log'}" in err and "engine died" in err and "--resume" in err
    log = (out / "error.log").read_text()
    assert "Traceback (most recent call last)" in log and "broken_generate" in log and "RuntimeError: engine died" in log


@pytest.mark.parametrize(("body", "code", "on_stderr"), [
    ("print('ran'); return 0", 0, None),
    ("raise ConfigError('bad key')", 2, "codraft policies: error: bad key"),
    ("raise RuntimeError('boom')", 1, "RuntimeError: boom"),
])
def test_a_torchrun_rank_that_left_its_group_exits_without_finalization(body, code, on_stderr):
    """The `codraft` command in a rank that has left torchrun's group ends through
    exit_skipping_finalization whatever the command did: its code (2 for an expected error, 1 with
    the traceback for any other), its exit handlers run, and no wait for a non-daemon thread."""
    script = (
        "import atexit, sys, threading, time\n"
        "import codraft.cli as cli, codraft.distributed as distributed\n"
        "from codraft.config import ConfigError\n"
        "table = cli.commands()\n"
        f"def fn(args):\n    {body}\n"
        "cli.commands = lambda: {**table, 'policies': table['policies']._replace(fn=fn)}\n"
        "distributed._group = 'left'  # as after shutdown() in a rank that init_from_env joined\n"
        "atexit.register(lambda: print('exit handler ran'))\n"
        "threading.Thread(target=time.sleep, args=(600,)).start()\n"
        "sys.argv = ['codraft', 'policies']\n"
        "sys.exit(cli.main())\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=child_env(CODRAFT_INTEL_OPENMP="0"))
    assert proc.returncode == code, proc.stderr
    assert proc.stdout.splitlines()[-1] == "exit handler ran"
    if on_stderr:
        assert on_stderr in proc.stderr
