"""Where a source model named on the command line lives, found offline before anything heavy is imported.

Contract: `resolve_model(text)` returns a folder for
- a model folder (returned as given);
- a Hugging Face cache root, `.../models--OWNER--NAME` (the snapshot its `refs/main` names; the only snapshot when
  there is no ref);
- a hub id, `OWNER/NAME`, that is not a local path but is in the local Hugging Face cache (HF_HUB_CACHE / HF_HOME).
The cache is read through huggingface_hub's own `snapshot_download(local_files_only=True)`: nothing is downloaded,
nothing goes on the network. Anything else raises InputError naming what was given and which path to pass.
huggingface_hub is imported only for cache roots and hub ids (a plain folder costs nothing).
"""

from __future__ import annotations

import re
from pathlib import Path

from qexport.errors import InputError

CACHE_PREFIX = "models--"
# OWNER/NAME as the hub spells repository ids: letters, digits, '-', '_', '.'; one slash.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_cache_root(folder: Path) -> bool:
    """A `models--OWNER--NAME` folder of the Hugging Face cache (snapshots inside, no config.json of its own)."""
    return (folder.name.startswith(CACHE_PREFIX) and (folder / "snapshots").is_dir()
            and not (folder / "config.json").exists())


def repo_id_of_cache_root(folder: Path) -> str:
    return folder.name[len(CACHE_PREFIX):].replace("--", "/")


def _cached_snapshot(repo_id: str, cache_dir: Path | None = None) -> Path | None:
    """The snapshot folder of `repo_id`'s main revision in the cache, or None if the cache has none."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        found = snapshot_download(repo_id, cache_dir=None if cache_dir is None else str(cache_dir),
                                  local_files_only=True)
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None
    return Path(found)


def default_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _from_cache_root(folder: Path) -> Path:
    found = _cached_snapshot(repo_id_of_cache_root(folder), folder.parent)
    if found is not None and found.is_dir():
        return found
    snapshots = sorted(p for p in (folder / "snapshots").iterdir() if p.is_dir())
    if len(snapshots) == 1:
        return snapshots[0]
    listed = ", ".join(p.name for p in snapshots[:4]) or "none"
    raise InputError(f"{folder}: a Hugging Face cache folder with no refs/main and {len(snapshots)} snapshots "
                     f"({listed}): pass one of them, {folder / 'snapshots'}/<revision>")


def resolve_model(text: str | Path) -> Path:
    """The model folder `text` names (see the module docstring); InputError if it names none."""
    path = Path(text)
    if path.is_dir():
        return _from_cache_root(path) if is_cache_root(path) else path
    if not path.exists() and HUB_ID.match(str(text)):
        found = _cached_snapshot(str(text))
        if found is not None and found.is_dir():
            return found
        raise InputError(f"{text}: not a folder, nor a model in the local Hugging Face cache ({default_cache_dir()}; "
                         f"looked up offline, nothing is downloaded): download it first (hf download {text}) or "
                         f"pass its folder, e.g. {CACHE_PREFIX}{str(text).replace('/', '--')}/snapshots/<revision>")
    raise InputError(f"{path}: not a folder")
