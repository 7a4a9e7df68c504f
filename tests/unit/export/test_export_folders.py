"""The export core: every folder it writes is a complete, loadable model in the compressed-tensors layout."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qexport.model.architecture import inspect_architecture
from qexport.io.checkpoint import Checkpoint, load_config
from qexport.quant.dequant import dequantized_state_dict
from qexport.verify.functional import fixed_token_ids, load_model, model_from_state_dict, model_outputs
from qexport.io.safetensors_file import read_header, sha256_file

FORMATS = ("fp16", "int8", "int4")
CAUSAL_MODELS = ["qwen3_src", "qwen3_tied_src", "llama_sharded_src"]


def stored_tensors(folder: Path) -> dict:
    """name -> (dtype, shape) over every safetensors file of a folder, read from headers."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update({n: (e.dtype, e.shape) for n, e in read_header(path)[0].items()})
    return out


@pytest.fixture(params=CAUSAL_MODELS)
def causal_src(request):
    return request.getfixturevalue(request.param)


# --- what is stored ----------------------------------------------------------------------------------------------


def test_int4_stores_packed_int32_words_group_scales_and_shape(qwen3_src, export_model):
    out, _ = export_model(qwen3_src)
    stored = stored_tensors(out / "int4")
    module = "model.layers.0.mlp.down_proj"  # in = intermediate 768
    assert stored[f"{module}.weight_packed"] == ("I32", (256, 768 // 8))
    assert stored[f"{module}.weight_scale"] == ("BF16", (256, 768 // 128))  # the bf16 source's compute dtype
    assert stored[f"{module}.weight_shape"] == ("I64", (2,))
    assert f"{module}.weight" not in stored


def test_int8_stores_packed_int32_words_per_channel_scale_and_shape(qwen3_src, export_model):
    out, _ = export_model(qwen3_src)
    stored = stored_tensors(out / "int8")
    module = "model.layers.0.mlp.down_proj"  # in = intermediate 768
    assert stored[f"{module}.weight_packed"] == ("I32", (256, 768 // 4))
    assert stored[f"{module}.weight_scale"] == ("BF16", (256, 1))
    assert stored[f"{module}.weight_shape"] == ("I64", (2,))
    assert f"{module}.weight" not in stored


def test_fp16_stores_every_floating_tensor_as_f16(qwen3_src, export_model):
    out, _ = export_model(qwen3_src)
    assert {dtype for dtype, _ in stored_tensors(out / "fp16").values()} == {"F16"}


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_tensors_are_exactly_the_linear_weights_but_lm_head(qwen3_src, export_model, fmt):
    out, manifests = export_model(qwen3_src)
    arch = inspect_architecture(load_config(qwen3_src))
    quantized = {info["source"] for info in manifests[fmt]["tensors"].values() if info["quantized"]}
    assert quantized == {n for n in arch.linear_weights if not n.startswith("lm_head")}


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_embeddings_norms_and_lm_head_stay_dense_in_the_bf16_sources_dtype(qwen3_src, export_model, fmt):
    out, _ = export_model(qwen3_src)
    stored = stored_tensors(out / fmt)
    for name in ["model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight",
                 "model.layers.0.self_attn.q_norm.weight", "lm_head.weight"]:
        assert stored[name][0] == "BF16", name


@pytest.mark.parametrize("source_dtype", ["float32", "float16"])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_fp32_and_fp16_sources_export_in_fp16(build_model, export_model, source_dtype, fmt):
    out, _ = export_model(build_model("qwen3", dtype=source_dtype), formats=(fmt,))
    floats = {dtype for dtype, _ in stored_tensors(out / fmt).values() if dtype not in ("I32", "I64")}
    assert floats == {"F16"}
    assert load_config(out / fmt)["dtype"] == "float16"


def test_bf16_source_dense_tensors_are_copied_bit_for_bit(qwen3_src, export_model):
    out, _ = export_model(qwen3_src)
    with safe_open(str(qwen3_src / "model.safetensors"), "pt") as src, \
            safe_open(str(out / "int4" / "model.safetensors"), "pt") as exported:
        for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            assert torch.equal(src.get_tensor(name), exported.get_tensor(name)), name


def test_tied_embeddings_are_stored_once_without_lm_head(qwen3_tied_src, export_model):
    out, _ = export_model(qwen3_tied_src)
    for fmt in FORMATS:
        names = stored_tensors(out / fmt)
        assert "model.embed_tokens.weight" in names
        assert not [n for n in names if n.startswith("lm_head")], fmt


def test_linear_whose_input_does_not_divide_by_a_given_group_size_stays_dense_with_warning(build_model, tmp_path,
                                                                                           caplog):
    from qexport.export.pipeline import ExportOptions, export_folder

    src = build_model("qwen3", intermediate_size=320)  # down_proj input 320 is not a multiple of 128
    with caplog.at_level(logging.WARNING, logger="qexport"):
        manifests = export_folder(src, tmp_path / "out", ExportOptions(formats=("int4",), group_size=128,
                                                                       progress=False))
    down = "model.layers.0.mlp.down_proj"
    assert f"{down}.weight" in manifests["int4"]["dense_linears"]
    assert any(down in r.getMessage() and "group size 128" in r.getMessage() for r in caplog.records)
    assert down in load_config(tmp_path / "out" / "int4")["quantization_config"]["ignore"]
    assert stored_tensors(tmp_path / "out" / "int4")[f"{down}.weight"][0] == "BF16"
    _, info = load_model(tmp_path / "out" / "int4")
    assert not any(info.values()), info


def test_smaller_group_size_quantizes_what_128_cannot(build_model, tmp_path):
    from qexport.export.pipeline import ExportOptions, export_folder

    src = build_model("qwen3", intermediate_size=320)
    manifests = export_folder(src, tmp_path / "out", ExportOptions(formats=("int4",), group_size=64, progress=False))
    assert manifests["int4"]["dense_linears"] == {}
    config = load_config(tmp_path / "out" / "int4")["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["group_size"] == 64
    _, info = load_model(tmp_path / "out" / "int4")
    assert not any(info.values()), info


# --- config.json and side files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_config_keeps_every_source_key_and_sets_dtype(qwen3_src, export_model, fmt):
    out, _ = export_model(qwen3_src)
    source, exported = load_config(qwen3_src), load_config(out / fmt)
    assert exported["model_type"] == "qwen3"
    assert {k: v for k, v in exported.items() if k not in ("dtype", "quantization_config")} == {
        k: v for k, v in source.items() if k != "dtype"
    }
    # fp16 is what the user asked for; quantized formats keep the bf16 source's compute dtype.
    assert exported["dtype"] == ("float16" if fmt == "fp16" else "bfloat16")


@pytest.mark.parametrize("fmt,compression,weights", [
    ("int8", "pack-quantized",
     {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True, "dynamic": False}),
    ("int4", "pack-quantized",
     {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": True, "dynamic": False}),
])
def test_quantization_config_is_the_compressed_tensors_one(qwen3_src, export_model, fmt, compression, weights):
    out, _ = export_model(qwen3_src)
    assert load_config(out / fmt)["quantization_config"] == {
        "quant_method": "compressed-tensors",
        "format": compression,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "format": compression, "weights": weights}},
        "ignore": ["lm_head"],
    }


def test_fp16_config_has_no_quantization_config(qwen3_src, export_model):
    out, _ = export_model(qwen3_src)
    assert "quantization_config" not in load_config(out / "fp16")


@pytest.mark.parametrize("fmt", FORMATS)
def test_tokenizer_and_generation_files_are_copied_unchanged(qwen3_src, export_model, fmt):
    out, _ = export_model(qwen3_src)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert sha256_file(out / fmt / name) == sha256_file(qwen3_src / name), name


# --- manifest and sharding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_manifest_predicted_bytes_equal_stored_bytes_per_tensor_and_file(llama_sharded_src, export_model, fmt):
    out, manifests = export_model(llama_sharded_src, max_shard_size=400_000)
    manifest = json.loads((out / fmt / "qexport.json").read_text())
    assert manifest == manifests[fmt]
    for name, info in manifest["tensors"].items():
        assert info["predicted_bytes"] == info["stored_bytes"], name
    shards = [f for f in manifest["files"] if f["name"].endswith(".safetensors")]
    assert len(shards) > 1
    for f in shards:
        assert f["predicted_bytes"] == f["bytes"] == (out / fmt / f["name"]).stat().st_size


@pytest.mark.parametrize("fmt", FORMATS)
def test_manifest_accounts_for_every_file_with_its_sha256(llama_sharded_src, export_model, fmt):
    out, manifests = export_model(llama_sharded_src, max_shard_size=400_000)
    on_disk = {p.relative_to(out / fmt).as_posix() for p in (out / fmt).rglob("*") if p.is_file()}
    listed = {f["name"]: f for f in manifests[fmt]["files"]}
    assert on_disk - {"qexport.json"} == set(listed)
    for name, f in listed.items():
        assert sha256_file(out / fmt / name) == f["sha256"], name


def test_manifest_records_source_files_with_sha256(llama_sharded_src, export_model):
    _, manifests = export_model(llama_sharded_src, max_shard_size=400_000)
    recorded = {f["name"]: f["sha256"] for f in manifests["int4"]["source"]["files"]}
    expected = {p.name for p in llama_sharded_src.glob("*.safetensors")} | {"config.json", "model.safetensors.index.json"}
    assert set(recorded) == expected
    assert all(recorded[n] == sha256_file(llama_sharded_src / n) for n in recorded)


@pytest.mark.parametrize("fmt", FORMATS)
def test_sharded_output_index_and_shards_agree_both_ways(llama_sharded_src, export_model, fmt):
    out, manifests = export_model(llama_sharded_src, max_shard_size=400_000)
    index = json.loads((out / fmt / "model.safetensors.index.json").read_text())
    in_files = {}
    for path in (out / fmt).glob("*.safetensors"):
        # A shard over the limit holds one source tensor's group alone (it cannot be split), as transformers does.
        sources = {manifests[fmt]["tensors"][n]["source"] for n in read_header(path)[0]}
        assert path.stat().st_size <= 400_000 or len(sources) == 1, (path.name, sources)
        in_files.update({n: path.name for n in read_header(path)[0]})
    assert index["weight_map"] == in_files
    assert index["metadata"]["total_size"] == sum(
        e.nbytes for p in (out / fmt).glob("*.safetensors") for e in read_header(p)[0].values())


def test_output_below_max_shard_size_is_a_single_file(qwen3_src, export_model):
    out, _ = export_model(qwen3_src)
    assert sorted(p.name for p in (out / "int4").glob("*.safetensors*")) == ["model.safetensors"]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_module_tensors_never_straddle_shards(llama_sharded_src, export_model, fmt):
    out, manifests = export_model(llama_sharded_src, max_shard_size=400_000)
    files_by_source: dict[str, set] = {}
    for info in manifests[fmt]["tensors"].values():
        files_by_source.setdefault(info["source"], set()).add(info["file"])
    assert all(len(files) == 1 for files in files_by_source.values())


# --- reload and logits -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_reloads_in_transformers_with_empty_loading_info(causal_src, export_model, fmt):
    out, _ = export_model(causal_src)
    _, info = load_model(out / fmt)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}


@pytest.mark.parametrize("fmt", FORMATS)
def test_reloaded_logits_equal_our_own_dequantization_exactly_in_fp32(causal_src, export_model, fmt):
    out, _ = export_model(causal_src)
    model, _ = load_model(out / fmt, dtype=torch.float32)
    ours = model_from_state_dict(load_config(causal_src), dequantized_state_dict(out / fmt, torch.float32))
    ids = fixed_token_ids(model.config.vocab_size, batch=2, length=32)
    assert torch.equal(model_outputs(model, ids), model_outputs(ours, ids))


@pytest.mark.parametrize("preset", ["qwen2", "mistral"])
def test_other_decoder_architectures_export_and_reload(build_model, export_model, preset):
    out, _ = export_model(build_model(preset), formats=("int4",))
    _, info = load_model(out / "int4")
    assert not any(info.values()), info


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_fp32_and_fp16_sources_export_like_bf16(build_model, export_model, dtype):
    out, manifests = export_model(build_model("qwen3", dtype=dtype), formats=("int4",))
    assert manifests["int4"]["summary"]["quantized_ratio_vs_fp16"] > 3.85  # 16 / 4.125 = 3.88 in theory
    _, info = load_model(out / "int4")
    assert not any(info.values()), info


@pytest.mark.parametrize("fmt", FORMATS)
def test_minilm_encoder_exports_and_reloads_with_automodel(minilm_src, export_model, fmt):
    out, manifests = export_model(minilm_src)
    model, info = load_model(out / fmt)
    assert type(model).__name__ == "BertModel"
    assert not any(info.values()), info
    assert (out / fmt / "1_Pooling" / "config.json").is_file()  # sentence-transformers subfolder comes along


def test_minilm_quantizes_pooler_and_encoder_linears(minilm_src, export_model):
    _, manifests = export_model(minilm_src)
    quantized = {i["source"] for i in manifests["int4"]["tensors"].values() if i["quantized"]}
    arch = inspect_architecture(load_config(minilm_src))
    assert quantized == set(arch.linear_weights) and len(quantized) == 6 * 6 + 1


def test_source_folder_is_not_modified_by_export(qwen3_src, export_model):
    before = {p.name: sha256_file(p) for p in qwen3_src.iterdir() if p.is_file()}
    export_model(qwen3_src, formats=("int8",), max_shard_size=10**6)
    assert {p.name: sha256_file(p) for p in qwen3_src.iterdir() if p.is_file()} == before


def test_checkpoint_reads_tensors_in_file_then_offset_order(llama_sharded_src):
    ckpt = Checkpoint.open(llama_sharded_src)
    order = [(ckpt.files.index(ckpt.entries[n].file), ckpt.entries[n].start) for n in ckpt.names]
    assert order == sorted(order)
    with safe_open(str(ckpt.entries[ckpt.names[0]].file), "pt") as f:
        assert torch.equal(f.get_tensor(ckpt.names[0]), ckpt.read(ckpt.names[0]))
