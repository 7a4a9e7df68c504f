"""The streaming export pipeline: plan every stored tensor from headers, then read, encode and write one at a time.

    plan (headers + meta architecture, no tensor data) ─▶ stream: read ▶ encode ▶ append to shard ─▶ config, side
    files, manifest ─▶ rename the finished temporary folder into place

Memory follows the largest tensor: shards are written tensor by tensor from a layout fixed in the plan.
"""

from __future__ import annotations

import json
import math
import logging
import os
import re
import shutil
import sys
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch

from qexport import __version__

from qexport.io import json_paths, safe_fs, tokenizer_probe
from qexport.model.architecture import Architecture, cancel, discover, predict_architecture
from qexport.report.card import CARD_FILE, write_card
from qexport.io.identity import base_model_id
from qexport.io.publish import TMP_MARK, OwnedFolder, check_destination, check_not_input, clean_stale, input_folders, replace_dir
from qexport.io.checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint, declared_dtype, tensor_bytes
from qexport.errors import InputError
from qexport.formats import Format, format_name, get_format
from qexport.formats.base import module_of, nonfinite_error
from qexport.io.safetensors_file import StreamWriter, file_bytes, nbytes, sha256_file
from qexport.io.sizes import size_summary

log = logging.getLogger("qexport")

SHARD_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class ExportOptions:
    """Everything `qexport export` takes, one field per command-line option."""

    formats: tuple[str, ...] = ("fp16", "int8", "int4")
    # None: the largest of AUTO_GROUP_SIZES that every quantizable Linear's input divides by (one per model).
    # A number: that group size exactly; Linears whose input does not divide by it stay dense, with a warning.
    group_size: int | None = None
    # How int4 scales (and zero points) are chosen: formats.int4.INT4_METHODS. Same layout for every method.
    int4_method: str = "rtn"
    max_shard_size: int = 5 * 10**9
    workers: int = 2  # tensors encoded at once, one thread each (output identical for any number)
    overwrite: bool = False
    allow_nonfinite: bool = False
    ignore: tuple[str, ...] = ("lm_head",)  # module names (or trailing name parts) that always stay dense
    progress: bool | None = None  # None: a progress bar when stderr is a terminal

    def __post_init__(self):
        # Format names in any case (`--formats INT4`), once, as registered names: folders, manifests and checks
        # all see `int4`. An unknown name is refused here, before any work.
        object.__setattr__(self, "formats", tuple(dict.fromkeys(format_name(n) for n in self.formats)))


class TensorSource(Protocol):
    """What the pipeline reads: a checkpoint, or a merge of several presenting the same interface."""

    folder: Path
    config: dict
    entries: dict  # name -> TensorEntry-like with .dtype and .shape

    @property
    def names(self) -> list[str]: ...

    def read(self, name: str) -> torch.Tensor: ...

    def side_files(self) -> list[Path]: ...

    def source_files(self) -> list[dict]: ...


@dataclass
class TensorPlan:
    source: str  # source tensor name
    quantize: bool
    stored: list  # [(name, dtype, shape)] as the format predicts
    shard: int = 0


@dataclass
class FormatPlan:
    fmt: Format
    tensors: list[TensorPlan]
    shard_names: list[str]
    ignore: list[str]  # module names the quantization config leaves dense
    dense_linears: dict[str, str] = field(default_factory=dict)  # Linear weight -> why it stayed dense

    def shard_layout(self, shard: int) -> list:
        return [s for t in self.tensors if t.shard == shard for s in t.stored]


def _ignored(module: str, ignore: Iterable[str]) -> bool:
    return any(module == pattern or module.endswith("." + pattern) for pattern in ignore)


