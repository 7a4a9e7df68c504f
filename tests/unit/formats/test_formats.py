"""qexport/formats as pure functions (no model; milliseconds): every format stores what it predicts, declares what
docs/design.md says, keeps dense what it cannot quantize, and refuses values its stored dtype cannot hold."""

from __future__ import annotations

import pytest
import torch

from qexport.quant import primitives as quant
from qexport.errors import InputError
from qexport.formats import INTERNAL_FORMATS, REGISTRY, format_name, get_format, user_formats
from qexport.formats.base import Format, dtype_name, nonfinite_error
from qexport.io.safetensors_file import DTYPE_NAMES

ALL = ["fp16", "int8", "int4", "int4-asym", "original"]
W = "model.layers.0.mlp.down_proj.weight"
M = "model.layers.0.mlp.down_proj"


def weight(shape=(16, 256), dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 0.02).to(dtype)


def layout_of(tensors: dict) -> list:
    return [(n, dtype_name(t), tuple(t.shape)) for n, t in tensors.items()]


@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(16, 256), (3, 128), (24, 384), (72, 128)])
@pytest.mark.parametrize("quantize", [True, False])
def test_stored_predicts_exactly_what_encode_returns(fmt, dtype, shape, quantize):
    f = get_format(fmt)
    quantize = quantize and f.why_not_quantizable(W, shape) is None
    w = weight(shape, dtype)
    stored = f.stored(W, DTYPE_NAMES[dtype], shape, quantize)
    assert layout_of(f.encode(W, w, quantize)) == stored
    assert all(type(d) is int for _, _, s in stored for d in s)  # shapes go into the safetensors header as JSON


@pytest.mark.parametrize("fmt", ["int8", "int4", "int4-asym"])
@pytest.mark.parametrize("compute", ["float16", "bfloat16"])
def test_dense_tensors_are_stored_in_the_compute_dtype_and_integers_unchanged(fmt, compute):
    f = get_format(fmt, dtype=compute)
    w = weight((4, 8))
    stored = f.encode("model.norm.weight", w, quantize=False)["model.norm.weight"]
    assert stored.dtype == f.dtype and torch.equal(stored, w.to(f.dtype))
    ids = torch.arange(6)
    assert f.encode("ids", ids, quantize=False)["ids"] is ids
    assert [f.dense_dtype(d) for d in ("F32", "BF16", "F16", "F8_E4M3", "I64", "U8")] == \
        [{"float16": "F16", "bfloat16": "BF16"}[compute]] * 4 + ["I64", "U8"]


def test_encode_does_not_modify_its_input():
    for fmt in ALL:
        w = weight()
        before = w.clone()
        get_format(fmt).encode(W, w, quantize=fmt not in ("fp16", "original"))
        assert torch.equal(w, before), fmt


def test_fp16_stores_float16_whatever_compute_dtype_is_asked():
    f = get_format("fp16", dtype="bfloat16")
    assert (f.config_dtype, f.quantizes, f.quantization_config([]), f.parameters()) == ("float16", False, None, {})
    assert f.encode(W, weight(dtype=torch.bfloat16), quantize=True)[W].dtype == torch.float16
    assert f.why_not_quantizable(W, (16, 256)) == "not a quantizing format"


def test_original_keeps_every_tensor_and_the_config_dtype():
    f = get_format("original")
    w = weight(dtype=torch.bfloat16)
    assert f.encode(W, w, quantize=True)[W] is w
    assert f.stored(W, "BF16", (16, 256), True) == [(W, "BF16", (16, 256))]
    assert f.config_dtype is None


