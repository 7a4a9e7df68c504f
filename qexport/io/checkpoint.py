"""A Hugging Face model folder, checked up front and read one tensor at a time.

`Checkpoint.open(dir)` validates everything that can be checked without reading tensor data: config.json, the
weight files (single file or index + shards), every safetensors header, index/shard agreement, duplicate names.
`Checkpoint.read(name)` then reads one tensor with a positioned read.

A source file that changes while an export reads it is refused (InputError, exit 2), never hashed as other bytes
than those read: `open` stamps config.json, the index and every weight file (device, inode, size, mtime, ctime)
before reading them, and every later read or hash of the file checks the open descriptor against that stamp.
Caught: a file replaced by rename, and a file rewritten in place (its ctime moves; within one tick of the
kernel's coarse file clock a rewrite of the same size could go unseen).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qexport.io import safe_fs

from qexport.io import safetensors_file as safetensors_io
from qexport.errors import InputError
from qexport.io.safe_fs import MAX_CONFIG_BYTES, load_json
from qexport.io.safetensors_file import TensorEntry, read_header, sha256_file

if TYPE_CHECKING:  # torch is imported when the first tensor is read: opening a checkpoint stays torch-free
    import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MANIFEST_FILE = "qexport.json"  # what qexport writes next to the weights of every export
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # weights only loadable by unpickling
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "model.ckpt")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
PICKLE_PATTERNS = ("*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.ckpt")
# Auto classes to name first when an architecture is in several mappings (GPT2LMHeadModel is also "pretraining").
PREFERRED_AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModelForMaskedLM",
                          "AutoModelForImageTextToText", "AutoModel")


def auto_class_for(config: dict) -> str | None:
    """The transformers class that loads this config's `architectures[0]` with its head: the Auto class whose
    mapping gives exactly that class for the config's model_type (AutoModelForCausalLM for Qwen3ForCausalLM),
    else the architecture class itself when transformers has it; None when config.json names no architecture."""
    architectures = config.get("architectures")
    if not (isinstance(architectures, list) and architectures and isinstance(architectures[0], str)):
        return None
    arch, model_type = architectures[0], config.get("model_type")
    import transformers
    from transformers.models.auto import modeling_auto

    hits = []
    for name, cls in vars(modeling_auto).items():
        mapping = getattr(getattr(cls, "_model_mapping", None), "_model_mapping", None)
        if name.startswith("AutoModel") and isinstance(mapping, dict):
            target = mapping.get(model_type)
            if target == arch or (isinstance(target, (list, tuple)) and arch in target):
                hits.append(name)
    hits.sort(key=lambda n: (PREFERRED_AUTO_CLASSES.index(n) if n in PREFERRED_AUTO_CLASSES else 99, n))
    if hits:
        return hits[0]
    return arch if hasattr(transformers, arch) else None


def pickle_advice(folder: Path) -> str:
    """What to do with a pickle checkpoint: a command that converts a copy to safetensors with the model's own class
    (AutoModel would save a causal LM without its lm_head, which qexport would then export without complaint)."""
    import shlex

    try:
        config = load_json(folder / "config.json", "config.json", MAX_CONFIG_BYTES)
    except InputError:
        config = None
    cls = auto_class_for(config) if isinstance(config, dict) else None
    note = ""
    if cls is None:
        cls, note = "AutoModel", (" (config.json names no architecture this transformers knows: replace AutoModel by "
                                  "the class of the model's task, e.g. AutoModelForCausalLM, or the head is lost)")
    src = str(folder)  # a Path never ends in "/" (but "/" itself, which stripping turned into "")
    src, out = (src, f"{src}-safetensors") if len(src) <= 200 else ("SRC", "SRC-safetensors")  # the line stays short
    ignore = ", ".join(f'"{p}"' for p in PICKLE_PATTERNS)  # double quotes: the code goes in '...' on a shell line
    code = (f"import shutil, sys; from transformers import {cls} as M; "
            f"shutil.copytree(sys.argv[1], sys.argv[2], ignore=shutil.ignore_patterns({ignore})); "
            'M.from_pretrained(sys.argv[1], dtype="auto").save_pretrained(sys.argv[2])')
    return (f"qexport never unpickles weights (loading a pickle can run code). Convert a copy you trust to "
            f"safetensors with its own class {cls}, keeping the tokenizer and other files{note}, then export that: "
            f"python -c {shlex.quote(code)} {shlex.quote(src)} {shlex.quote(out)}")


def load_config(folder: Path) -> dict:
    config = load_json(folder / "config.json", "config.json", MAX_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise InputError(f"{folder / 'config.json'}: config.json is not a JSON object")
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise InputError(f"{folder / 'config.json'}: no model_type key; transformers cannot tell the architecture")
    architectures = config.get("architectures")
    if architectures is not None and not (
        isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)
    ):
        raise InputError(f"{folder / 'config.json'}: architectures {architectures!r} is not a list of class names")
    return config


FLOAT_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")


def declared_dtype(config: dict | None) -> str | None:
    """The floating dtype config.json names: `dtype` (transformers 5) or `torch_dtype` (older writers), e.g.
    "bfloat16"; None when it names none (absent, "auto", or not a floating dtype). The one reading of that key for
    export, verify, the card and the engines: transformers then loads in float32."""
    for key in ("dtype", "torch_dtype"):
        value = (config or {}).get(key)
        if isinstance(value, str) and value.removeprefix("torch.") in FLOAT_DTYPE_NAMES:
            return value.removeprefix("torch.")
    return None


def _index_shards(folder: Path) -> list[str]:
    index_path = folder / INDEX_FILE
    index = load_json(index_path, INDEX_FILE)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{index_path}: no weight_map object")
    shards = []
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).is_absolute() or Path(shard).name != shard or shard in ("", ".", ".."):
            raise InputError(f"{index_path}: tensor {tensor!r} names shard {shard!r}, which is not a file in this folder")
        if not os.path.lexists(folder / shard):
            raise InputError(f"{index_path}: tensor {tensor!r} is in shard {shard!r}, which does not exist")
        if shard not in shards:
            shards.append(shard)
    on_disk = {p.name for p in folder.glob("*.safetensors")}
    for stray in sorted(on_disk - set(shards)):
        raise InputError(f"{folder / stray}: shard is not listed in {INDEX_FILE}")
    return sorted(shards)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder, in index order; refuses pickles and ambiguous layouts."""
    # lexists, not is_file: a FIFO or a link out named model.safetensors is refused by name when it is opened
    if os.path.lexists(folder / INDEX_FILE):
        return [folder / name for name in _index_shards(folder)]
    if os.path.lexists(folder / SINGLE_FILE):
        return [folder / SINGLE_FILE]
    pickles = [p for p in folder.iterdir() if p.name in PICKLE_NAMES or p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    if pickles:
        raise InputError(f"{pickles[0]}: pickle checkpoint refused", advice=pickle_advice(folder))
    others = sorted(folder.glob("*.safetensors"))
    if len(others) == 1:
        return others
    if others:
        raise InputError(f"{folder}: {len(others)} safetensors files but no {INDEX_FILE} to say how they fit together")
    raise InputError(f"{folder}: no weights ({SINGLE_FILE} or {INDEX_FILE}) found")


@dataclass
class Checkpoint:
    folder: Path
    config: dict
    files: list[Path]
    entries: dict[str, TensorEntry]
    # file -> (sha256 of its first `offset` bytes, offset): fed by `hash_read`, finished by `source_files`
    _hashes: dict = field(default_factory=dict, repr=False, compare=False)
    _hashing: object = field(default=None, repr=False, compare=False)  # a ForkedCall of `_hash_files`
    # file -> its FileStamp when `open` read it: every later read or hash must see the same file
    _stamps: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def open(cls, folder: str | Path) -> "Checkpoint":
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"{folder}: not a folder")
        if not any(folder.iterdir()):
            raise InputError(f"{folder}: folder is empty (expected config.json and model.safetensors)")
        stamps = {folder / "config.json": file_stamp(os.stat(folder / "config.json"))} \
            if os.path.exists(folder / "config.json") else {}
        config = load_config(folder)
        files = weight_files(folder)
        stamps.update({p: file_stamp(os.stat(p)) for p in [*files, folder / INDEX_FILE] if os.path.exists(p)})
        entries: dict[str, TensorEntry] = {}
        index = load_json(folder / INDEX_FILE, INDEX_FILE)["weight_map"] if os.path.lexists(folder / INDEX_FILE) else None
        for path in files:
            for name, entry in read_header(path)[0].items():
                if name in entries:
                    raise InputError(f"{path}: tensor {name!r} is also in {entries[name].file.name}")
                if index is not None and index.get(name) != path.name:
                    raise InputError(
                        f"{path}: tensor {name!r} is here but {INDEX_FILE} puts it in {index.get(name)!r}"
                    )
                entries[name] = entry
        if index is not None:
            for name, shard in index.items():
                if name not in entries:
                    raise InputError(f"{folder / INDEX_FILE}: tensor {name!r} is not in shard {shard!r}")
        if not entries:
            raise InputError(f"{files[0]}: holds no tensors")
        check_layer_counts(config, entries, folder / "config.json")
        for path, stamp in stamps.items():  # a file changed while its header or JSON was read
            check_unchanged(path, file_stamp(os.stat(path)), stamp)
        return cls(folder, config, files, entries, _stamps=stamps)

    def input_folders(self) -> list[Path]:
        return [self.folder]

    @property
    def tensor_bytes(self) -> int:
        return tensor_bytes(self.entries)

    @property
    def names(self) -> list[str]:
        """Tensor names in file order, then offset order: the order that reads each file front to back."""
        return sorted(self.entries, key=lambda n: (self.files.index(self.entries[n].file), self.entries[n].start))

    def read(self, name: str) -> torch.Tensor:
        """One tensor, read into its own buffer with a positioned read.

        Not memory-mapped on purpose: mapped pages of every file touched would count towards the process's
        resident memory and grow with the model; a plain read keeps memory at the tensor being worked on.
        Offsets were checked against the file when its header was read.
        """
        import torch

        entry = self.entries[name]
        dtype = safetensors_io.DTYPES[entry.dtype]
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=dtype)
        buffer = torch.empty(entry.nbytes, dtype=torch.uint8)  # not zero-filled first, as a bytearray would be
        try:
            with safe_fs.open_regular(entry.file, buffering=0) as f:
                got = os.preadv(f.fileno(), [buffer.numpy()], entry.data_start + entry.start)
                if got != entry.nbytes:
                    raise InputError(f"{entry.file}: tensor {name!r} is truncated ({got} of {entry.nbytes} bytes)")
                self._check_unchanged(entry.file, f)
        except OSError as e:
            raise InputError(f"{entry.file}: cannot read tensor {name!r}: {e.strerror or e}")
        return buffer.view(dtype).reshape(entry.shape)

    def source_files(self) -> list[dict]:
        """config.json and the weight files with their sizes and sha256, for the manifest."""
        if self._hashing is not None:
            return self._hashing.result()
        return self._hash_files()

    def _hash_files(self) -> list[dict]:
        paths = [self.folder / "config.json", *self.files]
        if os.path.lexists(self.folder / INDEX_FILE):
            paths.append(self.folder / INDEX_FILE)
        return [{"name": p.name, "bytes": p.stat().st_size, "sha256": self._sha256(p)} for p in paths]

    def hash_in_child(self) -> None:
        """Hash the files in a child forked now (qexport.io.forked: only where that is safe), for `source_files`.
        The command line calls it before importing torch: the child hashes on the other core while this process
        imports (1b: ~1.1 s of the 1.3 s CPU the hashing costs), instead of from the reads later (`hash_read`)."""
        from qexport.io.forked import ForkedCall

        self._hashing = ForkedCall(self._hash_files, "hashing the source")

    def hash_read(self, name: str, tensor: torch.Tensor) -> None:
        """Feed a tensor `read` returned to its file's sha256 when it is the next span of the file. An export that
        sees tensors in file order (one thread) so spares `source_files` a second full read of the source."""
        import torch

        if self._hashing is not None:
            return  # a child hashes the files
        entry = self.entries[name]
        sha, offset = self._hashes.get(entry.file, (None, entry.data_start))
        if entry.data_start + entry.start != offset or entry.nbytes == 0:
            return
        if sha is None:
            with safe_fs.open_regular(entry.file) as f:
                self._check_unchanged(entry.file, f)
                sha = hashlib.sha256(f.read(entry.data_start))  # the length prefix and the header
        sha.update(tensor.reshape(-1).view(torch.uint8).numpy())
        self._hashes[entry.file] = (sha, offset + entry.nbytes)

    def _sha256(self, path: Path) -> str:
        """A file's sha256: what `hash_read` saw, then the rest of the file (all of it if nothing was fed)."""
        if path not in self._hashes:
            return sha256_file(path, check=lambda f: self._check_unchanged(path, f))
        sha, offset = self._hashes[path]
        sha = sha.copy()
        with safe_fs.open_regular(path) as f:
            self._check_unchanged(path, f)
            f.seek(offset)
            while block := f.read(16 * 2**20):
                sha.update(block)
            self._check_unchanged(path, f)
        return sha.hexdigest()

    def _check_unchanged(self, path: Path, f) -> None:
        if path in self._stamps:
            check_unchanged(path, file_stamp(os.fstat(f.fileno())), self._stamps[path])

    def side_files(self) -> list[Path]:
        """Everything but weights and config: tokenizer, generation config, chat template, READMEs, subfolders."""
        skip = {"config.json", INDEX_FILE, "qexport.json"}
        return sorted(
            p
            for p in self.folder.iterdir()
            if p.name not in skip and not p.name.startswith(".") and not p.name.endswith(WEIGHT_SUFFIXES)
        )


    def side_tree(self) -> list[tuple[str, Path]]:
        """Every side file to copy, as (path relative to the folder, checked real path): see safe_fs.walk_files.
        Refuses (InputError naming it) a link that leaves the folder, a linked folder or a special file."""
        tree: list[tuple[str, Path]] = []
        for side in self.side_files():
            if side.is_dir():
                tree += [(f"{side.name}/{rel}", real) for rel, real in safe_fs.walk_files(side, self.folder)]
            else:
                tree.append((side.name, safe_fs.check_regular(side, self.folder)))
        return tree


