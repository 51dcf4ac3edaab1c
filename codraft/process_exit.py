"""Ending a process without interpreter finalization, for a torchrun rank that has left its group.

    from codraft.process_exit import exit_skipping_finalization
    exit_skipping_finalization(code)    # atexit handlers, a flush of stdout/stderr, then os._exit

`codraft.cli` calls it when a `codraft` command ran in a rank that joined and left torchrun's
process group (codraft.distributed.left_group); the two-rank tests' spawned ranks call it too.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import sys
from typing import NoReturn


def exit_skipping_finalization(code: int) -> NoReturn:
    """End the process with `code` after its atexit handlers (logging's flush, vLLM's and
    multiprocessing's clean-ups) and a flush of stdout and stderr, without interpreter finalization
    (os._exit). For a process that left a process group: FSDP2 keeps a reference to the group, so
    gloo's worker threads can outlive destroy_process_group; before Python 3.14 such a thread that
    takes the GIL once finalization has begun is ended with pthread_exit, and unwinding through a
    noexcept C++ frame aborts the process (SIGABRT; pytorch/pytorch issues 38228, 190489). Seen
    once in a spawned two-rank FSDP2 test rank (CI, 2026-12-02).

    Py_FinalizeEx (3.11) joins the non-daemon threads (skipped here: one may wait forever), runs
    the atexit handlers, and only then marks the interpreter finalizing, so the handlers run here
    as in a normal exit. Also skipped: the flush of C stdio buffers and of Python files left open;
    codraft writes its outputs whole and closes them."""
    try:
        atexit._run_exitfuncs()  # a handler that raises is reported, and the others still run
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a closed pipe, or no stream
                stream.flush()
    finally:
        os._exit(code)
