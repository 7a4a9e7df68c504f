"""Checks of the stored files: shards and index, manifest hashes, tensor names, packing layout, bytes."""

from __future__ import annotations

import math

from qexport.io.checkpoint import INDEX_FILE, MANIFEST_FILE
from qexport.report.values import format_ratio, format_value
from qexport.io.safetensors_file import sha256_file
from qexport.io.sizes import size_summary
from qexport.io.json_paths import path_problem
from qexport.quant.scheme import LINEAR, weights_args
from qexport.verify.context import (
    CARD_FILE,
    PACKED_FORMATS,
    UNPACKED_FORMATS,
    CheckResult,
    Context,
    fail,
    listing,
    ok,
    skip,
)


def check_shards(ctx: Context) -> CheckResult:
    name = "shards"
    if ctx.ckpt is None:
        return fail(name, ctx.ckpt_error)
    files = ctx.ckpt.files
    how = "index and shards agree both ways" if (ctx.export / INDEX_FILE).is_file() else "single file"
    return ok(name, f"{len(files)} file(s), {len(ctx.ckpt.entries)} stored tensors; {how}",
               files=[p.name for p in files])


def check_manifest(ctx: Context) -> CheckResult:
    """Every file the manifest lists has its recorded size and sha256 (a byte changed after export fails here)."""
    name = "manifest"
    if ctx.manifest is None and ctx.manifest_error is None:
        return skip(name, f"no {MANIFEST_FILE} (not written by qexport): file hashes not checked")
    if ctx.manifest is None:
        return fail(name, f"{MANIFEST_FILE}: {ctx.manifest_error}")
    problems = []
    listed = set()
    for record in ctx.manifest.get("files", []):
        where = record.get("name") if isinstance(record, dict) else None
        problem = "not a file name" if not isinstance(where, str) or not where else path_problem(where, ctx.export,
                                                                                                 ctx.export)
        if problem is not None:  # never stat or hash a file outside the export
            problems.append(f"{MANIFEST_FILE} entry {str(where)[:120]!r}: {problem}")
            continue
        listed.add(record["name"])
        path = ctx.export / record["name"]
        if record["name"] == CARD_FILE:  # as read with the manifest, not as another run may have rewritten it since
            size, sha = ctx.card_record or (None, None)
        else:
            size, sha = (path.stat().st_size, None) if path.is_file() else (None, None)
        if size is None:
            problems.append(f"{record['name']} is listed but missing")
        elif size != record.get("bytes"):
            problems.append(f"{record['name']} is {size} bytes, manifest says {record.get('bytes')}")
        elif (sha or sha256_file(path, root=ctx.export)) != record.get("sha256"):
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
        return fail(name, "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else ""),
                     problems=problems)
    return ok(name, f"{len(listed)} files match their recorded size and sha256", files_checked=len(listed))


def check_tensor_names(ctx: Context) -> CheckResult:
    """The export stores every reference tensor (quantized or dense) once, nothing else; tied ones only once."""
    from qexport.quant.dequant import quantized_modules

    name = "tensor_names"
    if ctx.ckpt is None:
        return skip(name, "shards unreadable")
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
        problems.append(f"tied tensor(s) {listing(twice)} stored again (tie_word_embeddings: store once)")
    if missing:
        problems.append(f"missing {listing(missing)}")
    if extra:
        problems.append(f"not in the reference: {listing(extra)}")
    metrics = {"missing": missing, "extra": extra, "tied_stored_twice": twice}
    if problems:
        return fail(name, "; ".join(problems), **metrics)
    # Counted by the reference's names: a quantized weight is one name here, several stored tensors in `shards`.
    return ok(name, f"{len(stored)} tensors by reference name ({len(quantized)} quantized), as in the reference"
               + (f"; {len(tied)} tied stored once" if tied else ""), **metrics)


