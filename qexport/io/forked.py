"""A function run in a forked child process, its JSON answer read back through a pipe.

The command line uses it for work that can run beside the export on the other core without a second interpreter
start: the architecture's discovery (forked after torch is imported: the child skips its own torch import) and the
source's sha256 (forked before: it runs while this process imports torch).

Forking is only safe from a process with no other thread: a lock another thread holds at fork time (a torch
thread pool's, malloc's) stays locked in the child forever; mutmut's forked test children deadlocked that way.
`can_fork()` checks that there is no other Python thread; the caller answers for the rest (the command line forks
only where it imported torch itself and has run nothing on it). Tests, notebooks and library callers do not fork.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import threading
from typing import Callable

from qexport.errors import InputError


@contextlib.contextmanager
def no_gc():
    """No cyclic garbage collection inside: importing torch and transformers' modeling code allocates millions of
    objects and the collector walks all of them again and again, for almost no garbage. Measured on the 1b
    benchmark's discovery (transformers import + meta model after torch): 2.73 -> 2.27-2.41 s CPU, +8 MB peak RSS."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def can_fork() -> bool:
    return hasattr(os, "fork") and threading.active_count() == 1


class ForkedCall:
    """fn() in a forked child. `result()` waits for it (InputError and OSError pass through; any other failure is
    a RuntimeError naming `what`); `poll()` / `kill()` as for a subprocess, never signalling a reaped pid."""

    def __init__(self, fn: Callable[[], object], what: str):
        self.what = what
        parent = os.getpid()
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.close(read_end)
                _child_setup(parent)
                try:
                    answer = {"value": fn()}
                except InputError as e:
                    answer = {"error": str(e.args[0] if e.args else e)}
                except OSError as e:  # raised again as it is: the command line reports it in one line
                    answer = {"oserror": [e.errno, e.strerror or str(e), None if e.filename is None else
                                          os.fsdecode(e.filename)]}
                except BaseException as e:  # the parent raises it; this child's stderr is /dev/null
                    answer = {"failure": f"{type(e).__name__}: {e}"}
                with os.fdopen(write_end, "wb") as pipe:
                    pipe.write(json.dumps(answer).encode())
                status = 1 if "failure" in answer else 0
            finally:
                os._exit(status)  # no atexit handler, no flush of buffers inherited from the parent
        os.close(write_end)
        self.pid, self.returncode, self.cpu_seconds, self._answer = pid, None, None, None
        self._read_end = read_end
        self._read_lock, self._reap_lock = threading.Lock(), threading.Lock()

    def result(self):
        with self._read_lock:
            if self._answer is None:
                with os.fdopen(self._read_end, "rb") as pipe:
                    out = pipe.read()
                code = self._reap()
                try:
                    answer = json.loads(out)
                except ValueError:  # killed before it wrote all of it
                    answer = {}
                if (code == 0) != ("value" in answer or "error" in answer or "oserror" in answer) or not answer:
                    answer = {"failure": answer.get("failure", f"ended with exit {code}")}
                self._answer = answer
        if "error" in self._answer:
            raise InputError(self._answer["error"])
        if "oserror" in self._answer:
            raise OSError(*self._answer["oserror"])
        if "failure" in self._answer:
            raise RuntimeError(f"{self.what} failed (forked child): {self._answer['failure'][-2000:]}")
        return self._answer["value"]

    def _reap(self) -> int:
        with self._reap_lock:
            if self.returncode is None:
                _, status, usage = os.wait4(self.pid, 0)
                self.cpu_seconds = usage.ru_utime + usage.ru_stime  # what the child cost (bench/ reports it)
                self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode

    def poll(self):
        return self.returncode

    def kill(self) -> None:
        with self._reap_lock:
            if self.returncode is None:
                os.kill(self.pid, signal.SIGKILL)


def _child_setup(parent: int) -> None:
    """Default signal handling (the command line's SIGTERM handler raises in Python), stdio on /dev/null (what the
    child's libraries print is not the export's), ended with the parent, no cyclic garbage collection (see
    `no_gc`)."""
    gc.disable()
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    die_with(parent)


def die_with(parent: int) -> None:
    """Linux: end this child when the process that started it is killed (it would otherwise run on)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent went before the line above took effect
        os._exit(1)
