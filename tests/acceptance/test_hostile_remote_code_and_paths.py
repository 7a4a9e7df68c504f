"""A folder from the internet never gets its code run, nor makes qexport read outside it (issue 26, classes 1-2).

Law: with stdin answering "y" to every question, no command (export, verify, inspect, the pytest gate) runs a
python file that a folder's JSON files point to (config.json / tokenizer_config.json / processor `auto_map`,
modules.json custom modules, `trust_remote_code` in sentence_bert_config.json); and no path named inside a
folder's JSON (tokenizer files, sentence-transformers modules and arguments, index shards, manifest entries) nor
a hard link takes a read outside the folder. export refuses such a folder (exit 2, one line naming the file and
the key); verify fails its `safe_to_load` check naming them (exit 1) and hands the folder to no library; inspect
lists them as problems (exit 1).

The source is a tiny `arcee` model: transformers has no tokenizer class registered for that model type, so it
is the kind of folder for which transformers asks "Do you wish to run the custom code? [y/N]" (with qwen3 it
picks its own class and never asks).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qexport.cli.main import main
from qexport.verify import verify
from tests.support import deadline

pytest_plugins = ["pytester"]

MINI = dict(model_type="arcee", architectures=("ArceeForCausalLM",), hidden_size=128, intermediate_size=256,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, vocab_size=256,
            bos_token_id=0, eos_token_id=0)
SECONDS = 600  # a hang guard, not a speed test
ROOT = Path(__file__).resolve().parents[2]
YES = "y\n" * 1000


@pytest.fixture(scope="module")
def arcee_src(build_model):
    return build_model("llama", **MINI)


@pytest.fixture(scope="module")
def arcee_export(arcee_src, export_model):
    out, _ = export_model(arcee_src, formats=("int8",))
    return out / "int8"


def copy(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    change(data)
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------------------------------------------------------
# Remote-code hooks: each plants `evil.py` (which writes the marker when imported) and points a hook at it.

EVIL = """import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import PreTrainedTokenizerFast, PretrainedConfig, PreTrainedModel
import torch
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
class EvilConfig(PretrainedConfig):
    model_type = "arcee"
class EvilModel(PreTrainedModel):
    config_class = EvilConfig
class EvilModule(torch.nn.Module):
    @classmethod
    def load(cls, *args, **kwargs):
        return cls()