def _module_layout(ctx: Context, module: str, parts: dict[str, str]) -> list[str]:
    """What is wrong with one quantized module's stored tensors, given the config and the reference shape."""
    entries = ctx.ckpt.entries
    ref = ctx.reference.entries.get(f"{module}.weight")
    if ref is None or len(ref.shape) != 2:
        return [f"{module}: quantized but the reference has no 2-D {module}.weight"]
    rows, cols = ref.shape
    args = weights_args(ctx.qc or {}, module, LINEAR if f"{module}.weight" in ctx.arch.linear_weights else ())
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
    if args.get("symmetric", True) is False and scale is not None and len(scale.shape) == 2:
        zp = entries.get(parts.get("weight_zero_point", ""))
        # pack-quantized packs zero points along the output dimension; naive / int-quantized store one per group
        want = ("I32", (math.ceil(rows * bits / 32), scale.shape[1])) if "weight_packed" in parts \
            else (None, (rows, scale.shape[1]))
        if zp is None:
            problems.append(f"{module}: asymmetric (symmetric: false) but no weight_zero_point")
        elif tuple(zp.shape) != want[1] or want[0] not in (None, zp.dtype):
            problems.append(f"{module}.weight_zero_point is {zp.dtype} {list(zp.shape)}, expected "
                            f"{want[0] or ''} {list(want[1])}".replace("  ", " "))
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
    from qexport.quant.dequant import quantized_modules

    name = "layout"
    if ctx.ckpt is None:
        return skip(name, "shards unreadable")
    quantized = quantized_modules(ctx.ckpt)
    if not quantized:
        if ctx.qc:
            return fail(name, "quantization_config present but no module is stored quantized")
        return ok(name, "dense export: no quantized modules")
    if not isinstance(ctx.qc, dict):
        return fail(name, f"{len(quantized)} modules stored quantized but config.json has no quantization_config")
    problems = []
    for module, parts in sorted(quantized.items()):
        problems += _module_layout(ctx, module, parts)
    for weight in sorted(ctx.arch.linear_weights & set(ctx.ckpt.entries)):
        module = weight.removesuffix(".weight")
        if module not in quantized and weights_args(ctx.qc, module) is not None:
            problems.append(f"{module}: a targeted Linear stored dense and not in ignore")
    if problems:
        return fail(name, f"{len(problems)} problem(s): " + "; ".join(problems[:3])
                     + ("; ..." if len(problems) > 3 else ""), problems=problems)
    return ok(name, f"{len(quantized)} quantized modules match the config")


