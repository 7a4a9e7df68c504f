"""Compression ratios and byte accounting: what the manifest predicts is what is stored, per tensor and per file.

INT4 g128 with fp16 scales is 4 + 16/128 = 4.125 bits per quantized weight (3.879x vs fp16, floor 3.85);
INT8 per channel is 8 + 16/in bits (>= 1.95x for in >= 256, floor 1.95). Whole-file ratios are lower because
embeddings and norms stay dense; they are reported next to the quantized ratios.
"""

from __future__ import annotations

import math

import pytest

from qexport.checkpoint import Checkpoint
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


def test_int8_costs_8_bits_plus_one_fp16_scale_per_row(exports):
    _, manifests = exports
    tensors = manifests["int8"]["tensors"]
    for name, info in tensors.items():
        if info["quantized"] and info["dtype"] == "I8":
            rows, cols = info["shape"]
            scale = tensors[name.removesuffix(".weight") + ".weight_scale"]
            bits = 8 * (info["stored_bytes"] + scale["stored_bytes"]) / (rows * cols)
            assert bits == pytest.approx(8 + 16 / cols), name
