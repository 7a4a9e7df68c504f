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


def check_functional(ctx: Context) -> CheckResult:
    """Next-token KLD / top-1 (causal LM) or pooled-embedding cosine (encoder) vs the reference model."""
    from ..functional import compare

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
