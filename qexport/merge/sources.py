"""Merged checkpoints presented as a `TensorSource`: a LoRA adapter folded into its base, or a weighted average.

Both are validated completely when they are built (configs, tensor names, shapes, adapter config), from headers
and the meta-device architecture, before the pipeline writes a byte. Each `read(name)` then computes one merged
tensor in fp32 and returns it in the source dtype, so memory follows the largest tensor, never the model.

The export pipeline consumes them like a `Checkpoint` (`qexport export BASE --lora A`: merge and quantize in one
pass); `merge_folder` writes one as a plain Hugging Face folder through the same pipeline, with the "original"
format (every tensor in its own dtype, config unchanged).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from qexport.io import safe_fs

from qexport.io import untrusted_regex
from qexport.io.checkpoint import Checkpoint, is_float
from qexport.io.safe_fs import load_json
from qexport.errors import InputError
from qexport.export.pipeline import ExportOptions, export
from qexport.io.publish import TMP_MARK, OwnedFolder, check_not_input, input_folders, remove_stale, replace_dir
from qexport.io.safetensors_file import DTYPES, TensorEntry, read_header, sha256_file

log = logging.getLogger("qexport")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PREFIX = "base_model.model."  # what peft's save_pretrained puts before the base model's module names

# LoraConfig fields that change what merging means. A truthy value is refused: folding W + scale * B @ A would
# silently give a different model than peft's merge_and_unload().
UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "trained LoRA biases (lora_bias)",
    "modules_to_save": "modules_to_save (whole modules trained and stored in the adapter)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "layer_replication": "layer_replication",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens), which cannot be merged",
    "velora_config": "the VeLoRA variant",
    "monteclora_config": "the MonteCLoRA variant",
    "arrow_config": "Arrow routing",
    "kasa_config": "the KaSA variant",
    "megatron_config": "Megatron parallel layers",
}


def _source_records(prefix: str, paths: list[Path]) -> list[dict]:
    return [{"name": f"{prefix}/{p.name}", "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in paths]


# ---------------------------------------------------------------------------------------------------------------
# LoRA


def pattern_value(patterns: dict, module: str, default, where: str = ADAPTER_CONFIG):
    """peft's rank_pattern / alpha_pattern lookup: the first key whose regex matches the end of the module name.
    Keys are untrusted regular expressions: matched with a length and time bound (untrusted_regex)."""
    for key in patterns:
        if untrusted_regex.match(rf"(.*\.)?({key})$", module, f"{where}: key {str(key)[:80]!r}"):
            return patterns[key]
    return default


def _positive_number(value) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value)) and value > 0
    except OverflowError:  # an integer too large for a float
        return False


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: its A and B keys in the adapter file, rank, alpha and the scale applied to B @ A."""

    module: str
    kind: str  # "linear" (weight [out, in]); "conv1d" or "embedding" (weight stored transposed w.r.t. B @ A)
    a: str
    b: str
    rank: int
    alpha: float
    scale: float
    base_layer: str | None = None  # a full copy of the base weight saved with the adapter (peft does for embeddings)

    @property
    def weight(self) -> str:
        return f"{self.module}.weight"


