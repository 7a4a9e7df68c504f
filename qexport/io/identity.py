"""What a model folder says about its own identity: the name reports give it, the Hub id of a folder in the
Hugging Face cache, and the YAML front matter of its README.md.

Everything here reads untrusted files and never raises for their content: a missing, unreadable or malformed
file gives the next source of a name, and in the end the folder's own name.
"""

from __future__ import annotations

import re
from pathlib import Path

FRONT_MATTER = re.compile(r"---\r?\n.*?\r?\n---\r?\n", re.DOTALL)
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")  # what a Hub repo id may hold


def base_model_id(folder: Path) -> str | None:
    """The Hub repo id of a folder in the Hugging Face cache (…/models--Org--Name/snapshots/<rev>), else None.
    A folder name that is not a valid repo id (a newline, a space, markup) names none."""
    parts = Path(folder).resolve().parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            hub_id = part.removeprefix("models--").replace("--", "/")
            return hub_id if HUB_ID.fullmatch(hub_id) else None
    return None


def readme_front_matter(text: str | None) -> dict:
    """The YAML front matter of a README (a model card) as a dict; {} when there is none or it is not a mapping."""
    if not text:
        return {}
    match = FRONT_MATTER.match(text)
    if not match:
        return {}
    import yaml

    try:
        data = yaml.safe_load(match.group(0).strip().strip("-"))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def model_name(folder, name: str | None = None) -> str:
    """How reports name a model (the path goes in its own column): `name` if given (`--name`), else config.json's
    `_name_or_path` (a Hub id such as Qwen/Qwen3-0.6B; the last part of a local path), else the Hub id of a folder in
    the Hugging Face cache, else the README front matter's `model_name` or first `model-index` name, else the
    folder's own name."""
    from qexport.errors import InputError
    from qexport.io.safe_fs import MAX_CONFIG_BYTES, load_json

    if name:
        return name
    folder = Path(folder)
    try:
        config = load_json(folder / "config.json", "config.json", MAX_CONFIG_BYTES)
    except InputError:
        config = None
    recorded = config.get("_name_or_path") if isinstance(config, dict) else None
    if isinstance(recorded, str) and recorded.strip():
        recorded = recorded.strip().rstrip("/")
        return Path(recorded).name if recorded.startswith((".", "/", "~")) or "\\" in recorded else recorded
    if hub_id := base_model_id(folder):
        return hub_id
    try:
        front = readme_front_matter((folder / "README.md").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        front = {}
    index = front.get("model-index")
    for candidate in (front.get("model_name"), index[0].get("name") if isinstance(index, list) and index
                      and isinstance(index[0], dict) else None):
        if isinstance(candidate, str) and candidate.strip():
            return candidate.strip()
    return folder.resolve().name
