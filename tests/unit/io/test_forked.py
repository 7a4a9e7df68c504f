"""qexport.io.forked: a function run in a forked child, its answer read back. Run in a new interpreter each (forking
from this multi-threaded test process is what qexport never does)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

DRIVER = r"""
import sys, time
from qexport.errors import InputError
from qexport.io.forked import ForkedCall, can_fork

def bad_input():
    raise InputError("config.json: no such model")

def broken():
    raise ZeroDivisionError("boom")

def unreadable():
    open("/no/such/file")

assert can_fork()
print("value", ForkedCall(lambda: {"a": [1, 2]}, "sum").result())
for fn in (bad_input, unreadable, broken):
    try:
        ForkedCall(fn, "work").result()
    except (InputError, OSError, RuntimeError) as e:
        print(type(e).__name__, e)
slow = ForkedCall(lambda: time.sleep(60), "sleep")
slow.kill()
try:
    slow.result()
except RuntimeError as e:
    print("killed", e, slow.returncode)
slow.kill()  # reaped already: no signal to a pid that may be reused
"""


def test_a_forked_call_hands_back_its_value_input_and_os_errors_failures_and_a_kill():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, "-c", DRIVER], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "value {'a': [1, 2]}",
        "InputError config.json: no such model",
        "FileNotFoundError [Errno 2] No such file or directory: '/no/such/file'",
        "RuntimeError work failed (forked child): ZeroDivisionError: boom",
        "killed sleep failed (forked child): ended with exit -9 -9",
    ]