"""


def _tokenizer_auto_map(keep_class: bool, legacy: bool = False):
    def plant(folder: Path) -> None:
        def change(c):
            if not keep_class:
                c.pop("tokenizer_class", None)
            else:
                c["tokenizer_class"] = "EvilTokenizer"
            c["auto_map"] = ["evil.EvilTokenizer", None] if legacy else {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
        edit_json(folder / "tokenizer_config.json", change)
    return plant


def _config_auto_map(folder: Path) -> None:
    edit_json(folder / "config.json", lambda c: c.update(auto_map={"AutoConfig": "evil.EvilConfig",
                                                                    "AutoModelForCausalLM": "evil.EvilModel"}))


def _modules_custom(folder: Path) -> None:
    (folder / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "", "type": "evil.EvilModule"}]))


def _sentence_bert_trust(folder: Path) -> None:
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]))
    (folder / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": 128, "model_args": {"trust_remote_code": True}, "config_args": {"trust_remote_code": True}}))


def _processor_auto_map(folder: Path) -> None:
    (folder / "preprocessor_config.json").write_text(json.dumps({"auto_map": {"AutoProcessor": "evil.EvilModel"}}))


HOOKS = {  # hook -> (plant, the file and key the refusal must name)
    "tokenizer_config_auto_map_without_tokenizer_class": (_tokenizer_auto_map(False), "tokenizer_config.json"),
    "tokenizer_config_auto_map_with_tokenizer_class": (_tokenizer_auto_map(True), "tokenizer_config.json"),
    "tokenizer_config_auto_map_legacy_list": (_tokenizer_auto_map(False, legacy=True), "tokenizer_config.json"),
    "config_auto_map": (_config_auto_map, "config.json"),
    "modules_json_custom_module": (_modules_custom, "modules.json"),
    "sentence_bert_config_trust_remote_code": (_sentence_bert_trust, "sentence_bert_config.json"),
    "processor_config_auto_map": (_processor_auto_map, "preprocessor_config.json"),
}


def plant_hook(folder: Path, hook: str, marker: Path) -> str:
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    plant, file = HOOKS[hook]
    plant(folder)
    return file


@contextlib.contextmanager
def stdin_says_yes():
    """What `yes | qexport ...` gives an in-process run: every input() reads "y"."""
    saved = sys.stdin
    sys.stdin = io.StringIO(YES)
    try:
        yield
    finally:
        sys.stdin = saved


def run_main(*args: str) -> tuple[int, str, str]:
    err, out = io.StringIO(), io.StringIO()
    with deadline(SECONDS), stdin_says_yes(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main([*args])
    return rc, err.getvalue(), out.getvalue()


def assert_refused(rc: int, stderr: str, *parts: str) -> None:
    assert rc == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qexport: error: ") and "Traceback" not in stderr, stderr
    for part in parts:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"


def verify_checks(export: Path, reference: Path, tmp_path: Path) -> tuple[int, dict[str, dict], str]:
    report = tmp_path / "verify.json"
    rc, err, _ = run_main("verify", str(export), "--reference", str(reference), "--json", str(report))
    checks = {c["name"]: c for c in json.loads(report.read_text())["checks"]} if report.exists() else {}
    return rc, checks, err


@pytest.mark.parametrize("hook", list(HOOKS))
def test_verify_of_an_export_with_a_remote_code_hook_runs_no_code_and_fails_safe_to_load(
        hook, arcee_src, arcee_export, tmp_path):
    export, marker = copy(arcee_export, tmp_path / "int8"), tmp_path / "MARKER"
    file = plant_hook(export, hook, marker)
    rc, checks, err = verify_checks(export, arcee_src, tmp_path)
    assert not marker.exists(), "verify ran the folder's code"
    assert rc == 1, err
    assert "safe_to_load" in checks and checks["safe_to_load"]["status"] == "FAILED", err
    assert f"export {file}" in checks["safe_to_load"]["detail"]


@pytest.mark.parametrize("hook", ["tokenizer_config_auto_map_without_tokenizer_class", "config_auto_map",
                                  "modules_json_custom_module"])
def test_verify_against_a_reference_with_a_remote_code_hook_runs_no_code(hook, arcee_src, arcee_export, tmp_path):
    reference, marker = copy(arcee_src, tmp_path / "src"), tmp_path / "MARKER"
    file = plant_hook(reference, hook, marker)
    rc, checks, err = verify_checks(arcee_export, reference, tmp_path)
    assert not marker.exists(), "verify ran the reference folder's code"
    assert rc == 1, err
    assert f"reference {file}" in checks["safe_to_load"]["detail"]


@pytest.mark.parametrize("hook", list(HOOKS))
def test_export_refuses_a_source_with_a_remote_code_hook(hook, arcee_src, tmp_path):
    source, marker = copy(arcee_src, tmp_path / "src"), tmp_path / "MARKER"
    file = plant_hook(source, hook, marker)
    rc, err, _ = run_main("export", str(source), "--out", str(tmp_path / "out"), "--formats", "int8")
    assert not marker.exists()
    assert_refused(rc, err, file)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("hook", list(HOOKS))
def test_inspect_lists_a_remote_code_hook_as_a_problem(hook, arcee_export, tmp_path):
    export, marker = copy(arcee_export, tmp_path / "int8"), tmp_path / "MARKER"
    file = plant_hook(export, hook, marker)
    rc, _, out = run_main("inspect", str(export))
    assert not marker.exists()
    assert rc == 1
    assert any(line.strip().startswith(f"- {file}: ") and "code" in line for line in out.splitlines()), out


def test_verify_as_a_process_with_yes_on_stdin_runs_no_code(arcee_src, arcee_export, tmp_path):
    """The issue's case, as `yes | qexport verify EXPORT --reference SRC` runs it."""
    export, marker = copy(arcee_export, tmp_path / "int8"), tmp_path / "MARKER"
    plant_hook(export, "tokenizer_config_auto_map_without_tokenizer_class", marker)
    done = subprocess.run([sys.executable, "-m", "qexport.cli.main", "verify", str(export), "--reference",
                           str(arcee_src)], input=YES, capture_output=True, text=True, timeout=SECONDS, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert not marker.exists(), done.stderr[-2000:]
    assert done.returncode == 1, done.stderr[-2000:]
    assert "safe_to_load" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow  # two gate processes (~20 s of CPU): the in-process runs above cover the default tier
def test_gate_on_folders_with_every_remote_code_hook_runs_no_code(pytester, arcee_src, arcee_export, tmp_path):
    """--qexport-export (a hostile export) and --qexport-model (a hostile source), as processes with "y" on stdin
    (an in-process pytester run gives transformers no stdin to read an answer from)."""
    export, source = copy(arcee_export, tmp_path / "int8"), copy(arcee_src, tmp_path / "src")
    marker = tmp_path / "MARKER"
    for folder in (export, source):
        for hook in HOOKS:
            plant_hook(folder, hook, marker)
    gate = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p",
            "no:xdist", "-s"]
    checked = pytester.run(*gate, f"--qexport-export={export}", f"--qexport-reference={arcee_src}",
                           stdin=YES.encode(), timeout=SECONDS)
    exported = pytester.run(*gate, f"--qexport-model={source}", "--qexport-formats", "int8", stdin=YES.encode(),
                            timeout=SECONDS)
    assert not marker.exists()
    assert checked.ret == exported.ret == 1
    checked.stdout.fnmatch_lines(["*qexport int8 safe_to_load: *auto_map*"])
    assert exported.parseoutcomes().get("passed", 0) == 0  # the export is refused: every item fails
    exported.stdout.fnmatch_lines(["*export failed: InputError*"])


