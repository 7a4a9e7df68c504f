"""Per-tensor checks of the stored weights against the reference weights."""

from __future__ import annotations

import math

import torch

from qexport.verify.context import CheckResult, Context, fail, ok, skip


def check_weights(ctx: Context) -> CheckResult:
    """Per-tensor SQNR of the dequantized export vs the reference weights (scales off, nibbles swapped, ...)."""
    from qexport.quant.dequant import dequantized_count, iter_dequantized
    from qexport.verify.functional import sqnr_db

    name = "weights_sqnr"
    if ctx.ckpt is None:
        return skip(name, "shards unreadable")
    quantized_sqnr, dense_sqnr, problems = {}, {}, []
    total = dequantized_count(ctx.ckpt)
    # One tensor at a time: the export's (dequantized, float32) and the reference's, then both are dropped.
    for done, (tname, w_hat, is_quantized) in enumerate(iter_dequantized(ctx.ckpt, torch.float32), 1):
        ctx.step(done, total, "tensors")
        if tname not in ctx.reference.entries:
            continue
        w = ctx.reference.read(tname)
        if tuple(w.shape) != tuple(w_hat.shape):
            problems.append(f"{tname}: shape {list(w_hat.shape)}, reference {list(w.shape)}")
            continue
        if w_hat.is_floating_point() and not torch.isfinite(w_hat).all():
            problems.append(f"{tname}: dequantizes to NaN/Inf")
            continue
        if w.is_floating_point() and not torch.isfinite(w).all():
            # A NaN/Inf in the source makes every comparison of this tensor meaningless (SQNR NaN), and the
            # model it belongs to produces NaN outputs: nothing here can vouch for it.
            problems.append(f"{tname}: the reference holds NaN/Inf, so the export cannot be verified against it")
            continue
        if not w.is_floating_point():
            if not torch.equal(w, w_hat):
                problems.append(f"{tname}: integer tensor differs from the reference")
            continue
        value = sqnr_db(w, w_hat)  # float64 inside: the same as from w.float(), without that copy
        if math.isnan(value):
            problems.append(f"{tname}: SQNR is NaN")
            continue
        (quantized_sqnr if is_quantized else dense_sqnr)[tname] = value
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
        return fail(name, "; ".join(problems[:3]), **metrics)
    if quantized_sqnr:
        floor = "no floor" if thr.min_sqnr_db is None else f">= {thr.min_sqnr_db}"
        return ok(name, f"SQNR min {metrics['sqnr_min_db']:.2f} dB ({floor}), median "
                         f"{metrics['sqnr_median_db']:.2f} dB over {len(quantized_sqnr)} quantized tensors", **metrics)
    return ok(name, f"{len(dense_sqnr)} dense tensors match the reference (>= {thr.dense_min_sqnr_db} dB)", **metrics)

