"""What a newcomer reads while and after qexport works: the real format name (int4-asym, not int4) everywhere, progress
counters that say which model they count, stored tensors told apart from reference names, help that lists formats,
checks, thresholds and exit codes, and the SmolLM2 builder and the demo that show progress and write ordinary files."""

from __future__ import annotations

import dataclasses
import io
import os

import pytest

from qexport.cli import help_text
from qexport.cli.main import build_parser, main


@pytest.fixture(scope="module")
def asym_out(qwen3_src, export_model):
    out, _ = export_model(qwen3_src, formats=("int4-asym",))
    return out / "int4-asym"


# ----------------------------------------------------------------------------------------------- format name


def test_detect_format_names_an_asymmetric_int4_config_int4_asym():
    from qexport.verify.context import detect_format

    groups = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "symmetric": False}}}
    assert detect_format({"quantization_config": {"config_groups": groups}}, None) == "int4-asym"


def test_int4_asym_is_judged_by_int4_thresholds():
    from qexport.verify.thresholds import thresholds_for

    assert thresholds_for("int4-asym") == thresholds_for("int4")


def test_verify_of_an_int4_asym_export_says_int4_asym_in_the_verdict_json_and_report(asym_out, qwen3_src, tmp_path,
                                                                                     capsys):
    import json

    report, data = tmp_path / "r.html", tmp_path / "r.json"
    code = main(["verify", str(asym_out), "--reference", str(qwen3_src), "--quiet", "--report", str(report),
                 "--json", str(data)])
    out = capsys.readouterr().out
    assert code == 0
    assert out.strip().splitlines()[-1].startswith("all ") and "passed (int4-asym" in out
    assert json.loads(data.read_text())["format"] == "int4-asym"
    assert "int4-asym" in report.read_text()


# ----------------------------------------------------------------------------------------------- progress lines


def test_progress_counters_name_the_model_and_dtype_they_count(qwen3_src, qwen3_out, monkeypatch):
    from qexport.verify import verify

    units = []

    class Recording:
        def __call__(self, *args):
            pass

        def step(self, name, done, total, unit, elapsed):
            units.append(unit)

    from qexport.verify import context

    monkeypatch.setattr(context, "_REFERENCE_OUTPUTS", {})
    monkeypatch.setattr(context, "_RTN_OUTPUTS", {})
    verify(qwen3_out / "int4", qwen3_src, progress=Recording(), threads=1)
    windows = {u for u in units if u.startswith("windows")}
    assert {"windows through the reference (float32)", "windows through the export (float32)",
            "windows through the export (bfloat16)", "windows through own dequantization (float32)"} <= windows
    assert any(u.startswith("windows through round-to-nearest (") for u in windows)


def test_shards_count_stored_tensors_and_tensor_names_count_reference_names(qwen3_src, qwen3_out):
    from qexport.verify import verify

    checks = {c.name: c for c in verify(qwen3_out / "int4", qwen3_src, only=["shards", "tensor_names"]).checks}
    assert " stored tensors; " in checks["shards"].detail
    assert " tensors by reference name (" in checks["tensor_names"].detail


# ----------------------------------------------------------------------------------------------- help


def _help(*command) -> str:
    import contextlib

    stream = io.StringIO()
    with contextlib.redirect_stdout(stream), pytest.raises(SystemExit):
        build_parser().parse_args([*command, "--help"])
    return " ".join(stream.getvalue().split())


def test_export_help_shows_src_as_required_in_its_usage():
    assert _help("export").startswith("usage: qexport export SRC --out OUT [options]")


def test_export_help_lists_every_user_format():
    from qexport.formats import user_formats

    assert f"formats to write, in any case: {', '.join(user_formats())}" in _help("export")


def test_verify_help_lists_checks_thresholds_and_exit_codes():
    text = _help("verify")
    assert "checks, in order: safe_to_load, model_type, " in text and "engine_vllm" in text
    assert "max_top1_drop_vs_rtn" in text and "exit codes: 0 all good; 1 a verification check failed; 2" in text


def test_top_level_help_states_the_exit_codes():
    assert "exit codes: 0 all good" in _help()


def test_help_lists_are_the_registries():
    from qexport.formats import user_formats
    from qexport.verify import CHECK_NAMES, ENGINE_CHECKS
    from qexport.verify.thresholds import Thresholds

    assert list(help_text.FORMATS) == user_formats()
    assert list(help_text.THRESHOLDS) == [f.name for f in dataclasses.fields(Thresholds)]
    assert list(help_text.CHECKS) == CHECK_NAMES
    assert list(help_text.ENGINE_CHECKS) == [name for _, name in ENGINE_CHECKS.values()]


# ----------------------------------------------------------------------------------------------- SmolLM2 builder


@pytest.fixture
def fake_gguf_reader(qwen3_src, monkeypatch, tmp_path):
    """transformers' GGUF reading replaced by loading the tiny qwen3 (the builder's own saving is what is tested);
    returns a GGUF path to convert."""
    import transformers

    real_model, real_tokenizer = transformers.AutoModelForCausalLM.from_pretrained, \
        transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda folder, gguf_file=None, **kw: real_model(str(qwen3_src), **kw))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda folder, gguf_file=None, **kw: real_tokenizer(str(qwen3_src), **kw))
    gguf = tmp_path / "gguf" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"")
    return gguf


def test_smollm2_builder_writes_every_file_with_the_umask_modes(fake_gguf_reader, tmp_path):
    from qexport.model.smollm2 import convert_gguf

    out = convert_gguf(fake_gguf_reader, tmp_path / "converted", progress=False)
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~mask}


def test_smollm2_builder_shows_its_steps(fake_gguf_reader, tmp_path, capfd):
    from qexport.model.smollm2 import convert_gguf

    convert_gguf(fake_gguf_reader, tmp_path / "converted", progress=True)
    err = capfd.readouterr().err
    assert "model.gguf: reading the GGUF" in err and "3/3" in err


# ----------------------------------------------------------------------------------------------- demo


def test_demo_says_each_format_as_it_is_verified(tmp_path, capsys):
    from qexport.cli.demo import run_demo

    assert run_demo(tmp_path / "demo") == 0
    out = capsys.readouterr().out
    before_table = out.split("verifying each against the source ...")[1]
    for fmt in ("fp16", "int8", "int4"):
        assert f"  {fmt:<9} passed: " in before_table
