"""The verification harness: small checks over an export folder and its reference (source) folder.

Each check is a function `check_xxx(ctx) -> CheckResult`; `run_checks(export, reference, thresholds)` runs them
all in order. They read any compressed-tensors integer layout (naive-, int-, pack-quantized; 4 or 8 bits; per
channel, group or tensor) or a dense folder, written by qexport or another tool. Nothing here trusts qexport's
own manifest more than the files: the manifest is one more thing to check when it exists.

Bad input (the EXPORT path is not a model folder, the reference cannot be read) raises InputError (exit 2);
anything wrong inside the export is a failed check (exit 1).
"""

from __future__ import annotations

import json
import math
import re
import struct
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import INDEX_FILE, Checkpoint, weight_files
from .errors import InputError
from .safetensors_io import nbytes, read_header, sha256_file
from .thresholds import REGRESSIONS, Thresholds, thresholds_for

MANIFEST = "qexport.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json",
)
# Keys an exporter is expected to change in config.json; every other source key must survive unchanged.
CHANGED_BY_EXPORT = ("dtype", "torch_dtype", "quantization_config", "transformers_version")
PACKED_FORMATS = ("pack-quantized",)
UNPACKED_FORMATS = ("naive-quantized", "int-quantized")


@dataclass
class CheckResult:
    name: str
    passed: bool
    detail: str
    metrics: dict = field(default_factory=dict)
    skipped: bool = False

    @property
    def status(self) -> str:
        return "skipped" if self.skipped else ("passed" if self.passed else "FAILED")

    def as_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "passed": self.passed, "detail": self.detail,
                "metrics": self.metrics}


def _ok(name, detail, **metrics) -> CheckResult:
    return CheckResult(name, True, detail, metrics)


def _fail(name, detail, **metrics) -> CheckResult:
    return CheckResult(name, False, detail, metrics)


def _skip(name, detail) -> CheckResult:
    return CheckResult(name, True, detail, {}, skipped=True)


def _listing(items, limit: int = 4) -> str:
    items = list(items)
    shown = ", ".join(map(str, items[:limit]))
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# ---------------------------------------------------------------------------------------------------------------
# Context: what every check may look at, opened once.


class Context:
    """The export and reference folders, opened leniently (a broken export is data for the checks, not an error)."""

    def __init__(self, export_dir: str | Path, reference_dir: str | Path,
                 thresholds: Thresholds | dict | None = None):
        from .architecture import inspect_architecture

        self.export = Path(export_dir)
        if not self.export.is_dir():
            raise InputError(f"{self.export}: export is not a folder")
        if not (self.export / "config.json").exists() and not any(self.export.glob("*.safetensors")):
            formats = sorted(p.name for p in self.export.iterdir() if (p / "config.json").is_file())
            hint = f"; verify one format folder: {', '.join(str(self.export / f) for f in formats)}" if formats else ""
            raise InputError(f"{self.export}: not a model folder (no config.json and no *.safetensors){hint}")
        self.reference = Checkpoint.open(reference_dir)
        if "quantization_config" in self.reference.config:
            raise InputError(f"{self.reference.folder / 'config.json'}: --reference is itself quantized; "
                             "pass the source model the export was made from")
        self.arch = inspect_architecture(self.reference.config, self.reference.folder / "config.json")
        self.config, self.config_error = _read_json_object(self.export / "config.json")
        self.manifest, self.manifest_error = (
            _read_json_object(self.export / MANIFEST) if (self.export / MANIFEST).exists() else (None, None)
        )
        self.ckpt, self.ckpt_error = None, None
        try:
            self.ckpt = open_tensors(self.export, self.config or {})
        except InputError as e:
            self.ckpt_error = str(e)
        self.qc = (self.config or {}).get("quantization_config")
        self.format = detect_format(self.config, self.manifest)
        if isinstance(thresholds, Thresholds):
            self.thresholds = thresholds
        else:
            self.thresholds = thresholds_for(self.format, thresholds)
        self.loaded = None  # (model, loading_info) from transformers, set by check_reload
        self.load_error = None
        self._inputs = None

    @property
    def is_causal(self) -> bool:
        return self.arch.is_causal_lm

    def inputs(self) -> dict[str, torch.Tensor]:
        """Fixed inputs: token ids for causal LMs; real sentences through the reference tokenizer for encoders."""
        from .functional import encode_sentences, fixed_token_ids

        if self._inputs is None:
            if not self.is_causal and has_tokenizer(self.reference.folder):
                self._inputs = encode_sentences(self.reference.folder)
            else:
                ids = fixed_token_ids(int(self.reference.config.get("vocab_size") or 1000))
                self._inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        return self._inputs

    def outputs(self, model) -> torch.Tensor:
        """Logits [B, T, V] (causal LM) or mask-pooled embeddings [B, H] (encoder) on the fixed inputs."""
        from .functional import model_outputs, pooled_embeddings

        if self.is_causal:
            return model_outputs(model, self.inputs()["input_ids"])
        return pooled_embeddings(model, self.inputs())

    def reference_outputs(self) -> torch.Tensor:
        key = (str(self.reference.folder.resolve()), (self.reference.folder / "config.json").stat().st_mtime_ns,
               self.is_causal)
        if key not in _REFERENCE_OUTPUTS:
            from .functional import load_model

            model, _ = load_model(self.reference.folder)
            _REFERENCE_OUTPUTS.clear()  # one reference at a time: bounded memory
            _REFERENCE_OUTPUTS[key] = self.outputs(model)
        return _REFERENCE_OUTPUTS[key]

    def reload(self) -> None:
        """Load the export through transformers once (sets `loaded` or `load_error`)."""
        from .functional import load_model

        if self.loaded is None and self.load_error is None:
            try:
                self.loaded = load_model(self.export)
            except Exception as e:
                self.load_error = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"

    def dequantized_model(self):
        from .dequant import dequantized_state_dict
        from .functional import model_from_state_dict

        return model_from_state_dict(self.reference.config, dequantized_state_dict(self.ckpt))


