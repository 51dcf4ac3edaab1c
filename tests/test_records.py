"""The run records that papers/ quotes travel with the repository: a fresh clone holds every record
folder a README's commands name (config, metrics and hardware of each run), and .gitignore leaves
papers/ alone (until 2026-12-02 its `runs/` pattern hid every `papers/**/runs/` folder from git, so
the records the README pointed at existed only on the machine that made them)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECORD = re.compile(r"papers/[\w.-]+/[\w.-]+/runs/[\w.-]+")
PAPER_READMES = sorted((ROOT / "papers").rglob("README.md"))
READMES = [ROOT / "README.md", *PAPER_READMES]

pytestmark = pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                                reason="needs a git checkout of the repository (CI clones one)")


def git(*args: str) -> subprocess.CompletedProcess:
    """Run git on the repository (the user's global excludes left out); a git failure fails the test as itself."""
    done = subprocess.run(["git", "-C", str(ROOT), "-c", "core.excludesFile=/dev/null", *args], capture_output=True, text=True)
    assert done.returncode in (0, 1), f"git {' '.join(args)} failed: {done.stderr.strip()}"
    return done


def named_records() -> set[str]:
    """Record folders a README names: full `papers/.../runs/<sweep>` paths anywhere, and a papers
    README's `runs/<sweep>` where its own folder holds a runs/ folder."""
    found = {m.rstrip(".") for readme in READMES for m in RECORD.findall(readme.read_text())}
    for readme in PAPER_READMES:
        if (readme.parent / "runs").is_dir():
            here = readme.parent.relative_to(ROOT).as_posix()
            found |= {f"{here}/runs/{name}" for name in re.findall(r"`runs/([\w.-]+)`", readme.read_text())}
    return found


def test_run_records_under_papers_are_not_ignored():
    """`git check-ignore` exits 1 for a path it would keep."""
    for path in ("papers/2604.26779/goal_60step/runs/some-sweep/some-run/metrics.jsonl", "papers/x/runs/y/config.toml"):
        assert git("check-ignore", "-q", path).returncode == 1, f".gitignore hides {path}"
    assert git("check-ignore", "-q", "runs/some-sweep/metrics.jsonl").returncode == 0, "the top-level runs/ (scratch) should stay ignored"


def test_every_record_folder_a_readme_names_is_committed():
    records = named_records()
    assert len(records) >= 15, records  # the 60-step goal's and the smoke budget screen's sweeps at least
    for record in sorted(records):
        tracked = git("ls-files", record).stdout.split()
        runs = {Path(p).parent for p in tracked if p.endswith("/metrics.jsonl")}
        assert runs, f"{record} (named in a README) holds no committed run"
        for run in runs:
            for name in ("config.toml", "hardware.json"):
                assert str(run / name) in tracked, f"{run}/{name} is not committed"
