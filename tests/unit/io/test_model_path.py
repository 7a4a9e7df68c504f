"""How users name a source model: a folder, the Hugging Face cache root of a model (`models--OWNER--NAME`) or its hub
id (`OWNER/NAME`) when it is in the local cache -- found offline, never downloaded -- else an error that says which
path to pass. Paths are checked before torch is imported: a typo is reported at once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qexport.errors import InputError
from qexport.io.model_path import resolve_model

REVISION = "0123456789abcdef0123456789abcdef01234567"

pytest_plugins = ["pytester"]


def fake_hub_cache(root: Path, model: Path, repo_id: str = "Org/Tiny", ref: bool = True,
                   revisions=(REVISION,)) -> Path:
    """A Hugging Face cache laid out as huggingface_hub writes it: blobs/<hash>, snapshots/<rev>/<file> linking to
    its blob, refs/main naming the revision. Returns the cache root of the model (models--Org--Tiny)."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    for revision in revisions:
        snapshot = repo / "snapshots" / revision
        snapshot.mkdir(parents=True)
        for file in model.iterdir():
            blob = repo / "blobs" / f"{revision[:8]}-{file.name}"
            shutil.copyfile(file, blob)
            (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    if ref:
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(revisions[0])
    return repo


@pytest.fixture
def hub_cache(tmp_path, qwen3_src, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = fake_hub_cache(cache, qwen3_src)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read when snapshot_download is called
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache, repo


def test_a_folder_is_taken_as_given(qwen3_src):
    assert resolve_model(str(qwen3_src)) == qwen3_src


def test_a_hub_id_in_the_local_cache_is_its_main_snapshot(hub_cache):
    _, repo = hub_cache
    assert resolve_model("Org/Tiny") == repo / "snapshots" / REVISION


def test_a_cache_root_is_the_snapshot_its_main_ref_names(hub_cache):
    _, repo = hub_cache
    assert resolve_model(str(repo)) == repo / "snapshots" / REVISION


def test_a_cache_root_without_a_ref_is_its_only_snapshot(tmp_path, qwen3_src):
    repo = fake_hub_cache(tmp_path / "hub", qwen3_src, ref=False)
    assert resolve_model(str(repo)) == repo / "snapshots" / REVISION


def test_a_cache_root_without_a_ref_and_several_snapshots_says_which_path_to_pass(tmp_path, qwen3_src):
    repo = fake_hub_cache(tmp_path / "hub", qwen3_src, ref=False, revisions=("a" * 40, "b" * 40))
    with pytest.raises(InputError, match=r"no refs/main and 2 snapshots .*pass one of them, .*/snapshots/<revision>"):
        resolve_model(str(repo))


def test_a_hub_id_not_in_the_cache_says_which_path_to_pass(hub_cache):
    cache, _ = hub_cache
    with pytest.raises(InputError) as error:
        resolve_model("Org/Missing")
    message = str(error.value)
    assert message.startswith("Org/Missing: not a folder, nor a model in the local Hugging Face cache")
    assert str(cache) in message and "models--Org--Missing/snapshots/<revision>" in message


def test_a_missing_path_that_is_no_hub_id_is_not_a_folder(tmp_path):
    with pytest.raises(InputError, match=r"nowhere/at/all: not a folder$"):
        resolve_model(str(tmp_path / "nowhere" / "at" / "all"))


def _cli(*argv, env_extra=None, cwd=None) -> subprocess.CompletedProcess:
    """`qexport ARGV` in a fresh interpreter; prints whether torch was imported as its last stdout line."""
    code = ("import sys\nfrom qexport.cli.main import main\ncode = main(sys.argv[1:])\n"
            "print('torch imported:', 'torch' in sys.modules)\nsys.exit(code)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def test_export_takes_a_hub_id_from_the_local_cache(tmp_path, qwen3_src):
    cache = tmp_path / "hub"
    fake_hub_cache(cache, qwen3_src)
    run = _cli("export", "Org/Tiny", "--out", tmp_path / "out", "--formats", "int8", "--quiet",
               env_extra={"HF_HUB_CACHE": str(cache)}, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out" / "int8" / "config.json").is_file()


def test_export_of_a_hub_id_missing_from_the_cache_exits_2_naming_the_path_to_pass(tmp_path):
    run = _cli("export", "Org/Missing", "--out", tmp_path / "out", env_extra={"HF_HUB_CACHE": str(tmp_path / "hub")},
               cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.startswith("qexport: error: Org/Missing: not a folder, nor a model in the local Hugging Face")
    assert "Traceback" not in run.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [
    ("export", "{missing}", "--out", "{tmp}/out"),
    ("merge", "--models", "{missing}", "{missing}", "--out", "{tmp}/out"),
    ("verify", "{missing}", "--reference", "{missing}"),
    ("verify", "{tmp}", "--reference", "{missing}"),
], ids=["export", "merge", "verify-export", "verify-reference"])
def test_a_missing_path_exits_2_before_torch_is_imported(argv, tmp_path):
    missing = tmp_path / "no-such-model"
    run = _cli(*(a.format(missing=missing, tmp=tmp_path) for a in argv))
    assert run.returncode == 2
    assert f"{missing}" in run.stderr and "not a folder" in run.stderr
    assert run.stdout.strip().splitlines()[-1] == "torch imported: False"


def test_a_bad_format_beside_a_missing_path_is_still_reported_first(tmp_path, capsys):
    from qexport.cli.main import main

    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "--formats", "int3"]) == 2
    assert "--formats: unknown format 'int3'" in capsys.readouterr().err


def test_the_gate_takes_a_cache_root_as_its_model(pytester, hub_cache):
    _, repo = hub_cache
    result = pytester.runpytest(f"--qexport-model={repo}", "--qexport-formats", "int8", "-k", "model_type",
                                "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
