"""`qexport inspect`: totals from headers alone, for our exports, compressed-tensors' own and dense folders,
and the problems a folder's headers show, reported rather than raised."""

from __future__ import annotations

import json
import math
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch

from qexport.model.architecture import inspect_architecture
from qexport.io.checkpoint import load_config
from qexport.cli.main import main
from qexport.report.inspection import inspect_folder

FORMATS = ("fp16", "int8", "int4")
MANIFEST_TOTALS = ("tensor_bytes", "fp16_tensor_bytes", "ratio_vs_fp16", "quantized_weights", "quantized_bytes",
                   "quantized_ratio_vs_fp16", "bits_per_quantized_weight")


def compress_with_compressed_tensors(src: Path, out: Path, scheme) -> Path:
    """Quantize and save a model with compressed-tensors' own API (what llm-compressor does under the hood)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    from transformers import AutoModelForCausalLM

    from qexport.model.quiet import quiet

    with quiet():
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16)
        apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]),
                                  show_progress=False)
        for module in model.modules():
            args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
            if args is None:
                continue
            w = module.weight.data
            if args.strategy == "group":  # min / max per group of group_size input columns
                w = w.unflatten(-1, (w.shape[1] // args.group_size, args.group_size))
                low, high = w.amin(-1), w.amax(-1)
            else:
                low, high = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
            module.weight_scale.data = calculate_qparams(low, high, args)[0].to(module.weight_scale.dtype)
        compressor = ModelCompressor.from_pretrained_model(model)
        compressor.compress_model(model)
        model.save_pretrained(out)
        compressor.update_config(str(out))
    return out


@pytest.fixture(scope="module")
def ct_folders(qwen3_src, tmp_path_factory):
    """compressed-tensors' own W4A16 (pack-quantized, group 128), W8A16 per channel (pack-quantized 8-bit) and
    the same int8 scheme written naive-quantized (one int8 per weight), as other tools write it."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, preset_name_to_scheme

    root = tmp_path_factory.mktemp("ct")
    channel = QuantizationArgs(num_bits=8, type="int", strategy="channel", symmetric=True)
    naive = QuantizationScheme(targets=["Linear"], format="naive-quantized", weights=channel)
    # compressed-tensors 0.20's W8A16 preset is group 128; qexport's int8 is per channel, so spell the scheme out.
    packed = QuantizationScheme(targets=["Linear"], format="pack-quantized", weights=channel)
    return {
        "int4": compress_with_compressed_tensors(qwen3_src, root / "w4a16", preset_name_to_scheme("W4A16", ["Linear"])),
        "int8": compress_with_compressed_tensors(qwen3_src, root / "w8a16", packed),
        "naive-int8": compress_with_compressed_tensors(qwen3_src, root / "w8a16-naive", naive),
    }


def linear_weight_shapes(src: Path) -> list[tuple[int, ...]]:
    """Shapes of the nn.Linear weights but lm_head, from the model's structure (independent of inspect)."""
    arch = inspect_architecture(load_config(src))
    return [arch.shapes[n] for n in sorted(arch.linear_weights) if n != "lm_head.weight"]


def copy_folder(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2))


# ---------------------------------------------------------------------------------------------------------------
# Totals


@pytest.mark.parametrize("fmt", FORMATS)
def test_inspect_totals_equal_manifest(export_model, qwen3_src, fmt):
    out, manifests = export_model(qwen3_src)
    report = inspect_folder(out / fmt)
    summary = manifests[fmt]["summary"]
    assert {k: report["totals"][k] for k in MANIFEST_TOTALS} == {k: summary[k] for k in MANIFEST_TOTALS}
    assert report["totals"]["weight_file_bytes"] == summary["weight_bytes"]
    assert report["totals"]["file_bytes"] == summary["total_bytes"] + (out / fmt / "qexport.json").stat().st_size
    assert report["problems"] == []


def test_inspect_totals_equal_manifest_for_sharded_export(export_model, llama_sharded_src):
    out, manifests = export_model(llama_sharded_src, formats=("int4",), max_shard_size=600_000)
    report = inspect_folder(out / "int4")
    assert len(report["weight_files"]) == sum(f["name"].endswith(".safetensors") for f in manifests["int4"]["files"])
    assert len(report["weight_files"]) > 1
    summary = manifests["int4"]["summary"]
    assert {k: report["totals"][k] for k in MANIFEST_TOTALS} == {k: summary[k] for k in MANIFEST_TOTALS}
    assert report["problems"] == []


