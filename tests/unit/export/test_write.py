"""qexport/export/pipeline.py's write path on a hand-made checkpoint (a few tensors written with safetensors in tmp_path) and a
hand-made Architecture in place of the meta model's (`discover` is replaced; no transformers model is built): what
each format folder holds, what the manifest and the index say about it, and what happens on bad input or a failure
half-way. Each export here takes well under a second."""

from __future__ import annotations

import hashlib
import json
import math
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import qexport.export.pipeline as export_module
import qexport.io.publish as publish
from qexport.model.architecture import Architecture
from qexport.io.checkpoint import INDEX_FILE, Checkpoint
from qexport.errors import InputError
from qexport.export.pipeline import ExportOptions, export, export_folder
from qexport.io.publish import TMP_MARK
from qexport.formats import get_format
from tests.support import fail_a_hang  # noqa: F401  (autouse: a hung test fails after 120 s)

EMBED, UP, DOWN, NORM, HEAD = ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight",
                               "model.layers.0.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight")
SHAPES = {EMBED: (16, 128), UP: (32, 128), DOWN: (8, 96), NORM: (128,), HEAD: (16, 128)}
LINEAR = frozenset({UP, DOWN, HEAD})
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1,
          "torch_dtype": "bfloat16", "vocab_size": 16}


def tensors(dtype=torch.bfloat16, seed=0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen).to(dtype) for n, s in SHAPES.items()}


def architecture(shapes=SHAPES, linear=LINEAR, tied=frozenset()) -> Architecture:
    return Architecture("LlamaForCausalLM", dict(shapes), frozenset(linear), frozenset(tied), True)


def known(arch: Architecture) -> Future:
    future: Future = Future()
    future.set_result(arch)
    return future


@pytest.fixture
def discovered(monkeypatch):
    """Replace architecture discovery by a hand-made Architecture (default: the checkpoint's own Linears)."""
    state = {"arch": architecture(), "calls": []}

    def discover(*args, **kwargs):
        state["calls"].append((args, kwargs))
        return known(state["arch"])

    monkeypatch.setattr(export_module, "discover", discover)
    return state


def checkpoint(tmp_path: Path, ts=None, config=CONFIG, side: dict[str, str] | None = None) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    save_file(ts if ts is not None else tensors(), src / "model.safetensors")
    for name, text in (side or {}).items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    return src


def options(**changes) -> ExportOptions:
    return ExportOptions(**{"formats": ("fp16", "int8", "int4"), "group_size": 32, "progress": False, **changes})


