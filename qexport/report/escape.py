"""Text from an untrusted folder made safe to show: on a terminal (`terminal_safe`) and in a model card
(`markdown_safe`). Names of files and tensors, config values and README text all come from the source.

terminal_safe: every character a terminal would act on instead of showing is written as its Python escape
(`\\x1b`, `\\r`, `\\u202e`, `\\n`): C0 / C1 controls, DEL, format characters (bidi overrides, zero-width joiners),
line / paragraph separators, surrogates (undecodable file-name bytes) and private-use characters. One line of
output stays one line, so a name cannot forge a line such as "problems: none found"; `keep_newlines=True` keeps
"\\n" for a text whose line breaks are qexport's own.
"""

from __future__ import annotations

import re
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


# ---------------------------------------------------------------------------------------------------------------
# Markdown (the model card). markdown_safe: one line of plain text whatever the input: every line break (\n, \r,
# \v, \f, \x1c-\x1e, NEL, LS, PS) and other control or format character written as its escape (terminal_safe),
# and every character that would start markup escaped: backslash, `*`, `` ` ``, `[`, `]`, `|`, `~`, `_` at a
# word's edge (emphasis; `kld_mean` stays), `<` before a letter, `/`, `!` or `?` (an HTML tag, comment or
# autolink: `&lt;`), `&` that starts an entity or character reference (`&amp;`). The text still reads the same
# once rendered. quote_markdown: a whole document as a block quote that nothing in it can leave.

_MARKUP = re.compile(r"[\\*`\[\]|~]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])|<(?=[A-Za-z/!?])|&(?=#?\w+;)")
_MARKUP_ESCAPES = {"<": "&lt;", "&": "&amp;"}
# Line breaks other than "\n" that some Markdown reader, editor or Python's str.splitlines ends a line at.
_OTHER_BREAKS = re.compile(r"\r(?!\n)|[\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_HTML_OPEN = re.compile(r"<(?=[A-Za-z/!?])")


# What opens a block when it starts a line (or follows a list marker: the card writes "- TEXT"): a list item (`-`,
# `+` before a space or the end, `1.` / `1)`), a heading (`#`), a quote (`>`), a thematic break or setext underline
# (`---`, `===`). "-0.5" and "#3" stay as they are.
_BLOCK_START = re.compile(r"^(\s*)(?:([-+])(?=\s|$|-)|(#)(?=\s|$|#)|(>)|(=)(?==*\s*$)|(\d{1,9})([.)])(?=\s|$))")


def _escape_block_start(m: re.Match) -> str:
    lead, dash, hash_, quote, equals, digits, dot = m.groups()
    if digits is not None:
        return f"{lead}{digits}\\{dot}"
    return f"{lead}\\{dash or hash_ or quote or equals}"


def markdown_safe(text: object) -> str:
    """`text` as one line of Markdown that renders as itself and starts no markup (see above) inside a line (a
    table cell, a sentence); at the start of a line or list item use markdown_block_safe."""
    text = _MARKUP.sub(lambda m: _MARKUP_ESCAPES.get(m.group(0), "\\" + m.group(0)), str(text))
    return terminal_safe(text)


def markdown_block_safe(text: object) -> str:
    """markdown_safe for text that starts a line or a list item: a leading `-`, `+`, `#`, `>`, `===` or `1.` that
    would open a block (a nested list, a heading, a quote) is escaped too."""
    return _BLOCK_START.sub(_escape_block_start, markdown_safe(text), count=1)


def quote_markdown(text: str) -> str:
    """`text` as a Markdown block quote that nothing in it can leave: every line starts with ">", line breaks
    other than "\\n" (a lone "\\r", NEL, LS ...) become character references (`&#13;`), and HTML (a
    `</blockquote>` would close the quote in the rendered page) is shown, not run (`&lt;`). "\\r\\n" stays a
    line end. Idempotent on what `unquote_markdown` reads back."""
    text = _OTHER_BREAKS.sub(lambda m: f"&#{ord(m.group(0))};", text)
    text = _HTML_OPEN.sub("&lt;", text)
    return "\n".join(f"> {line}" if line else ">" for line in text.rstrip("\n").split("\n"))
