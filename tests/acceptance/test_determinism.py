"""Determinism and integrity: the same input and options give byte-identical files, for any --workers; and
`qexport verify` recomputes every sha256 in the manifest, failing (exit 1) on a file changed after export."""

from __future__ import annotations

import shutil

import pytest

from fixtures.bad_inputs import read_raw, tree_sha256
from qexport.cli.main import main
from qexport.export.pipeline import ExportOptions, export_folder

SHARDED = dict(formats=("fp16", "int8", "int4"), max_shard_size=600_000, progress=False)  # several shards each


@pytest.fixture(scope="module")
def runs(llama_sharded_src, tmp_path_factory):
    """sha256 of every output file for three runs: workers 1, workers 1 again, workers 2."""
    trees = {}
    for name, workers in (("first", 1), ("again", 1), ("two_workers", 2)):
        out = tmp_path_factory.mktemp(name) / "out"
        export_folder(llama_sharded_src, out, ExportOptions(workers=workers, **SHARDED))
        trees[name] = tree_sha256(out)
    return trees


def test_the_export_is_sharded_so_order_matters(runs):
    assert sum(name.startswith("int4/model-0") for name in runs["first"]) >= 2


def test_same_input_and_options_give_byte_identical_files(runs):
    assert runs["again"] == runs["first"]


def test_two_workers_give_the_same_bytes_as_one(runs):
    assert runs["two_workers"] == runs["first"]


def test_verify_fails_naming_a_shard_changed_after_export(qwen3_src, export_model, tmp_path, capsys):
    out, _ = export_model(qwen3_src)
    export = tmp_path / "int4"
    shutil.copytree(out / "int4", export)
    # Flip one byte in the middle of the data section: same size, so only a recomputed sha256 can notice.
    shard = export / "model.safetensors"
    _, data = read_raw(shard)
    raw = bytearray(shard.read_bytes())
    at = len(raw) - len(data) // 2
    raw[at] ^= 0x01
    shard.write_bytes(bytes(raw))
    assert main(["verify", str(export), "--reference", str(qwen3_src)]) == 1
    err = capsys.readouterr().err
    assert "manifest" in err and "model.safetensors" in err and "sha256" in err, err