def check_shapes(source: TensorSource, arch: Architecture) -> None:
    """Every checkpoint tensor the architecture also has must have the architecture's shape, and every nn.Linear
    weight must be there (an export without it would reload with a freshly initialised layer)."""
    missing = sorted(arch.linear_weights - arch.tied_names - set(source.entries))
    if missing:
        raise InputError(
            f"{source.folder}: tensor {missing[0]!r} of {arch.model_class} is missing from the checkpoint "
            f"({len(missing)} Linear weights missing in all)"
        )
    for name, entry in source.entries.items():
        expected = arch.shapes.get(name)
        if expected is None and name not in arch.tied_names and not any(
                re.search(p, name) for p in arch.ignored_unexpected):
            # A tensor the architecture does not have (a config with fewer layers than the checkpoint): copied
            # as it is, it would reload as an unexpected key, or stay dense where the config says quantized.
            raise InputError(f"{getattr(entry, 'file', source.folder)}: tensor {name!r} is not part of "
                             f"{arch.model_class} as config.json describes it")
        if expected is not None and tuple(entry.shape) != expected:
            raise InputError(
                f"{getattr(entry, 'file', source.folder)}: tensor {name!r} has shape {list(entry.shape)} but "
                f"{arch.model_class} expects {list(expected)}"
            )


def all_finite(w: torch.Tensor) -> bool:
    """True for non-floating tensors; float8 has no isfinite kernel, so it is checked through float32."""
    if not w.is_floating_point() or w.numel() == 0:
        return True
    # NaN propagates through min and max, +inf shows in max, -inf in min: one fused reduction instead of an
    # elementwise isfinite pass (about 15x faster on fp16 here).
    low, high = torch.aminmax(w if w.element_size() > 1 else w.float())
    return bool(torch.isfinite(low) and torch.isfinite(high))


def nonfinite_tensors(source: TensorSource, names: Iterable[str]) -> set[str]:
    return {n for n in names if not all_finite(source.read(n))}


AUTO_GROUP_SIZES = (128, 64, 32)


def quantizable_linears(source: TensorSource, arch: Architecture, ignore: Iterable[str]) -> dict[str, tuple]:
    """Linear weight -> shape for every nn.Linear weight the export targets (stored, 2-D, not ignored)."""
    return {name: tuple(source.entries[name].shape) for name in source.names
            if name in arch.linear_weights and name not in arch.tied_names
            and not _ignored(module_of(name), ignore) and len(source.entries[name].shape) == 2}


def choose_group_size(shapes: Iterable[tuple], candidates: tuple[int, ...] = AUTO_GROUP_SIZES) -> int:
    """The group size of a model: the largest candidate that every input size divides by, else the candidate
    that quantizes the most weights (ties to the larger group); the rest then stay dense, with a warning."""
    # A candidate every input divides by covers every weight, the most any can: the max finds it, and among
    # several such takes the largest, whatever the candidates' order.
    shapes = list(shapes)
    covered = {g: sum(math.prod(s) for s in shapes if s[1] % g == 0) for g in candidates}
    return max(candidates, key=lambda g: (covered[g], g))


def plan_format(source: TensorSource, arch: Architecture, fmt: Format, options: ExportOptions,
                nonfinite: set[str] = frozenset()) -> FormatPlan:
    plans, ignore, dense_linears = [], list(options.ignore), {}
    for name in source.names:
        if name in arch.tied_names:
            continue  # stored once under the name it is tied to
        entry = source.entries[name]
        quantize = False
        if fmt.quantizes and name in arch.linear_weights and not _ignored(module_of(name), options.ignore):
            why = fmt.why_not_quantizable(name, tuple(entry.shape))
            if why is None and name in nonfinite:
                why = "holds NaN or Inf (kept dense because of --allow-nonfinite)"
            if why is None and not torch.empty((), dtype=_torch_dtype(entry.dtype)).is_floating_point():
                why = f"dtype {entry.dtype} is not floating point"
            if why is None:
                quantize = True
            else:
                dense_linears[name] = why
                ignore.append(module_of(name))
        plans.append(TensorPlan(name, quantize, fmt.stored(name, entry.dtype, tuple(entry.shape), quantize)))
    shard_names = _assign_shards(plans, options.max_shard_size)
    return FormatPlan(fmt, plans, shard_names, ignore, dense_linears)


