"""What every verify check sees: the export and reference folders opened once, and the result type.

Each check (in the sibling modules) is a function `check_xxx(ctx) -> CheckResult`; `run_checks(export, reference, thresholds)` runs them
all in order. They read any compressed-tensors integer layout (naive-, int-, pack-quantized; 4 or 8 bits; per
channel, group or tensor) or a dense folder, written by qexport or another tool. Nothing here trusts qexport's
own manifest more than the files: the manifest is one more thing to check when it exists.

Bad input (the EXPORT path is not a model folder, the reference cannot be read) raises InputError (exit 2);
anything wrong inside the export is a failed check (exit 1).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qexport.io import json_paths, safe_fs

from qexport.io import folder_transaction, untrusted_regex
from qexport.io.checkpoint import INDEX_FILE, MANIFEST_FILE, PICKLE_SUFFIXES, Checkpoint, weight_files
from qexport.report.card import CARD_FILE
from qexport.errors import InputError, not_a_model_folder
from qexport.io.safetensors_file import read_header, sha256_file
from qexport.verify.thresholds import Thresholds, thresholds_for

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
    # The thresholds this check compared against, as `threshold_entries` describes them (set by the runner).
    thresholds: list[dict] = field(default_factory=list)
    seconds: float | None = None  # wall time the check took (set by the runner)

    @property
    def status(self) -> str:
        return "skipped" if self.skipped else ("passed" if self.passed else "FAILED")

    def as_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "passed": self.passed, "detail": self.detail,
                "metrics": self.metrics, "thresholds": self.thresholds, "seconds": self.seconds}


def ok(name, detail, **metrics) -> CheckResult:
    return CheckResult(name, True, detail, metrics)


def fail(name, detail, **metrics) -> CheckResult:
    return CheckResult(name, False, detail, metrics)


def skip(name, detail) -> CheckResult:
    return CheckResult(name, True, detail, {}, skipped=True)


def listing(items, limit: int = 4) -> str:
    items = list(items)
    shown = ", ".join(map(str, items[:limit]))
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# ---------------------------------------------------------------------------------------------------------------
# Context: what every check may look at, opened once.


def _size_and_sha256(path: Path, root: Path) -> tuple[int, str] | None:
    """(bytes, sha256) of a regular file inside `root`; None if there is none or it cannot be read."""
    try:
        with safe_fs.open_regular(path, root) as f:
            size = os.fstat(f.fileno()).st_size
        return size, sha256_file(path, root=root)
    except (OSError, InputError):
        return None


def _tokenizer_problem(*folders: Path) -> str | None:
    """The first folder's tokenizer.json that the tokenizers library cannot load and run on verify's texts."""
    from qexport.io import tokenizer_probe
    from qexport.verify.functional import SENTENCES

    texts = [*SENTENCES, "Unicode: naïve café — 東京 🙂", "  leading spaces\tand\ttabs\n"]
    return next((p for p in (tokenizer_probe.problem(folder, texts) for folder in folders) if p), None)


class Context:
    """The export and reference folders, opened leniently (a broken export is data for the checks, not an error)."""

    def __init__(self, export_dir: str | Path, reference_dir: str | Path,
                 thresholds: Thresholds | dict | None = None, threads: int | None = None):
        from qexport.model.architecture import inspect_architecture
        from qexport.verify.threads import verify_threads

        self.export = Path(export_dir)
        if not self.export.is_dir():
            raise InputError(f"{self.export}: export is not a folder")
        if (error := not_a_model_folder(self.export, "verify")) is not None:
            raise error
        pickles = sorted(p.name for p in self.export.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise InputError(f"{self.export / pickles[0]}: pickle weights in the export; verify never lets "
                             f"transformers unpickle a file (convert to safetensors first)")
        # Nothing outside the two folders is read, by us or by transformers: links out and special files refused.
        export_tree = safe_fs.walk_files(self.export, self.export)
        self.reference = Checkpoint.open(reference_dir)
        safe_fs.walk_files(self.reference.folder, self.reference.folder)
        # What the folders' JSON files would make a library run or read (check_safe_to_load reports it; no check
        # hands such a folder to a library), and hard links in the export (a file it may share with the outside).
        self.unsafe = {"export": json_paths.folder_findings(self.export),
                       "reference": json_paths.folder_findings(self.reference.folder)}
        self.hard_links = json_paths.hard_linked(export_tree)
        # Before transformers loads a tokenizer here: a tokenizer.json whose regular expression panics the Rust
        # library or runs for minutes is found in a child process and fails the checks that need the tokenizer.
        self.tokenizer_problem = _tokenizer_problem(self.reference.folder, self.export)
        if "quantization_config" in self.reference.config:
            raise InputError(f"{self.reference.folder / 'config.json'}: --reference is itself quantized; "
                             "pass the source model the export was made from")
        self.arch = inspect_architecture(self.reference.config, self.reference.folder / "config.json")
        self.config, self.config_error = read_json_object(self.export / "config.json")
        # Read with the card under the folder's lock, after finishing a `--write-card` a killed run left: another
        # run's card and manifest are seen both old or both new (check_manifest compares this card, not a later one)
        with folder_transaction.settled(self.export):
            self.manifest, self.manifest_error = (
                read_json_object(self.export / MANIFEST_FILE) if (self.export / MANIFEST_FILE).exists() else (None, None)
            )
            self.card_record = _size_and_sha256(self.export / CARD_FILE, self.export)
        self.ckpt, self.ckpt_error = None, None
        try:
            self.ckpt = open_tensors(self.export, self.config or {})
        except InputError as e:
            self.ckpt_error = str(e)
        self.qc = (self.config or {}).get("quantization_config")
        # transformers and compressed-tensors match these with `re`, without a time limit, when reloading
        untrusted_regex.check_quantization_config(self.qc, f"{self.export / 'config.json'}: quantization_config")
        self.format = detect_format(self.config, self.manifest)
        self.defaults = thresholds_for(self.format)  # what reports compare the thresholds in use with
        if isinstance(thresholds, Thresholds):
            self.thresholds = thresholds
        else:
            self.thresholds = thresholds_for(self.format, thresholds)
        self._load = None  # (dtype, (model, loading_info)): one transformers load of the export at a time
        self._info = None  # ("ok", (meta model, loading_info)) or ("error", why): `load_info`
        # which model ran how: role ("reference", "export float32", ...) -> None (streamed) or why it was loaded whole
        self.streaming: dict[str, str | None] = {}
        self.load_errors: dict[torch.dtype, str] = {}
        self._inputs = None
        self.input_kind = None  # "text", "sentences" or "random", set by inputs()
        self.candidate = None  # (outputs, which model, its dtype) of the export, set by check_functional
        self.on_step = None  # on_step(done, total, unit): a long check's progress (verify() sets it per check)
        # forward passes run this many windows at once, each on one torch thread: metrics independent of it
        self.threads = threads if threads is not None else verify_threads().threads

    def step(self, done: int, total: int, unit: str) -> None:
        """A check that walks tensors (or windows, files) reports `done` of `total` so far."""
        if self.on_step is not None:
            self.on_step(done, total, unit)

    @property
    def is_causal(self) -> bool:
        return self.arch.is_causal_lm

    def inputs(self) -> dict[str, torch.Tensor]:
        """Fixed inputs, tokenized with the reference's tokenizer when it has one (`input_kind` says which):
        "text": the shipped English text in windows (causal LM); "sentences": real sentences (encoder);
        "random": seeded random token ids (no tokenizer)."""
        from qexport.verify.functional import encode_sentences, fixed_token_ids, text_windows

        if self._inputs is None:
            if self.tokenizer_problem is not None:
                raise RuntimeError(self.tokenizer_problem)
            folder = self.reference.folder
            if has_tokenizer(folder) and self.is_causal:
                ids, self.input_kind = text_windows(folder), "text"
            elif has_tokenizer(folder):
                self._inputs, self.input_kind = encode_sentences(folder), "sentences"
                return self._inputs
            else:
                ids = fixed_token_ids(int(self.reference.config.get("vocab_size") or 1000))
                self.input_kind = "random"
            self._inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        return self._inputs

    def outputs(self, model, windows: int | None = None, label: str = "the export"):
        """Logits of a causal LM as LogitWindows (one forward pass per window, each window's logits in a temporary
        file: never all windows of several models in memory) or mask-pooled embeddings [B, H] of an encoder, on
        the fixed inputs (the first `windows` rows only, when given). Progress counts "windows through LABEL
        (DTYPE)": a check that runs several models says which one each count is of."""
        from qexport.verify.functional import dtype_name, pooled_embeddings, window_logits

        inputs = {k: v[:windows] for k, v in self.inputs().items()}
        if self.is_causal:
            params = getattr(model, "parameters", None)
            dtype = next((p.dtype for p in params() if p.is_floating_point()), None) if callable(params) else None
            unit = f"windows through {label}" + (f" ({dtype_name(dtype)})" if dtype is not None else "")
            return window_logits(model, inputs["input_ids"], lambda done, total: self.step(done, total, unit),
                                 threads=self.threads)
        return pooled_embeddings(model, inputs)

    def reference_outputs(self):
        """The reference model's outputs (see `outputs`), computed once per reference and cached: the model run
        streamed (model.streamed: one decoder block's parameters in memory at a time, read from the reference's
        shards), or loaded whole where the architecture does not allow it (`streaming["reference"]` says why)."""
        key = (str(self.reference.folder.resolve()), (self.reference.folder / "config.json").stat().st_mtime_ns,
               self.is_causal)
        if key not in _REFERENCE_OUTPUTS:
            from qexport.verify import functional

            self.unload()  # the reference model never sits in memory next to a load of the export
            _REFERENCE_OUTPUTS.clear()  # one reference at a time: bounded memory (and disk)
            self.inputs()  # the tokenizer loads before the model, not next to it
            ckpt = Checkpoint.open(self.reference.folder)
            _REFERENCE_OUTPUTS[key] = self.run_streamed(
                lambda: functional.streamed(ckpt.config, functional.reference_source(ckpt)),
                lambda: functional.load_streamed(self.reference.folder),  # tensor by tensor: the model once
                label="the reference")
        outputs, note = _REFERENCE_OUTPUTS[key]
        self.streaming["reference"] = note
        return outputs

    def rtn_outputs(self, dtype=torch.float32):
        """Outputs of the reference quantized by round-to-nearest with the export's declared scheme
        (reference_quant), streamed like `reference_outputs`; cached per reference and scheme. Raises
        UnsupportedScheme."""
        import json as _json

        from qexport.verify import functional, reference_quant

        key = (str(self.reference.folder.resolve()), (self.reference.folder / "config.json").stat().st_mtime_ns,
               _json.dumps(self.qc, sort_keys=True, default=str), str(dtype))
        if key not in _RTN_OUTPUTS:
            self.unload()  # nor does the round-to-nearest model
            _RTN_OUTPUTS.clear()  # one at a time: bounded memory
            self.inputs()
            ckpt = Checkpoint.open(self.reference.folder)
            transform = reference_quant.rtn_transform(self.qc, self.arch, dtype)  # raises UnsupportedScheme before any run
            _RTN_OUTPUTS[key] = self.run_streamed(
                lambda: functional.streamed(ckpt.config, functional.reference_source(ckpt), dtype, transform),
                lambda: reference_quant.rtn_model(self.reference.folder, self.qc, dtype=dtype),
                label="round-to-nearest")
        outputs, note = _RTN_OUTPUTS[key]
        self.streaming["round-to-nearest"] = note
        return outputs

    def run_streamed(self, streamed, whole, run=None, windows: int | None = None, label: str = "the export"):
        """(outputs, None) of `run(model)` (default: `outputs`) on the model `streamed()` builds; where it cannot be
        built or run streamed (NotStreamable, or a module that reads parameters outside its forward), the same
        on the model `whole()` loads, and the reason as the note: (outputs, "whole-model load: why")."""
        from qexport.verify import functional

        run = run or (lambda model: self.outputs(model, windows, label=label))
        try:
            model = streamed()
            try:
                return run(model), None
            finally:
                del model
                release_memory()
        except functional.STREAMING_ERRORS as e:
            note = f"whole-model load: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
        model = whole()
        try:
            return run(model), note
        finally:
            del model
            release_memory()

    def export_outputs(self, dtype: torch.dtype, run=None, windows: int | None = None):
        """(outputs, note) of the export as transformers computes it when it loads the folder in `dtype`, streamed
        (functional.transformers_source: compressed-tensors' own decompression, one module at a time), or None if
        transformers cannot load it (reason in `load_errors[dtype]`). Streamed only where transformers' loading
        info is empty: otherwise what it computes depends on what it left uninitialised, so the export is loaded
        whole (and the note says so)."""
        from qexport.verify import functional

        if dtype in self.load_errors:
            return None
        info = self.load_info()
        if info is None:
            self.load_errors[dtype] = self.info_error
            return None
        if any(info.values()):
            note = "whole-model load: transformers' loading info is not empty"
        elif self.ckpt is None:
            note = f"whole-model load: shards unreadable ({self.ckpt_error})"
        else:
            config, ckpt = self.config, self.ckpt  # what transformers builds and reads: the export's own

            def streamed():
                return functional.streamed(config, functional.transformers_source(ckpt, dtype), dtype)

            def whole():
                loaded = self.load(dtype)
                if loaded is None:
                    raise _LoadFailed()
                return loaded[0]

            try:
                outputs, note = self.run_streamed(streamed, whole, run, windows)
            except _LoadFailed:
                return None
            self.streaming[f"export {str(dtype).removeprefix('torch.')}"] = note
            return outputs, note
        loaded = self.load(dtype)
        if loaded is None:
            return None
        outputs = (run or (lambda model: self.outputs(model, windows)))(loaded[0])
        del loaded
        self.streaming[f"export {str(dtype).removeprefix('torch.')}"] = note
        return outputs, note

    def load_info(self) -> dict | None:
        """transformers' loading info (missing / unexpected / mismatched keys) of the export, from a
        `from_pretrained` onto the `meta` device (no weight in memory); None if it cannot load (`info_error`)."""
        from qexport.verify.functional import load_model

        if self._info is None:
            try:
                self._info = ("ok", load_model(self.export, torch.float32, meta=True))
            except Exception as e:
                self._info = ("error", f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
        return self._info[1][1] if self._info[0] == "ok" else None

    @property
    def loaded_class(self) -> str | None:
        """The class transformers loads the export as (from `load_info`)."""
        self.load_info()
        return type(self._info[1][0]).__name__ if self._info[0] == "ok" else None

    @property
    def info_error(self) -> str | None:
        self.load_info()
        return self._info[1] if self._info[0] == "error" else None

    def dequantized_outputs(self, windows: int | None = None):
        """(outputs, note) of our own dequantization of the export's shards in the reference architecture,
        float32: streamed (functional.dequantized_source), or `dequantized_model` where that cannot run."""
        from qexport.verify import functional

        self.unload()
        outputs, note = self.run_streamed(
            lambda: functional.streamed(self.reference.config, self.dequantized_source()),
            self.dequantized_model, windows=windows, label="own dequantization")
        self.streaming["own dequantization"] = note
        return outputs, note

    def dequantized_source(self):
        """Our own dequantization of the export's shards as a streamed source (functional.dequantized_source), in
        the arithmetic `dequantized_model` uses."""
        from qexport.verify import functional

        route = isinstance(self.qc, dict) and self.qc.get("dequantize")
        return functional.dequantized_source(self.ckpt, self.config_dtype if route else torch.float32)

    def whole_model_note(self, *roles: str) -> str:
        """"; ROLE: whole-model load: why" for each of `roles` that was not run streamed (empty if all were)."""
        notes = [f"{role}: {self.streaming[role]}" for role in roles if self.streaming.get(role)]
        return "".join(f"; {note}" for note in notes)

    @property
    def config_dtype(self) -> torch.dtype:
        """The dtype transformers loads this export in by default: config.json's `dtype` / `torch_dtype`."""
        from qexport.verify.functional import config_dtype

        return config_dtype(self.config or {})

    def load(self, dtype: torch.dtype):
        """(model, loading_info) of the export loaded through transformers in `dtype`, or None (the reason in
        `load_errors[dtype]`). Only the latest load is kept: loading another dtype drops the previous model
        first, so two copies of a large model never sit in memory together."""
        from qexport.verify.functional import load_model

        if self._load is not None and self._load[0] == dtype:
            return self._load[1]
        if dtype in self.load_errors:
            return None
        self.unload()
        try:
            self._load = (dtype, load_model(self.export, dtype))
        except Exception as e:
            self.load_errors[dtype] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            return None
        return self._load[1]

    def unload(self) -> None:
        """Drop the loaded export (the next `load` loads it again) before another model is built."""
        self._load = None
        release_memory()

    def reload(self) -> None:
        """Load the export in float32 (the exactness checks compare it with our own float32 dequantization)."""
        self.load(torch.float32)

    @property
    def loaded(self):
        """(model, loading_info) of the float32 load, or None if transformers cannot load the export."""
        return self.load(torch.float32)

    @property
    def load_error(self) -> str | None:
        return self.load_errors.get(torch.float32)

    def user_load(self):
        """(model, loading_info) loaded the way users load it: in the dtype config.json names."""
        return self.load(self.config_dtype)

    def dequantized_model(self):
        """Our own dequantization of the export's shards in the reference architecture, float32, built one tensor
        at a time (functional.model_from_tensors: the model once plus one module's tensors in flight). The
        caller frees it (`del`) when done; nothing here keeps a reference."""
        from qexport.quant.dequant import dequantized_count, iter_dequantized
        from qexport.verify.functional import dtype_name, model_from_tensors

        # transformers' dequantize route (CompressedTensorsConfig dequantize=True) multiplies codes and scales in
        # the scale dtype while loading, then casts: do the same to compare bit for bit.
        route = isinstance(self.qc, dict) and self.qc.get("dequantize")
        dtype, total = (self.config_dtype if route else torch.float32), dequantized_count(self.ckpt)

        def tensors():
            for done, (name, t, _) in enumerate(iter_dequantized(self.ckpt, dtype), 1):
                self.step(done, total, f"tensors of the export dequantized ({dtype_name(dtype)})")
                yield name, (t.float() if t.is_floating_point() else t)

        self.unload()
        return model_from_tensors(self.reference.config, tensors)


def release_memory() -> None:
    """Collect the freed model's reference cycles and hand glibc's free pages back to the system, so that the
    next model loads into memory the previous one returned (resident memory stays at one model)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


class _LoadFailed(Exception):
    """transformers could not load the export whole (the reason is in `Context.load_errors`)."""


_REFERENCE_OUTPUTS: dict = {}
_RTN_OUTPUTS: dict = {}


def json_equal(a, b) -> bool:
    """Equality of parsed JSON values in which NaN equals NaN (json reads a NaN literal as float("nan"), and
    nan != nan would make a faithful copy of a config holding one look changed)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):  # JSON true is not 1
        return a is b
    return a == b


