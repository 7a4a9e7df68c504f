"""Checks that load the export through transformers and compare its outputs with the reference's.

`functional` holds the export to absolute bounds (a user's quality floor); `functional_vs_rtn` holds it to what its
own declared scheme achieves by plain round-to-nearest on the same reference (reference_quant), which is what
separates a broken export from a small or random model on which the scheme itself is lossy.
"""

from __future__ import annotations

import math

import torch

from qexport.verify.context import CheckResult, Context, fail, listing, ok, release_memory, skip


def check_reload(ctx: Context) -> CheckResult:
    """transformers loads the export with empty missing / unexpected / mismatched key lists (a `from_pretrained`
    onto the `meta` device: the same matching of names and shapes as a full load, no weight in memory)."""
    name = "reload"
    info = ctx.load_info()
    if info is None:
        return fail(name, f"transformers cannot load it: {ctx.info_error}", reload_ok=False)
    nonempty = {k: v for k, v in info.items() if v}
    if nonempty:
        detail = "; ".join(f"{k}: {listing(v, 3)}" for k, v in nonempty.items())
        return fail(name, f"loads, but loading info is not empty (weights are garbage): {detail}",
                     reload_ok=False, loading_info=info)
    return ok(name, f"{ctx.loaded_class} loads with empty loading info", reload_ok=True)


def check_reload_matches_dequant(ctx: Context) -> CheckResult:
    """transformers' decompression and qexport's own reading of the files give the same outputs."""
    name = "reload_matches_dequant"
    if ctx.load_info() is None or ctx.ckpt is None:
        return skip(name, "needs a reloaded model and readable shards")
    # Equality needs no statistics: one window of the text is enough (and a fraction of the compute).
    got = ctx.export_outputs(torch.float32, windows=1)
    if got is None:
        return skip(name, "needs a reloaded model and readable shards")
    loaded = got[0]
    ctx.unload()  # our dequantized model runs only after transformers' load is freed: one model at a time
    ours, _ = ctx.dequantized_outputs(windows=1)
    release_memory()
    diff, bit_exact = _max_abs_diff(loaded, ours)
    limit = ctx.thresholds.reload_max_abs_diff
    metrics = {"reload_vs_dequant_max_abs": diff, "bit_exact": bit_exact}
    how = ctx.whole_model_note("export float32", "own dequantization")
    if not diff <= limit:
        return fail(name, f"reloaded outputs differ from our dequantization by {diff:.3g} (> {limit:g}){how}",
                     **metrics)
    return ok(name, "reloaded outputs " + ("equal our dequantization bit for bit" if metrics["bit_exact"]
                                            else f"within {diff:.3g} of our dequantization") + how, **metrics)


def _max_abs_diff(a, b) -> tuple[float, bool]:
    """max |a - b| (NaN if either holds one) and whether a and b are equal, over tensors or LogitWindows."""
    from qexport.verify.functional import LogitWindows

    if not isinstance(a, LogitWindows):
        return (a - b).abs().max().item(), bool(torch.equal(a, b))
    if len(a) != len(b):
        raise ValueError(f"{len(a)} windows of outputs against {len(b)}")
    diffs, equal = [], True
    for x, y in zip(a, b):
        diffs.append((x - y).abs().max())
        equal = equal and bool(torch.equal(x, y))
    return torch.stack(diffs).max().item(), equal


def _candidate(ctx: Context):
    """(outputs, which model, its dtype) of the export: as transformers computes it in the dtype config.json
    names, else our own dequantization."""
    if ctx.candidate is None:
        got = ctx.export_outputs(ctx.config_dtype)  # in the dtype config.json names: the numbers users will see
        if got is not None:
            dtype, source = ctx.config_dtype, f"reloaded model ({str(ctx.config_dtype).removeprefix('torch.')})"
        elif ctx.ckpt is not None:
            got, dtype, source = ctx.dequantized_outputs(), torch.float32, "own dequantization (reload failed)"
        else:
            return None
        ctx.candidate = (got[0], source, dtype)
        release_memory()
    return ctx.candidate


def _how(ctx: Context, *roles: str) -> str:
    """The whole-model loads (and why) among the models a comparison of the candidate with the reference ran."""
    export = f"export {str(ctx.config_dtype).removeprefix('torch.')}"
    return ctx.whole_model_note(export, "own dequantization", "reference", *roles)


def _param_dtype(model) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _nonfinite(metrics: dict) -> list[str]:
    return [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]


def _ratio(value: float, reference: float) -> float:
    """value / reference; 1 when both are 0 (as close as the reference), +inf when only the reference is 0."""
    if reference > 0:
        return value / reference
    return 1.0 if value <= 0 else float("inf")


