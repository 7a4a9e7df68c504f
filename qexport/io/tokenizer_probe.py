"""A folder's tokenizer.json loaded and run by the Rust tokenizers library in a child process with a time limit,
before any library in this process loads it.

The regular expressions of a tokenizer.json (Split pre-tokenizers, Replace normalizers) run in Oniguruma, inside
Rust: one that backtracks makes the library panic (pyo3's PanicException, a BaseException that `except Exception`
does not catch) or run for minutes, and nothing in this process can interrupt it. `problem(folder, texts)` says
what went wrong (a line naming the file) or None; verify turns it into a failed check, export into exit 2.
Only files that hold a regular expression are run: the built-in pre-tokenizers (ByteLevel, Metaspace, ...) use
fixed ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterable

from qexport.io import safe_fs

TOKENIZER_FILE = "tokenizer.json"
# A real tokenizer loads and encodes the verification texts in well under a second; the child's own start (Python
# and the tokenizers import) takes 0.1-2 s on a loaded machine. A minute means a regular expression that backtracks.
SECONDS = 60
MAX_TOKENIZER_BYTES = 256 * 2**20
EVAL_TEXT = Path(__file__).resolve().parent.parent / "data" / "eval_text.txt"  # what verify's functional checks encode

_CHILD = r"""
import json, sys
from tokenizers import Tokenizer
tokenizer = Tokenizer.from_file(sys.argv[1])
for text in json.load(sys.stdin):
    tokenizer.encode(text)
    tokenizer.encode(text, add_special_tokens=False)
"""


def _holds_regex(path: Path) -> bool:
    with safe_fs.open_regular(path) as f:
        if os.fstat(f.fileno()).st_size > MAX_TOKENIZER_BYTES:
            return True  # let the child say what the library makes of it
        return b'"Regex"' in f.read()


def problem(folder: Path, texts: Iterable[str] = ()) -> str | None:
    """What goes wrong when the tokenizers library loads FOLDER/tokenizer.json and encodes `texts` (and the
    evaluation text), in a child process bounded by SECONDS; None when it works or there is nothing to run."""
    path = Path(folder) / TOKENIZER_FILE
    if not path.is_file():
        return None
    try:
        if not _holds_regex(path):
            return None
    except Exception as e:  # InputError (a link out, a FIFO) or OSError: the file checks report it
        return f"{path}: cannot be read ({' '.join(str(e).split())[:200]})"
    payload = json.dumps([EVAL_TEXT.read_text(encoding="utf-8"), "a", *texts])
    try:
        run = subprocess.run([sys.executable, "-I", "-c", _CHILD, str(path)], input=payload, capture_output=True,
                             text=True, timeout=SECONDS, env={**os.environ, "RUST_BACKTRACE": "0"})
    except subprocess.TimeoutExpired:
        return (f"{path}: the tokenizers library takes more than {SECONDS} s to load it and encode the "
                f"verification texts (a regular expression that backtracks?)")
    if run.returncode != 0:
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {run.returncode}"
        return f"{path}: the tokenizers library fails on it: {' '.join(last.split())[:300]}"
    return None
