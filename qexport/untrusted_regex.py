"""Regular expressions that come from untrusted JSON (`re:` targets and ignores of a quantization_config, the
rank_pattern / alpha_pattern keys of a LoRA adapter), matched with bounds.

Python's `re` backtracks without limit: `(a+)+$` against 30 characters runs for minutes and cannot be
interrupted. Patterns are matched through the `regex` module (a dependency of transformers, so already installed)
with a time limit per match, and refused above a length limit. Either breach is an InputError naming the pattern.
"""

from __future__ import annotations

import functools

import regex

from .errors import InputError

MAX_PATTERN_CHARS = 1000
SECONDS_PER_MATCH = 0.25  # real patterns match a module name in microseconds


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str):
    return regex.compile(pattern, flags=regex.VERSION0)


def match(pattern: str, text: str, where: str, full: bool = False) -> bool:
    """`re.match` (or `re.fullmatch`) of an untrusted pattern, bounded in length and time; `where` names the
    file and key the pattern comes from, for the error."""
    if not isinstance(pattern, str):
        raise InputError(f"{where}: pattern {str(pattern)[:80]!r} is not a string")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise InputError(f"{where}: pattern of {len(pattern)} characters is above the {MAX_PATTERN_CHARS} limit")
    try:
        compiled = _compiled(pattern)
    except (regex.error, RecursionError, OverflowError) as e:
        raise InputError(f"{where}: pattern {pattern[:80]!r} is not a valid regular expression ({e})")
    try:
        found = (compiled.fullmatch if full else compiled.match)(text, timeout=SECONDS_PER_MATCH)
    except TimeoutError:
        raise InputError(f"{where}: pattern {pattern[:80]!r} takes more than {SECONDS_PER_MATCH} s to match "
                         f"{text[:80]!r} (catastrophic backtracking)")
    return found is not None
