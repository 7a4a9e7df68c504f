"""Checks that load the export through transformers and compare its outputs with the reference's."""

from __future__ import annotations

import torch

from .context import CheckResult, Context, _fail, _listing, _ok, _skip


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


def check_finite_outputs(ctx: Context) -> CheckResult:
    """Both loads of the export -- float32 and the dtype config.json names, which is how users load it -- run the
    fixed inputs to finite outputs. An fp16 export of a model whose activations pass 65504 fails here, naming the
    first module (and decoder layer) where NaN/Inf appears."""
    from ..functional import dtype_name, outputs_with_nonfinite

    name = "finite_outputs"
    dtypes = list(dict.fromkeys([torch.float32, ctx.config_dtype]))
    problems, ran = [], []
    metrics = {"config_dtype": dtype_name(ctx.config_dtype)}
    for dtype in dtypes:
        loaded = ctx.load(dtype)
        if loaded is None:
            continue  # the reload check reports why transformers cannot load it
        _, nonfinite = outputs_with_nonfinite(loaded[0], ctx.outputs)
        ran.append(dtype_name(dtype))
        metrics[f"nonfinite_share_{dtype_name(dtype)}"] = 0.0 if nonfinite is None else nonfinite.share
        if nonfinite is not None:
            problems.append(nonfinite.describe(dtype))
            metrics[f"nonfinite_first_{dtype_name(dtype)}"] = nonfinite.module
            metrics[f"nonfinite_layer_{dtype_name(dtype)}"] = nonfinite.layer
    if problems:
        return _fail(name, "; ".join(problems), **metrics)
    if not ran:
        return _skip(name, "transformers cannot load the export")
    return _ok(name, f"outputs finite when loaded in {' and '.join(ran)} (config.json: "
                     f"{metrics['config_dtype']})", **metrics)


def check_functional(ctx: Context) -> CheckResult:
    """Next-token KLD / top-1 (causal LM) or pooled-embedding cosine (encoder) vs the reference model."""
    from ..functional import compare

    name = "functional"
    loaded = ctx.user_load()  # in the dtype config.json names: the numbers users will see
    if loaded is not None:
        model, source = loaded[0], f"reloaded model ({str(ctx.config_dtype).removeprefix('torch.')})"
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