@dataclass
class Adapter:
    """A PEFT LoRA adapter folder: adapter_config.json and adapter_model.safetensors, headers checked."""

    folder: Path
    config: dict
    file: Path
    entries: dict[str, TensorEntry]
    _handle: object = None

    @classmethod
    def open(cls, folder: str | Path) -> "Adapter":
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"--lora {folder}: not a folder")
        config = load_json(folder / ADAPTER_CONFIG, ADAPTER_CONFIG, safe_fs.MAX_CONFIG_BYTES)
        if not isinstance(config, dict):
            raise InputError(f"{folder / ADAPTER_CONFIG}: not a JSON object")
        file = folder / ADAPTER_WEIGHTS
        if not os.path.lexists(file):
            pickle = folder / "adapter_model.bin"
            if os.path.lexists(pickle):
                raise InputError(f"{pickle}: pickle adapter refused; qexport never unpickles weights; save the "
                                 f"adapter with peft's save_pretrained(dir, safe_serialization=True)")
            raise InputError(f"{file}: adapter weights not found")
        entries, _ = read_header(file)
        if not entries:
            raise InputError(f"{file}: holds no tensors")
        return cls(folder, config, file, entries)

    def read(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        try:
            if self._handle is None:
                self._handle = safe_open(str(safe_fs.check_regular(self.file)), framework="pt")
            return self._handle.get_tensor(key)
        except Exception as e:  # SafetensorError: read_header checked the header, so the file changed since
            raise InputError(f"{self.file}: the safetensors library cannot read tensor {key!r} "
                             f"({type(e).__name__}: {' '.join(str(e).split())[:200]})")

    def check_config(self) -> None:
        """Refuse adapter kinds whose merge is not W + scale * B @ A."""
        path = self.folder / ADAPTER_CONFIG
        peft_type = self.config.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise InputError(f"{path}: peft_type {peft_type!r} is not supported (only LORA)")
        for key, what in UNSUPPORTED_FIELDS.items():
            if self.config.get(key):
                raise InputError(f"{path}: {key}={json.dumps(self.config[key])}: {what} is not supported")
        if self.config.get("bias", "none") != "none":
            raise InputError(f"{path}: bias={self.config['bias']!r}: trained biases are not supported (only 'none')")
        if self.config.get("init_lora_weights") == "mica":
            raise InputError(f"{path}: init_lora_weights='mica': the MiCA variant is not supported")
        for key in ("r", "lora_alpha"):
            value = self.config.get(key)
            if not _positive_number(value):
                raise InputError(f"{path}: {key}={json.dumps(value)[:40]} is not a positive finite number")
        for key in ("rank_pattern", "alpha_pattern"):
            patterns = self.config.get(key) or {}
            if not isinstance(patterns, dict):
                raise InputError(f"{path}: {key} is not a JSON object")
            # peft matches each key as re.match(rf"(.*\.)?({key})$", module) over every module, as module_scale does
            for pattern in patterns:
                untrusted_regex.check(rf"(.*\.)?({pattern})$", f"{path}: {key}: key {str(pattern)[:80]!r}")
            untrusted_regex.check_pattern_list([f"re:(.*\\.)?({p})$" for p in patterns], f"{path}: {key}")
            for pattern, value in patterns.items():
                if key == "rank_pattern" and not (isinstance(value, int) and not isinstance(value, bool)
                                                  and value > 0):
                    raise InputError(f"{path}: {key}[{pattern[:80]!r}]={json.dumps(value)[:40]} is not a "
                                     f"positive integer")
                if key == "alpha_pattern" and not _positive_number(value):
                    raise InputError(f"{path}: {key}[{pattern[:80]!r}]={json.dumps(value)[:40]} is not a "
                                     f"positive number")


    def modules(self, base: Checkpoint) -> dict[str, LoraModule]:
        """Every adapted module, checked against the base: kind from the architecture, shapes, ranks, pairs."""
        from transformers.pytorch_utils import Conv1D

        from qexport.model.architecture import build_config, meta_model

        self.check_config()
        base_modules = dict(meta_model(build_config(base.config, base.folder / "config.json")).named_modules())
        parts: dict[str, dict[str, str]] = {}
        suffixes = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A",
                    ".lora_embedding_B": "B", ".base_layer.weight": "base_layer"}
        for key in self.entries:
            suffix = next((s for s in suffixes if key.endswith(s)), None)
            if suffix is None or not key.startswith(ADAPTER_PREFIX):
                raise InputError(f"{self.file}: key {key!r} is not a LoRA weight "
                                 f"({ADAPTER_PREFIX}<module>.lora_A.weight / .lora_B.weight)")
            module = key[len(ADAPTER_PREFIX):-len(suffix)]
            parts.setdefault(module, {})[suffixes[suffix]] = key
            if not is_float(self.entries[key].dtype):
                raise InputError(f"{self.file}: key {key!r} has dtype {self.entries[key].dtype}, not floating point")
        rank_pattern = self.config.get("rank_pattern") or {}
        alpha_pattern = self.config.get("alpha_pattern") or {}
        result = {}
        for module, keys in parts.items():
            any_key = next(iter(keys.values()))
            if "A" not in keys or "B" not in keys:
                raise InputError(f"{self.file}: key {any_key!r} has no matching lora_{'B' if 'A' in keys else 'A'}")
            target = base_modules.get(module)
            if target is None or f"{module}.weight" not in base.entries:
                why = "no such module" if target is None else f"the base checkpoint stores no {module}.weight"
                raise InputError(f"{self.file}: key {any_key!r} matches no base module ({why} in {base.folder})")
            embedding_keys = keys["A"].endswith("lora_embedding_A")
            if isinstance(target, torch.nn.Embedding) and embedding_keys:
                kind = "embedding"
            elif isinstance(target, torch.nn.Linear) and not embedding_keys:
                kind = "linear"
            elif isinstance(target, Conv1D) and not embedding_keys:
                kind = "conv1d"
            else:
                raise InputError(f"{self.file}: key {any_key!r}: LoRA on {type(target).__name__} {module!r} is not "
                                 f"supported (Linear, Conv1D and Embedding are)")
            where = str(self.folder / ADAPTER_CONFIG)
            rank = pattern_value(rank_pattern, module, self.config["r"], f"{where}: rank_pattern")
            alpha = pattern_value(alpha_pattern, module, self.config["lora_alpha"], f"{where}: alpha_pattern")
            scale = alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank
            lora = LoraModule(module, kind, keys["A"], keys["B"], rank, alpha, scale, keys.get("base_layer"))
            self._check_shapes(lora, base)
            result[module] = lora
        return result

    def _check_shapes(self, lora: LoraModule, base: Checkpoint) -> None:
        a, b = self.entries[lora.a].shape, self.entries[lora.b].shape
        w = tuple(base.entries[lora.weight].shape)
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise InputError(f"{self.file}: key {lora.a!r} {list(a)} and {lora.b!r} {list(b)} are not a rank-r pair")
        if a[0] != lora.rank:
            raise InputError(f"{self.file}: key {lora.a!r} {list(a)} has rank {a[0]} but {ADAPTER_CONFIG} gives "
                             f"{lora.module!r} rank {lora.rank} (r / rank_pattern)")
        delta = (b[0], a[1]) if lora.kind == "linear" else (a[1], b[0])
        if delta != w:
            raise InputError(f"{self.file}: key {lora.b!r}: B @ A gives {list(delta)} for {lora.module!r} but the base "
                             f"tensor {lora.weight!r} is {list(w)}")
        if lora.base_layer is not None and tuple(self.entries[lora.base_layer].shape) != w:
            raise InputError(f"{self.file}: key {lora.base_layer!r} {list(self.entries[lora.base_layer].shape)} "
                             f"replaces {lora.weight!r} {list(w)} with another shape (resized vocabulary?)")


