"""Asymmetric INT4 (`int4-asym`): compressed-tensors' W4A16_ASYM layout, bit for bit, and it reloads exactly.

The reference side is compressed-tensors alone: `calculate_qparams` (symmetric false) on the weight in the
export's compute dtype, and `PackedQuantizationCompressor` for codes, packing and the packed zero points.
"""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.utils import calculate_qparams

from qexport.quant import primitives as quant
from qexport.quant.dequant import dequantize_module
from qexport.formats import get_format

COMPUTE = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# Out sizes that are and are not multiples of 8 (the zero points pack 8 per word along the output dimension).
SHAPES = [(256, 384), (3, 128), (13, 256), (64, 1024)]


def scheme(group_size: int) -> QuantizationScheme:
    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=group_size)
    return QuantizationScheme(targets=["Linear"], weights=args)


def weight(shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.02 + 0.005  # off-centre, so zero points differ from 0
    w[0, :7] *= 40  # an outlier run so that ranges differ between groups
    w[-1, :64] = w[-1, :64].abs()  # a group with no negative value: its range is widened to include 0
    return w.to(dtype)


def ct_compress(loaded: torch.Tensor, group_size: int) -> dict:
    grouped = loaded.reshape(loaded.shape[0], -1, group_size)
    scale, zp = calculate_qparams(grouped.amin(-1), grouped.amax(-1), scheme(group_size).weights)
    theirs = PackedQuantizationCompressor.compress({"weight": loaded, "weight_scale": scale,
                                                     "weight_zero_point": zp}, scheme(group_size))
    return {**theirs, "zero_point": zp}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("group_size", [128, 64, 32])
@pytest.mark.parametrize("compute", sorted(COMPUTE))
@pytest.mark.parametrize("source_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int4_asym_equals_compressed_tensors_compress(shape, group_size, compute, source_dtype):
    w = weight(shape, source_dtype)
    ours = get_format("int4-asym", group_size=group_size, dtype=compute).encode("m.weight", w, quantize=True)
    theirs = ct_compress(w.to(COMPUTE[compute]), group_size)
    assert ours["m.weight_scale"].dtype == COMPUTE[compute]
    assert torch.equal(ours["m.weight_scale"], theirs["weight_scale"])
    assert torch.equal(ours["m.weight_packed"], theirs["weight_packed"])
    assert theirs["weight_zero_point"].dtype == torch.int32
    assert torch.equal(ours["m.weight_zero_point"], theirs["weight_zero_point"])
    assert torch.equal(ours["m.weight_shape"], theirs["weight_shape"].to(torch.int64))


def test_int4_asym_predicted_layout_is_what_encode_returns():
    fmt = get_format("int4-asym", group_size=64)
    w = weight((13, 256))
    encoded = fmt.encode("m.weight", w, quantize=True)
    predicted = {n: (d, s) for n, d, s in fmt.stored("m.weight", "F32", (13, 256), quantize=True)}
    names = {"F16": torch.float16, "I32": torch.int32, "I64": torch.int64}
    assert predicted["m.weight_zero_point"] == ("I32", (2, 4))  # ceil(13 / 8) words x 256 / 64 groups
    assert {n: (names[d], s) for n, (d, s) in predicted.items()} == \
        {n: (t.dtype, tuple(t.shape)) for n, t in encoded.items()}


@pytest.mark.parametrize("rows", [1, 7, 8, 9, 64])
def test_zero_point_column_packing_equals_compressed_tensors(rows):
    zp = torch.randint(-8, 8, (rows, 5), generator=torch.Generator().manual_seed(rows), dtype=torch.int8)
    packed = quant.pack_int4_columns(zp)
    assert torch.equal(packed, pack_to_int32(zp, 4, packed_dim=0))
    assert torch.equal(quant.unpack_int4_columns(packed, rows), zp)
    assert torch.equal(unpack_from_int32(packed, 4, torch.Size((rows, 5)), packed_dim=0), zp)


def test_all_zero_group_dequantizes_to_zero():
    w = weight((8, 128))
    w[2, 64:] = 0
    stored = get_format("int4-asym", group_size=64).encode("m.weight", w, quantize=True)
    dense = dequantize_module({k.removeprefix("m."): v for k, v in stored.items()}, 4)
    assert torch.equal(dense[2, 64:], torch.zeros(64, dtype=dense.dtype))


@pytest.mark.parametrize("group_size", [128, 32])
def test_compressed_tensors_decompresses_our_tensors_to_our_dequantization(group_size):
    w = weight((13, 256))
    stored = {k.removeprefix("m."): v for k, v in
              get_format("int4-asym", group_size=group_size).encode("m.weight", w, quantize=True).items()}
    theirs = PackedQuantizationCompressor.decompress(dict(stored), scheme(group_size))["weight"]
    assert torch.equal(theirs.to(stored["weight_scale"].dtype), dequantize_module(stored, 4))


def test_asymmetric_error_is_within_half_a_step():
    # Round to nearest with fp16 arithmetic: |w - w_hat| <= ~0.52 scale (docs/design.md's fp16 slack), except where
    # the zero point was clamped, which never happens when the range includes 0.
    w = weight((64, 512))
    stored = {k.removeprefix("m."): v for k, v in
              get_format("int4-asym", group_size=64).encode("m.weight", w, quantize=True).items()}
    dense = dequantize_module(stored, 4, torch.float32)
    step = stored["weight_scale"].float().repeat_interleave(64, dim=1)
    assert ((w - dense).abs() / step).max() <= 0.52


# --- a whole export --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def asym_export(qwen3_src, export_model):
    out, manifests = export_model(qwen3_src, formats=("int4-asym",))
    return out / "int4-asym", manifests["int4-asym"]


def test_int4_asym_config_declares_asymmetric_pack_quantized_groups(asym_export):
    from qexport.io.checkpoint import load_config

    qc = load_config(asym_export[0])["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["quantization_status"] == "compressed"
    assert qc["dequantize"] is True  # the transformers route that unpacks zero points (see formats/int4_asym.py)
    assert qc["config_groups"]["group_0"]["weights"] == {
        "num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": False, "dynamic": False}


def test_int4_asym_reloads_in_transformers_with_empty_loading_info_and_our_logits(asym_export, qwen3_src):
    from qexport.io.checkpoint import load_config
    from qexport.quant.dequant import dequantized_state_dict
    from qexport.verify.functional import config_dtype, fixed_token_ids, load_model, model_from_state_dict, model_outputs

    model, info = load_model(asym_export[0], dtype=torch.float32)
    assert not any(info.values()), info
    # transformers' dequantize route computes (q - zero point) * scale in the scale dtype, then casts.
    scale_dtype = config_dtype(load_config(asym_export[0]))  # bfloat16: the source is bf16
    dense = {n: t.float() if t.is_floating_point() else t
             for n, t in dequantized_state_dict(asym_export[0], scale_dtype).items()}
    ours = model_from_state_dict(load_config(qwen3_src), dense)
    ids = fixed_token_ids(model.config.vocab_size, batch=2, length=32)
    assert torch.equal(model_outputs(model, ids), model_outputs(ours, ids))


def test_int4_asym_export_passes_verify(asym_export, qwen3_src):
    from qexport.verify import verify

    result = verify(asym_export[0], qwen3_src)
    assert result.passed, [(c.name, c.detail) for c in result.failures]


def test_int4_asym_bytes_are_the_symmetric_bytes_plus_four_bits_per_group(asym_export, qwen3_src, export_model):
    _, sym = export_model(qwen3_src, formats=("int4",))
    sym, asym = sym["int4"]["summary"], asym_export[1]["summary"]
    # A 4-bit zero point per group of 128: 4 / 128 bits per weight more (4.125 -> 4.15625 with 16-bit scales),
    # exactly, since every out size of this model is a multiple of 8 (no padded zero-point word).
    assert asym["quantized_weights"] == sym["quantized_weights"]
    assert asym["quantized_bytes"] - sym["quantized_bytes"] == asym["quantized_weights"] * 4 / 128 / 8


def test_int4_asym_card_describes_zero_points(asym_export):
    card = (asym_export[0] / "README.md").read_text()
    assert "asymmetric" in card and "`weight_zero_point`" in card and "W4A16_ASYM" in card


def test_verify_layout_fails_an_unpacked_zero_point(asym_export, qwen3_src, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from qexport.verify import verify

    folder = tmp_path / "bad"
    shutil.copytree(asym_export[0], folder)
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight_zero_point"
    tensors[name] = quant.unpack_int4_columns(tensors[name], 256).to(torch.int32)  # [out, g]: not packed
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    layout = verify(folder, qwen3_src, only=["layout"]).checks[0]
    assert not layout.passed and "q_proj.weight_zero_point is I32 [256, 2], expected I32 [32, 2]" in layout.detail


def test_int4_asym_is_dense_in_memory_under_transformers_while_int4_stays_packed(asym_export, qwen3_out):
    # What `"dequantize": true` costs transformers users (the reason int4-asym is not the default, docs/formats.md): the
    # loaded int4-asym model holds dense weights, as many bytes as the fp16 export's; symmetric int4 keeps its
    # packed codes. Measured on this tiny qwen3: 4,197,376 bytes (int4-asym and fp16) vs 1,862,880 (int4). If a
    # transformers / compressed-tensors upgrade loads int4-asym packed, this fails: revisit the default then.
    from qexport.verify.functional import load_model

    def state_bytes(folder):
        model, _ = load_model(folder, dtype="auto")  # config.json's dtype, as a user's plain load
        q_proj = model.model.layers[0].self_attn.q_proj
        names = {n for n, _ in q_proj.named_parameters()} | {n for n, _ in q_proj.named_buffers()}
        return sum(t.numel() * t.element_size() for t in model.state_dict().values()), names

    asym_bytes, asym_names = state_bytes(asym_export[0])
    sym_bytes, sym_names = state_bytes(qwen3_out / "int4")
    fp16_bytes, _ = state_bytes(qwen3_out / "fp16")
    assert "weight_packed" not in asym_names and "weight" in asym_names
    assert "weight_packed" in sym_names
    assert asym_bytes == fp16_bytes > 2 * sym_bytes