_REFERENCE_OUTPUTS: dict = {}


def _read_json_object(path: Path):
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"{path.name} is missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{path.name} is not readable JSON ({e})"
    if not isinstance(value, dict):
        return None, f"{path.name} is not a JSON object"
    return value, None


def open_tensors(folder: Path, config: dict) -> Checkpoint:
    """The export's tensors, with index and shards checked both ways, without requiring a valid config."""
    files = weight_files(folder)
    index_path = folder / INDEX_FILE
    index = None
    if index_path.is_file():
        index = json.loads(index_path.read_text())
    entries = {}
    for path in files:
        for name, entry in read_header(path)[0].items():
            if name in entries:
                raise InputError(f"{path.name}: tensor {name!r} is also in {entries[name].file.name}")
            if index is not None and index["weight_map"].get(name) != path.name:
                raise InputError(f"{path.name}: tensor {name!r} is not in {INDEX_FILE} under this shard "
                                 f"(index says {index['weight_map'].get(name)!r})")
            entries[name] = entry
    if index is not None:
        for name, shard in index["weight_map"].items():
            if name not in entries:
                raise InputError(f"{INDEX_FILE}: tensor {name!r} is not in shard {shard!r}")
        total = (index.get("metadata") or {}).get("total_size")
        actual = sum(e.nbytes for e in entries.values())
        if isinstance(total, int) and total != actual:
            raise InputError(f"{INDEX_FILE}: metadata.total_size {total} but the shards hold {actual} tensor bytes")
    if not entries:
        raise InputError(f"{files[0].name}: holds no tensors")
    return Checkpoint(folder, config, files, entries)


def detect_format(config: dict | None, manifest: dict | None) -> str:
    """fp16 (dense), int8 or int4 from the quantization_config; the manifest's word when the config says nothing."""
    qc = (config or {}).get("quantization_config")
    if isinstance(qc, dict):
        bits = {g.get("weights", {}).get("num_bits") for g in (qc.get("config_groups") or {}).values()
                if isinstance(g, dict) and isinstance(g.get("weights"), dict)}
        if 4 in bits:
            return "int4"
        if 8 in bits:
            return "int8"
    if manifest and manifest.get("format") in ("fp16", "int8", "int4"):
        return manifest["format"]
    return "fp16"


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))


def _matches(module: str, patterns, linear: bool) -> bool:
    for pattern in patterns or []:
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], module):
                return True
        elif pattern == "Linear" and linear:
            return True
        elif module == pattern or module.endswith("." + pattern):
            return True
    return False


def weights_args(qc: dict, module: str, linear: bool = True) -> dict | None:
    """The `weights` quantization args of the config group targeting `module`, or None if it is not targeted."""
    if _matches(module, qc.get("ignore"), linear):
        return None
    for group in (qc.get("config_groups") or {}).values():
        if _matches(module, group.get("targets"), linear):
            return group.get("weights")
    return None


# ---------------------------------------------------------------------------------------------------------------
# The checks, in the order they run.


def check_model_type(ctx: Context) -> CheckResult:
    name = "model_type"
    if ctx.config is None:
        return _fail(name, f"config.json: {ctx.config_error}")
    expected = ctx.reference.config["model_type"]
    found = ctx.config.get("model_type")
    if not found:
        return _fail(name, f"config.json has no model_type (transformers says 'Unrecognized model'); "
                           f"the reference has {expected!r}")
    if found != expected:
        return _fail(name, f"config.json model_type is {found!r}, the reference has {expected!r}")
    return _ok(name, f"model_type {found!r} as in the reference")


def check_config_keys(ctx: Context) -> CheckResult:
    """Every source key survives unchanged (except dtype and the quantization config), and AutoConfig reloads it."""
    name = "config_keys"
    if ctx.config is None:
        return _fail(name, f"config.json: {ctx.config_error}")
    ref = ctx.reference.config
    missing = [k for k in ref if k not in CHANGED_BY_EXPORT and k not in ctx.config]
    changed = [k for k in ref if k not in CHANGED_BY_EXPORT and k in ctx.config and ctx.config[k] != ref[k]]
    metrics = {"missing_keys": missing, "changed_keys": changed}
    if missing or changed:
        parts = ([f"missing {_listing(missing)}"] if missing else []) + (
            [f"changed {_listing(changed)}"] if changed else [])
        return _fail(name, "config.json vs reference: " + "; ".join(parts), **metrics)
    try:
        from transformers import AutoConfig

        from .functional import quiet

        with quiet():
            reloaded = AutoConfig.from_pretrained(str(ctx.export))
    except Exception as e:
        return _fail(name, f"AutoConfig.from_pretrained fails: {type(e).__name__}: {e}", **metrics)
    if reloaded.model_type != ref["model_type"]:
        return _fail(name, f"AutoConfig reloads model_type {reloaded.model_type!r}", **metrics)
    return _ok(name, f"all {len(ref)} source keys kept; AutoConfig round trip ok", **metrics)


