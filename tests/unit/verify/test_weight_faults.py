"""weights_sqnr on planted faults (verify with that check only; about a second each): each way a stored tensor can
disagree with the reference fails naming the tensor, and a good export reports the SQNR it measured. Found by
mutation testing of qexport/verify/weight_checks.py (bench/MUTATION.md)."""

from __future__ import annotations

import shutil

import pytest
import torch

from qexport.verify.functional import sqnr_db
from qexport.verify import verify
from tests.support import defects

DOWN = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def out(qwen3_src, export_model):
    return export_model(qwen3_src)[0]


def copy(tmp_path, folder, name="export"):
    target = tmp_path / name
    shutil.copytree(folder, target)
    if (target / "qexport.json").exists():
        (target / "qexport.json").unlink()
    return target


def sqnr(folder, ref, **thresholds):
    from qexport.verify.thresholds import thresholds_for

    fmt = folder.name if folder.name in ("fp16", "int8", "int4") else "int4"
    t = vars(thresholds_for(fmt)) | thresholds
    [result] = verify(folder, ref, only=["weights_sqnr"], thresholds=t).checks
    return result


def test_good_int4_export_reports_min_median_and_worst_of_its_quantized_tensors(out, qwen3_src):
    result = sqnr(out / "int4", qwen3_src)
    per = result.metrics["per_tensor_sqnr_db"]
    values = sorted(per.values())
    assert result.passed and len(per) == 14  # 2 layers x 7 Linears; lm_head stays dense
    assert result.metrics["sqnr_worst"] == min(per, key=per.get)
    assert round(result.metrics["sqnr_min_db"], 3) == values[0]
    assert round(result.metrics["sqnr_median_db"], 3) == values[len(values) // 2]
    assert result.metrics["dense_sqnr_min_db"] >= 60
    assert result.detail == (f"SQNR min {result.metrics['sqnr_min_db']:.2f} dB (>= 13.0), median "
                             f"{result.metrics['sqnr_median_db']:.2f} dB over 14 quantized tensors")
    assert "(no floor)" in sqnr(out / "int4", qwen3_src, min_sqnr_db=None).detail


def test_the_measured_sqnr_is_the_tensors_own_dequantized_exactly(out, qwen3_src):
    # an independent measurement of the worst tensor: q x scale in float32 (exact: a 4-bit code times an fp16 scale
    # fits float32's significand) against the reference. Dequantizing in fp16 instead rounds the products: measured
    # 6.3e-5 dB lower on the worst tensor here (o_proj of layer 1: 19.005614 vs 19.005677), 5.8e-4 on down_proj.
    from safetensors.torch import load_file

    from qexport.quant import primitives as quant
    result = sqnr(out / "int4", qwen3_src)
    module = result.metrics["sqnr_worst"].removesuffix(".weight")
    stored = load_file(out / "int4" / "model.safetensors")
    q = quant.unpack_int4(stored[f"{module}.weight_packed"], int(stored[f"{module}.weight_shape"][1]))
    w_hat = quant.dequantize(q, stored[f"{module}.weight_scale"].float(), 128)
    w = load_file(qwen3_src / "model.safetensors")[f"{module}.weight"].float()
    assert result.metrics["sqnr_min_db"] == pytest.approx(sqnr_db(w, w_hat), abs=1e-6)


def test_good_fp16_export_reports_its_dense_tensors(out, qwen3_src):
    result = sqnr(out / "fp16", qwen3_src)
    assert result.passed and "sqnr_min_db" not in result.metrics and result.metrics["per_tensor_sqnr_db"] == {}
    assert result.detail.endswith("dense tensors match the reference (>= 60.0 dB)")


def test_a_tensor_of_another_shape_fails_naming_both_shapes(out, qwen3_src, tmp_path):
    folder = copy(tmp_path, out / "int4")
    defects.edit_tensors(folder, lambda t: t.update({"model.norm.weight": torch.ones(10, dtype=torch.bfloat16)}))
    result = sqnr(folder, qwen3_src)
    assert not result.passed and "model.norm.weight: shape [10], reference [256]" in result.detail


def test_a_scale_that_dequantizes_to_inf_fails(out, qwen3_src, tmp_path):
    folder = copy(tmp_path, out / "int4")
    name = f"{DOWN}.weight_scale"
    defects.edit_tensors(folder, lambda t: t[name].__setitem__((0, 0), float("inf")))
    result = sqnr(folder, qwen3_src)
    assert not result.passed and f"{DOWN}.weight: dequantizes to NaN/Inf" in result.detail


def test_a_reference_holding_nan_cannot_vouch_for_the_export(out, qwen3_src, tmp_path):
    ref = copy(tmp_path, qwen3_src, "ref")
    defects.edit_tensors(ref, lambda t: t["model.norm.weight"].__setitem__(0, float("nan")))
    result = sqnr(out / "int4", ref)
    assert not result.passed and "model.norm.weight: the reference holds NaN/Inf" in result.detail


def test_integer_tensors_must_equal_the_references(out, qwen3_src, tmp_path):
    ref = copy(tmp_path, qwen3_src, "ref")
    defects.edit_tensors(ref, lambda t: t.update({"model.extra_ids": torch.arange(4)}))
    same = copy(tmp_path, out / "int4", "same")
    defects.edit_tensors(same, lambda t: t.update({"model.extra_ids": torch.arange(4)}))
    assert sqnr(same, ref).passed
    other = copy(tmp_path, out / "int4", "other")
    defects.edit_tensors(other, lambda t: t.update({"model.extra_ids": torch.arange(4) + 1}))
    result = sqnr(other, ref)
    assert not result.passed and "model.extra_ids: integer tensor differs from the reference" in result.detail


def test_an_all_zero_reference_tensor_stored_as_zeros_is_not_a_nan_failure(out, qwen3_src, tmp_path):
    ref = copy(tmp_path, qwen3_src, "ref")
    defects.edit_tensors(ref, lambda t: t.update({"model.extra_zero": torch.zeros(8, dtype=torch.bfloat16)}))
    folder = copy(tmp_path, out / "fp16")
    defects.edit_tensors(folder, lambda t: t.update({"model.extra_zero": torch.zeros(8, dtype=torch.float16)}))
    result = sqnr(folder, ref)
    assert result.passed, result.detail


def test_at_most_three_problems_are_named_and_the_low_tensors_counted(out, qwen3_src, tmp_path):
    folder = copy(tmp_path, out / "int4")
    names = [f"model.layers.{i}.mlp.{p}" for i in (0, 1) for p in ("down_proj", "up_proj")]

    def change(t):
        for n in names:
            t[f"{n}.weight_scale"] = t[f"{n}.weight_scale"] * 1.5
    defects.edit_tensors(folder, change)
    result = sqnr(folder, qwen3_src)
    assert not result.passed and result.detail.startswith("4 quantized tensor(s) below 13.0 dB SQNR, worst ")
    defects.edit_tensors(folder, lambda t: [t.update({n: torch.ones(3)}) for n in
                                            ("model.norm.weight", "model.layers.0.input_layernorm.weight",
                                             "model.layers.1.input_layernorm.weight",
                                             "model.layers.0.post_attention_layernorm.weight")])
    assert sqnr(folder, qwen3_src).detail.count("shape [3]") == 3


def test_unreadable_shards_skip_the_weight_check_saying_so(out, qwen3_src, tmp_path):
    folder = copy(tmp_path, out / "int4")
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    result = sqnr(folder, qwen3_src)
    assert (result.name, result.skipped, result.detail) == ("weights_sqnr", True, "shards unreadable")


def test_a_tensor_the_reference_lacks_does_not_end_the_comparison(out, qwen3_src, tmp_path):
    # the extra tensor (I64, named to sort first in the file) is tensor_names' business; every other tensor must
    # still be compared: here one Linear's scales are off by 1.5x
    folder = copy(tmp_path, out / "int4")

    def change(t):
        t["a.extra"] = torch.arange(3)
        t[f"{DOWN}.weight_scale"] = t[f"{DOWN}.weight_scale"] * 1.5
    defects.edit_tensors(folder, change)
    result = sqnr(folder, qwen3_src)
    assert not result.passed and f"worst {DOWN}.weight" in result.detail, result.detail


def test_a_tensor_that_dequantizes_to_inf_does_not_hide_later_problems(out, qwen3_src, tmp_path):
    folder = copy(tmp_path, out / "int4")

    def change(t):
        t[f"{DOWN}.weight_scale"][0, 0] = float("inf")
        t["model.norm.weight"] = torch.ones(10, dtype=torch.bfloat16)
    defects.edit_tensors(folder, change)
    detail = sqnr(folder, qwen3_src).detail
    assert "dequantizes to NaN/Inf" in detail and "model.norm.weight: shape [10]" in detail, detail
