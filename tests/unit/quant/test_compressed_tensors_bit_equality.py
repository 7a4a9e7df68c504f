"""Our quantization arithmetic equals compressed-tensors' own, bit for bit, on the files we write.

The reference side is compressed-tensors alone: its `calculate_qparams` on the weight in the export's compute
dtype (fp16, or bf16 for a bf16 source), and its `PackedQuantizationCompressor` for codes and packing.
"""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors import safe_open

from qexport.quant import primitives as quant
from qexport.quant.dequant import dequantize_module
from qexport.formats import get_format

SHAPES = [(256, 384), (128, 1024), (3, 128), (512, 256)]
SOURCE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FORMATS = [("int4", 4, 128), ("int8", 8, None)]
COMPUTE = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def scheme(num_bits: int, group_size: int | None) -> QuantizationScheme:
    strategy = "group" if group_size else "channel"
    args = QuantizationArgs(num_bits=num_bits, type="int", symmetric=True, strategy=strategy, group_size=group_size)
    return QuantizationScheme(targets=["Linear"], weights=args)


def weight(shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.02
    w[0, :7] *= 40  # an outlier run so that scales differ between groups
    return w.to(dtype)


def ct_scales(w: torch.Tensor, num_bits: int, group_size: int | None) -> torch.Tensor:
    grouped = w.reshape(w.shape[0], -1, group_size or w.shape[1])
    scale, _ = calculate_qparams(grouped.amin(-1), grouped.amax(-1), scheme(num_bits, group_size).weights)
    return scale


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt,num_bits,group_size", FORMATS)
@pytest.mark.parametrize("compute", sorted(COMPUTE))
@pytest.mark.parametrize("source_dtype", SOURCE_DTYPES, ids=str)
def test_export_equals_compressed_tensors_compress(shape, fmt, num_bits, group_size, compute, source_dtype):
    # The source weight as stored (fp32 / bf16 / fp16); compressed-tensors sees it as loaded in the compute dtype.
    w = weight(shape, source_dtype)
    ours = get_format(fmt, dtype=compute).encode("m.weight", w, quantize=True)
    loaded = w.to(COMPUTE[compute])
    scales = ct_scales(loaded, num_bits, group_size)
    assert ours["m.weight_scale"].dtype == COMPUTE[compute]
    assert torch.equal(ours["m.weight_scale"], scales)
    theirs = PackedQuantizationCompressor.compress({"weight": loaded, "weight_scale": scales}, scheme(num_bits, group_size))
    assert torch.equal(ours["m.weight_packed"], theirs["weight_packed"])
    assert torch.equal(ours["m.weight_shape"], theirs["weight_shape"].to(torch.int64))


@pytest.mark.parametrize("cols", [4, 5, 7, 128, 131])
def test_int8_pack_equals_compressed_tensors_pack_for_any_row_length(cols):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    q = torch.randint(-128, 128, (3, cols), generator=torch.Generator().manual_seed(cols), dtype=torch.int8)
    assert torch.equal(quant.pack_int8(q), pack_to_int32(q, 8))
    assert torch.equal(quant.unpack_int8(quant.pack_int8(q), cols), q)


@pytest.mark.parametrize("fmt,num_bits,group_size,module", [("int4", 4, 128, "model.layers.0.mlp.down_proj"),
                                                            ("int8", 8, None, "model.layers.1.self_attn.q_proj")])
def test_compressed_tensors_decompresses_our_file_to_our_dequantization(qwen3_src, export_model, fmt, num_bits,
                                                                         group_size, module):
    out, manifests = export_model(qwen3_src)
    with safe_open(str(out / fmt / manifests[fmt]["tensors"][f"{module}.weight_packed"]["file"]), "pt") as f:
        stored = {leaf: f.get_tensor(f"{module}.{leaf}") for leaf in ("weight_packed", "weight_scale", "weight_shape")}
    theirs = PackedQuantizationCompressor.decompress(stored, scheme(num_bits, group_size))["weight"]
    assert torch.equal(theirs.to(stored["weight_scale"].dtype), dequantize_module(stored, num_bits))
