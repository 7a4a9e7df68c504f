"""No silent passes, and no invisible loosening (issue 14, items 4 and 5).

A NaN compares false with every bound, so a NaN threshold or a NaN metric would pass anything; a side file is only
right if its content is the reference's; a threshold someone loosened must show wherever the verdict does.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
from safetensors.torch import load_file, save_file

from qexport.errors import InputError
from qexport.verify.thresholds import parse_overrides, thresholds_for
from qexport.verify import CheckResult, _no_silent_pass, verify
from tests.support import verify_cli


def copy_without_manifest(tmp_path, good):
    """As another tool's export would be: no qexport.json, so the manifest's sha256 cannot catch anything."""
    folder = tmp_path / good.name
    shutil.copytree(good, folder)
    (folder / "qexport.json").unlink()
    return folder


def check(result, name):
    return next(c for c in result.checks if c.name == name)


# ---------------------------------------------------------------------------------------------------------------
# Thresholds: a finite number or none


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e999", "", "off", "x"])
def test_threshold_that_is_not_a_finite_number_or_none_is_bad_input(value):
    with pytest.raises(InputError, match="min_top1"):
        parse_overrides([f"min_top1={value}"])


def test_threshold_none_disables_the_bound():
    assert parse_overrides(["min_top1=none", "max_kld_mean=0.05"]) == {"min_top1": None, "max_kld_mean": 0.05}


def test_nan_threshold_through_the_python_api_is_bad_input():
    with pytest.raises(InputError, match="min_sqnr_db"):
        thresholds_for("int4", {"min_sqnr_db": float("nan")})


def test_nan_threshold_on_the_command_line_exits_2_naming_the_option(capsys, qwen3_src, qwen3_out):
    code, out = verify_cli(capsys, qwen3_out / "int4", "--reference", qwen3_src, "--threshold", "min_sqnr_db=nan")
    assert code == 2
    assert "--threshold" in out and "min_sqnr_db=nan" in out and "Traceback" not in out


def test_several_thresholds_after_one_option_as_the_readme_writes_them(capsys, tmp_path, qwen3_src, qwen3_out):
    # README: `--threshold NAME=VALUE ...`. Both values must take effect: 60 dB fails int4's ~19 dB SQNR.
    code, out = verify_cli(capsys, qwen3_out / "int4", "--reference", qwen3_src, "--json", tmp_path / "r.json",
                    "--threshold", "min_sqnr_db=60", "min_top1=none")
    assert code == 1
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["thresholds"]["min_sqnr_db"] == 60 and data["thresholds"]["min_top1"] is None


# ---------------------------------------------------------------------------------------------------------------
# NaN metrics


def test_a_nan_metric_fails_a_check_that_passed():
    result = _no_silent_pass(CheckResult("functional", True, "kld_mean nan, top1 1", {"kld_mean": float("nan"),
                                                                                       "top1": 1.0}),
                             thresholds_for("int8"))
    assert not result.passed and "kld_mean is NaN" in result.detail


def test_a_nan_inside_a_per_tensor_metric_fails_the_check():
    metrics = {"per_tensor_sqnr_db": {"a.weight": 40.0, "b.weight": float("nan")}}
    result = _no_silent_pass(CheckResult("weights_sqnr", True, "ok", metrics), thresholds_for("int8"))
    assert not result.passed and "per_tensor_sqnr_db.b.weight is NaN" in result.detail


def test_infinite_metric_beyond_its_bound_fails_but_exact_sqnr_passes():
    thresholds = thresholds_for("int8")
    kld = _no_silent_pass(CheckResult("functional", True, "ok", {"kld_mean": math.inf}), thresholds)
    exact = _no_silent_pass(CheckResult("weights_sqnr", True, "ok", {"sqnr_min_db": math.inf,
                                                                     "dense_sqnr_min_db": math.inf}), thresholds)
    assert not kld.passed
    assert exact.passed  # an exactly reproduced tensor has SQNR +inf: on the right side of a lower bound


@pytest.fixture(scope="module")
def nan_weight_export(tmp_path_factory, qwen3_src, export_model):
    """The issue's case: a source with one NaN in a Linear weight, exported with --allow-nonfinite (kept dense)."""
    src = tmp_path_factory.mktemp("nan-src") / "model"
    shutil.copytree(qwen3_src, src)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out, _ = export_model(src, formats=("int8",), allow_nonfinite=True)
    return src, out / "int8"


def test_export_of_a_source_holding_nan_cannot_pass(nan_weight_export):
    src, export = nan_weight_export
    result = verify(export, src)
    assert not result.passed
    failed = {c.name for c in result.failures}
    assert {"weights_sqnr", "functional", "finite_outputs"} <= failed
    assert "model.layers.0.mlp.down_proj.weight" in check(result, "weights_sqnr").detail
    assert "NaN" in check(result, "functional").detail


