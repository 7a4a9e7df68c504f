"""Hostile and unlucky inputs (issue 10), by kind: each run is bounded by a timeout and must end as promised.

Promise: bad input is exit 2 and one short line naming the file / tensor / option; a failed check exit 1; never a
traceback, never a hang; nothing outside the source read or copied; the input unchanged; nothing half-written.
Runs that could hang (FIFOs, /dev/zero, regexes, sizes, signals, concurrency) are real processes with `timeout=`;
the others call `qexport.cli.main.main` in-process under an alarm (a tiny export takes about 0.3 s).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.bad_inputs import manifest_problems, read_raw, rewrite_header, tree_sha256, write_raw
from qexport.cli.main import main
from tests.support import deadline

MINI = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=256)
SECONDS = 600  # a hang guard, not a speed test: a tiny export takes under 5 s as a process on an idle machine and
# passed 60 s under a load of 14-19; ten minutes still ends a hang, never a slow but correct run
SINGLE = "model.safetensors"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def src(mini, tmp_path):
    """A private copy of the mini model, with a secret next to it (outside the folder) that must never leak."""
    folder = tmp_path / "src"
    shutil.copytree(mini, folder)
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "id_rsa").write_text("PRIVATE KEY\n")
    return folder


def run_process(*args: str, timeout: int = SECONDS, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qexport.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})




def run_main(*args: str) -> tuple[int, str]:
    err = io.StringIO()
    with deadline(SECONDS), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main([*args])
    return rc, err.getvalue()


def assert_refused(rc: int, stderr: str, *parts: str) -> str:
    assert rc == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qexport: error: "), stderr
    assert len(lines[0]) <= 520, len(lines[0])
    for part in parts:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    return lines[0]


def export_refused(src: Path, tmp_path: Path, *parts: str, process: bool = False) -> None:
    """Export SRC: refused naming `parts`, no OUT, the input (and its surroundings) byte-identical."""
    before = tree_sha256(tmp_path)
    out = tmp_path / "out"
    args = ("export", str(src), "--out", str(out), "--formats", "int4", "--quiet")
    if process:
        result = run_process(*args)
        rc, err = result.returncode, result.stderr
    else:
        rc, err = run_main(*args)
    assert_refused(rc, err, *parts)
    assert not out.exists()
    assert tree_sha256(tmp_path) == before


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------------------------------------------------------
# 1. Security: nothing outside the source folder is read or copied


def test_side_file_linked_to_etc_passwd_is_refused_naming_the_link(src, tmp_path):
    (src / "special_tokens_map.json").unlink(missing_ok=True)
    (src / "special_tokens_map.json").symlink_to("/etc/passwd")
    export_refused(src, tmp_path, "special_tokens_map.json", "outside")


def test_side_folder_linked_outside_is_refused(src, tmp_path):
    (src / "extras").symlink_to(tmp_path / "secret")
    export_refused(src, tmp_path, "extras")


def test_side_folder_linked_to_etc_is_not_walked(src, tmp_path):
    (src / "etc").symlink_to("/etc")
    export_refused(src, tmp_path, "etc", "outside")


def test_file_in_a_side_folder_linked_outside_is_refused(src, tmp_path):
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").symlink_to(tmp_path / "secret" / "id_rsa")
    export_refused(src, tmp_path, "1_Pooling/config.json", "outside")


def test_side_folder_linking_to_its_own_ancestor_is_refused_in_one_short_line(src, tmp_path):
    (src / "sub").mkdir()
    (src / "sub" / "loop").symlink_to(src)
    export_refused(src, tmp_path, "sub/loop", "symlinked folder")


@pytest.mark.parametrize("name", ["config.json", SINGLE])
def test_config_or_weights_linked_outside_are_refused(name, src, tmp_path):
    outside = tmp_path / f"outside-{name}"
    (src / name).rename(outside)
    (src / name).symlink_to(outside)
    export_refused(src, tmp_path, name, "outside")


def test_links_that_stay_inside_the_folder_are_followed_and_copied_as_files(src, tmp_path):
    (src / "notes.txt").write_text("hello\n")
    (src / "copy_of_notes.txt").symlink_to("notes.txt")
    out = tmp_path / "out"
    rc, err = run_main("export", str(src), "--out", str(out), "--formats", "int4", "--quiet")
    assert rc == 0, err
    copied = out / "int4" / "copy_of_notes.txt"
    assert not copied.is_symlink() and copied.read_text() == "hello\n"
    assert manifest_problems(out / "int4") == []


def test_hugging_face_cache_layout_links_into_blobs_are_allowed(mini, tmp_path):
    """The HF cache stores every file of snapshots/<rev>/ as a link to ../../blobs/<hash>: that is inside."""
    repo = tmp_path / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in mini.iterdir():
        shutil.copyfile(f, blobs / f.name)
        (snapshot / f.name).symlink_to(Path("../../blobs") / f.name)
    out = tmp_path / "out"
    rc, err = run_main("export", str(snapshot), "--out", str(out), "--formats", "int4", "--quiet")
    assert rc == 0, err
    assert manifest_problems(out / "int4") == []


def test_verify_refuses_an_export_with_a_link_out(src, tmp_path, int4_export):
    folder = tmp_path / "int4"
    shutil.copytree(int4_export, folder)
    (folder / "vocab.json").unlink(missing_ok=True)
    (folder / "vocab.json").symlink_to("/etc/passwd")
    rc, err = run_main("verify", str(folder), "--reference", str(src))
    assert_refused(rc, err, "vocab.json", "outside")


def test_inspect_does_not_read_a_config_linked_outside(src, tmp_path):
    outside = tmp_path / "outside.json"
    (src / "config.json").rename(outside)
    (src / "config.json").symlink_to(outside)
    result = run_process("inspect", str(src), "--json")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    report = json.loads(result.stdout)
    assert report["model_type"] is None
    assert any("config.json" in p and "outside" in p for p in report["problems"])


# ---------------------------------------------------------------------------------------------------------------
# 2. Unbounded reads and special files


def test_config_linked_to_dev_zero_is_refused_at_once(src, tmp_path):
    (src / "config.json").unlink()
    (src / "config.json").symlink_to("/dev/zero")
    export_refused(src, tmp_path, "config.json", process=True)


@pytest.mark.parametrize("name", ["config.json", SINGLE, "tokenizer_config.json"])
def test_fifo_in_the_source_is_refused_not_waited_on(name, src, tmp_path):
    (src / name).unlink(missing_ok=True)
    os.mkfifo(src / name)
    export_refused(src, tmp_path, name, "FIFO", process=True)


def test_fifo_as_inspected_config_is_reported_not_waited_on(src):
    (src / "config.json").unlink()
    os.mkfifo(src / "config.json")
    result = run_process("inspect", str(src))
    assert result.returncode == 1 and "FIFO" in result.stdout and "Traceback" not in result.stderr


def test_fifo_as_the_exports_config_in_verify_is_refused(src, tmp_path, int4_export):
    folder = tmp_path / "int4"
    shutil.copytree(int4_export, folder)
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    result = run_process("verify", str(folder), "--reference", str(src))
    assert_refused(result.returncode, result.stderr, "config.json", "FIFO")


def test_config_above_the_size_cap_is_refused(src, tmp_path):
    with open(src / "config.json", "a") as f:
        f.write(" " * (17 * 2**20))  # valid JSON, one byte of whitespace too many times
    export_refused(src, tmp_path, "config.json", "limit")


@pytest.mark.parametrize("what", ["config", "index", "baseline"])
def test_deeply_nested_json_is_refused_in_one_line(what, src, tmp_path, build_model):
    nested = '{"a": ' * 100_000 + "1" + "}" * 100_000
    if what == "config":
        text = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps(text)[:-1] + ', "deep": ' + nested + "}")
        export_refused(src, tmp_path, "config.json", "nests deeper")
    elif what == "index":
        sharded = tmp_path / "sharded"
        shutil.copytree(build_model("qwen3", max_shard_size="200KB", **MINI), sharded)
        index = sharded / "model.safetensors.index.json"
        index.write_text(index.read_text()[:-2] + ', "deep": ' + nested + "}")
        export_refused(sharded, tmp_path, "index.json", "nests deeper")
    else:
        baseline = tmp_path / "baseline.json"
        baseline.write_text(nested)
        rc, err = run_main("verify", str(src), "--reference", str(src), "--baseline", str(baseline))
        assert_refused(rc, err, "baseline.json", "nests deeper")


# ---------------------------------------------------------------------------------------------------------------
# 3. Regular expressions from untrusted JSON: bounded

# Exponential for Python's `re` on a 30-character module name (measured: still running after 10 s).
CATASTROPHIC = "(?:[a-z_.0-9]|[a-z_.0-9])*X"


def test_catastrophic_ignore_pattern_in_inspect_and_verify_ends_quickly(src, tmp_path, int4_export):
    folder = tmp_path / "int4"
    shutil.copytree(int4_export, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["ignore"] = ["lm_head", "re:" + CATASTROPHIC]
    (folder / "config.json").write_text(json.dumps(config))
    result = run_process("inspect", str(folder))
    assert_refused(result.returncode, result.stderr, "config.json", "pattern", "backtracking")
    # refused before transformers / compressed-tensors match it with `re` on reload (they have no time limit)
    result = run_process("verify", str(folder), "--reference", str(src))
    assert_refused(result.returncode, result.stderr, "config.json", "pattern", "backtracking")


def test_ignore_pattern_too_long_is_refused_by_inspect(src, tmp_path, int4_export):
    folder = tmp_path / "int4"
    shutil.copytree(int4_export, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["ignore"] = ["re:" + "a?" * 2000 + "a" * 2000]
    (folder / "config.json").write_text(json.dumps(config))
    result = run_process("inspect", str(folder))
    assert_refused(result.returncode, result.stderr, "config.json", "pattern", "limit")


def make_adapter_files(base: Path, folder: Path, config: dict, scale: float = 0.01, poison: bool = False) -> Path:
    """A LoRA adapter on q_proj of layer 0, written by hand (no peft needed): A [r, in], B [out, r]."""
    import torch
    from safetensors.torch import save_file

    header, _ = read_raw(base / SINGLE)
    out_features, in_features = header["model.layers.0.self_attn.q_proj.weight"]["shape"]
    r = config.get("r", 4)
    a = torch.full((r, in_features), scale)
    b = torch.full((out_features, r), scale)
    if poison:
        b[0, 0] = float("nan")
    folder.mkdir()
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b}, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 8,
                                                            **config}))
    return folder


def test_catastrophic_rank_pattern_key_in_merge_ends_quickly(src, tmp_path):
    adapter = make_adapter_files(src, tmp_path / "adapter", {"rank_pattern": {CATASTROPHIC: 4}})
    result = run_process("merge", "--base", str(src), "--lora", str(adapter), "--out", str(tmp_path / "m"),
                         "--quiet")
    assert_refused(result.returncode, result.stderr, "adapter_config.json", "rank_pattern", "backtracking")


# ---------------------------------------------------------------------------------------------------------------
# 4. Size-driven hangs


def test_a_billion_layers_in_config_is_refused_before_building_the_model(src, tmp_path):
    config = json.loads((src / "config.json").read_text())
    config.pop("layer_types", None)  # else transformers refuses the length mismatch before building anything
    config["num_hidden_layers"] = 10**9
    (src / "config.json").write_text(json.dumps(config))
    export_refused(src, tmp_path, "config.json", "num_hidden_layers", process=True)


def million_tensor_header(path: Path, count: int) -> None:
    header = {f"t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(count)}
    write_raw(path, header, b"\0" * count)


def test_a_header_with_a_million_tensors_is_refused_quickly_by_export_and_inspect(src, tmp_path):
    million_tensor_header(src / SINGLE, 10**6)
    export_refused(src, tmp_path, SINGLE, "tensors", process=True)
    result = run_process("inspect", str(src))
    assert result.returncode == 1 and "limit" in result.stdout and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# 5. Tracebacks on bad input


@pytest.mark.parametrize("size", ["1e400GB", "infGB", "nan", "9" * 5000])
def test_overflowing_max_shard_size_is_refused(size, src, tmp_path):
    rc, err = run_main("export", str(src), "--out", str(tmp_path / "out"), "--max-shard-size", size, "--quiet")
    assert_refused(rc, err, "--max-shard-size")


def test_huge_merge_weights_do_not_overflow(mini, tmp_path):
    rc, err = run_main("merge", "--models", str(mini), str(mini), "--weights", "1e308", "1e308", "--out",
                       str(tmp_path / "m"), "--quiet")
    assert rc == 0, err
    manifest = json.loads((tmp_path / "m" / "qexport.json").read_text())
    assert manifest["source"]["merge"]["weights"] == [0.5, 0.5]


@pytest.mark.parametrize("fmt", ["fp16", "int8", "int4"])
def test_float8_tensor_on_the_dense_path_exports_or_is_refused_in_one_line(fmt, src, tmp_path):
    """A float8 norm weight stays dense in every format, cast to the export's compute dtype like any float."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(src / SINGLE)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.float8_e4m3fn)
    save_file(tensors, src / SINGLE, metadata={"format": "pt"})
    out = tmp_path / "out"
    rc, err = run_main("export", str(src), "--out", str(out), "--formats", fmt, "--quiet")
    assert rc == 0, err
    assert manifest_problems(out / fmt) == []
    # The source is bf16: int8 / int4 keep bf16, the fp16 format is fp16.
    stored = json.loads((out / fmt / "qexport.json").read_text())["tensors"]["model.norm.weight"]["dtype"]
    assert stored == ("F16" if fmt == "fp16" else "BF16")


