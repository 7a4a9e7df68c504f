"""Our quantization arithmetic equals compressed-tensors' own, bit for bit, on the files we write."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors import NaiveQuantizationCompressor, PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors import safe_open

from qexport import quant
from qexport.formats import get_format

SHAPES = [(256, 384), (128, 1024), (3, 128), (512, 256)]


def scheme(num_bits: int, group_size: int | None) -> QuantizationScheme:
    strategy = "group" if group_size else "channel"
    args = QuantizationArgs(num_bits=num_bits, type="int", symmetric=True, strategy=strategy, group_size=group_size)
    return QuantizationScheme(targets=["Linear"], weights=args)


def weight(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.02
    w[0, :7] *= 40  # an outlier run so that scales differ between groups
    return w.to(torch.float16)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_bits,group_size", [(4, 128), (8, None)])
def test_scales_equal_compressed_tensors_calculate_qparams(shape, num_bits, group_size):
    w = weight(shape)
    grouped = w.float().reshape(shape[0], -1, group_size or shape[1])
    ct_scale, _ = calculate_qparams(grouped.amin(-1), grouped.amax(-1), scheme(num_bits, group_size).weights)
    assert torch.equal(quant.compute_scales(w, num_bits, group_size), ct_scale.to(torch.float16))


@pytest.mark.parametrize("shape", SHAPES)
def test_int4_pack_equals_compressed_tensors_compress(shape):
    w = weight(shape)
    ours = get_format("int4").encode("m.weight", w, quantize=True)
    theirs = PackedQuantizationCompressor.compress(
        {"weight": w, "weight_scale": ours["m.weight_scale"]}, scheme(4, 128)
    )
    assert torch.equal(ours["m.weight_packed"], theirs["weight_packed"])
    assert torch.equal(ours["m.weight_shape"], theirs["weight_shape"].to(torch.int64))


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_codes_equal_compressed_tensors_compress(shape):
    w = weight(shape)
    ours = get_format("int8").encode("m.weight", w, quantize=True)
    theirs = NaiveQuantizationCompressor.compress({"weight": w, "weight_scale": ours["m.weight_scale"]}, scheme(8, None))
    assert torch.equal(ours["m.weight"], theirs["weight"])


def test_compressed_tensors_decompresses_our_int4_file_to_our_dequantization(qwen3_src, export_model):
    out, manifests = export_model(qwen3_src)
    module = "model.layers.0.mlp.down_proj"
    with safe_open(str(out / "int4" / manifests["int4"]["tensors"][f"{module}.weight_packed"]["file"]), "pt") as f:
        stored = {leaf: f.get_tensor(f"{module}.{leaf}") for leaf in ("weight_packed", "weight_scale", "weight_shape")}
    theirs = PackedQuantizationCompressor.decompress(stored, scheme(4, 128))["weight"]
    q = quant.unpack_int4(stored["weight_packed"], int(stored["weight_shape"][1]))
    assert torch.equal(theirs.to(torch.float16), quant.dequantize(q, stored["weight_scale"], 128))


def test_compressed_tensors_decompresses_our_int8_file_to_our_dequantization(qwen3_src, export_model):
    out, manifests = export_model(qwen3_src)
    module = "model.layers.1.self_attn.q_proj"
    with safe_open(str(out / "int8" / manifests["int8"]["tensors"][f"{module}.weight"]["file"]), "pt") as f:
        stored = {leaf: f.get_tensor(f"{module}.{leaf}") for leaf in ("weight", "weight_scale")}
    theirs = NaiveQuantizationCompressor.decompress(stored, scheme(8, None))["weight"]
    assert torch.equal(theirs.to(torch.float16), quant.dequantize(stored["weight"], stored["weight_scale"], None))
