"""Helpers the test modules share: running `qexport verify` in-process, copying an export as another tool would
leave it, and bounding a call that might hang."""

from __future__ import annotations

import contextlib
import shutil
import signal
from pathlib import Path


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
