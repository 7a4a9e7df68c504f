"""Publishing an output folder: check the destination before writing, write into a locked temporary sibling,
rename it into place when complete, and remove the temporaries of runs that died.

A temporary folder is named `.<name>.qexport-tmp-<pid>` (TMP_MARK) next to its target and held under an
exclusive flock by its writer (OwnedFolder): one whose lock is free is stale, whatever PID namespace wrote it.
The input is never written into nor deleted (check_not_input).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from qexport.errors import InputError

TMP_MARK = ".qexport-tmp-"


class OwnedFolder:
    """A temporary folder held under an exclusive flock for as long as its writer lives.

    The kernel drops the lock when the writer exits, however it exits (SIGKILL included), and every process on the
    machine sees it whatever its PID namespace: a temporary folder whose lock can be taken is stale, one whose lock
    is held belongs to a live run. (A pid check cannot tell a dead writer from one in another container.)"""

    def __init__(self, path: Path):
        import fcntl

        path.mkdir(parents=True)
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def is_stale(folder: Path) -> bool:
    import fcntl

    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # held: a live run is writing it
    finally:
        os.close(fd)
    return True


def remove_stale(candidates: Iterable[Path]) -> None:
    """Remove temporary folders whose writer is gone (their lock is free; see OwnedFolder)."""
    for tmp in candidates:
        if tmp.is_dir() and not tmp.is_symlink() and is_stale(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.is_file() and TMP_MARK + "old-" in tmp.name:  # a regular file moved aside by --overwrite
            tmp.unlink(missing_ok=True)


def clean_stale(out: Path) -> None:
    """Remove temporary folders left by an export that was killed."""
    if out.is_dir():
        remove_stale(out.glob(f".*{TMP_MARK}*"))


def _inside(inner: Path, outer: Path) -> bool:
    inner, outer = Path(os.path.realpath(inner)), Path(os.path.realpath(outer))
    return inner == outer or outer in inner.parents


def check_not_input(out: Path, targets: Iterable[Path], inputs: Iterable[Path]) -> None:
    """The input is never modified: refuse an output folder equal to or inside an input (writing into it), and a
    folder to be replaced that is or holds an input (deleting it)."""
    targets = list(targets)
    for folder in inputs:
        if _inside(out, folder):
            raise InputError(f"--out {out}: is inside the input {folder}; qexport never writes into its input")
        for target in targets:
            if _inside(folder, target):
                raise InputError(f"--out {out}: replacing {target} would delete the input {folder}")


def input_folders(source) -> list[Path]:
    """The folders a source reads: its own `input_folders()` (a merge reads several), else its `folder`."""
    if hasattr(source, "input_folders"):
        return list(source.input_folders())
    return [source.folder]


def check_destination(out: Path, formats: Iterable[str], overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    for name in formats:
        if (out / name).exists() and not overwrite:
            raise InputError(f"--out {out / name}: already exists (pass --overwrite to replace it)")
    parent = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise InputError(f"--out {out}: {parent} is not a folder")
    # Probe by creating a folder: os.access answers "writable" to root even on a read-only mount or an
    # immutable (chattr +i) folder.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".qexport-probe-{os.getpid()}-", dir=parent))
    except OSError as e:
        raise InputError(f"--out {out}: cannot create folders in {parent} ({e.strerror or e})")


def replace_dir(tmp: Path, target: Path, overwrite: bool = True) -> None:
    """Rename the finished folder into place. Without overwrite the rename itself refuses an existing target
    (rename onto a non-empty folder fails), so two runs started together cannot both write OUT/<fmt>."""
    if overwrite and os.path.lexists(target):
        old = target.with_name(f".{target.name}{TMP_MARK}old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
        return
    if os.path.lexists(target) and not target.is_dir():
        raise InputError(f"--out {target}: appeared while this export was running (another run?)")
    try:
        os.rename(tmp, target)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise InputError(f"--out {target}: appeared while this export was running (another run wrote it); "
                             f"pass --overwrite to replace it")
        raise
