"""The command line as a user and a CI script see it: real processes, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qexport.io.sizes import parse_size


def qexport(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "qexport.cli.main", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_export_writes_one_folder_per_format_and_prints_a_table(qwen3_src, tmp_path):
    result = qexport("export", qwen3_src, "--out", tmp_path / "out", "--formats", "int8", "int4")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["int4", "int8"]
    assert "| int4" in result.stdout and "bits / q-weight" in result.stdout


def test_export_shows_a_progress_bar_of_tensors_on_stderr(qwen3_src, tmp_path):
    result = qexport("export", qwen3_src, "--out", tmp_path / "out", "--formats", "int4", "--progress")
    assert result.returncode == 0, result.stderr
    tensors = json.loads((tmp_path / "out" / "int4" / "qexport.json").read_text())["tensors"]
    total = len({info["source"] for info in tensors.values()})  # the bar counts source tensors
    assert "export int4" in result.stderr and f"{total}/{total}" in result.stderr


def test_max_shard_size_option_shards_the_output(qwen3_src, tmp_path):
    result = qexport("export", qwen3_src, "--out", tmp_path / "out", "--formats", "fp16", "--max-shard-size", "1MB",
                     "--quiet")
    assert result.returncode == 0, result.stderr
    shards = sorted(p.name for p in (tmp_path / "out" / "fp16").glob("*.safetensors"))
    assert len(shards) >= 4 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert (tmp_path / "out" / "fp16" / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("args,names", [
    (["--formats", "int3"], "int3"),
    (["--max-shard-size", "lots"], "--max-shard-size"),
    (["--group-size", "100"], "--group-size"),
    (["--workers", "0"], "--workers"),
    (["--int4-method", "gptq"], "--int4-method"),
])
def test_bad_option_exits_2_with_one_line_naming_it(qwen3_src, tmp_path, args, names):
    result = qexport("export", qwen3_src, "--out", tmp_path / "out", *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and names in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_model_type_exits_2_naming_it(qwen3_src, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for p in qwen3_src.iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "qwen99"
    (src / "config.json").write_text(json.dumps(config))
    result = qexport("export", src, "--out", tmp_path / "out")
    assert result.returncode == 2 and "qwen99" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_missing_subcommand_is_a_usage_error_exit_2():
    result = qexport()
    assert result.returncode == 2 and result.stderr.count("\n") == 1


def test_help_lists_the_commands():
    result = qexport("--help")
    assert result.returncode == 0 and "export" in result.stdout and "demo" in result.stdout


@pytest.mark.parametrize("text,expected", [
    ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("400KB", 400_000), ("2GiB", 2 * 2**30), ("1234", 1234),
])
def test_sizes_are_read_like_transformers_max_shard_size(text, expected):
    assert parse_size(text) == expected
