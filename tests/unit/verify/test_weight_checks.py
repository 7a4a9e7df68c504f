"""verify's per-tensor weight check (qexport/verify/weight_checks.py, `weights_sqnr`) called directly on
hand-written folders: a reference of three bf16 tensors and its exports written in tmp_path with qexport's
quantization primitives, no model built or exported. docs/design.md: SQNR = 20 log10(||w|| / ||w - w_hat||) per
tensor, min and median reported over quantized tensors; dense tensors must be the reference rounded to fp16."""

from __future__ import annotations

import pytest
import torch

from qexport.verify.thresholds import thresholds_for
from qexport.verify import weight_checks
from tests.support.unit_verify import (
    DOWN,
    NORM,
    UP,
    config_with,
    context,
    int4_module,
    named,
    qc,
    reference_folder,
    reference_weights,
    sqnr,
    write_folder,
)

# the check reports under the name `verify --only`, reports and baselines know it by
check_weights = named(weight_checks.check_weights, "weights_sqnr")


ref = pytest.fixture(scope="module", name="ref")(reference_folder)


def int4_export(tmp_path, extra=None):
    """An int4 g16 export of the reference (norm in fp16) and the SQNR of each quantized tensor, measured here."""
    w = reference_weights()
    tensors, measured = {NORM: w[NORM].half()}, {}
    for module in (DOWN, UP):
        stored, w_hat = int4_module(module, w[f"{module}.weight"])
        tensors |= stored
        measured[f"{module}.weight"] = sqnr(w[f"{module}.weight"], w_hat)
    folder = write_folder(tmp_path / "int4", tensors | (extra or {}), config_with(quantization_config=qc()))
    return folder, measured


def fp16_export(tmp_path, change=None):
    tensors = {k: v.half() for k, v in reference_weights().items()}
    if change:
        change(tensors)
    return write_folder(tmp_path / "fp16", tensors)


def check(folder, ref, **thresholds):
    fmt = "int4" if folder.name == "int4" else "fp16"
    return check_weights(context(folder, ref, vars(thresholds_for(fmt)) | thresholds))


def test_good_int4_export_reports_each_quantized_tensors_sqnr_and_passes(tmp_path, ref):
    folder, measured = int4_export(tmp_path)
    result = check(folder, ref)
    assert result.passed
    assert result.metrics["per_tensor_sqnr_db"] == {k: round(v, 3) for k, v in measured.items()}
    assert result.metrics["sqnr_min_db"] == pytest.approx(min(measured.values()), abs=1e-9)
    # of two values the median is the upper one (values[len // 2])
    assert result.metrics["sqnr_median_db"] == pytest.approx(max(measured.values()), abs=1e-9)
    assert result.metrics["sqnr_worst"] == min(measured, key=measured.get)
    # bf16 values are exact in fp16: the dense norm is the reference itself
    assert result.metrics["dense_sqnr_min_db"] == float("inf")
    assert result.detail == (f"SQNR min {min(measured.values()):.2f} dB (>= 13.0), median "
                             f"{max(measured.values()):.2f} dB over 2 quantized tensors")


def test_the_median_of_three_quantized_tensors_is_the_middle_one(tmp_path):
    w = reference_weights() | {"model.layers.0.self_attn.o_proj.weight": (torch.randn(32, 32) * 0.05).bfloat16()}
    ref = write_folder(tmp_path / "ref", w)
    tensors, measured = {NORM: w[NORM].half()}, {}
    for name, group_size in ((f"{DOWN}.weight", 16), (f"{UP}.weight", 32), ("model.layers.0.self_attn.o_proj.weight", 8)):
        stored, w_hat = int4_module(name.removesuffix(".weight"), w[name], group_size)
        tensors |= stored
        measured[name] = sqnr(w[name], w_hat)
    folder = write_folder(tmp_path / "int4", tensors, config_with(quantization_config=qc()))
    values = sorted(measured.values())
    assert values[0] < values[1] < values[2]
    result = check(folder, ref)
    assert result.metrics["sqnr_median_db"] == pytest.approx(values[1], abs=1e-9)
    assert result.detail.endswith(f"median {values[1]:.2f} dB over 3 quantized tensors")
    # the worst is up_proj (the coarsest groups), not the first name in order
    worst = min(measured, key=measured.get)
    assert worst == f"{UP}.weight" and result.metrics["sqnr_worst"] == worst


def test_a_quantized_tensor_below_the_floor_fails_naming_the_worst(tmp_path, ref):
    folder, measured = int4_export(tmp_path)
    worst, low = min(measured, key=measured.get), min(measured.values())
    floor = (low + max(measured.values())) / 2  # between the two: one tensor below
    result = check(folder, ref, min_sqnr_db=floor)
    assert not result.passed
    assert result.detail == f"1 quantized tensor(s) below {floor} dB SQNR, worst {worst} at {low:.2f} dB"
    result = check(folder, ref, min_sqnr_db=max(measured.values()) + 1)
    assert result.detail.startswith("2 quantized tensor(s) below ")


