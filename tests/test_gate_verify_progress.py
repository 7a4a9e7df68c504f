"""`qexport verify` shows a sign of life on stderr: which check runs, and how long each took; `--quiet` none."""

from __future__ import annotations

import re

from qexport.cli import main
from qexport.verify import CHECK_NAMES, verify

QWEN3_CHECKS = [c for c in CHECK_NAMES if c != "engine_sentence_transformers"]  # no modules.json


def test_verify_calls_progress_when_each_check_starts_and_ends(qwen3_src, export_model):
    out, _ = export_model(qwen3_src, formats=("int8",))
    events = []
    only = ["model_type", "bytes", "weights_sqnr"]
    verify(out / "int8", qwen3_src, only=only,
           progress=lambda name, i, n, elapsed, result: events.append((name, i, n, elapsed, result)))
    assert [(name, i, n, r is None) for name, i, n, _, r in events] == [
        ("model_type", 1, 3, True), ("model_type", 1, 3, False), ("bytes", 2, 3, True), ("bytes", 2, 3, False),
        ("weights_sqnr", 3, 3, True), ("weights_sqnr", 3, 3, False)]
    elapsed = [e[3] for e in events]
    assert elapsed == sorted(elapsed)
    assert all(r.name == name for name, _, _, _, r in events if r is not None)


def test_verify_command_prints_each_check_and_its_time_on_stderr(capsys, qwen3_src, export_model):
    out, _ = export_model(qwen3_src, formats=("int8",))
    assert main(["verify", str(out / "int8"), "--reference", str(qwen3_src)]) == 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    pattern = re.compile(r"\[ ?(\d+)/(\d+)\] (\w+) +\.\.\. passed in \d+\.\d s \(elapsed \d+\.\d s\)$")
    matched = [pattern.match(line) for line in lines]
    assert all(matched), lines
    assert [m.group(3) for m in matched] == QWEN3_CHECKS


def test_verify_quiet_prints_nothing_on_stderr(capsys, qwen3_src, export_model):
    out, _ = export_model(qwen3_src, formats=("int8",))
    assert main(["verify", str(out / "int8"), "--reference", str(qwen3_src), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
