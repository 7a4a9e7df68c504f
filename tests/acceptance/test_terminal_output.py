"""What a newcomer sees on the terminal: format names in any case, option names as typed, one warning line for many
dense Linears, no stray progress bar, help that states defaults and presets, model names in reports."""

from __future__ import annotations

import json
import logging

import pytest

from qexport.cli.main import build_parser, main
from qexport.export.pipeline import ExportOptions
from qexport.formats import format_name, user_formats
from qexport.io.identity import model_name

pytest_plugins = ["pytester"]


@pytest.mark.parametrize("typed", ["INT4", "Int4", "int4"])
def test_format_names_are_case_insensitive(typed):
    assert format_name(typed) == "int4"
    assert ExportOptions(formats=(typed, "FP16", "fp16")).formats == ("int4", "fp16")  # one folder per format


def test_export_accepts_upper_case_formats_and_writes_lower_case_folders(qwen3_src, tmp_path):
    assert main(["export", str(qwen3_src), "--out", str(tmp_path), "--formats", "INT4", "--quiet"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int4"]


def test_unknown_format_lists_only_user_formats(capsys):
    assert main(["export", "SRC", "--out", "OUT", "--formats", "int3"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"qexport: error: --formats: unknown format 'int3' (known: {', '.join(user_formats())})"
    assert user_formats()[:3] == ["fp16", "int8", "int4"] and "original" not in user_formats()


def test_gate_unknown_format_names_the_plugin_option(pytester, qwen3_src):
    result = pytester.runpytest(f"--qexport-model={qwen3_src}", "--qexport-formats", "INT3", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*--qexport-formats: unknown format 'INT3' (known: {', '.join(user_formats())})*"])


def test_odd_group_size_warns_once_with_a_count_and_the_first_names(qwen3_src, tmp_path, caplog):
    # hidden 256 does not divide by 96 (intermediate 768 does): the 12 Linears reading the hidden state stay dense.
    with caplog.at_level(logging.WARNING, logger="qexport"):
        assert main(["export", str(qwen3_src), "--out", str(tmp_path), "--formats", "int4", "--group-size", "96",
                     "--quiet"]) == 0
    dense = [r.getMessage() for r in caplog.records if "stay dense" in r.getMessage()]
    assert len(dense) == 1
    assert dense[0].startswith("int4: 12 Linear weight(s) stay dense; input size 256 does not divide by group size "
                               "96: 12 (model.layers.0.")
    assert dense[0].count("model.layers.") == 3


def test_building_the_demo_model_draws_no_progress_bar(tmp_path, capfd):
    from qexport.model.tiny import build_tiny_model

    build_tiny_model(tmp_path / "m", "qwen3")
    captured = capfd.readouterr()
    assert "Writing model shards" not in captured.err + captured.out


def test_help_states_the_workers_default_and_the_real_presets(capsys):
    from qexport.model.tiny import PRESETS

    for command in (["export", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(command)
    text = " ".join(capsys.readouterr().out.split())
    assert "(default 2;" in text  # --workers (two: encoding uses both cores of a laptop or CI runner)
    assert f"tiny model preset: {', '.join(PRESETS)} (default qwen3)" in text


def test_reports_name_a_model_by_its_recorded_name(tmp_path):
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "config.json").write_text(json.dumps({"_name_or_path": "Qwen/Qwen3-0.6B"}))
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "config.json").write_text(json.dumps({"_name_or_path": "/data/models/my-llama/"}))
    (tmp_path / "card").mkdir()
    (tmp_path / "card" / "config.json").write_text("{}")
    (tmp_path / "card" / "README.md").write_text("---\nmodel-index:\n- name: tiny-chat\n---\n# tiny\n")
    (tmp_path / "source").mkdir()
    assert model_name(tmp_path / "hub") == "Qwen/Qwen3-0.6B"
    assert model_name(tmp_path / "local") == "my-llama"
    assert model_name(tmp_path / "card") == "tiny-chat"
    assert model_name(tmp_path / "source") == "source"
    assert model_name(tmp_path / "source", "given by --name") == "given by --name"


def test_verify_report_rows_carry_the_name_and_the_path(export_model, qwen3_src):
    from qexport.report.html import verification_html
    from qexport.verify import verify

    out, _ = export_model(qwen3_src, formats=("int8",))
    result = verify(out / "int8", qwen3_src, only=["bytes"]).as_dict()  # one cheap check: the row is the point
    named = verification_html({"model": model_name(qwen3_src, "tiny qwen3"), **result})
    assert "<td>tiny qwen3</td>" in named and f"<td>{qwen3_src}</td>" in named
    assert f"<td>{model_name(qwen3_src)}</td>" in verification_html(result)  # no name given: found from the folder


def test_a_merged_model_card_does_not_speak_of_an_original_export(qwen3_src, tmp_path):
    assert main(["merge", "--models", str(qwen3_src), str(qwen3_src), "--out", str(tmp_path / "m"), "--quiet"]) == 0
    card = (tmp_path / "m" / "README.md").read_text()
    assert "`original`" not in card and "original export" not in card
