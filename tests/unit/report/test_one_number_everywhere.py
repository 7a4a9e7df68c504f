"""One definition of each size number and one formatter: the export table, the demo, `inspect`, `verify`, the
gate, the model card and baseline messages show the same value for the same folder, written the same way."""

from __future__ import annotations

import pytest

from qexport.cli.main import main
from qexport.report.inspection import format_report, inspect_folder
from qexport.report.terminal import export_rows, table
from qexport.report.values import format_value
from qexport.verify import check_baseline, verify


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_ratio_vs_fp16_is_one_number_in_manifest_inspect_and_verify(export_model, qwen3_src, fmt):
    out, manifests = export_model(qwen3_src)
    summary = manifests[fmt]["summary"]
    totals = inspect_folder(out / fmt)["totals"]
    metrics = verify(out / fmt, qwen3_src, only=["bytes"]).metrics
    # Equal floats, not "close": every caller goes through qexport.io.sizes.size_summary.
    assert summary["ratio_vs_fp16"] == totals["ratio_vs_fp16"] == metrics["file_ratio"]
    assert summary["quantized_ratio_vs_fp16"] == totals["quantized_ratio_vs_fp16"] == metrics["quantized_ratio"]
    assert summary["weight_bytes"] == totals["weight_file_bytes"] == metrics["weight_bytes"]


def test_export_table_verify_line_inspect_and_card_print_the_same_ratio(export_model, qwen3_src, capsys):
    out, manifests = export_model(qwen3_src)
    shown = format_value(manifests["int4"]["summary"]["ratio_vs_fp16"])  # e.g. 2.253
    assert f"| {shown} " in table(export_rows(manifests))
    assert f"whole model {shown}x" in format_report(inspect_folder(out / "int4"))
    assert f"whole model {shown}x vs fp16" in verify(out / "int4", qwen3_src, only=["bytes"]).checks[0].detail
    assert f"| ratio vs fp16, whole model | {shown}× |" in (out / "int4" / "README.md").read_text()


def test_byte_counts_are_never_printed_in_scientific_notation():
    assert format_value(1868632) == "1,868,632"
    assert format_value(1868632.0) == "1,868,632"  # a byte count read back from JSON as a float
    result = check_baseline({"format": "int4", "weight_bytes": 1_900_000}, {"format": "int4", "weight_bytes": 1868632})
    assert not result.passed
    assert "weight_bytes 1,868,632 -> 1,900,000" in result.detail and "e+06" not in result.detail


def test_export_summary_names_the_folders_it_wrote(qwen3_src, tmp_path, capsys):
    assert main(["export", str(qwen3_src), "--out", str(tmp_path / "out"), "--formats", "int4", "fp16",
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "<format>" not in printed
    assert f"  {tmp_path / 'out' / 'int4'}\n" in printed and f"  {tmp_path / 'out' / 'fp16'}\n" in printed