def test_zero_size_tensor_with_a_huge_dimension_is_refused(src, tmp_path):
    def mutate(header):
        header["model.extra"] = {"dtype": "F16", "shape": [0, 2**62], "data_offsets": [0, 0]}

    rewrite_header(src / SINGLE, mutate)
    export_refused(src, tmp_path, "model.extra", "2**40")


@pytest.mark.parametrize("field, value", [("alpha_pattern", "x"), ("alpha_pattern", None),
                                          ("rank_pattern", 0), ("rank_pattern", 2.5), ("r", "1e999")])
def test_unvalidated_lora_values_are_refused(field, value, src, tmp_path):
    config = {field: {"q_proj": value}} if field.endswith("pattern") else {}
    adapter = make_adapter_files(src, tmp_path / "adapter", config)
    if not field.endswith("pattern"):
        text = (adapter / "adapter_config.json").read_text().replace('"r": 4', '"r": 1e999')
        (adapter / "adapter_config.json").write_text(text)
    rc, err = run_main("merge", "--base", str(src), "--lora", str(adapter), "--out", str(tmp_path / "m"), "--quiet")
    assert_refused(rc, err, "adapter_config.json", field)


MALFORMED_QC = {
    "config_groups_a_list": lambda qc: qc.update(config_groups=[qc["config_groups"]["group_0"]]),
    "num_bits_a_list": lambda qc: qc["config_groups"]["group_0"]["weights"].update(num_bits=[4]),
    "num_bits_a_string": lambda qc: qc["config_groups"]["group_0"]["weights"].update(num_bits="4"),
    "targets_not_strings": lambda qc: qc["config_groups"]["group_0"].update(targets=[1, None, {"a": 1}]),
    "ignore_not_strings": lambda qc: qc.update(ignore=[7]),
    "weights_a_list": lambda qc: qc["config_groups"]["group_0"].update(weights=[1]),
}