FileStamp = tuple  # (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)


def file_stamp(st: os.stat_result) -> FileStamp:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def check_unchanged(path: Path, now: FileStamp, then: FileStamp) -> None:
    """InputError naming `path` when the file seen now is not the one stamped when the export opened it."""
    if now != then:
        what = "was replaced" if now[:2] != then[:2] else "was modified"
        raise InputError(f"{path}: {what} while qexport read it; export again once the source no longer changes")


# config keys that count the model's blocks (or experts); each one's tensors carry its number in their names
LAYER_COUNT_KEYS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers", "decoder_layers",
                    "num_encoder_layers", "num_decoder_layers",
                    "num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok")
# config keys that size something transformers allocates for real even on the meta device: `num_labels` builds an
# id2label dict of that many strings (10**6 measured 0.6 s and 340 MB; 10**8 would need 30 GB). A classification
# head stores num_labels rows, so no real checkpoint asks for more labels than its widest tensor has.
ALLOCATING_WIDTH_KEYS = ("num_labels",)


def check_layer_counts(config: dict, entries: dict, config_path: Path) -> None:
    """A config may not ask for more blocks or experts than the checkpoint holds, nor for more labels than its
    widest tensor. Checked before the architecture is built: num_hidden_layers 10**9 would otherwise build a
    billion meta modules (a hang, not an error) and num_labels 10**8 allocate 30 GB."""
    present = 1 + max((int(part) for name in entries for part in name.split(".") if part.isdigit()), default=-1)
    configs = [config] + [v for v in config.values() if isinstance(v, dict)]  # text_config, vision_config, ...
    for cfg in configs:
        for key in LAYER_COUNT_KEYS + ALLOCATING_WIDTH_KEYS:
            value = cfg.get(key)
            if not isinstance(value, int) or isinstance(value, bool):
                continue
            if key in LAYER_COUNT_KEYS and value > present:
                raise InputError(f"{config_path}: {key}={value} but the checkpoint's tensor names number at most "
                                 f"{present} blocks")
            widest = key in ALLOCATING_WIDTH_KEYS and max((max(e.shape, default=1) for e in entries.values()),
                                                          default=1)
            if widest and value > widest:
                raise InputError(f"{config_path}: {key}={value} but the checkpoint's widest tensor dimension is "
                                 f"{widest}")


def tensor_bytes(entries: dict[str, TensorEntry]) -> int:
    """The tensor data of a checkpoint (or of a source presenting its entries) in bytes."""
    return sum(e.nbytes for e in entries.values())


def is_float(dtype_name: str) -> bool:
    return safetensors_io.DTYPES[dtype_name].is_floating_point
