"""Checks of config.json: model_type, every source key, and a quantization_config loaders read right."""

from __future__ import annotations

from qexport.verify.context import (CHANGED_BY_EXPORT, PACKED_FORMATS, UNPACKED_FORMATS, CheckResult, Context, fail, listing, ok,
                      json_equal)


def check_model_type(ctx: Context) -> CheckResult:
    name = "model_type"
    if ctx.config is None:
        return fail(name, f"config.json: {ctx.config_error}")
    expected = ctx.reference.config["model_type"]
    found = ctx.config.get("model_type")
    if not found:
        return fail(name, f"config.json has no model_type (transformers says 'Unrecognized model'); "
                           f"the reference has {expected!r}")
    if found != expected:
        return fail(name, f"config.json model_type is {found!r}, the reference has {expected!r}")
    return ok(name, f"model_type {found!r} as in the reference")


def check_config_keys(ctx: Context) -> CheckResult:
    """Every source key survives unchanged (except dtype and the quantization config), and AutoConfig reloads it."""
    name = "config_keys"
    if ctx.config is None:
        return fail(name, f"config.json: {ctx.config_error}")
    ref = ctx.reference.config
    missing = [k for k in ref if k not in CHANGED_BY_EXPORT and k not in ctx.config]
    changed = [k for k in ref
               if k not in CHANGED_BY_EXPORT and k in ctx.config and not json_equal(ctx.config[k], ref[k])]
    metrics = {"missing_keys": missing, "changed_keys": changed}
    if missing or changed:
        parts = ([f"missing {listing(missing)}"] if missing else []) + (
            [f"changed {listing(changed)}"] if changed else [])
        return fail(name, "config.json vs reference: " + "; ".join(parts), **metrics)
    try:
        from transformers import AutoConfig

        from qexport.io.library_guard import LOAD_KWARGS
        from qexport.model.quiet import quiet

        # model_type is compared above as a source key; the class AutoConfig picks for it can carry another name
        # (gpt-sw3 loads as gpt2) in the reference as much as in the export, so that is no defect of the export.
        with quiet():
            AutoConfig.from_pretrained(str(ctx.export), **LOAD_KWARGS)
    except Exception as e:
        return fail(name, f"AutoConfig.from_pretrained fails: {type(e).__name__}: {e}", **metrics)
    return ok(name, f"all {len(ref)} source keys kept; AutoConfig round trip ok", **metrics)


def check_quantization_config(ctx: Context) -> CheckResult:
    """A quantization_config that transformers loads correctly (docs/design.md: what goes wrong without each key)."""
    name = "quantization_config"
    if ctx.config is None:
        return fail(name, f"config.json: {ctx.config_error}")
    qc = ctx.qc
    has_int = ctx.ckpt is not None and any(
        not e.dtype.startswith(("F", "BF")) and n.rpartition(".")[2] in ("weight", "weight_packed")
        for n, e in ctx.ckpt.entries.items())
    if qc is None:
        if has_int:
            return fail(name, "config.json has no quantization_config but the shards hold integer weights")
        return ok(name, "dense export: no quantization_config, no integer weights")
    if not isinstance(qc, dict):
        return fail(name, "quantization_config is not an object")
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
        return fail(name, "; ".join(problems))
    return ok(name, f"compressed-tensors {fmt}, status compressed, {len(groups)} config group(s)")

