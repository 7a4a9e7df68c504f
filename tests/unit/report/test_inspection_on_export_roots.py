"""`qexport inspect` as a newcomer meets it: pointed at an export root, piped into `head`, and timed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from qexport.cli.main import main

ROOT = Path(__file__).resolve().parents[3]


def qexport_process(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "qexport.cli.main", *args], env=env, stderr=subprocess.PIPE, text=True,
                          **kwargs)


def test_inspect_on_an_export_root_names_its_format_folders(export_model, qwen3_src, capsys):
    out, _ = export_model(qwen3_src)
    assert main(["inspect", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "config.json missing" not in err and "\n" not in err
    assert err.endswith(f"inspect one format folder: {out / 'fp16'}, {out / 'int4'}, {out / 'int8'}")


def test_inspect_json_into_a_closed_pipe_exits_quietly(export_model, qwen3_src):
    out, _ = export_model(qwen3_src)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte: every write fails with EPIPE, deterministically
    try:
        done = qexport_process("inspect", "--json", str(out / "int4"), stdout=write_end)
    finally:
        os.close(write_end)
    assert done.stderr == ""  # no "I/O error: Broken pipe", no "Exception ignored" from the final flush
    assert done.returncode == 141  # 128 + SIGPIPE, what a shell reports for `cat` in the same place


def test_inspect_imports_neither_torch_nor_transformers(export_model, qwen3_src):
    # Headers only: importing torch alone costs 2-5 s here (python -X importtime), which is what made it slow.
    out, _ = export_model(qwen3_src)
    code = ("import sys; from qexport.cli.main import main; code = main(['inspect', sys.argv[1]]); "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules)); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code, str(out / "int4")], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
