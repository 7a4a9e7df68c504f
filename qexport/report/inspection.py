"""`qexport inspect DIR`: what a model folder holds, from safetensors headers and JSON files alone.

Works on any folder (a qexport export, another tool's compressed-tensors export, a plain dense checkpoint) and
never loads the model or reads tensor data, except the 16-byte `weight_shape` tensors of packed modules. It
reports problems instead of stopping at the first one: a broken folder is what one most wants to inspect.

A module is stored quantized when it has a `weight_scale` next to an integer (or fp8) `weight` or a
`weight_packed`; its quantized weights are counted from `weight_shape` (packed) or the weight's shape, and its
stored bytes include every tensor of the module's quantization (packed words, scales, zero points, shapes):
the same accounting as qexport.json, so the totals of a qexport export equal its manifest's.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from qexport.io import json_paths, safe_fs, untrusted_regex

from qexport.io.checkpoint import INDEX_FILE, MANIFEST_FILE, PICKLE_SUFFIXES, SINGLE_FILE
from qexport.quant.scheme import QUANT_LEAVES, config_groups, group_for, is_ignored, strings
from qexport.report.card import layer_type
from qexport.errors import InputError, not_a_model_folder
from qexport.io.safetensors_file import (ITEMSIZES, MAX_DIM, MAX_DIMS, MAX_HEADER_BYTES, MAX_TENSORS_PER_FILE, TensorEntry,
                             nbytes, parse_header_json, read_header)
from qexport.io.sizes import size_summary

MAX_LISTED_FILES = 10_000  # files counted in the totals: `inspect /` must answer, not walk the whole disk

INT_DTYPES = ("I8", "U8", "I16", "I32", "I64", "F8_E4M3", "F8_E5M2")


# ---------------------------------------------------------------------------------------------------------------
# Reading, leniently: every reader returns what it could parse and appends what is wrong to `problems`.


def _load_json(path: Path, problems: list[str], limit: int = safe_fs.MAX_JSON_BYTES):
    if not os.path.lexists(path):
        return None
    try:
        return safe_fs.load_json(path, path.name, limit)
    except InputError as e:
        problems.append(_short(str(e).replace(str(path), path.name)))
        return None


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


def _header(path: Path, problems: list[str]) -> tuple[dict[str, TensorEntry], int]:
    """Tensor entries of one safetensors file and where its data section starts; malformed entries skipped."""
    try:
        with safe_fs.open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                problems.append(f"{path.name}: truncated ({size} bytes, no header length)")
                return {}, 0
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                problems.append(f"{path.name}: header length {header_len} does not fit the file ({size} bytes)")
                return {}, 0
            text = f.read(header_len)
            count = text.count(b'"data_offsets"')
            if count > MAX_TENSORS_PER_FILE:
                problems.append(f"{path.name}: header lists {count:,} tensors, above qexport's limit of "
                                f"{MAX_TENSORS_PER_FILE:,} per file; not inspected")
                return {}, 0
            raw = parse_header_json(text, path)
    except InputError as e:
        problems.append(_short(str(e).replace(str(path), path.name)))
        return {}, 0
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        problems.append(_short(f"{path.name}: header not readable ({type(e).__name__}: {e})"))
        return {}, 0
    if not isinstance(raw, dict):
        problems.append(f"{path.name}: header is not a JSON object")
        return {}, 0
    raw.pop("__metadata__", None)
    entries, bad = {}, 0
    for name, info in raw.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            if (dtype not in ITEMSIZES or not isinstance(shape, list) or len(shape) > MAX_DIMS
                    or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape)
                    or not all(isinstance(o, int) and not isinstance(o, bool) for o in (start, end))):
                raise ValueError
            entries[name] = TensorEntry(name, path, dtype, tuple(shape), int(start), int(end))
        except (KeyError, TypeError, ValueError):
            bad += 1
            problems.append(_short(f"{path.name}: tensor {name!r:.120}: malformed header entry {info!r:.120}"))
    if not bad:  # the strict reader adds what only the whole layout shows: sizes, overlaps, gaps, truncation
        try:
            read_header(path)
        except InputError as e:
            problems.append(str(e).replace(str(path), path.name))
    return entries, 8 + header_len


def _weight_files(folder: Path, problems: list[str]) -> tuple[list[Path], dict | None]:
    """The safetensors files and the index's weight_map (None without an index)."""
    on_disk = sorted(p for p in folder.glob("*.safetensors") if os.path.lexists(p) and not p.is_dir())
    for p in sorted(folder.iterdir()):
        if p.suffix in PICKLE_SUFFIXES:
            problems.append(f"{p.name}: pickle weights are not inspected (qexport reads safetensors only)")
    index_path = folder / INDEX_FILE
    if os.path.lexists(index_path):
        index = _load_json(index_path, problems)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            problems.append(f"{INDEX_FILE}: no weight_map object")
            return on_disk, None
        shards = list(dict.fromkeys(str(s) for s in weight_map.values()))
        for shard in shards:
            if Path(shard).name != shard or shard in ("", ".", ".."):
                problems.append(_short(f"{INDEX_FILE}: shard {shard!r} is not a file in this folder"))
                continue
            if not os.path.lexists(folder / shard):
                count = sum(1 for s in weight_map.values() if s == shard)
                problems.append(f"{INDEX_FILE}: shard {shard!r} ({count} tensors) is missing from the folder")
        for stray in on_disk:
            if stray.name not in shards:
                problems.append(f"{stray.name}: not listed in {INDEX_FILE}")
        return [folder / s for s in shards if Path(s).name == s and s not in ("", ".", "..")
                and os.path.lexists(folder / s)], weight_map
    if len(on_disk) > 1 and not (folder / SINGLE_FILE).is_file():
        problems.append(f"{len(on_disk)} safetensors files but no {INDEX_FILE} to say how they fit together")
    if not on_disk:
        problems.append("no safetensors weights in the folder")
    return on_disk, None