def check_quantization_config(ctx: Context) -> CheckResult:
    """A quantization_config that transformers loads correctly (see design.md for what goes wrong without each key)."""
    name = "quantization_config"
    if ctx.config is None:
        return _fail(name, f"config.json: {ctx.config_error}")
    qc = ctx.qc
    has_int = ctx.ckpt is not None and any(
        not e.dtype.startswith(("F", "BF")) and n.rpartition(".")[2] in ("weight", "weight_packed")
        for n, e in ctx.ckpt.entries.items())
    if qc is None:
        if has_int:
            return _fail(name, "config.json has no quantization_config but the shards hold integer weights")
        return _ok(name, "dense export: no quantization_config, no integer weights")
    if not isinstance(qc, dict):
        return _fail(name, "quantization_config is not an object")
    problems = []
    if qc.get("quant_method") != "compressed-tensors":
        problems.append(f"quant_method is {qc.get('quant_method')!r}, not 'compressed-tensors'")
    fmt = qc.get("format")
    if fmt not in PACKED_FORMATS + UNPACKED_FORMATS:
        problems.append(f"format {fmt!r} is not one of {', '.join(PACKED_FORMATS + UNPACKED_FORMATS)}")
    if qc.get("quantization_status") != "compressed":
        # Without it transformers treats the weights as not yet compressed and loads garbage without an error.
        problems.append(f"quantization_status is {qc.get('quantization_status')!r}, must be 'compressed' "
                        "(else transformers silently loads garbage)")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        problems.append("config_groups is missing or empty")
        groups = {}
    for gname, group in groups.items():
        if not isinstance(group, dict):
            problems.append(f"config_groups.{gname} is not an object")
            continue
        if not group.get("targets"):
            problems.append(f"config_groups.{gname} has no targets")
        gfmt = group.get("format")
        if gfmt is None and fmt != "pack-quantized":
            # transformers then assumes pack-quantized and fails to load int8 weights.
            problems.append(f"config_groups.{gname} has no format (it would load as pack-quantized)")
        elif gfmt is not None and gfmt != fmt:
            problems.append(f"config_groups.{gname}.format {gfmt!r} differs from format {fmt!r}")
        w = group.get("weights")
        if not isinstance(w, dict):
            problems.append(f"config_groups.{gname} has no weights args")
            continue
        if w.get("num_bits") not in (4, 8):
            problems.append(f"config_groups.{gname}.weights.num_bits {w.get('num_bits')!r} is not 4 or 8")
        if w.get("type", "int") != "int":
            problems.append(f"config_groups.{gname}.weights.type {w.get('type')!r} is not 'int'")
        strategy = w.get("strategy")
        if strategy not in ("channel", "group", "tensor"):
            problems.append(f"config_groups.{gname}.weights.strategy {strategy!r} is not channel, group or tensor")
        if strategy == "group" and not (isinstance(w.get("group_size"), int) and w["group_size"] > 0):
            problems.append(f"config_groups.{gname}.weights.group_size {w.get('group_size')!r} is not positive")
    if not isinstance(qc.get("ignore", []), list):
        problems.append("ignore is not a list")
    if problems:
        return _fail(name, "; ".join(problems))
    return _ok(name, f"compressed-tensors {fmt}, status compressed, {len(groups)} config group(s)")


def check_shards(ctx: Context) -> CheckResult:
    name = "shards"
    if ctx.ckpt is None:
        return _fail(name, ctx.ckpt_error)
    files = ctx.ckpt.files
    how = "index and shards agree both ways" if (ctx.export / INDEX_FILE).is_file() else "single file"
    return _ok(name, f"{len(files)} file(s), {len(ctx.ckpt.entries)} tensors; {how}",
               files=[p.name for p in files])


