"""Reload checks on good exports: each `qexport verify` check that concerns config, tokenizer, loading and layout
passes on every format of a plain, a tied and a sharded model (the planted-defect side is tests/acceptance/test_verify_cli.py).
"""

from __future__ import annotations

import json

import pytest

from qexport import verify as V
FORMATS = ["fp16", "int8", "int4"]


@pytest.fixture(scope="module")
def contexts(qwen3_src, export_model):
    out, _ = export_model(qwen3_src)
    return {fmt: V.Context(out / fmt, qwen3_src) for fmt in FORMATS}


@pytest.mark.parametrize("fmt", FORMATS)
def test_autoconfig_round_trip_keeps_every_source_key(contexts, fmt):
    result = V.check_config_keys(contexts[fmt])
    assert result.passed, result.detail
    assert result.metrics == {"missing_keys": [], "changed_keys": []}


@pytest.mark.parametrize("fmt", FORMATS)
def test_model_type_is_preserved(contexts, fmt):
    assert V.check_model_type(contexts[fmt]).passed


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantization_config_is_well_formed(contexts, fmt):
    ctx = contexts[fmt]
    result = V.check_quantization_config(ctx)
    assert result.passed, result.detail
    assert (ctx.qc is None) == (fmt == "fp16")
    assert V.check_layout(ctx).passed


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantization_config_names_format_and_bits_as_design_md(contexts, fmt):
    qc = contexts[fmt].qc
    group = qc["config_groups"]["group_0"]
    expected = {"int8": ("pack-quantized", 8, "channel"), "int4": ("pack-quantized", 4, "group")}[fmt]
    assert (qc["format"], group["weights"]["num_bits"], group["weights"]["strategy"]) == expected
    assert group["format"] == qc["format"] and qc["quantization_status"] == "compressed"
    assert qc["ignore"] == ["lm_head"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_tokenizer_loads_and_encodes_like_the_source(contexts, fmt):
    assert V.check_tokenizer_files(contexts[fmt]).passed
    result = V.check_tokenizer(contexts[fmt])
    assert result.passed, result.detail


@pytest.mark.parametrize("fmt", FORMATS)
def test_model_loads_with_empty_loading_info(qexport_report, contexts, fmt):
    result = V.check_reload(contexts[fmt])
    qexport_report.row("qwen3 (tiny, random)", fmt, reload_ok=result.passed)
    assert result.passed, result.detail
    model, info = contexts[fmt].loaded
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}


def test_sharded_index_and_shards_agree_both_ways(llama_sharded_src, export_model):
    out, _ = export_model(llama_sharded_src, formats=("int8",), max_shard_size=600_000)
    ctx = V.Context(out / "int8", llama_sharded_src)
    assert V.check_shards(ctx).passed
    index = json.loads((out / "int8" / "model.safetensors.index.json").read_text())
    shards = {p.name for p in (out / "int8").glob("*.safetensors")}
    assert set(index["weight_map"].values()) == shards and len(shards) > 1
    assert set(index["weight_map"]) == set(ctx.ckpt.entries)
    assert V.check_tensor_names(ctx).passed


@pytest.mark.parametrize("fmt", FORMATS)
def test_tied_embeddings_are_stored_once(qwen3_tied_src, export_model, fmt):
    out, _ = export_model(qwen3_tied_src)
    ctx = V.Context(out / fmt, qwen3_tied_src)
    result = V.check_tensor_names(ctx)
    assert result.passed, result.detail
    assert "lm_head.weight" not in ctx.ckpt.entries and "model.embed_tokens.weight" in ctx.ckpt.entries
    assert V.check_reload(ctx).passed
