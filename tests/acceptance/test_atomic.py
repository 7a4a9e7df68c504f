"""Atomic output: an export is written to OUT/.<fmt>.qexport-tmp-<pid> and renamed into place only when complete.

Killed (SIGKILL) at any point, OUT/<fmt> is either absent or a complete export whose manifest sha256s match its
files; the next run removes the stale temporary folders. A full disk gives exit 2 and no partial output.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.bad_inputs import manifest_problems
from qexport.io import safetensors_file as safetensors_io
from qexport.cli.main import main
from qexport.io.publish import TMP_MARK

FORMATS = ["fp16", "int4"]
SHARD = "600KB"  # the tiny llama model (about 4 MB) gives several output shards per format

# One process imports qexport and transformers once, then forks a child per kill point. The child wraps one
# function so that its n-th call SIGKILLs the child, before or after the call (a deterministic stand-in for a
# power cut or an OOM kill at that point), and runs `qexport export`. The parent has run no torch computation
# before forking, so the children start with no thread pools to inherit.
DRIVER = r"""
import json, os, signal, sys
import qexport.model.architecture, qexport.cli.main, qexport.export.pipeline, qexport.io.safetensors_file
from qexport.io.checkpoint import load_config
from pathlib import Path
runs = json.loads(sys.argv[1])
qexport.model.architecture.inspect_architecture(load_config(Path(runs[0]["argv"][1])))  # import the model code once

def kill_on_call(target, attr, when, nth):
    original, calls = getattr(target, attr), [0]
    def hook(*args, **kwargs):
        calls[0] += 1
        if when == "before" and calls[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if when == "after" and calls[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    setattr(target, attr, hook)

results = {}
for run in runs:
    pid = os.fork()
    if pid == 0:
        target = {"export": qexport.export.pipeline, "StreamWriter": qexport.io.safetensors_file.StreamWriter, "os": os}
        kill_on_call(target[run["owner"]], run["attr"], run["when"], run["nth"])
        os._exit(qexport.cli.main.main(run["argv"]))
    _, status = os.waitpid(pid, 0)
    results[run["name"]] = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
print(json.dumps(results))
"""

# name -> (wrapped function, before/after, which call, whether OUT already holds an export (--overwrite))
KILL_POINTS = {
    "mid_shard": ("StreamWriter", "add", "after", 3, False),
    "after_first_shard": ("StreamWriter", "close", "after", 1, False),
    "after_first_format_written": ("export", "write_format", "after", 1, False),
    "before_first_rename": ("export", "replace_dir", "before", 1, False),
    "between_renames": ("export", "replace_dir", "after", 1, False),
    # replacing an existing export: old folder moved aside, new one not yet in place
    "overwrite_between_moves": ("os", "replace", "after", 1, True),
}


def export_argv(src: Path, out: Path, *extra: str) -> list[str]:
    return ["export", str(src), "--out", str(out), "--formats", *FORMATS, "--max-shard-size", SHARD, "--quiet",
            *extra]


@pytest.fixture(scope="module")
def killed_exports(llama_sharded_src, tmp_path_factory):
    """Every kill point: name -> (OUT, return code, names in OUT right after the kill)."""
    root = tmp_path_factory.mktemp("killed")
    runs = []
    for name, (owner, attr, when, nth, existing) in KILL_POINTS.items():
        out = root / name
        if existing:
            assert main(export_argv(llama_sharded_src, out)) == 0
        argv = export_argv(llama_sharded_src, out, *(["--overwrite"] if existing else []))
        runs.append(dict(name=name, owner=owner, attr=attr, when=when, nth=nth, argv=argv))
    driver = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(runs)], capture_output=True, text=True,
                            timeout=300)
    assert driver.returncode == 0, driver.stderr
    codes = json.loads(driver.stdout.strip().splitlines()[-1])
    return {name: (root / name, codes[name], sorted(p.name for p in (root / name).iterdir())
                   if (root / name).exists() else [])
            for name in KILL_POINTS}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_killed_export_leaves_only_complete_exports(point, killed_exports):
    out, rc, _ = killed_exports[point]
    assert rc == -9, f"the export was not killed at {point}: exit code {rc}"
    visible = [p for p in out.iterdir() if not p.name.startswith(".")] if out.exists() else []
    for folder in visible:
        assert folder.name in FORMATS and manifest_problems(folder) == []
    hidden = [p.name for p in out.iterdir() if p.name.startswith(".")] if out.exists() else []
    assert all(TMP_MARK in name for name in hidden), hidden


def test_kills_really_happen_mid_write(killed_exports):
    """Guards the test above against vacuity: most kill points leave a temporary folder behind."""
    leftovers = [name for name, (_, _, names) in killed_exports.items() if any(TMP_MARK in n for n in names)]
    assert len(leftovers) == len(KILL_POINTS), leftovers


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_next_run_after_a_kill_removes_stale_temporary_folders(point, killed_exports, llama_sharded_src, capsys):
    out, _, _ = killed_exports[point]
    assert main(export_argv(llama_sharded_src, out, "--overwrite")) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted(FORMATS)
    for fmt in FORMATS:
        assert manifest_problems(out / fmt) == []


class _FullDisk:
    """A file whose writes fail with ENOSPC once `room` bytes are written, the way a full disk fails."""

    def __init__(self, file, room: int):
        self._file, self._room = file, room

    def write(self, data):
        size = memoryview(data).nbytes
        if size > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= size
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)


def test_disk_full_while_writing_a_shard_exits_2_naming_the_file(qwen3_src, tmp_path, monkeypatch, capsys):
    init = safetensors_io.StreamWriter.__init__

    def full_disk_init(self, path, layout, metadata):
        init(self, path, layout, metadata)
        self._file = _FullDisk(self._file, room=1_000_000)  # the model is about 4 MB

    monkeypatch.setattr(safetensors_io.StreamWriter, "__init__", full_disk_init)
    out = tmp_path / "out"
    rc = main(["export", str(qwen3_src), "--out", str(out), "--quiet"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, lines
    assert "model.safetensors" in lines[0] and os.strerror(errno.ENOSPC) in lines[0]
    assert not out.exists()


def test_disk_full_on_a_real_small_filesystem_exits_2_and_leaves_it_empty(qwen3_src, tmp_path, capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a 1 MB tmpfs here ({mount.stderr.decode().strip()}); the injected test covers it")
    try:
        rc = main(["export", str(qwen3_src), "--out", str(disk / "out"), "--formats", "fp16", "--quiet"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(lines) == 1, lines
        assert "model.safetensors" in lines[0] and os.strerror(errno.ENOSPC) in lines[0]
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)
