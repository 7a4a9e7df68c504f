"""Compression ratios and byte accounting: what the manifest predicts is what is stored, per tensor and per file.

INT4 g128 with fp16 scales is 4 + 16/128 = 4.125 bits per quantized weight (3.879x vs fp16, floor 3.85);
INT8 per channel is 8 + 16/in bits (>= 1.95x for in >= 256, floor 1.95). Whole-file ratios are lower because
embeddings and norms stay dense; they are reported next to the quantized ratios.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from qexport.io.checkpoint import Checkpoint
from qexport.verify import Context, check_bytes

FLOORS = {"int8": 1.95, "int4": 3.85}


@pytest.fixture(scope="module")
def exports(qwen3_src, export_model):
    return export_model(qwen3_src)


@pytest.mark.parametrize("fmt", ["fp16", "int8", "int4"])
def test_stored_bytes_equal_predicted_bytes_per_tensor(exports, fmt):
    out, manifests = exports
    entries = Checkpoint.open(out / fmt).entries
    tensors = manifests[fmt]["tensors"]
    assert set(tensors) == set(entries)
    for name, info in tensors.items():
        assert entries[name].nbytes == info["predicted_bytes"] == info["stored_bytes"], name
        assert info["predicted_bytes"] == math.prod(info["shape"]) * {"F16": 2, "BF16": 2, "I8": 1, "I32": 4, "I64": 8}[
            info["dtype"]], name


@pytest.mark.parametrize("fmt", ["fp16", "int8", "int4"])
def test_stored_bytes_equal_predicted_bytes_per_file(qexport_report, exports, fmt):
    out, manifests = exports
    shards = [f for f in manifests[fmt]["files"] if f["name"].endswith(".safetensors")]
    qexport_report.row("qwen3 (tiny, random)", fmt, weight_bytes=sum(f["bytes"] for f in shards),
                       file_ratio=manifests[fmt]["summary"]["ratio_vs_fp16"])
    assert shards
    for record in shards:
        assert (out / fmt / record["name"]).stat().st_size == record["predicted_bytes"] == record["bytes"]


def test_sharded_export_accounts_every_shard(llama_sharded_src, export_model):
    out, manifests = export_model(llama_sharded_src, formats=("int4",), max_shard_size=400_000)
    shards = [f for f in manifests["int4"]["files"] if f["name"].endswith(".safetensors")]
    assert len(shards) > 1
    assert all((out / "int4" / f["name"]).stat().st_size == f["predicted_bytes"] for f in shards)
    assert check_bytes(Context(out / "int4", llama_sharded_src)).passed


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_tensors_reach_the_ratio_floor(qexport_report, qwen3_src, exports, fmt):
    out, _ = exports
    result = check_bytes(Context(out / fmt, qwen3_src))
    m = result.metrics
    qexport_report.metrics(quantized_ratio=m["quantized_ratio"], floor=FLOORS[fmt], file_ratio=m["file_ratio"],
                           bits_per_quantized_weight=m["bits_per_quantized_weight"])
    qexport_report.row("qwen3 (tiny, random)", fmt, weight_bytes=m["weight_bytes"], file_ratio=m["file_ratio"],
                       quantized_ratio=m["quantized_ratio"],
                       bits_per_quantized_weight=m["bits_per_quantized_weight"])
    assert result.passed, result.detail
    assert m["quantized_ratio"] >= FLOORS[fmt]
    assert 1 < m["file_ratio"] < m["quantized_ratio"]  # dense embeddings / lm_head pull the whole file down


def test_int4_g128_costs_4_125_bits_per_quantized_weight(qwen3_src, exports):
    out, manifests = exports
    # weight_shape (16 bytes per module) is the only overhead beyond codes and fp16 scales.
    s = manifests["int4"]["summary"]
    shape_bits = 8 * 16 * 14 / s["quantized_weights"]
    assert s["bits_per_quantized_weight"] == pytest.approx(4.125 + shape_bits, abs=1e-9)


def test_int8_costs_8_bits_plus_one_16_bit_scale_per_row_and_a_shape(exports):
    _, manifests = exports
    tensors = manifests["int8"]["tensors"]
    packed = [name for name, info in tensors.items() if name.endswith(".weight_packed")]
    assert len(packed) == 14  # 7 Linears in each of the 2 blocks, lm_head dense
    for name in packed:
        module = name.removesuffix(".weight_packed")
        rows, cols = tensors[name]["shape"][0], tensors[name]["shape"][1] * 4
        stored = sum(tensors[f"{module}.{leaf}"]["stored_bytes"] for leaf in ("weight_packed", "weight_scale",
                                                                               "weight_shape"))
        assert 8 * stored / (rows * cols) == pytest.approx(8 + 16 / cols + 8 * 16 / (rows * cols)), name


def test_scales_stored_wider_than_the_model_dtype_fail_bytes(tmp_path, qwen3_src, exports):
    # transformers loads fp32 scales in a bf16 model without complaint; they cost 4.25 instead of 4.125 bits.
    import shutil

    from safetensors.torch import load_file, save_file

    out, _ = exports
    folder = Path(shutil.copytree(out / "int4", tmp_path / "int4"))
    (folder / "qexport.json").unlink()  # as another tool would write it: only the files say what was stored
    tensors = {n: (t.float() if n.endswith(".weight_scale") else t)
               for n, t in load_file(folder / "model.safetensors").items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    result = check_bytes(Context(folder, qwen3_src))
    assert not result.passed and "its config predicts" in result.detail


def test_ratio_floor_is_opt_in_and_fails_a_scheme_below_it(qwen3_src, export_model):
    # int4 g32: 4 + 16/32 = 4.5 bits -> 3.56x vs fp16, a legitimate scheme that costs bytes.
    out, _ = export_model(qwen3_src, formats=("int4",), group_size=32)
    assert check_bytes(Context(out / "int4", qwen3_src)).passed
    result = check_bytes(Context(out / "int4", qwen3_src, {"min_quantized_ratio": 3.85}))
    assert not result.passed and "need >= 3.85x" in result.detail