class LoraMergedSource:
    """The base checkpoint with a LoRA adapter folded in: W' = W + scale * B @ A in fp32, stored in W's dtype.

    scale = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), per module from rank_pattern / alpha_pattern.
    As in peft, the module type decides the orientation: Linear stores [out, in] = B @ A; Conv1D and Embedding
    store the transpose. Config, tokenizer and every other file come from the base.
    """

    def __init__(self, base: Checkpoint, adapter: Adapter):
        self.base, self.adapter = base, adapter
        self.folder, self.config, self.entries = base.folder, base.config, base.entries
        self.lora = {m.weight: m for m in adapter.modules(base).values()}
        for name, lora in self.lora.items():
            if not is_float(base.entries[name].dtype):
                raise InputError(f"{base.entries[name].file}: tensor {name!r} has dtype {base.entries[name].dtype}; "
                                 f"LoRA needs a floating point base weight")
        self.merge = {
            "method": "lora",
            "base": str(base.folder.absolute()),
            "adapter": str(adapter.folder.absolute()),
            "use_rslora": bool(adapter.config.get("use_rslora")),
            "modules": {m.module: {"rank": m.rank, "alpha": m.alpha, "scale": m.scale} for m in self.lora.values()},
        }

    @property
    def names(self) -> list[str]:
        return self.base.names

    def read(self, name: str) -> torch.Tensor:
        lora = self.lora.get(name)
        w = self.base.read(name) if lora is None or lora.base_layer is None else self.adapter.read(lora.base_layer)
        if lora is None:
            return w
        delta = self.adapter.read(lora.b).float() @ self.adapter.read(lora.a).float()
        if lora.kind != "linear":
            delta = delta.T
        delta.mul_(lora.scale)
        low, high = torch.aminmax(delta) if delta.numel() else (torch.tensor(0.0), torch.tensor(0.0))
        if not (torch.isfinite(low) and torch.isfinite(high)):  # the adapter's fault, not the base's
            raise InputError(f"{self.adapter.file}: keys {lora.a!r} / {lora.b!r}: scale * B @ A holds NaN or Inf "
                             f"for {lora.module!r} (NaN/Inf in the adapter, or values too large for fp32)")
        # The operation order of peft's get_delta_weight and merge (W + (B @ A) * scale), so that equal inputs give
        # equal fp32 sums; in place, to hold one fp32 copy of W at a time.
        merged = w.to(torch.float32, copy=True).add_(delta)  # copy: never write into the mmap
        return merged.to(DTYPES[self.entries[name].dtype])

    def side_files(self) -> list[Path]:
        return self.base.side_files()

    def side_tree(self) -> list[tuple[str, Path]]:
        return self.base.side_tree()

    def input_folders(self) -> list[Path]:
        return [self.base.folder, self.adapter.folder]

    def source_files(self) -> list[dict]:
        base = [{**r, "name": f"base/{r['name']}"} for r in self.base.source_files()]
        return base + _source_records("adapter", [self.adapter.folder / ADAPTER_CONFIG, self.adapter.file])