def stored(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            out |= {n: f.get_tensor(n) for n in f.keys()}
    return out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_stored_tensor_is_what_its_format_encodes_from_the_source(tmp_path, discovered):
    src = checkpoint(tmp_path)
    export(Checkpoint.open(src), tmp_path / "out", options())
    source = tensors()
    for name in ("fp16", "int8", "int4"):
        fmt = get_format(name, group_size=32, dtype="bfloat16")
        expected = {}
        for n, w in source.items():
            expected |= fmt.encode(n, w, n in {UP, DOWN})  # lm_head is ignored by default
        got = stored(tmp_path / "out" / name)
        assert got.keys() == expected.keys()
        assert all(got[n].dtype == expected[n].dtype and torch.equal(got[n], expected[n]) for n in expected), name


def test_manifest_describes_every_stored_tensor_with_its_predicted_and_stored_bytes(tmp_path, discovered):
    manifests = export(Checkpoint.open(checkpoint(tmp_path)), tmp_path / "out", options(formats=("int4",)))
    info = manifests["int4"]["tensors"]
    assert info[UP + "_packed"] == {"dtype": "I32", "shape": [32, 16], "predicted_bytes": 32 * 16 * 4,
                                    "stored_bytes": 32 * 16 * 4, "quantized": True, "source": UP,
                                    "file": "model.safetensors"}
    assert info[NORM] == {"dtype": "BF16", "shape": [128], "predicted_bytes": 256, "stored_bytes": 256,
                          "quantized": False, "source": NORM, "file": "model.safetensors"}
    assert all(t["predicted_bytes"] == t["stored_bytes"] for t in info.values())
    on_disk = json.loads((tmp_path / "out" / "int4" / "qexport.json").read_text())
    assert on_disk == manifests["int4"]


def test_manifest_lists_every_file_of_the_folder_but_itself_with_its_bytes_and_sha256(tmp_path, discovered):
    src = checkpoint(tmp_path, side={"tokenizer.json": "{}", "sub/chat.jinja": "x"})
    manifest = export(Checkpoint.open(src), tmp_path / "out", options(formats=("int8",)))["int8"]
    folder = tmp_path / "out" / "int8"
    files = {f["name"]: f for f in manifest["files"]}
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert sorted(files) == sorted(set(on_disk) - {"qexport.json"})
    for name, f in files.items():
        assert (f["bytes"], f["sha256"]) == ((folder / name).stat().st_size, sha(folder / name)), name
    assert files["model.safetensors"]["predicted_bytes"] == files["model.safetensors"]["bytes"]


def test_manifest_records_the_source_files_hashes_format_and_parameters(tmp_path, discovered):
    src = checkpoint(tmp_path)
    manifest = export(Checkpoint.open(src), tmp_path / "out", options(formats=("int4",)))["int4"]
    assert manifest["source"]["files"] == [{"name": n, "bytes": (src / n).stat().st_size, "sha256": sha(src / n)}
                                           for n in ("config.json", "model.safetensors")]
    assert manifest["source"]["base_model"] is None and "merge" not in manifest["source"]
    assert (manifest["format"], manifest["model_type"]) == ("int4", "llama")
    assert manifest["qexport_version"] == export_module.__version__
    assert manifest["parameters"] == {**get_format("int4", group_size=32, dtype="bfloat16").parameters(),
                                      "max_shard_size": 5 * 10**9, "group_size_choice": "given"}
    auto = export(Checkpoint.open(src), tmp_path / "auto", options(formats=("int4",), group_size=None))["int4"]
    assert auto["parameters"]["group_size_choice"] == "auto"
    assert "group_size_choice" not in export(Checkpoint.open(src), tmp_path / "int8",
                                             options(formats=("int8",)))["int8"]["parameters"]


def test_manifest_summary_counts_targeted_and_quantized_linears_and_bytes(tmp_path, discovered):
    # int4 with group size 128: down_proj (input 96) stays dense; lm_head is ignored, so not targeted
    manifest = export(Checkpoint.open(checkpoint(tmp_path)), tmp_path / "out",
                      options(formats=("int4",), group_size=128))["int4"]
    summary, files = manifest["summary"], manifest["files"]
    assert summary["linear_weights"] == 2 and summary["quantized_linears"] == 1
    assert summary["quantized_linear_share"] == 32 * 128 / (32 * 128 + 8 * 96)
    assert summary["total_bytes"] == sum(f["bytes"] for f in files)
    assert summary["weight_bytes"] == next(f["bytes"] for f in files if f["name"] == "model.safetensors")
    assert manifest["dense_linears"] == {DOWN: "input size 96 does not divide by group size 128"}
    assert manifest["ignore"] == ["lm_head", "model.layers.0.mlp.down_proj"]
    quantized_bytes = sum(t["stored_bytes"] for t in manifest["tensors"].values() if t["quantized"])
    assert summary["quantized_bytes"] == quantized_bytes == 32 * 16 * 4 + 32 * 1 * 2 + 2 * 8  # packed, scales, shape
    assert summary["quantized_weights"] == 32 * 128


def test_fp16_summary_has_no_quantized_share_when_nothing_is_targeted(tmp_path, discovered):
    discovered["arch"] = architecture(linear=frozenset({HEAD}))  # only the ignored lm_head is a Linear
    manifest = export(Checkpoint.open(checkpoint(tmp_path)), tmp_path / "out", options(formats=("int4",)))["int4"]
    assert manifest["summary"]["linear_weights"] == 0 and manifest["summary"]["quantized_linear_share"] is None


def test_a_sharded_export_writes_an_index_mapping_every_tensor_to_its_shard(tmp_path, discovered):
    manifest = export(Checkpoint.open(checkpoint(tmp_path)), tmp_path / "out",
                      options(formats=("fp16",), max_shard_size=5000))["fp16"]
    folder = tmp_path / "out" / "fp16"
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert len(shards) > 1
    index = json.loads((folder / INDEX_FILE).read_text())
    where = {}
    for shard in shards:
        with safe_open(folder / shard, "pt") as f:
            where |= dict.fromkeys(f.keys(), shard)
    assert index["weight_map"] == where and set(where) == set(SHAPES)
    assert index["metadata"]["total_size"] == sum(2 * math.prod(s) for s in SHAPES.values())
    records = {f["name"]: f for f in manifest["files"]}
    assert all(records[s]["predicted_bytes"] == records[s]["bytes"] == (folder / s).stat().st_size for s in shards)
    assert records[INDEX_FILE]["sha256"] == sha(folder / INDEX_FILE)
    assert all(manifest["tensors"][n]["file"] == s for n, s in where.items())
    assert Checkpoint.open(folder).names  # the export reads back as a sharded checkpoint


def test_shards_carry_pt_metadata(tmp_path, discovered):
    export(Checkpoint.open(checkpoint(tmp_path)), tmp_path / "out", options(formats=("fp16",), max_shard_size=5000))
    for shard in (tmp_path / "out" / "fp16").glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}


def test_config_json_is_the_sources_with_the_formats_dtype_and_quantization_config(tmp_path, discovered):
    export(Checkpoint.open(checkpoint(tmp_path)), tmp_path / "out", options(formats=("int8", "fp16")))
    int8 = json.loads((tmp_path / "out" / "int8" / "config.json").read_text())
    fmt = get_format("int8", dtype="bfloat16")
    assert int8 == {**CONFIG, "torch_dtype": "bfloat16", "dtype": "bfloat16",
                    "quantization_config": fmt.quantization_config(["lm_head"])}
    fp16 = json.loads((tmp_path / "out" / "fp16" / "config.json").read_text())
    assert fp16 == {**CONFIG, "torch_dtype": "float16", "dtype": "float16"}


def test_a_sentence_transformers_source_gets_dequantize_in_its_quantization_config(tmp_path, discovered):
    src = checkpoint(tmp_path, side={"modules.json": "[]"})
    export(Checkpoint.open(src), tmp_path / "out", options(formats=("int8",)))
    assert json.loads((tmp_path / "out" / "int8" / "config.json").read_text())["quantization_config"]["dequantize"]


def test_side_files_are_copied_byte_for_byte_and_the_source_readme_is_embedded_in_the_card(tmp_path, discovered):
    side = {"tokenizer.json": '{"a": 1}', "sub/deeper/chat.jinja": "{{ x }}", "sub/deeper/more.txt": "y",
            "README.md": "SOURCE CARD TEXT"}
    src = checkpoint(tmp_path, side=side)
    export(Checkpoint.open(src), tmp_path / "out", options(formats=("fp16",)))
    folder = tmp_path / "out" / "fp16"
    for name in ("tokenizer.json", "sub/deeper/chat.jinja", "sub/deeper/more.txt"):
        assert (folder / name).read_bytes() == (src / name).read_bytes()
    card = (folder / "README.md").read_text()
    assert "SOURCE CARD TEXT" in card and card != side["README.md"]