def _cosine_gap(cosine: float) -> float:
    """1 - cosine, 0 for a cosine rounded above 1 (a negative gap would put the limit `ratio x gap` below the gap
    itself: an export as exact as a lossless round-to-nearest failed with no slack); NaN stays NaN."""
    return 0.0 if cosine >= 1 else 1 - cosine


def _input_metrics(ctx: Context) -> dict:
    ids = ctx.inputs()["input_ids"]
    return {"inputs": ctx.input_kind, "windows": int(ids.shape[0]), "tokens": int(ids.numel())}


def check_finite_outputs(ctx: Context) -> CheckResult:
    """Both loads of the export -- float32 and the dtype config.json names, which is how users load it -- run the
    fixed inputs to finite outputs. An fp16 export of a model whose activations pass 65504 fails here, naming the
    first module (and decoder layer) where NaN/Inf appears."""
    from qexport.verify.functional import dtype_name, outputs_with_nonfinite

    name = "finite_outputs"
    dtypes = list(dict.fromkeys([torch.float32, ctx.config_dtype]))
    problems, ran = [], []
    metrics = {"config_dtype": dtype_name(ctx.config_dtype)}
    for dtype in dtypes:
        got = ctx.export_outputs(dtype, run=lambda model: outputs_with_nonfinite(model, ctx.outputs))
        if got is None:
            continue  # the reload check reports why transformers cannot load it
        (outputs, nonfinite), _ = got
        if dtype == ctx.config_dtype and ctx.candidate is None:  # what `functional` compares: no second run
            source = f"reloaded model ({str(dtype).removeprefix('torch.')})"
            ctx.candidate = (outputs, source, dtype)
        del outputs, got  # the next dtype's run frees this one: no name here may keep it alive
        ran.append(dtype_name(dtype))
        metrics[f"nonfinite_share_{dtype_name(dtype)}"] = 0.0 if nonfinite is None else nonfinite.share
        if nonfinite is not None:
            problems.append(nonfinite.describe(dtype))
            metrics[f"nonfinite_first_{dtype_name(dtype)}"] = nonfinite.module
            metrics[f"nonfinite_layer_{dtype_name(dtype)}"] = nonfinite.layer
    how = ctx.whole_model_note(*(f"export {d}" for d in ran))
    if problems:
        return fail(name, "; ".join(problems) + how, **metrics)
    if not ran:
        return skip(name, "transformers cannot load the export")
    return ok(name, f"outputs finite when loaded in {' and '.join(ran)} (config.json: "
                     f"{metrics['config_dtype']}){how}", **metrics)


def check_functional(ctx: Context) -> CheckResult:
    """Next-token KLD / top-1 / perplexity (causal LM) or pooled-embedding cosine (encoder) vs the reference,
    against the absolute thresholds; any non-finite metric fails."""
    from qexport.verify.functional import compare, perplexity

    name = "functional"
    candidate = _candidate(ctx)
    if candidate is None:
        return skip(name, "no model: reload failed and shards unreadable")
    outputs, source, _ = candidate
    reference = ctx.reference_outputs()
    metrics = {k: v for k, v in compare(reference, outputs).as_dict().items() if v is not None}
    if ctx.is_causal and ctx.input_kind == "text":
        ids = ctx.inputs()["input_ids"]
        metrics["ppl_reference"] = perplexity(reference, ids)
        metrics["ppl_export"] = perplexity(outputs, ids)
    bad = _nonfinite(metrics)
    metrics.update(_input_metrics(ctx))
    if bad:
        return fail(name, f"{source}: non-finite metrics: " + ", ".join(f"{k} {metrics[k]}" for k in bad),
                     **metrics)
    thr = ctx.thresholds
    bounds = [("kld_mean", thr.max_kld_mean, False), ("kld_p99", thr.max_kld_p99, False),
              ("top1", thr.min_top1, True)] if ctx.is_causal else [("cosine", thr.min_cosine, True)]
    problems = []
    for key, limit, at_least in bounds:
        value = metrics.get(key)
        if limit is None or value is None:
            continue
        if not ((value >= limit) if at_least else (value <= limit)):
            problems.append(f"{key} {value:.4g} {'<' if at_least else '>'} {limit:g}")
    shown = [f"{k} {metrics[k]:.4g}" for k, _, _ in bounds if k in metrics]
    if "ppl_export" in metrics:
        shown.append(f"ppl {metrics['ppl_export']:.4g} (reference {metrics['ppl_reference']:.4g})")
    where = f"{source} on {metrics['tokens']} tokens of {ctx.input_kind}"
    how = _how(ctx)
    if problems:
        return fail(name, f"{where}: " + "; ".join(problems) + how, **metrics)
    return ok(name, f"{where}: " + ", ".join(shown) + how, **metrics)


