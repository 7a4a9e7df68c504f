"""The pytest plugin: `pytest --qexport-model PATH` as a CI gate, and the report hooks (HTML summary, JSON, xdist)."""

from __future__ import annotations

import json

from qexport.verify import CHECK_NAMES

# The gate's items for a causal LM: every check that applies to it (sentence-transformers only has items for folders
# with modules.json).
QWEN3_CHECKS = [c for c in CHECK_NAMES if c != "engine_sentence_transformers"]

pytest_plugins = ["pytester"]

RECORDING_TESTS = """
import os
import pytest

@pytest.mark.parametrize("model", ["m0", "m1", "m2", "m3"])
def test_records(qexport_report, model):
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    qexport_report.metrics(sqnr_db=19.5, threshold_db=13.0)
    qexport_report.row(model, "int4", quantized_ratio=3.878, sqnr_values=[18.0, 19.0, 19.5], worker=worker)
"""


def test_gate_runs_every_check_and_passes_on_a_good_model(pytester, qwen3_src):
    result = pytester.runpytest(f"--qexport-model={qwen3_src}", "--qexport-formats", "int8", "-p",
                                "no:cacheprovider")
    result.assert_outcomes(passed=len(QWEN3_CHECKS))
    assert result.ret == 0


def test_gate_threshold_from_command_line_fails_the_named_check(pytester, qwen3_src):
    # int8 measures ~42 dB on this model: a 60 dB floor must fail the SQNR item and nothing else.
    result = pytester.runpytest(f"--qexport-model={qwen3_src}", "--qexport-formats", "int8",
                                "--qexport-threshold", "min_sqnr_db=60", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=len(QWEN3_CHECKS) - 1, failed=1)
    result.stdout.fnmatch_lines(["*qexport[[]int8[]]::weights_sqnr*", "*below 60.0 dB*"])


def test_gate_thresholds_from_ini(pytester, qwen3_src):
    pytester.makeini("[pytest]\nqexport_formats = int4\nqexport_thresholds =\n    max_kld_mean=1e-9\n")
    result = pytester.runpytest(f"--qexport-model={qwen3_src}", "-k", "functional and not rtn", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=0, failed=1)
    n = len(QWEN3_CHECKS)
    result.stdout.fnmatch_lines([f"collected {n} items / {n - 1} deselected / 1 selected",
                                 "*qexport int4 functional: reloaded model (*)*: kld_mean * > 1e-09*"])


def test_gate_unknown_format_is_a_usage_error(pytester, qwen3_src):
    result = pytester.runpytest(f"--qexport-model={qwen3_src}", "--qexport-formats", "int3")
    assert result.ret == 4  # pytest's usage-error exit code
    result.stderr.fnmatch_lines(["*unknown format 'int3'*"])


def test_plugin_adds_no_tests_without_a_model(pytester):
    pytester.makepyfile("def test_one():\n    assert True\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "qexport[" not in result.stdout.str()


def test_html_report_holds_summary_table_and_per_test_metrics(pytester):
    pytester.makepyfile(RECORDING_TESTS)
    result = pytester.runpytest("--html=r.html", "--self-contained-html", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    page = (pytester.path / "r.html").read_text()
    assert "qexport summary (model x format)" in page
    assert "ratio (quantized)" in page and "3.878" in page
    assert "<svg" in page  # per-tensor SQNR histogram
    assert "threshold_db" in page  # per-test extras
    data = json.loads((pytester.path / "r.json").read_text())
    assert sorted(r["model"] for r in data["rows"]) == ["m0", "m1", "m2", "m3"]
    assert all(m["sqnr_db"] == 19.5 for m in data["tests"].values())


def test_summary_holds_rows_from_every_xdist_worker(pytester):
    pytester.makepyfile(RECORDING_TESTS)
    result = pytester.runpytest_subprocess("-n", "2", "--html=r.html", "--self-contained-html", "-p",
                                           "no:cacheprovider")
    result.assert_outcomes(passed=4)
    rows = json.loads((pytester.path / "r.json").read_text())["rows"]
    assert sorted(r["model"] for r in rows) == ["m0", "m1", "m2", "m3"]
    assert {r["worker"] for r in rows} == {"gw0", "gw1"}
    page = (pytester.path / "r.html").read_text()
    assert all(f">{m}<" in page for m in ("m0", "m1", "m2", "m3"))


def test_gate_records_a_disabled_threshold_in_its_json_and_html(pytester, qwen3_src):
    result = pytester.runpytest(f"--qexport-model={qwen3_src}", "--qexport-formats", "int8",
                                "--qexport-threshold=min_top1=none", "-k", "functional and not rtn", "--html=r.html",
                                "--self-contained-html", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    data = json.loads((pytester.path / "r.json").read_text())
    assert [r["thresholds"] for r in data["rows"]] == ["min_top1: disabled (default 0.9)"]
    (functional,) = data["tests"].values()
    assert "min_top1: disabled (default 0.9)" in functional["thresholds"]
    assert "max_kld_mean 0.01" in functional["thresholds"]  # the defaults it used are shown too
    assert "min_top1: disabled (default 0.9)" in (pytester.path / "r.html").read_text()


def test_gate_nan_threshold_is_a_usage_error(pytester, qwen3_src):
    result = pytester.runpytest(f"--qexport-model={qwen3_src}", "--qexport-threshold=min_top1=nan")
    assert result.ret == 4  # pytest's usage-error exit code
    result.stderr.fnmatch_lines(["*--qexport-threshold*min_top1=nan*not a finite number*"])


def test_gate_infinite_threshold_in_ini_is_a_usage_error(pytester, qwen3_src):
    pytester.makeini("[pytest]\nqexport_thresholds =\n    max_kld_mean=inf\n")
    result = pytester.runpytest(f"--qexport-model={qwen3_src}")
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*qexport_thresholds*max_kld_mean=inf*not a finite number*"])
