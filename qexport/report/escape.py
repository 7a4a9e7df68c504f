"""Text from an untrusted folder made safe to show: on a terminal (`terminal_safe`) and in a model card
(`markdown_safe`). Names of files and tensors, config values and README text all come from the source.

terminal_safe: every character a terminal would act on instead of showing is written as its Python escape
(`\\x1b`, `\\r`, `\\u202e`, `\\n`): C0 / C1 controls, DEL, format characters (bidi overrides, zero-width joiners),
line / paragraph separators, surrogates (undecodable file-name bytes) and private-use characters. One line of
output stays one line, so a name cannot forge a line such as "problems: none found"; `keep_newlines=True` keeps
"\\n" for a text whose line breaks are qexport's own.
"""

from __future__ import annotations

import unicodedata

# Unicode categories a terminal does not show as themselves: controls, format (bidi overrides, ZWJ),
# line / paragraph separators, surrogates, private use.
UNSHOWN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co"})


def _escaped(ch: str) -> str:
    return ch.encode("unicode_escape", "backslashreplace").decode("ascii") if ch != "\\" else ch


def terminal_safe(text: object, keep_newlines: bool = False) -> str:
    """`text` (str() of it) with every character a terminal would act on escaped (see the module docstring)."""
    text = str(text)
    if text.isprintable():  # the common case: nothing to escape (isprintable is False for every category above)
        return text
    return "".join(
        _escaped(ch) if unicodedata.category(ch) in UNSHOWN_CATEGORIES and not (keep_newlines and ch == "\n")
        else ch
        for ch in text
    )


def terminal_values(value):
    """`value` with every string in it (dict keys too, at any depth) made `terminal_safe`: a report about a
    folder, ready to be laid out as lines."""
    if isinstance(value, str):
        return terminal_safe(value)
    if isinstance(value, dict):
        return {terminal_values(k): terminal_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(terminal_values(v) for v in value)
    return value
