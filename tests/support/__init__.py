"""Helpers the test modules share: running `qexport verify` in-process, copying an export as another tool would
leave it, writing a model folder by hand, and bounding a call (or, as an autouse fixture imported by a module, every test) that might hang."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file


def verify_cli(capsys, *argv) -> tuple[int, str]:
    """`qexport verify ARGV...` in-process: (exit code, stdout + stderr)."""
    from qexport.cli.main import main

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


def write_folder(folder: Path, tensors: dict[str, torch.Tensor] | None = None, config: dict | None = None,
                 files: dict[str, str | bytes] | None = None) -> Path:
    """A model folder written by hand: config.json (when a config is given), model.safetensors with `tensors`
    (when there are any), and side files."""
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    if tensors:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    for rel, content in (files or {}).items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder
