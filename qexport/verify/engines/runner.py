"""Running vLLM on an export from qexport's side: find vLLM's interpreter, run `vllm_child.py` in it, read its result.

vLLM cannot be imported into qexport's environment (it pins its own torch, transformers and compressed-tensors),
so it lives in its own venv (docs/engines.md: two commands) and runs in a child process with a timeout. The interpreter
is, in order: `--engine vllm=PYTHON`, the environment variable QEXPORT_VLLM_PYTHON, DEFAULT_PYTHON.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qexport.errors import InputError

DEFAULT_PYTHON = str(Path.home() / ".cache" / "qexport" / "vllm-venv" / "bin" / "python")
PYTHON_ENV = "QEXPORT_VLLM_PYTHON"
TIMEOUT_ENV = "QEXPORT_VLLM_TIMEOUT"
# vLLM's start-up dominates: ~60 s for the tiny model on 2 idle cores (measured); 15 minutes leaves room for a
# busy machine while still ending a hung engine.
DEFAULT_TIMEOUT_S = 900.0
CHILD = Path(__file__).with_name("vllm_child.py")
PROTOCOL = 1
ENGINES = ("vllm",)
# Memory: 1 GiB of KV cache is plenty for a few short prompts (vLLM's CPU default is 4 GiB).
CHILD_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "INFO", "TOKENIZERS_PARALLELISM": "false"}


@dataclass(frozen=True)
class EngineSpec:
    """An engine asked for: `name`, the interpreter that runs it, and whether it was asked for explicitly
    (then being unable to run it is a failed check; otherwise a skip that says why)."""

    name: str
    python: str
    explicit: bool = True


def parse_engine(value: str, explicit: bool = True) -> EngineSpec:
    """`vllm` or `vllm=PYTHON` (command line and pytest option) -> EngineSpec."""
    name, _, python = value.partition("=")
    if name not in ENGINES:
        raise InputError(f"--engine {value}: unknown engine {name!r} (known: {', '.join(ENGINES)})")
    if _ and not python:
        raise InputError(f"--engine {value}: give the interpreter after '=' (e.g. vllm=/path/to/venv/bin/python)")
    return EngineSpec(name, python or os.environ.get(PYTHON_ENV) or DEFAULT_PYTHON, explicit)


def unavailable_reason(spec: EngineSpec) -> str | None:
    """Why `spec.python` cannot be run at all (None: it is an executable file)."""
    path = Path(spec.python)
    if not path.exists():
        return (f"interpreter {spec.python} does not exist (create vLLM's venv as the README says, or pass "
                f"--engine {spec.name}=PYTHON / set {PYTHON_ENV})")
    if not (path.is_file() and os.access(path, os.X_OK)):
        return f"interpreter {spec.python} is not an executable file"
    return None


class ChildFailed(Exception):
    """The child did not deliver a result: crashed, timed out, or wrote something unreadable."""

    def __init__(self, message: str, output_tail: str = ""):
        super().__init__(message)
        self.output_tail = output_tail


def timeout_s() -> float:
    try:
        return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        raise InputError(f"{TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r}: not a number of seconds") from None


def run_child(python: str, request: dict, timeout: float | None = None) -> tuple[dict, str]:
    """Run vllm_child.py in `python` on `request`; returns (result, output tail). Raises ChildFailed."""
    timeout = timeout_s() if timeout is None else timeout
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(CHILD_ENV)
    with tempfile.TemporaryDirectory(prefix="qexport-vllm-") as tmp:
        request_path, result_path = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request_path.write_text(json.dumps(request))
        with open(Path(tmp) / "output.log", "w+b") as log:
            try:
                proc = subprocess.run([python, str(CHILD), str(request_path), str(result_path)], cwd=tmp, env=env,
                                      stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                      timeout=timeout, start_new_session=True)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = None
            except OSError as e:
                raise ChildFailed(f"cannot start {python}: {e.strerror or e}") from None
            log.seek(0)
            tail = output_tail(log.read().decode("utf-8", "replace"))
        if code is None:
            raise ChildFailed(f"timed out after {timeout:g} s (set {TIMEOUT_ENV} to wait longer)", tail)
        text = result_path.read_text(encoding="utf-8") if result_path.is_file() else None
    return read_result(text, code, tail), tail


def read_result(text: str | None, returncode: int, tail: str = "") -> dict:
    """The child's RESULT.json checked against the protocol; ChildFailed says what is wrong with it."""
    if text is None:
        raise ChildFailed(f"exited with code {returncode} without writing its result", tail)
    try:
        result = json.loads(text)
    except json.JSONDecodeError as e:
        raise ChildFailed(f"wrote an unreadable result ({e})", tail) from None
    if not isinstance(result, dict) or result.get("protocol") != PROTOCOL:
        got = result.get("protocol") if isinstance(result, dict) else type(result).__name__
        raise ChildFailed(f"speaks protocol {got!r}, expected {PROTOCOL} (child and qexport out of step)", tail)
    for key, kind in (("stages", list), ("layers", dict)):
        if not isinstance(result.get(key), kind):
            raise ChildFailed(f"result has no {key} {kind.__name__}", tail)
    if returncode != 0 and result.get("error") is None:
        # The engine died after the child saved its progress (e.g. a kernel abort): what it checked stands,
        # the rest did not happen.
        result["error"] = {"stage": "generation", "type": "exit", "message": f"child exited with code {returncode}",
                           "where": None}
    generation = result.get("generation")
    if generation is not None:
        for seq in generation.get("sequences", []):
            if len(seq["tokens"]) != len(seq["logprobs"]) or len(seq["prompt"]) != len(seq["prompt_logprobs"]):
                raise ChildFailed("result has a sequence whose tokens and logprobs differ in length", tail)
    return result


def output_tail(text: str, lines: int = 12, chars: int = 1500) -> str:
    """The last lines of the child's output that say something (tracebacks and errors; vLLM's INFO chatter
    only when nothing else is there), as one line."""
    kept = [line.strip() for line in text.splitlines() if line.strip()]
    useful = [line for line in kept if " INFO " not in line and " DEBUG " not in line] or kept
    return " | ".join(useful[-lines:])[-chars:]
