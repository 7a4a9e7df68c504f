"""Laws of the numeric core (qexport/quant/primitives.py, qexport/quant/dequant.py, qexport/io/sizes.py) on small hand-made tensors,
against compressed-tensors' own functions where it has one. Model-free: milliseconds a test."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.utils import calculate_qparams

from qexport.quant import dequant

from qexport.quant import primitives as quant
from qexport.errors import InputError
from qexport.io.sizes import FLOAT_DTYPES, fp16_bytes, parse_size, size_summary
from tests import support


def codes(rows: int, cols: int, num_bits: int, seed: int = 0) -> torch.Tensor:
    low, high = quant.qrange(num_bits)
    return torch.randint(low, high + 1, (rows, cols), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


def weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    w[0, :3] *= 30  # an outlier so that groups and rows get different scales
    return w


# --------------------------------------------------------------------------------------------- quant: scales, codes


def test_qrange_is_the_signed_range_of_the_bit_width():
    assert [quant.qrange(b) for b in (2, 4, 8)] == [(-2, 1), (-8, 7), (-128, 127)]


def test_a_row_that_does_not_divide_by_the_group_size_is_refused_naming_both():
    with pytest.raises(ValueError, match="input size 130 does not divide by group size 128"):
        quant.compute_scales(torch.ones(2, 130), 4, 128)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_bits,group_size", [(4, 32), (8, None), (4, None), (8, 16)])
def test_scales_equal_compressed_tensors_calculate_qparams(dtype, num_bits, group_size):
    w = weight(6, 64).to(dtype)
    w[3] = 0  # an all-zero row: eps, not 0
    grouped = w.reshape(6, -1, group_size or 64)
    args = QuantizationArgs(num_bits=num_bits, type="int", symmetric=True,
                            strategy="group" if group_size else "channel", group_size=group_size)
    theirs, _ = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
    ours = quant.compute_scales(w, num_bits, group_size, dtype=dtype)
    assert ours.dtype == dtype and torch.equal(ours, theirs.to(dtype))
    assert bool((ours[3] == torch.finfo(dtype).eps).all())


@pytest.mark.parametrize("w_dtype,dtype", [(torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)])
def test_scale_division_is_in_float32_whatever_the_weight_dtype(w_dtype, dtype):
    # bf16 / 7.5 in bf16 keeps 8 significant bits: cast to fp16 it differs from the float32 quotient (117 of
    # 128 scales of a randn weight, measured)
    w = weight(64, 256).to(w_dtype)
    expected = (w.reshape(64, 2, 128).abs().amax(-1).float() / 7.5).to(dtype)
    assert torch.equal(quant.compute_scales(w, 4, 128, dtype=dtype), expected)


def test_scale_is_absmax_over_half_the_code_range_per_group():
    w = torch.tensor([[1.0, -3.0, 0.5, 0.25], [0.0, 0.0, -7.5, 2.0]])
    assert torch.equal(quant.compute_scales(w, 4, 2, dtype=torch.float32), torch.tensor([[3 / 7.5, 0.5 / 7.5],
                                                                                         [torch.finfo().eps, 7.5 / 7.5]]))
    assert torch.equal(quant.compute_scales(w, 8, None, dtype=torch.float32), torch.tensor([[3 / 127.5], [7.5 / 127.5]]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32])
def test_absmax_is_bit_for_bit_abs_amax_including_signed_zero_inf_and_nan(dtype):
    if dtype.is_floating_point:
        x = torch.tensor([[-0.0, 0.0, -1.5], [-float("inf"), 2.0, 1.0], [float("nan"), -3.0, 1.0],
                          [-2.0, -5.0, 4.0]], dtype=dtype)
        nan_payload = x[2].clone()
        nan_payload.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])[0] |= 1  # not the quiet NaN
        x = torch.cat([x, nan_payload.unsqueeze(0), -x[2:3]])
    else:
        x = torch.tensor([[-7, 3, 2], [0, 0, 0], [5, -9, 1]], dtype=dtype)
    x = torch.stack([x, x.flip(0)])  # [2, rows, 3]: the max is over the last dimension
    ours, theirs = quant._absmax(x), x.abs().amax(dim=-1)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    if dtype.is_floating_point:
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
        assert torch.equal(ours.view(bits), theirs.view(bits))
    else:
        assert torch.equal(ours, theirs)


def test_quantize_rounds_half_to_even_and_clamps_per_group():
    w = torch.tensor([[2.5, -2.5, 3.5, 100.0, 1.0, -100.0, 0.5, 1.5]])
    scales = torch.tensor([[1.0, 0.5]])
    q = quant.quantize(w, scales, 4, 4)
    assert q.dtype == torch.int8
    assert q.tolist() == [[2, -2, 4, 7, 2, -8, 1, 3]]
    assert quant.quantize(w, torch.tensor([[1.0]]), 8, None).tolist() == [[2, -2, 4, 100, 1, -100, 0, 2]]


def test_quantize_divides_in_the_scale_dtype():
    # 2.5004 is 2.5 in fp16 (spacing 2^-9 there): half to even gives 2; in fp32 it would round to 3
    w = torch.tensor([[2.5004, -2.5004]])
    assert quant.quantize(w, torch.tensor([[1.0]], dtype=torch.float16), 8, None).tolist() == [[2, -2]]
    zp = torch.zeros(1, 1, dtype=torch.int8)
    assert quant.quantize_asymmetric(w, torch.tensor([[1.0]], dtype=torch.float16), zp, 8, None).tolist() == [[2, -2]]


def test_dequantize_multiplies_each_group_by_its_scale_in_the_scale_dtype():
    q = torch.tensor([[1, -2, 3, 4], [-8, 7, 0, 1]], dtype=torch.int8)
    scales = torch.tensor([[0.5, 2.0], [1.0, -1.0]], dtype=torch.bfloat16)
    out = quant.dequantize(q, scales, 2)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert out.tolist() == [[0.5, -1.0, 6.0, 8.0], [-8.0, 7.0, 0.0, -1.0]]
    assert quant.dequantize(q, torch.tensor([[2.0], [3.0]]), None).tolist() == [[2, -4, 6, 8], [-24, 21, 0, 3]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group_size", [16, None])
def test_asymmetric_qparams_equal_compressed_tensors_calculate_qparams(dtype, group_size):
    w = weight(5, 32).to(dtype)
    w[1] = 0  # all zero: scale eps, zero point 0
    w[2] = w[2].abs() + 0.5  # all positive: the range widened to 0
    w[3] = -w[3].abs() - 0.5  # all negative
    grouped = w.reshape(5, -1, group_size or 32)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=False,
                            strategy="group" if group_size else "channel", group_size=group_size)
    their_scale, their_zp = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
    scales, zp = quant.compute_asymmetric_qparams(w, 4, group_size, dtype=dtype)
    assert scales.dtype == dtype and zp.dtype == torch.int8
    assert torch.equal(scales, their_scale.to(dtype))
    assert torch.equal(zp, their_zp.to(torch.int8))
    assert bool((scales[1] == torch.finfo(dtype).eps).all()) and bool((zp[1] == 0).all())
    # a float32 weight is first cast to `dtype`: every step in `dtype`, as compressed-tensors on the loaded weight
    from_fp32 = quant.compute_asymmetric_qparams(w.float() + 1e-4, 4, group_size, dtype=dtype)
    cast = (w.float() + 1e-4).to(dtype).reshape(5, -1, group_size or 32)
    their_scale, their_zp = calculate_qparams(cast.amin(-1), cast.amax(-1), args)
    assert torch.equal(from_fp32[0], their_scale.to(dtype)) and torch.equal(from_fp32[1], their_zp.to(torch.int8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_8_bit_zero_points_of_non_positive_rows_are_clamped_like_compressed_tensors(dtype):
    # all values <= 0: zero point qmax in exact arithmetic; fp16 rounding of (0 - low) / 255 pushed qmin - low / scale
    # to 130.25 (measured), and a subnormal row's scale to 0 (inf): the clamp keeps both at 127
    w = -(torch.randn(64, 32, generator=torch.Generator().manual_seed(0)).abs() + 0.01).to(dtype)
    w[5] = -1e-7
    args = QuantizationArgs(num_bits=8, type="int", symmetric=False, strategy="channel")
    their_scale, their_zp = calculate_qparams(w.amin(-1, keepdim=True), w.amax(-1, keepdim=True), args)
    scales, zp = quant.compute_asymmetric_qparams(w, 8, None, dtype=dtype)
    assert torch.equal(zp, their_zp.to(torch.int8)) and torch.equal(scales, their_scale.to(dtype))
    assert int(zp.max()) == 127


def test_asymmetric_codes_by_hand():
    # range [-1, 2] widened from [-1, 2]; scale 3 / 15 = 0.2; zero point round(-8 + 1 / 0.2) = -3
    w = torch.tensor([[-1.0, 0.0, 2.0, 1.0]])
    scales, zp = quant.compute_asymmetric_qparams(w, 4, None, dtype=torch.float32)
    assert torch.allclose(scales, torch.tensor([[0.2]])) and zp.tolist() == [[-3]]
    q = quant.quantize_asymmetric(w, scales, zp, 4, None)
    assert q.dtype == torch.int8 and q.tolist() == [[-8, -3, 7, 2]]
    out = quant.dequantize_asymmetric(q, scales, zp, None)
    assert out.dtype == torch.float32 and torch.allclose(out, torch.tensor([[-1.0, 0.0, 2.0, 1.0]]))
    # clamp at both ends: far outside the range
    assert quant.quantize_asymmetric(torch.tensor([[-50.0, 50.0, 0.0, 0.0]]), scales, zp, 4, None).tolist() == \
        [[-8, 7, -3, -3]]


def test_asymmetric_codes_and_dequantization_use_each_groups_own_zero_point():
    scales = torch.tensor([[1.0, 2.0]])
    zp = torch.tensor([[1, -2]], dtype=torch.int8)
    q = quant.quantize_asymmetric(torch.tensor([[0.0, 3.0, 0.0, 4.0]]), scales, zp, 4, 2)
    assert q.tolist() == [[1, 4, -2, 0]]
    assert quant.dequantize_asymmetric(q, scales, zp, 2).tolist() == [[0.0, 3.0, 0.0, 4.0]]


# --------------------------------------------------------------------------------------------- quant: packing


@pytest.mark.parametrize("little_endian", [True, False], ids=["little-endian", "portable"])
@pytest.mark.parametrize("cols", [1, 5, 7, 8, 9, 16, 24, 131])
def test_pack_int4_equals_compressed_tensors_pack_to_int32(monkeypatch, little_endian, cols):
    monkeypatch.setattr(quant, "_LITTLE_ENDIAN", little_endian)
    q = codes(3, cols, 4, seed=cols)
    packed = quant.pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (3, -(-cols // 8))
    assert torch.equal(packed, pack_to_int32(q, 4))
    assert torch.equal(quant.unpack_int4(packed, cols), q)
    assert torch.equal(quant.unpack_int4(packed, cols), unpack_from_int32(packed, 4, torch.Size((3, cols))))


def test_pack_int4_bit_layout_by_hand():
    # element j at bits 4 * j as q + 8: codes 0..7 then -8 -> nibbles 8..15, 0
    q = torch.tensor([[-8, -7, 0, 1, 2, 3, 6, 7], [7, 0, 0, 0, 0, 0, 0, -8]], dtype=torch.int8)
    expected = [sum(((v + 8) & 0xF) << (4 * j) for j, v in enumerate(row)) for row in q.tolist()]
    expected = [[x - (1 << 32) if x >= 1 << 31 else x] for x in expected]
    assert quant.pack_int4(q).tolist() == expected
    assert quant.pack_int4(q[:, :3]).tolist() == [[0x810], [0x88F]]  # padded with zero bits, not code 0 (= 8)


@pytest.mark.parametrize("little_endian", [True, False], ids=["little-endian", "portable"])
@pytest.mark.parametrize("cols", [1, 3, 4, 5, 8, 131])
def test_pack_int8_equals_compressed_tensors_pack_to_int32(monkeypatch, little_endian, cols):
    monkeypatch.setattr(quant, "_LITTLE_ENDIAN", little_endian)
    q = codes(3, cols, 8, seed=cols)
    packed = quant.pack_int8(q)
    assert packed.dtype == torch.int32 and packed.shape == (3, -(-cols // 4))
    assert torch.equal(packed, pack_to_int32(q, 8))
    assert torch.equal(quant.unpack_int8(packed, cols), unpack_from_int32(packed, 8, torch.Size((3, cols))))
    assert torch.equal(quant.unpack_int8(packed, cols), q)


def test_pack_int8_bit_layout_by_hand():
    q = torch.tensor([[-128, -1, 0, 127, 5]], dtype=torch.int8)
    assert quant.pack_int8(q).tolist() == [[0xFF807F00 - (1 << 32), 0x85]]


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17])
@pytest.mark.parametrize("groups", [1, 4])
def test_column_packing_equals_compressed_tensors_packed_dim_0(rows, groups):
    q = codes(rows, groups, 4, seed=rows * groups)
    packed = quant.pack_int4_columns(q)
    assert packed.shape == (-(-rows // 8), groups) and packed.is_contiguous()
    assert torch.equal(packed, pack_to_int32(q, 4, packed_dim=0))
    unpacked = quant.unpack_int4_columns(packed, rows)
    assert unpacked.is_contiguous() and torch.equal(unpacked, q)


# --------------------------------------------------------------------------------------------- dequant


@pytest.mark.parametrize("num_bits", [2, 4, 8])
def test_unpack_int32_equals_compressed_tensors_unpack_from_int32(num_bits):
    q = codes(4, 19, num_bits, seed=num_bits)
    packed = pack_to_int32(q, num_bits)
    ours = dequant.unpack_int32(packed, num_bits, 19)
    assert ours.dtype == torch.int8 and torch.equal(ours, q)
    assert torch.equal(ours, unpack_from_int32(packed, num_bits, torch.Size((4, 19))))


def expected_dense(q, scale, zp=None):
    """(q - zp) * scale with each scale column repeated over its group: the definition, by broadcasting."""
    group = q.shape[1] // scale.shape[1]
    zp = torch.zeros_like(scale) if zp is None else zp.to(scale.dtype)
    return (q.to(scale.dtype) - zp.repeat_interleave(group, 1)) * scale.repeat_interleave(group, 1)


def test_pack_quantized_row_of_any_length_drops_the_padding_codes():
    q = codes(3, 13, 4)  # two words a row, the last three codes padding
    scale = torch.tensor([[1.0], [2.0], [0.5]])
    out = dequant.dequantize_module({"weight_packed": quant.pack_int4(q), "weight_scale": scale,
                                     "weight_shape": torch.tensor([3, 13])}, 4)
    assert torch.equal(out, expected_dense(q, scale))


@pytest.mark.parametrize("group_size", [8, None])
def test_pack_quantized_module_dequantizes_to_codes_times_scales(group_size):
    q = codes(3, 16, 4)
    scale = torch.rand(3, 16 // (group_size or 16), generator=torch.Generator().manual_seed(1)).half() + 0.1
    tensors = {"weight_packed": quant.pack_int4(q), "weight_scale": scale, "weight_shape": torch.tensor([3, 16])}
    out = dequant.dequantize_module(tensors, 4)
    assert out.dtype == torch.float16 and torch.equal(out, expected_dense(q, scale))
    as_float = dequant.dequantize_module(tensors, 4, torch.float32)
    assert as_float.dtype == torch.float32 and torch.equal(as_float, expected_dense(q, scale.float()))


def test_int_quantized_module_with_a_1d_scale_and_with_one_scale_for_the_tensor():
    q = codes(4, 6, 8)
    scale = torch.tensor([0.5, 1.0, 2.0, 4.0])
    out = dequant.dequantize_module({"weight": q, "weight_scale": scale}, 8)
    assert torch.equal(out, expected_dense(q, scale.reshape(4, 1)))
    odd = codes(4, 5, 8)  # one scale per tensor is one group of the whole row, whatever its length
    for per_tensor in (torch.tensor([0.25]), torch.tensor([[0.25]])):
        out = dequant.dequantize_module({"weight": odd, "weight_scale": per_tensor}, 8)
        assert out.shape == (4, 5) and torch.equal(out, odd.float() * 0.25)


def test_one_row_module_with_one_scale_is_not_expanded():
    q = codes(1, 8, 8)
    assert torch.equal(dequant.dequantize_module({"weight": q, "weight_scale": torch.tensor([[2.0]])}, 8), q * 2.0)


@pytest.mark.parametrize("packed_zp", [False, True])
@pytest.mark.parametrize("group_size", [4, None])
def test_zero_points_int8_or_packed_by_rows_are_subtracted_per_group(packed_zp, group_size):
    rows, cols = 9, 8
    q = codes(rows, cols, 4, seed=2)
    groups = cols // (group_size or cols)
    scale = torch.rand(rows, groups, generator=torch.Generator().manual_seed(3)) + 0.1
    zp = codes(rows, groups, 4, seed=4)
    tensors = {"weight_packed": quant.pack_int4(q), "weight_scale": scale, "weight_shape": torch.tensor([rows, cols]),
               "weight_zero_point": quant.pack_int4_columns(zp) if packed_zp else zp}
    assert torch.equal(dequant.dequantize_module(tensors, 4), expected_dense(q, scale, zp))


def test_per_tensor_zero_point_applies_to_every_row():
    q = codes(3, 4, 8)
    out = dequant.dequantize_module({"weight": q, "weight_scale": torch.tensor([2.0]),
                                     "weight_zero_point": torch.tensor([5], dtype=torch.int8)}, 8)
    assert torch.equal(out, (q.float() - 5) * 2.0)


def test_group_index_with_zero_points_reads_each_columns_group():
    rows, cols = 2, 8
    q = codes(rows, cols, 4, seed=5)
    scale = torch.tensor([[1.0, 3.0], [2.0, 5.0]])
    zp = torch.tensor([[1, -1], [2, 0]], dtype=torch.int8)
    g_idx = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0], dtype=torch.int32)
    out = dequant.dequantize_module({"weight_packed": quant.pack_int4(q), "weight_scale": scale,
                                     "weight_shape": torch.tensor([rows, cols]), "weight_zero_point": zp,
                                     "weight_g_idx": g_idx}, 4)
    expected = (q.float() - zp.float()[:, g_idx.long()]) * scale[:, g_idx.long()]
    assert torch.equal(out, expected)


@pytest.mark.parametrize("g_idx,reason", [([0, 1, 0], "size"), ([0, 2, 0, 1], "past the groups"),
                                          ([0, -2, 0, 1], "negative")])
def test_group_index_errors_name_its_shape_and_the_columns_and_groups(g_idx, reason):
    with pytest.raises(ValueError) as error:
        dequant._column_groups(torch.tensor(g_idx), 4, 2)
    assert str(error.value) == f"weight_g_idx [{len(g_idx)}] does not map 4 columns to 2 groups"


def test_group_index_is_ignored_with_one_group_or_any_minus_one():
    assert dequant._column_groups(torch.tensor([0, 5]), 2, 1) is None
    assert dequant._column_groups(torch.tensor([-1, 9]), 2, 2) is None
    assert dequant._column_groups(None, 2, 2) is None
    assert dequant._column_groups(torch.tensor([[1], [0]], dtype=torch.int32), 2, 2).tolist() == [1, 0]


def ct_config(*groups) -> dict:
    return {"quantization_config": {"config_groups": {f"group_{i}": {"targets": targets, "weights": {"num_bits": b}}
                                                      for i, (targets, b) in enumerate(groups)}}}


def test_bit_width_comes_from_the_group_targeting_the_module_else_the_first_group():
    # quant.scheme's rules (compressed-tensors'): exact name, then "re:" prefix match, then a class target (any
    # module here: its class is unknown); a plain target is never a suffix of the name
    config = ct_config((["Linear"], 4), (["re:.*down_proj"], 2), (["lm_head", "q_proj"], 8))
    assert dequant.num_bits_of(config, "model.layers.0.self_attn.q_proj") == 4
    assert dequant.num_bits_of(config, "lm_head") == 8
    assert dequant.num_bits_of(config, "model.layers.0.mlp.down_proj") == 2
    assert dequant.num_bits_of(ct_config((["Linear"], 4), ([], 2)), "Linear") == 4
    assert dequant.num_bits_of(ct_config((["x"], 2), (["re:lm_head"], 4)), "re:lm_head") == 2
    assert dequant.num_bits_of(ct_config((["x"], 8), (["y"], 4)), "m") == 8
    assert dequant.num_bits_of({}, "m") == 8 and dequant.num_bits_of({"quantization_config": None}, "m") == 8
    assert dequant.num_bits_of({"quantization_config": {"config_groups": None}}, "m") == 8
    assert dequant.num_bits_of(ct_config(([], 4)), "m") == 4
    assert dequant.num_bits_of({"quantization_config": {"config_groups": {"g": {"weights": {"num_bits": 2}}}}},
                               "m") == 2


def write_folder(path, tensors: dict[str, torch.Tensor], config: dict):
    return support.write_folder(path, tensors, {"model_type": "llama", **config})


@pytest.fixture
def mixed_folder(tmp_path):
    """A pack-quantized int4 module, an int8 int-quantized one, a dense float weight and an integer buffer."""
    q4 = codes(2, 16, 4)
    q8 = codes(3, 4, 8, seed=1)
    tensors = {
        "a.proj.weight_packed": quant.pack_int4(q4),
        "a.proj.weight_scale": torch.tensor([[0.5, 2.0], [1.0, 4.0]], dtype=torch.float16),
        "a.proj.weight_shape": torch.tensor([2, 16]),
        "b.lin.weight": q8,
        "b.lin.weight_scale": torch.tensor([[0.25], [0.5], [1.0]], dtype=torch.bfloat16),
        "norm.weight": torch.tensor([1.0, 2.0], dtype=torch.bfloat16),
        "norm.bias": torch.tensor([3.0, 4.0], dtype=torch.float16),
        "pos.ids": torch.tensor([1, 2, 3]),
    }
    config = ct_config((["proj"], 4), (["lin"], 8))
    return write_folder(tmp_path / "m", tensors, config), q4, q8


def test_quantized_modules_name_every_stored_part_and_an_integer_weight(mixed_folder):
    from qexport.io.checkpoint import Checkpoint

    ckpt = Checkpoint.open(mixed_folder[0])
    assert dequant.quantized_modules(ckpt) == {
        "a.proj": {leaf: f"a.proj.{leaf}" for leaf in ("weight_packed", "weight_scale", "weight_shape")},
        "b.lin": {"weight": "b.lin.weight", "weight_scale": "b.lin.weight_scale"},
    }
    assert dequant.dequantized_count(ckpt) == 5  # a.proj, b.lin, norm.weight, norm.bias, pos.ids


def test_a_float_weight_beside_a_scale_is_not_a_part_of_the_module(tmp_path):
    from qexport.io.checkpoint import Checkpoint

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        folder = write_folder(tmp_path / str(dtype).split(".")[1], {"m.weight": torch.ones(2, 2, dtype=dtype),
                                                                   "m.weight_scale": torch.ones(2, 1)}, {})
        assert dequant.quantized_modules(Checkpoint.open(folder)) == {"m": {"weight_scale": "m.weight_scale"}}


def test_dequantized_state_dict_has_every_tensor_dense_under_its_original_name(mixed_folder):
    folder, q4, q8 = mixed_folder
    state = dequant.dequantized_state_dict(folder)
    assert sorted(state) == ["a.proj.weight", "b.lin.weight", "norm.bias", "norm.weight", "pos.ids"]
    assert state["a.proj.weight"].dtype == torch.float32
    assert torch.equal(state["a.proj.weight"], expected_dense(q4, torch.tensor([[0.5, 2.0], [1.0, 4.0]])))
    assert torch.equal(state["b.lin.weight"], expected_dense(q8, torch.tensor([[0.25], [0.5], [1.0]])))
    assert state["norm.weight"].dtype == torch.float32 and state["norm.weight"].tolist() == [1.0, 2.0]
    assert state["pos.ids"].dtype == torch.int64 and state["pos.ids"].tolist() == [1, 2, 3]  # integers stay
    half = dequant.dequantized_state_dict(folder, torch.float16)
    assert {t.dtype for n, t in half.items() if n != "pos.ids"} == {torch.float16}


def test_iter_dequantized_marks_quantized_modules_and_reads_a_checkpoint_object(mixed_folder):
    from qexport.io.checkpoint import Checkpoint

    ckpt = Checkpoint.open(mixed_folder[0])
    yielded = [(name, quantized) for name, _, quantized in dequant.iter_dequantized(ckpt)]
    assert len(yielded) == dequant.dequantized_count(ckpt) == 5  # each module once, not once per stored part
    flags = dict(yielded)
    assert flags == {"a.proj.weight": True, "b.lin.weight": True, "norm.weight": False, "norm.bias": False,
                     "pos.ids": False}
    assert sorted(dequant.dequantized_state_dict(ckpt)) == sorted(flags)


# --------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("text,expected", [
    ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("400KB", 400_000), ("2GiB", 2 * 2**30), ("3MiB", 3 * 2**20),
    ("7KiB", 7 * 2**10), ("1234", 1234), ("12B", 12), (" 5 gb ", 5 * 10**9), ("1.5GB", 1_500_000_000),
    ("0.5KiB", 512), ("2.5", 2), (4096, 4096), ("1", 1), (1, 1),
    ("9007199254740993", 2**53 + 1),  # an integer is read exactly, not through a float (2**53 + 1 is no float)
])
def test_sizes_are_read_like_transformers_max_shard_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["abc", "GB", "1e400GB", "5 XB", "1.5.5MB", "", "inf"])
def test_a_size_that_is_no_number_names_the_option_and_the_text(text):
    with pytest.raises(InputError) as error:
        parse_size(text, "--opt")
    assert str(error.value) == f"--opt: {text!r} is not a size (write e.g. 5GB, 500MB, 400KB or a byte count)"


@pytest.mark.parametrize("text", ["0", "-5MB", 0, -3, "0.1B"])
def test_a_size_must_be_positive_naming_the_option(text):
    with pytest.raises(InputError) as error:
        parse_size(text, "--opt")
    assert str(error.value) == f"--opt: {text!r} must be a positive size"
    with pytest.raises(InputError, match="^--max-shard-size: "):
        parse_size(text)


def test_fp16_bytes_are_two_per_element_for_floats_and_as_stored_for_integers():
    assert FLOAT_DTYPES == {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
    assert [fp16_bytes(d, [3, 5], 999) for d in sorted(FLOAT_DTYPES)] == [30] * 6
    assert fp16_bytes("I64", [3, 5], 120) == 120 and fp16_bytes("F32", [], 4) == 2


def test_size_summary_of_a_small_model_by_hand():
    # an fp32 [4, 8] embedding (128 bytes), an int64 [3] buffer (24 bytes), and one int4 module of 16 x 32 weights
    # stored in 300 bytes
    summary = size_summary([("F32", [4, 8], 128), ("I64", [3], 24)], 16 * 32, 300)
    assert summary == {
        "tensor_bytes": 128 + 24 + 300,
        "fp16_tensor_bytes": 64 + 24 + 1024,
        "ratio_vs_fp16": (64 + 24 + 1024) / (128 + 24 + 300),
        "quantized_weights": 512,
        "quantized_bytes": 300,
        "quantized_ratio_vs_fp16": 1024 / 300,
        "bits_per_quantized_weight": 8 * 300 / 512,
    }


def test_size_summary_without_tensors_or_quantized_modules_has_no_ratios():
    assert size_summary([], 0, 0) == {"tensor_bytes": 0, "fp16_tensor_bytes": 0, "ratio_vs_fp16": None,
                                      "quantized_weights": 0, "quantized_bytes": 0, "quantized_ratio_vs_fp16": None,
                                      "bits_per_quantized_weight": None}
    dense_only = size_summary([("BF16", [10], 20)], 0, 0)
    assert dense_only["ratio_vs_fp16"] == 1.0 and dense_only["quantized_ratio_vs_fp16"] is None