@pytest.mark.parametrize("case", list(MALFORMED_QC))
def test_malformed_quantization_config_in_inspect_is_a_problem_not_a_traceback(case, int4_export, tmp_path):
    folder = tmp_path / "int4"
    shutil.copytree(int4_export, folder)
    config = json.loads((folder / "config.json").read_text())
    MALFORMED_QC[case](config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))
    rc, err = run_main("inspect", str(folder))
    assert rc == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("case", ["config_groups_a_list", "num_bits_a_list", "targets_not_strings"])
def test_malformed_quantization_config_in_verify_fails_a_check(case, int4_export, mini, tmp_path):
    folder = tmp_path / "int4"
    shutil.copytree(int4_export, folder)
    config = json.loads((folder / "config.json").read_text())
    MALFORMED_QC[case](config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))
    result = run_process("verify", str(folder), "--reference", str(mini))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_index_metadata_a_string_and_zero_size_scales_do_not_crash_inspect_or_verify(mini, build_model, tmp_path):
    sharded = build_model("qwen3", max_shard_size="200KB", **MINI)
    out = tmp_path / "out"
    assert run_main("export", str(sharded), "--out", str(out), "--formats", "int4", "--max-shard-size", "200KB",
                    "--quiet")[0] == 0
    folder = out / "int4"
    edit_json(folder / "model.safetensors.index.json", metadata="oops")
    rc, err = run_main("inspect", str(folder))
    assert rc in (0, 1) and "Traceback" not in err
    path = next(folder.glob("model-*.safetensors"))
    header, data = read_raw(path)
    name = next(n for n in header if n.endswith("weight_scale"))
    header[name]["shape"] = [0, header[name]["shape"][1]]
    write_raw(path, header, data)  # now also malformed bytes: every outcome must still be one of the promised
    rc, err = run_main("inspect", str(folder))
    assert rc in (0, 1) and "Traceback" not in err
    result = run_process("verify", str(folder), "--reference", str(sharded))
    assert result.returncode in (1, 2) and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_write_card_on_a_manifest_without_summary_is_refused(int4_export, mini, tmp_path):
    folder = tmp_path / "int4"
    shutil.copytree(int4_export, folder)
    manifest = json.loads((folder / "qexport.json").read_text())
    del manifest["summary"]
    (folder / "qexport.json").write_text(json.dumps(manifest))
    before = tree_sha256(folder)
    result = run_process("verify", str(folder), "--reference", str(mini), "--write-card")
    assert "Traceback" not in result.stderr and result.returncode in (1, 2)
    assert tree_sha256(folder) == before  # neither card nor manifest half-rewritten


