"""Bad input through the real command line: exit 2, one line naming the file / tensor / key and the problem,
no traceback, no output folder left behind, the input byte-identical (sha256 of every file) before and after.

The malformed-input recipes live in fixtures/bad_inputs.py; each breaks a copy of a good tiny model one way.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.bad_inputs import LINEAR, RECIPES, UNPICKLED_MARKER, manifest_problems, nan_in_norm, nan_in_weight, \
    tree_sha256
from qexport.model.architecture import inspect_architecture
from qexport.io.checkpoint import load_config
from qexport.cli.main import main


@pytest.fixture
def good_models(qwen3_src, llama_sharded_src):
    return {"single": qwen3_src, "sharded": llama_sharded_src}


def broken_copy(good: Path, recipe, tmp_path: Path) -> Path:
    src = tmp_path / "model"
    shutil.copytree(good, src)
    recipe(src)
    return src


def assert_refused(rc: int, stderr: str, expected: list[str], out: Path, tmp_path: Path) -> str:
    """Exit 2, exactly one line 'qexport: error: ...' containing every expected part, no traceback, no OUT."""
    assert rc == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qexport: error: "), stderr
    message = lines[0].replace(str(tmp_path), "<tmp>")  # the words must come from the message, not the test's path
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    return lines[0]


@pytest.mark.parametrize("name", list(RECIPES))
def test_bad_input_is_refused_with_one_line_and_the_input_untouched(name, good_models, tmp_path, capsys):
    recipe, base, expected = RECIPES[name]
    src = broken_copy(good_models[base], recipe, tmp_path)
    before = tree_sha256(tmp_path)
    out = tmp_path / "out"
    rc = main(["export", str(src), "--out", str(out), "--quiet"])
    assert_refused(rc, capsys.readouterr().err, expected, out, tmp_path)
    assert tree_sha256(tmp_path) == before
    assert not (tmp_path / UNPICKLED_MARKER).exists()


# A few recipes again through a real process (`python -m qexport.cli.main`): what a CI script sees.
@pytest.mark.parametrize("name", ["truncated_file", "index_escapes_folder", "pickle_checkpoint"])
def test_bad_input_is_refused_by_the_real_process(name, good_models, tmp_path):
    recipe, base, expected = RECIPES[name]
    src = broken_copy(good_models[base], recipe, tmp_path)
    before = tree_sha256(tmp_path)
    out = tmp_path / "nested" / "out"  # parents that --out would create must not be left behind either
    result = subprocess.run([sys.executable, "-m", "qexport.cli.main", "export", str(src), "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert_refused(result.returncode, result.stderr, expected, out, tmp_path)
    assert not out.parent.exists()
    assert tree_sha256(tmp_path) == before
    assert not (tmp_path / UNPICKLED_MARKER).exists()


def test_nan_during_writing_leaves_no_created_parent_folders(good_models, tmp_path, capsys):
    """NaN is found while streaming, after shards were written to the temporary folder: all of it goes."""
    src = broken_copy(good_models["single"], nan_in_weight, tmp_path)
    out = tmp_path / "a" / "b" / "out"
    rc = main(["export", str(src), "--out", str(out), "--quiet", "--formats", "fp16", "int4"])
    assert_refused(rc, capsys.readouterr().err, [LINEAR, "NaN"], out, tmp_path)
    assert not (tmp_path / "a").exists()


def test_allow_nonfinite_keeps_the_weight_dense_and_the_export_reloads(good_models, tmp_path, capsys):
    from qexport.verify.functional import load_model

    src = broken_copy(good_models["single"], nan_in_weight, tmp_path)
    nan_in_norm(src)  # a non-Linear tensor with NaN is stored as it is (it is dense anyway)
    out = tmp_path / "out"
    rc = main(["export", str(src), "--out", str(out), "--quiet", "--formats", "fp16", "int8", "int4",
               "--allow-nonfinite"])
    assert rc == 0, capsys.readouterr().err
    module = LINEAR.removesuffix(".weight")
    for fmt in ("int8", "int4"):
        folder = out / fmt
        assert manifest_problems(folder) == []
        manifest = json.loads((folder / "qexport.json").read_text())
        assert manifest["tensors"][LINEAR]["dtype"] == "BF16" and not manifest["tensors"][LINEAR]["quantized"]
        assert LINEAR in manifest["dense_linears"]
        config = json.loads((folder / "config.json").read_text())
        assert module in config["quantization_config"]["ignore"]
        # every other Linear is still quantized: only the poisoned one stayed dense
        quantized = {t["source"] for t in manifest["tensors"].values() if t["quantized"]}
        linears = inspect_architecture(load_config(src)).linear_weights - {"lm_head.weight"}
        assert quantized == linears - {LINEAR}
    model, info = load_model(out / "int4")
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    assert model.get_submodule(module).weight.isnan().sum() == 1  # the recipe sets exactly one element


def test_output_folder_that_exists_is_refused_without_overwrite_and_left_as_it_was(qwen3_src, export_model,
                                                                                    capsys):
    out, _ = export_model(qwen3_src)
    before = tree_sha256(out)
    rc = main(["export", str(qwen3_src), "--out", str(out), "--quiet"])
    line = capsys.readouterr().err.strip()
    assert rc == 2 and line.startswith("qexport: error: --out") and "already exists" in line and "--overwrite" in line
    assert tree_sha256(out) == before


def test_output_under_a_regular_file_is_refused(qwen3_src, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "out"
    rc = main(["export", str(qwen3_src), "--out", str(out), "--quiet"])
    assert_refused(rc, capsys.readouterr().err, ["--out", "file", "not a folder"], out, tmp_path)


def test_output_folder_not_writable_is_refused_even_as_root(qwen3_src, tmp_path, capsys):
    """Root passes os.access on anything; an immutable folder (chattr +i) refuses even root. The export probes by
    creating a folder, which is what the real writes would do."""
    locked = tmp_path / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available on this filesystem: cannot make a folder read-only for root")
    try:
        out = locked / "out"
        rc = main(["export", str(qwen3_src), "--out", str(out), "--quiet"])
        assert_refused(rc, capsys.readouterr().err, ["--out", "<tmp>/locked", "cannot create"], out, tmp_path)
        assert list(locked.iterdir()) == []  # not even the probe stays
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
