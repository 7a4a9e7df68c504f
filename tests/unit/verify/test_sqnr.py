"""SQNR (20 log10 ||w|| / ||w - w_hat||) of the formats on seeded Gaussian weights and on an exported model.

Floors from measurement (docs/design.md): seeded Gaussian ~41 dB INT8 per channel, ~18.6-19 dB INT4 g128.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from qexport.quant.dequant import dequantize_module
from qexport.formats import get_format
from qexport.verify.functional import sqnr_db
from qexport.verify import Context, check_weights

SHAPES = [(256, 256), (512, 256), (768, 256), (256, 768), (384, 384)]


def gaussian(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def round_trip_sqnr(fmt: str, num_bits: int, w: torch.Tensor) -> float:
    stored = get_format(fmt).encode("m.weight", w, quantize=True)
    w_hat = dequantize_module({k.removeprefix("m."): v for k, v in stored.items()}, num_bits, torch.float32)
    return sqnr_db(w, w_hat)


@pytest.mark.parametrize("fmt,num_bits,floor_db", [("int8", 8, 40.0), ("int4", 4, 18.0)])
def test_gaussian_weights_reach_the_sqnr_floor(qexport_report, fmt, num_bits, floor_db):
    values = [round_trip_sqnr(fmt, num_bits, gaussian(shape, seed)) for seed, shape in enumerate(SHAPES)]
    qexport_report.metrics(sqnr_min_db=min(values), sqnr_median_db=statistics.median(values), floor_db=floor_db)
    assert min(values) >= floor_db


def test_int4_group_scales_beat_one_scale_per_channel_on_outlier_columns():
    # Why groups: one outlier in a row costs a per-channel scale the whole row, a group scale only its group.
    w = gaussian((256, 512), 7)
    w[:, 3] *= 50
    grouped = round_trip_sqnr("int4", 4, w)
    stored = get_format("int4", group_size=512).encode("m.weight", w, quantize=True)
    per_row = sqnr_db(w, dequantize_module({k.removeprefix("m."): v for k, v in stored.items()}, 4))
    assert grouped > per_row + 3


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_exported_model_weights_reach_the_format_floor(qexport_report, qwen3_src, export_model, fmt):
    out, _ = export_model(qwen3_src)
    ctx = Context(out / fmt, qwen3_src)
    result = check_weights(ctx)
    values = list(result.metrics["per_tensor_sqnr_db"].values())
    qexport_report.metrics(sqnr_min_db=result.metrics["sqnr_min_db"], floor_db=ctx.thresholds.min_sqnr_db,
                           tensors=len(values))
    qexport_report.row("qwen3 (tiny, random)", fmt, sqnr_min_db=result.metrics["sqnr_min_db"],
                       sqnr_median_db=result.metrics["sqnr_median_db"], sqnr_values=values)
    assert result.passed, result.detail
    assert len(values) == 14  # 2 layers x 7 Linears; lm_head stays dense


def test_fp16_export_keeps_dense_tensors_above_60_db(qwen3_src, export_model):
    out, _ = export_model(qwen3_src)
    result = check_weights(Context(out / "fp16", qwen3_src))
    assert result.passed, result.detail
    assert result.metrics["dense_sqnr_min_db"] >= 60