def test_library_guard_refuses_remote_code_without_asking_when_a_caller_forgets_trust_remote_code(
        arcee_export, tmp_path):
    """The second wall: even a library call without `trust_remote_code=False` cannot be answered yes."""
    from transformers import AutoTokenizer

    from qexport.io.library_guard import no_remote_code

    export, marker = copy(arcee_export, tmp_path / "int8"), tmp_path / "MARKER"
    plant_hook(export, "tokenizer_config_auto_map_without_tokenizer_class", marker)
    with stdin_says_yes():
        with no_remote_code(), pytest.raises(ValueError, match="custom code"):
            AutoTokenizer.from_pretrained(str(export))
        assert sys.stdin.read(2) == "y\n"  # the caller's stdin is back
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# Paths named inside JSON files, hard links, module pickles.

def _secret(tmp_path: Path) -> Path:
    secret = tmp_path / "secret"
    secret.mkdir(exist_ok=True)
    (secret / "id_rsa").write_text("PRIVATE KEY\n")
    return secret / "id_rsa"


def _tokenizer_key(key, value):
    return lambda folder, secret: edit_json(folder / "tokenizer_config.json", lambda c: c.update({key: value(secret)}))


def _st_tokenizer_file(folder: Path, secret: Path) -> None:
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]))
    (folder / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": 128, "tokenizer_args": {"tokenizer_file": str(secret)}}))


def _modules_path_out(folder: Path, secret: Path) -> None:
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "../secret", "type": "sentence_transformers.models.Pooling"}]))


def _pooling_config_path(folder: Path, secret: Path) -> None:
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 128,
                                                                   "vocab_file": "../../secret/id_rsa"}))


PATHS = {  # case -> (plant(folder, secret), the file and key the refusal must name)
    "fast_tokenizer_files_parent": (_tokenizer_key("fast_tokenizer_files", lambda s: ["../secret/id_rsa"]),
                                    "tokenizer_config.json: fast_tokenizer_files"),
    "tokenizer_file_absolute": (_tokenizer_key("tokenizer_file", lambda s: "/etc/passwd"),
                                "tokenizer_config.json: tokenizer_file"),
    "vocab_file_parent": (_tokenizer_key("vocab_file", lambda s: "../secret/id_rsa"),
                          "tokenizer_config.json: vocab_file"),
    "merges_file_home": (_tokenizer_key("merges_file", lambda s: "~/.ssh/id_rsa"),
                         "tokenizer_config.json: merges_file"),
    "sentence_bert_tokenizer_args_tokenizer_file": (_st_tokenizer_file,
                                                    "sentence_bert_config.json: tokenizer_args.tokenizer_file"),
    "modules_json_path_parent": (_modules_path_out, "modules.json: [1].path"),
    "module_folder_config_path": (_pooling_config_path, "1_Pooling/config.json: vocab_file"),
}


@pytest.mark.parametrize("case", list(PATHS))
def test_export_refuses_a_path_named_in_json_that_leaves_the_folder(case, arcee_src, tmp_path):
    source = copy(arcee_src, tmp_path / "src")
    plant, named = PATHS[case]
    plant(source, _secret(tmp_path))
    rc, err, _ = run_main("export", str(source), "--out", str(tmp_path / "out"), "--formats", "int8")
    assert_refused(rc, err, named)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", list(PATHS))
def test_verify_fails_a_path_named_in_json_that_leaves_the_export(case, arcee_src, arcee_export, tmp_path):
    export = copy(arcee_export, tmp_path / "int8")
    plant, named = PATHS[case]
    plant(export, _secret(tmp_path))
    rc, checks, err = verify_checks(export, arcee_src, tmp_path)
    assert rc == 1, err
    assert "safe_to_load" in checks and f"export {named}" in checks["safe_to_load"]["detail"], err