# ---------------------------------------------------------------------------------------------------------------
# Weighted average


def normalized_weights(weights: list[float] | None, count: int) -> list[float]:
    """Weights of `count` checkpoints divided by their sum; equal when not given. Negative or all-zero refused."""
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise InputError(f"--weights: {len(weights)} weights for {count} models")
    for i, w in enumerate(weights):
        if not math.isfinite(w) or w < 0:
            raise InputError(f"--weights: weight {i + 1} is {w}; weights must be finite and non-negative")
    if max(weights) <= 0:
        raise InputError("--weights: all weights are zero")
    try:
        total = math.fsum(weights)
    except OverflowError:  # 1e308 + 1e308: the same ratios, scaled down first
        weights = [w / max(weights) for w in weights]
        total = math.fsum(weights)
    return [w / total for w in weights]


class AveragedSource:
    """sum_i w_i * W_i over checkpoints of one architecture, accumulated in fp32 in the order given, stored in the
    first checkpoint's dtype. Weights are normalised to sum to 1. Integer tensors must be equal in all of them."""

    IGNORED_CONFIG_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype"}

    def __init__(self, checkpoints: list[Checkpoint], weights: list[float] | None = None):
        if len(checkpoints) < 2:
            raise InputError("--models: give at least two checkpoints to average")
        self.checkpoints = checkpoints
        self.weights = normalized_weights(weights, len(checkpoints))
        first = checkpoints[0]
        self.folder, self.config, self.entries = first.folder, first.config, first.entries
        for other in checkpoints[1:]:
            self._check_same_architecture(first, other)
        self.merge = {
            "method": "average",
            "models": [str(c.folder.absolute()) for c in checkpoints],
            "weights": self.weights,
            **({"weights_given": list(weights)} if weights is not None else {}),
        }

    def _check_same_architecture(self, first: Checkpoint, other: Checkpoint) -> None:
        path = other.folder / "config.json"
        for key in ("model_type", "architectures"):
            if other.config.get(key) != first.config.get(key):
                raise InputError(f"{path}: {key} {other.config.get(key)!r} differs from "
                                 f"{first.folder}'s {first.config.get(key)!r}")
        if "quantization_config" in other.config:
            raise InputError(f"{path}: source is already quantized (has quantization_config)")
        differing = sorted(k for k in set(first.config) | set(other.config) if k not in self.IGNORED_CONFIG_KEYS
                           and first.config.get(k) != other.config.get(k))
        if differing:
            log.warning("%s: config differs from %s in %s; the first model's config is kept", path, first.folder,
                        ", ".join(differing))
        for name in first.names:
            if name not in other.entries:
                raise InputError(f"{other.folder}: tensor {name!r} is in {first.folder} but not here")
        for name in other.names:
            if name not in first.entries:
                raise InputError(f"{other.entries[name].file}: tensor {name!r} is not in {first.folder}")
        for name, entry in first.entries.items():
            theirs = other.entries[name]
            if tuple(theirs.shape) != tuple(entry.shape):
                raise InputError(f"{theirs.file}: tensor {name!r} has shape {list(theirs.shape)} but "
                                 f"{entry.file} has {list(entry.shape)}")
            if is_float(theirs.dtype) != is_float(entry.dtype):
                raise InputError(f"{theirs.file}: tensor {name!r} is {theirs.dtype} but {entry.file} has {entry.dtype}")
            if not is_float(entry.dtype) and not torch.equal(first.read(name), other.read(name)):
                raise InputError(f"{theirs.file}: integer tensor {name!r} differs from {entry.file}'s; only floating "
                                 f"point tensors can be averaged")

    @property
    def names(self) -> list[str]:
        return self.checkpoints[0].names

    def read(self, name: str) -> torch.Tensor:
        dtype = DTYPES[self.entries[name].dtype]
        if not dtype.is_floating_point:
            return self.checkpoints[0].read(name)
        total = None
        for ckpt, weight in zip(self.checkpoints, self.weights):
            # A copy (never write into the memory-mapped input), then in place: at most two fp32 copies at a time.
            term = ckpt.read(name).to(torch.float32, copy=True).mul_(weight)
            total = term if total is None else total.add_(term)
        return total.to(dtype)

    def origin(self, name: str) -> str:
        """The input file(s) to blame for a bad averaged tensor: those holding NaN / Inf in it, else all of them."""
        files = [ckpt.entries[name].file for ckpt in self.checkpoints]
        bad = [f for f, ckpt in zip(files, self.checkpoints) if not torch.isfinite(ckpt.read(name).float()).all()]
        return ", ".join(map(str, bad or files))

    def side_files(self) -> list[Path]:
        return self.checkpoints[0].side_files()

    def side_tree(self) -> list[tuple[str, Path]]:
        return self.checkpoints[0].side_tree()

    def input_folders(self) -> list[Path]:
        return [c.folder for c in self.checkpoints]

    def source_files(self) -> list[dict]:
        return [{**r, "name": f"model{i + 1}/{r['name']}"}
                for i, c in enumerate(self.checkpoints) for r in c.source_files()]


