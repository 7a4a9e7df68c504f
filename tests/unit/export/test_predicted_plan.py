"""Architecture discovery off the critical path (issue 17): in a fresh process the meta model is built in a child
process while the export works from a prediction; nothing is renamed into place before the real architecture's
plan is confirmed equal to the predicted one, a wrong prediction is written again from the real plan, and an
architecture error still exits 2 with nothing left behind."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest

import qexport.export.pipeline as export_module
from fixtures.bad_inputs import tree_sha256
from qexport.model.architecture import Architecture, _in_child, inspect_architecture, predict_architecture
from qexport.io.checkpoint import Checkpoint, load_config
from qexport.errors import InputError
from qexport.export.pipeline import ExportOptions, export

ROOT = Path(__file__).resolve().parents[3]
OPTIONS = dict(formats=("fp16", "int8", "int4"), max_shard_size=600_000, progress=False)  # several shards


def pending(result=None, error: Exception | None = None, delay: float = 0.2) -> Future:
    """A discovery future that is not done when the export starts (as with a child process), done `delay` later."""
    future: Future = Future()

    def finish():
        time.sleep(delay)
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    threading.Thread(target=finish, daemon=True).start()
    return future


@pytest.fixture(scope="module")
def direct(llama_sharded_src, tmp_path_factory):
    """sha256 of every file of the export made with the architecture known up front (the in-process path)."""
    out = tmp_path_factory.mktemp("direct") / "out"
    export(Checkpoint.open(llama_sharded_src), out, ExportOptions(**OPTIONS))
    return tree_sha256(out)


def test_the_prediction_from_names_and_shapes_matches_the_meta_model_for_llama_like_models(qwen3_src,
                                                                                           llama_sharded_src):
    for src in (qwen3_src, llama_sharded_src):
        source = Checkpoint.open(src)
        real = inspect_architecture(source.config)
        predicted = predict_architecture(source.config, source.entries)
        assert predicted.linear_weights & set(source.entries) == real.linear_weights & set(source.entries)


def test_a_speculative_export_writes_the_same_bytes_as_one_that_knew_the_architecture(
        llama_sharded_src, direct, tmp_path, monkeypatch):
    source = Checkpoint.open(llama_sharded_src)
    arch = inspect_architecture(source.config)
    monkeypatch.setattr(export_module, "discover", lambda *_: pending(arch))
    export(source, tmp_path / "out", ExportOptions(**OPTIONS))
    assert tree_sha256(tmp_path / "out") == direct


def test_a_wrong_prediction_is_written_again_from_the_real_architecture(llama_sharded_src, direct, tmp_path,
                                                                        monkeypatch):
    source = Checkpoint.open(llama_sharded_src)
    arch = inspect_architecture(source.config)
    wrong = "model.layers.0.mlp.down_proj.weight"
    assert wrong in arch.linear_weights
    guess = Architecture(arch.model_class, arch.shapes, arch.linear_weights - {wrong}, frozenset(), True)
    monkeypatch.setattr(export_module, "discover", lambda *_: pending(arch))
    monkeypatch.setattr(export_module, "predict_architecture", lambda *_: guess)
    written = []
    original = export_module.write_format
    monkeypatch.setattr(export_module, "write_format", lambda *a: written.append(a[1].fmt.name) or original(*a))
    export(source, tmp_path / "out", ExportOptions(**OPTIONS))
    assert written == ["fp16", "int8", "int4"] * 2  # predicted plan: the int formats differ, all written again
    assert tree_sha256(tmp_path / "out") == direct


def test_an_architecture_error_found_after_writing_leaves_nothing_behind(llama_sharded_src, tmp_path, monkeypatch):
    source = Checkpoint.open(llama_sharded_src)
    monkeypatch.setattr(export_module, "discover",
                        lambda *_: pending(error=InputError("config.json: cannot build it"), delay=0.5))
    out = tmp_path / "a" / "out"
    with pytest.raises(InputError, match="cannot build it"):
        export(source, out, ExportOptions(**OPTIONS))
    assert not (tmp_path / "a").exists()  # no format folder, no temporary folder, no parent --out created


def test_an_architecture_error_is_reported_before_a_destination_error(llama_sharded_src, tmp_path, monkeypatch):
    source = Checkpoint.open(llama_sharded_src)
    (tmp_path / "out" / "int4").mkdir(parents=True)  # exists, no --overwrite
    monkeypatch.setattr(export_module, "discover",
                        lambda *_: pending(error=InputError("config.json: cannot build it")))
    with pytest.raises(InputError, match="cannot build it"):
        export(source, tmp_path / "out", ExportOptions(**OPTIONS))


def test_the_child_process_finds_the_same_architecture_as_this_process(qwen3_src):
    config = load_config(qwen3_src)
    assert _in_child(config, qwen3_src / "config.json").result(timeout=300) == inspect_architecture(config)


def test_the_child_process_reports_a_bad_config_as_input_error(qwen3_src):
    config = {**load_config(qwen3_src), "model_type": "no-such-model"}
    with pytest.raises(InputError, match="no-such-model"):
        _in_child(config, qwen3_src / "config.json").result(timeout=300)


# Runs `qexport export` in a new interpreter and reports on stderr which children it started: the source hashed in
# a forked child, the architecture discovered in a forked or a spawned one. "torch-first": the process imported
# torch and computed before the command, as a test session or notebook does.
CLI_DRIVER = r"""
import sys
import qexport.model.architecture as architecture
from qexport.io.checkpoint import Checkpoint
if sys.argv[1] == "torch-first":
    import torch
    torch.ones(64, 64).matmul(torch.ones(64, 64))