def check_manifest(ctx: Context) -> CheckResult:
    """Every file the manifest lists has its recorded size and sha256 (a byte changed after export fails here)."""
    name = "manifest"
    if ctx.manifest is None and ctx.manifest_error is None:
        return _skip(name, f"no {MANIFEST} (not written by qexport): file hashes not checked")
    if ctx.manifest is None:
        return _fail(name, f"{MANIFEST}: {ctx.manifest_error}")
    problems = []
    listed = set()
    for record in ctx.manifest.get("files", []):
        listed.add(record["name"])
        path = ctx.export / record["name"]
        if not path.is_file():
            problems.append(f"{record['name']} is listed but missing")
        elif path.stat().st_size != record.get("bytes"):
            problems.append(f"{record['name']} is {path.stat().st_size} bytes, manifest says {record.get('bytes')}")
        elif sha256_file(path) != record.get("sha256"):
            problems.append(f"{record['name']} sha256 differs from the manifest (changed after export)")
    for path in sorted(ctx.export.glob("*.safetensors")):
        if path.name not in listed:
            problems.append(f"{path.name} is not in the manifest")
    if ctx.ckpt is not None:
        for tname, info in (ctx.manifest.get("tensors") or {}).items():
            entry = ctx.ckpt.entries.get(tname)
            if entry is None:
                problems.append(f"tensor {tname!r} is in the manifest but not in the shards")
            elif (entry.dtype, list(entry.shape)) != (info.get("dtype"), info.get("shape")):
                problems.append(f"tensor {tname!r} is {entry.dtype} {list(entry.shape)}, manifest says "
                                f"{info.get('dtype')} {info.get('shape')}")
    if problems:
        return _fail(name, "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else ""),
                     problems=problems)
    return _ok(name, f"{len(listed)} files match their recorded size and sha256", files_checked=len(listed))


def check_tensor_names(ctx: Context) -> CheckResult:
    """The export stores every reference tensor (quantized or dense) once, nothing else; tied ones only once."""
    from .dequant import quantized_modules

    name = "tensor_names"
    if ctx.ckpt is None:
        return _skip(name, "shards unreadable")
    quantized = quantized_modules(ctx.ckpt)
    parts = {stored for p in quantized.values() for stored in p.values()}
    stored = {n for n in ctx.ckpt.entries if n not in parts} | {f"{m}.weight" for m in quantized}
    tied = set(ctx.arch.tied_names)
    expected = set(ctx.reference.entries) - tied
    missing, extra = sorted(expected - stored), sorted(stored - expected)
    twice = sorted(set(extra) & tied)
    extra = [n for n in extra if n not in tied]
    problems = []
    if twice:
        problems.append(f"tied tensor(s) {_listing(twice)} stored again (tie_word_embeddings: store once)")
    if missing:
        problems.append(f"missing {_listing(missing)}")
    if extra:
        problems.append(f"not in the reference: {_listing(extra)}")
    metrics = {"missing": missing, "extra": extra, "tied_stored_twice": twice}
    if problems:
        return _fail(name, "; ".join(problems), **metrics)
    return _ok(name, f"{len(stored)} tensors ({len(quantized)} quantized), as in the reference"
               + (f"; {len(tied)} tied stored once" if tied else ""), **metrics)