# ---------------------------------------------------------------------------------------------------------------
# Opening and writing


def open_source(src: str | Path | None = None, *, lora: str | Path | None = None,
                models: list[str | Path] | None = None, weights: list[float] | None = None):
    """The TensorSource the options describe: a checkpoint, a checkpoint with a LoRA folded in, or an average."""
    if models:
        if src is not None or lora is not None:
            raise InputError("--models: averages the given checkpoints; do not combine it with a base/SRC or --lora")
        return AveragedSource([Checkpoint.open(m) for m in models], weights)
    if weights is not None:
        raise InputError("--weights: only applies to --models")
    if src is None:
        raise InputError("no model given: name a base folder (SRC / --base) or average several with --models")
    base = Checkpoint.open(src)
    return LoraMergedSource(base, Adapter.open(lora)) if lora is not None else base


def merge_folder(source, out: str | Path, *, max_shard_size: int = 5 * 10**9, overwrite: bool = False,
                 progress: bool | None = None) -> dict:
    """Write `source` to OUT as a plain Hugging Face folder: tensors in their own dtype, config and tokenizer of
    the (first) base, plus qexport.json recording the merge inputs. Written to a temporary sibling and renamed
    into place when complete. Returns the manifest."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    if out.exists() and not overwrite:
        raise InputError(f"--out {out}: already exists (pass --overwrite to replace it)")
    check_not_input(out, [out], input_folders(source))
    parent = out.absolute().parent
    if parent.is_dir():
        remove_stale(parent.glob(f".{out.name}{TMP_MARK}*"))
    work = parent / f".{out.name}{TMP_MARK}{os.getpid()}"
    options = ExportOptions(formats=("original",), max_shard_size=max_shard_size, progress=progress)
    owned = None
    try:
        if parent.is_dir():  # otherwise export() reports why it cannot create it
            owned = OwnedFolder(work)
        manifest = export(source, work, options)["original"]
        replace_dir(work / "original", out, overwrite)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if owned is not None:
            owned.release()
    return manifest
