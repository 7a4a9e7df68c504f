"""What a model folder's JSON files make a library run or read, found before any library sees the folder.

transformers, tokenizers and sentence-transformers follow class names and paths written in a folder's JSON
files, where the symlink rules of safe_fs cannot see them. `folder_findings(folder)` reads every JSON file in the
folder (through safe_fs) and returns one Finding per breach, each naming the file and the key:

- remote code: `auto_map` in any JSON file (config.json, tokenizer_config.json, processor configs), a
  `trust_remote_code` key anywhere, a modules.json module whose `type` is not one of sentence-transformers' own;
- paths: every string under a key that names a file or folder (`path`, `file`, `files`, `filename`, or a key
  ending in one of them or `_dir`: tokenizer_config.json `tokenizer_file`, `vocab_file`, `fast_tokenizer_files`;
  sentence_bert_config.json `tokenizer_args.tokenizer_file`; modules.json `path`), every shard of an index's
  `weight_map` and every `files[].name` of qexport.json must be a relative path that stays inside the folder once
  resolved (against the JSON file's own folder, and against the model folder, links followed). `name_or_path`
  keys are provenance (a hub id or the writer's folder), which no library reads: not checked. tokenizer.json is
  not read: the tokenizers library takes no path from it, and it is the largest JSON of a folder;
- pickles: a pickle file (`.bin`, `.pt`, ...) inside a module folder that modules.json names: sentence-transformers
  would `torch.load` it (`2_Dense/pytorch_model.bin`).

`hard_linked(tree)` names files with more than one link: a hard link cannot be told apart from its twin outside
the folder, so export refuses to copy one and verify fails an export that holds one (see its docstring).
export refuses a folder with findings (exit 2); verify reports them as a failed check and runs no library on it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from qexport.errors import InputError
from qexport.io import safe_fs

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SKIPPED_JSON = ("tokenizer.json",)
PATH_KEYS = ("path", "file", "files", "filename")
PATH_KEY_ENDINGS = ("_file", "_files", "_filename", "_path", "_dir")
INDEX_FILES = ("model.safetensors.index.json",)
MANIFEST_FILE = "qexport.json"


@dataclass(frozen=True)
class Finding:
    file: str  # the JSON file (or the file itself for pickles and hard links), relative to the folder
    key: str  # where in the file: `auto_map`, `tokenizer_args.tokenizer_file`, `weight_map['x']`
    problem: str

    def __str__(self) -> str:
        return f"{self.file}: {self.key}: {self.problem}"


def _is_path_key(key: str) -> bool:
    key = key.lower()
    return not key.endswith("name_or_path") and (key in PATH_KEYS or key.endswith(PATH_KEY_ENDINGS))


def _within(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def path_problem(value: str, base: Path, root: Path) -> str | None:
    """Why `value`, named in a JSON file of folder `base` inside `root`, is not a path inside `root`; else None."""
    if "\x00" in value:
        return "names a path with a NUL byte"
    if os.path.isabs(value) or value.startswith("~"):
        return f"names {value!r}, an absolute path (qexport reads nothing outside the model folder)"
    roots = [os.path.realpath(root)]
    for start in {base, root}:
        real = os.path.realpath(os.path.join(start, value))
        if not _within(real, roots):
            return f"names {value!r}, which leads outside the model folder (to {real})"
    return None


def _walk_json(value, where: str):
    """(dotted key, key name, value) of every entry of nested dicts and lists (iterative: hostile depth)."""
    stack = [(value, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, dict):
            for k, v in item.items():
                child = f"{path}.{k}" if path else str(k)
                yield child, str(k), v
                stack.append((v, child))
        elif isinstance(item, list):
            for i, v in enumerate(item):
                stack.append((v, f"{path}[{i}]"))


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    if isinstance(value, dict):  # fast_tokenizer_files in some writers: {version: file}
        return [v for v in value.values() if isinstance(v, str)]
    return []


def _json_findings(rel: str, data, base: Path, root: Path) -> list[Finding]:
    found = []
    for key, name, value in _walk_json(data, ""):
        if name == "auto_map":
            found.append(Finding(rel, key, "names custom code (auto_map); qexport never runs a model folder's "
                                            "code (remove auto_map, or use a model transformers knows)"))
        elif name == "trust_remote_code":
            found.append(Finding(rel, key, "asks to trust remote code; qexport never runs a model folder's code"))
        elif _is_path_key(name):
            for text in _strings(value):
                if text and (problem := path_problem(text, base, root)) is not None:
                    found.append(Finding(rel, key, problem))
    name = Path(rel).name
    if name in INDEX_FILES and isinstance(data, dict) and isinstance(data.get("weight_map"), dict):
        for tensor, shard in data["weight_map"].items():
            if isinstance(shard, str) and (problem := path_problem(shard, base, root)) is not None:
                found.append(Finding(rel, f"weight_map[{tensor!r}]", problem))
    if rel == MANIFEST_FILE and isinstance(data, dict) and isinstance(data.get("files"), list):
        for i, record in enumerate(data["files"]):
            if isinstance(record, dict) and isinstance(record.get("name"), str):
                if (problem := path_problem(record["name"], base, root)) is not None:
                    found.append(Finding(rel, f"files[{i}].name", problem))
    return found


def _modules_findings(data, root: Path, tree: list[tuple[str, Path]]) -> list[Finding]:
    found = []
    for i, module in enumerate(data if isinstance(data, list) else []):
        if not isinstance(module, dict):
            continue
        kind = module.get("type")
        if isinstance(kind, str) and not kind.startswith("sentence_transformers."):
            found.append(Finding("modules.json", f"[{i}].type", f"names {kind!r}, a module that is not "
                                 "sentence-transformers' own (custom code); qexport never runs a model folder's code"))
        path = module.get("path")
        if isinstance(path, str) and path.strip("/.") and path_problem(path, root, root) is None:
            prefix = os.path.normpath(path).strip("/") + "/"
            for rel, _ in tree:
                if rel.startswith(prefix) and rel.endswith(PICKLE_SUFFIXES):
                    found.append(Finding(rel, f"modules.json [{i}].path",
                                         "a pickle in a sentence-transformers module folder (loading it can run "
                                         "code); convert it to safetensors"))
    return found


def folder_findings(folder: str | Path) -> list[Finding]:
    """Every remote-code hook, path leaving the folder and module pickle that the folder's JSON files name.
    InputError only where safe_fs refuses the folder itself (a link out, a special file, a JSON too large)."""
    root = Path(folder)
    tree = safe_fs.walk_files(root, root)
    found: list[Finding] = []
    for rel, real in tree:
        if not rel.endswith(".json") or Path(rel).name in SKIPPED_JSON:
            continue
        try:
            data = safe_fs.load_json(root / rel, Path(rel).name, root=root)
        except InputError:  # malformed JSON is the finding of the check that reads that file
            continue
        found += _json_findings(rel, data, (root / rel).parent, root)
        if rel == "modules.json":
            found += _modules_findings(data, root, tree)
    return found


def hard_linked(tree: list[tuple[str, Path]]) -> list[str]:
    """The files (relative paths) of `tree` with more than one hard link.

    A hard link to a file outside the folder reads as a regular file inside it, and nothing tells it apart from
    an ordinary file that was copied twice: the only sound rule is to copy no file with another name somewhere.
    A folder made by `cp -r`, git or a Hugging Face download has none (the cache links files with symlinks)."""
    out = []
    for rel, real in tree:
        try:
            if os.stat(real).st_nlink > 1:
                out.append(rel)
        except OSError:
            continue
    return out


def refuse_unsafe(folder: str | Path, what: str = "source") -> None:
    """InputError naming the first finding of `folder`, for commands that refuse such folders (export)."""
    found = folder_findings(folder)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise InputError(f"{Path(folder) / found[0].file}: {found[0].key}: {found[0].problem}{more}")
