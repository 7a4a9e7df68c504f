"""Small files of one folder replaced together: every reader sees all the new files or all the old ones, whatever
stops the writer (SIGKILL between two renames, a full disk) and however many writers run at once.

- Writers, and readers that need the files to agree, hold an exclusive flock on the folder itself (`settled`):
  no lock file is left behind, and a lock dies with its process.
- `replace` writes each new file to `.NAME.qexport-new` and syncs it, then writes the journal JOURNAL (the names
  and sha256 of the new files) through a temporary file and a rename: that rename is the commit. Then each new
  file is renamed over its name and the journal removed.
- `settled` first finishes a committed transaction that a killed writer left (the journal is there: each new file
  that still has its recorded sha256 is renamed into place) or drops an uncommitted one (no journal: the
  `.qexport-new` files are removed). A folder this process may not write is read as it is.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

from qexport.io import safe_fs

JOURNAL = ".qexport-transaction.json"
NEW = ".qexport-new"  # suffix of a file written but not yet in place (the journal's own temporary file too)
MAX_JOURNAL_BYTES = 2**20


@contextlib.contextmanager
def settled(folder: Path) -> Iterator[None]:
    """Hold FOLDER's lock, with any transaction a killed writer left finished or dropped first."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # a filesystem without locks (some network ones): the folder is read unlocked
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        try:
            recover(Path(folder))
        except OSError:
            pass  # a folder we may not write: read as it is (an interrupted transaction shows as a mismatch)
        yield
    finally:
        os.close(fd)


def _simple_name(name) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\0" not in name
            and not name.startswith("."))


def _committed(folder: Path) -> list[tuple[str, str]] | None:
    """The (name, sha256) pairs of the journal, or None when it is missing or not one qexport wrote."""
    try:
        entries = json.loads(safe_fs.read_bytes(folder / JOURNAL, JOURNAL, MAX_JOURNAL_BYTES))
    except Exception:  # InputError (a link out, a FIFO, too large), ValueError: no transaction to finish
        return None
    if not (isinstance(entries, list) and all(isinstance(e, dict) and _simple_name(e.get("name"))
                                              and isinstance(e.get("sha256"), str) for e in entries)):
        return None
    return [(e["name"], e["sha256"]) for e in entries]


def _sha256(path: Path, root: Path) -> str | None:
    from qexport.io.safetensors_file import sha256_file

    try:
        return sha256_file(path, root=root)
    except Exception:  # missing (already renamed), not a regular file, a link out
        return None


def recover(folder: Path) -> None:
    """Finish or drop the transaction a killed writer left in FOLDER (the caller holds the lock)."""
    if os.path.lexists(folder / JOURNAL):
        for name, sha in _committed(folder) or []:
            new = folder / f".{name}{NEW}"
            if _sha256(new, folder) == sha:
                os.replace(new, folder / name)
        os.unlink(folder / JOURNAL)
    for leftover in folder.glob(f".*{NEW}"):
        if not leftover.is_dir() or leftover.is_symlink():
            leftover.unlink()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # the journal may only name bytes that are on disk


def replace(folder: Path, files: dict[str, bytes]) -> None:
    """Replace FOLDER/NAME by its bytes for every entry, all or none. Call inside `settled(folder)`."""
    folder = Path(folder)
    written = []
    journal_tmp = folder / f"{JOURNAL}{NEW}"
    try:
        for name, data in files.items():
            if not _simple_name(name):
                raise ValueError(f"{name!r} is not a file name inside the folder")
            written.append(folder / f".{name}{NEW}")
            _write_synced(written[-1], data)
        journal = [{"name": name, "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()]
        written.append(journal_tmp)
        _write_synced(journal_tmp, json.dumps(journal).encode())
        os.replace(journal_tmp, folder / JOURNAL)  # the commit
    except BaseException as e:
        for path in written:
            with contextlib.suppress(OSError):
                path.unlink()
        if isinstance(e, OSError) and e.filename is None:  # ENOSPC from write() names no file
            raise OSError(e.errno, e.strerror or str(e), str(written[-1] if written else folder)) from e
        raise
    # Committed: from here on a killed run is finished by the next `settled` of this folder.
    for name in files:
        os.replace(folder / f".{name}{NEW}", folder / name)
    os.unlink(folder / JOURNAL)
