"""Calls into transformers / tokenizers / sentence-transformers / compressed-tensors never run a folder's code.

Contract: every such call qexport makes on a folder passes `LOAD_KWARGS` (`trust_remote_code=False`, explicitly)
and runs inside `no_remote_code()`. Left unset, `trust_remote_code` makes transformers ask "Do you wish to run the
custom code? [y/N]" on stdin (dynamic_module_utils.resolve_trust_remote_code), and `yes | qexport verify` answered
it. Inside the guard that question cannot be asked and cannot be answered yes:
- transformers' prompt timeout (`TIME_OUT_REMOTE_CODE`) is 0: it refuses without asking;
- stdin reads /dev/null, for Python (`sys.stdin`) and for C code (file descriptor 0): any question gets end of file.
Folders that need remote code are found before a library sees them (qexport.io.json_paths); this is the second wall.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

LOAD_KWARGS = {"trust_remote_code": False}

_lock = threading.RLock()
_depth = 0
_saved = None  # what the first guard entered replaced; restored when the last one leaves (threads included)


@contextlib.contextmanager
def no_remote_code():
    """Run library calls with stdin at end of file and transformers' remote-code prompt off (re-entrant, and
    shared by threads: stdin comes back when the last guard open in the process is left)."""
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = _redirect_stdin()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _restore_stdin(*_saved)
                _saved = None


def _redirect_stdin():
    try:
        import transformers.dynamic_module_utils as dynamic
    except ImportError:  # transformers is a dependency; without it there is no prompt to answer
        dynamic = None
    timeout = getattr(dynamic, "TIME_OUT_REMOTE_CODE", None)
    if dynamic is not None:
        dynamic.TIME_OUT_REMOTE_CODE = 0
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fd0 = os.dup(0)
    except OSError:  # started with stdin closed: nothing to restore but a closed descriptor
        fd0 = None
    os.dup2(devnull, 0)
    os.close(devnull)
    python_stdin, sys.stdin = sys.stdin, open(os.devnull, encoding="utf-8")
    return dynamic, timeout, fd0, python_stdin


def _restore_stdin(dynamic, timeout, fd0, python_stdin) -> None:
    sys.stdin.close()
    sys.stdin = python_stdin
    if fd0 is None:
        os.close(0)
    else:
        os.dup2(fd0, 0)
        os.close(fd0)
    if dynamic is not None:
        dynamic.TIME_OUT_REMOTE_CODE = timeout
