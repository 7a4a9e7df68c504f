"""Every file qexport reads goes through here: regular files inside a given folder, read with limits.

A model folder is untrusted input, and an export is something people publish: nothing from outside the folder may
be read or copied into it. The rules, applied to shards, index, config.json, adapter files, side files and
folders, and the export folders `verify` and `inspect` read:

- a path is resolved (symlinks followed) and must land inside the folder it belongs to, or, for a folder in the
  Hugging Face cache (`models--Org--Name/snapshots/<rev>`), inside that repository's `blobs` folder, where the
  cache's own links point; a link that leaves is refused naming the link;
- only regular files are opened: FIFOs, sockets and devices (`/dev/zero`) are refused from `stat`, before an
  `open` that could block or have side effects (and opened with O_NONBLOCK, re-checked with `fstat`);
- walking a side folder never follows a link to a folder (a link to `/etc` or to an ancestor is refused);
- JSON is read with a size cap and a nesting cap (a RecursionError is not an error message).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from qexport.errors import InputError

MAX_CONFIG_BYTES = 16 * 2**20  # config.json, adapter_config.json: real ones are below 1 MB
MAX_JSON_BYTES = 64 * 2**20  # index, manifest, baseline: a 100k-tensor index is about 10 MB
MAX_JSON_DEPTH = 64  # real configs nest 4-5 levels; transformers and json.dumps recurse on what we accept
MAX_TREE_ENTRIES = 100_000  # files and folders in one side folder walk


def _allowed_roots(root: Path) -> list[str]:
    real = os.path.realpath(root)
    roots = [real]
    for candidate in (Path(root).absolute(), Path(real)):
        if candidate.parent.name == "snapshots" and candidate.parent.parent.name.startswith("models--"):
            roots.append(os.path.realpath(candidate.parent.parent / "blobs"))
    return roots


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def resolve_inside(path: str | Path, root: str | Path | None = None) -> Path:
    """The real path of `path`; InputError if a symlink on the way leaves `root` (default: the file's folder)."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    real = os.path.realpath(path)
    if not any(_within(real, r) for r in _allowed_roots(root)):
        raise InputError(f"{path}: symlink leads outside {root} (to {real}); qexport reads nothing outside the "
                         f"model folder")
    return Path(real)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def check_regular(path: str | Path, root: str | Path | None = None) -> Path:
    """The real path of a regular file inside `root`; InputError for escapes and special files. Missing files
    raise FileNotFoundError, so callers keep their own "not found" wording."""
    real = resolve_inside(path, root)
    mode = os.stat(real).st_mode
    if not stat.S_ISREG(mode):
        raise InputError(f"{path}: is {_kind(mode)}, not a regular file; qexport opens only regular files")
    return real


def open_regular(path: str | Path, root: str | Path | None = None, buffering: int = -1):
    """Open a regular file inside `root` for binary reading (see the module docstring for the rules)."""
    real = check_regular(path, root)
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # swapped between stat and open
            raise InputError(f"{path}: is {_kind(mode)}, not a regular file; qexport opens only regular files")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: str | Path, what: str, limit: int, root: str | Path | None = None) -> bytes:
    """The whole file, refused (InputError) above `limit` bytes without reading it."""
    with open_regular(path, root) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise InputError(f"{path}: {what} is {size:,} bytes, above qexport's {limit // 2**20} MiB limit for it")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InputError(f"{path}: {what} is above qexport's {limit // 2**20} MiB limit for it")
    return data


def json_depth_ok(value, limit: int = MAX_JSON_DEPTH) -> bool:
    """True if `value` nests at most `limit` levels (iterative: no recursion on hostile input)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return True


def parse_json(raw: bytes | str, where: str, what: str):
    """JSON text to a value; InputError naming `where` for bad JSON or nesting beyond MAX_JSON_DEPTH."""
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{where}: {what} is not valid JSON ({e})")
    except RecursionError:
        raise InputError(f"{where}: {what} nests deeper than {MAX_JSON_DEPTH} levels")
    if not json_depth_ok(value):
        raise InputError(f"{where}: {what} nests deeper than {MAX_JSON_DEPTH} levels")
    return value


def load_json(path: str | Path, what: str, limit: int = MAX_JSON_BYTES, root: str | Path | None = None):
    """A JSON file inside `root`, size- and depth-capped. InputError for every way it can be wrong."""
    try:
        raw = read_bytes(path, what, limit, root)
    except FileNotFoundError:
        raise InputError(f"{path}: {what} not found")
    except OSError as e:
        raise InputError(f"{path}: cannot read {what}: {e.strerror or e}")
    return parse_json(raw, str(path), what)


def walk_files(folder: Path, root: Path) -> list[tuple[str, Path]]:
    """Every regular file under `folder` as (path relative to `folder`, real path), checked against `root`.

    Links to files inside the root are followed (the Hugging Face cache links every file to its blob); links to
    folders are refused, as are links leaving the root and special files. At most MAX_TREE_ENTRIES entries."""
    resolve_inside(folder, root)
    if os.path.islink(folder):
        raise InputError(f"{folder}: is a symlinked folder; qexport does not follow links to folders")
    out, seen = [], 0
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError as e:
            raise InputError(f"{current}: cannot list folder: {e.strerror or e}")
        for entry in entries:
            seen += 1
            if seen > MAX_TREE_ENTRIES:
                raise InputError(f"{folder}: holds more than {MAX_TREE_ENTRIES:,} entries")
            path = Path(entry.path)
            if entry.is_symlink():
                real = resolve_inside(path, root)
                if real.is_dir():
                    raise InputError(f"{path}: is a symlinked folder; qexport does not follow links to folders")
            if entry.is_dir(follow_symlinks=False):
                pending.append(path)
                continue
            try:
                real = check_regular(path, root)
            except FileNotFoundError:  # a link to nothing: name the link, not only its missing target
                if not entry.is_symlink():  # removed since it was listed
                    raise InputError(f"{path}: disappeared while being read") from None
                raise InputError(f"{path}: symlink to {os.readlink(path)}, which does not exist") from None
            out.append((path.relative_to(folder).as_posix(), real))
    return sorted(out)


def copy_file(source: Path, target: Path, root: Path) -> None:
    """Copy a checked regular file's bytes (never a link, never a special file) to `target`."""
    import shutil

    with open_regular(source, root) as src, open(target, "xb") as dst:
        shutil.copyfileobj(src, dst, 16 * 2**20)


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary sibling and rename: readers see the old file or the new one, never half.
    Characters UTF-8 cannot hold (surrogates from undecodable path bytes) are written as backslash escapes."""
    tmp = path.with_name(f".{path.name}.qexport-tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", errors="backslashreplace") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is None:  # ENOSPC from write() names no file
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