def _predicted_module_bytes(ctx: Context, module: str, parts: dict[str, str]) -> int:
    """Bytes of a quantized module as its config predicts: codes at num_bits (in int32 words when packed, with the
    int64 [2] `weight_shape`), one scale per channel / group / tensor in the config's dtype (compressed-tensors
    stores scales in the model dtype), and zero points or g_idx as stored (their layouts vary between tools)."""
    rows, cols = ctx.reference.entries[f"{module}.weight"].shape
    args = weights_args(ctx.qc or {}, module) or {}
    bits = args.get("num_bits", 8)
    # Codes below 8 bits are only right packed: one per byte (naive layout) is predicted, and fails, as packed.
    codes = rows * math.ceil(cols * bits / 32) * 4 if bits < 8 or "weight_packed" in parts else rows * cols
    if "weight_packed" in parts:
        codes += 16  # weight_shape, int64 [2]
    strategy, group_size = args.get("strategy"), args.get("group_size")
    scales = 1 if strategy == "tensor" else rows * (cols // group_size if strategy == "group" and group_size else 1)
    other = sum(ctx.ckpt.entries[p].nbytes for leaf, p in parts.items()
                if leaf not in ("weight", "weight_packed", "weight_shape", "weight_scale"))
    return codes + scales * ctx.config_dtype.itemsize + other


def check_bytes(ctx: Context) -> CheckResult:
    """Stored bytes equal predicted bytes per tensor and per file; a quantized module stores no more than its
    declared scheme needs (packed codes, one scale per channel or group in the model dtype)."""
    from qexport.quant.dequant import quantized_modules

    name = "bytes"
    if ctx.ckpt is None:
        return skip(name, "shards unreadable")
    problems = []
    entries = ctx.ckpt.entries
    # Every file's bytes are its header's and its tensors': read_header refuses bytes that belong to no tensor, and a
    # file it refuses leaves ctx.ckpt None (this check skips, `shards` fails).
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
        reference = ctx.reference.entries.get(f"{module}.weight")
        if reference is None or len(reference.shape) != 2:
            continue  # reported by layout ("quantized but the reference has no 2-D ...") / tensor_names
        rows, cols = reference.shape
        stored = sum(entries[p].nbytes for p in parts.values())
        predicted = _predicted_module_bytes(ctx, module, parts)
        if stored > predicted:
            problems.append(f"{module}: stores {stored} bytes, its config predicts {predicted}")
        q_weights, q_bytes, q_predicted = q_weights + rows * cols, q_bytes + stored, q_predicted + predicted
    # Share of the body's Linear weights stored quantized (all nn.Linear weights but the output head, lm_head,
    # which stays dense by convention): a g128 export of a hidden-576 model would show most of them dense here.
    body = {n: math.prod(ctx.reference.entries[n].shape) for n in ctx.arch.linear_weights - ctx.arch.tied_names
            if n in ctx.reference.entries and n.removesuffix(".weight").rpartition(".")[2] != "lm_head"}
    quantized_body = [n for n in body if n.removesuffix(".weight") in quantized]
    in_modules = {p for module, parts in quantized.items() if f"{module}.weight" in ctx.reference.entries
                  for p in parts.values()}
    sizes = size_summary([(e.dtype, e.shape, e.nbytes) for n, e in entries.items() if n not in in_modules],
                         q_weights, q_bytes)
    # The names the verify metrics (baselines, reports) have always used for the shared definitions in qexport.io.sizes.
    metrics = {"linear_weights": len(body), "quantized_linears": len(quantized_body),
               "quantized_linear_share": sum(body[n] for n in quantized_body) / sum(body.values()) if body else None,
               "weight_bytes": sum(p.stat().st_size for p in ctx.ckpt.files), "file_ratio": sizes["ratio_vs_fp16"],
               "quantized_weights": q_weights, "quantized_bytes": q_bytes,
               "quantized_ratio": sizes["quantized_ratio_vs_fp16"],
               "bits_per_quantized_weight": sizes["bits_per_quantized_weight"]}
    if q_bytes:
        metrics["predicted_quantized_ratio"] = 2 * q_weights / q_predicted
    # The gate above is "no more bytes than the declared scheme needs". The ratio floor is a separate, opt-in
    # quality bar on the scheme itself (off by default: smaller groups are a legitimate choice that costs bytes).
    floor = ctx.thresholds.min_quantized_ratio
    if q_bytes and floor is not None and metrics["quantized_ratio"] < floor:
        problems.append(f"quantized tensors compress {format_ratio(metrics['quantized_ratio'])} vs fp16, need >= "
                        f"{format_ratio(floor)} ({format_value(metrics['bits_per_quantized_weight'])} bits per "
                        "weight)")
    if problems:
        return fail(name, "; ".join(problems[:4]) + ("; ..." if len(problems) > 4 else ""), problems=problems,
                     **metrics)
    ratio = f"quantized {format_ratio(metrics['quantized_ratio'])}, " if q_bytes else ""
    if q_bytes and body:
        ratio = (f"{len(quantized_body)}/{len(body)} Linears quantized "
                 f"({100 * metrics['quantized_linear_share']:.1f}% of their bytes), {ratio}")
    return ok(name, f"stored == predicted; {ratio}whole model {format_ratio(metrics['file_ratio'])} vs fp16",
               **metrics)