def _torch_dtype(name: str):
    from qexport.io.safetensors_file import DTYPES

    return DTYPES[name]


def _assign_shards(plans: list[TensorPlan], max_shard_size: int) -> list[str]:
    """Greedy in source order, like transformers: a new shard when the next tensor group would overflow."""
    shard, used = 0, 0
    for plan in plans:
        size = sum(nbytes(d, s) for _, d, s in plan.stored)
        if used and used + size > max_shard_size:
            shard, used = shard + 1, 0
        plan.shard, used = shard, used + size
    count = shard + 1
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def in_background(fn: Callable) -> Future:
    """Run fn on a daemon thread: an export that stops on bad input does not wait for it to finish."""
    future: Future = Future()

    def run():
        try:
            future.set_result(fn())
        except BaseException as e:  # handed to whoever asks for the result
            future.set_exception(e)

    threading.Thread(target=run, daemon=True, name="qexport-background").start()
    return future


class Deferred:
    """fn() computed on the first call of .result(), on the calling thread (a Future's interface, no thread)."""

    def __init__(self, fn: Callable):
        self._fn, self._future = fn, Future()

    def result(self, timeout=None):
        if not self._future.done():
            try:
                self._future.set_result(self._fn())
            except BaseException as e:
                self._future.set_exception(e)
        return self._future.result()


def ordered_map(fn: Callable, items: list, workers: int):
    """Yield fn(item) in order, computing up to `workers` items ahead on worker threads (bounded memory).

    The caller consumes results on its own thread, so with one worker encoding still overlaps writing.
    """
    end = object()  # not None: any item, None included, is mapped
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        it = iter(items)
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= workers:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(it, end)
            if nxt is not end:
                pending.append(pool.submit(fn, nxt))
            yield result


# Families whose activations are known to pass fp16's 65504 in bf16-trained checkpoints (transformers #36822 and
# the Gemma / T5 model cards): an fp16 export of them produces NaN. Only used for a warning.
FP16_OVERFLOW_FAMILIES = ("gemma", "gemma2", "gemma3", "gemma3_text", "t5", "mt5", "umt5", "switch_transformers")


def compute_dtype_of(source: "TensorSource", linear_weights: Iterable[str] = ()) -> str:
    """The floating dtype quantized exports compute in: bfloat16 for a bf16 source, float16 otherwise.

    A bf16 source is one whose config.json names bfloat16 (`dtype` / `torch_dtype`), or, when the config names no
    dtype, whose Linear weights are all stored as BF16. Keeping bf16 keeps bf16's range: an fp16 export of a model
    whose activations pass 65504 computes NaN (issue: every export of such a model loaded as NaN in float16).
    """
    declared = declared_dtype(source.config)
    if declared is not None:
        return "bfloat16" if declared == "bfloat16" else "float16"
    dtypes = {source.entries[n].dtype for n in linear_weights if n in source.entries}
    return "bfloat16" if dtypes == {"BF16"} else "float16"


def output_config(config: dict, fmt: Format, ignore: list[str], sentence_transformers: bool = False) -> dict:
    """The export's config.json: the source's keys, the compute dtype, and the format's quantization_config.

    A sentence-transformers folder (modules.json) gets `dequantize: true`: sentence-transformers calls the model's
    `forward` directly, which skips the hook compressed-tensors decompresses through on the first call, so without
    it `SentenceTransformer(export)` fails ('Linear' object has no attribute 'weight'). With it transformers
    decompresses while loading; the stored files are the same and vLLM ignores the key.
    """
    out = dict(config)
    dtype = fmt.config_dtype  # None: the format stores tensors in the source dtype
    if dtype is not None:
        if "torch_dtype" in out:
            out["torch_dtype"] = dtype
        out["dtype"] = dtype
    qc = fmt.quantization_config(sorted(set(ignore)))
    if qc is not None:
        out["quantization_config"] = {**qc, "dequantize": True} if sentence_transformers else qc
    return out