def check_functional_vs_rtn(ctx: Context) -> CheckResult:
    """The export is about as close to the reference as round-to-nearest of its own declared scheme, or closer.

    Causal LM: KLD_export <= max_kld_vs_rtn * KLD_rtn + kld_vs_rtn_slack and top1_export >= top1_rtn -
    max_top1_drop_vs_rtn. Encoder: (1 - cos_export) <= max_cosine_gap_vs_rtn * (1 - cos_rtn) + cosine_vs_rtn_slack.
    """
    from qexport.verify.functional import compare, perplexity
    from qexport.verify.reference_quant import UnsupportedScheme

    name = "functional_vs_rtn"
    if not isinstance(ctx.qc, dict) or not ctx.qc.get("config_groups"):
        return skip(name, "no quantization_config: a dense export has no scheme to reproduce")
    candidate = _candidate(ctx)
    if candidate is None:
        return skip(name, "no model: reload failed and shards unreadable")
    outputs, source, dtype = candidate
    try:
        rtn = ctx.rtn_outputs(dtype)
    except UnsupportedScheme as e:
        return skip(name, f"no round-to-nearest reference for the declared scheme: {e}")
    reference = ctx.reference_outputs()
    ours, theirs = compare(reference, outputs), compare(reference, rtn)
    thr = ctx.thresholds
    metrics, problems, shown = {}, [], []
    if ctx.is_causal:
        metrics = {"kld_mean": ours.kld_mean, "top1": ours.top1, "rtn_kld_mean": theirs.kld_mean,
                   "rtn_kld_p99": theirs.kld_p99, "rtn_top1": theirs.top1}
        if ctx.input_kind == "text":
            metrics["rtn_ppl"] = perplexity(rtn, ctx.inputs()["input_ids"])
        metrics["kld_ratio_vs_rtn"] = _ratio(ours.kld_mean, theirs.kld_mean)
        metrics["top1_drop_vs_rtn"] = theirs.top1 - ours.top1
        bad = _nonfinite({k: v for k, v in metrics.items() if k != "kld_ratio_vs_rtn"})
        ratio = f"{metrics['kld_ratio_vs_rtn']:.3g}x"
        if not bad and thr.max_kld_vs_rtn is not None:
            limit = thr.max_kld_vs_rtn * theirs.kld_mean + thr.kld_vs_rtn_slack
            text = (f"KLD {ours.kld_mean:.4g} = {ratio} round-to-nearest's {theirs.kld_mean:.4g} "
                    f"(limit {thr.max_kld_vs_rtn:g}x + {thr.kld_vs_rtn_slack:g})")
            (shown if ours.kld_mean <= limit else problems).append(text)
        if not bad and thr.max_top1_drop_vs_rtn is not None:
            text = (f"top-1 {ours.top1:.4g} vs round-to-nearest's {theirs.top1:.4g} "
                    f"(may drop {thr.max_top1_drop_vs_rtn:g})")
            (shown if ours.top1 >= theirs.top1 - thr.max_top1_drop_vs_rtn else problems).append(text)
    else:
        gap, rtn_gap = _cosine_gap(ours.cosine), _cosine_gap(theirs.cosine)
        metrics = {"cosine": ours.cosine, "rtn_cosine": theirs.cosine,
                   "cosine_gap_ratio_vs_rtn": _ratio(gap, rtn_gap)}
        bad = _nonfinite({k: v for k, v in metrics.items() if k != "cosine_gap_ratio_vs_rtn"})
        if not bad and thr.max_cosine_gap_vs_rtn is not None:
            limit = thr.max_cosine_gap_vs_rtn * rtn_gap + thr.cosine_vs_rtn_slack
            text = (f"1 - cosine {gap:.4g} = {metrics['cosine_gap_ratio_vs_rtn']:.3g}x round-to-nearest's "
                    f"{rtn_gap:.4g} (limit {thr.max_cosine_gap_vs_rtn:g}x + {thr.cosine_vs_rtn_slack:g})")
            (shown if gap <= limit else problems).append(text)
    metrics.update(_input_metrics(ctx))
    if bad:
        return fail(name, f"{source}: non-finite metrics: " + ", ".join(f"{k} {metrics[k]}" for k in bad),
                     **metrics)
    how = _how(ctx, "round-to-nearest")
    if problems:
        return fail(name, f"{source}: worse than round-to-nearest of its own scheme: " + "; ".join(problems) + how,
                     **metrics)
    if not shown:
        return ok(name, f"{source}: no relative bound set{how}", **metrics)
    return ok(name, f"{source}: " + "; ".join(shown) + how, **metrics)