def test_verify_fails_an_index_shard_that_leaves_the_export(arcee_src, arcee_export, tmp_path):
    export = copy(arcee_export, tmp_path / "int8")
    secret = _secret(tmp_path)
    edit_json(export / "model.safetensors.index.json",
              lambda c: c.update(weight_map={"model.norm.weight": "../secret/id_rsa"}, metadata={}))
    rc, checks, err = verify_checks(export, arcee_src, tmp_path)
    assert rc == 1, err
    assert "model.safetensors.index.json: weight_map['model.norm.weight']" in checks["safe_to_load"]["detail"]
    assert secret.read_text() == "PRIVATE KEY\n"


@pytest.mark.parametrize("name", ["/etc/shadow", "../secret/id_rsa", "/etc/hostname"])
def test_verify_never_reads_a_manifest_entry_outside_the_export(name, arcee_src, arcee_export, tmp_path):
    export = copy(arcee_export, tmp_path / "int8")
    secret = _secret(tmp_path)
    edit_json(export / "qexport.json", lambda m: m["files"].append({"name": name, "bytes": 1, "sha256": "0" * 64}))
    rc, checks, err = verify_checks(export, arcee_src, tmp_path)
    assert rc == 1, err
    assert checks["manifest"]["status"] == "FAILED" and name in checks["manifest"]["detail"]
    target = Path(name) if Path(name).is_absolute() else secret
    if target.exists():
        assert f"is {target.stat().st_size} bytes" not in checks["manifest"]["detail"]  # never looked up
    assert "qexport.json: files[" in checks["safe_to_load"]["detail"]


def test_export_refuses_a_hard_linked_side_file(arcee_src, tmp_path):
    source = copy(arcee_src, tmp_path / "src")
    secret = _secret(tmp_path)
    os.link(secret, source / "notes.txt")
    rc, err, _ = run_main("export", str(source), "--out", str(tmp_path / "out"), "--formats", "int8")
    assert_refused(rc, err, "notes.txt", "hard link")
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_hard_linked_weight_file(arcee_src, tmp_path):
    source = copy(arcee_src, tmp_path / "src")
    os.link(source / "model.safetensors", tmp_path / "twin.safetensors")
    rc, err, _ = run_main("export", str(source), "--out", str(tmp_path / "out"), "--formats", "int8")
    assert_refused(rc, err, "model.safetensors", "hard link")


def test_verify_fails_an_export_holding_a_hard_link(arcee_src, arcee_export, tmp_path):
    export = copy(arcee_export, tmp_path / "int8")
    os.link(_secret(tmp_path), export / "notes.txt")
    with deadline(SECONDS):  # a hard link blocks no library check: run only the one that reports it
        checks = {c.name: c for c in verify(export, arcee_src, only=["safe_to_load"]).checks}
    assert "safe_to_load" in checks and not checks["safe_to_load"].passed
    assert "export notes.txt: has other hard links" in checks["safe_to_load"].detail


def _module_pickle(folder: Path) -> None:
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    (folder / "2_Dense").mkdir()
    (folder / "2_Dense" / "config.json").write_text(json.dumps({"in_features": 128, "out_features": 8}))
    (folder / "2_Dense" / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")  # pickle.dumps(1)


def test_export_refuses_a_pickle_in_a_sentence_transformers_module(arcee_src, tmp_path):
    source = copy(arcee_src, tmp_path / "src")
    _module_pickle(source)
    rc, err, _ = run_main("export", str(source), "--out", str(tmp_path / "out"), "--formats", "int8")
    assert_refused(rc, err, "2_Dense/pytorch_model.bin", "pickle")


def test_verify_fails_a_pickle_in_a_sentence_transformers_module(arcee_src, arcee_export, tmp_path):
    export = copy(arcee_export, tmp_path / "int8")
    _module_pickle(export)
    rc, checks, err = verify_checks(export, arcee_src, tmp_path)
    assert rc == 1, err
    assert "export 2_Dense/pytorch_model.bin" in checks["safe_to_load"]["detail"]
    assert checks["engine_sentence_transformers"]["status"] == "FAILED"  # not run: nothing was unpickled


def test_paths_inside_the_folder_are_no_finding(arcee_src, tmp_path):
    """Real folders name their own files: a relative name inside, a module folder, the folder itself ("")."""
    from qexport.io.json_paths import folder_findings

    source = copy(arcee_src, tmp_path / "src")
    edit_json(source / "tokenizer_config.json", lambda c: c.update(
        tokenizer_file="tokenizer.json", fast_tokenizer_files=["tokenizer.json"], vocab_file=None,
        name_or_path="/home/someone/models/arcee"))
    edit_json(source / "config.json", lambda c: c.update(_name_or_path="../elsewhere"))
    (source / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (source / "1_Pooling").mkdir()
    (source / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 128}))
    assert folder_findings(source) == []