def read_json_object(path: Path):
    import os

    if not os.path.lexists(path):
        return None, f"{path.name} is missing"
    try:
        value = safe_fs.load_json(path, path.name)
    except InputError as e:  # the checks put the file's name first: "config.json: config.json is not valid JSON"
        return None, " ".join(str(e).removeprefix(f"{path}: ").split())[:300]
    if not isinstance(value, dict):
        return None, f"{path.name} is not a JSON object"
    return value, None


def open_tensors(folder: Path, config: dict) -> Checkpoint:
    """The export's tensors, with index and shards checked both ways, without requiring a valid config."""
    files = weight_files(folder)
    index_path = folder / INDEX_FILE
    # weight_files read the index (a JSON object with a non-empty weight_map object) and every shard it lists
    index = safe_fs.load_json(index_path, INDEX_FILE) if index_path.exists() else None
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
        metadata = index.get("metadata")
        total = metadata.get("total_size") if isinstance(metadata, dict) else None
        actual = sum(e.nbytes for e in entries.values())
        if isinstance(total, int) and total != actual:
            raise InputError(f"{INDEX_FILE}: metadata.total_size {total} but the shards hold {actual} tensor bytes")
    if not entries:
        raise InputError(f"{files[0].name}: holds no tensors")
    return Checkpoint(folder, config, files, entries)


def detect_format(config: dict | None, manifest: dict | None) -> str:
    """fp16 (dense), int8, int4 or int4-asym (4 bits with `symmetric: false`: zero points) from the
    quantization_config; the manifest's word when the config says nothing."""
    qc = (config or {}).get("quantization_config")
    if isinstance(qc, dict) and isinstance(qc.get("config_groups"), dict):
        weights = [g["weights"] for g in qc["config_groups"].values()
                   if isinstance(g, dict) and isinstance(g.get("weights"), dict)
                   and isinstance(g["weights"].get("num_bits"), int)]
        four = [w for w in weights if w["num_bits"] == 4]
        if four:
            return "int4-asym" if any(w.get("symmetric") is False for w in four) else "int4"
        if any(w["num_bits"] == 8 for w in weights):
            return "int8"
    if manifest and manifest.get("format") in ("fp16", "int8", "int4", "int4-asym"):
        return manifest["format"]
    return "fp16"


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
