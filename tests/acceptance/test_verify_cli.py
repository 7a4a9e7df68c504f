"""`qexport verify`: passes good exports, and fails each planted defect naming the check that catches it.

Each broken export is a copy of a good one with one thing broken. Where the defect is not about integrity, the copy
also drops qexport.json, as another tool's export would not have one: the named check must catch the defect on its
own, not through the manifest's sha256.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qexport.quant import primitives as quant
from qexport.cli.main import main
from tests.support import verify_cli


def broken_copy(tmp_path, good, keep_manifest: bool = False):
    folder = tmp_path / good.name
    shutil.copytree(good, folder)
    if not keep_manifest:
        (folder / "qexport.json").unlink()
    return folder


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def edit_tensors(path, change):
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def failed_checks(output: str) -> set[str]:
    return {line.split()[1] for line in output.splitlines() if line.strip().startswith("FAILED")}


# ---------------------------------------------------------------------------------------------------------------
# Good exports


@pytest.mark.parametrize("fmt", ["fp16", "int8", "int4"])
def test_good_export_passes_with_exit_0(capsys, qwen3_src, qwen3_out, fmt):
    code, out = verify_cli(capsys, qwen3_out / fmt, "--reference", qwen3_src)
    assert code == 0, out
    assert f"checks passed ({fmt})" in out


def test_good_sharded_export_passes(capsys, llama_sharded_src, export_model):
    out, _ = export_model(llama_sharded_src, formats=("int4",), max_shard_size=400_000)
    assert len(list((out / "int4").glob("*.safetensors"))) > 1
    code, text = verify_cli(capsys, out / "int4", "--reference", llama_sharded_src)
    assert code == 0, text


def test_export_without_manifest_passes_with_manifest_check_skipped(capsys, tmp_path, qwen3_src, qwen3_out):
    export = broken_copy(tmp_path, qwen3_out / "int8")
    code, out = verify_cli(capsys, export, "--reference", qwen3_src)
    assert code == 0, out
    assert "skipped  manifest" in out


# ---------------------------------------------------------------------------------------------------------------
# Bad input: exit 2, one line


def test_export_path_that_is_not_a_folder_exits_2(capsys, tmp_path, qwen3_src):
    code, out = verify_cli(capsys, tmp_path / "nope", "--reference", qwen3_src)
    assert code == 2
    assert "export is not a folder" in out and "Traceback" not in out


def test_export_root_instead_of_a_format_folder_exits_2_naming_the_format_folders(capsys, qwen3_src, qwen3_out):
    code, out = verify_cli(capsys, qwen3_out, "--reference", qwen3_src)
    assert code == 2
    assert str(qwen3_out / "int4") in out


def test_reference_that_is_not_a_model_exits_2(capsys, tmp_path, qwen3_out):
    code, out = verify_cli(capsys, qwen3_out / "int8", "--reference", tmp_path)
    assert code == 2
    assert out.count("\n") == 1


def test_unknown_threshold_name_exits_2(capsys, qwen3_src, qwen3_out):
    code, out = verify_cli(capsys, qwen3_out / "int8", "--reference", qwen3_src, "--threshold", "min_fun=1")
    assert code == 2
    assert "min_fun" in out


# ---------------------------------------------------------------------------------------------------------------
# Planted defects: exit 1 naming the check


def test_missing_model_type_fails_model_type(capsys, tmp_path, qwen3_src, qwen3_out):
    export = broken_copy(tmp_path, qwen3_out / "int8")
    edit_json(export / "config.json", lambda c: c.pop("model_type"))
    code, out = verify_cli(capsys, export, "--reference", qwen3_src)
    assert code == 1
    assert "model_type" in failed_checks(out)


def test_missing_quantization_config_fails_quantization_config(capsys, tmp_path, qwen3_src, qwen3_out):
    export = broken_copy(tmp_path, qwen3_out / "int4")
    edit_json(export / "config.json", lambda c: c.pop("quantization_config"))
    code, out = verify_cli(capsys, export, "--reference", qwen3_src)
    assert code == 1
    assert {"quantization_config", "layout"} <= failed_checks(out)


def test_missing_quantization_status_fails_config_and_reload(capsys, tmp_path, qwen3_src, qwen3_out):
    # transformers loads this without an error and with garbage weights; only loading info shows it.
    export = broken_copy(tmp_path, qwen3_out / "int4")
    edit_json(export / "config.json", lambda c: c["quantization_config"].pop("quantization_status"))
    code, out = verify_cli(capsys, export, "--reference", qwen3_src)
    assert code == 1
    assert {"quantization_config", "reload"} <= failed_checks(out)


def test_naive_int8_group_without_format_fails_quantization_config(capsys, tmp_path, qwen3_src, qwen3_out):
    # Another tool's naive-quantized int8: without the group's own format transformers unpacks it as packed.
    export = foreign_export(tmp_path, qwen3_out / "int8", qwen3_src, "naive-quantized", 8, None)
    edit_json(export / "config.json", lambda c: c["quantization_config"]["config_groups"]["group_0"].pop("format"))
    code, out = verify_cli(capsys, export, "--reference", qwen3_src)
    assert code == 1
    assert "quantization_config" in failed_checks(out)


def test_wrong_num_bits_in_config_fails_layout(capsys, tmp_path, qwen3_src, qwen3_out):
    export = broken_copy(tmp_path, qwen3_out / "int4")
    edit_json(export / "config.json",
              lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].update(num_bits=8))
    code, out = verify_cli(capsys, export, "--reference", qwen3_src)
    assert code == 1
    assert "layout" in failed_checks(out)


def _unpack_int4(tensors):
    for name in [n for n in tensors if n.endswith(".weight_packed")]:
        module = name.removesuffix(".weight_packed")
        cols = int(tensors.pop(f"{module}.weight_shape")[1])
        tensors[f"{module}.weight"] = quant.unpack_int4(tensors.pop(name), cols)


def test_int4_stored_unpacked_fails_layout_and_bytes(capsys, tmp_path, qwen3_src, qwen3_out):
    # Codes one per byte in the naive-quantized layout: transformers loads it fine, at twice the size.
    export = broken_copy(tmp_path, qwen3_out / "int4")
    edit_tensors(export / "model.safetensors", _unpack_int4)

    def naive(c):
        qc = c["quantization_config"]
        qc["format"] = qc["config_groups"]["group_0"]["format"] = "naive-quantized"

    edit_json(export / "config.json", naive)
    code, out = verify_cli(capsys, export, "--reference", qwen3_src)
    assert code == 1
    assert {"layout", "bytes"} <= failed_checks(out)
    assert "stored unpacked" in out


def _reverse_nibbles(tensors):
    for name in [n for n in tensors if n.endswith(".weight_packed")]:
        codes = quant.unpack_int4(tensors[name], tensors[name].shape[1] * 8)
        reordered = codes.reshape(codes.shape[0], -1, 8).flip(-1).reshape(codes.shape)
        tensors[name] = quant.pack_int4(reordered)


def test_nibbles_in_wrong_order_fail_weights_and_functional(capsys, tmp_path, qwen3_src, qwen3_out):
    export = broken_copy(tmp_path, qwen3_out / "int4")
    edit_tensors(export / "model.safetensors", _reverse_nibbles)
    code, out = verify_cli(capsys, export, "--reference", qwen3_src)
    assert code == 1
    assert {"weights_sqnr", "functional_vs_rtn"} <= failed_checks(out)


def test_scales_off_by_25_percent_on_one_tensor_fails_weights_sqnr(capsys, tmp_path, qwen3_src, qwen3_out):
    export = broken_copy(tmp_path, qwen3_out / "int8")
    name = "model.layers.0.mlp.down_proj.weight_scale"
    edit_tensors(export / "model.safetensors", lambda t: t.update({name: t[name] * 1.25}))
    code, out = verify_cli(capsys, export, "--reference", qwen3_src)
    assert code == 1
    assert failed_checks(out) >= {"weights_sqnr"}
    assert "model.layers.0.mlp.down_proj.weight" in out


def test_missing_tokenizer_file_fails_tokenizer_files(capsys, tmp_path, qwen3_src, qwen3_out):
    export = broken_copy(tmp_path, qwen3_out / "int8")
    (export / "tokenizer.json").unlink()
    code, out = verify_cli(capsys, export, "--reference", qwen3_src)
    assert code == 1
    assert "tokenizer_files" in failed_checks(out)
    assert "tokenizer.json" in out


@pytest.fixture(scope="module")
def sharded_out(llama_sharded_src, export_model):
    out, _ = export_model(llama_sharded_src, formats=("int8",), max_shard_size=600_000)
    return out / "int8"


def test_index_naming_a_missing_shard_fails_shards(capsys, tmp_path, llama_sharded_src, sharded_out):
    export = broken_copy(tmp_path, sharded_out)
    shard = sorted(export.glob("model-*.safetensors"))[-1]
    shard.unlink()
    code, out = verify_cli(capsys, export, "--reference", llama_sharded_src)
    assert code == 1
    assert "shards" in failed_checks(out)
    assert shard.name in out


def test_index_missing_a_shard_fails_shards(capsys, tmp_path, llama_sharded_src, sharded_out):
    export = broken_copy(tmp_path, sharded_out)
    shard = sorted(export.glob("model-*.safetensors"))[0].name
    index = export / "model.safetensors.index.json"
    edit_json(index, lambda i: i.update(weight_map={k: v for k, v in i["weight_map"].items() if v != shard}))
    code, out = verify_cli(capsys, export, "--reference", llama_sharded_src)
    assert code == 1
    assert "shards" in failed_checks(out)
    assert shard in out


def test_byte_changed_after_export_fails_manifest(capsys, tmp_path, qwen3_src, qwen3_out):
    export = broken_copy(tmp_path, qwen3_out / "int8", keep_manifest=True)
    path = export / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1000] ^= 0x01  # one bit of one int8 code: every other check may well pass
    path.write_bytes(bytes(data))
    code, out = verify_cli(capsys, export, "--reference", qwen3_src)
    assert code == 1
    assert failed_checks(out) == {"manifest"}
    assert "sha256" in out


def test_file_larger_than_predicted_fails_bytes(capsys, tmp_path, qwen3_src, qwen3_out):
    # A valid file with a bloated header, whose new size and hash the exporter honestly recorded: only the
    # predicted size catches it.
    from qexport.io.safetensors_file import sha256_file

    export = broken_copy(tmp_path, qwen3_out / "int4", keep_manifest=True)
    path = export / "model.safetensors"
    save_file(load_file(path), path, metadata={"format": "pt", "note": "x" * 4096})

    def rerecord(m):
        record = next(r for r in m["files"] if r["name"] == path.name)
        record.update(bytes=path.stat().st_size, sha256=sha256_file(path))

    edit_json(export / "qexport.json", rerecord)
    code, out = verify_cli(capsys, export, "--reference", qwen3_src)
    assert code == 1
    assert failed_checks(out) == {"bytes"}
    assert "predicted" in out


def test_tied_embedding_stored_twice_fails_tensor_names(capsys, tmp_path, qwen3_tied_src, export_model):
    out, _ = export_model(qwen3_tied_src, formats=("int8",))
    export = broken_copy(tmp_path, out / "int8")
    edit_tensors(export / "model.safetensors",
                 lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    code, text = verify_cli(capsys, export, "--reference", qwen3_tied_src)
    assert code == 1
    assert "tensor_names" in failed_checks(text)
    assert "stored again" in text


# ---------------------------------------------------------------------------------------------------------------
# Thresholds, reports, baselines


def test_threshold_override_can_fail_a_good_export(capsys, qwen3_src, qwen3_out):
    # int4 g128 measures ~19 dB on this fixture; asking for 30 dB must fail the SQNR check and only it.
    code, out = verify_cli(capsys, qwen3_out / "int4", "--reference", qwen3_src, "--threshold", "min_sqnr_db=30")
    assert code == 1
    assert failed_checks(out) == {"weights_sqnr"}


def test_json_and_html_reports_hold_checks_and_metrics(capsys, tmp_path, qwen3_src, qwen3_out):
    code, out = verify_cli(capsys, qwen3_out / "int4", "--reference", qwen3_src, "--json", tmp_path / "r.json",
                    "--report", tmp_path / "r.html")
    assert code == 0, out
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["passed"] and data["format"] == "int4"
    assert {c["name"] for c in data["checks"]} >= {"manifest", "bytes", "functional", "reload"}
    assert 3.85 <= data["metrics"]["quantized_ratio"] < 3.9
    page = (tmp_path / "r.html").read_text()
    assert "PASSED" in page and "<svg" in page and "KLD mean" in page


@pytest.fixture(scope="module")
def int8_baseline(tmp_path_factory, qwen3_src, qwen3_out):
    baseline = tmp_path_factory.mktemp("baseline") / "b.json"
    assert main(["verify", str(qwen3_out / "int8"), "--reference", str(qwen3_src), "--save-baseline",
                 str(baseline)]) == 0
    return json.loads(baseline.read_text())


def test_baseline_round_trip_passes(capsys, tmp_path, qwen3_src, qwen3_out, int8_baseline):
    (tmp_path / "b.json").write_text(json.dumps(int8_baseline))
    code, out = verify_cli(capsys, qwen3_out / "int8", "--reference", qwen3_src, "--baseline", tmp_path / "b.json")
    assert code == 0, out
    assert "passed  baseline" in out


def test_regression_against_baseline_fails_naming_the_metric(capsys, tmp_path, qwen3_src, qwen3_out, int8_baseline):
    # An earlier release that was twice as close to the source: today's KLD is a 100% regression (> 10% allowed).
    metrics = {**int8_baseline["metrics"], "kld_mean": int8_baseline["metrics"]["kld_mean"] / 2}
    (tmp_path / "b.json").write_text(json.dumps({**int8_baseline, "metrics": metrics}))
    code, out = verify_cli(capsys, qwen3_out / "int8", "--reference", qwen3_src, "--baseline", tmp_path / "b.json")
    assert code == 1
    assert failed_checks(out) == {"baseline"}
    assert "kld_mean" in out


def test_baseline_of_another_format_exits_2(capsys, tmp_path, qwen3_src, qwen3_out):
    baseline = tmp_path / "b.json"
    baseline.write_text(json.dumps({"format": "int4", "metrics": {"format": "int4", "kld_mean": 0.1}}))
    code, out = verify_cli(capsys, qwen3_out / "int8", "--reference", qwen3_src, "--baseline", baseline)
    assert code == 2
    assert "int4" in out



# ---------------------------------------------------------------------------------------------------------------
# Other tools' layouts: verify is not limited to what qexport writes


def foreign_export(tmp_path, good, reference, fmt: str, num_bits: int, group_size: int | None):
    """Re-encode the quantized Linears of a good export in another compressed-tensors layout, packing with
    compressed-tensors' own `pack_to_int32` (an independent implementation), without a qexport manifest."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    folder = broken_copy(tmp_path, good)
    path = folder / "model.safetensors"
    stored = load_file(path)
    source = load_file(reference / "model.safetensors")
    out = {}
    for name, t in stored.items():
        module, _, leaf = name.rpartition(".")
        if leaf in ("weight_packed", "weight_shape", "weight_scale") or (leaf == "weight" and f"{module}.weight_scale"
                                                                        in stored):
            if leaf != "weight_scale":
                continue
            w = source[f"{module}.weight"].to(torch.float16)
            scales = quant.compute_scales(w, num_bits, group_size)
            q = quant.quantize(w, scales, num_bits, group_size)
            if fmt == "pack-quantized":
                out[f"{module}.weight_packed"] = pack_to_int32(q, num_bits)
                out[f"{module}.weight_shape"] = torch.tensor(list(w.shape), dtype=torch.int64)
            else:
                out[f"{module}.weight"] = q
            out[f"{module}.weight_scale"] = scales
        else:
            out[name] = t
    save_file(out, path, metadata={"format": "pt"})
    weights = {"num_bits": num_bits, "type": "int", "symmetric": True, "dynamic": False,
               "strategy": "group" if group_size else "channel"}
    if group_size:
        weights["group_size"] = group_size

    def reconfigure(c):
        qc = c["quantization_config"]
        qc["format"] = fmt
        qc["config_groups"]["group_0"].update(format=fmt, weights=weights)

    edit_json(folder / "config.json", reconfigure)
    return folder


