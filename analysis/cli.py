"""The command line shared by analysis modules that read run or sweep directories
(`python -m analysis.policy_goal runs/a runs/b`, `python -m analysis.swap_gate ...`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable


def paths_cli(doc: str, main: Callable[[list[Path]], str]) -> None:
    """The command line of an analysis module that reads run or sweep directories: prints
    `main(paths)`; a bad path or unusable runs exit with the error's message."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run or sweep directories")
    try:
        print(main(parser.parse_args().paths))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