def _read_ints(entry: TensorEntry, data_start: int) -> list[int] | None:
    """The values of a small integer tensor (weight_shape), read from its byte range."""
    fmt = {"I64": "q", "I32": "i"}.get(entry.dtype)
    count = math.prod(entry.shape)
    if fmt is None or count > 8 or entry.nbytes != count * struct.calcsize(fmt):
        return None
    try:
        with safe_fs.open_regular(entry.file) as f:
            f.seek(data_start + entry.start)
            return list(struct.unpack(f"<{count}{fmt}", f.read(entry.nbytes)))
    except (OSError, struct.error, InputError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# Quantization config


def _quantization_summary(config: dict, problems: list[str]) -> dict | None:
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        problems.append("config.json: quantization_config is not an object")
        return None
    untrusted_regex.check_quantization_config(qc, "config.json: quantization_config")  # bounds the matching below
    groups = []
    if "config_groups" in qc and not isinstance(qc["config_groups"], dict):
        problems.append("config.json: quantization_config.config_groups is not an object")
    for name, spec in config_groups(qc).items():
        weights = spec.get("weights") if isinstance(spec.get("weights"), dict) else {}
        if "targets" in spec and len(strings(spec["targets"])) != len(spec["targets"] or []):
            problems.append(f"config.json: config_groups.{name}.targets is not a list of strings")
        bits = weights.get("num_bits")
        if bits is not None and not (isinstance(bits, int) and not isinstance(bits, bool) and 1 <= bits <= 32):
            problems.append(_short(f"config.json: config_groups.{name}.weights.num_bits {bits!r} is not an "
                                   f"integer from 1 to 32"))
            weights = {**weights, "num_bits": None}
        groups.append({"group": name, "targets": strings(spec.get("targets")), "format": spec.get("format"),
                       **{k: weights.get(k) for k in ("num_bits", "type", "strategy", "group_size", "symmetric")}})
    if "ignore" in qc and len(strings(qc["ignore"])) != len(qc["ignore"] or []):
        problems.append("config.json: quantization_config.ignore is not a list of strings")
    summary = {"quant_method": qc.get("quant_method"), "format": qc.get("format"),
               "quantization_status": qc.get("quantization_status"), "groups": groups,
               "ignore": strings(qc.get("ignore"))}
    if qc.get("quant_method") == "compressed-tensors":
        if "quantization_status" not in qc:
            problems.append("config.json: quantization_config has no quantization_status: transformers then loads "
                            "the stored integers without decompressing them (garbage weights, no error)")
        if not groups:
            problems.append("config.json: quantization_config has no config_groups")
    return summary


def _effective_format(qc: dict, spec: dict) -> str:
    # Measured with compressed-tensors 0.20: a group without its own format loads as pack-quantized, whatever
    # the top-level format says.
    return str(spec.get("format") or "pack-quantized")


# ---------------------------------------------------------------------------------------------------------------
# The report


def _module_of(name: str) -> tuple[str, str]:
    module, _, leaf = name.rpartition(".")
    return module, leaf


def _quantized_modules(entries: dict[str, TensorEntry]) -> dict[str, dict[str, TensorEntry]]:
    modules: dict[str, dict[str, TensorEntry]] = {}
    for name, e in entries.items():
        module, leaf = _module_of(name)
        if leaf in QUANT_LEAVES or leaf == "weight":
            modules.setdefault(module, {})[leaf] = e
    return {m: parts for m, parts in modules.items() if "weight_scale" in parts and (
        "weight_packed" in parts or ("weight" in parts and parts["weight"].dtype in INT_DTYPES))}


def _check_module(parts: dict[str, TensorEntry], shape: list[int] | None, bits: int | None, spec: dict | None,
                  qc: dict, module: str) -> list[str]:
    """What is wrong with one quantized module, each as "<tensor or module>: <problem>" without the module name."""
    problems: list[str] = []
    packed, scale = parts.get("weight_packed"), parts["weight_scale"]
    if packed is not None:
        if packed.dtype != "I32":
            problems.append(f".weight_packed: dtype {packed.dtype}, compressed-tensors packs into I32")
        if "weight_shape" not in parts:
            problems.append(": weight_packed without weight_shape")
        elif shape is None:
            problems.append(f".weight_shape: {parts['weight_shape'].dtype} {list(parts['weight_shape'].shape)}"
                            f" is not two integers")
        elif bits:
            expected = [shape[0], math.ceil(shape[1] * bits / 32)]
            if list(packed.shape) != expected:
                problems.append(f".weight_packed: shape {list(packed.shape)} contradicts weight_shape "
                                f"{shape} at {bits} bits (expected {expected})")
    if shape is not None and len(scale.shape) == 2 and spec is not None:
        weights = _weights(spec)
        strategy, group_size = weights.get("strategy"), weights.get("group_size")
        expected = None
        if strategy == "channel":
            expected = [shape[0], 1]
        elif strategy == "group" and isinstance(group_size, int) and group_size > 0:
            expected = [shape[0], math.ceil(shape[1] / group_size)]
        if expected is not None and list(scale.shape) != expected:
            problems.append(f".weight_scale: shape {list(scale.shape)} but {strategy} quantization of "
                            f"{shape} needs {expected}")
    if spec is not None and qc.get("quant_method") == "compressed-tensors":
        fmt = _effective_format(qc, spec)
        stored = "pack-quantized" if packed is not None else "an integer weight"
        if (packed is not None) != (fmt == "pack-quantized"):
            implied = "" if spec.get("format") else " (its config group has no format of its own)"
            problems.append(f": stored as {stored} but loads as {fmt}{implied}")
    if qc and is_ignored(qc, module, classes=()):  # names only: an ignored class cannot be told from headers
        problems.append(": stored quantized but listed in quantization_config.ignore")
    return problems


def _weights(spec: dict | None) -> dict:
    weights = (spec or {}).get("weights")
    return weights if isinstance(weights, dict) else {}


def _bits(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 32 else None


def _kind(parts: dict[str, TensorEntry], shape: list[int] | None, bits: int | None) -> str:
    scale = parts["weight_scale"]
    if shape is None or not scale.shape or 0 in scale.shape:
        granularity = "?"
    elif math.prod(scale.shape) == 1:
        granularity = "per tensor"
    elif len(scale.shape) == 2 and scale.shape[1] == 1:
        granularity = "per channel"
    elif len(scale.shape) == 2:
        granularity = f"group {math.ceil(shape[1] / scale.shape[1])}"
    else:
        granularity = "?"
    layout = "packed" if "weight_packed" in parts else parts["weight"].dtype
    zero = ", zero point" if "weight_zero_point" in parts else ""
    return f"int{bits or '?'} {granularity} ({layout}{zero})"


def inspect_folder(folder: str | Path) -> dict:
    """Everything `qexport inspect` reports, as a JSON-able dict. Raises InputError only if FOLDER is no folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    # An export root names its format folders (exit 2); any other folder is described, problems and all.
    if (error := not_a_model_folder(folder, "inspect", only_with_models=True)) is not None:
        raise error
    problems: list[str] = []
    config = _load_json(folder / "config.json", problems, safe_fs.MAX_CONFIG_BYTES)
    if config is None and not (folder / "config.json").exists():
        problems.append("config.json: missing")
    config = config if isinstance(config, dict) else {}
    if config and not config.get("model_type"):
        problems.append("config.json: no model_type (transformers cannot tell the architecture)")
    quantization = _quantization_summary(config, problems)
    qc = config.get("quantization_config") if isinstance(config.get("quantization_config"), dict) else {}

    files, weight_map = _weight_files(folder, problems)
    entries: dict[str, TensorEntry] = {}
    data_start: dict[Path, int] = {}
    for path in files:
        found, data_start[path] = _header(path, problems)
        for name, entry in found.items():
            if name in entries:
                problems.append(f"{path.name}: tensor {name!r} is also in {entries[name].file.name}")
                continue
            if weight_map is not None and weight_map.get(name) != path.name:
                problems.append(f"{path.name}: tensor {name!r} is here but {INDEX_FILE} puts it in "
                                f"{weight_map.get(name)!r}")
            entries[name] = entry
    if weight_map is not None:
        for name, shard in weight_map.items():
            if name not in entries and (folder / str(shard)).is_file():
                problems.append(f"{INDEX_FILE}: tensor {name!r} is not in shard {shard!r}")

    modules = _quantized_modules(entries)
    quantized_names = {f"{m}.{leaf}" for m, parts in modules.items() for leaf in parts}
    module_rows = {}
    module_problems: dict[tuple[str, str], list[str]] = {}  # the same problem in every layer: reported once
    for module, parts in modules.items():
        shape = None
        if "weight_packed" in parts:
            ws = parts.get("weight_shape")
            shape = _read_ints(ws, data_start[ws.file]) if ws is not None else None
            shape = shape if shape is not None and len(shape) == 2 and all(0 < d <= MAX_DIM for d in shape) else None
        else:
            shape = list(parts["weight"].shape) if len(parts["weight"].shape) == 2 else None
        group = group_for(qc, module, classes=None) if qc else None
        spec = group[1] if group else None
        bits = _bits(_weights(spec).get("num_bits"))
        if bits is None and "weight_packed" in parts and shape:
            cols = parts["weight_packed"].shape[1] if len(parts["weight_packed"].shape) == 2 else 0
            bits = 32 * cols // shape[1] if cols and (32 * cols) % shape[1] == 0 else None
        elif bits is None and "weight" in parts:
            bits = 8 * nbytes(parts["weight"].dtype, ()) if parts["weight"].dtype in INT_DTYPES else None
        for problem in _check_module(parts, shape, bits, spec, qc, module):
            module_problems.setdefault((layer_type(module), problem), []).append(module)
        module_rows[module] = {"weights": math.prod(shape) if shape else 0,
                               "bytes": sum(e.nbytes for e in parts.values()), "kind": _kind(parts, shape, bits),
                               "shape": shape}
    for (pattern, problem), names in module_problems.items():
        where = names[0] if len(names) == 1 else f"{pattern} ({len(names)} modules)"
        problems.append(f"{where}{problem}")
    if quantization and quantization["quant_method"] == "compressed-tensors" and entries and not modules:
        problems.append("config.json has a compressed-tensors quantization_config but no tensor is stored quantized")
    if not qc and modules:
        problems.append(f"{len(modules)} modules are stored quantized but config.json has no quantization_config: "
                        "transformers will not decompress them")

    all_files, truncated = _listed_files(folder)
    if truncated:
        problems.append(f"more than {MAX_LISTED_FILES:,} files under the folder: totals count the first "
                        f"{MAX_LISTED_FILES:,}")
    tensors = [{"name": n, "file": e.file.name, "dtype": e.dtype, "shape": list(e.shape), "bytes": e.nbytes,
                "quantized": n in quantized_names} for n, e in entries.items()]
    layer_types = _layer_types(entries, quantized_names, module_rows)
    problems += _manifest_problems(folder, all_files)
    problems += _json_path_problems(folder)
    weight_file_bytes = sum(p.stat().st_size for p in files)
    sizes = size_summary([(e.dtype, e.shape, e.nbytes) for n, e in entries.items() if n not in quantized_names],
                         sum(r["weights"] for r in module_rows.values()), sum(r["bytes"] for r in module_rows.values()))
    return {
        "folder": str(folder),
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures"),
        "quantization": quantization,
        "weight_files": [{"name": p.name, "bytes": p.stat().st_size,
                          "tensors": sum(1 for e in entries.values() if e.file == p)} for p in files],
        "layer_types": layer_types,
        "tensors": tensors,
        "totals": {
            "files": len(all_files),
            "file_bytes": sum(_size(p) for p in all_files),
            "weight_file_bytes": weight_file_bytes,
            "tensors": len(entries),
            "quantized_modules": len(modules),
            **sizes,
        },
        "problems": problems,
    }


def _json_path_problems(folder: Path) -> list[str]:
    """Remote code, paths leaving the folder and module pickles that its JSON files name (json_paths)."""
    try:
        return [_short(str(f)) for f in json_paths.folder_findings(folder)]
    except InputError as e:  # a link out or a special file: inspect describes the folder, problems and all
        return [_short(str(e))]


def _layer_types(entries, quantized_names, module_rows) -> list[dict]:
    """One row per layer type: dense tensors by name pattern, quantized modules by module pattern."""
    rows: dict[tuple[str, str], dict] = {}
    for module, info in module_rows.items():
        row = rows.setdefault((layer_type(module), info["kind"]), {
            "layer_type": layer_type(module), "stored_as": info["kind"], "count": 0, "shapes": set(), "bytes": 0,
            "quantized_weights": 0})
        row["count"] += 1
        row["shapes"].add(str(info["shape"]))
        row["bytes"] += info["bytes"]
        row["quantized_weights"] += info["weights"]
    for name, e in entries.items():
        if name in quantized_names:
            continue
        row = rows.setdefault((layer_type(name), e.dtype), {
            "layer_type": layer_type(name), "stored_as": f"dense {e.dtype}", "count": 0, "shapes": set(),
            "bytes": 0, "quantized_weights": 0})
        row["count"] += 1
        row["shapes"].add(str(list(e.shape)))
        row["bytes"] += e.nbytes
    out = []
    for row in sorted(rows.values(), key=lambda r: r["layer_type"]):
        shapes = sorted(row.pop("shapes"))
        row["shape"] = shapes[0] if len(shapes) == 1 else "various"
        row["bits_per_weight"] = 8 * row["bytes"] / row["quantized_weights"] if row["quantized_weights"] else None
        out.append(row)
    return out


def _size(path: Path) -> int:
    """Bytes of a listed file, 0 if it vanished since it was listed (/proc, a folder being written)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _listed_files(folder: Path) -> tuple[list[Path], bool]:
    """Regular files under the folder (links not followed, unreadable folders skipped), at most MAX_LISTED_FILES."""
    found: list[Path] = []
    for current, dirs, names in os.walk(folder, onerror=lambda e: None, followlinks=False):
        dirs.sort()
        for name in sorted(names):
            path = Path(current) / name
            if not path.is_symlink() and path.is_file():
                found.append(path)
                if len(found) >= MAX_LISTED_FILES:
                    return found, True
    return found, False


def _manifest_problems(folder: Path, all_files: list[Path]) -> list[str]:
    """A qexport manifest names every file with its size: compare (sizes only, no hashing)."""
    problems: list[str] = []
    manifest = _load_json(folder / MANIFEST_FILE, problems)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        return problems
    listed = set()
    for f in manifest["files"]:
        if not isinstance(f, dict):
            problems.append(_short(f"{MANIFEST_FILE}: file entry {f!r:.80} is not an object"))
            continue
        path = folder / str(f.get("name"))
        try:
            safe_fs.resolve_inside(path, folder)
        except InputError:
            problems.append(_short(f"{f.get('name')!r:.120}: listed in {MANIFEST_FILE} but outside the folder"))
            continue
        listed.add(path)
        if not path.is_file():
            problems.append(f"{f.get('name')}: listed in {MANIFEST_FILE} but missing")
        elif path.stat().st_size != f.get("bytes"):
            problems.append(f"{f.get('name')}: {path.stat().st_size} bytes, {MANIFEST_FILE} says {f.get('bytes')}")
    for path in all_files:
        if path not in listed and path.name != MANIFEST_FILE:
            problems.append(_short(f"{path.relative_to(folder).as_posix()}: not listed in {MANIFEST_FILE}"))
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Text


def format_report(report: dict, all_tensors: bool = False) -> str:
    """The report as lines for a terminal. Every string in it comes from the folder (names, config values) and is
    made terminal_safe first: one name stays on one line and cannot forge one of these lines."""
    from qexport.report.escape import terminal_values
    from qexport.report.terminal import table
    from qexport.report.values import format_ratio, format_value, human_bytes

    report = terminal_values(report)

    t = report["totals"]
    arch = ", ".join(map(str, report["architectures"] if isinstance(report["architectures"], list) else [])) or "?"
    lines = [report["folder"], f"  architecture   {arch} (model_type {report['model_type'] or '?'})"]
    q = report["quantization"]
    if q is None:
        lines.append("  quantization   none in config.json")
    else:
        lines.append(f"  quantization   {q['quant_method']} {q['format'] or ''}, status "
                     f"{q['quantization_status'] or 'MISSING'}; ignore: {', '.join(map(str, q['ignore'])) or '-'}")
        for g in q["groups"]:
            detail = f"group {g['group_size']}" if g["strategy"] == "group" else g["strategy"]
            lines.append(f"                 {g['group']}: {', '.join(g['targets'] or [])} -> {g['type']}"
                         f"{g['num_bits']} {detail}, {'symmetric' if g['symmetric'] else 'asymmetric'}, "
                         f"format {g['format'] or '(none)'}")
    files = report["weight_files"]
    lines.append(f"  weights        {len(files)} file(s), {human_bytes(t['weight_file_bytes'])}, {t['tensors']} "
                 f"tensors" + (f": {files[0]['name']}" if len(files) == 1 else ""))
    lines.append("")
    rows = [{"layer type": r["layer_type"], "n": r["count"], "stored as": r["stored_as"], "shape": r["shape"],
             "bytes": r["bytes"], "bits/weight": r["bits_per_weight"]} for r in report["layer_types"]]
    lines.append(table(rows))
    if all_tensors:
        lines += ["", table([{"tensor": x["name"], "dtype": x["dtype"], "shape": x["shape"], "bytes": f"{x['bytes']:,}",
                              "quantized": "yes" if x["quantized"] else "no", "file": x["file"]}
                             for x in report["tensors"]])]
    lines += ["", f"total: {t['tensor_bytes']:,} tensor bytes ({human_bytes(t['tensor_bytes'])}) in "
                  f"{len(files)} weight file(s); folder {t['file_bytes']:,} bytes in {t['files']} files"]
    if t["quantized_weights"]:
        lines.append(f"quantized: {t['quantized_modules']} modules, {t['quantized_weights']:,} weights in "
                     f"{t['quantized_bytes']:,} bytes = {format_value(t['bits_per_quantized_weight'])} bits per "
                     f"weight ({format_ratio(t['quantized_ratio_vs_fp16'])} smaller than fp16; whole model "
                     f"{format_ratio(t['ratio_vs_fp16'])})")
    else:
        lines.append("quantized: nothing")
    if report["problems"]:
        lines.append(f"problems ({len(report['problems'])}):")
        lines += [f"  - {p}" for p in report["problems"]]
    else:
        lines.append("problems: none found")
    return "\n".join(lines)