@pytest.mark.parametrize("fmt,num_bits,group_size", [
    ("int-quantized", 8, None),
    ("naive-quantized", 8, 128),
    ("pack-quantized", 8, None),
    ("pack-quantized", 4, 64),
])
def test_other_tools_layouts_pass(capsys, tmp_path, qwen3_src, qwen3_out, fmt, num_bits, group_size):
    good = qwen3_out / ("int4" if num_bits == 4 else "int8")
    export = foreign_export(tmp_path, good, qwen3_src, fmt, num_bits, group_size)
    code, out = verify_cli(capsys, export, "--reference", qwen3_src)
    assert code == 0, out
    assert "skipped  manifest" in out


def test_write_card_records_the_checks_and_a_second_verify_still_passes(capsys, tmp_path, qwen3_src, qwen3_out):
    folder = tmp_path / "int8"
    shutil.copytree(qwen3_out / "int8", folder)
    code, _ = verify_cli(capsys, folder, "--reference", qwen3_src, "--write-card")
    assert code == 0
    manifest = json.loads((folder / "qexport.json").read_text())
    assert manifest["verification"]["tool"] == "qexport verify" and manifest["verification"]["passed"] is True
    assert "reload_matches_dequant" in (folder / "README.md").read_text()
    code, output = verify_cli(capsys, folder, "--reference", qwen3_src)  # the rewritten card is accounted in the manifest
    assert code == 0, output


def test_write_card_on_a_folder_without_manifest_exits_2(capsys, tmp_path, qwen3_src, qwen3_out):
    folder = broken_copy(tmp_path, qwen3_out / "int8")
    code, output = verify_cli(capsys, folder, "--reference", qwen3_src, "--write-card")
    assert code == 2 and "--write-card" in output