def test_source_readme_that_is_not_utf8_is_embedded_with_replacement_characters(tmp_path, discovered):
    src = checkpoint(tmp_path)
    (src / "README.md").write_bytes(b"caf\xe9 card")
    export(Checkpoint.open(src), tmp_path / "out", options(formats=("fp16",)))
    assert "caf\ufffd card" in (tmp_path / "out" / "fp16" / "README.md").read_text()


def test_the_export_is_written_from_one_read_of_the_source_in_file_order(tmp_path, discovered, monkeypatch):
    src = checkpoint(tmp_path)
    source = Checkpoint.open(src)
    fed = []
    monkeypatch.setattr(source, "hash_read", lambda name, w: fed.append((name, w.clone())))
    export(source, tmp_path / "out", options(formats=("fp16", "int4"), workers=3))
    assert [n for n, _ in fed] == source.names * 2  # each format reads the source once, in file order
    assert all(torch.equal(w, source.read(n)) for n, w in fed)  # the source tensor, not its encoding


def test_the_result_does_not_depend_on_the_number_of_workers(tmp_path, discovered):
    src = checkpoint(tmp_path)
    for workers in (1, 4):
        export(Checkpoint.open(src), tmp_path / f"w{workers}", options(formats=("int4",), workers=workers))
    assert stored(tmp_path / "w1" / "int4").keys() == stored(tmp_path / "w4" / "int4").keys()
    assert (tmp_path / "w1" / "int4" / "model.safetensors").read_bytes() == \
           (tmp_path / "w4" / "int4" / "model.safetensors").read_bytes()


def test_export_restores_torchs_thread_count(tmp_path, discovered):
    before = torch.get_num_threads()
    export(Checkpoint.open(checkpoint(tmp_path)), tmp_path / "out", options(formats=("fp16",)))
    assert torch.get_num_threads() == before


