"""Regular expressions that come from untrusted JSON (`re:` targets and ignores of a quantization_config, the
rank_pattern / alpha_pattern keys of a LoRA adapter), matched with bounds.

Python's `re` backtracks without limit: `(a+)+$` against 30 characters runs for minutes and cannot be
interrupted. Two bounds, each an InputError naming the pattern:
- refused before any matching: patterns above MAX_PATTERN_CHARS, and patterns with a repeated group that itself
  holds a repeat or an alternation (`(a+)+`, `(a|aa)*`), the shape of catastrophic backtracking. This also
  protects transformers / compressed-tensors / peft, which match the same patterns with `re` when they load;
- matched through the `regex` module (a dependency of transformers, so already installed) with a time limit.
And a bound on the work of a whole list (check_pattern_list), before any library compiles one of them: how many
entries, how many characters, and how many ways all the `re:` patterns together can backtrack (paths).
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
# A list of targets or ignores (plain names included): compressed-tensors matches every module of the model against
# every entry, and Python's `re` keeps only 512 compiled patterns. Real configs list at most a few hundred entries
# (an ignore per layer of a 100-layer model); 600,000 short ones hung inspect and verify.
MAX_LIST_ENTRIES = 1024
MAX_LIST_CHARS = 128 * 1024
MAX_REGEX_PATTERNS = 64
# Backtracking paths of a pattern: the product of its choices (a repeat counted as matching 0..NAME_CHARS characters
# of a module name (real ones are under 120), an optional part, an alternation). `re:.*lm_head` has 257 paths,
# `re:model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up)_proj` 257 * 257 * 2, `.*` x 16 + `X` 257**16. The sum over
# a config's patterns is bounded by MAX_TOTAL_PATHS. Measured: compressed-tensors' `is_match` (re.match per module
# and entry, as on reload) over the 1,047 named modules of an 80-layer Llama, with the worst this allows, four
# copies of `(.*)(.*)(.?)(.?)(.?)(.?)X` (2**20 paths each): 1.2-2.6 s on this 2-core VM under a
# load of 22; with 1,020 more plain names, the list's limit: 6 s under that load. `.*` x 16 + `X` never ends.
NAME_CHARS = 256
MAX_TOTAL_PATHS = 2**22


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


_REPEATS = ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")


def _paths(items) -> int:
    """How many ways a parsed pattern can backtrack over a name of NAME_CHARS characters (an upper bound)."""
    total = 1
    for op, arg in items:
        name = str(op)
        if name in _REPEATS:
            low, high, body = arg
            inner = _paths(body)
            if high <= 1:
                total *= inner + (low == 0)
            else:  # a body with choices under a repeat is refused by _nested_repeat (or counted huge here)
                total *= (min(high, NAME_CHARS) - min(low, NAME_CHARS) + 1) * inner ** min(high, NAME_CHARS)
        elif name == "BRANCH":
            total *= sum(_paths(branch) for branch in arg[1])
        elif name == "SUBPATTERN":
            total *= _paths(arg[-1])
        elif name in ("ASSERT", "ASSERT_NOT"):
            total *= _paths(arg[1])
        elif name == "ATOMIC_GROUP":
            total *= _paths(arg)
        elif name == "GROUPREF_EXISTS":
            total *= _paths(arg[1]) + (_paths(arg[2]) if arg[2] is not None else 1)
        total = min(total, MAX_TOTAL_PATHS + 1)
    return total


def paths(pattern: str) -> int:
    """Backtracking paths of a pattern that `check` accepts (see NAME_CHARS)."""
    return _paths(list(sre_parse.parse(pattern)))


def check_pattern_list(entries, where: str) -> None:
    """A list of plain names and `re:` patterns within the bounds on the whole list's matching work (InputError
    naming `where` otherwise); each pattern also passes `check`. Non-strings are left to the caller."""
    entries = [e for e in entries if isinstance(e, str)]
    if len(entries) > MAX_LIST_ENTRIES:
        raise InputError(f"{where}: {len(entries):,} names and patterns, above the limit of {MAX_LIST_ENTRIES:,}")
    chars = sum(len(e) for e in entries)
    if chars > MAX_LIST_CHARS:
        raise InputError(f"{where}: names and patterns of {chars:,} characters in all, above the limit of "
                         f"{MAX_LIST_CHARS:,}")
    patterns = [e[3:] for e in entries if e.startswith("re:")]
    if len(patterns) > MAX_REGEX_PATTERNS:
        raise InputError(f"{where}: {len(patterns):,} re: patterns, above the limit of {MAX_REGEX_PATTERNS}")
    total = 0
    for pattern in patterns:
        total += paths(check(pattern, where))
        if total > MAX_TOTAL_PATHS:
            raise InputError(f"{where}: pattern {pattern[:80]!r} brings the patterns' backtracking paths past "
                             f"{MAX_TOTAL_PATHS:,} (too many `.*`, optional parts or alternatives in a row)")


def check(pattern, where: str) -> str:
    """The pattern if it is safe to match with any engine, else InputError (see the module docstring)."""
    if not isinstance(pattern, str):
        raise InputError(f"{where}: pattern {str(pattern)[:80]!r} is not a string")
    return _checked(pattern, where)


@functools.lru_cache(maxsize=4096)  # parsing is the costly part of matching one short name
def _checked(pattern: str, where: str) -> str:
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
    check_pattern_list([item for items in lists if isinstance(items, list) for item in items], where)


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