def test_out_name_the_terminal_cannot_print_still_exits_0(mini, tmp_path):
    out = os.fsdecode(bytes(tmp_path) + b"/out-\xff")
    result = run_process("export", str(mini), "--out", out, "--formats", "int4", "--quiet",
                         env={"PYTHONIOENCODING": "ascii", "LC_ALL": "C"})
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------------------------
# 6. The input is never modified


def test_export_into_its_own_source_is_refused(src, tmp_path):
    before = tree_sha256(src)
    rc, err = run_main("export", str(src), "--out", str(src), "--formats", "int4", "--quiet")
    assert_refused(rc, err, "--out", "inside the input")
    assert tree_sha256(src) == before and sorted(p.name for p in src.iterdir()) == sorted(before)


def test_merge_into_a_folder_inside_the_base_is_refused(src, tmp_path):
    before = tree_sha256(src)
    rc, err = run_main("merge", "--models", str(src), str(src), "--out", str(src / "merged"), "--quiet")
    assert_refused(rc, err, "--out", "inside the input")
    assert tree_sha256(src) == before and not (src / "merged").exists()


def test_overwriting_the_export_that_is_the_source_is_refused(mini, tmp_path):
    out = tmp_path / "out"
    assert run_main("export", str(mini), "--out", str(out), "--formats", "fp16", "--quiet")[0] == 0
    before = tree_sha256(out)
    rc, err = run_main("export", str(out / "fp16"), "--out", str(out), "--formats", "fp16", "--overwrite", "--quiet")
    assert_refused(rc, err, "--out", "delete the input")
    assert tree_sha256(out) == before


