"""Checks of tokenizer and side files, and of the tokenizer's behaviour."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..checkpoint import INDEX_FILE
from ..safetensors_io import sha256_file
from .context import MANIFEST, TOKENIZER_FILES, CheckResult, Context, _fail, _listing, _ok, _skip, has_tokenizer


def _side_files(folder: Path) -> dict[str, Path]:
    skip = {"config.json", INDEX_FILE, MANIFEST}
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel not in skip and not rel.startswith(".") and not rel.endswith(
                (".safetensors", ".bin", ".pt", ".pth", ".ckpt")):
            out[rel] = path
    return out


def _is_tokenizer_file(rel: str) -> bool:
    return rel in TOKENIZER_FILES or rel.startswith("tokenizer")


def _compare_files(ctx: Context, name: str, wanted: Callable[[str], bool], strict: bool) -> CheckResult:
    ref = {rel: p for rel, p in _side_files(ctx.reference.folder).items() if wanted(rel)}
    if not ref:
        return _skip(name, "the reference has none")
    missing = [rel for rel in ref if not (ctx.export / rel).is_file()]
    changed = [rel for rel in ref if rel not in missing and sha256_file(ref[rel], root=ctx.reference.folder)
               != sha256_file(ctx.export / rel, root=ctx.export)]
    metrics = {"missing": missing, "changed": changed}
    if missing or (strict and changed):
        parts = ([f"missing {_listing(missing)}"] if missing else []) + (
            [f"differs from the reference: {_listing(changed)}"] if strict and changed else [])
        return _fail(name, "; ".join(parts), **metrics)
    note = f" ({len(changed)} rewritten: {_listing(changed)})" if changed else ""
    return _ok(name, f"all {len(ref)} reference files present{'' if changed else ' and identical'}{note}", **metrics)


def check_tokenizer_files(ctx: Context) -> CheckResult:
    return _compare_files(ctx, "tokenizer_files", _is_tokenizer_file, strict=True)


def check_side_files(ctx: Context) -> CheckResult:
    """Generation config, READMEs, sentence-transformers modules: present (other tools may rewrite READMEs)."""
    return _compare_files(ctx, "side_files", lambda rel: not _is_tokenizer_file(rel), strict=False)


def check_tokenizer(ctx: Context) -> CheckResult:
    """The export's tokenizer loads and encodes real text exactly as the reference's does."""
    from ..functional import SENTENCES, quiet

    name = "tokenizer"
    if not has_tokenizer(ctx.reference.folder):
        return _skip(name, "the reference has no tokenizer")
    from transformers import AutoTokenizer

    texts = list(SENTENCES[:6]) + ["Unicode: naïve café — 東京 🙂", "  leading spaces\tand\ttabs\n"]
    try:
        with quiet():
            ref = AutoTokenizer.from_pretrained(str(ctx.reference.folder))
            ours = AutoTokenizer.from_pretrained(str(ctx.export))
    except Exception as e:
        return _fail(name, f"AutoTokenizer.from_pretrained(export) fails: {type(e).__name__}: {e}")
    for text in texts:
        if ref(text)["input_ids"] != ours(text)["input_ids"]:
            return _fail(name, f"encodes {text!r} differently from the reference")
    if getattr(ref, "chat_template", None) != getattr(ours, "chat_template", None):
        return _fail(name, "chat template differs from the reference")
    return _ok(name, f"{type(ours).__name__} encodes {len(texts)} texts as the reference does")