def test_nan_thresholds_cannot_turn_the_bounds_off_either(capsys, nan_weight_export):
    src, export = nan_weight_export
    code, out = verify_cli(capsys, export, "--reference", src, "--threshold", "min_top1=nan", "max_kld_mean=nan")
    assert code == 2


# ---------------------------------------------------------------------------------------------------------------
# Side files by content, config NaN-equal


def test_generation_config_changed_after_export_fails_side_files_without_a_manifest(tmp_path, qwen3_src, qwen3_out):
    folder = copy_without_manifest(tmp_path, qwen3_out / "int8")
    path = folder / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "max_new_tokens": 4096}))
    side = check(verify(folder, qwen3_src, only=["side_files"]), "side_files")
    assert not side.passed and "generation_config.json" in side.detail


def test_generation_config_reserialised_by_another_tool_passes_side_files(tmp_path, qwen3_src, qwen3_out):
    # Another tool's save_pretrained rewrites the file with its own transformers_version and layout: same content.
    folder = copy_without_manifest(tmp_path, qwen3_out / "int8")
    path = folder / "generation_config.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "transformers_version": "0.0.1"}, indent=4, sort_keys=True))
    assert check(verify(folder, qwen3_src, only=["side_files"]), "side_files").passed


def test_readme_may_differ_from_the_reference(tmp_path, qwen3_src, qwen3_out):
    reference = tmp_path / "src"
    shutil.copytree(qwen3_src, reference)
    (reference / "README.md").write_text("# The source model\n")
    folder = copy_without_manifest(tmp_path, qwen3_out / "int8")
    (folder / "README.md").write_text("# Another tool's model card\n")
    side = check(verify(folder, reference, only=["side_files"]), "side_files")
    assert side.passed and side.metrics["allowed_to_differ"] == ["README.md"]


def test_config_holding_a_nan_literal_passes_config_keys_when_exported_faithfully(tmp_path, qwen3_src,
                                                                                   export_model):
    src = tmp_path / "src"
    shutil.copytree(qwen3_src, src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "router_aux_loss_coef": float("nan")}))
    assert "NaN" in (src / "config.json").read_text()
    out, _ = export_model(src, formats=("int8",))
    assert "NaN" in (out / "int8" / "config.json").read_text()
    keys = check(verify(out / "int8", src, only=["config_keys"]), "config_keys")
    assert keys.passed, keys.detail


# ---------------------------------------------------------------------------------------------------------------
# Visible thresholds


def test_disabled_threshold_is_visible_in_card_json_html_and_baseline(capsys, tmp_path, qwen3_src, qwen3_out):
    folder = tmp_path / "int8"
    shutil.copytree(qwen3_out / "int8", folder)
    code, out = verify_cli(capsys, folder, "--reference", qwen3_src, "--write-card", "--json", tmp_path / "r.json",
                    "--report", tmp_path / "r.html", "--save-baseline", tmp_path / "b.json",
                    "--threshold", "min_top1=none", "max_kld_mean=0.05")
    assert code == 0, out
    disabled, loosened = "min_top1: disabled (default 0.9)", "max_kld_mean 0.05: loosened (default 0.01)"
    assert disabled in out and loosened in out  # terminal
    card = (folder / "README.md").read_text()
    assert disabled in card and loosened in card
    assert "**PASSED** (" not in card  # never a plain PASSED under a loosened gate
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["thresholds_changed"] == [loosened, disabled]
    functional = next(c for c in data["checks"] if c["name"] == "functional")
    assert {e["name"]: e["status"] for e in functional["thresholds"]} == {
        "max_kld_mean": "loosened", "max_kld_p99": "default", "min_top1": "disabled"}
    assert disabled in (tmp_path / "r.html").read_text()
    assert json.loads((tmp_path / "b.json").read_text())["thresholds_changed"] == [loosened, disabled]


def test_card_of_a_default_verification_shows_each_checks_threshold(capsys, tmp_path, qwen3_src, qwen3_out):
    folder = tmp_path / "int4"
    shutil.copytree(qwen3_out / "int4", folder)
    code, out = verify_cli(capsys, folder, "--reference", qwen3_src, "--write-card")
    assert code == 0, out
    card = (folder / "README.md").read_text()
    assert "**PASSED** (" in card
    assert "min_sqnr_db 13" in card and "max_kld_vs_rtn 1.5" in card


def test_histogram_has_axis_labels_and_a_threshold_marker():
    from qexport.report.html import svg_histogram

    svg = svg_histogram([18.5, 19.0, 19.2], threshold=13.0)
    assert "SQNR (dB)" in svg and "tensors" in svg and "threshold 13" in svg
    assert ">13.0<" in svg  # the axis stretches to include the threshold

