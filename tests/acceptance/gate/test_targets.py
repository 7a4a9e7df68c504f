"""The CI gate at scale: gating existing exports, keeping the gate's export, gate-only runs, one export shared by
every xdist worker."""

from __future__ import annotations

import json

from qexport.verify import CHECK_NAMES

# A causal LM without modules.json: every check but engine_sentence_transformers has an item.
QWEN3_CHECKS = [c for c in CHECK_NAMES if c != "engine_sentence_transformers"]

pytest_plugins = ["pytester"]

# Cheap checks (no model load): enough to prove which targets and items a run has.
QUICK = "model_type or tensor_names or bytes"

# Counts every export the gate makes, whichever process makes it: one line per call, "<format> <worker>".
COUNTING_CONFTEST = """
import os
import qexport.export.pipeline as export

_real = export.export_folder

def _counting(src, out, options):
    with open(os.path.join(os.path.dirname(__file__), "exports.log"), "a") as log:
        log.write(f"{' '.join(options.formats)} {os.environ.get('PYTEST_XDIST_WORKER', 'main')}\\n")
    return _real(src, out, options)

export.export_folder = _counting
"""


def test_gate_checks_an_existing_export_folder(pytester, qwen3_src, export_model):
    out, _ = export_model(qwen3_src, formats=("int8",))
    result = pytester.runpytest(f"--qexport-export={out / 'int8'}", f"--qexport-reference={qwen3_src}", "-p",
                                "no:cacheprovider")
    result.assert_outcomes(passed=len(QWEN3_CHECKS))
    result.stdout.fnmatch_lines(["qexport[[]int8[]] *"])


def test_gate_given_an_out_folder_checks_each_format_folder_in_it(pytester, qwen3_src, export_model):
    out, _ = export_model(qwen3_src, formats=("int8", "int4"))
    result = pytester.runpytest(f"--qexport-export={out}", f"--qexport-reference={qwen3_src}", "-k", QUICK,
                                "--collect-only", "-q", "-p", "no:cacheprovider")
    listed = [line for line in result.stdout.lines if line.startswith("qexport[")]
    assert sorted(listed) == sorted(f"qexport[{f}]::{c}" for f in ("int4", "int8")
                                    for c in ("model_type", "tensor_names", "bytes"))


def test_gate_fails_an_existing_export_checked_against_the_wrong_reference(pytester, qwen3_src, llama_sharded_src,
                                                                         export_model):
    out, _ = export_model(qwen3_src, formats=("int8",))
    result = pytester.runpytest(f"--qexport-export={out / 'int8'}", f"--qexport-reference={llama_sharded_src}",
                                "-k", "model_type or tensor_names", "-p", "no:cacheprovider")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*qexport int8 *"])


def test_gate_export_without_reference_is_a_usage_error(pytester, qwen3_src, export_model):
    out, _ = export_model(qwen3_src, formats=("int8",))
    result = pytester.runpytest(f"--qexport-export={out / 'int8'}")
    assert result.ret == 4  # pytest's usage-error exit code
    result.stderr.fnmatch_lines(["*--qexport-export needs --qexport-reference*"])


def test_gate_export_of_a_folder_that_holds_no_model_is_a_usage_error(pytester, qwen3_src):
    empty = pytester.mkdir("empty")
    result = pytester.runpytest(f"--qexport-export={empty}", f"--qexport-reference={qwen3_src}")
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*--qexport-export *empty: not a model folder*"])


def test_gate_keeps_its_export_in_the_keep_folder(pytester, qwen3_src):
    keep = pytester.path / "kept"
    result = pytester.runpytest(f"--qexport-model={qwen3_src}", "--qexport-formats", "int8",
                                f"--qexport-keep={keep}", "-k", QUICK, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    assert (keep / "int8" / "config.json").is_file() and (keep / "int8" / "qexport.json").is_file()
    # A second gate replaces its own earlier export instead of refusing the existing folder.
    again = pytester.runpytest(f"--qexport-model={qwen3_src}", "--qexport-formats", "int8",
                               f"--qexport-keep={keep}", "-k", QUICK, "-p", "no:cacheprovider")
    again.assert_outcomes(passed=3)
    # What was kept is gated as an existing export with the same outcome.
    kept = pytester.runpytest(f"--qexport-export={keep / 'int8'}", f"--qexport-reference={qwen3_src}", "-k", QUICK,
                              "-p", "no:cacheprovider")
    kept.assert_outcomes(passed=3)


def test_gate_only_neither_collects_nor_runs_the_folders_own_tests(pytester, qwen3_src):
    # Importing this file would be a collection error; running its test a failure.
    pytester.makepyfile(test_own="raise RuntimeError('the project suite was collected')\n"
                                 "def test_own():\n    assert False\n")
    result = pytester.runpytest(f"--qexport-model={qwen3_src}", "--qexport-formats", "int8", "--qexport-only", "-k",
                                QUICK, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    assert "test_own" not in result.stdout.str()
    assert result.ret == 0


def test_gate_without_only_still_runs_the_folders_own_tests(pytester, qwen3_src):
    pytester.makepyfile(test_own="def test_own():\n    assert True\n")
    result = pytester.runpytest(f"--qexport-model={qwen3_src}", "--qexport-formats", "int8", "-k",
                                f"own or {QUICK}", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)


def test_gate_only_without_a_gate_is_a_usage_error(pytester):
    result = pytester.runpytest("--qexport-only")
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*--qexport-only runs the gate alone*"])


def test_gate_under_xdist_exports_each_format_once_and_reports_every_row(pytester, qwen3_src):
    pytester.makeconftest(COUNTING_CONFTEST)
    result = pytester.runpytest_subprocess("-n", "2", f"--qexport-model={qwen3_src}", "--qexport-formats", "int8",
                                           "int4", "--qexport-json=r.json", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2 * len(QWEN3_CHECKS))
    made = (pytester.path / "exports.log").read_text().split("\n")[:-1]
    assert sorted(line.split()[0] for line in made) == ["int4", "int8"]
    data = json.loads((pytester.path / "r.json").read_text())
    rows = {r["format"]: r for r in data["rows"]}
    assert sorted(rows) == ["int4", "int8"]
    for row in rows.values():  # parts recorded by items of every check, merged: the row is complete
        assert row["passed"] is True and row["reload_ok"] is True
        assert row["sqnr_min_db"] > 0 and row["kld_mean"] >= 0 and row["quantized_ratio"] > 1
    # Every item of one format ran on the worker that exported it (xdist loadgroup: one group per format).
    by_format: dict[str, set] = {}
    for nodeid, metrics in data["tests"].items():
        by_format.setdefault(nodeid.split("]")[0], set()).add(metrics["exported_by"])
    assert all(len(workers) == 1 for workers in by_format.values()), by_format


def test_gate_export_is_made_once_even_when_every_worker_runs_every_item(pytester, qwen3_src):
    pytester.makeconftest(COUNTING_CONFTEST)
    # --dist each: both workers run all items of the format, so both need its export.
    result = pytester.runpytest_subprocess("-n", "2", "--dist", "each", f"--qexport-model={qwen3_src}",
                                           "--qexport-formats", "int8", "-k", QUICK, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2 * 3)
    made = (pytester.path / "exports.log").read_text().split("\n")[:-1]
    assert len(made) == 1 and made[0].startswith("int8 gw"), made