def test_inspect_compressed_tensors_w4a16_totals(ct_folders, qwen3_src):
    shapes = linear_weight_shapes(qwen3_src)
    report = inspect_folder(ct_folders["int4"])
    t = report["totals"]
    assert t["quantized_modules"] == len(shapes)
    assert t["quantized_weights"] == sum(math.prod(s) for s in shapes)
    # int4 codes, one fp16 scale per 128 inputs, one int64 [2] weight_shape per module
    assert t["quantized_bytes"] == sum(o * i // 2 + 2 * o * i // 128 + 16 for o, i in shapes)
    assert report["problems"] == []


def test_inspect_compressed_tensors_naive_int8_totals(ct_folders, qwen3_src):
    shapes = linear_weight_shapes(qwen3_src)
    report = inspect_folder(ct_folders["naive-int8"])
    t = report["totals"]
    assert t["quantized_weights"] == sum(math.prod(s) for s in shapes)
    assert t["quantized_bytes"] == sum(o * i + 2 * o for o, i in shapes)  # int8 codes + one fp16 scale per row
    assert report["problems"] == []


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_inspect_compressed_tensors_folder_matches_our_export_of_same_scheme(ct_folders, export_model, qwen3_src,
                                                                             fmt):
    out, _ = export_model(qwen3_src)
    theirs, ours = inspect_folder(ct_folders[fmt])["totals"], inspect_folder(out / fmt)["totals"]
    assert {k: theirs[k] for k in MANIFEST_TOTALS} == {k: ours[k] for k in MANIFEST_TOTALS}


def test_inspect_dense_checkpoint(qwen3_src):
    report = inspect_folder(qwen3_src)
    t = report["totals"]
    assert report["quantization"] is None
    assert t["quantized_weights"] == 0 and t["bits_per_quantized_weight"] is None
    (header_len,) = struct.unpack("<Q", (qwen3_src / "model.safetensors").read_bytes()[:8])
    assert t["tensor_bytes"] == (qwen3_src / "model.safetensors").stat().st_size - 8 - header_len
    assert t["ratio_vs_fp16"] == 1.0
    assert {r["stored_as"] for r in report["layer_types"]} == {"dense BF16"}
    assert report["problems"] == []


def test_inspect_reports_layer_types_with_block_numbers_folded(export_model, qwen3_src):
    out, _ = export_model(qwen3_src)
    rows = {r["layer_type"]: r for r in inspect_folder(out / "int4")["layer_types"]}
    assert rows["model.layers.*.mlp.up_proj"]["count"] == 2  # the tiny preset has two blocks
    assert rows["model.layers.*.mlp.up_proj"]["stored_as"] == "int4 group 128 (packed)"
    assert rows["model.layers.*.mlp.up_proj"]["shape"] == "[768, 256]"
    assert rows["lm_head.weight"]["stored_as"] == "dense BF16"  # the bf16 source's dtype


def test_inspect_reads_headers_only_on_a_multi_gigabyte_file(tmp_path):
    # A 4 GiB tensor in a sparse file: nothing to read but the header, so this is fast and uses no disk.
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "F16", "shape": [32768, 65536],
                                                       "data_offsets": [0, 2 * 32768 * 65536]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(tmp_path / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 2 * 32768 * 65536)
    write_json(tmp_path / "config.json", {"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    started = time.perf_counter()
    report = inspect_folder(tmp_path)
    # Reading 4 GiB would take seconds even from page cache; the header takes milliseconds. 1 s allows a loaded box.
    assert time.perf_counter() - started < 1.0
    assert report["totals"]["tensor_bytes"] == 2 * 32768 * 65536
    assert report["problems"] == []


# ---------------------------------------------------------------------------------------------------------------
# Problems, reported rather than raised


INT4_CONFIG = {"model_type": "llama", "quantization_config": {
    "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
    "config_groups": {"group_0": {"targets": ["Linear"], "format": "pack-quantized", "weights": {
        "num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": True, "dynamic": False}}},
    "ignore": ["lm_head"]}}


def packed_folder(folder: Path, weight_shape: list[int], packed_shape: list[int], scale_shape: list[int],
                  config: dict = INT4_CONFIG) -> Path:
    from safetensors.torch import save_file

    folder.mkdir()
    save_file({"model.layers.0.mlp.up_proj.weight_packed": torch.zeros(packed_shape, dtype=torch.int32),
               "model.layers.0.mlp.up_proj.weight_scale": torch.ones(scale_shape, dtype=torch.float16),
               "model.layers.0.mlp.up_proj.weight_shape": torch.tensor(weight_shape, dtype=torch.int64)},
              folder / "model.safetensors")
    write_json(folder / "config.json", config)
    return folder


def test_packed_folder_with_consistent_shapes_has_no_problems(tmp_path):
    report = inspect_folder(packed_folder(tmp_path / "ok", [64, 256], [64, 32], [64, 2]))
    assert report["problems"] == []
    assert report["totals"]["quantized_weights"] == 64 * 256


def test_inspect_reports_packed_shape_contradicting_weight_shape(tmp_path):
    report = inspect_folder(packed_folder(tmp_path / "bad", [64, 512], [64, 32], [64, 4]))
    assert report["problems"] == ["model.layers.0.mlp.up_proj.weight_packed: shape [64, 32] contradicts "
                                  "weight_shape [64, 512] at 4 bits (expected [64, 64])"]


def test_inspect_reports_scale_shape_contradicting_group_size(tmp_path):
    report = inspect_folder(packed_folder(tmp_path / "bad", [64, 256], [64, 32], [64, 1]))
    assert report["problems"] == ["model.layers.0.mlp.up_proj.weight_scale: shape [64, 1] but group quantization "
                                  "of [64, 256] needs [64, 2]"]


def test_inspect_reports_missing_quantization_status(tmp_path):
    config = json.loads(json.dumps(INT4_CONFIG))
    del config["quantization_config"]["quantization_status"]
    report = inspect_folder(packed_folder(tmp_path / "bad", [64, 256], [64, 32], [64, 2], config))
    assert len(report["problems"]) == 1 and "no quantization_status" in report["problems"][0]


def test_inspect_reports_quantized_tensors_without_quantization_config(tmp_path):
    report = inspect_folder(packed_folder(tmp_path / "bad", [64, 256], [64, 32], [64, 2], {"model_type": "llama"}))
    assert report["problems"] == ["1 modules are stored quantized but config.json has no quantization_config: "
                                  "transformers will not decompress them"]


def test_inspect_reports_naive_int8_group_without_format(ct_folders, tmp_path):
    # Measured: without the group's own format, transformers loads int8 as pack-quantized and fails.
    folder = copy_folder(ct_folders["naive-int8"], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]["config_groups"]["group_0"]["format"]
    write_json(folder / "config.json", config)
    problems = inspect_folder(folder)["problems"]
    assert "model.layers.*.mlp.up_proj (2 modules): stored as an integer weight but loads as pack-quantized " \
           "(its config group has no format of its own)" in problems


def test_inspect_reports_shard_missing_from_index(export_model, llama_sharded_src, tmp_path):
    out, manifests = export_model(llama_sharded_src, formats=("int4",), max_shard_size=600_000)
    folder = copy_folder(out / "int4", tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    gone = sorted(set(index.values()))[1]
    (folder / gone).unlink()
    report = inspect_folder(folder)
    count = sum(1 for shard in index.values() if shard == gone)
    assert (f"model.safetensors.index.json: shard {gone!r} ({count} tensors) is missing from the folder"
            in report["problems"])
    assert f"{gone}: listed in qexport.json but missing" in report["problems"]
    assert report["totals"]["tensors"] == len(index) - count  # the other shards are still reported


def test_inspect_reports_truncated_shard_without_raising(export_model, qwen3_src, tmp_path):
    out, _ = export_model(qwen3_src)
    folder = copy_folder(out / "int8", tmp_path)
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    problems = inspect_folder(folder)["problems"]
    assert any(p.startswith("model.safetensors: truncated") for p in problems)
    assert any("model.safetensors: " in p and "qexport.json says" in p for p in problems)


def test_inspect_reports_file_size_differing_from_manifest(export_model, qwen3_src, tmp_path):
    out, _ = export_model(qwen3_src)
    folder = copy_folder(out / "fp16", tmp_path)
    with open(folder / "tokenizer_config.json", "a") as f:
        f.write(" ")
    (folder / "notes.txt").write_text("added by hand")
    problems = inspect_folder(folder)["problems"]
    size = (folder / "tokenizer_config.json").stat().st_size
    assert problems == [f"tokenizer_config.json: {size} bytes, qexport.json says {size - 1}",
                        "notes.txt: not listed in qexport.json"]


# ---------------------------------------------------------------------------------------------------------------
# Command line


def test_cli_inspect_exits_0_on_a_clean_folder(export_model, qwen3_src, capsys):
    out, _ = export_model(qwen3_src)
    assert main(["inspect", str(out / "int4")]) == 0
    text = capsys.readouterr().out
    assert "problems: none found" in text and "4.126 bits per weight" in text


def test_cli_inspect_exits_1_when_problems_found(tmp_path, capsys):
    packed_folder(tmp_path / "bad", [64, 512], [64, 32], [64, 4])
    assert main(["inspect", str(tmp_path / "bad")]) == 1
    assert "contradicts weight_shape" in capsys.readouterr().out


def test_cli_inspect_exits_2_when_not_a_folder(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip() == f"qexport: error: {tmp_path / 'nowhere'}: not a folder"


def test_cli_inspect_json_is_the_report(export_model, qwen3_src, capsys):
    out, _ = export_model(qwen3_src)
    assert main(["inspect", str(out / "int8"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == inspect_folder(out / "int8")