def test_a_tensor_exactly_at_the_floor_passes(tmp_path, ref):
    folder, measured = int4_export(tmp_path)
    floor = check(folder, ref).metrics["sqnr_min_db"]
    assert floor == pytest.approx(min(measured.values()), abs=1e-9)
    assert check(folder, ref, min_sqnr_db=floor).passed


def test_no_floor_passes_any_sqnr_and_says_so(tmp_path, ref):
    folder, _ = int4_export(tmp_path)
    result = check(folder, ref, min_sqnr_db=None)
    assert result.passed and "(no floor)" in result.detail


def test_a_dense_export_passes_counting_its_tensors(tmp_path, ref):
    result = check(fp16_export(tmp_path), ref)
    assert result.passed and result.detail == "3 dense tensors match the reference (>= 60.0 dB)"
    assert result.metrics == {"per_tensor_sqnr_db": {}, "dense_sqnr_min_db": float("inf")}


def test_tensors_the_reference_does_not_have_are_left_to_tensor_names(tmp_path, ref):
    folder = fp16_export(tmp_path, lambda t: t.update({"model.extra.weight": torch.ones(4, dtype=torch.float16)}))
    result = check(folder, ref)
    assert result.passed and result.detail.startswith("3 dense tensors match")


def noisy(t: torch.Tensor, db: float) -> torch.Tensor:
    """t plus a perturbation at `db` SQNR (a deterministic alternating sign pattern)."""
    signs = torch.ones(t.numel()).reshape(t.shape)
    signs.view(-1)[1::2] = -1
    noise = signs * t.float().norm() / t.numel() ** 0.5 * 10 ** (-db / 20)
    return t.float() + noise


def test_a_dense_tensor_below_the_dense_floor_fails_naming_it(tmp_path, ref):
    # a dense tensor that is not the reference rounded to fp16 (e.g. rounded through int8): 40 dB
    w = reference_weights()[NORM]
    folder = fp16_export(tmp_path, lambda t: t.update({NORM: noisy(w, 40).half()}))
    measured = sqnr(w, noisy(w, 40).half())
    result = check(folder, ref)
    assert not result.passed
    assert result.detail == (f"dense tensor {NORM} at {measured:.2f} dB SQNR (need >= 60.0 dB: it should be the "
                             "reference rounded to fp16)")
    assert result.metrics["dense_sqnr_min_db"] == pytest.approx(measured, abs=1e-9)


def test_a_dense_tensor_at_the_dense_floor_passes(tmp_path, ref):
    w = reference_weights()[NORM]
    folder = fp16_export(tmp_path, lambda t: t.update({NORM: noisy(w, 40).half()}))
    floor = check(folder, ref).metrics["dense_sqnr_min_db"]
    assert floor == pytest.approx(sqnr(w, noisy(w, 40).half()), abs=1e-9)
    assert check(folder, ref, dense_min_sqnr_db=floor).passed


def test_only_tensors_below_the_floor_are_counted(tmp_path, ref):
    folder, measured = int4_export(tmp_path)
    result = check(folder, ref, min_sqnr_db=max(measured.values()))  # the better tensor sits at the floor
    assert not result.passed and result.detail.startswith("1 quantized tensor(s) below ")


def test_a_dense_tensor_exactly_at_the_dense_floor_passes(tmp_path, ref):
    w = reference_weights()[NORM]
    folder = fp16_export(tmp_path, lambda t: t.update({NORM: noisy(w, 40).half()}))
    measured = sqnr(w, noisy(w, 40).half())
    assert check(folder, ref, dense_min_sqnr_db=measured - 1e-9).passed
    assert not check(folder, ref, dense_min_sqnr_db=measured + 1e-9).passed


def test_the_dense_floor_applies_to_the_worst_dense_tensor(tmp_path, ref):
    w = reference_weights()
    folder = fp16_export(tmp_path, lambda t: t.update({NORM: noisy(w[NORM], 70).half(),
                                                       f"{UP}.weight": noisy(w[f"{UP}.weight"], 40).half()}))
    result = check(folder, ref)
    assert not result.passed and result.detail.startswith(f"dense tensor {UP}.weight at ")


def test_a_stored_tensor_of_another_shape_fails_naming_both_shapes(tmp_path, ref):
    folder = fp16_export(tmp_path, lambda t: t.update({NORM: torch.ones(16, dtype=torch.float16)}))
    result = check(folder, ref)
    assert not result.passed and result.detail == f"{NORM}: shape [16], reference [32]"


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_tensor_that_dequantizes_to_nan_or_inf_fails(tmp_path, ref, value):
    def plant(t):
        t[NORM] = t[NORM].clone()
        t[NORM][3] = value

    result = check(fp16_export(tmp_path, plant), ref)
    assert not result.passed and result.detail == f"{NORM}: dequantizes to NaN/Inf"