def test_export_computes_with_one_intra_op_thread(tmp_path, discovered, monkeypatch):
    seen = []
    real = export_module.write_format
    monkeypatch.setattr(export_module, "write_format",
                        lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    export(Checkpoint.open(checkpoint(tmp_path)), tmp_path / "out", options(formats=("fp16",)))
    assert seen == [1]


def test_export_folder_opens_the_source_and_exports_it(tmp_path, discovered):
    manifests = export_folder(checkpoint(tmp_path), tmp_path / "out", options(formats=("fp16",)))
    assert list(manifests) == ["fp16"] and (tmp_path / "out" / "fp16" / "model.safetensors").is_file()


@pytest.mark.parametrize("changes,message", [
    ({"group_size": 0}, "--group-size: 0 must be a positive multiple of 8"),
    ({"group_size": -8}, "--group-size: -8 must be a positive multiple of 8"),
    ({"group_size": 12}, "--group-size: 12 must be a positive multiple of 8"),
    ({"workers": 0}, "--workers: 0 must be at least 1"),
])
def test_bad_options_are_refused_before_anything_is_written(tmp_path, discovered, changes, message):
    with pytest.raises(InputError) as e:
        export(Checkpoint.open(checkpoint(tmp_path)), tmp_path / "out", options(**changes))
    assert str(e.value) == message and not (tmp_path / "out").exists()


def test_group_size_eight_and_one_worker_are_accepted(tmp_path, discovered):
    export(Checkpoint.open(checkpoint(tmp_path)), tmp_path / "out", options(formats=("int4",), group_size=8,
                                                                             workers=1))
    assert json.loads((tmp_path / "out" / "int4" / "config.json").read_text())["quantization_config"][
        "config_groups"]["group_0"]["weights"]["group_size"] == 8


def test_an_already_quantized_source_is_refused(tmp_path, discovered):
    src = checkpoint(tmp_path, config={**CONFIG, "quantization_config": {"quant_method": "compressed-tensors"}})
    with pytest.raises(InputError) as e:
        export(Checkpoint.open(src), tmp_path / "out", options())
    assert str(e.value) == f"{src / 'config.json'}: source is already quantized (has quantization_config)"


def test_nan_in_a_dense_tensor_is_refused_naming_the_file_and_tensor_and_nothing_is_left(tmp_path, discovered):
    ts = tensors()
    ts[NORM][3] = float("nan")
    src = checkpoint(tmp_path)
    save_file(ts, src / "model.safetensors")
    with pytest.raises(InputError) as e:
        export(Checkpoint.open(src), tmp_path / "deep" / "out", options(formats=("int8",)))
    assert str(e.value).startswith(f"{src / 'model.safetensors'}: tensor '{NORM}' [128] holds NaN or Inf")
    assert not (tmp_path / "deep").exists()  # the folders the export created are removed again


def test_nan_in_a_dense_tensor_is_kept_with_allow_nonfinite(tmp_path, discovered):
    ts = tensors()
    ts[NORM][3] = float("-inf")
    ts[UP][0, 0] = float("nan")
    src = checkpoint(tmp_path, ts)
    manifest = export(Checkpoint.open(src), tmp_path / "out", options(formats=("int8",), allow_nonfinite=True))
    got = stored(tmp_path / "out" / "int8")
    assert got[NORM][3] == float("-inf") and torch.isnan(got[UP][0, 0])  # a Linear with NaN stays dense
    assert manifest["int8"]["dense_linears"] == {UP: "holds NaN or Inf (kept dense because of --allow-nonfinite)"}


def test_a_value_beyond_fp16_is_refused_in_an_fp16_export(tmp_path, discovered):
    ts = tensors(torch.float32)
    ts[EMBED][1, 2] = 1e6
    src = checkpoint(tmp_path, ts, config={**CONFIG, "torch_dtype": "float32"})
    with pytest.raises(InputError, match=rf"model.safetensors: tensor '{EMBED}' \[16, 128\] torch.float32: value 1e\+06 "
                                         r"overflows fp16"):
        export(Checkpoint.open(src), tmp_path / "out", options(formats=("fp16",), allow_nonfinite=True))
    assert not (tmp_path / "out").exists()


def test_a_failure_half_way_leaves_no_temporary_folder_and_keeps_an_existing_out(tmp_path, discovered,
                                                                                 monkeypatch):
    src = checkpoint(tmp_path)
    out = tmp_path / "out"
    (out / "keep").mkdir(parents=True)
    calls = []
    real = export_module.write_format

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(export_module, "write_format", failing)
    with pytest.raises(OSError):
        export(Checkpoint.open(src), out, options(formats=("fp16", "int8")))
    assert sorted(p.name for p in out.iterdir()) == ["keep"]


def test_overwrite_replaces_an_existing_format_folder_and_leaves_nothing_aside(tmp_path, discovered):
    src = checkpoint(tmp_path)
    out = tmp_path / "out"
    (out / "fp16").mkdir(parents=True)
    (out / "fp16" / "old.txt").write_text("old")
    (out / "int8").write_text("a file in the way")
    export(Checkpoint.open(src), out, options(formats=("fp16", "int8"), overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == ["fp16", "int8"]
    assert not (out / "fp16" / "old.txt").exists() and (out / "int8" / "model.safetensors").is_file()


def test_without_overwrite_an_existing_format_folder_is_refused_and_left_alone(tmp_path, discovered):
    out = tmp_path / "out"
    (out / "int8").mkdir(parents=True)
    with pytest.raises(InputError, match=r"int8: already exists \(pass --overwrite to replace it\)"):
        export(Checkpoint.open(checkpoint(tmp_path)), out, options(formats=("int8",)))
    assert sorted(p.name for p in out.iterdir()) == ["int8"] and not any((out / "int8").iterdir())


def test_a_folder_that_appears_while_exporting_is_not_replaced_without_overwrite(tmp_path):
    target, tmp = tmp_path / "int8", tmp_path / f".int8{TMP_MARK}1"
    tmp.mkdir()
    (tmp / "new").write_text("new")
    target.mkdir()
    (target / "other").write_text("another run's")
    with pytest.raises(InputError, match=rf"^--out {target}: appeared while this export was running \(another run "
                                         r"wrote it\); pass --overwrite"):
        publish.replace_dir(tmp, target, overwrite=False)
    assert (target / "other").read_text() == "another run's"
    target.rename(tmp_path / "gone")
    (tmp_path / "int8").write_text("a file")
    with pytest.raises(InputError, match=r"appeared while this export was running \(another run\?\)"):
        publish.replace_dir(tmp, target, overwrite=False)
    (tmp_path / "int8").unlink()
    publish.replace_dir(tmp, target, overwrite=False)
    assert (target / "new").read_text() == "new" and not tmp.exists()


def test_a_rename_error_other_than_an_existing_target_passes_through(tmp_path):
    with pytest.raises(FileNotFoundError):
        publish.replace_dir(tmp_path / "missing", tmp_path / "int8", overwrite=False)


def test_overwrite_replaces_a_symlink_without_touching_what_it_points_to(tmp_path):
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "x").write_text("x")
    (tmp_path / "int8").symlink_to(kept)
    tmp = tmp_path / f".int8{TMP_MARK}1"
    tmp.mkdir()
    publish.replace_dir(tmp, tmp_path / "int8", overwrite=True)
    assert (kept / "x").read_text() == "x" and not (tmp_path / "int8").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8", "kept"]


def test_a_stale_temporary_folder_from_a_killed_export_is_removed(tmp_path, discovered):
    out = tmp_path / "out"
    (out / f".int8{TMP_MARK}999999").mkdir(parents=True)
    export(Checkpoint.open(checkpoint(tmp_path)), out, options(formats=("fp16",)))
    assert sorted(p.name for p in out.iterdir()) == ["fp16"]


def test_a_tied_tensor_is_stored_once_under_the_name_it_is_tied_to(tmp_path, discovered):
    discovered["arch"] = architecture(tied=frozenset({HEAD}))
    export(Checkpoint.open(checkpoint(tmp_path)), tmp_path / "out", options(formats=("int8",)))
    assert HEAD not in stored(tmp_path / "out" / "int8")


def discovery_still_running(monkeypatch, real=None, error=None, predicted=None):
    """export's discovery reported as still running, so it writes from its prediction first; asked, it answers
    `real` (default: the hand-made architecture) or raises `error` at once. `predicted` replaces the prediction."""
    future: Future = Future()
    future.done = lambda: False
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(architecture() if real is None else real)
    monkeypatch.setattr(export_module, "discover", lambda *_a, **_k: future)
    if predicted is not None:
        monkeypatch.setattr(export_module, "predict_architecture", lambda *_a: predicted)


def test_a_wrong_prediction_is_written_again_from_the_real_architecture(tmp_path, monkeypatch):
    # discovery still running when the export starts: work begins from the prediction, which here misses up_proj
    # as a Linear; the real architecture's plan differs, so the formats are written again from it
    real = architecture()
    discovery_still_running(monkeypatch, real=real, predicted=architecture(linear=LINEAR - {UP}))
    src = checkpoint(tmp_path)
    manifest = export(Checkpoint.open(src), tmp_path / "out", options(formats=("int8",)))["int8"]
    assert manifest["summary"]["quantized_linears"] == 2 and UP + "_packed" in stored(tmp_path / "out" / "int8")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["int8"]


def test_an_architecture_error_is_reported_before_a_bad_destination_while_discovery_runs(tmp_path, monkeypatch):
    discovery_still_running(monkeypatch, error=InputError("config.json: the architecture cannot be built"))
    (tmp_path / "out").write_text("a file")
    with pytest.raises(InputError, match="the architecture cannot be built"):
        export(Checkpoint.open(checkpoint(tmp_path)), tmp_path / "out", options(formats=("int8",)))


class Merged:
    """A source that is not a Checkpoint (as qexport.merge.sources presents one): no hash_read, no side_tree."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt, self.folder, self.config, self.entries = ckpt, ckpt.folder, ckpt.config, ckpt.entries
        self.merge = {"method": "average", "inputs": ["a", "b"]}

    @property
    def names(self):
        return self.ckpt.names

    def read(self, name):
        return self.ckpt.read(name)

    def side_files(self):
        return self.ckpt.side_files()

    def source_files(self):
        return [{"name": "merged", "bytes": 1, "sha256": "0" * 64}]

    def origin(self, name):
        return f"merge of a and b, tensor {name}"


def test_a_source_that_is_not_a_checkpoint_is_exported_with_its_merge_record_and_top_level_side_files(
        tmp_path, discovered):
    src = checkpoint(tmp_path, side={"tokenizer.json": "{}", "sub/chat.jinja": "x"})
    manifest = export(Merged(Checkpoint.open(src)), tmp_path / "out", options(formats=("int8",)))["int8"]
    assert manifest["source"] == {"files": [{"name": "merged", "bytes": 1, "sha256": "0" * 64}],
                                  "merge": {"method": "average", "inputs": ["a", "b"]}, "base_model": None}
    folder = tmp_path / "out" / "int8"
    assert (folder / "tokenizer.json").read_text() == "{}" and not (folder / "sub").exists()


def test_nan_in_a_merged_source_is_reported_with_the_sources_origin_of_the_tensor(tmp_path, discovered):
    ts = tensors()
    ts[NORM][0] = float("inf")
    with pytest.raises(InputError, match=rf"^merge of a and b, tensor {NORM}: tensor '{NORM}' \[128\] holds NaN"):
        export(Merged(Checkpoint.open(checkpoint(tmp_path, ts))), tmp_path / "out", options(formats=("fp16",)))


def test_an_output_inside_the_input_is_refused_before_anything_is_written(tmp_path, discovered):
    src = checkpoint(tmp_path)
    before = sorted(p.name for p in src.iterdir())
    with pytest.raises(InputError, match="is inside the input"):
        export(Checkpoint.open(src), src / "out", options(formats=("fp16",)))
    assert sorted(p.name for p in src.iterdir()) == before


def test_a_side_file_linking_out_of_the_source_is_refused_before_anything_is_written(tmp_path, discovered):
    src = checkpoint(tmp_path)
    (tmp_path / "secret").write_text("x")
    (src / "tokenizer.json").symlink_to(tmp_path / "secret")
    with pytest.raises(InputError, match="symlink leads outside"):
        export(Checkpoint.open(src), tmp_path / "out", options(formats=("fp16",)))
    assert not (tmp_path / "out").exists()


def test_discovery_gets_the_config_its_path_and_the_sources_tensor_bytes(tmp_path, discovered):
    src = checkpoint(tmp_path)
    export(Checkpoint.open(src), tmp_path / "out", options(formats=("fp16",)))
    assert discovered["calls"] == [((CONFIG, src / "config.json", sum(2 * math.prod(s) for s in SHAPES.values())),
                                    {})]


def test_a_discovery_child_still_running_is_ended_when_the_export_returns(tmp_path, monkeypatch):
    class Child:
        killed = False

        def poll(self):
            return None

        def kill(self):
            self.killed = True

    future = known(architecture())
    future.process = Child()
    monkeypatch.setattr(export_module, "discover", lambda *_a, **_k: future)
    export(Checkpoint.open(checkpoint(tmp_path)), tmp_path / "out", options(formats=("fp16",)))
    assert future.process.killed


def test_json_files_are_written_indented_with_a_final_newline(tmp_path, discovered):
    export(Checkpoint.open(checkpoint(tmp_path)), tmp_path / "out", options(formats=("int8",), max_shard_size=5000))
    for name in ("config.json", INDEX_FILE, "qexport.json"):
        text = (tmp_path / "out" / "int8" / name).read_text()
        assert text == json.dumps(json.loads(text), indent=2) + "\n", name


@pytest.mark.parametrize("progress,shown", [(True, True), (False, False), (None, False)])  # None: only on a terminal
def test_a_progress_bar_counts_tensors_on_stderr_when_asked(tmp_path, discovered, capsys, progress, shown):
    export(Checkpoint.open(checkpoint(tmp_path)), tmp_path / "out", options(formats=("int8",), progress=progress))
    err = capsys.readouterr().err
    assert ("export int8: 100%" in err and f"{len(SHAPES)}/{len(SHAPES)}" in err and "tensor/s" in err) is shown
    assert shown or err == ""


def test_a_value_that_rounds_past_bf16_is_refused_in_a_bf16_export(tmp_path, discovered):
    ts = tensors(torch.float32)
    ts[NORM][5] = 3.4028e38  # finite in fp32, inf once rounded to bf16
    src = checkpoint(tmp_path, ts)  # config.json declares bfloat16: int8 computes and stores dense tensors in bf16
    with pytest.raises(InputError, match=rf"tensor '{NORM}' \[128\] torch.float32: value 3.4028e\+38 overflows bf16"):
        export(Checkpoint.open(src), tmp_path / "out", options(formats=("int8",)))


def test_each_format_is_written_once_to_a_hidden_temporary_sibling_named_after_it(tmp_path, discovered, monkeypatch):
    import os

    written = []
    real = export_module.write_format

    def record(source, plan, folder, *a, **k):
        written.append(folder)
        return real(source, plan, folder, *a, **k)

    monkeypatch.setattr(export_module, "write_format", record)
    export(Checkpoint.open(checkpoint(tmp_path)), tmp_path / "out", options(formats=("fp16", "int4")))
    assert written == [tmp_path / "out" / f".{name}{TMP_MARK}{os.getpid()}" for name in ("fp16", "int4")]


def test_no_export_folder_stays_locked_after_the_export(tmp_path, discovered):
    from qexport.io.publish import is_stale

    export(Checkpoint.open(checkpoint(tmp_path)), tmp_path / "out", options(formats=("fp16", "int8")))
    assert is_stale(tmp_path / "out" / "fp16") and is_stale(tmp_path / "out" / "int8")


def test_allow_nonfinite_waits_for_the_real_architecture_instead_of_predicting(tmp_path, monkeypatch):
    discovery_still_running(monkeypatch)

    def predict(*_a):
        raise AssertionError("predicted")

    monkeypatch.setattr(export_module, "predict_architecture", predict)
    export(Checkpoint.open(checkpoint(tmp_path)), tmp_path / "out", options(formats=("fp16",), allow_nonfinite=True))


def test_a_rewrite_after_a_wrong_prediction_leaves_nothing_of_the_first_write(tmp_path, monkeypatch):
    # the prediction keeps up_proj dense in bf16: more bytes, so more shards than the real plan
    discovery_still_running(monkeypatch, predicted=architecture(linear=LINEAR - {UP}))
    shards = []
    real = export_module.write_format
    monkeypatch.setattr(export_module, "write_format",
                        lambda s, plan, *a, **k: shards.append(len(plan.shard_names)) or real(s, plan, *a, **k))
    manifest = export(Checkpoint.open(checkpoint(tmp_path)), tmp_path / "out",
                      options(formats=("int8",), max_shard_size=8500))["int8"]
    assert shards[0] > shards[1]  # the precondition: the first write had shards the second does not
    folder = tmp_path / "out" / "int8"
    on_disk = sorted(p.name for p in folder.iterdir())
    assert on_disk == sorted([f["name"] for f in manifest["files"]] + ["qexport.json"])


@pytest.mark.parametrize("model_type,formats,torch_dtype,warned", [
    ("gemma", ("fp16",), "bfloat16", True),
    ("t5", ("int8", "fp16"), "bfloat16", True),
    ("llama", ("fp16",), "bfloat16", False),  # not a family known to overflow fp16
    ("gemma", ("int8",), "bfloat16", False),  # no fp16 export
    ("gemma", ("fp16",), "float32", False),  # not a bf16 model
])
def test_fp16_exports_of_bf16_families_known_to_overflow_get_a_warning(tmp_path, discovered, caplog, model_type,
                                                                       formats, torch_dtype, warned):
    src = checkpoint(tmp_path, config={**CONFIG, "model_type": model_type, "torch_dtype": torch_dtype})
    export(Checkpoint.open(src), tmp_path / "out", options(formats=formats))
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    expected = (f"fp16: {model_type} models trained in bfloat16 are known to overflow fp16 activations (NaN logits); "
                "int8 / int4 keep bfloat16, and `qexport verify` runs the fp16 export in float16")
    assert (expected in messages) is warned


def test_linear_weights_kept_dense_are_named_in_one_warning_per_format(tmp_path, discovered, caplog):
    export(Checkpoint.open(checkpoint(tmp_path)), tmp_path / "out", options(formats=("int4", "fp16"), group_size=128))
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert messages == [export_module.dense_linears_warning(
        "int4", {DOWN: "input size 96 does not divide by group size 128"})]


@pytest.mark.parametrize("old_kind", ["folder", "file"])
def test_the_replaced_folder_removed_by_another_runs_cleanup_meanwhile_is_no_error(tmp_path, monkeypatch, old_kind):
    # the old target is moved aside to a free-lock temporary name: another run's clean_stale may remove it first
    import os
    import shutil

    target, tmp = tmp_path / "int8", tmp_path / f".int8{TMP_MARK}1"
    tmp.mkdir()
    if old_kind == "folder":
        target.mkdir()
    else:
        target.write_text("old")
    real = os.replace

    def replace(src, dst):
        real(src, dst)
        if Path(src) == tmp:  # the new folder is in place: the other run cleans the old one now
            old = next(tmp_path.glob(f".int8{TMP_MARK}old-*"))
            shutil.rmtree(old) if old.is_dir() else old.unlink()

    monkeypatch.setattr(os, "replace", replace)
    publish.replace_dir(tmp, target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8"] and target.is_dir()


def test_a_replaced_folder_that_cannot_be_removed_does_not_fail_the_export(tmp_path, monkeypatch):
    # the new folder is in place by then; a busy old one is left for the next run's clean_stale
    import shutil

    real = shutil.rmtree

    def busy(path, ignore_errors=False, **kwargs):  # rmtree's contract on a filesystem that refuses the removal
        if not ignore_errors:
            raise OSError(16, "Device or resource busy", str(path))

    target, tmp = tmp_path / "int8", tmp_path / f".int8{TMP_MARK}1"
    tmp.mkdir()
    (tmp / "new").write_text("new")
    target.mkdir()
    monkeypatch.setattr(shutil, "rmtree", busy)
    publish.replace_dir(tmp, target, overwrite=True)
    monkeypatch.setattr(shutil, "rmtree", real)
    assert (target / "new").read_text() == "new"


def test_an_index_is_written_exactly_when_there_is_more_than_one_shard(tmp_path, discovered):
    source = Checkpoint.open(checkpoint(tmp_path))
    counts = set()
    for i, size in enumerate([5 * 10**9, 20000, 12000, 8000, 5000]):
        folder = tmp_path / f"out{i}" / "fp16"
        export(source, folder.parent, options(formats=("fp16",), max_shard_size=size))
        shards = len(list(folder.glob("*.safetensors")))
        counts.add(shards)
        assert (folder / INDEX_FILE).exists() == (shards > 1), (size, shards)
    assert {1, 2} <= counts  # the law was tried on both sides of the boundary


def test_a_rewrite_keeps_its_temporary_folders_locked_so_another_runs_cleanup_leaves_them(tmp_path, monkeypatch):
    # another run starting on the same --out removes every temporary folder whose lock is free (clean_stale); here it
    # runs on every tensor read, through both writes of a wrong prediction
    discovery_still_running(monkeypatch, predicted=architecture(linear=LINEAR - {UP}))
    out = tmp_path / "out"
    source = Checkpoint.open(checkpoint(tmp_path, side={"sub/chat.jinja": "x"}))
    real_read = source.read
    monkeypatch.setattr(source, "read", lambda name: publish.clean_stale(out) or real_read(name))
    manifest = export(source, out, options(formats=("int8", "fp16")))["int8"]
    assert manifest["summary"]["quantized_linears"] == 2  # written again from the real architecture
    folder = out / "int8"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == \
           sorted([f["name"] for f in manifest["files"]] + ["qexport.json"])


def test_a_folder_another_run_writes_meanwhile_is_neither_replaced_nor_removed(tmp_path, discovered, monkeypatch):
    # without --overwrite the rename refuses a target that appeared after the destination check; the folders this
    # export created stay while they hold the other run's work
    out = tmp_path / "new" / "out"
    real = export_module.write_format

    def another_run_meanwhile(source, plan, folder, *a, **k):
        manifest = real(source, plan, folder, *a, **k)
        (out / "int8").mkdir()
        (out / "int8" / "other").write_text("another run's")
        return manifest

    monkeypatch.setattr(export_module, "write_format", another_run_meanwhile)
    with pytest.raises(InputError, match=rf"^--out {out / 'int8'}: appeared while this export was running"):
        export(Checkpoint.open(checkpoint(tmp_path)), out, options(formats=("int8",)))
    assert sorted(p.relative_to(tmp_path / "new").as_posix() for p in (tmp_path / "new").rglob("*")) == \
           ["out", "out/int8", "out/int8/other"]
    assert (out / "int8" / "other").read_text() == "another run's"


def test_a_failure_creating_a_temporary_folder_is_reported_as_itself_and_nothing_is_left(tmp_path, discovered,
                                                                                          monkeypatch):
    import errno

    real, made = export_module.OwnedFolder, []

    def owned(path):  # the second format's folder cannot be created: the first exists, the second never did
        if made:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        made.append(real(path))
        return made[-1]

    monkeypatch.setattr(export_module, "OwnedFolder", owned)
    with pytest.raises(OSError) as e:
        export(Checkpoint.open(checkpoint(tmp_path)), tmp_path / "out", options(formats=("fp16", "int8")))
    assert e.value.errno == errno.ENOSPC and not (tmp_path / "out").exists()


@pytest.mark.parametrize("real_shapes,message", [
    (SHAPES, "exists and is not a folder"),  # the architecture is fine: the destination's error is the one
    ({**SHAPES, UP: (32, 64)}, rf"tensor '{UP}' has shape \[32, 128\] but LlamaForCausalLM expects \[32, 64\]"),
])
def test_a_destination_error_while_discovery_runs_is_reported_after_checking_the_real_architecture(
        tmp_path, monkeypatch, real_shapes, message):
    discovery_still_running(monkeypatch, real=architecture(shapes=real_shapes))
    (tmp_path / "out").write_text("a file")
    with pytest.raises(InputError, match=message):
        export(Checkpoint.open(checkpoint(tmp_path)), tmp_path / "out", options(formats=("int8",)))


def test_a_rewrite_after_a_wrong_prediction_is_logged(tmp_path, monkeypatch, caplog):
    import logging

    discovery_still_running(monkeypatch, predicted=architecture(linear=LINEAR - {UP}))
    with caplog.at_level(logging.INFO, logger="qexport"):
        export(Checkpoint.open(checkpoint(tmp_path)), tmp_path / "out", options(formats=("int8",)))
    assert [r.getMessage() for r in caplog.records if r.levelname == "INFO"] == [
        "the architecture differs from the prediction made from the checkpoint: writing again"]


def test_summary_counts_every_dense_tensor_in_the_model_bytes_and_fp16_bytes(tmp_path, discovered):
    # int4 with group size 128: up_proj quantized; embed, down_proj (input 96), norm and lm_head dense in bf16
    manifest = export(Checkpoint.open(checkpoint(tmp_path)), tmp_path / "out",
                      options(formats=("int4",), group_size=128))["int4"]
    summary = manifest["summary"]
    dense_elements = sum(math.prod(SHAPES[n]) for n in (EMBED, DOWN, NORM, HEAD))
    assert summary["tensor_bytes"] == 2 * dense_elements + summary["quantized_bytes"]
    assert summary["fp16_tensor_bytes"] == 2 * dense_elements + 2 * 32 * 128


def test_a_checkpoint_in_the_hub_cache_names_its_repository_as_the_base_model(tmp_path, discovered):
    snapshots = tmp_path / "hub" / "models--Org--Name" / "snapshots"
    snapshots.mkdir(parents=True)
    src = checkpoint(snapshots)  # the revision folder: snapshots/src
    manifest = export(Checkpoint.open(src), tmp_path / "out", options(formats=("fp16",)))["fp16"]
    assert manifest["source"]["base_model"] == "Org/Name"
    # a merge made from it is not that model: no base model
    merged = export(Merged(Checkpoint.open(src)), tmp_path / "merged", options(formats=("fp16",)))["fp16"]
    assert merged["source"]["base_model"] is None


def test_a_checkpoints_files_are_hashed_after_the_first_format_has_read_every_tensor(tmp_path, discovered,
                                                                                     monkeypatch):
    # the digests come from the tensors as read (hash_read), so the source is read once, not a second time to hash
    source = Checkpoint.open(checkpoint(tmp_path))
    events = []
    real_hash_read, real_source_files = source.hash_read, source.source_files
    monkeypatch.setattr(source, "hash_read", lambda name, w: events.append("read") or real_hash_read(name, w))
    monkeypatch.setattr(source, "source_files", lambda: events.append("hash") or real_source_files())
    export(source, tmp_path / "out", options(formats=("fp16", "int8")))
    assert events == ["read"] * len(SHAPES) + ["hash"] + ["read"] * len(SHAPES)


def test_a_source_that_cannot_hash_as_it_is_read_is_hashed_on_a_background_thread(tmp_path, discovered):
    import threading

    threads = []

    class Hashing(Merged):
        def source_files(self):
            threads.append(threading.current_thread())
            return super().source_files()

    export(Hashing(Checkpoint.open(checkpoint(tmp_path))), tmp_path / "out", options(formats=("fp16",)))
    assert len(threads) == 1 and threads[0] is not threading.current_thread()


def test_the_chosen_int4_method_is_the_one_that_encodes(tmp_path, discovered):
    src = checkpoint(tmp_path)
    export(Checkpoint.open(src), tmp_path / "out", options(formats=("int4",), int4_method="mse"))
    mse = get_format("int4", group_size=32, dtype="bfloat16", method="mse")
    rtn = get_format("int4", group_size=32, dtype="bfloat16")
    w = tensors()[UP]
    got = stored(tmp_path / "out" / "int4")
    expected = mse.encode(UP, w, True)
    assert all(torch.equal(got[n], t) for n, t in expected.items())
    assert not all(torch.equal(got[n], t) for n, t in rtn.encode(UP, w, True).items())  # the methods differ here


@pytest.mark.parametrize("allow_nonfinite", [False, True])
def test_each_tensor_is_read_once_per_format_and_each_linear_once_more_to_check_it_under_allow_nonfinite(
        tmp_path, discovered, monkeypatch, allow_nonfinite):
    source = Checkpoint.open(checkpoint(tmp_path))
    reads = []
    real_read = source.read
    monkeypatch.setattr(source, "read", lambda name: reads.append(name) or real_read(name))
    export(source, tmp_path / "out", options(formats=("fp16", "int8"), allow_nonfinite=allow_nonfinite))
    expected = {n: 2 + (allow_nonfinite and n in LINEAR) for n in SHAPES}
    assert {n: reads.count(n) for n in SHAPES} == expected and len(reads) == sum(expected.values())


def test_a_source_of_bf16_linear_weights_whose_config_names_no_dtype_computes_in_bf16(tmp_path, discovered):
    config = {k: v for k, v in CONFIG.items() if k != "torch_dtype"}
    export(Checkpoint.open(checkpoint(tmp_path, config=config)), tmp_path / "out", options(formats=("int8",)))
    assert json.loads((tmp_path / "out" / "int8" / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_source_without_side_tree_has_its_side_files_checked_against_its_own_folder(tmp_path, discovered):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "secret.txt").write_text("x")

    class Leaky(Merged):  # lists a file outside its folder: refused, never copied into the export
        def side_files(self):
            return [tmp_path / "elsewhere" / "secret.txt"]

    with pytest.raises(InputError, match=r"elsewhere/secret.txt: symlink leads outside .*src"):
        export(Leaky(Checkpoint.open(checkpoint(tmp_path))), tmp_path / "out", options(formats=("fp16",)))
    assert not (tmp_path / "out").exists()


def test_a_source_without_readme_gets_a_card_without_an_original_model_card_section(tmp_path, discovered):
    from qexport.report.card import README_BEGIN

    export(Checkpoint.open(checkpoint(tmp_path)), tmp_path / "out", options(formats=("fp16",)))
    card = (tmp_path / "out" / "fp16" / "README.md").read_text()
    assert "Original model card" not in card and README_BEGIN not in card


def test_a_source_readme_above_the_limit_is_refused_naming_it(tmp_path, discovered):
    from qexport.io import safe_fs
    src = checkpoint(tmp_path)
    with open(src / "README.md", "wb") as f:
        f.truncate(safe_fs.MAX_JSON_BYTES + 1)  # sparse: nothing is written, nothing is read
    with pytest.raises(InputError) as e:
        export(Checkpoint.open(src), tmp_path / "out", options(formats=("fp16",)))
    assert str(e.value) == (f"{src / 'README.md'}: README.md is {safe_fs.MAX_JSON_BYTES + 1:,} bytes, above "
                            "qexport's 64 MiB limit for it")


def test_the_progress_bar_is_shown_by_default_when_stderr_is_a_terminal(tmp_path, discovered, monkeypatch):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    export(Checkpoint.open(checkpoint(tmp_path)), tmp_path / "out", options(formats=("int8",), progress=None))
    assert "export int8: 100%" in err.getvalue() and f"{len(SHAPES)}/{len(SHAPES)}" in err.getvalue()