used = []
for owner, name in ((architecture, "_in_fork"), (architecture, "_in_child"), (Checkpoint, "hash_in_child")):
    setattr(owner, name, lambda *a, _o=getattr(owner, name), _n=name: used.append(_n) or _o(*a))
from qexport.cli.main import main
code = main(sys.argv[2:])
print("children:", *used, file=sys.stderr)
sys.exit(code)
"""


def run_cli(mode: str, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               QEXPORT_DISCOVERY_CHILD_MIN_BYTES="0")  # a child even for this 4 MB model
    return subprocess.run([sys.executable, "-c", CLI_DRIVER, mode, *argv], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("mode, children", [("fresh", "hash_in_child _in_fork"), ("torch-first", "_in_child")])
def test_a_command_line_export_forks_only_when_it_imported_torch_itself(mode, children, llama_sharded_src, direct,
                                                                        tmp_path):
    """Fresh: the source hashed by a child forked before torch is imported, discovery forked right after. Torch
    imported and used before: no fork (it could inherit a lock held by a torch thread), discovery spawned, hashes
    from the reads. Same bytes either way, the manifest's source sha256 included."""
    run = run_cli(mode, "export", str(llama_sharded_src), "--out", str(tmp_path / "out"), "--formats", "fp16",
                  "int8", "int4", "--max-shard-size", "600000", "--quiet")
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip().splitlines()[-1] == f"children: {children}"
    assert tree_sha256(tmp_path / "out") == direct


def test_an_architecture_error_in_a_forked_child_exits_2_with_one_line_and_leaves_nothing_behind(
        llama_sharded_src, tmp_path):
    import json
    import shutil

    src = tmp_path / "src"
    shutil.copytree(llama_sharded_src, src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "no-such-model"}))
    run = run_cli("fresh", "export", str(src), "--out", str(tmp_path / "a" / "out"), "--formats", "int4", "--quiet")
    assert run.returncode == 2, run.stderr
    error, used = run.stderr.strip().splitlines()
    assert error.startswith("qexport: error: ") and "model_type 'no-such-model'" in error
    assert used == "children: hash_in_child _in_fork"
    assert not (tmp_path / "a").exists()


def test_discovery_spawns_instead_of_forking_while_another_thread_runs(qwen3_src, monkeypatch):
    import qexport.model.architecture as architecture

    monkeypatch.setattr(architecture, "_HEAVY_MODULES", ("no.such.module",))  # as in a fresh process
    monkeypatch.setattr(architecture, "_in_fork", lambda *_: pytest.fail("forked with another thread running"))
    monkeypatch.setattr(architecture, "_in_child", lambda *_: "spawned")
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        assert architecture.discover(load_config(qwen3_src), qwen3_src / "config.json", 1 << 40, fork=True) == \
            "spawned"
    finally:
        release.set()
        other.join()


def test_source_hashes_fed_from_reads_in_file_order_equal_the_files_sha256_gaps_and_all(llama_sharded_src):
    from qexport.io.safetensors_file import sha256_file

    source = Checkpoint.open(llama_sharded_src)
    names = source.names
    for name in names[:3] + names[4:]:  # one tensor never fed: the rest of its file is read from disk
        source.hash_read(name, source.read(name))
    assert {r["name"]: r["sha256"] for r in source.source_files()} == {
        r["name"]: sha256_file(llama_sharded_src / r["name"]) for r in source.source_files()}
    assert len(source.files) > 1


def test_an_export_records_the_source_files_sha256(llama_sharded_src, tmp_path):
    import json

    from qexport.io.safetensors_file import sha256_file

    export(Checkpoint.open(llama_sharded_src), tmp_path / "out", ExportOptions(**OPTIONS))
    for fmt in OPTIONS["formats"]:
        recorded = json.loads((tmp_path / "out" / fmt / "qexport.json").read_text())["source"]["files"]
        assert {r["name"]: r["sha256"] for r in recorded} == {
            r["name"]: sha256_file(llama_sharded_src / r["name"]) for r in recorded}


def test_a_small_checkpoint_is_not_discovered_in_a_child(qwen3_src, monkeypatch):
    import qexport.model.architecture as architecture

    monkeypatch.delenv("QEXPORT_DISCOVERY_CHILD_MIN_BYTES", raising=False)
    monkeypatch.setattr(architecture, "_in_child", lambda *_: pytest.fail("child process started"))
    monkeypatch.setattr(architecture, "_HEAVY_MODULES", ("no.such.module",))  # as in a fresh process
    config = load_config(qwen3_src)
    architecture.prefetch(config, qwen3_src / "config.json", source_bytes=architecture.CHILD_MIN_BYTES - 1)
    assert architecture.discover(config, qwen3_src / "config.json",
                                 architecture.CHILD_MIN_BYTES - 1).result() == inspect_architecture(config)
