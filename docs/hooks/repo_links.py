"""mkdocs hook: links from the docs pages to repository files outside docs/ (`../bench/RESULTS.md`,
`../CONTRIBUTING.md`).

Such links work where the repository is read (GitHub, an editor), but mkdocs builds docs/ alone and would report
them as not found. Here each one is checked against the repository instead: a target that does not exist is a
warning, which fails `mkdocs build --strict`; one that exists is shown on the site as its repository path in code
(the site holds no copy of the file, so a link there would be broken). Links inside docs/ are left to mkdocs.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

log = logging.getLogger("mkdocs.hooks.repo_links")

# [text](target) or [text](target#anchor); external links and absolute paths are left alone below.
LINK = re.compile(r"\[(?P<text>[^\]\n]+)\]\((?P<target>[^)\s#]+)(?P<anchor>#[^)\s]*)?\)")


def on_page_markdown(markdown: str, page, config, files) -> str:
    docs = Path(config["docs_dir"]).resolve()
    root = docs.parent
    here = (docs / page.file.src_uri).parent

    def outside(match: re.Match) -> str:
        target = match["target"]
        if "://" in target or target.startswith(("/", "mailto:")):
            return match[0]
        path = (here / target).resolve()
        if path == docs or docs in path.parents:
            return match[0]
        if not path.exists():
            log.warning("Doc file '%s' links to '%s', which is not in the repository", page.file.src_uri, target)
            return match[0]
        shown = path.relative_to(root).as_posix()
        text = match["text"]
        return f"`{shown}`" if text.strip("`") == shown else f"{text} (`{shown}`)"

    return LINK.sub(outside, markdown)
