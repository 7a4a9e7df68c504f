"""Loading a model through transformers without its progress bars, warnings and stderr chatter."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

from qexport.io.library_guard import no_remote_code


@contextlib.contextmanager
def quiet():
    """Silence transformers' and compressed-tensors' progress bars and warnings while loading; no remote code can
    run inside (io.library_guard.no_remote_code: every library call on a folder goes through here)."""
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    loggers = [logging.getLogger(n) for n in ("compressed_tensors", "accelerate")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with no_remote_code(), warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(level)
        transformers.logging.enable_progress_bar()
        for lg, lv in zip(loggers, old):
            lg.setLevel(lv)