# ---------------------------------------------------------------------------------------------------------------
# 7. Atomic: nothing half-written


def test_write_card_with_an_undecodable_reference_path_leaves_a_consistent_folder(mini, int4_export, tmp_path):
    folder = tmp_path / "int4"
    shutil.copytree(int4_export, folder)
    reference = Path(os.fsdecode(bytes(tmp_path) + b"/ref-\xff"))
    shutil.copytree(mini, reference)
    result = run_process("verify", str(folder), "--reference", str(reference), "--write-card")
    assert result.returncode in (0, 1) and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert manifest_problems(folder) == []
    card = (folder / "README.md").read_text(encoding="utf-8")  # valid UTF-8, complete
    assert "## Verification" in card and "## How to load" in card


SIGNAL_DRIVER = r"""
import os, signal, sys
import qexport.cli.main, qexport.io.safetensors_file as io
sig = getattr(signal, sys.argv[1])
signal.signal(sig, signal.SIG_DFL)  # as from a terminal: nohup (a CI launcher) ignores SIGHUP, which the CLI respects
add, calls = io.StreamWriter.add, [0]
def add_then_signal(self, *a, **k):
    calls[0] += 1
    add(self, *a, **k)
    if calls[0] == 3:
        os.kill(os.getpid(), sig)
io.StreamWriter.add = add_then_signal
sys.exit(qexport.cli.main.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_mid_write_leave_nothing_behind(sig, mini, tmp_path):
    out = tmp_path / "a" / "b" / "out"
    result = subprocess.run([sys.executable, "-c", SIGNAL_DRIVER, sig, "export", str(mini), "--out", str(out),
                             "--formats", "fp16", "int4", "--quiet"], capture_output=True, text=True,
                            timeout=SECONDS, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 128 + getattr(signal, sig), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "a").exists()  # no partial shards, no parents created by --out


def test_overwrite_onto_a_regular_file_leaves_no_temporary_file(mini, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "int4").write_text("a file where the export goes\n")
    rc, err = run_main("export", str(mini), "--out", str(out), "--formats", "int4", "--overwrite", "--quiet")
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["int4"]
    assert manifest_problems(out / "int4") == []


# ---------------------------------------------------------------------------------------------------------------
# 8. Concurrency


def test_two_exports_to_the_same_out_at_once_one_wins_one_is_refused(mini, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "qexport.cli.main", "export", str(mini), "--out", str(out), "--formats", "int4",
            "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = [subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT, env=env)
            for _ in range(2)]
    results = [(p.wait(timeout=SECONDS), p.stderr.read()) for p in runs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "already exists" in loser or "appeared while" in loser
    assert sorted(p.name for p in out.iterdir()) == ["int4"] and manifest_problems(out / "int4") == []


def test_a_live_runs_temporary_folder_is_not_removed_whatever_its_pid(mini, tmp_path):
    """A run in another PID namespace has a pid this one cannot see: the lock it holds is what protects it."""
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    live, dead = out / ".int4.qexport-tmp-999999", out / ".fp16.qexport-tmp-999998"
    live.mkdir()
    dead.mkdir()
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        rc, err = run_main("export", str(mini), "--out", str(out), "--formats", "fp16", "--quiet")
        assert rc == 0, err
        assert live.exists() and not dead.exists()
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------------
# 9. Wrong or missing verdicts


def test_config_with_fewer_layers_than_the_checkpoint_is_refused(src, tmp_path):
    config = json.loads((src / "config.json").read_text())
    edit_json(src / "config.json", num_hidden_layers=1,
              **({"layer_types": config["layer_types"][:1]} if "layer_types" in config else {}))
    export_refused(src, tmp_path, "model.layers.1.", "not part of")


def test_verify_refuses_a_pickle_export_before_transformers_loads_it(int4_export, mini, tmp_path):
    import pickle

    folder = tmp_path / "int4"
    shutil.copytree(int4_export, folder)
    marker = tmp_path / "UNPICKLED"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for p in folder.glob("*.safetensors"):
        p.unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Boom()}))
    rc, err = run_main("verify", str(folder), "--reference", str(mini))
    assert_refused(rc, err, "pytorch_model.bin", "pickle")
    assert not marker.exists()


def test_nan_in_an_adapter_is_blamed_on_the_adapter(src, tmp_path):
    adapter = make_adapter_files(src, tmp_path / "adapter", {}, poison=True)
    rc, err = run_main("merge", "--base", str(src), "--lora", str(adapter), "--out", str(tmp_path / "m"), "--quiet")
    line = assert_refused(rc, err, "adapter_model.safetensors", "NaN")
    assert "--allow-nonfinite" not in line and not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------------------------
# 10. Output hygiene


def test_card_escapes_names_so_no_line_can_be_forged_and_no_nul_is_written():
    from qexport.report.card import render_card

    evil = "x\n\n**PASSED** (forged)\n# Heading\x00`<script>|"
    manifest = {"format": "int4", "qexport_version": "0", "model_type": "qwen3",
                "parameters": {"weights": {"num_bits": 4, "strategy": "group", "group_size": 128,
                                           "symmetric": True}, "scheme": "W4A16"},
                "source": {}, "ignore": [evil], "dense_linears": {evil + ".weight": "why\n**PASSED**"},
                "files": [{"name": evil, "bytes": 1, "sha256": "0"}],
                "summary": {"total_bytes": 1, "weight_bytes": 1, "tensor_bytes": 1, "fp16_tensor_bytes": 1,
                            "ratio_vs_fp16": 1.0, "quantized_weights": 0, "quantized_bytes": 0,
                            "quantized_ratio_vs_fp16": None, "bits_per_quantized_weight": None},
                "tensors": {evil + ".weight": {"dtype": "F16", "shape": [1], "stored_bytes": 2, "quantized": False},
                            "a.weight": {"dtype": "F16", "shape": [1], "stored_bytes": 2, "quantized": False}}}
    verification = {"tool": "t", "reference": evil, "checks": [{"name": evil, "value": evil, "passed": False}]}
    text = render_card(manifest, {"quantization_config": {"format": "pack-quantized"}}, None, verification)
    assert "\x00" not in text and "<script>" not in text
    lines = text.splitlines()
    assert not any(line.startswith(("**PASSED**", "# Heading")) for line in lines)
    assert sum(line.startswith("**FAILED**") for line in lines) == 1


def test_a_very_long_error_is_one_short_line(src, tmp_path):
    long_name = "model." + "x" * 20_000 + ".weight"

    def mutate(header):
        header[long_name] = {"dtype": "F16", "shape": [0], "data_offsets": [0, 0]}

    rewrite_header(src / SINGLE, mutate)
    rc, err = run_main("export", str(src), "--out", str(tmp_path / "out"), "--quiet")
    assert_refused(rc, err, "model.safetensors", "not part of")


def test_inspect_of_the_filesystem_root_answers_quickly():
    result = run_process("inspect", "/")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "config.json: missing" in result.stdout and "ermission denied" not in result.stderr
