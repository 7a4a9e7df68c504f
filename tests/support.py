"""Helpers the test modules share: running `qexport verify` in-process, copying an export as another tool would
leave it, and bounding a call (or, as an autouse fixture imported by a module, every test) that might hang."""

from __future__ import annotations

import contextlib
import shutil
import signal
from pathlib import Path

import pytest


def verify_cli(capsys, *argv) -> tuple[int, str]:
    """`qexport verify ARGV...` in-process: (exit code, stdout + stderr)."""
    from qexport.cli import main

    code = main(["verify", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def copy_without_manifest(tmp_path: Path, good: Path) -> Path:
    """A copy of an export folder without qexport.json: only the files say what was stored (as another tool's)."""
    folder = tmp_path / good.name
    shutil.copytree(good, folder)
    (folder / "qexport.json").unlink()
    return folder


@contextlib.contextmanager
def deadline(seconds: int, what: str = ""):
    """Raise TimeoutError in the block after `seconds` (SIGALRM; main thread only): a hang becomes a failure."""
    def hang(*_):
        raise TimeoutError(f"no answer within {seconds} s{what}")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(autouse=True)
def fail_a_hang():
    """For modules whose tests take well under a second each (import it: it is autouse); one that waits on a future nobody completes (a broken Deferred or
    ordered_map) fails after 120 s instead of hanging: mutmut's own limit counts CPU time, which a wait never uses."""
    import faulthandler

    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()
