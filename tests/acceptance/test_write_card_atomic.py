"""`verify --write-card` rewrites README.md and qexport.json as one transaction (issue 26, class 7).

Law: whatever stops a --write-card run (SIGKILL before or after either rename, a full disk) and however many run at
once, the next verify of the export sees a card and a manifest that agree (both old or both new), no temporary file
is left behind, and the `manifest` check passes. Kill points come from a child process whose os.replace is hooked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures.bad_inputs import manifest_problems
from tests.acceptance.test_hostile_inputs import ROOT, SECONDS

# The runs below verify only the `manifest` check (the card records what ran): the transaction is the same as after
# a full verify, and each run takes seconds instead of a minute. argv ends with: EXPORT REFERENCE write|read.
RUN = r"""
from qexport.verify import record_in_card, verify
export, reference, mode = sys.argv[-3:]
result = verify(export, reference, only=["manifest"])
if mode == "write":
    record_in_card(result)
sys.exit(0 if result.passed else 1)
"""
# argv: TARGET WHEN ...: SIGKILL this process just before or after os.replace puts TARGET (a file name) in
# place; WHEN "pause" instead waits (after the rename) until the file GO exists, touching PAUSED first.
KILL_DRIVER = r"""
import os, signal, sys, time
target, when = sys.argv[1], sys.argv[2]
real = os.replace
def hooked(src, dst, *a, **k):
    hit = os.path.basename(os.fspath(dst)) == target
    if hit and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    result = real(src, dst, *a, **k)
    if hit and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    if hit and when.startswith("pause:"):
        folder = when[len("pause:"):]
        open(os.path.join(folder, "PAUSED"), "w").close()
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(folder, "GO")) and time.monotonic() < deadline:
            time.sleep(0.05)
    return result
os.replace = hooked
""" + RUN
# argv: MARKER ...: touch MARKER just before this process asks for an exclusive flock (it may then wait).
LOCK_DRIVER = r"""
import fcntl, sys
marker, real = sys.argv[1], fcntl.flock
def flock(fd, op):
    if op & fcntl.LOCK_EX:
        open(marker, "w").close()
    return real(fd, op)
fcntl.flock = flock
""" + RUN
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture
def export(int4_copy):
    return int4_copy


def driver(script: str, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT, env=ENV, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen)


def write_card_args(export: Path, mini: Path) -> list[str]:
    return [str(export), str(mini), "write"]


def verify_passes(export: Path, mini: Path) -> subprocess.CompletedProcess:
    """The next run: a verify (manifest check) in a fresh process."""
    return subprocess.run([sys.executable, "-c", "import sys" + RUN, str(export), str(mini), "read"],
                          capture_output=True, text=True, timeout=SECONDS, cwd=ROOT, env=ENV)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def card_and_manifest(folder: Path) -> tuple[bytes, bytes]:
    return (folder / "README.md").read_bytes(), (folder / "qexport.json").read_bytes()


@pytest.mark.parametrize("target", ["README.md", "qexport.json"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_write_card_killed_at_a_rename_leaves_an_export_the_next_verify_passes(target, when, export, mini):
    old = card_and_manifest(export)
    run = driver(KILL_DRIVER, target, when, *write_card_args(export, mini))
    _, err = run.communicate(timeout=SECONDS)
    assert run.returncode == -signal.SIGKILL, err
    result = verify_passes(export, mini)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert manifest_problems(export) == []  # card and manifest agree, nothing unlisted on disk
    assert leftovers(export) == []
    new = card_and_manifest(export)
    assert new == old or (new[0] != old[0] and new[1] != old[1])  # both old or both new


def test_write_card_killed_after_its_commit_is_finished_by_the_next_run(export, mini):
    """Killed once the journal is in place (before any file is): the next verify puts the new pair in place."""
    old = card_and_manifest(export)
    run = driver(KILL_DRIVER, ".qexport-transaction.json", "after", *write_card_args(export, mini))
    _, err = run.communicate(timeout=SECONDS)
    assert run.returncode == -signal.SIGKILL, err
    assert card_and_manifest(export) == old
    result = verify_passes(export, mini)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    new = card_and_manifest(export)
    assert new[0] != old[0] and b"**PASSED**" in new[0] and json.loads(new[1])["verification"]
    assert manifest_problems(export) == [] and leftovers(export) == []


def test_write_card_on_a_full_disk_leaves_the_old_card_and_manifest(export, mini):
    """ENOSPC while the second file is written: exit 2 naming the file, nothing changed, no temporary file."""
    script = r"""
import errno, sys, qexport.io.folder_transaction as t, qexport.cli.main
real, calls = t._write_synced, [0]
def full(path, data):
    calls[0] += 1
    if calls[0] == 2:
        raise OSError(errno.ENOSPC, "No space left on device")
    real(path, data)
t._write_synced = full
sys.exit(qexport.cli.main.main(sys.argv[1:]))
"""
    old = card_and_manifest(export)
    run = driver(script, "verify", str(export), "--reference", str(mini), "--write-card", "--quiet")
    _, err = run.communicate(timeout=SECONDS)
    assert run.returncode == 2 and "Traceback" not in err and "No space left" in err, err
    assert card_and_manifest(export) == old
    assert leftovers(export) == [] and manifest_problems(export) == []


def test_a_verify_during_another_runs_write_card_sees_the_pair_old_or_new(export, mini, tmp_path):
    """A pauses between its two renames; B (a plain verify) starts then: it waits for A's lock and passes."""
    sync = tmp_path / "sync"
    sync.mkdir()
    a = driver(KILL_DRIVER, "README.md", f"pause:{sync}", *write_card_args(export, mini))
    try:
        _wait_for(lambda: (sync / "PAUSED").exists() or a.poll() is not None)
        assert a.poll() is None, a.stderr.read()
        b = driver(LOCK_DRIVER, str(sync / "B-LOCKING"), str(export), str(mini), "read")
        _wait_for(lambda: (sync / "B-LOCKING").exists() or b.poll() is not None)
        time.sleep(0.5)  # B is now waiting on the lock (or, without one, reading the half-written pair)
        (sync / "GO").touch()
        _, err_b = b.communicate(timeout=SECONDS)
        _, err_a = a.communicate(timeout=SECONDS)
    finally:
        (sync / "GO").touch()
        a.kill()
    assert a.returncode == 0, err_a
    assert b.returncode == 0, err_b
    assert manifest_problems(export) == [] and leftovers(export) == []


def test_two_write_card_runs_at_once_both_pass_and_leave_one_consistent_pair(export, mini):
    runs = [driver(LOCK_DRIVER, os.devnull, *write_card_args(export, mini)) for _ in range(2)]
    results = [(run.wait(timeout=SECONDS), run.stderr.read()) for run in runs]
    assert [rc for rc, _ in results] == [0, 0], results
    assert manifest_problems(export) == [] and leftovers(export) == []
    result = verify_passes(export, mini)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


def test_a_journal_naming_a_path_outside_the_folder_is_dropped_not_followed(export, mini, tmp_path):
    """A downloaded folder may carry a journal of its own: names with '/' or '..' are never renamed onto."""
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    (export / ".victim.qexport-new").write_text("evil\n")
    import hashlib

    (export / ".qexport-transaction.json").write_text(json.dumps(
        [{"name": "../victim", "sha256": hashlib.sha256(b"evil\n").hexdigest()}]))
    result = verify_passes(export, mini)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert victim.read_text() == "untouched\n"
    assert leftovers(export) == []


def _wait_for(condition, seconds: float = SECONDS) -> None:
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("no progress within the hang guard")
        time.sleep(0.05)