@pytest.mark.parametrize("compute", ["float16", "bfloat16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_is_per_channel_round_to_nearest_of_the_weight_in_the_compute_dtype(compute, dtype):
    f = get_format("int8", dtype=compute)
    w = weight((8, 64), dtype)
    out = f.encode(W, w, quantize=True)
    wc = w.to(f.dtype)
    # docs/design.md: scale = absmax / 127.5 computed in fp32 from the weight cast to the stored dtype, then cast
    expected_scale = (wc.abs().amax(dim=1, keepdim=True).float() / 127.5).to(f.dtype)
    assert torch.equal(out[f"{M}.weight_scale"], expected_scale)
    q = quant.unpack_int8(out[f"{M}.weight_packed"], 64)
    expected_q = torch.round((wc / expected_scale).clamp(-128, 127)).to(torch.int8)
    assert torch.equal(q, expected_q)
    assert out[f"{M}.weight_shape"].tolist() == [8, 64] and out[f"{M}.weight_shape"].dtype == torch.int64


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_is_groupwise_round_to_nearest_in_packed_words(group_size):
    f = get_format("int4", group_size=group_size)
    w = weight((4, 256))
    out = f.encode(W, w, quantize=True)
    grouped = w.to(torch.float16).reshape(4, -1, group_size)
    expected_scale = (grouped.abs().amax(dim=-1).float() / 7.5).to(torch.float16)
    assert torch.equal(out[f"{M}.weight_scale"], expected_scale)
    q = quant.unpack_int4(out[f"{M}.weight_packed"], 256).reshape(4, -1, group_size)
    assert torch.equal(q, torch.round((grouped / expected_scale.unsqueeze(-1)).clamp(-8, 7)).to(torch.int8))


def test_int4_asym_dequantizes_within_half_a_step_and_stores_zero_points_packed_by_rows():
    f = get_format("int4-asym", group_size=64)
    w = weight((16, 128)) + 0.01  # a range not centred on zero
    out = f.encode(W, w, quantize=True)
    scales = out[f"{M}.weight_scale"]
    zp = quant.unpack_int4_columns(out[f"{M}.weight_zero_point"], 16)
    q = quant.unpack_int4(out[f"{M}.weight_packed"], 128)
    back = quant.dequantize_asymmetric(q, scales, zp, 64)
    step = scales.float().repeat_interleave(64, dim=1)
    assert ((back.float() - w.to(torch.float16).float()).abs() / step).max() <= 0.52  # fp16 slack (docs/design.md)
    assert out[f"{M}.weight_zero_point"].shape == (2, 2) and zp.abs().max() <= 8


def test_quantization_configs_are_the_compressed_tensors_presets_of_design_md():
    channel = {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True, "dynamic": False}
    assert get_format("int8").quantization_config(["lm_head"]) == {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "format": "pack-quantized", "weights": channel}},
        "ignore": ["lm_head"]}
    group = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 64, "symmetric": True, "dynamic": False}
    int4 = get_format("int4", group_size=64).quantization_config([])
    assert int4["config_groups"]["group_0"]["weights"] == group and int4["ignore"] == []
    asym = get_format("int4-asym", group_size=64).quantization_config(["x"])
    assert asym == {**int4, "ignore": ["x"], "dequantize": True,
                    "config_groups": {"group_0": {**int4["config_groups"]["group_0"],
                                                  "weights": {**group, "symmetric": False}}}}