def write_format(source: TensorSource, plan: FormatPlan, folder: Path, options: ExportOptions,
                 source_files: Future) -> dict:
    """Write one complete export folder; returns its manifest. `source_files`: the source's hashes, when done."""
    from tqdm import tqdm

    folder.mkdir(parents=True, exist_ok=True)  # export() creates and locks it (OwnedFolder)
    fmt = plan.fmt
    tensors_info: dict[str, dict] = {}

    hash_read = getattr(source, "hash_read", None)

    def encode(tp: TensorPlan):
        w = source.read(tp.source)
        encoded = fmt.encode(tp.source, w, tp.quantize)
        # NaN / Inf in the source, or values beyond fp16, surface in the stored floats (for a quantized weight
        # in its scales, which hold each group's absmax): checking those costs little next to checking the source.
        if not all(all_finite(t) for t in encoded.values()):
            origin = source.origin(tp.source) if hasattr(source, "origin") else source.entries[tp.source].file
            error = nonfinite_error(tp.source, w, options.allow_nonfinite, origin, fmt.dtype)
            if error is not None:
                raise error
        return tp, w, encoded

    files = []
    writers: dict[int, StreamWriter] = {}
    bar = tqdm(total=len(plan.tensors), desc=f"export {fmt.name}", unit="tensor",
               disable=None if options.progress is None else not options.progress, file=sys.stderr)
    try:
        current = -1
        for tp, w, encoded in ordered_map(encode, plan.tensors, options.workers):
            if hash_read is not None:
                hash_read(tp.source, w)  # in file order here, whatever the workers' order
            del w
            if tp.shard != current:
                if current >= 0:
                    files.append(_close(writers.pop(current), plan))
                current = tp.shard
                writers[current] = StreamWriter(
                    folder / plan.shard_names[current], plan.shard_layout(current), SHARD_METADATA
                )
            for name, dtype, shape in tp.stored:
                t = encoded[name]
                writers[current].add(name, t)
                tensors_info[name] = {
                    "dtype": dtype,
                    "shape": list(shape),
                    "predicted_bytes": nbytes(dtype, shape),
                    "stored_bytes": t.numel() * t.element_size(),
                    "quantized": tp.quantize,
                    "source": tp.source,
                    "file": plan.shard_names[tp.shard],
                }
            bar.update(1)
        files.append(_close(writers.pop(current), plan))
    finally:
        bar.close()
        for w in writers.values():
            w.abort()

    if len(plan.shard_names) > 1:
        index = {
            "metadata": {"total_size": sum(t["stored_bytes"] for t in tensors_info.values())},
            "weight_map": {name: info["file"] for name, info in tensors_info.items()},
        }
        files.append(_write_text(folder / INDEX_FILE, json.dumps(index, indent=2) + "\n"))
    files.append(_write_text(folder / "config.json",
                             json.dumps(output_config(source.config, fmt, plan.ignore, any(
                                 side.name == "modules.json" for side in source.side_files())), indent=2) + "\n"))
    source_readme = None
    # Side files: checked regular files inside the source (no link out, no special file), copied byte for byte.
    for rel, real in side_tree(source):
        if rel == CARD_FILE:  # the model card written below embeds it
            source_readme = safe_fs.read_bytes(real, CARD_FILE, safe_fs.MAX_JSON_BYTES).decode("utf-8", "replace")
            continue
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        safe_fs.copy_file(real, target, real.parent)
        files.append(_file_record(target, folder))

    # The card is computed from the manifest's facts and listed in it (it cannot hold its own size or sha).
    hashed_sources = source_files.result()
    draft = build_manifest(source, plan, options, hashed_sources, files, tensors_info)
    files.append(write_card(folder, draft, source_readme=source_readme))
    manifest = build_manifest(source, plan, options, hashed_sources, files, tensors_info)
    _write_text(folder / "qexport.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def side_tree(source) -> list[tuple[str, Path]]:
    """The source's side files as (relative path, checked real path); sources without side_tree: top level only."""
    if hasattr(source, "side_tree"):
        return source.side_tree()
    return [(p.name, safe_fs.check_regular(p, source.folder)) for p in source.side_files() if not p.is_dir()]


def _close(writer: StreamWriter, plan: FormatPlan) -> dict:
    sha = writer.close()
    layout = plan.shard_layout(plan.shard_names.index(writer.path.name))
    return {"name": writer.path.name, "bytes": writer.path.stat().st_size, "sha256": sha,
            "predicted_bytes": file_bytes(layout, SHARD_METADATA)}


def _write_text(path: Path, text: str) -> dict:
    try:
        path.write_text(text)
    except OSError as e:  # a full disk says ENOSPC without the file name
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e
    return _file_record(path, path.parent)


def _file_record(path: Path, root: Path) -> dict:
    return {"name": path.relative_to(root).as_posix(), "bytes": path.stat().st_size,
            "sha256": sha256_file(path, root=root)}


def build_manifest(source, plan: FormatPlan, options, source_files, files, tensors_info) -> dict:
    quantized_weights = sum(math.prod(source.entries[t.source].shape) for t in plan.tensors if t.quantize)
    quantized_bytes = sum(t["stored_bytes"] for t in tensors_info.values() if t["quantized"])
    dense = [(t["dtype"], t["shape"], t["stored_bytes"]) for t in tensors_info.values() if not t["quantized"]]
    # The Linears this export targets: those quantized and those that had to stay dense (group size, NaN, dtype).
    targeted = [t.source for t in plan.tensors if t.quantize or t.source in plan.dense_linears]
    linear_elements = sum(math.prod(source.entries[n].shape) for n in targeted)
    parameters = {**plan.fmt.parameters(), "max_shard_size": options.max_shard_size}
    if parameters.get("weights", {}).get("strategy") == "group":
        parameters["group_size_choice"] = "auto" if options.group_size is None else "given"
    return {
        "qexport_version": __version__,
        "format": plan.fmt.name,
        "parameters": parameters,
        "model_type": source.config.get("model_type"),
        # A merged source (qexport.merge.sources) adds what was merged: method, inputs, weights or LoRA scales.
        "source": {"files": source_files, **({"merge": source.merge} if getattr(source, "merge", None) else {}),
                   "base_model": base_model_id(source.folder) if isinstance(source, Checkpoint) else None},
        "ignore": sorted(set(plan.ignore)),
        "dense_linears": plan.dense_linears,
        "files": files,
        "summary": {
            "total_bytes": sum(f["bytes"] for f in files),
            "weight_bytes": sum(f["bytes"] for f in files if f["name"].endswith(".safetensors")),
            **size_summary(dense, quantized_weights, quantized_bytes),
            "linear_weights": len(targeted),  # nn.Linear weights targeted (all but ignore, e.g. lm_head)
            "quantized_linears": sum(1 for t in plan.tensors if t.quantize),
            # share of the targeted Linears' weights (and so of their fp16 bytes) that is quantized
            "quantized_linear_share": quantized_weights / linear_elements if linear_elements else None,
        },
        "tensors": tensors_info,
    }


def dense_linears_warning(fmt_name: str, dense_linears: dict[str, str], shown: int = 3) -> str:
    """One line for all the Linear weights a format keeps dense (hundreds on a real model with an odd group size):
    per reason the count and the first few names; the full list is in the config's ignore and the manifest."""
    by_reason: dict[str, list[str]] = {}
    for name, why in dense_linears.items():
        by_reason.setdefault(why, []).append(name.removesuffix(".weight"))
    parts = [f"{why}: {len(names)} ({', '.join(names[:shown])}{', ...' if len(names) > shown else ''})"
             for why, names in by_reason.items()]
    return (f"{fmt_name}: {len(dense_linears)} Linear weight(s) stay dense; {'; '.join(parts)} (all listed in "
            "config.json's ignore and qexport.json's dense_linears)")


# ---------------------------------------------------------------------------------------------------------------
# Folders: check the destination before writing, write to a temporary sibling, rename into place when complete.


def refuse_hard_links(source) -> None:
    """Refuse a source file with more than one hard link: its bytes would be copied into the export, and a hard
    link to a file outside the folder cannot be told apart from one inside (json_paths.hard_linked)."""
    tree = side_tree(source) + [(p.name, p) for p in getattr(source, "files", [])]
    linked = json_paths.hard_linked(tree)
    if linked:
        raise InputError(f"{source.folder / linked[0]}: has other hard links; qexport cannot tell a hard link from "
                         f"the file outside the folder it may share its bytes with, so it copies none (copy the "
                         f"folder with `cp -r` and export the copy)")


def export(source: TensorSource, out: str | Path, options: ExportOptions) -> dict[str, dict]:
    """Export `source` to OUT/<format>/ for each format; returns the manifests by format name.

    Everything that can be checked is checked before the first byte is written (the architecture, when it is
    still being discovered, before anything is renamed); the formats are written to temporary folders and renamed
    into place only when all of them are complete and confirmed.
    """
    out = Path(out)
    if options.group_size is not None and (options.group_size <= 0 or options.group_size % 8):
        raise InputError(f"--group-size: {options.group_size} must be a positive multiple of 8")
    if options.workers < 1:
        raise InputError(f"--workers: {options.workers} must be at least 1")
    if "quantization_config" in source.config:
        raise InputError(f"{source.folder / 'config.json'}: source is already quantized (has quantization_config)")
    if (problem := tokenizer_probe.problem(source.folder)) is not None:  # verify could not run this tokenizer
        raise InputError(problem)
    # A checkpoint's files are hashed from the tensors as the first format reads them (`hash_read`; the manifest
    # asks for the digests after that): one read of the source, not two. Other sources hash on a second core
    # (hashlib releases the GIL) from the start.
    source_files = (Deferred(source.source_files) if hasattr(source, "hash_read")
                    else in_background(source.source_files))
    discovery = discover(source.config, source.folder / "config.json", tensor_bytes(source.entries))
    # One thread per torch op: tensors encode in parallel on `workers` threads instead. Intra-op threads spin-wait
    # between the short ops of an encode and take the core that hashing and discovery need (1b int4 on 2 cores:
    # 14-18 s CPU with 2 intra-op threads, 8 s with 1).
    intra_op_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _export(source, out, options, discovery, source_files)
    finally:
        torch.set_num_threads(intra_op_threads)
        cancel(discovery)


@dataclass(frozen=True)
class Prepared:
    """Everything an export decides from the architecture before writing: what a prediction must agree on."""

    compute_dtype: str
    plans: list[FormatPlan]

    def signature(self) -> list:
        return [(p.fmt.name, p.fmt.config_dtype, p.fmt.parameters(), p.shard_names, sorted(set(p.ignore)),
                 p.dense_linears, [(t.source, t.quantize, t.stored, t.shard) for t in p.tensors])
                for p in self.plans]


def prepare(source: TensorSource, arch: Architecture, options: ExportOptions) -> Prepared:
    """Check the checkpoint against the architecture and plan every format (no tensor data read, except the
    Linear weights' finiteness under --allow-nonfinite)."""
    check_shapes(source, arch)
    compute_dtype = compute_dtype_of(source, arch.linear_weights)
    group_size = options.group_size
    if group_size is None:
        group_size = choose_group_size(quantizable_linears(source, arch, options.ignore).values())
    formats = [get_format(name, group_size=group_size, dtype=compute_dtype, method=options.int4_method)
               for name in options.formats]
    nonfinite = (
        nonfinite_tensors(source, [n for n in source.names if n in arch.linear_weights])
        if options.allow_nonfinite
        else set()
    )
    return Prepared(compute_dtype, [plan_format(source, arch, fmt, options, nonfinite) for fmt in formats])


def _export(source: TensorSource, out: Path, options: ExportOptions, discovery: Future,
            source_files: Future) -> dict[str, dict]:
    # While the architecture is being discovered in a child process, work starts from a prediction made from the
    # checkpoint's names and shapes; the real architecture's plan must equal it before anything is renamed into
    # place, else the formats are written again from the real plan. (--allow-nonfinite reads every Linear weight
    # up front: it waits.)
    speculative = not discovery.done() and not options.allow_nonfinite
    try:
        if speculative:
            prepared = prepare(source, predict_architecture(source.config, source.entries), options)
        else:
            prepared = prepare(source, discovery.result(), options)
        side_tree(source)  # links out of the folder and special files are refused before anything is written
        for folder in input_folders(source):  # remote code, paths out of the folder, module pickles
            json_paths.refuse_unsafe(folder)
        refuse_hard_links(source)
        check_destination(out, [p.fmt.name for p in prepared.plans], options.overwrite)
        check_not_input(out, [out / p.fmt.name for p in prepared.plans], input_folders(source))
    except InputError:
        if speculative:
            prepare(source, discovery.result(), options)  # an error of the architecture is the one to report first
        raise

    created = [d for d in (out, *out.parents) if not d.exists()]  # folders this export creates, deepest first
    clean_stale(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp_dirs = {p.fmt.name: out / f".{p.fmt.name}{TMP_MARK}{os.getpid()}" for p in prepared.plans}
    owned: list[OwnedFolder] = []
    try:
        for tmp in tmp_dirs.values():
            owned.append(OwnedFolder(tmp))
        manifests = _write_all(source, prepared, tmp_dirs, options, source_files)
        real = prepare(source, discovery.result(), options) if speculative else prepared
        if real.signature() != prepared.signature():
            log.info("the architecture differs from the prediction made from the checkpoint: writing again")
            for tmp in tmp_dirs.values():
                _empty(tmp)  # the folder stays, and with it the lock telling other runs that it is live
            manifests = _write_all(source, real, tmp_dirs, options, source_files)
        _warn(source, real)
        for name, tmp in tmp_dirs.items():
            replace_dir(tmp, out / name, options.overwrite)
    except BaseException:
        for tmp in tmp_dirs.values():
            shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # leave no empty folder behind, including parents that --out created
            if d.exists() and not any(d.iterdir()):
                d.rmdir()
        raise
    finally:
        for folder in owned:
            folder.release()
    return manifests


def _empty(folder: Path) -> None:
    """Remove what an export wrote into `folder` (regular files and folders only), keeping the folder itself: a
    removed and re-created folder would lose OwnedFolder's lock, and another run's clean_stale would remove it."""
    for child in folder.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


def _write_all(source: TensorSource, prepared: Prepared, tmp_dirs: dict[str, Path], options: ExportOptions,
               source_files: Future) -> dict[str, dict]:
    return {plan.fmt.name: write_format(source, plan, tmp_dirs[plan.fmt.name], options, source_files)
            for plan in prepared.plans}


def _warn(source: TensorSource, prepared: Prepared) -> None:
    if prepared.compute_dtype == "bfloat16" and "fp16" in [p.fmt.name for p in prepared.plans] and \
            source.config.get("model_type") in FP16_OVERFLOW_FAMILIES:
        log.warning("fp16: %s models trained in bfloat16 are known to overflow fp16 activations (NaN logits); "
                    "int8 / int4 keep bfloat16, and `qexport verify` runs the fp16 export in float16",
                    source.config.get("model_type"))
    for plan in prepared.plans:
        if plan.dense_linears:
            log.warning("%s", dense_linears_warning(plan.fmt.name, plan.dense_linears))


def export_folder(src: str | Path, out: str | Path, options: ExportOptions) -> dict[str, dict]:
    return export(Checkpoint.open(src), out, options)
