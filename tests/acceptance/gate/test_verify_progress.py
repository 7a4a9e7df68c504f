"""`qexport verify` shows a sign of life on stderr: which check runs, and how long each took; `--quiet` none."""

from __future__ import annotations

import re

from qexport.cli.main import main
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
    # A check still running after _VerifyProgress.STEP_EVERY seconds (a loaded machine) adds lines of its count.
    header, *lines = [line for line in captured.err.splitlines() if not STEP_LINE.match(line)]
    assert header.startswith(f"verifying {out / 'int8'} against {qwen3_src}: {len(QWEN3_CHECKS)} checks, ")
    pattern = re.compile(r"\[ ?(\d+)/(\d+)\] (\w+) +\.\.\. passed in \d+\.\d s \(elapsed \d+\.\d s\)$")
    matched = [pattern.match(line) for line in lines]
    assert all(matched), lines
    assert [m.group(3) for m in matched] == QWEN3_CHECKS


STEP_LINE = re.compile(r"\[ ?(\d+)/(\d+)\] (\w+) +\.\.\. (\d+)/(\d+) ([a-z][a-z0-9 ()-]*?) \(\d+\.\d s\)$")


class Steps:
    """A progress object that also hears steps."""

    def __init__(self):
        self.steps = []

    def __call__(self, name, index, total, elapsed, result):
        pass

    def step(self, name, done, total, unit, elapsed):
        self.steps.append((name, done, total, unit))


def test_weights_sqnr_reports_each_tensor_it_walks(qwen3_src, export_model):
    from qexport.io.checkpoint import Checkpoint
    from qexport.quant.dequant import quantized_modules

    out, _ = export_model(qwen3_src, formats=("int4",))
    progress = Steps()
    verify(out / "int4", qwen3_src, only=["weights_sqnr"], progress=progress)
    # one step per reference tensor: the export stores each as one dense tensor or one quantized module
    expected = len(Checkpoint.open(qwen3_src).entries)
    assert len(quantized_modules(Checkpoint.open(out / "int4"))) > 0
    assert progress.steps == [("weights_sqnr", i, expected, "tensors") for i in range(1, expected + 1)]


def test_functional_reports_each_window_it_runs(qwen3_src, export_model):
    out, _ = export_model(qwen3_src, formats=("int8",))
    progress = Steps()
    verify(out / "int8", qwen3_src, only=["functional"], progress=progress)
    windows = [s for s in progress.steps if s[3].startswith("windows through ")]
    assert windows and windows[-1][1] == windows[-1][2]  # the last window of the last model run
    assert all(name == "functional" for name, *_ in windows)


def test_verify_progress_prints_step_counts_of_a_long_check(monkeypatch, qwen3_src, export_model):
    import io

    from qexport.cli import main as cli
    out, _ = export_model(qwen3_src, formats=("int8",))
    monkeypatch.setattr(cli._VerifyProgress, "STEP_EVERY", 0.0)  # every step is "long" here
    stream = io.StringIO()
    verify(out / "int8", qwen3_src, only=["model_type", "weights_sqnr"], progress=cli._VerifyProgress(stream))
    lines = stream.getvalue().splitlines()
    steps = [STEP_LINE.match(line) for line in lines if STEP_LINE.match(line)]
    # the count of every tensor but the last (the end line follows it), each line naming the check again
    assert steps and all(m.group(3) == "weights_sqnr" and m.group(6) == "tensors" for m in steps)
    assert [int(m.group(4)) for m in steps] == list(range(1, int(steps[0].group(5))))
    assert re.match(r"\[2/2\] weights_sqnr +\.\.\. passed in ", lines[-1]), lines[-1]
    assert re.match(r"\[1/2\] model_type +\.\.\. passed in ", lines[0]), lines[0]