def test_parameters_name_the_scheme_weights_and_scale_dtype():
    assert get_format("int8", dtype="bfloat16").parameters() == {
        "scheme": "W8A16", "scale_dtype": "bfloat16",
        "weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True, "dynamic": False}}
    assert get_format("int4").parameters()["scheme"] == "W4A16"
    assert get_format("int4").parameters()["weights"]["group_size"] == 128
    assert get_format("int4-asym").parameters()["scheme"] == "W4A16_ASYM"


def test_which_weights_each_format_can_quantize():
    int8, int4 = get_format("int8"), get_format("int4", group_size=64)
    assert int8.why_not_quantizable(W, (3, 5)) is None
    assert int8.why_not_quantizable(W, (3, 5, 2)) == "not a 2-D weight"
    assert int4.why_not_quantizable(W, (3, 128)) is None
    assert int4.why_not_quantizable(W, (3, 96)) == "input size 96 does not divide by group size 64"
    assert int4.why_not_quantizable(W, (128,)) == "not a 2-D weight"


def test_a_compute_dtype_that_is_not_fp16_or_bf16_is_refused_naming_the_format():
    with pytest.raises(InputError, match=r"^int8: compute dtype 'float32' is not one of float16, bfloat16$"):
        get_format("int8", dtype="float32")


def test_format_names_are_case_insensitive_and_unknown_ones_name_the_option_and_the_offered_formats():
    assert format_name("INT4") == "int4" and format_name("Int4-Asym") == "int4-asym"
    assert get_format("INT8").name == "int8"
    assert user_formats() == ["fp16", "int8", "int4", "int4-asym"]
    assert set(REGISTRY) == set(user_formats()) | set(INTERNAL_FORMATS)
    with pytest.raises(InputError) as e:
        format_name("int3", option="--qexport-formats")
    assert str(e.value) == "--qexport-formats: unknown format 'int3' (known: fp16, int8, int4, int4-asym)"
    with pytest.raises(InputError, match=r"^--formats: unknown format 'gguf'"):
        get_format("gguf")


def test_format_options_reach_the_format():
    assert get_format("int4", group_size=32).group_size == 32
    assert get_format("int4").group_size == 128 and get_format("int8").group_size is None
    assert get_format("int8", dtype="bfloat16").dtype == torch.bfloat16


def test_a_new_format_registers_by_name():
    from qexport.formats.base import register

    @register
    class Probe(Format):
        name = "probe-test"

        def stored(self, name, dtype, shape, quantize):
            return []

        def encode(self, name, w, quantize):
            return {}

    try:
        assert REGISTRY["probe-test"] is Probe and isinstance(get_format("PROBE-TEST"), Probe)
    finally:
        del REGISTRY["probe-test"]


@pytest.mark.parametrize("dtype,short", [(torch.float16, "fp16"), (torch.bfloat16, "bf16")])
def test_a_finite_value_past_the_stored_dtypes_range_is_refused_naming_tensor_shape_and_peak(dtype, short):
    limit = torch.finfo(dtype).max
    at_limit = torch.tensor([limit, -limit], dtype=torch.float64)
    assert nonfinite_error("t", at_limit, allow_nonfinite=False, dtype=dtype) is None
    over = torch.tensor([1.0, -limit * 1.01, limit * 1.001, float("inf")], dtype=torch.float64)
    err = nonfinite_error("t", over, allow_nonfinite=True, where="src/model.safetensors", dtype=dtype)
    assert str(err) == (f"src/model.safetensors: tensor 't' [4] torch.float64: value {limit * 1.01:.6g} overflows "
                        f"{short} (max {limit:.6g})")


def test_nan_and_inf_are_refused_unless_allowed():
    w = torch.tensor([[1.0, float("nan")], [float("-inf"), 0.0]])
    assert str(nonfinite_error("t", w, allow_nonfinite=False)) == \
        "tensor 't' [2, 2] holds NaN or Inf (use --allow-nonfinite to keep it dense)"
    assert nonfinite_error("t", w, allow_nonfinite=True) is None
    assert nonfinite_error("t", torch.ones(3), allow_nonfinite=False) is None


def test_float8_tensors_are_checked_too():
    w = torch.tensor([1.0, 448.0]).to(torch.float8_e4m3fn)
    assert nonfinite_error("t", w, allow_nonfinite=False) is None
    nan = torch.tensor([float("nan")]).to(torch.float8_e4m3fn)
    assert "holds NaN or Inf" in str(nonfinite_error("t", nan, allow_nonfinite=False))
    big = torch.tensor([57344.0]).to(torch.float8_e5m2)
    assert nonfinite_error("t", big, allow_nonfinite=False, dtype=torch.bfloat16) is None
    assert nonfinite_error("t", big, allow_nonfinite=False, dtype=torch.float16) is None  # 57344 < 65504


def test_overflow_of_another_stored_dtype_names_that_dtype():
    err = nonfinite_error("t", torch.tensor([1e39], dtype=torch.float64), allow_nonfinite=False, dtype=torch.float32)
    assert "overflows torch.float32 (max 3.40282e+38)" in str(err)


def test_a_new_quantizing_format_quantizes_2d_weights_by_default():
    class ProbeQ(Format):
        name, quantizes = "probe-q", True

        def stored(self, name, dtype, shape, quantize):
            return []

        def encode(self, name, w, quantize):
            return {}

    assert ProbeQ().why_not_quantizable(W, (4, 8)) is None
    assert ProbeQ().why_not_quantizable(W, (4, 8, 2)) is not None
    assert ProbeQ().why_not_quantizable(W, (8,)) is not None


@pytest.mark.parametrize("rows", [1, 8, 16, 17, 72])
@pytest.mark.parametrize("groups", [1, 3])
def test_zero_points_pack_and_unpack_by_rows_for_any_row_and_group_count(rows, groups):
    # one group a row (in == group_size) made the packing fail for 16 rows or more (a transposed [rows, 1])
    q = torch.randint(-8, 8, (rows, groups), dtype=torch.int8, generator=torch.Generator().manual_seed(rows))
    packed = quant.pack_int4_columns(q)
    assert packed.shape == ((rows + 7) // 8, groups) and packed.dtype == torch.int32
    assert torch.equal(quant.unpack_int4_columns(packed, rows), q)


def test_format_name_errors_name_the_option_given_or_formats_by_default():
    with pytest.raises(InputError, match=r"^--formats: unknown format 'gguf'"):
        format_name("gguf")
    with pytest.raises(InputError, match=r"^--qexport-formats: unknown format 'gguf'"):
        get_format("gguf", option="--qexport-formats")


# --- --int4-method: how the int4 codes were chosen is recorded where the export says how it was made -------------


@pytest.mark.parametrize("fmt", ["int4", "int4-asym"])
def test_mse_method_is_declared_as_an_mse_observer_and_in_the_format_parameters(fmt):
    # config.json's weights args carry `observer: mse` (compressed-tensors' name for a clipping search) and the
    # manifest's format parameters the method; round-to-nearest declares no observer.
    mse, rtn = get_format(fmt, method="mse"), get_format(fmt)
    assert mse.weights_args()["observer"] == "mse" and "observer" not in rtn.weights_args()
    assert mse.parameters()["method"] == "mse" and rtn.parameters()["method"] == "rtn"
    assert {k: v for k, v in mse.weights_args().items() if k != "observer"} == rtn.weights_args()


def test_unknown_int4_method_names_the_option_and_the_choices():
    with pytest.raises(InputError) as refused:
        get_format("int4", method="gptq")
    assert str(refused.value) == "--int4-method: 'gptq' is not one of rtn, mse"


@pytest.mark.parametrize("fmt", ["int4", "int4-asym"])
def test_mse_method_computes_in_the_formats_dtype_like_round_to_nearest(fmt):
    # A bf16 source is exported in bf16 (scales and dense tensors): the clipping search must store its scales in
    # that dtype too, not the fp16 default.
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    mse = get_format(fmt, group_size=64, dtype="bfloat16", method="mse").encode("m.weight", w, quantize=True)
    rtn = get_format(fmt, group_size=64, dtype="bfloat16").encode("m.weight", w, quantize=True)
    assert mse["m.weight_scale"].dtype == rtn["m.weight_scale"].dtype == torch.bfloat16
