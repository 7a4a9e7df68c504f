"""Data-free scale search: per-group clipping of the quantization range, chosen by reconstruction error.

Round-to-nearest (quant.py) takes each group's full range: scale = absmax / 7.5 (symmetric) or (max - min) / 15
(asymmetric). A slightly smaller range rounds the bulk of the group more finely at the cost of clipping its
extremes; `search_qparams` tries the range shrunk by each factor of a grid (1.0, the round-to-nearest range,
first) and keeps, per group, the factor whose stored reconstruction -- the codes and scales exactly as the format
stores them, dequantized as loaders dequantize them -- has the lowest sum |w - ŵ|^norm. It needs no data and
changes only the scales (and zero points): the stored layout is the round-to-nearest one.

Laws (tests/unit/quant/test_clip_search.py): per group, the objective never exceeds round-to-nearest's (factor 1.0 is tried
first and replaced only by a strictly lower error); the codes are `quant.quantize*` of the weight for the
returned scales, so a reload dequantizes exactly what was scored.

norm 2 is weight MSE. Larger norms weigh large errors more (a clipped outlier is one); the default 2.4 is what
llm-compressor's MSE observer uses (with factors down to 0.8), and what measured best here (DEFAULT_NORM).
"""

from __future__ import annotations

import torch

from qexport.quant import primitives as quant
SHRINK_FACTORS = tuple(round(1.0 - 0.02 * i, 2) for i in range(11))  # 1.00, 0.98, ..., 0.80
# The exponent of the per-group error. Measured on SmolLM2-135M (bf16 scales, g64, bench/QUALITY.md): norm 2 lowered
# KLD 3% but raised perplexity; 2.4 lowered both (ppl 28.49 -> 28.12, KLD 0.385 -> 0.360). MiniLM cosine rose with
# either (g128: 0.946 -> 0.960 / 0.958).
DEFAULT_NORM = 2.4
_CHUNK_ELEMENTS = 1 << 22  # rows searched together: temporaries stay ~100 MB whatever the tensor size


def group_error(w: torch.Tensor, w_hat: torch.Tensor, group_size: int | None, norm: float) -> torch.Tensor:
    """Per-group sum of |w - ŵ|^norm in float32, [out, groups] (groups = 1 per channel when group_size is None)."""
    diff = (w.float() - w_hat.float()).abs_()
    return quant.group_view(diff.pow_(norm), group_size).sum(dim=-1)


def _symmetric(wc: torch.Tensor, absmax: torch.Tensor, factor: float, num_bits: int, group_size, dtype):
    qmin, qmax = quant.qrange(num_bits)
    scales = (absmax * factor / ((qmax - qmin) / 2)).to(dtype)  # as quant.compute_scales: fp32, then cast
    scales = torch.where(scales == 0, torch.tensor(torch.finfo(dtype).eps, dtype=dtype), scales)
    q = quant.quantize(wc, scales, num_bits, group_size)
    return scales, None, q, quant.dequantize(q, scales, group_size)


def _asymmetric(wc: torch.Tensor, low: torch.Tensor, high: torch.Tensor, factor: float, num_bits: int, group_size,
                dtype):
    qmin, qmax = quant.qrange(num_bits)
    # Every step in the scale dtype, as quant.compute_asymmetric_qparams (factor 1.0 gives its exact result).
    low, high = (low.float() * factor).to(dtype), (high.float() * factor).to(dtype)
    scales = (high - low) / torch.tensor(qmax - qmin, dtype=dtype)
    zero_points = (qmin - low / scales).clamp(qmin, qmax).nan_to_num_(0.0)
    scales = torch.where(scales == 0, torch.tensor(torch.finfo(dtype).eps, dtype=dtype), scales)
    zero_points = zero_points.round().to(torch.int8)
    q = quant.quantize_asymmetric(wc, scales, zero_points, num_bits, group_size)
    return scales, zero_points, q, quant.dequantize_asymmetric(q, scales, zero_points, group_size)


@torch.no_grad()
def search_qparams(w: torch.Tensor, num_bits: int, group_size: int | None, *, symmetric: bool = True,
                   dtype: torch.dtype = quant.SCALE_DTYPE, factors: tuple[float, ...] = SHRINK_FACTORS,
                   norm: float = DEFAULT_NORM) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(scales, zero points or None, codes) of a 2-D weight with each group's range clipped by the best factor.

    `w` is taken in the scale dtype first (as the formats quantize it). Shapes as quant.compute_scales /
    compute_asymmetric_qparams: scales [out, groups] in `dtype`, zero points int8 [out, groups], codes int8
    [out, in]. `factors` must start with 1.0 (round-to-nearest): it is the baseline every other factor must beat.
    """
    if not factors or factors[0] != 1.0:
        raise ValueError("factors must start with 1.0 (round-to-nearest)")
    rows, cols = w.shape
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    parts = [_search_rows(w[start:start + step].to(dtype), num_bits, group_size, symmetric, dtype, factors, norm)
             for start in range(0, rows, step)]
    scales = torch.cat([p[0] for p in parts])
    zero_points = None if symmetric else torch.cat([p[1] for p in parts])
    return scales, zero_points, torch.cat([p[2] for p in parts])


def _search_rows(wc, num_bits, group_size, symmetric, dtype, factors, norm):
    grouped = quant.group_view(wc, group_size)
    if symmetric:
        absmax = grouped.abs().amax(dim=-1).to(torch.float32)
        candidate = lambda f: _symmetric(wc, absmax, f, num_bits, group_size, dtype)  # noqa: E731
    else:
        low, high = grouped.amin(dim=-1).clamp(max=0), grouped.amax(dim=-1).clamp(min=0)
        candidate = lambda f: _asymmetric(wc, low, high, f, num_bits, group_size, dtype)  # noqa: E731
    best_scales, best_zp, _, w_hat = candidate(factors[0])
    best_err = group_error(wc, w_hat, group_size, norm)
    for factor in factors[1:]:
        scales, zp, _, w_hat = candidate(factor)
        err = group_error(wc, w_hat, group_size, norm)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scales = torch.where(better, scales, best_scales)
        if zp is not None:
            best_zp = torch.where(better, zp, best_zp)
    # Codes are elementwise in (weight, scale, zero point): quantizing again with the chosen ones gives exactly the
    # codes that were scored.
    if symmetric:
        return best_scales, None, quant.quantize(wc, best_scales, num_bits, group_size)
    return best_scales, best_zp, quant.quantize_asymmetric(wc, best_scales, best_zp, num_bits, group_size)