def _module_layout(ctx: Context, module: str, parts: dict[str, str]) -> list[str]:
    """What is wrong with one quantized module's stored tensors, given the config and the reference shape."""
    entries = ctx.ckpt.entries
    ref = ctx.reference.entries.get(f"{module}.weight")
    if ref is None or len(ref.shape) != 2:
        return [f"{module}: quantized but the reference has no 2-D {module}.weight"]
    rows, cols = ref.shape
    args = weights_args(ctx.qc or {}, module, f"{module}.weight" in ctx.arch.linear_weights)
    if args is None:
        return [f"{module}: stored quantized but no config group targets it (or it is ignored)"]
    bits, strategy, group_size = args.get("num_bits"), args.get("strategy"), args.get("group_size")
    fmt = (ctx.qc or {}).get("format")
    problems = []
    if "weight_packed" in parts:
        packed = entries[parts["weight_packed"]]
        want = (rows, math.ceil(cols * bits / 32))
        if packed.dtype != "I32" or tuple(packed.shape) != want:
            problems.append(f"{module}.weight_packed is {packed.dtype} {list(packed.shape)}, {bits}-bit packing of "
                            f"[{rows}, {cols}] is I32 {list(want)}")
        if "weight_shape" not in parts:
            problems.append(f"{module}: weight_packed without weight_shape")
        elif ctx.ckpt.read(parts["weight_shape"]).tolist() != [rows, cols]:
            problems.append(f"{module}.weight_shape is {ctx.ckpt.read(parts['weight_shape']).tolist()}, "
                            f"the reference weight is [{rows}, {cols}]")
        if fmt not in PACKED_FORMATS:
            problems.append(f"{module}: packed weights but the config format is {fmt!r}")
    elif "weight" in parts:
        codes = entries[parts["weight"]]
        if codes.dtype != "I8" or tuple(codes.shape) != (rows, cols):
            problems.append(f"{module}.weight is {codes.dtype} {list(codes.shape)}, expected I8 [{rows}, {cols}]")
        if bits is not None and bits < 8:
            problems.append(f"{module}: {bits}-bit codes stored unpacked, one per byte (8 bits per weight); "
                            "use pack-quantized")
        if fmt not in UNPACKED_FORMATS:
            problems.append(f"{module}: unpacked int8 codes but the config format is {fmt!r}")
    else:
        problems.append(f"{module}: weight_scale without weight or weight_packed")
    scale = entries.get(parts.get("weight_scale", ""))
    if scale is not None:
        if strategy == "group" and group_size:
            want = (rows, cols // group_size) if cols % group_size == 0 else None
        elif strategy == "tensor":
            want = (1,) if len(scale.shape) == 1 else (1, 1)
        else:
            want = (rows, 1)
        if want is None:
            problems.append(f"{module}: input size {cols} does not divide by group_size {group_size}")
        elif tuple(scale.shape) != want:
            problems.append(f"{module}.weight_scale is {list(scale.shape)}, {strategy} strategy needs {list(want)}")
        if not scale.dtype.startswith(("F", "BF")):
            problems.append(f"{module}.weight_scale has dtype {scale.dtype}, not floating point")
    return problems


def check_layout(ctx: Context) -> CheckResult:
    """Each quantized module stores what its config group says (bits, packing, scale shape); Linears not ignored
    are quantized (a dense one transformers would load as missing keys)."""
    from .dequant import quantized_modules

    name = "layout"
    if ctx.ckpt is None:
        return _skip(name, "shards unreadable")
    quantized = quantized_modules(ctx.ckpt)
    if not quantized:
        if ctx.qc:
            return _fail(name, "quantization_config present but no module is stored quantized")
        return _ok(name, "dense export: no quantized modules")
    if not isinstance(ctx.qc, dict):
        return _fail(name, f"{len(quantized)} modules stored quantized but config.json has no quantization_config")
    problems = []
    for module, parts in sorted(quantized.items()):
        problems += _module_layout(ctx, module, parts)
    for weight in sorted(ctx.arch.linear_weights & set(ctx.ckpt.entries)):
        module = weight.removesuffix(".weight")
        if module not in quantized and weights_args(ctx.qc, module) is not None:
            problems.append(f"{module}: a targeted Linear stored dense and not in ignore")
    if problems:
        return _fail(name, f"{len(problems)} problem(s): " + "; ".join(problems[:3])
                     + ("; ..." if len(problems) > 3 else ""), problems=problems)
    return _ok(name, f"{len(quantized)} quantized modules match the config")


def _predicted_module_bytes(ctx: Context, module: str, parts: dict[str, str]) -> int:
    """Bytes of a quantized module as its config predicts: codes at num_bits (in int32 words when packed)."""
    rows, cols = ctx.reference.entries[f"{module}.weight"].shape
    args = weights_args(ctx.qc or {}, module) or {}
    bits = args.get("num_bits", 8)
    codes = rows * math.ceil(cols * bits / 32) * 4 if bits < 8 else rows * cols
    other = sum(ctx.ckpt.entries[p].nbytes for leaf, p in parts.items() if leaf not in ("weight", "weight_packed"))
    return codes + other


def check_bytes(ctx: Context) -> CheckResult:
    """Stored bytes equal predicted bytes per tensor and per file; quantized tensors reach the ratio floor."""
    from .dequant import quantized_modules

    name = "bytes"
    if ctx.ckpt is None:
        return _skip(name, "shards unreadable")
    problems = []
    entries = ctx.ckpt.entries
    for path in ctx.ckpt.files:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
        accounted = 8 + header_len + sum(e.nbytes for e in entries.values() if e.file == path)
        if path.stat().st_size != accounted:
            problems.append(f"{path.name} is {path.stat().st_size - accounted} bytes larger than its header and "
                            "tensors account for")
    manifest_files = {r["name"]: r for r in (ctx.manifest or {}).get("files", [])}
    for path in ctx.ckpt.files:
        predicted = manifest_files.get(path.name, {}).get("predicted_bytes")
        if predicted is not None and path.stat().st_size != predicted:
            problems.append(f"{path.name} is {path.stat().st_size} bytes, predicted {predicted}")
    for tname, info in ((ctx.manifest or {}).get("tensors") or {}).items():
        if tname in entries and entries[tname].nbytes != info.get("predicted_bytes"):
            problems.append(f"tensor {tname!r} stores {entries[tname].nbytes} bytes, predicted "
                            f"{info.get('predicted_bytes')}")

    quantized = quantized_modules(ctx.ckpt)
    q_weights = q_bytes = q_predicted = 0
    for module, parts in quantized.items():
        if f"{module}.weight" not in ctx.reference.entries:
            continue  # reported by layout / tensor_names
        rows, cols = ctx.reference.entries[f"{module}.weight"].shape[:2]
        stored = sum(entries[p].nbytes for p in parts.values())
        predicted = _predicted_module_bytes(ctx, module, parts)
        if stored > predicted:
            problems.append(f"{module}: stores {stored} bytes, its config predicts {predicted}")
        q_weights, q_bytes, q_predicted = q_weights + rows * cols, q_bytes + stored, q_predicted + predicted
    weight_bytes = sum(p.stat().st_size for p in ctx.ckpt.files)
    fp16_bytes = sum(nbytes("F16", e.shape) if e.dtype.startswith(("F", "BF")) else e.nbytes
                     for n, e in ctx.reference.entries.items() if n not in ctx.arch.tied_names)
    metrics = {"weight_bytes": weight_bytes, "file_ratio": fp16_bytes / weight_bytes if weight_bytes else None,
               "quantized_weights": q_weights, "quantized_bytes": q_bytes,
               "quantized_ratio": 2 * q_weights / q_bytes if q_bytes else None,
               "bits_per_quantized_weight": 8 * q_bytes / q_weights if q_weights else None}
    floor = ctx.thresholds.min_quantized_ratio
    if q_bytes and floor is not None:
        # A config with smaller groups (another tool's g32) predicts a lower ratio; hold it to its own prediction.
        required = min(floor, 2 * q_weights / q_predicted)
        metrics["required_ratio"] = required
        if metrics["quantized_ratio"] < required - 1e-9:
            problems.append(f"quantized tensors compress {metrics['quantized_ratio']:.3f}x vs fp16, need >= "
                            f"{required:.3f}x ({metrics['bits_per_quantized_weight']:.3f} bits per weight)")
    if problems:
        return _fail(name, "; ".join(problems[:4]) + ("; ..." if len(problems) > 4 else ""), problems=problems,
                     **metrics)
    ratio = f"quantized {metrics['quantized_ratio']:.3f}x, " if q_bytes else ""
    return _ok(name, f"stored == predicted; {ratio}whole files {metrics['file_ratio']:.3f}x vs fp16", **metrics)


def check_weights(ctx: Context) -> CheckResult:
    """Per-tensor SQNR of the dequantized export vs the reference weights (scales off, nibbles swapped, ...)."""
    from .dequant import iter_dequantized
    from .functional import sqnr_db

    name = "weights_sqnr"
    if ctx.ckpt is None:
        return _skip(name, "shards unreadable")
    quantized_sqnr, dense_sqnr, problems = {}, {}, []
    for tname, w_hat, is_quantized in iter_dequantized(ctx.ckpt, torch.float32):
        if tname not in ctx.reference.entries:
            continue
        w = ctx.reference.read(tname)
        if tuple(w.shape) != tuple(w_hat.shape):
            problems.append(f"{tname}: shape {list(w_hat.shape)}, reference {list(w.shape)}")
            continue
        if w_hat.is_floating_point() and not torch.isfinite(w_hat).all():
            problems.append(f"{tname}: dequantizes to NaN/Inf")
            continue
        if not w.is_floating_point():
            if not torch.equal(w, w_hat):
                problems.append(f"{tname}: integer tensor differs from the reference")
            continue
        (quantized_sqnr if is_quantized else dense_sqnr)[tname] = sqnr_db(w.float(), w_hat)
    thr = ctx.thresholds
    metrics = {"per_tensor_sqnr_db": {k: round(v, 3) for k, v in quantized_sqnr.items()}}
    if quantized_sqnr:
        values = sorted(quantized_sqnr.values())
        worst = min(quantized_sqnr, key=quantized_sqnr.get)
        metrics.update(sqnr_min_db=values[0], sqnr_median_db=values[len(values) // 2], sqnr_worst=worst)
        if thr.min_sqnr_db is not None and values[0] < thr.min_sqnr_db:
            low = sorted(k for k, v in quantized_sqnr.items() if v < thr.min_sqnr_db)
            problems.append(f"{len(low)} quantized tensor(s) below {thr.min_sqnr_db} dB SQNR, worst {worst} at "
                            f"{values[0]:.2f} dB")
    if dense_sqnr:
        worst = min(dense_sqnr, key=dense_sqnr.get)
        metrics["dense_sqnr_min_db"] = dense_sqnr[worst]
        if dense_sqnr[worst] < thr.dense_min_sqnr_db:
            problems.append(f"dense tensor {worst} at {dense_sqnr[worst]:.2f} dB SQNR (need >= "
                            f"{thr.dense_min_sqnr_db} dB: it should be the reference rounded to fp16)")
    if problems:
        return _fail(name, "; ".join(problems[:3]), **metrics)
    if quantized_sqnr:
        return _ok(name, f"SQNR min {metrics['sqnr_min_db']:.2f} dB (>= {thr.min_sqnr_db}), median "
                         f"{metrics['sqnr_median_db']:.2f} dB over {len(quantized_sqnr)} quantized tensors", **metrics)
    return _ok(name, f"{len(dense_sqnr)} dense tensors match the reference (>= {thr.dense_min_sqnr_db} dB)", **metrics)


def _side_files(folder: Path) -> dict[str, Path]:
    skip = {"config.json", INDEX_FILE, MANIFEST}
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel not in skip and not rel.startswith(".") and not rel.endswith(
                (".safetensors", ".bin", ".pt", ".pth", ".ckpt")):
            out[rel] = path
    return out


def _is_tokenizer_file(rel: str) -> bool:
    return rel in TOKENIZER_FILES or rel.startswith("tokenizer")


def _compare_files(ctx: Context, name: str, wanted: Callable[[str], bool], strict: bool) -> CheckResult:
    ref = {rel: p for rel, p in _side_files(ctx.reference.folder).items() if wanted(rel)}
    if not ref:
        return _skip(name, "the reference has none")
    missing = [rel for rel in ref if not (ctx.export / rel).is_file()]
    changed = [rel for rel in ref if rel not in missing and sha256_file(ref[rel]) != sha256_file(ctx.export / rel)]
    metrics = {"missing": missing, "changed": changed}
    if missing or (strict and changed):
        parts = ([f"missing {_listing(missing)}"] if missing else []) + (
            [f"differs from the reference: {_listing(changed)}"] if strict and changed else [])
        return _fail(name, "; ".join(parts), **metrics)
    note = f" ({len(changed)} rewritten: {_listing(changed)})" if changed else ""
    return _ok(name, f"all {len(ref)} reference files present{'' if changed else ' and identical'}{note}", **metrics)


def check_tokenizer_files(ctx: Context) -> CheckResult:
    return _compare_files(ctx, "tokenizer_files", _is_tokenizer_file, strict=True)


def check_side_files(ctx: Context) -> CheckResult:
    """Generation config, READMEs, sentence-transformers modules: present (other tools may rewrite READMEs)."""
    return _compare_files(ctx, "side_files", lambda rel: not _is_tokenizer_file(rel), strict=False)


def check_tokenizer(ctx: Context) -> CheckResult:
    """The export's tokenizer loads and encodes real text exactly as the reference's does."""
    from .functional import SENTENCES, quiet

    name = "tokenizer"
    if not has_tokenizer(ctx.reference.folder):
        return _skip(name, "the reference has no tokenizer")
    from transformers import AutoTokenizer

    texts = list(SENTENCES[:6]) + ["Unicode: naïve café — 東京 🙂", "  leading spaces\tand\ttabs\n"]
    try:
        with quiet():
            ref = AutoTokenizer.from_pretrained(str(ctx.reference.folder))
            ours = AutoTokenizer.from_pretrained(str(ctx.export))
    except Exception as e:
        return _fail(name, f"AutoTokenizer.from_pretrained(export) fails: {type(e).__name__}: {e}")
    for text in texts:
        if ref(text)["input_ids"] != ours(text)["input_ids"]:
            return _fail(name, f"encodes {text!r} differently from the reference")
    if getattr(ref, "chat_template", None) != getattr(ours, "chat_template", None):
        return _fail(name, "chat template differs from the reference")
    return _ok(name, f"{type(ours).__name__} encodes {len(texts)} texts as the reference does")


def check_reload(ctx: Context) -> CheckResult:
    """transformers loads the export with empty missing / unexpected / mismatched key lists."""
    name = "reload"
    ctx.reload()
    if ctx.loaded is None:
        return _fail(name, f"transformers cannot load it: {ctx.load_error}", reload_ok=False)
    info = ctx.loaded[1]
    nonempty = {k: v for k, v in info.items() if v}
    if nonempty:
        detail = "; ".join(f"{k}: {_listing(v, 3)}" for k, v in nonempty.items())
        return _fail(name, f"loads, but loading info is not empty (weights are garbage): {detail}",
                     reload_ok=False, loading_info=info)
    return _ok(name, f"{type(ctx.loaded[0]).__name__} loads with empty loading info", reload_ok=True)


def check_reload_matches_dequant(ctx: Context) -> CheckResult:
    """transformers' decompression and qexport's own reading of the files give the same outputs."""
    name = "reload_matches_dequant"
    ctx.reload()
    if ctx.loaded is None or ctx.ckpt is None:
        return _skip(name, "needs a reloaded model and readable shards")
    loaded = ctx.outputs(ctx.loaded[0])
    ours = ctx.outputs(ctx.dequantized_model())
    diff = (loaded - ours).abs().max().item()
    limit = ctx.thresholds.reload_max_abs_diff
    metrics = {"reload_vs_dequant_max_abs": diff, "bit_exact": bool(torch.equal(loaded, ours))}
    if not diff <= limit:
        return _fail(name, f"reloaded outputs differ from our dequantization by {diff:.3g} (> {limit:g})", **metrics)
    return _ok(name, "reloaded outputs " + ("equal our dequantization bit for bit" if metrics["bit_exact"]
                                            else f"within {diff:.3g} of our dequantization"), **metrics)


def check_functional(ctx: Context) -> CheckResult:
    """Next-token KLD / top-1 (causal LM) or pooled-embedding cosine (encoder) vs the reference model."""
    from .functional import compare

    name = "functional"
    ctx.reload()
    if ctx.loaded is not None:
        model, source = ctx.loaded[0], "reloaded model"
    elif ctx.ckpt is not None:
        model, source = ctx.dequantized_model(), "own dequantization (reload failed)"
    else:
        return _skip(name, "no model: reload failed and shards unreadable")
    agreement = compare(ctx.reference_outputs(), ctx.outputs(model))
    metrics = {k: v for k, v in agreement.as_dict().items() if v is not None}
    thr = ctx.thresholds
    bounds = [("kld_mean", thr.max_kld_mean, False), ("kld_p99", thr.max_kld_p99, False),
              ("top1", thr.min_top1, True)] if ctx.is_causal else [("cosine", thr.min_cosine, True)]
    problems = []
    for key, limit, at_least in bounds:
        value = metrics.get(key)
        if limit is None or value is None:
            continue
        if (value < limit) if at_least else (value > limit):
            problems.append(f"{key} {value:.4g} {'<' if at_least else '>'} {limit:g}")
    shown = ", ".join(f"{k} {metrics[k]:.4g}" for k, _, _ in bounds if k in metrics)
    if problems:
        return _fail(name, f"{source}: " + "; ".join(problems), **metrics)
    return _ok(name, f"{source}: {shown}", **metrics)


CHECKS: list[Callable[[Context], CheckResult]] = [
    check_model_type, check_config_keys, check_quantization_config, check_shards, check_manifest,
    check_tensor_names, check_layout, check_bytes, check_weights, check_tokenizer_files, check_side_files,
    check_tokenizer, check_reload, check_reload_matches_dequant, check_functional,
]
CHECK_NAMES = [
    "model_type", "config_keys", "quantization_config", "shards", "manifest", "tensor_names", "layout", "bytes",
    "weights_sqnr", "tokenizer_files", "side_files", "tokenizer", "reload", "reload_matches_dequant", "functional",
]


def _run_one(check: Callable[[Context], CheckResult], name: str, ctx: Context) -> CheckResult:
    try:
        return check(ctx)
    except Exception as e:  # a malformed export can break a check's assumptions: that is a failure, not a crash
        where = traceback.extract_tb(e.__traceback__)[-1]
        return _fail(name, f"check raised {type(e).__name__}: {' '.join(str(e).split())[:300]} "
                           f"({Path(where.filename).name}:{where.lineno})")


# ---------------------------------------------------------------------------------------------------------------
# Running and summarising.

SUMMARY_KEYS = ("weight_bytes", "file_ratio", "quantized_ratio", "bits_per_quantized_weight", "sqnr_min_db",
                "sqnr_median_db", "kld_mean", "kld_p99", "kld_max", "top1", "cosine", "max_abs_diff", "reload_ok")


@dataclass
class Verification:
    export: Path
    reference: Path
    format: str
    thresholds: Thresholds
    checks: list[CheckResult]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed]

    @property
    def metrics(self) -> dict:
        """The headline numbers (report table, baselines), flattened from the checks."""
        out = {"format": self.format}
        for check in self.checks:
            for key in SUMMARY_KEYS:
                if key in check.metrics and key not in out:
                    out[key] = check.metrics[key]
        return out

    def add(self, check: CheckResult) -> None:
        self.checks.append(check)

    def as_dict(self) -> dict:
        import dataclasses

        return {"export": str(self.export), "reference": str(self.reference), "format": self.format,
                "passed": self.passed, "metrics": self.metrics, "thresholds": dataclasses.asdict(self.thresholds),
                "checks": [c.as_dict() for c in self.checks]}


def verify(export_dir: str | Path, reference_dir: str | Path, thresholds: Thresholds | dict | None = None,
           only: list[str] | None = None) -> Verification:
    """Run the checks (all, or those named in `only`) and return them with the headline metrics."""
    ctx = Context(export_dir, reference_dir, thresholds)
    results = []
    for check, name in zip(CHECKS, CHECK_NAMES):
        if only is None or name in only:
            results.append(_run_one(check, name, ctx))
    return Verification(ctx.export, ctx.reference.folder, ctx.format, ctx.thresholds, results)


def record_in_card(result: Verification) -> None:
    """Write the checks into the export's README.md model card and qexport.json (folders qexport wrote)."""
    from .card import update_card_verification, verification_result
    from .errors import InputError

    if not (result.export / "qexport.json").is_file():
        raise InputError(f"--write-card: {result.export} has no qexport.json (only qexport exports carry a card)")
    checks = [{"name": c.name, "value": c.detail, "passed": None if c.skipped else c.passed} for c in result.checks]
    update_card_verification(result.export, verification_result("qexport verify", checks,
                                                                reference=str(result.reference)))


def run_checks(export_dir: str | Path, reference_dir: str | Path,
               thresholds: Thresholds | dict | None = None) -> list[CheckResult]:
    return verify(export_dir, reference_dir, thresholds).checks


def load_baseline(path: str | Path) -> dict:
    data, error = _read_json_object(Path(path))
    if data is None:
        raise InputError(f"--baseline {path}: {error}")
    metrics = data.get("metrics", data)
    if not isinstance(metrics, dict):
        raise InputError(f"--baseline {path}: 'metrics' is not an object")
    return metrics


def check_baseline(metrics: dict, baseline: dict) -> CheckResult:
    """Each metric with a regression rule may move in the bad direction by at most its stated tolerance."""
    name = "baseline"
    if baseline.get("format") not in (None, metrics.get("format")):
        raise InputError(f"--baseline: it is for format {baseline.get('format')!r}, this export is "
                         f"{metrics.get('format')!r}")
    regressions, compared = [], {}
    for key, rule in REGRESSIONS.items():
        old, new = baseline.get(key), metrics.get(key)
        if not isinstance(old, (int, float)) or not isinstance(new, (int, float)):
            continue
        worse = (old - new) if rule.higher_is_better else (new - old)
        compared[key] = {"baseline": old, "now": new, "allowed": rule.allowed(old)}
        if worse > rule.allowed(old):
            regressions.append(f"{key} {old:.6g} -> {new:.6g} (allowed {'-' if rule.higher_is_better else '+'}"
                               f"{rule.allowed(old):.3g})")
    if not compared:
        return _fail(name, "no metric in common with the baseline")
    if regressions:
        return _fail(name, "regressed: " + "; ".join(regressions), compared=compared)
    return _ok(name, f"{len(compared)} metrics within tolerance of the baseline", compared=compared)
