"""Regular expressions that come from untrusted JSON (`re:` targets and ignores of a quantization_config, the
rank_pattern / alpha_pattern keys of a LoRA adapter), matched with bounds.

Python's `re` backtracks without limit: `(a+)+$` against 30 characters runs for minutes and cannot be
interrupted. Two bounds, each an InputError naming the pattern:
- refused before any matching: patterns above MAX_PATTERN_CHARS, and patterns with a repeated group that itself
  holds a repeat or an alternation (`(a+)+`, `(a|aa)*`), the shape of catastrophic backtracking. This also
  protects transformers / compressed-tensors / peft, which match the same patterns with `re` when they load;
- matched through the `regex` module (a dependency of transformers, so already installed) with a time limit.
"""

from __future__ import annotations

import functools

import regex

try:
    from re import _parser as sre_parse  # Python 3.11+
except ImportError:  # pragma: no cover
    import sre_parse

from qexport.errors import InputError

MAX_PATTERN_CHARS = 1000
SECONDS_PER_MATCH = 0.25  # real patterns match a module name in microseconds


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str):
    return regex.compile(pattern, flags=regex.VERSION0)


def _nested_repeat(items, inside_repeat: bool = False) -> bool:
    """True if a repeat (max > 1) contains another repeat (max > 1) or an alternation."""
    for op, arg in items:
        name = str(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low, high, body = arg
            if high > 1 and inside_repeat:
                return True
            if _nested_repeat(body, inside_repeat or high > 1):
                return True
        elif name == "BRANCH":
            if inside_repeat:
                return True
            if any(_nested_repeat(b, inside_repeat) for b in arg[1]):
                return True
        elif name == "SUBPATTERN":
            if _nested_repeat(arg[-1], inside_repeat):
                return True
        elif name in ("ASSERT", "ASSERT_NOT"):
            if _nested_repeat(arg[1], inside_repeat):
                return True
    return False


def check(pattern, where: str) -> str:
    """The pattern if it is safe to match with any engine, else InputError (see the module docstring)."""
    if not isinstance(pattern, str):
        raise InputError(f"{where}: pattern {str(pattern)[:80]!r} is not a string")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise InputError(f"{where}: pattern of {len(pattern)} characters is above the {MAX_PATTERN_CHARS} limit")
    try:
        parsed = sre_parse.parse(pattern)
    except Exception as e:  # re.error, RecursionError, OverflowError
        raise InputError(f"{where}: pattern {pattern[:80]!r} is not a valid regular expression ({e})")
    if _nested_repeat(list(parsed)):
        raise InputError(f"{where}: pattern {pattern[:80]!r} repeats a group holding a repeat or an alternation "
                         f"(exponential backtracking); write it without nesting")
    return pattern


def check_quantization_config(qc, where: str) -> None:
    """Every `re:` pattern of a quantization_config's ignore list and group targets is safe (check)."""
    if not isinstance(qc, dict):
        return
    lists = [qc.get("ignore")]
    groups = qc.get("config_groups")
    if isinstance(groups, dict):
        lists += [g.get("targets") for g in groups.values() if isinstance(g, dict)]
    for items in lists:
        for item in items if isinstance(items, list) else []:
            if isinstance(item, str) and item.startswith("re:"):
                check(item[3:], where)


def match(pattern: str, text: str, where: str, full: bool = False) -> bool:
    """`re.match` (or `re.fullmatch`) of an untrusted pattern, bounded in length and time; `where` names the
    file and key the pattern comes from, for the error."""
    check(pattern, where)
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