def test_a_reference_holding_nan_cannot_vouch_for_the_export(tmp_path):
    w = reference_weights()
    w[NORM][0] = float("nan")
    ref = write_folder(tmp_path / "ref", w)
    folder = fp16_export(tmp_path)
    result = check(folder, ref)
    assert not result.passed
    assert result.detail == f"{NORM}: the reference holds NaN/Inf, so the export cannot be verified against it"


def test_integer_tensors_must_equal_the_reference(tmp_path):
    ids = torch.arange(8)
    ref = write_folder(tmp_path / "ref", reference_weights() | {"model.position_ids": ids})
    same = fp16_export(tmp_path, lambda t: t.update({"model.position_ids": ids}))
    assert check(same, ref).passed
    changed = fp16_export(tmp_path / "b", lambda t: t.update({"model.position_ids": ids.flip(0)}))
    result = check(changed, ref)
    assert not result.passed and result.detail == "model.position_ids: integer tensor differs from the reference"


def test_an_sqnr_that_cannot_be_computed_fails(tmp_path):
    # an F64 reference whose norm overflows float64: signal and noise are both inf, the SQNR NaN
    ref = write_folder(tmp_path / "ref", reference_weights() | {"model.big": torch.full((4,), 1e200, dtype=torch.float64)})
    folder = fp16_export(tmp_path, lambda t: t.update({"model.big": torch.full((4,), 3e38)}))
    result = check(folder, ref)
    assert not result.passed and result.detail == "model.big: SQNR is NaN"


def test_at_most_three_problems_are_named(tmp_path, ref):
    def plant(t):
        for name in (NORM, f"{UP}.weight", f"{DOWN}.weight"):
            t[name] = t[name].clone().reshape(-1)[:4]
        t["model.x"] = torch.ones(1)

    folder = fp16_export(tmp_path, plant)
    ref2 = write_folder(tmp_path / "ref2", reference_weights() | {"model.x": torch.ones(2)})
    result = check(folder, ref2)
    # four tensors of the wrong shape: three named, each in full
    import re

    named = result.detail.split("; ")
    assert not result.passed and len(named) == 3
    assert all(re.fullmatch(r"[\w.]+: shape \[\d+\], reference \[\d+(, \d+)?\]", n) for n in named), named


def test_progress_is_reported_per_tensor(tmp_path, ref):
    folder, _ = int4_export(tmp_path)
    ctx = context(folder, ref)
    steps = []
    ctx.on_step = lambda done, total, unit: steps.append((done, total, unit))
    check_weights(ctx)
    assert steps == [(1, 3, "tensors"), (2, 3, "tensors"), (3, 3, "tensors")]


def test_unreadable_shards_skip_the_check(tmp_path, ref):
    folder = fp16_export(tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x00" * 4)
    result = check_weights(context(folder, ref))
    assert result.skipped and result.detail == "shards unreadable"


# (id, reference tensors, export tensors, the first problem): a problem in model.a, then another in model.z, stored
# after it (same dtype: safetensors orders by name), must be found too: every tensor is compared, whatever came before
NAN = float("nan")
GOES_ON = [
    ("dequantizes_to_nan", {"model.a": torch.ones(4), "model.z": torch.ones(4)},
     {"model.a": torch.tensor([1, NAN, 1, 1]).half(), "model.z": torch.ones(2).half()},
     "model.a: dequantizes to NaN/Inf; model.z: shape [2], reference [4]"),
    ("reference_nan", {"model.a": torch.tensor([1, NAN, 1, 1]), "model.z": torch.ones(4)},
     {"model.a": torch.ones(4).half(), "model.z": torch.ones(2).half()},
     ("model.a: the reference holds NaN/Inf, so the export cannot be verified against it; "
      "model.z: shape [2], reference [4]")),
    ("integer_equal", {"model.a": torch.arange(4), "model.z": torch.arange(4)},
     {"model.a": torch.arange(4), "model.z": torch.arange(4).flip(0)},
     "model.z: integer tensor differs from the reference"),
    ("sqnr_nan", {"model.a": torch.full((4,), 1e200, dtype=torch.float64),
                  "model.z": torch.full((4,), 1e200, dtype=torch.float64)},
     {"model.a": torch.full((4,), 3e38), "model.z": torch.full((4,), 3e38)},
     "model.a: SQNR is NaN; model.z: SQNR is NaN"),
]


@pytest.mark.parametrize("ref_tensors,tensors,detail", [g[1:] for g in GOES_ON], ids=[g[0] for g in GOES_ON])
def test_after_a_problem_the_next_tensors_are_compared_too(tmp_path, ref_tensors, tensors, detail):
    ref = write_folder(tmp_path / "ref", reference_weights() | ref_tensors)
    folder = fp16_export(tmp_path, lambda t: t.update(tensors))
    ctx = context(folder, ref)
    names = ctx.ckpt.names
    assert names.index("model.a") < names.index("model.z")
    result = check_weights(ctx)
    assert not result.passed and result.detail == detail
